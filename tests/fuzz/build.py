"""Case specs (``specs.py``) to tensors, and the judgement of one backend's answer.

``run_case(spec, ops)`` builds the op's arguments from the spec (contents drawn from ``spec["seed"]``),
calls ``ops.<op>``, and returns the error/bound ratio of the attention ops (tolerance policy of
``tests/op_contract.py``, against a float64 reference) or 0.0 for the exact row ops. It raises
``AssertionError`` on a wrong answer, on a legal input the backend refuses, on bad input it accepts,
and when an op writes into an input it must only read (including the unused parts of strided views).
"""

from __future__ import annotations

import re

import torch

import op_contract
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import TAG_ANCHOR, TAG_CONTEXT, TAG_SENTENCE_SHIFT, TAG_SINK

INT32_MAX = 2**31 - 1


class BadInputAccepted(AssertionError):
    """Bad input (or a meta tensor among CPU inputs) that the backend did not refuse."""
DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "bool")}


# --- metadata ---------------------------------------------------------------------------------------


def positions(n: int, mode: dict, gen: torch.Generator) -> torch.Tensor:
    """int64 positions of one sequence (``specs.positions``): steps from 0, then a base offset."""
    steps = {
        "dense": lambda: torch.ones(n, dtype=torch.int64),
        "gapped": lambda: torch.randint(1, 4, (n,), generator=gen),
        "sparse": lambda: torch.randint(1, 200, (n,), generator=gen),
        "ties": lambda: torch.randint(0, 3, (n,), generator=gen),
        "unsorted": lambda: torch.randint(1, 4, (n,), generator=gen),
    }[mode["steps"]]()
    pos = steps.cumsum(0) - steps[:1]
    if mode["steps"] == "unsorted":
        pos = pos[torch.randperm(n, generator=gen)]
    span = int(pos.max()) if n else 0
    base = {"zero": 0, "small": int(torch.randint(0, 1000, (1,), generator=gen)),
            "extreme": INT32_MAX - span - int(torch.randint(0, 1000, (1,), generator=gen))}[mode["base"]]
    return pos + base


def tags(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """int32 tag words of one sequence: "model" as the patch makes them (sentence = anchors before),
    "random" flag bits with unordered sentence ids 0..5, "large" the same near sentence id 2**27."""
    if kind == "model":
        context = torch.rand(n, generator=gen) < 0.35
        context[:1] = False
        anchor = torch.rand(n, generator=gen) < 0.2
        sentence = anchor.to(torch.int64).cumsum(0) - anchor.to(torch.int64)
        sink = torch.arange(n) < int(torch.randint(0, 3, (1,), generator=gen))
        flags = context * TAG_CONTEXT + anchor * TAG_ANCHOR + sink * TAG_SINK
    else:
        flags = torch.randint(0, 8, (n,), generator=gen)
        sentence = torch.randint(0, 6, (n,), generator=gen) + (2**27 if kind == "large" else 0)
    return (flags.to(torch.int64) | (sentence << TAG_SENTENCE_SHIFT)).to(torch.int32)


def query_positions(k_pos: torch.Tensor, nq: int, mode: str, base_mode: dict, gen) -> torch.Tensor:
    """Positions of ``nq`` queries over keys at ``k_pos``: "suffix" (the keys' own last tokens),
    "after" (new tokens after every key) or "free" (sorted, anywhere near the keys)."""
    nk = k_pos.numel()
    if mode == "suffix" and nq <= nk:
        return k_pos[nk - nq:]
    if nk == 0:
        return positions(nq, dict(base_mode, steps="gapped"), gen).clamp(0, INT32_MAX)
    if mode == "after":
        return (int(k_pos.max()) + torch.randint(1, 4, (nq,), generator=gen).cumsum(0)).clamp(max=INT32_MAX)
    lo, hi = int(k_pos.min()) - 3, int(k_pos.max()) + 3
    return torch.randint(lo, hi + 1, (nq,), generator=gen).sort().values.clamp(0, INT32_MAX)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def int32(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.to(torch.int64) for p in parts]).to(torch.int32) if parts else torch.zeros(0, dtype=torch.int32)


# --- tensors in strided layouts -----------------------------------------------------------------------


def _poison(full: torch.Tensor, dtype) -> torch.Tensor:
    return torch.full_like(full, float("nan")) if dtype.is_floating_point else torch.full_like(full, -99)


