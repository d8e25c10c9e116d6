"""What only the CUDA backend has, beyond the op results of tests/test_ops.py: a decode step
(``cache_append`` + ``cache_attention`` over a paged cache) and the in-place ``cache_compact``, each
captured in a CUDA graph and replayed, and the metadata checks the kernels make on the device (values
the host cannot read without a sync: cu_seqlens, cache lengths against the block table, block table
entries of the slots in use), each of which leaves the CUDA context unusable and so runs in its own
process. Tolerance policy in op_contract.py.
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

pytestmark = pytest.mark.cuda  # skipped without a GPU (conftest.py)

DEV = "cuda"
_POOLS = ("k_cache", "v_cache", "pos_cache", "tag_cache")


@pytest.fixture(scope="module")
def cuda_ops():
    return sk_ops.get_ops("cuda")  # raises (test error) on a GPU machine whose build lacks the kernels


# --- CUDA graph: one decode step (cache_append + cache_attention), captured and replayed --------

STEPS = 3  # replays; each appends one token per sequence


def decode_state(lengths: list[int], page_size: int, dtype, heads: int, kv_heads: int, head_dim: int,
                 device) -> dict:
    """A paged cache holding ``lengths[b]`` slots per sequence whose block table already has the pages
    of ``STEPS`` more (the caller assigns pages before a step, as SkipCache does from its host mirror);
    the slots past each length hold stale metadata that the appends overwrite."""
    state = cases.make_cache_attention([n + STEPS for n in lengths], page_size=page_size, heads=heads,
                                       kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, rule=Rule.HIDE_CONTEXT,
                                       seed=11, device=device)
    state["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32, device=device)
    return state


def last_positions(pos_cache: torch.Tensor, block_table: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """pos of each sequence's last slot (``lengths[b] - 1``), -1 for an empty cache; on the device."""
    page_size = pos_cache.shape[1]
    slot = (lengths.long() - 1).clamp(min=0)
    page = block_table.gather(1, (slot // page_size)[:, None])[:, 0].long().clamp(min=0)
    last = pos_cache.reshape(-1)[page * page_size + slot % page_size]
    return torch.where(lengths > 0, last, -1).to(torch.int32)


def new_token_inputs(gen: torch.Generator, caches: dict, block_table, lengths, heads: int, kv_heads: int,
                     head_dim: int, dtype, device) -> dict:
    batch = lengths.shape[0]
    return dict(
        q=torch.randn(batch, heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        k=torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        v=torch.randn(batch, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        pos=last_positions(caches["pos_cache"], block_table, lengths) + 1,
        tag=torch.randint(0, 2, (batch,), generator=gen, dtype=torch.int32).to(device),  # some new tokens are context
    )


def decode_step(ops, caches: dict, block_table, cu, inputs: dict, before, after, head_dim: int) -> torch.Tensor:
    """cache_append of one token per sequence at slot ``before[b]``, then cache_attention over
    ``after[b]`` slots (all arguments by schema name)."""
    op_contract.call(ops, "cache_append", dict(**caches, block_table=block_table, k=inputs["k"], v=inputs["v"],
                                               pos=inputs["pos"], tag=inputs["tag"], cu_seqlens=cu,
                                               cache_seqlens=before))
    return op_contract.call(ops, "cache_attention", attention_case(caches, block_table, cu, inputs, after, head_dim))


def attention_case(caches: dict, block_table, cu, inputs: dict, lengths, head_dim: int) -> dict:
    return dict(q=inputs["q"], k_cache=caches["k_cache"], v_cache=caches["v_cache"], block_table=block_table,
                cu_seqlens_q=cu, cache_seqlens=lengths, q_pos=inputs["pos"], pos_cache=caches["pos_cache"],
                q_tag=inputs["tag"], tag_cache=caches["tag_cache"], rule=Rule.HIDE_CONTEXT, scale=head_dim**-0.5,
                num_splits=0)


# Page size 16 (SkipCache's default): the 511-slot cache crosses a page boundary on its first append,
# the empty one starts its first page; page size 1: every append writes a new page.
@pytest.mark.parametrize("dtype,page_size", [(torch.bfloat16, 16), (torch.float32, 16), (torch.bfloat16, 1)])
def test_decode_step_cuda_graph_matches_eager(cuda_ops, dtype, page_size):
    ops = cuda_ops
    heads, kv_heads, head_dim = 9, 3, 64
    lengths = [5, 0, 130, 511]
    batch = len(lengths)
    state = decode_state(lengths, page_size, dtype, heads, kv_heads, head_dim, DEV)
    table = state["block_table"]
    gen = torch.Generator().manual_seed(12)
    cu = torch.arange(batch + 1, dtype=torch.int32, device=DEV)
    lens_before = state["cache_seqlens"].clone()  # the graph reads these buffers: updated in place
    lens_after = lens_before + 1
    caches = {k: state[k] for k in _POOLS}

    def fresh_inputs() -> dict:
        return new_token_inputs(gen, caches, table, lens_before, heads, kv_heads, head_dim, dtype, DEV)

    static = fresh_inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocations, lazy init), on copies
        decode_step(ops, {k: v.clone() for k, v in caches.items()}, table, cu, static, lens_before, lens_after,
                    head_dim)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # records the kernels; runs nothing
        out_static = decode_step(ops, caches, table, cu, static, lens_before, lens_after, head_dim)

    for i in range(STEPS):
        fresh = fresh_inputs()
        for k in static:
            static[k].copy_(fresh[k])
        eager_caches = {k: v.clone() for k, v in caches.items()}
        eager = decode_step(ops, eager_caches, table, cu, fresh, lens_before.clone(), lens_after.clone(), head_dim)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out_static, eager), f"replay {i} differs from eager"
        for k in caches:
            assert torch.equal(caches[k], eager_caches[k]), f"replay {i}: {k} differs from eager"
        truth_case = attention_case(caches, table, cu, fresh, lens_after, head_dim)
        op_contract.assert_attention_close(out_static, truth_case, reference.cache_attention)
        lens_before += 1  # the next step appends after this one
        lens_after += 1


# --- CUDA graph: in-place cache_compact (no host sync any more), captured and replayed -----------


def test_cache_compact_cuda_graph_matches_eager(cuda_ops):
    ops = cuda_ops
    case = cases.make_cache_compact([0, 12, 300, 3, 77], page_size=16, kv_heads=3, dtype=torch.bfloat16, seed=5,
                                    device=DEV)
    original = {k: case[k].clone() for k in _POOLS}
    static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, on copies
        op_contract.call(ops, "cache_compact", {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                for k, v in static.items()})
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lens_static = op_contract.call(ops, "cache_compact", static)

    gen = torch.Generator().manual_seed(6)
    for i in range(3):
        keep = (torch.rand(case["keep"].shape, generator=gen) < (0.2, 0.6, 1.0)[i]).to(DEV)
        for k in _POOLS:
            static[k].copy_(original[k])
        static["keep"].copy_(keep)
        eager_case = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in static.items()}
        eager_lens = op_contract.call(ops, "cache_compact", eager_case)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(lens_static, eager_lens), f"replay {i}: new lengths differ from eager"
        for k in _POOLS:
            assert torch.equal(static[k], eager_case[k]), f"replay {i}: {k} differs from eager"
        ref_case = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in static.items()}
        for k in _POOLS:
            ref_case[k] = original[k].cpu()
        ref_lens = op_contract.call(reference, "cache_compact", ref_case)
        assert torch.equal(lens_static.cpu(), ref_lens), f"replay {i}: new lengths differ from the reference"
        table = case["block_table"].cpu()
        for k in _POOLS:
            for b, n in enumerate(ref_lens.tolist()):
                assert torch.equal(reference.gather_slots(static[k].cpu(), table, b, n),
                                   reference.gather_slots(ref_case[k], table, b, n)), f"replay {i}: {k}, sequence {b}"


