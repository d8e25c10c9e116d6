"""The CUDA backend's kernel generations (csrc/cuda/kernel_generation.h), chosen per call by
SKIPLAYERS_CUDA_KERNELS: both generations match the reference on the same inputs, and a value that
names neither is refused. GPU only (the CUDA launchers are where the variable is read)."""

from __future__ import annotations

import pytest
import torch

import cases
import op_contract
from backends import HAS_GPU
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none visible to torch)"),
    pytest.mark.skipif(not sk_ops.cuda_kernels_built(), reason="skiplayers._C was built without CUDA kernels"),
]


@pytest.mark.parametrize("generation", ["stable", "next"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_each_generation_matches_the_reference(monkeypatch, generation, dtype):
    monkeypatch.setenv("SKIPLAYERS_CUDA_KERNELS", generation)
    ops = sk_ops.get_ops("cuda")
    prefill = cases.make_varlen_attention([37, 0, 300], heads=8, kv_heads=2, head_dim=128, dtype=dtype,
                                          rule=Rule.ANCHORS, seed=3, device="cuda")
    op_contract.check_varlen_attention(ops, prefill)
    decode = cases.make_cache_attention([1, 0, 700], q_lengths=[1, 0, 1], heads=8, kv_heads=2, head_dim=128,
                                        dtype=dtype, rule=Rule.CAUSAL, seed=4, device="cuda")
    op_contract.check_cache_attention(ops, decode)


@pytest.mark.parametrize("op", ["varlen_attention", "cache_attention"])
def test_an_unknown_generation_is_refused(monkeypatch, op):
    monkeypatch.setenv("SKIPLAYERS_CUDA_KERNELS", "fastest")
    make = cases.make_varlen_attention if op == "varlen_attention" else cases.make_cache_attention
    case = make([4, 6], device="cuda")
    with pytest.raises(RuntimeError, match="SKIPLAYERS_CUDA_KERNELS must be 'stable' or 'next', got 'fastest'"):
        op_contract.call(sk_ops.get_ops("cuda"), op, case)
