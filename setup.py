"""Builds skiplayers and its one compiled extension, ``skiplayers._C`` (the package's metadata is in
pyproject.toml).

* C++ CPU kernels (csrc/cpu) are always built.
* CUDA kernels (csrc/cuda/*.cu) are built when the installed torch is a CUDA build and a CUDA
  toolkit (nvcc) is found. No GPU is needed or queried: this is decided from torch's build and the
  toolkit on disk. ``SKIPLAYERS_NO_CUDA=1`` forces a CPU-only build.
* ``SKIPLAYERS_SANITIZE=1``: a CPU-only build instrumented with AddressSanitizer and
  UndefinedBehaviorSanitizer (used by scripts/sanitize.sh, which builds it out of tree).
* Architectures: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0a": every file for sm_80 and sm_90a; the
  Hopper prefill, csrc/cuda/prefill_sm90_kernel.cuh, needs the "a" feature wgmma,
  and is a trap stub in other builds).
* The CUDA build needs the CUTLASS / CuTe C++ headers of the pinned ``nvidia-cutlass`` wheel
  (requirements-build.txt, installed with ``--no-deps``: only its ``cutlass_library/source/include``
  is used; ``SKIPLAYERS_CUTLASS_INCLUDE`` may name another copy of that directory).

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already
installed (build isolation would download another torch into a temporary environment).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sysconfig

# torch locates the toolkit when cpp_extension is imported; the `nvcc` on PATH may be a wrapper,
# so point CUDA_HOME at the toolkit's standard root before that import if the user has not.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


SANITIZE = os.environ.get("SKIPLAYERS_SANITIZE") == "1"
# -fno-sanitize-recover=all: every UBSan finding aborts (a report is a failure, never a warning).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def cuda_wanted() -> bool:
    if SANITIZE or os.environ.get("SKIPLAYERS_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and bool(rel("csrc/cuda/*.cu"))


def nvidia_wheel_includes() -> list[str]:
    """Headers such as cusparse.h, which ATen/cuda/CUDAContext.h pulls in, ship in the nvidia-* wheels."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def cutlass_include() -> str:
    """The CUTLASS / CuTe headers shipped in the nvidia-cutlass wheel (cutlass_library/source/include),
    found without importing the package (its __init__ pulls in Python dependencies we do not install).
    ``SKIPLAYERS_CUTLASS_INCLUDE`` names another copy of that include directory (a machine without the
    wheel installed)."""
    override = os.environ.get("SKIPLAYERS_CUTLASS_INCLUDE")
    if override:
        if not os.path.isfile(os.path.join(override, "cute", "tensor.hpp")):
            raise RuntimeError(f"SKIPLAYERS_CUTLASS_INCLUDE={override} holds no cute/tensor.hpp")
        return override
    spec = importlib.util.find_spec("cutlass_library")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        include = os.path.join(location, "source", "include")
        if os.path.isfile(os.path.join(include, "cute", "tensor.hpp")):
            return include
    raise RuntimeError(
        "building the CUDA kernels needs the CUTLASS/CuTe headers of the nvidia-cutlass wheel "
        f"(cutlass_library/source/include; looked in {locations or 'no installed cutlass_library'}). "
        "Install the pinned version without its dependencies: "
        "pip install --no-deps -r requirements-build.txt (scripts/run.sh does), or build without CUDA: "
        "SKIPLAYERS_NO_CUDA=1"
    )


def extension():
    sources = rel("csrc/skiplayers.cpp") + rel("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is header-inline OpenMP; without the flag it silently runs serially.
    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]
    if SANITIZE:
        cxx_flags = ["-O1", "-g"] + SANITIZE_FLAGS + cxx_flags[1:]
        link_flags = link_flags + SANITIZE_FLAGS
    if not cuda_wanted():
        return cpp_extension.CppExtension(
            "skiplayers._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    nvcc_flags = [
        "-O3",
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        # Register / shared-memory / spill figures for every kernel, in the build log.
        "-Xptxas=-v" if os.environ.get("SKIPLAYERS_PTXAS_VERBOSE") == "1" else "-Xptxas=-O3",
    ]
    return cpp_extension.CUDAExtension(
        "skiplayers._C",
        sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp"),
        include_dirs=include_dirs + nvidia_wheel_includes() + [cutlass_include()],
        extra_compile_args={"cxx": cxx_flags + ["-DSKIPLAYERS_WITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


# Name, version, dependencies and the console script are in pyproject.toml ([project]).
setup(
    packages=["skiplayers", "skiplayers.patching", "skiplayers.dispatch", "skiplayers.triton_kernels"],
    package_dir={"skiplayers.triton_kernels": "triton_kernels"},
    # the demo's calibrated layer; the type-hints marker; the measured attention dispatch tables
    package_data={"skiplayers": ["calibrated.json", "py.typed"], "skiplayers.dispatch": ["tables/*.json"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