# --- device-side metadata checks ----------------------------------------------------------------
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

_UNASSIGNED = "a block_table entry of a slot {} is not a page of the pool"

# (id, script body, the device-side message). The ids name the op each script calls first.
DEVICE_CHECKS = [
    (  # 4 + 3 slots, a block table of 3 pages of 2 (test_ops.py's append_overflow)
        "cache_append-append_overflow",
        "case = cases.make_cache_append([4], [3], page_size=2, max_pages=3, device='cuda')\n"
        "op_contract.call(ops, 'cache_append', case)",
        "cache_seqlens[b] + new rows exceeds the slots of the block table",
    ),
    (  # new slot 6 lies in page 3 of the table, unassigned
        "cache_append-unassigned_page",
        "case = cases.make_cache_append([4], [3], page_size=2, device='cuda')\n"
        "case['block_table'][0, 3] = -1\n"
        "op_contract.call(ops, 'cache_append', case)",
        "skiplayers::cache_append: " + _UNASSIGNED.format("it writes"),
    ),
    (  # 9 slots, a block table of 1 page of 4 (test_ops.py's length_past_capacity)
        "cache_attention-length_past_capacity",
        "case = cases.make_cache_attention([3], page_size=4, max_pages=1, device='cuda')\n"
        "case['cache_seqlens'] = torch.tensor([9], dtype=torch.int32, device='cuda')\n"
        "op_contract.call(ops, 'cache_attention', case)",
        "cache_attention: cache_seqlens[b] is outside [0, max_pages * page_size]",
    ),
    (  # slots 8..11 of sequence 0 in an unassigned page (-1)
        "cache_attention-unassigned_page",
        "case = cases.make_cache_attention([20, 7], page_size=4, device='cuda')\n"
        "case['block_table'][0, 2] = -1\n"
        "op_contract.call(ops, 'cache_attention', case)",
        "skiplayers::cache_attention: " + _UNASSIGNED.format("in use"),
    ),
    (  # a page number past the pool
        "cache_attention-page_past_pool",
        "case = cases.make_cache_attention([20, 7], page_size=4, device='cuda')\n"
        "case['block_table'][1, 1] = case['k_cache'].shape[0]\n"
        "op_contract.call(ops, 'cache_attention', case)",
        "skiplayers::cache_attention: " + _UNASSIGNED.format("in use"),
    ),
    (  # slot 9 of 20 in an unassigned page (test_ops.py's unassigned_page)
        "cache_compact-unassigned_page",
        "case = cases.make_cache_compact([20], page_size=4, device='cuda')\n"
        "case['block_table'][0, 2] = -1\n"
        "op_contract.call(ops, 'cache_compact', case)",
        "skiplayers::cache_compact: " + _UNASSIGNED.format("in use"),
    ),
    (
        "cache_compact-length_past_capacity",
        "case = cases.make_cache_compact([5], page_size=4, max_pages=2, device='cuda')\n"
        "case['cache_seqlens'] = torch.tensor([9], dtype=torch.int32, device='cuda')\n"
        "op_contract.call(ops, 'cache_compact', case)",
        "cache_compact: cache_seqlens[b] is outside [0, max_pages * page_size]",
    ),
    (
        "varlen_attention-cu_seqlens_k",
        "case = cases.make_varlen_attention([4, 6], device='cuda')\n"
        "case['cu_seqlens_k'] = torch.tensor([0, 4, 9], dtype=torch.int32, device='cuda')\n"
        "op_contract.call(ops, 'varlen_attention', case)",
        "cu_seqlens_k must start at 0 and end at total_k",
    ),
]


@pytest.mark.parametrize("body,message", [c[1:] for c in DEVICE_CHECKS], ids=[c[0] for c in DEVICE_CHECKS])
def test_device_side_metadata_checks(body, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    script = _DEVICE_CHECK_SCRIPT.format(body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR RAISED" not in output, output
    assert "device-side assert" in output or message in output, output
    assert message in output, f"the device-side message {message!r} was not printed:\n{output}"
