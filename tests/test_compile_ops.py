"""The compiled C++ ops (``torch.ops.skiplayers.*``) under ``torch.compile(fullgraph=True)``.

For each op of ``ops.OP_NAMES`` and each compile backend (``eager``: dynamo and the fakes of
``ops.py``; ``aot_eager``: also functionalisation of the in-place ``cache_append`` and ``cache_compact``
and AOT autograd; ``inductor``: also inductor's lowering, which needs a C++ compiler on the CPU), a
function calling the op is compiled once with ``dynamic=True`` and run on two problems of different
sizes (batch, rows, page pools, block tables, page sizes; ``compact_rows``' output size is
data-dependent, an unbacked size in its fake):

* the compiled result equals the eager op's bit for bit (the same kernel runs), outputs and the pages
  the in-place ops write alike;
* it meets the op contract against ``reference.py`` (``op_contract.py``: the tolerance policy of
  ``skiplayers/tolerance.py`` for attention, exact for the row-moving ops);
* the second size does not recompile.

The attention ops and ``compact_rows`` have backward rules (``skiplayers/autograd.py``): their
gradients through the compiled op must equal the eager op's. The CPU kernels run here; the CUDA
kernels run the same tests on a GPU (the ``cuda``-marked parametrisation).
"""

from __future__ import annotations

import contextlib
import shutil
from types import SimpleNamespace

import pytest
import torch

import cases
import op_contract
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA GPU")]),
]


def _inductor_unavailable_reason() -> str | None:
    """Inductor compiles its CPU kernels with the C++ compiler it finds (``cpp_builder``)."""
    from torch._inductor import cpp_builder  # inductor imports lazily

    compiler = cpp_builder.get_cpp_compiler()
    return None if shutil.which(compiler) else f"inductor's C++ compiler {compiler!r} is not on PATH"


_NO_INDUCTOR = _inductor_unavailable_reason()
COMPILE_BACKENDS = [
    "eager",
    "aot_eager",
    pytest.param("inductor", marks=pytest.mark.skipif(_NO_INDUCTOR is not None, reason=str(_NO_INDUCTOR))),
]

# Two problems per op, of different sizes (every size >= 2: dynamo specialises sizes 0 and 1).
PROBLEMS = {
    "varlen_attention": (
        lambda device: cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS, gapped=True, device=device),
        lambda device: cases.make_varlen_attention([5, 17, 2, 8], [5, 30, 2, 8], rule=Rule.ANCHORS, gapped=True,
                                                   seed=1, device=device),
    ),
    "cache_attention": (
        lambda device: cases.make_cache_attention([5, 40], q_lengths=[1, 1], rule=Rule.ANCHORS, device=device),
        lambda device: cases.make_cache_attention([3, 12, 70], q_lengths=[2, 3, 1], page_size=8, rule=Rule.ANCHORS,
                                                  seed=1, device=device),
    ),
    "compact_rows": (
        lambda device: cases.make_compact_rows([2, 5], device=device),
        lambda device: cases.make_compact_rows([4, 0, 9, 6], seed=1, device=device),
    ),
    # Paged caches: pages shuffled through pools of different sizes, block tables of different widths,
    # and another page size in the second problem (a size like any other: no recompilation).
    "cache_append": (
        lambda device: cases.make_cache_append([1, 2], [2, 1], page_size=4, device=device),
        lambda device: cases.make_cache_append([0, 3, 10], [5, 2, 7], page_size=3, seed=1, device=device),
    ),
    "cache_compact": (
        lambda device: cases.make_cache_compact([3, 6], page_size=4, device=device),
        lambda device: cases.make_cache_compact([0, 12, 30], page_size=5, seed=1, device=device),
    ),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch, so that its compile count is its own. Duck sizing is off:
    it gives sizes that happen to be equal in the first call one symbol (e.g. 2 sequences and 2 KV
    heads), and the second size would then recompile for a coincidence of the problem, not the op."""
    torch._dynamo.reset()
    with torch.fx.experimental._config.patch(use_duck_shape=False):
        yield
    torch._dynamo.reset()


def _no_recompile(first: bool):
    """After the first call, a recompilation raises (``error_on_recompile``) instead of passing."""
    return contextlib.nullcontext() if first else torch._dynamo.config.patch(error_on_recompile=True)


def _op(name: str):
    return getattr(torch.ops.skiplayers, name)


def _call(name: str):
    op = _op(name)
    return lambda *args: op(*args)


def _arguments(name: str, case: dict) -> list:
    """The case's arguments in schema order, tensors cloned (``cache_append`` writes into them)."""
    return [case[k].clone() if isinstance(case[k], torch.Tensor) else case[k] for k in sk_ops.schema_arguments(name)]


def _specified(name: str, result, args: list) -> list[torch.Tensor]:
    """What a call determines: its outputs and its tensor arguments afterwards (the pages
    ``cache_append`` and ``cache_compact`` write in place; the same kernel runs in both calls, so even
    the slots ``cache_compact`` leaves unspecified must agree)."""
    outs = [] if result is None else list(result) if isinstance(result, (tuple, list)) else [result]
    return outs + [a for a in args if isinstance(a, torch.Tensor)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("name", sk_ops.OP_NAMES)
def test_compiled_op_equals_eager_and_meets_the_contract(name, backend, device):
    compiled = torch.compile(_call(name), backend=backend, fullgraph=True, dynamic=True)
    check = getattr(op_contract, f"check_{name}")
    for i, make in enumerate(PROBLEMS[name]):
        case = make(device)
        eager_args, compiled_args = _arguments(name, case), _arguments(name, case)
        want = _specified(name, _op(name)(*eager_args), eager_args)
        with _no_recompile(i == 0):
            got = _specified(name, compiled(*compiled_args), compiled_args)
            check(SimpleNamespace(**{name: compiled}), case)  # against reference.py, tolerance.py's policy
        assert len(got) == len(want)
        for j, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w), f"{name} under {backend}: output {j} differs from the eager op's"


# The backward rules of autograd.py: (op, the differentiable inputs).
DIFFERENTIABLE = [
    ("varlen_attention", ("q", "k", "v")),
    ("cache_attention", ("q", "k_cache", "v_cache")),
    ("compact_rows", ("x",)),
]


def _gradients(fn, name: str, case: dict, diff) -> list[torch.Tensor]:
    """Gradients of ``sum(out * w)`` (fixed ``w``) w.r.t. ``diff``, through ``fn``."""
    args = [case[k].detach().clone().requires_grad_() if k in diff else case[k] for k in sk_ops.schema_arguments(name)]
    out = fn(*args)
    out = out[0] if isinstance(out, tuple) else out
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    (out * weight).sum().backward()
    return [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", [b for b in COMPILE_BACKENDS if b != "eager"])  # aot: the traced backward
@pytest.mark.parametrize("name,diff", DIFFERENTIABLE, ids=[n for n, _ in DIFFERENTIABLE])
def test_gradients_through_the_compiled_op_equal_eager(name, diff, backend, device):
    compiled = torch.compile(_call(name), backend=backend, fullgraph=True, dynamic=True)
    for i, make in enumerate(PROBLEMS[name]):
        case = make(device)
        want = _gradients(_op(name), name, case, diff)
        with _no_recompile(i == 0):
            got = _gradients(compiled, name, case, diff)
        assert len(got) == len(diff) and all(g is not None for g in got)
        assert any(w.abs().sum() > 0 for w in want), "the eager gradients are all zero: the check would be empty"
        for n, g, w in zip(diff, got, want):
            assert torch.equal(g, w), f"{name} under {backend}: the gradient of {n} differs from eager's"
