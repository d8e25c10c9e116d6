"""Test configuration: markers and shared fixtures.

Markers (registered here, used with -m):
  cuda    needs a CUDA GPU; skipped with a reason elsewhere
  triton  runs Triton kernels (under TRITON_INTERPRET=1 on machines without a GPU)
  slow    loads the real SmolLM2 model or runs long; part of the default suite
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
def model():
    from model_helpers import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def batch():
    from model_helpers import ragged_batch

    return ragged_batch()
