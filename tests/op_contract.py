"""What every backend's ops must satisfy, as assertions each backend's test file calls.

Tolerance policy for the attention ops: ``skiplayers/tolerance.py`` (flash-attention's rule against
a float64 truth; the dispatch tuner applies the same one). Row-moving ops (compaction, cache
writes) must be exact.
"""

from __future__ import annotations

import torch

from skiplayers import ops as sk_ops
from skiplayers import reference, tolerance
from skiplayers.tolerance import ATOL


def _to_cpu(case: dict) -> dict:
    return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def attention_error(out: torch.Tensor, case: dict, reference_fn) -> tuple[float, float]:
    """``(max |out - ref64|, bound)`` of the policy above; asserts dtype, shape and finiteness."""
    cpu_case = _to_cpu(case)
    dtype = case["q"].dtype
    assert out.dtype == dtype, f"output dtype {out.dtype} != input dtype {dtype}"
    assert out.shape == case["q"].shape, f"output shape {tuple(out.shape)} != q's {tuple(case['q'].shape)}"
    assert torch.isfinite(out).all(), "non-finite values in the output"
    truth = reference_fn(**cpu_case, compute_dtype=torch.float64)
    low = reference_fn(**cpu_case, compute_dtype=dtype)
    return tolerance.attention_error(out, truth, low)


def assert_attention_close(out: torch.Tensor, case: dict, reference_fn) -> None:
    err, bound = attention_error(out, case, reference_fn)
    atol = ATOL[case["q"].dtype]
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (naive low-precision error {(bound - atol) / 2:.3g})"


def arguments(op: str, case: dict) -> list:
    """The values of ``case`` (a dict keyed by the schema's argument names) in schema order."""
    return [case[k] for k in sk_ops.schema_arguments(op)]


def call(ops, op: str, case: dict):
    """``ops.<op>`` (an OpSet, or the ``reference`` module) on the arguments of ``case``, by position."""
    return getattr(ops, op)(*arguments(op, case))


def check_varlen_attention(ops, case: dict) -> None:
    out = call(ops, "varlen_attention", case)
    assert_attention_close(out, case, reference.varlen_attention)


def check_cache_attention(ops, case: dict) -> None:
    out = call(ops, "cache_attention", case)
    assert_attention_close(out, case, reference.cache_attention)


def check_compact_rows(ops, case: dict) -> None:
    out, cu = ops.compact_rows(case["x"], case["cu_seqlens"], case["keep"])
    ref_out, ref_cu = reference.compact_rows(**_to_cpu(case))
    assert torch.equal(out.cpu(), ref_out) and torch.equal(cu.cpu(), ref_cu)


_POOLS = ("k_cache", "v_cache", "pos_cache", "tag_cache")


def _clone(case: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def check_cache_append(ops, case: dict) -> None:
    """Every page of every pool equals the reference's afterwards (the new slots written, nothing
    else touched); ``cache_seqlens`` and ``block_table`` are not changed."""
    mine, ref = _clone(case), _to_cpu(_clone(case))
    call(ops, "cache_append", mine)
    call(reference, "cache_append", ref)
    assert torch.equal(mine["block_table"].cpu(), case["block_table"].cpu()), "block_table must not change"
    for name in _POOLS:
        assert torch.equal(mine[name].cpu(), ref[name]), f"{name} differs"
    assert torch.equal(mine["cache_seqlens"].cpu(), case["cache_seqlens"].cpu()), "cache_seqlens must not change"


def check_cache_compact(ops, case: dict) -> None:
    """The new lengths and each sequence's kept slots equal the reference's; pages outside the
    sequences' slots are not touched (slots past a new length are unspecified)."""
    mine, ref = _clone(case), _to_cpu(_clone(case))
    lengths = call(reference, "cache_compact", ref)
    new_lengths = call(ops, "cache_compact", mine)
    assert torch.equal(new_lengths.cpu(), lengths), f"new cache_seqlens {new_lengths.tolist()} != {lengths.tolist()}"
    table = case["block_table"].cpu()
    owned = torch.zeros(case["k_cache"].shape[0], dtype=torch.bool)
    for b, n in enumerate(case["cache_seqlens"].tolist()):
        owned[table[b, : -(-n // case["k_cache"].shape[1])].long()] = True
    for name in _POOLS:
        got, want = mine[name].cpu(), ref[name]
        for b, n in enumerate(lengths.tolist()):
            assert torch.equal(reference.gather_slots(got, table, b, n), reference.gather_slots(want, table, b, n)), \
                f"{name} of sequence {b} differs"
        assert torch.equal(got[~owned], case[name].cpu()[~owned]), f"{name}: a page no sequence owns was written"


# Inputs every backend must refuse with a clear message: (changes to a make_varlen_attention([4, 6])
# case, a regular expression of the message). Tensors here are CPU tensors; backends move them.
BAD_VARLEN_INPUTS = [
    (dict(q=torch.randn(10, 6, 32)), "head_dim"),
    (dict(q=torch.randn(10, 5, 64)), "multiple of KV heads"),
    (dict(k=torch.randn(10, 2, 64, dtype=torch.float64), v=torch.randn(10, 2, 64, dtype=torch.float64)), "dtype"),
    (dict(q_pos=torch.arange(10)), "int32"),
    (dict(rule=64), "unknown bits"),
    (dict(q_tag=torch.zeros(3, dtype=torch.int32)), "q_tag"),
]

# Argument names in schema order (``csrc/skiplayers.cpp``), for the tests that pick some of them out;
# a whole call is ``call(ops, op, case)``.
_VARLEN_ARGS = sk_ops.schema_arguments("varlen_attention")
_CACHE_ARGS = sk_ops.schema_arguments("cache_attention")
_APPEND_ARGS = sk_ops.schema_arguments("cache_append")
_COMPACT_ARGS = sk_ops.schema_arguments("cache_compact")
