"""Builds and runs tests/cpp/index_math_test.cpp and tests/cpp/visibility_test.cpp: host checks of
the torch-free index math of csrc/include/skiplayers/ that the CUDA kernels use (tile counts, split
ranges, block summaries, softmax merging, mask-free block classification). No torch, no GPU: a C++
compiler is enough."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_host_test(tmp_path, name: str) -> None:
    """Compiles tests/cpp/<name>.cpp against csrc/include and runs it (exit status 0 = pass)."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cxx:
        pytest.skip("no C++ compiler on PATH")
    exe = tmp_path / name
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "include"),
         os.path.join(ROOT, "tests", "cpp", f"{name}.cpp"), "-o", str(exe)],
        check=True,
    )
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_index_math(tmp_path):
    _run_host_test(tmp_path, "index_math_test")


def test_block_fully_visible_general(tmp_path):
    """visibility.h's block_fully_visible_general (the next-generation prefill's mask-free blocks
    under hide-context / anchors) never claims a block pair with an invisible pair: exhaustive over
    small blocks, every rule (tests/cpp/visibility_test.cpp)."""
    _run_host_test(tmp_path, "visibility_test")
