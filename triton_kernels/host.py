"""Small host-side helpers shared by the launchers."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

INTERPRETED = bool(triton.knobs.runtime.interpret)  # as when the kernels were decorated (import time)
LOG2_E = 1.4426950408889634
INTERPRETER_SM_COUNT = 8  # the interpreter has no SMs; any count is correct (results never depend on it)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _cuda_index(device: torch.device) -> int:
    """A CUDA device's index (``cuda`` without one: the current device)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_arch(device: torch.device) -> int | None:
    """The compute capability as ``10 * major + minor`` (80, 90, ...); None off CUDA (interpreter)."""
    return _cuda_arch(_cuda_index(device)) if device.type == "cuda" else None


def sm_count(device: torch.device) -> int:
    return _cuda_sm_count(_cuda_index(device)) if device.type == "cuda" else INTERPRETER_SM_COUNT


@functools.cache
def fp32_placeholder(device: torch.device) -> torch.Tensor:
    """A float32 tensor to pass for pointer arguments a launch never touches: always the same
    pointer type, so such launches reuse the compiled kernel instead of specialising a new one."""
    return torch.empty(1, dtype=torch.float32, device=device)


def dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    """Rows and heads may be strided (views of a fused projection); the last dimension must be dense,
    so a tensor whose last dimension is not is copied (as the C++ launchers do)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor, op: str) -> torch.Tensor:
    """The same memory viewed as integers of the same width, so copies are bit-exact for every dtype."""
    if t.element_size() not in _BITS:
        raise RuntimeError(f"{op}: unsupported element size {t.element_size()} bytes ({t.dtype})")
    return t.view(_BITS[t.element_size()])