def rows(n: int, heads: int, dim: int, dtype, layout: str, gen) -> torch.Tensor:
    """``[n, heads, dim]``: contiguous, a head slice of a wider buffer, every other row, or head-major.
    The parts of the underlying buffer outside the view hold NaN."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    if layout == "wide_heads":
        full = randn(n, heads + 2, dim)
        full[:, 0], full[:, heads + 1] = _poison(full[:, 0], dtype), _poison(full[:, 0], dtype)
        return full[:, 1:heads + 1]
    if layout == "row_step":
        full = randn(2 * n, heads, dim)
        full[1::2] = _poison(full[1::2], dtype)
        return full[::2]
    if layout == "head_major":
        return randn(heads, n, dim).transpose(0, 1)
    return randn(n, heads, dim)


def cache(batch: int, cap: int, kv_heads: int, dim: int, dtype, layout: str, gen) -> torch.Tensor:
    """``[batch, cap, kv_heads, dim]``: contiguous, a capacity or head slice of a wider buffer, or every
    other sequence of one (the rest NaN)."""
    if layout == "wide_cap":
        full = torch.randn(batch, cap + 3, kv_heads, dim, generator=gen).to(dtype)
        full[:, cap:] = float("nan")
        return full[:, :cap]
    if layout == "wide_heads":
        full = torch.randn(batch, cap, kv_heads + 1, dim, generator=gen).to(dtype)
        full[:, :, kv_heads] = float("nan")
        return full[:, :, :kv_heads]
    if layout == "batch_step":
        full = torch.randn(2 * batch, cap, kv_heads, dim, generator=gen).to(dtype)
        full[1::2] = float("nan")
        return full[::2]
    return torch.randn(batch, cap, kv_heads, dim, generator=gen).to(dtype)


# --- cases ------------------------------------------------------------------------------------------------


def varlen_attention_case(s: dict, gen) -> dict:
    dtype = DTYPES[s["dtype"]]
    q_pos, k_pos, q_tag, k_tag = [], [], [], []
    for nq, nk in s["lengths"]:
        kp, kt = positions(nk, s["pos"], gen), tags(nk, s["tags"]["kind"], gen)
        qp = query_positions(kp, nq, s["queries"], s["pos"], gen)
        suffix = s["queries"] == "suffix"
        k_pos.append(kp), k_tag.append(kt), q_pos.append(qp)
        q_tag.append(kt[nk - nq:] if suffix else tags(nq, s["tags"]["kind"], gen))
    nq, nk = (sum(n[i] for n in s["lengths"]) for i in (0, 1))
    lq, lk, lv = s["layout"]
    return dict(
        q=rows(nq, s["heads"], s["head_dim"], dtype, lq, gen),
        k=rows(nk, s["kv_heads"], s["head_dim"], dtype, lk, gen),
        v=rows(nk, s["kv_heads"], s["head_dim"], dtype, lv, gen),
        cu_seqlens_q=cu_seqlens([n[0] for n in s["lengths"]]), cu_seqlens_k=cu_seqlens([n[1] for n in s["lengths"]]),
        q_pos=int32(q_pos), k_pos=int32(k_pos),
        q_tag=int32(q_tag) if s["tags"]["q"] else None, k_tag=int32(k_tag) if s["tags"]["k"] else None,
        rule=s["rule"], scale=s["scale"],
    )


def cache_attention_case(s: dict, gen) -> dict:
    dtype, batch, cap = DTYPES[s["dtype"]], len(s["cache_lengths"]), s["capacity"]
    k_cache = cache(batch, cap, s["kv_heads"], s["head_dim"], dtype, s["cache_layout"], gen)
    v_cache = cache(batch, cap, s["kv_heads"], s["head_dim"], dtype, s["cache_layout"], gen)
    width = cap + 2 if s["pos_layout"] == "wide" else cap
    # slots past each length: positions that would be visible, any tag bits, NaN K/V if poisoned
    pos_full = torch.randint(0, 50, (batch, width), generator=gen, dtype=torch.int32)
    tag_full = torch.randint(0, 64, (batch, width), generator=gen, dtype=torch.int32)
    pos_cache, tag_cache = pos_full[:, :cap], tag_full[:, :cap]
    q_pos, q_tag = [], []
    for b, (n, nq) in enumerate(zip(s["cache_lengths"], s["q_lengths"])):
        kp, kt = positions(n, s["pos"], gen), tags(n, s["tags"]["kind"], gen)
        pos_cache[b, :n], tag_cache[b, :n] = kp.to(torch.int32), kt
        q_pos.append(query_positions(kp, nq, s["queries"], s["pos"], gen))
        suffix = s["queries"] == "suffix" and nq <= n
        q_tag.append(kt[n - nq:] if suffix else tags(nq, s["tags"]["kind"], gen))
        if s["poison"]:
            k_cache[b, n:], v_cache[b, n:] = float("nan"), float("nan")
    lengths = list(s["cache_lengths"])
    if s.get("expect", "ok") == "bad_length" and batch:
        b = int(torch.randint(0, batch, (1,), generator=gen))
        lengths[b] = cap + 1 + int(torch.randint(0, 3, (1,), generator=gen)) if b % 2 == 0 else -1
    return dict(
        _error="outside" if s.get("expect", "ok") == "bad_length" and batch else None,
        q=rows(sum(s["q_lengths"]), s["heads"], s["head_dim"], dtype, s["q_layout"], gen),
        k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens(s["q_lengths"]),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32), q_pos=int32(q_pos), pos_cache=pos_cache,
        q_tag=int32(q_tag) if s["tags"]["q"] else None, tag_cache=tag_cache if s["tags"]["k"] else None,
        rule=s["rule"], scale=s["scale"], num_splits=s["num_splits"],
    )


def _keep(n: int, mode: str, gen) -> torch.Tensor:
    p = {"random": float(torch.rand(1, generator=gen)), "none": 0.0, "all": 1.0, "sparse": 0.05}[mode]
    return torch.rand(n, generator=gen) < p


def compact_rows_case(s: dict, gen) -> dict:
    dtype, n = DTYPES[s["dtype"]], sum(s["lengths"])
    shape = (n, *s["trailing"])
    if dtype.is_floating_point:
        values = torch.randn(*shape, generator=gen).to(dtype)
    elif dtype == torch.bool:
        values = torch.rand(*shape, generator=gen) < 0.5
    else:
        values = torch.randint(-100, 100, shape, generator=gen).to(dtype)
    if s["layout"] == "row_step":
        full = torch.cat([values, values], 0) if n else values
        full = full.view(2, *shape).transpose(0, 1).reshape(2 * n, *s["trailing"]) if n else full
        x = full[::2]
    elif s["layout"] == "wide" and s["trailing"]:
        full = torch.cat([values, values[..., :1]], -1)
        x = full[..., :-1]
    else:
        x = values
    return dict(x=x, cu_seqlens=cu_seqlens(s["lengths"]), keep=_keep(n, s["keep"], gen))


def _cache_buffers(batch: int, cap: int, kv_heads: int, dim: int, dtype, gen) -> dict:
    return dict(
        k_cache=torch.randn(batch, cap, kv_heads, dim, generator=gen).to(dtype),
        v_cache=torch.randn(batch, cap, kv_heads, dim, generator=gen).to(dtype),
        pos_cache=torch.randint(-(2**31), INT32_MAX, (batch, cap), generator=gen, dtype=torch.int32),
        tag_cache=torch.randint(-(2**31), INT32_MAX, (batch, cap), generator=gen, dtype=torch.int32),
    )


def cache_append_case(s: dict, gen) -> dict:
    dtype, batch, n = DTYPES[s["dtype"]], len(s["cache_lengths"]), sum(s["new_lengths"])
    lengths, cap = list(s["cache_lengths"]), s["capacity"]
    if batch and s.get("expect", "ok") != "ok":
        b = int(torch.randint(0, batch, (1,), generator=gen))
        lengths[b] = -1 if s.get("expect", "ok") == "bad_length" else cap - s["new_lengths"][b] + 1
    lk, lv = s["layout"]
    return dict(
        _error="capacity" if s.get("expect", "ok") != "ok" and batch else None,
        **_cache_buffers(batch, cap, s["kv_heads"], s["head_dim"], dtype, gen),
        k=rows(n, s["kv_heads"], s["head_dim"], dtype, lk, gen), v=rows(n, s["kv_heads"], s["head_dim"], dtype, lv, gen),
        pos=torch.randint(-(2**31), INT32_MAX, (n,), generator=gen, dtype=torch.int32),
        tag=torch.randint(-(2**31), INT32_MAX, (n,), generator=gen, dtype=torch.int32),
        cu_seqlens=cu_seqlens(s["new_lengths"]), cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
    )


def cache_compact_case(s: dict, gen) -> dict:
    dtype, batch = DTYPES[s["dtype"]], len(s["cache_lengths"])
    old_cap = max([0, *s["cache_lengths"]]) + s["old_spare"]
    keep = torch.stack([_keep(old_cap, s["keep"], gen) for _ in range(batch)]) if batch else torch.zeros(0, old_cap, dtype=torch.bool)
    lengths = list(s["cache_lengths"])
    kept = [int(keep[b, :n].sum()) for b, n in enumerate(lengths)]
    capacity = max([0, *kept]) + s["new_spare"]
    if batch and s.get("expect", "ok") == "bad_length":
        b = int(torch.randint(0, batch, (1,), generator=gen))
        lengths[b] = old_cap + 1 + int(torch.randint(0, 3, (1,), generator=gen)) if b % 2 == 0 else -1
    error = "outside|capacity" if s.get("expect", "ok") == "bad_length" and batch else None
    if s.get("expect", "ok") == "too_small" and max([0, *kept]):
        capacity, error = max(kept) - 1, "capacity"
    return dict(
        _error=error,
        **_cache_buffers(batch, old_cap, s["kv_heads"], s["head_dim"], dtype, gen),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32), keep=keep, capacity=capacity,
    )


BUILDERS = dict(
    varlen_attention=varlen_attention_case, cache_attention=cache_attention_case, compact_rows=compact_rows_case,
    cache_append=cache_append_case, cache_compact=cache_compact_case,
)
ARGS = {op: sk_ops.schema_arguments(op) for op in sk_ops.OP_NAMES}


def build(spec: dict) -> dict:
    return BUILDERS[spec["op"]](spec, torch.Generator().manual_seed(spec["seed"]))


def expected_error(spec: dict, case: dict) -> str | None:
    """A regular expression the backend's error must match, or None when the input is legal."""
    error = case.pop("_error", None)
    return "device|meta" if spec.get("meta") else error


