"""The compute-sanitizer runs of scripts/gpu_check.sh select what they claim: each tool's marker
(tests/sanitized.py) picks cuda cases of both attention ops and of the paged cache ops, and none of
the tests that trigger device-side asserts or check refusals. Collection needs no GPU, so this runs
on CI; gpu_check.sh itself fails on an empty selection."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()


def _selected(tool: str) -> list[str]:
    files = re.search(r'^SANITIZE_FILES="([^"]+)"', SCRIPT, re.M)
    assert files, "gpu_check.sh names the files its sanitizer runs collect from"
    assert '-m "cuda and $tool"' in SCRIPT, "gpu_check.sh selects sanitizer cases by marker"
    listing = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", f"cuda and {tool}",
         *files.group(1).split()],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert listing.returncode == 0, listing.stdout + listing.stderr
    return [line for line in listing.stdout.splitlines() if "::" in line]


@pytest.mark.parametrize("tool,must_cover", [
    ("memcheck", ("varlen_attention", "cache_attention", "cache_append", "cache_compact", "compact_rows")),
    ("racecheck", ("varlen_attention", "cache_attention", "cache_compact")),
])
def test_each_sanitizer_selects_the_kernels_it_names(tool, must_cover):
    cases = _selected(tool)
    for op in must_cover:
        assert any(f"test_{op}" in case for case in cases), f"{tool} selects no {op} case"
    assert all("[cuda" in case for case in cases), "only the CUDA backend's cases"
    for excluded in ("rejects", "device_side"):
        assert not any(excluded in case for case in cases), f"{tool} selects a {excluded} test"
