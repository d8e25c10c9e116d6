"""Builds and runs tests/cpp/sm90_plan_test.cpp: host checks of csrc/cuda/sm90_plan.h, the torch-free
index math of the sm_90a prefill (key block slots of its per-call plan, the TMA descriptor parameters
of the K / V rows). No torch, no GPU: a C++ compiler is enough."""

from __future__ import annotations

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