# --- judgement -----------------------------------------------------------------------------------------------


def _buffers(case: dict) -> dict:
    """The storage behind every tensor input (a view's base), to check that read-only inputs stay unchanged."""
    out = {}
    for name, t in case.items():
        if isinstance(t, torch.Tensor):
            out[name] = t if t._base is None else t._base
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return torch.equal(a.nan_to_num(1e4, 2e4, -2e4), b.nan_to_num(1e4, 2e4, -2e4)) and torch.equal(a.isnan(), b.isnan())
    return torch.equal(a, b)


def _check_unchanged(before: dict, case: dict, skip=()) -> None:
    for name, buf in _buffers(case).items():
        if name not in skip:
            assert _same(buf, before[name]), f"the op changed its input {name} (or memory around its view)"


def run_case(spec: dict, ops) -> float:
    """Runs one case on ``ops``; returns err/bound for attention ops, 0.0 for row ops (see module doc)."""
    op = spec["op"]
    case = build(spec)
    want_error = expected_error(spec, case)
    if spec.get("meta"):
        case[spec["meta"]] = case[spec["meta"]].to("meta")
    args = [case[k] for k in ARGS[op]]
    if want_error:
        try:
            result = getattr(ops, op)(*args)
        except (RuntimeError, ValueError) as err:
            assert re.search(want_error, str(err), re.IGNORECASE), f"error message {str(err)!r} does not match {want_error!r}"
            return 0.0
        shape = [tuple(r.shape) for r in result] if isinstance(result, (tuple, list)) else getattr(result, "shape", None)
        raise BadInputAccepted(f"bad input accepted (expected an error matching {want_error!r}); returned {shape}")
    before = {k: v.clone() for k, v in _buffers(case).items()}
    if op == "cache_append":
        return _judge_append(case, args, ops, before)
    result = getattr(ops, op)(*args)
    _check_unchanged(before, case)
    if op == "compact_rows":
        ref_x, ref_cu = reference.compact_rows(*args)
        out, cu = result
        assert out.dtype == ref_x.dtype and out.shape == ref_x.shape, f"x: {out.dtype} {tuple(out.shape)} != {ref_x.dtype} {tuple(ref_x.shape)}"
        assert torch.equal(out, ref_x), "compacted rows differ"
        assert torch.equal(cu, ref_cu), f"new cu_seqlens {cu.tolist()} != {ref_cu.tolist()}"
        return 0.0
    if op == "cache_compact":
        _judge_compact(result, reference.cache_compact(*args))
        return 0.0
    fn = reference.varlen_attention if op == "varlen_attention" else reference.cache_attention
    err, bound = op_contract.attention_error(result, case, fn)
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"
    return err / bound


def _judge_append(case: dict, args: list, ops, before: dict) -> float:
    ref = {k: before[k].clone() for k in ("k_cache", "v_cache", "pos_cache", "tag_cache")}
    ops.cache_append(*args)
    reference.cache_append(*[ref.get(k, case[k]) for k in ARGS["cache_append"]])
    for name in ref:
        assert _same(case[name], ref[name]), f"{name} differs from the reference"
    _check_unchanged(before, case, skip=tuple(ref))
    return 0.0


def _judge_compact(outs, refs) -> None:
    lengths = refs[4]
    assert torch.equal(outs[4], lengths), f"new cache_seqlens {outs[4].tolist()} != {lengths.tolist()}"
    for name, o, r in zip(("k_cache", "v_cache", "pos_cache", "tag_cache"), outs[:4], refs[:4]):
        assert o.dtype == r.dtype and o.shape == r.shape, f"{name}: {o.dtype} {tuple(o.shape)} != {r.dtype} {tuple(r.shape)}"
        for b, n in enumerate(lengths.tolist()):
            assert _same(o[b, :n], r[b, :n]), f"{name} of sequence {b} differs"
