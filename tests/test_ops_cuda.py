"""The CUDA C++ kernels against reference.py: the matrix of test_ops_cpu.py on CUDA tensors, plus
what only the GPU backend has (split-K choices, many sequences, strided / misaligned inputs,
CUDA-graph capture, device-side metadata checks). Tolerance policy in op_contract.py.

The CUDA kernels support head dims 64 and 128 (others raise); everything else mirrors the CPU tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import cases
import op_contract
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import Rule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = [0, Rule.HIDE_CONTEXT, Rule.ANCHORS, Rule.HIDE_CONTEXT | Rule.ANCHORS]
HEADS = [(6, 2), (9, 3), (8, 1), (7, 7), (16, 2), (16, 1)]  # GQA ratios 3, 3, 8, 1, 8, 16


@pytest.fixture(scope="module")
def ops():
    return sk_ops.get_ops("cuda")  # raises (test error) on a GPU machine whose build lacks the kernels


def _args(case, names):
    return [case[k] for k in names]


# --- varlen_attention (prefill) ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lengths", [[1], [111], [0, 5, 0, 37], [3, 130, 0, 77, 2]])
def test_varlen_attention_ragged(ops, dtype, rule, lengths):
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=rule, gapped=True, seed=len(lengths) + rule, device=DEV)
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_gqa_and_head_dims(ops, dtype, heads, kv_heads, head_dim):
    case = cases.make_varlen_attention(
        [19, 200], heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, seed=heads, device=DEV
    )
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_long_sequence(ops, dtype, head_dim):
    case = cases.make_varlen_attention([989], heads=9, kv_heads=3, head_dim=head_dim, dtype=dtype, seed=989, device=DEV)
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_noncontiguous_and_untagged(ops, dtype):
    case = cases.make_varlen_attention([33, 0, 140], noncontiguous=True, with_tags=False, dtype=dtype, device=DEV)
    assert not case["q"].is_contiguous()
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_queries_are_a_suffix_of_the_keys(ops, rule, dtype):
    case = cases.make_varlen_attention(
        [1, 3, 0, 7], [50, 300, 10, 7], rule=rule, gapped=True, dtype=dtype, seed=3, device=DEV
    )
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_many_sequences(ops, dtype):
    # > 32 sequences: the tile locator walks several warp-sized chunks of cu_seqlens.
    lengths = torch.randint(0, 40, (70,), generator=torch.Generator().manual_seed(70)).tolist()
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=Rule.ANCHORS, gapped=True, seed=70, device=DEV)
    op_contract.check_varlen_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_hidden_context_gives_zero_rows_when_nothing_is_visible(ops, dtype):
    case = cases.make_varlen_attention([4, 70], rule=Rule.HIDE_CONTEXT, dtype=dtype, seed=1, device=DEV)
    case["k_tag"] = torch.ones_like(case["k_tag"])  # every key is context: nothing visible
    out = ops.varlen_attention(*_args(case, op_contract._VARLEN_ARGS))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_attention_misaligned_rows_are_copied(ops, dtype):
    case = cases.make_varlen_attention([17, 40], dtype=dtype, seed=5, device=DEV)
    q = case["q"]
    flat = torch.empty(q.numel() + 1, dtype=dtype, device=DEV)
    case["q"] = flat[1:].view(q.shape).copy_(q)  # storage offset of one element: rows not 16-byte aligned
    op_contract.check_varlen_attention(ops, case)


# --- cache_attention (decode) --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7, 64])
def test_cache_attention_decode(ops, dtype, rule, num_splits):
    case = cases.make_cache_attention(
        [1, 0, 150, 700], dtype=dtype, rule=rule, num_splits=num_splits, seed=rule, device=DEV
    )
    op_contract.check_cache_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cache_attention_gqa_multi_query(ops, dtype, heads, kv_heads, head_dim):
    case = cases.make_cache_attention(
        [9, 300, 33], q_lengths=[4, 1, 33], heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        seed=heads, device=DEV,
    )
    op_contract.check_cache_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_noncontiguous_and_untagged(ops, dtype):
    case = cases.make_cache_attention([5, 260], noncontiguous=True, with_tags=False, head_dim=128, dtype=dtype, device=DEV)
    op_contract.check_cache_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [0, 5])
def test_cache_attention_many_sequences_and_long_caches(ops, dtype, num_splits):
    gen = torch.Generator().manual_seed(41)
    lengths = torch.randint(0, 3000, (41,), generator=gen).tolist()
    lengths[3] = 0
    case = cases.make_cache_attention(
        lengths, heads=9, kv_heads=3, dtype=dtype, rule=Rule.HIDE_CONTEXT, num_splits=num_splits, seed=41, device=DEV
    )
    op_contract.check_cache_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_strided_cache_views(ops, dtype):
    case = cases.make_cache_attention([40, 300], heads=6, kv_heads=2, dtype=dtype, seed=9, device=DEV)
    for name in ("k_cache", "v_cache"):
        c = case[name]
        wide = torch.zeros(c.shape[0], c.shape[1], c.shape[2] + 2, c.shape[3], dtype=dtype, device=DEV)
        wide[:, :, 1:-1] = c
        case[name] = wide[:, :, 1:-1]  # heads strided inside a wider buffer
        assert not case[name].is_contiguous()
    op_contract.check_cache_attention(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_attention_does_not_depend_on_num_splits(ops, dtype):
    case = cases.make_cache_attention([2000, 77, 1], dtype=dtype, rule=Rule.ANCHORS, seed=2, device=DEV)
    outs = []
    for splits in (1, 2, 5, 16, 0):
        case["num_splits"] = splits
        outs.append(ops.cache_attention(*_args(case, op_contract._CACHE_ARGS)).float())
    tol = op_contract.ATOL[dtype] * 2
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=tol, rtol=0)


# --- row ops -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[0], [5], [0, 7, 0, 130, 1], [3000, 1, 2500]])
def test_compact_rows(ops, dtype, lengths):
    op_contract.check_compact_rows(ops, cases.make_compact_rows(lengths, dtype=dtype, seed=len(lengths), device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_cache_append(ops, dtype, noncontiguous):
    case = cases.make_cache_append(
        [0, 3, 10, 0], [5, 0, 7, 1], capacity=17, dtype=dtype, noncontiguous=noncontiguous, device=DEV
    )
    op_contract.check_cache_append(ops, case)


@pytest.mark.parametrize("head_dim", [64, 128, 80, 5])  # 5: 10-byte rows, 2-byte copies
def test_cache_append_head_dims(ops, head_dim):
    case = cases.make_cache_append([2, 0], [1, 3], capacity=5, kv_heads=3, head_dim=head_dim, dtype=torch.bfloat16,
                                   device=DEV)
    op_contract.check_cache_append(ops, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_capacity", [None, 40])
def test_cache_compact(ops, dtype, new_capacity):
    case = cases.make_cache_compact([0, 12, 30, 3], capacity=30, new_capacity=new_capacity, dtype=dtype, device=DEV)
    op_contract.check_cache_compact(ops, case)


def test_cache_compact_long_cache(ops):
    case = cases.make_cache_compact([1000, 0, 777], capacity=1100, keep_fraction=0.5, device=DEV)
    op_contract.check_cache_compact(ops, case)


# --- torch.library.opcheck on CUDA tensors -------------------------------------------------------


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_varlen_attention(ops):
    case = cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS, dtype=torch.bfloat16, device=DEV)
    _opcheck(torch.ops.skiplayers.varlen_attention.default, tuple(_args(case, op_contract._VARLEN_ARGS)))


def test_opcheck_cache_attention(ops):
    case = cases.make_cache_attention([4, 9], num_splits=2, dtype=torch.float16, device=DEV)
    _opcheck(torch.ops.skiplayers.cache_attention.default, tuple(_args(case, op_contract._CACHE_ARGS)))


def test_opcheck_compact_rows(ops):
    case = cases.make_compact_rows([2, 5], device=DEV)
    _opcheck(torch.ops.skiplayers.compact_rows.default, (case["x"], case["cu_seqlens"], case["keep"]))


def test_opcheck_cache_append(ops):
    case = cases.make_cache_append([1, 2], [2, 1], capacity=6, device=DEV)
    _opcheck(torch.ops.skiplayers.cache_append.default, tuple(_args(case, op_contract._APPEND_ARGS)))


def test_opcheck_cache_compact(ops):
    case = cases.make_cache_compact([3, 6], capacity=8, device=DEV)
    _opcheck(torch.ops.skiplayers.cache_compact.default, tuple(_args(case, op_contract._COMPACT_ARGS)))


# --- CUDA graph: one decode step (cache_append + cache_attention), captured and replayed --------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_cuda_graph_matches_eager(ops, dtype):
    heads, kv_heads, head_dim, capacity = 9, 3, 64, 600
    lengths = [5, 0, 130, 511]
    batch = len(lengths)
    state = cases.make_cache_attention(
        lengths, capacity=capacity, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype,
        rule=Rule.HIDE_CONTEXT, seed=11, device=DEV,
    )
    gen = torch.Generator().manual_seed(12)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    lens_before = state["cache_seqlens"].clone()  # the graph reads these buffers: updated in place
    lens_after = lens_before + 1
    caches = {k: state[k] for k in ("k_cache", "v_cache", "pos_cache", "tag_cache")}

    def new_token_inputs() -> dict:
        last_slot = (lens_before.long() - 1).clamp(min=0)[:, None]
        last_pos = torch.where(lens_before > 0, caches["pos_cache"].gather(1, last_slot)[:, 0], -1)
        return dict(
            q=torch.randn(batch, heads, head_dim, generator=gen).to(dtype=dtype, device=DEV),
            k=torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEV),
            v=torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=DEV),
            pos=(last_pos + 1).to(torch.int32),
            tag=torch.randint(0, 2, (batch,), generator=gen, dtype=torch.int32).to(DEV),  # some new tokens are context
        )

    def step(c, inputs, before, after):
        ops.cache_append(c["k_cache"], c["v_cache"], c["pos_cache"], c["tag_cache"], inputs["k"], inputs["v"],
                         inputs["pos"], inputs["tag"], cu, before)
        return ops.cache_attention(inputs["q"], c["k_cache"], c["v_cache"], cu, after, inputs["pos"], c["pos_cache"],
                                   inputs["tag"], c["tag_cache"], Rule.HIDE_CONTEXT, head_dim**-0.5, 0)

    static = new_token_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocations, lazy init), on copies
        step({k: v.clone() for k, v in caches.items()}, static, lens_before, lens_after)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the kernels; runs nothing
        out_static = step(caches, static, lens_before, lens_after)

    for i in range(3):
        fresh = new_token_inputs()
        for k in static:
            static[k].copy_(fresh[k])
        eager_caches = {k: v.clone() for k, v in caches.items()}
        eager = step(eager_caches, fresh, lens_before.clone(), lens_after.clone())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, eager), f"replay {i} differs from eager"
        for k in caches:
            assert torch.equal(caches[k], eager_caches[k]), f"replay {i}: {k} differs from eager"
        truth_case = dict(q=fresh["q"], k_cache=caches["k_cache"], v_cache=caches["v_cache"], cu_seqlens_q=cu,
                          cache_seqlens=lens_after, q_pos=fresh["pos"], pos_cache=caches["pos_cache"], q_tag=fresh["tag"],
                          tag_cache=caches["tag_cache"], rule=Rule.HIDE_CONTEXT, scale=head_dim**-0.5, num_splits=0)
        op_contract.assert_attention_close(out_static, truth_case, reference.cache_attention)
        lens_before += 1  # the next step appends after this one
        lens_after += 1


# --- clear errors --------------------------------------------------------------------------------


def test_attention_rejects_unsupported_head_dim(ops):
    case = cases.make_varlen_attention([4, 6], head_dim=80, device=DEV)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 80"):
        ops.varlen_attention(*_args(case, op_contract._VARLEN_ARGS))
    case = cases.make_cache_attention([4, 6], head_dim=96, device=DEV)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128, got 96"):
        ops.cache_attention(*_args(case, op_contract._CACHE_ARGS))


@pytest.mark.parametrize(
    "changes,message",
    op_contract.BAD_VARLEN_INPUTS + [(dict(k_pos=torch.arange(10, dtype=torch.int32).cpu()), "is on cpu")],
)
def test_varlen_attention_rejects_bad_input(ops, changes, message):
    case = cases.make_varlen_attention([4, 6], device=DEV)
    case.update({k: (v.to(DEV) if isinstance(v, torch.Tensor) and k != "k_pos" else v) for k, v in changes.items()})
    with pytest.raises(RuntimeError, match=message):
        ops.varlen_attention(*_args(case, op_contract._VARLEN_ARGS))


def test_compact_rows_rejects_bad_cu_seqlens(ops):
    case = cases.make_compact_rows([3, 4], device=DEV)
    case["cu_seqlens"] = torch.tensor([0, 5, 4], dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.compact_rows(case["x"], case["cu_seqlens"], case["keep"])


def test_cache_compact_rejects_overflow(ops):
    case = cases.make_cache_compact([20], capacity=20, new_capacity=2, keep_fraction=1.0, device=DEV)
    with pytest.raises(RuntimeError, match="more than the new capacity 2"):
        ops.cache_compact(*_args(case, op_contract._COMPACT_ARGS))


# Metadata values the host cannot read without a sync are checked on the device: a violation is a
# device-side assert, which leaves the CUDA context unusable, so each runs in its own process.
_DEVICE_CHECK_SCRIPT = """
import torch, cases, op_contract
from skiplayers import ops as sk_ops
ops = sk_ops.get_ops("cuda")
{body}
torch.cuda.synchronize()
print("NO ERROR RAISED")
"""


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "case = cases.make_cache_append([4], [3], capacity=6, device='cuda')\n"
            "ops.cache_append(*[case[k] for k in op_contract._APPEND_ARGS])",
            "exceeds the cache capacity",
        ),
        (
            "case = cases.make_cache_attention([3], capacity=4, device='cuda')\n"
            "case['cache_seqlens'] = torch.tensor([9], dtype=torch.int32, device='cuda')\n"
            "ops.cache_attention(*[case[k] for k in op_contract._CACHE_ARGS])",
            "outside [0, capacity]",
        ),
        (
            "case = cases.make_varlen_attention([4, 6], device='cuda')\n"
            "case['cu_seqlens_k'] = torch.tensor([0, 4, 9], dtype=torch.int32, device='cuda')\n"
            "ops.varlen_attention(*[case[k] for k in op_contract._VARLEN_ARGS])",
            "cu_seqlens_k must start at 0 and end at total_k",
        ),
    ],
)
def test_device_side_metadata_checks(body, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    script = _DEVICE_CHECK_SCRIPT.format(body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR RAISED" not in output, output
    assert "device-side assert" in output or message in output, output
    assert message in output, f"the device-side message {message!r} was not printed:\n{output}"
