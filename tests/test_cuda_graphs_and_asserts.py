"""What only the CUDA backend has, beyond the op results of tests/test_ops.py: a decode step
(``cache_append`` + ``cache_attention``) captured in a CUDA graph and replayed, and the metadata checks
the kernels make on the device (values the host cannot read without a sync), each of which leaves
the CUDA context unusable and so runs in its own process. Tolerance policy in op_contract.py.
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


@pytest.fixture(scope="module")
def cuda_ops():
    return sk_ops.get_ops("cuda")  # raises (test error) on a GPU machine whose build lacks the kernels


# --- CUDA graph: one decode step (cache_append + cache_attention), captured and replayed --------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_step_cuda_graph_matches_eager(cuda_ops, dtype):
    ops = cuda_ops
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
    ids=["cache_append", "cache_attention", "varlen_attention"],  # the op each script calls
)
def test_device_side_metadata_checks(body, message):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    script = _DEVICE_CHECK_SCRIPT.format(body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "NO ERROR RAISED" not in output, output
    assert "device-side assert" in output or message in output, output
    assert message in output, f"the device-side message {message!r} was not printed:\n{output}"
