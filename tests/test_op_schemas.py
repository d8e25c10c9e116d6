"""The op list and the argument orders have one definition each: ``ops.OpSet`` lists the ops, and
the schemas of ``csrc/skiplayers.cpp`` give their arguments. Everything else that names them (the
reference, the fakes, the Triton launchers, the documented wrappers) must agree, or a swapped
argument would pass silently by position."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

from skiplayers import ops as sk_ops
from skiplayers import reference

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "csrc" / "skiplayers.cpp"


def leading_parameters(fn, count: int) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)[:count]


def test_the_op_set_lists_every_op_the_library_defines():
    defined = re.findall(r'm\.def\(\s*"(\w+)\(', SCHEMA_FILE.read_text())
    assert sorted(defined) == sorted(sk_ops.OP_NAMES)


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_the_reference_takes_the_schema_arguments(op):
    args = sk_ops.schema_arguments(op)
    assert leading_parameters(getattr(reference, op), len(args)) == args


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_the_fake_takes_the_schema_arguments(op):
    args = sk_ops.schema_arguments(op)
    assert tuple(sk_ops.FAKES) == sk_ops.OP_NAMES
    assert tuple(inspect.signature(sk_ops.FAKES[op]).parameters) == args


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_the_documented_wrapper_takes_the_schema_arguments_then_ops(op):
    args = sk_ops.schema_arguments(op)
    assert tuple(inspect.signature(getattr(sk_ops, op)).parameters) == (*args, "ops")


@pytest.mark.triton
@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_the_triton_launcher_takes_the_schema_arguments(op):
    pytest.importorskip("triton")
    from skiplayers.triton_kernels import launchers

    assert tuple(launchers.LAUNCHERS) == sk_ops.OP_NAMES
    assert tuple(inspect.signature(launchers.LAUNCHERS[op]).parameters) == sk_ops.schema_arguments(op)


def test_ops_take_their_arguments_by_name():
    """Call sites pass keywords (``cache.py``, ``dispatch/kernels.py``); the compiled op and the
    reference must bind them the same way."""
    q = torch.randn(5, 4, 8)
    k = torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    pos = torch.tensor([0, 1, 0, 1, 2], dtype=torch.int32)
    args = dict(q=q, k=k, v=k, cu_seqlens_q=cu, cu_seqlens_k=cu, q_pos=pos, k_pos=pos, q_tag=None, k_tag=None,
                rule=sk_ops.Rule.CAUSAL, scale=0.3)
    compiled = sk_ops.get_ops("cpu").varlen_attention(**args)
    torch.testing.assert_close(compiled, reference.varlen_attention(**args), atol=1e-5, rtol=1e-5)
