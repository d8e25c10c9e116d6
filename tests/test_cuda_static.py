"""Static checks of the CUDA backend that need no GPU (they run in CI, on the CUDA build of torch).

* every op has a CUDA kernel registered (``torch._C._dispatch_dump``);
* ``cuobjdump --dump-resource-usage`` of the built ``skiplayers/_C*.so`` lists every kernel for
  sm_80 and sm_90a (setup.py's default TORCH_CUDA_ARCH_LIST "8.0;9.0a"), with no spilled registers and
  shared memory within the per-block limit;
* ``cuobjdump -sass``: the sm_90a prefill (csrc/cuda/prefill_sm90_kernel.cuh) is really built for
  sm_90a, with wgmma (``HGMMA``), TMA loads (``UTMALDG``), mbarrier operations (``SYNCS``), its wgmma
  pipeline not serialised, and no subroutine call.

cuobjdump has no spill counter: spilled registers go to the stack frame (STACK) in local memory
(LOCAL), so both must be 0. The stable kernels use static shared memory only, so SHARED is their
whole per-block figure. The next generation's kernels add their tiles as dynamic shared memory: the
sm_90a prefill's (SM90_DYNAMIC_SHARED) is checked here against the limit with its static part; the
sm_80 prefill's and the tensor-core decode's are bounded at compile time (``Fa2Config``,
``decode_mma::Shape``) and checked against the device's limit by their launchers, so their SHARED
column is the static part only. Run with ``-s`` to see the tables.
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
    "prefill_sm90_kernel",
    "sm90_plan_kernel",
)
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024, "sm_90a": 227 * 1024}  # bytes per block (opt-in maximum)
BUILT_ARCHS = ("sm_80", "sm_90a")  # TORCH_CUDA_ARCH_LIST "8.0;9.0a" (setup.py)

# Dynamic shared memory of the sm_90a prefill per head dim (prefill_sm90_kernel.cuh Sm90Config::Tiles
# + 1024 bytes to align its base): Q [128, D] + stages x (K + V) [128, D], 16-bit elements; 3 stages at
# D = 64, 2 at D = 128. The kernel's static_assert checks the same bound at compile time.
SM90_DYNAMIC_SHARED = {64: 128 * 64 * 2 * (1 + 2 * 3) + 1024, 128: 128 * 128 * 2 * (1 + 2 * 2) + 1024}
# Per sm_90a prefill instance: wgmma instructions of one key block (S = Q K^T: D / 16 k-steps of
# 64x128x16; O += P V: 128 / 16 k-steps of 64xDx16) and TMA box loads (K and V, D / 64 boxes each).
SM90_HGMMA = {64: 64 // 16 + 128 // 16, 128: 128 // 16 + 128 // 16}
SM90_UTMALDG = {64: 2 * (64 // 64), 128: 2 * (128 // 64)}


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
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
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


@pytest.mark.parametrize("arch", BUILT_ARCHS)
def test_every_kernel_is_built_for(arch, resource_usage):
    built = [r["kernel"] for r in resource_usage if r["arch"] == arch]
    missing = [k for k in KERNELS if not any(k in name for name in built)]
    assert not missing, f"kernels missing for {arch}: {missing}"


def test_no_register_spills(resource_usage):
    spilling = [(r["kernel"], r["arch"], r["stack"], r["local"]) for r in resource_usage if r["stack"] or r["local"]]
    assert not spilling, f"kernels with a stack frame / local memory (spills): {spilling}"


def _sm90_head_dim(kernel: str) -> int | None:
    m = re.search(r"prefill_sm90_kernel<[^,]+, (\d+)>", kernel)
    return int(m.group(1)) if m else None


def test_shared_memory_within_limits(resource_usage):
    def total(r):
        d = _sm90_head_dim(r["kernel"])
        return r["shared"] + (SM90_DYNAMIC_SHARED[d] if d is not None and r["arch"] == "sm_90a" else 0)

    over = [(r["kernel"], r["arch"], total(r)) for r in resource_usage if total(r) > SHARED_LIMIT[r["arch"]]]
    assert not over, f"shared memory over the per-block limit: {over}"
    # Static shared memory cannot exceed 48 KiB anyway; the kernels stay well inside it.
    assert max(r["shared"] for r in resource_usage) <= 48 * 1024


@pytest.fixture(scope="module")
def sm90_sass() -> dict[tuple[str, str], str]:
    """SASS of the sm_90a prefill's instances, keyed by (arch, kernel name)."""
    text = subprocess.run([_cuobjdump(), "-sass", _C.__file__], capture_output=True, text=True, check=True).stdout
    chunks: dict[tuple[str, str], list[str]] = {}
    arch, key = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\d+a?)", line):
            arch, key = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            key = (arch, m.group(1)) if "prefill_sm90_kernel" in m.group(1) else None
            if key:
                chunks[key] = []
        elif key:
            chunks[key].append(line)
    names = _demangle(sorted({name for _, name in chunks}))
    return {(a, names[n]): "\n".join(lines) for (a, n), lines in chunks.items()}


