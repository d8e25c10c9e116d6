"""Static checks of the CUDA backend that need no GPU (they run in CI, on the CUDA build of torch).

* every op has a CUDA kernel registered (``torch._C._dispatch_dump``);
* ``cuobjdump --dump-resource-usage`` of the built ``skiplayers/_C*.so`` lists every kernel for
  sm_80 and sm_90, with no spilled registers and shared memory within the per-block limit.

cuobjdump has no spill counter: spilled registers go to the stack frame (STACK) in local memory
(LOCAL), so both must be 0. All kernels use static shared memory only (the launchers pass 0 bytes
of dynamic shared memory), so SHARED is the whole per-block figure. Run with ``-s`` to see the table.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch

import skiplayers._C as _C
from skiplayers import ops as sk_ops

pytestmark = pytest.mark.skipif(
    not sk_ops.cuda_kernels_built(),
    reason="skiplayers._C was built without CUDA kernels (SKIPLAYERS_NO_CUDA=1, a CPU-only torch, or no nvcc)",
)

# Kernel templates of csrc/cuda (each instantiation is listed separately by cuobjdump).
KERNELS = (
    "prefill_mma_kernel",
    "prefill_fma_kernel",
    "prefill_fa2_kernel",
    "decode_split_kernel",
    "decode_combine_kernel",
    "decode_mma_kernel",
    "compact_rows_scan_kernel",
    "cache_compact_kernel",
    "copy_rows_kernel",
)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # bytes per block (opt-in maximum)


def _cuobjdump() -> str:
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates += [os.path.join(cuda_home, "bin", "cuobjdump"), shutil.which("cuobjdump") or ""]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.fail(f"cuobjdump not found (looked at {candidates}); it ships in the triton wheel and the CUDA toolkit")


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cu++filt")
    tool = tool if os.access(tool, os.X_OK) else shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")
    short = {}
    for mangled, full in zip(names, out):
        m = re.search(r"(\w+(?:<[^()]*>)?)\(", full)  # the function name and its template arguments
        short[mangled] = m.group(1) if m else full
    return short


@pytest.fixture(scope="module")
def resource_usage() -> list[dict]:
    """Rows (kernel, arch, registers, shared, stack, local) parsed from cuobjdump."""
    text = subprocess.run(
        [_cuobjdump(), "--dump-resource-usage", _C.__file__], capture_output=True, text=True, check=True
    ).stdout
    rows, arch, function = [], None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            regs, stack, shared, local = map(int, m.groups())
            rows.append(dict(mangled=function, arch=arch, registers=regs, shared=shared, stack=stack, local=local))
            function = None
    names = _demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["kernel"] = names[r["mangled"]]
    return rows


def test_every_op_has_a_cuda_kernel():
    for op in sk_ops.OP_NAMES:
        dump = torch._C._dispatch_dump(f"skiplayers::{op}")
        assert re.search(r"^CUDA: registered at \S*csrc/cuda/", dump, re.M), f"no CUDA kernel for {op}:\n{dump}"


def test_resource_usage_table(resource_usage):
    assert resource_usage, "cuobjdump listed no kernels"
    print(f"\n{'kernel':72} {'arch':6} {'regs':>4} {'shared':>7} {'spills':>6}")
    for r in sorted(resource_usage, key=lambda r: (r["kernel"], r["arch"])):
        spills = r["stack"] + r["local"]
        print(f"{r['kernel'][:72]:72} {r['arch']:6} {r['registers']:4d} {r['shared']:7d} {spills:6d}")


@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_every_kernel_is_built_for(arch, resource_usage):
    built = [r["kernel"] for r in resource_usage if r["arch"] == arch]
    missing = [k for k in KERNELS if not any(k in name for name in built)]
    assert not missing, f"kernels missing for {arch}: {missing}"


def test_no_register_spills(resource_usage):
    spilling = [(r["kernel"], r["arch"], r["stack"], r["local"]) for r in resource_usage if r["stack"] or r["local"]]
    assert not spilling, f"kernels with a stack frame / local memory (spills): {spilling}"


def test_shared_memory_within_limits(resource_usage):
    over = [(r["kernel"], r["arch"], r["shared"]) for r in resource_usage if r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, f"shared memory over the per-block limit: {over}"
    # Static shared memory cannot exceed 48 KiB anyway; the kernels stay well inside it.
    assert max(r["shared"] for r in resource_usage) <= 48 * 1024
