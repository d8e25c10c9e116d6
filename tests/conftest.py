"""Test configuration: markers and shared fixtures.

Markers (registered here, used with -m):
  cuda    needs a CUDA GPU; skipped, with the reason, where torch sees none (below)
  triton  runs Triton kernels (under TRITON_INTERPRET=1 on machines without a GPU)
  slow    loads the real SmolLM2 model or runs long; part of the default suite
  memcheck, racecheck
          the cases scripts/gpu_check.sh runs under compute-sanitizer's tool of that name; a test
          asks for them with ``@sanitized(...)`` (tests/backends.py), and the hook below marks the
          matching parametrised cases
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under the Triton interpreter. The switch must be set before
# anything imports triton (transformers and torch.compile may, during collection): triton.language
# decorates its own helpers (tl.max, ...) under the setting of that moment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every attention call that dispatch classifies as a standard pattern is checked against the
# visibility predicate (skiplayers/dispatch/patterns.py): a wrong classification fails any test.
os.environ.setdefault("SKIPLAYERS_VERIFY_DISPATCH", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped where there is none)")
    config.addinivalue_line("markers", "triton: runs Triton kernels (interpreter without a GPU)")
    config.addinivalue_line("markers", "slow: loads SmolLM2 or runs long")
    config.addinivalue_line("markers", "sanitize(tools, only): asks for compute-sanitizer runs of some cases")
    from sanitized import TOOLS

    for tool in TOOLS:
        config.addinivalue_line("markers", f"{tool}: run by scripts/gpu_check.sh under compute-sanitizer --tool {tool}")


def _matches(params: dict, only: dict) -> bool:
    """Whether a case's parameters take one of the values ``only`` allows for each name it lists."""
    return all(name in params and params[name] in allowed for name, allowed in only.items())


def _mark_sanitized_cases(items) -> None:
    """Adds the ``memcheck`` / ``racecheck`` markers to the cases a ``sanitize`` marker selects. Runs
    before ``-m`` deselects anything (tryfirst below), so ``-m "cuda and memcheck"`` sees them."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        for request in item.iter_markers("sanitize"):
            if _matches(params, request.kwargs["only"]):
                for tool in request.kwargs["tools"]:
                    item.add_marker(tool)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Marks the sanitized cases (above); skips every cuda-marked test where torch sees no GPU: one
    rule here, not a skipif per file."""
    _mark_sanitized_cases(items)
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(no_gpu)


def _id(val) -> str | None:
    """A readable id for one parametrize value, or None for pytest's default (``argnameN`` for
    objects it cannot print)."""
    # Imported here, not at the top: both import skiplayers, which must come after TRITON_INTERPRET is set.
    from constants import Heads
    from skiplayers.meta import Rule

    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    if isinstance(val, Rule):
        return "|".join(bit.name for bit in val) or val.name  # Rule(3): HIDE_CONTEXT|ANCHORS, not ALL
    if isinstance(val, Heads):
        return f"{val.q}q{val.kv}kv"
    if isinstance(val, torch.Tensor):
        return f"{_id(val.dtype)}[{'x'.join(map(str, val.shape))}]"
    if isinstance(val, (list, tuple, range)) and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
        return "-".join(map(str, val)) or "none"
    if isinstance(val, (list, tuple)) and val and all(isinstance(row, (list, tuple)) for row in val):
        return f"list[{len(val)}x{len(val[0])}]"  # a nested list given where a tensor belongs
    if isinstance(val, dict):  # keyword changes of a case: dict(q=..., rule=64) -> q=float32[10x5x64],rule=64
        return ",".join(_item_id(k, v) for k, v in val.items())
    return None


def _item_id(key: str, value) -> str:
    shown = str(value) if isinstance(value, (bool, int, float, str)) else _id(value)
    return key if shown is None else f"{key}={shown}"


def pytest_make_parametrize_id(config, val, argname):
    return _id(val)


@pytest.fixture
def ops(request):
    """The OpSet of the backend named by an ``over_backends`` parametrisation (tests/backends.py)."""
    from skiplayers import ops as sk_ops

    return sk_ops.get_ops(request.param)


@pytest.fixture
def backend(request):
    """The table row (tests/backends.py) of the backend the ``ops`` fixture runs."""
    from backends import BACKENDS

    return BACKENDS[request.node.callspec.params["ops"]]


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _grad_mode_is_not_leaked():
    """Fails a test that leaves autograd switched off (a CLI command once did, in-process), and
    switches it back so that the tests after it run as written."""
    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode disabled for the tests after it")


# The tiny random LLaMA and its ragged, left-padded batch with context marks (model_helpers.py),
# shared by the model-level test files (one instance per module).
@pytest.fixture(scope="module")
def model(request):
    """On the test module's ``DEVICE`` (default cpu)."""
    from model_helpers import tiny_llama

    return tiny_llama(device=getattr(request.module, "DEVICE", "cpu"))


@pytest.fixture(scope="module")
def batch(request):
    """On the test module's ``DEVICE`` (default cpu)."""
    from model_helpers import ragged_batch

    return ragged_batch(device=getattr(request.module, "DEVICE", "cpu"))