def test_sm90_prefill_sass(sm90_sass):
    """The Hopper prefill is built for sm_90a (not a trap stub), with wgmma, TMA and mbarriers, and its wgmma
    chains are not serialised (ptxas serialises them, warning C7510, when a kernel contains a call)."""
    built = {name: sass for (arch, name), sass in sm90_sass.items() if arch == "sm_90a"}
    dims = sorted({_sm90_head_dim(name) for name in built})
    assert dims == [64, 128] and len(built) == 4, (
        f"the sm_90a prefill is not in the sm_90a section (built without TORCH_CUDA_ARCH_LIST 9.0a?): {sorted(built)}"
    )
    print(f"\n{'sm_90a kernel':60} {'HGMMA':>5} {'UTMALDG':>7} {'SYNCS':>5} {'DEPBAR':>6} {'CALL':>4} {'MUFU.EX2':>8}")
    for name, sass in sorted(built.items()):
        d = _sm90_head_dim(name)
        count = {op: len(re.findall(rf"\b{re.escape(op)}\b", sass)) for op in
                 ("HGMMA", "UTMALDG", "SYNCS", "WARPGROUP.DEPBAR", "CALL", "MUFU.EX2")}
        print(f"{name[:60]:60} {count['HGMMA']:5d} {count['UTMALDG']:7d} {count['SYNCS']:5d} "
              f"{count['WARPGROUP.DEPBAR']:6d} {count['CALL']:4d} {count['MUFU.EX2']:8d}")
        assert count["HGMMA"] >= SM90_HGMMA[d], f"{name}: {count['HGMMA']} HGMMA < {SM90_HGMMA[d]}"
        assert count["UTMALDG"] >= SM90_UTMALDG[d], f"{name}: {count['UTMALDG']} UTMALDG < {SM90_UTMALDG[d]}"
        assert re.search(r"\bSYNCS\.ARRIVE\.TRANS64", sass) and re.search(r"\bSYNCS\.PHASECHK", sass), (
            f"{name}: no mbarrier arrive / wait"
        )
        assert re.search(r"\bHGMMA\.64x\d+x16\.F32\S* R\d+, R\d+, gdesc\[\w+\]\.tnspB", sass), (
            f"{name}: no register-A, transposed-B wgmma (O += P V)"
        )
        # A few waits (the prologue's, one per key block): serialised chains would wait after every wgmma.
        assert count["WARPGROUP.DEPBAR"] <= 4, f"{name}: wgmma serialised ({count['WARPGROUP.DEPBAR']} waits)"
        assert count["CALL"] == 0, f"{name}: a subroutine call (serialises wgmma, ptxas C7510)"
    # The other builds hold only the trap stub: no wgmma outside sm_90a.
    for (arch, name), sass in sm90_sass.items():
        if arch != "sm_90a":
            assert "HGMMA" not in sass, f"{name} has wgmma in the {arch} build"


def test_sm90_prefill_launches_with_the_registers_setmaxnreg_redistributes(resource_usage):
    """The producer / consumer split of the sm_90a prefill (setmaxnreg 24 / 240 over 128 + 256 threads)
    redistributes the registers the launch gives each thread: 168 (65536 / 384 rounded down to a
    multiple of 8). A build that gives fewer would leave the consumers spinning in setmaxnreg."""
    rows = [r for r in resource_usage if r["arch"] == "sm_90a" and "prefill_sm90_kernel" in r["kernel"]]
    assert rows, "no sm_90a prefill in the build"
    for r in rows:
        assert r["registers"] == 168, f"{r['kernel']}: launched with {r['registers']} registers, not 168"
