"""Every case the fuzz has failed on (shrunk, from ``found_cases.json``), replayed in this process on the
backend that failed it and on every other backend that runs CPU tensors here, judged as the fuzz judges
(``build.run_case``). A fuzz run draws new cases each time; these stay fixed, so a fixed bug stays fixed.

Add a case: copy the shrunk spec that the failing run printed, with the backend, when and where it
was found, and the cause."""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import build  # noqa: E402
from backends import TRITON_INTERPRETED  # noqa: E402
from skiplayers import ops as sk_ops  # noqa: E402

with open(os.path.join(HERE, "found_cases.json")) as f:
    FOUND = json.load(f)

# The fuzz builds CPU tensors: Triton runs them only under the interpreter.
_CPU_BACKENDS = [pytest.param("cpu"), pytest.param("torch"),
                 pytest.param("triton", marks=(pytest.mark.triton, pytest.mark.skipif(
                     not TRITON_INTERPRETED, reason="the fuzz's CPU tensors need the Triton interpreter")))]


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("entry", FOUND, ids=[f"{e['backend']}-{e['spec']['op']}-{i}" for i, e in enumerate(FOUND)])
def test_found_case_passes(entry, backend):
    ratio = build.run_case(entry["spec"], sk_ops.get_ops(backend))
    assert ratio <= 1.0, f"error/bound {ratio:.3f} ({entry['why']})"
