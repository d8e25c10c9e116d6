"""Which op-test cases ``scripts/gpu_check.sh`` runs under compute-sanitizer.

A test asks for a tool with ``@sanitized("memcheck", dtype=torch.bfloat16)``: the cases of that test
whose parameters take the listed values (each keyword: one value or a tuple of values; none: every
case) get the ``memcheck`` marker (tests/conftest.py adds it at collection), and gpu_check.sh selects
``-m "cuda and memcheck"``. Sanitizers slow kernels 10-100x, hence one or two dtypes per test.
Tests that trigger device-side asserts must not ask: an assert ends the CUDA context, and every test
after it would then fail.
"""

from __future__ import annotations

import pytest

TOOLS = ("memcheck", "racecheck")


def sanitized(*tools: str, **only):
    """The ``sanitize`` marker for ``tools`` (``memcheck``, ``racecheck``), limited to the cases whose
    parameters take the values in ``only``."""
    unknown = set(tools) - set(TOOLS)
    if not tools or unknown:
        raise ValueError(f"sanitized() takes some of {TOOLS}, got {tools}")
    allowed = {name: value if isinstance(value, tuple) else (value,) for name, value in only.items()}
    return pytest.mark.sanitize(tools=tools, only=allowed)
