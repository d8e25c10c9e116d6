"""Input checks of the Triton launchers: the same rules and messages as ``csrc/common/op_checks.h``
(so bad input reads the same whichever backend runs), plus the Triton backend's own limits.

Two kinds of check:

* shape / dtype / device checks read only tensor attributes and always run;
* *value* checks (``cu_seqlens`` well formed, cache lengths within capacity, appends and compactions
  that fit) read the metadata, which costs a device-to-host copy and a stream sync for CUDA tensors.
  They run when the metadata is on the CPU (interpreter), or on CUDA when ``SKIPLAYERS_TRITON_CHECKS=1``.
  Without them the kernels still never touch memory outside the buffers: they clamp cache lengths to
  the capacity and drop writes past it. That is documented, not silent: the caller owns the capacity.
"""

from __future__ import annotations

import os

import torch

from skiplayers.meta import Rule

from .configs import ATTENTION_DTYPES, HEAD_DIMS


def fail(op: str, message: str) -> None:
    raise RuntimeError(f"{op}: {message}")


def value_checks_enabled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("SKIPLAYERS_TRITON_CHECKS") == "1"


def check_same_device(ref: torch.Tensor, tensors: dict, op: str) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            fail(op, f"{name} is on {t.device} but {ref.device} was expected")


def check_int32_vector(t: torch.Tensor, length: int, op: str, name: str) -> None:
    if t.dtype != torch.int32:
        fail(op, f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        fail(op, f"{name} must have shape [{length}], got {list(t.shape)}")


def check_attention_inputs(op: str, q, k, v, cu_seqlens_q, q_pos, q_tag, rule: int, kv_dims: int) -> None:
    """Common to both attention ops: ``k``/``v`` are ``[..., H_kv, D]`` with ``kv_dims`` dimensions."""
    if int(rule) & ~int(Rule.ALL):
        fail(op, f"unknown bits in rule {rule}")
    if q.dtype not in ATTENTION_DTYPES:
        fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.dim() != kv_dims or v.shape != k.shape:
        fail(op, f"k and v must both have {kv_dims} dimensions [..., kv_heads, head_dim], got {list(k.shape)} and {list(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() != 3:
        fail(op, f"q must be [total_q, heads, head_dim], got {list(q.shape)}")
    if q.shape[2] != k.shape[-1]:
        fail(op, f"q head_dim {q.shape[2]} differs from the keys' {k.shape[-1]}")
    if q.shape[2] not in HEAD_DIMS:
        fail(op, f"the Triton backend supports head_dim 64 and 128, got {q.shape[2]}")
    kv_heads = k.shape[-2]
    if kv_heads == 0 or q.shape[1] % kv_heads:
        fail(op, f"query heads ({q.shape[1]}) must be a multiple of KV heads ({kv_heads})")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        fail(op, "cu_seqlens_q must be [B + 1]")
    check_int32_vector(cu_seqlens_q, cu_seqlens_q.shape[0], op, "cu_seqlens_q")
    check_int32_vector(q_pos, q.shape[0], op, "q_pos")
    if q_tag is not None:
        check_int32_vector(q_tag, q.shape[0], op, "q_tag")
    check_same_device(q, dict(k=k, v=v, cu_seqlens_q=cu_seqlens_q, q_pos=q_pos, q_tag=q_tag), op)


def check_cu_seqlens_values(cu: torch.Tensor, rows: int, op: str, name: str) -> None:
    c = cu.tolist()
    if c[0] != 0:
        fail(op, f"{name}[0] must be 0, got {c[0]}")
    for a, b in zip(c, c[1:]):
        if b < a:
            fail(op, f"{name} must be non-decreasing, got {a} then {b}")
    if c[-1] != rows:
        fail(op, f"{name} ends at {c[-1]} but there are {rows} rows")


def check_cache_lengths_values(lengths: torch.Tensor, capacity: int, op: str) -> None:
    for b, n in enumerate(lengths.tolist()):
        if not 0 <= n <= capacity:
            fail(op, f"cache_seqlens[{b}] = {n} is outside [0, {capacity}]")


def check_cache_metadata(op: str, pos_cache, tag_cache, batch: int, capacity: int, contiguous: bool) -> None:
    for name, t in (("pos_cache", pos_cache), ("tag_cache", tag_cache)):
        if t is None:
            continue
        if t.dtype != torch.int32 or t.dim() != 2 or tuple(t.shape) != (batch, capacity):
            fail(op, f"{name} must be int32 [B, S_cap] = [{batch}, {capacity}], got {t.dtype} {list(t.shape)}")
        if contiguous and not t.is_contiguous():
            fail(op, f"{name} must be contiguous")


def check_contiguous_caches(op: str, k_cache, v_cache) -> None:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        fail(op, "caches must be contiguous [B, S_cap, kv_heads, head_dim]")
    if v_cache.dtype != k_cache.dtype:
        fail(op, "k_cache and v_cache must share a dtype")
