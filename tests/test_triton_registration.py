"""The Triton backend's registration: its ``skiplayers_triton::*`` ops carry the C++ schemas, the op
set runs on this machine's device, the launchers behind the ops are callable directly, and a decode
step (the in-place append, then attention) traces under ``torch.compile``. The ops' results:
tests/test_ops.py.
"""

from __future__ import annotations

import pytest
import torch

import cases
import op_contract
from backends import triton_device
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule
from skiplayers.triton_kernels import launchers

pytestmark = pytest.mark.triton

DEVICE = triton_device()

TRITON = sk_ops.get_ops("triton")


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_schemas_are_the_cpp_schemas(op):
    mine = str(getattr(torch.ops.skiplayers_triton, op).default._schema)
    assert mine == str(getattr(torch.ops.skiplayers, op).default._schema).replace("skiplayers::", "skiplayers_triton::", 1)


def test_triton_op_set_runs_on_this_device():
    sk_ops.check_backend_device("triton", torch.device(DEVICE))  # CPU only under the interpreter
    assert TRITON.name == "triton"
    assert all(getattr(TRITON, op).namespace == "skiplayers_triton" for op in sk_ops.OP_NAMES)


def test_varlen_attention_launcher_called_directly():
    case = cases.make_varlen_attention([5, 9], rule=Rule.ANCHORS, device=DEVICE)
    ops = sk_ops.OpSet("launchers", **launchers.LAUNCHERS)
    op_contract.check_varlen_attention(ops, case)


def test_decode_step_under_torch_compile():
    """append + attend on a paged cache, traced by torch.compile (fullgraph): fakes and the in-place op
    must trace."""
    case = cases.make_cache_attention([5, 40], q_lengths=[1, 1], rule=Rule.ANCHORS, device=DEVICE)
    new_k = torch.randn(2, 2, 64, device=DEVICE)
    new_v = torch.randn(2, 2, 64, device=DEVICE)
    new_pos = case["q_pos"] + 1000
    new_tag = case["q_tag"]
    lens = case["cache_seqlens"]  # slots 5 and 40 lie in pages the block table already names
    table = case["block_table"]

    def step(k_cache, v_cache, pos_cache, tag_cache):
        torch.ops.skiplayers_triton.cache_append(k_cache, v_cache, pos_cache, tag_cache, table, new_k, new_v, new_pos,
                                                 new_tag, case["cu_seqlens_q"], lens)
        return torch.ops.skiplayers_triton.cache_attention(
            case["q"], k_cache, v_cache, table, case["cu_seqlens_q"], lens + 1, new_pos, pos_cache, new_tag, tag_cache,
            Rule.ANCHORS, 0.125, 0)

    buffers = [case[k].clone() for k in ("k_cache", "v_cache", "pos_cache", "tag_cache")]
    expected = step(*[b.clone() for b in buffers])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*buffers)
    torch.testing.assert_close(got, expected)
