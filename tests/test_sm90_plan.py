"""Host checks of the sm_90a prefill's index math and layouts, no GPU needed: tests/cpp/sm90_plan_test.cpp
(csrc/cuda/sm90_plan.h: key block slots of its per-call plan, the TMA descriptor parameters of the K / V
rows; a C++ compiler is enough) and tests/cpp/sm90_fragments_test.cu (its CuTe register fragments; nvcc)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sm90_plan(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / "sm90_plan_test"
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "include"),
         os.path.join(ROOT, "tests", "cpp", "sm90_plan_test.cpp"), "-o", str(exe)],
        check=True,
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def _cutlass_include() -> str | None:
    override = os.environ.get("SKIPLAYERS_CUTLASS_INCLUDE")
    if override:
        return override
    spec = importlib.util.find_spec("cutlass_library")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = os.path.join(location, "source", "include")
        if os.path.isfile(os.path.join(include, "cute", "tensor.hpp")):
            return include
    return None


def test_sm90_fragments(tmp_path):
    """tests/cpp/sm90_fragments_test.cu: CuTe's thread-value layouts of the sm_90a prefill's wgmma MMAs
    place every score, P and output element where the kernel's softmax and epilogue assume (host code,
    compiled by nvcc against the CUTLASS headers setup.py uses)."""
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    include = _cutlass_include()
    if not os.access(nvcc, os.X_OK) or include is None:
        pytest.skip("needs nvcc and the CUTLASS headers (nvidia-cutlass, requirements-build.txt)")
    exe = tmp_path / "sm90_fragments_test"
    subprocess.run(
        [nvcc, "-std=c++20", "--expt-relaxed-constexpr", "-I", include,
         os.path.join(ROOT, "tests", "cpp", "sm90_fragments_test.cu"), "-o", str(exe)],
        check=True,
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout
