"""Host launchers of the row-moving kernels (``compact_rows``, ``cache_append``, ``cache_compact``).

Data-dependent sizes: ``compact_rows`` returns ``x[keep]``, whose row count depends on the mask. Its
launcher counts on the device, then reads the count back (``.item()``: **one device-to-host sync per
call**) to allocate the output; the scan and ``new cu_seqlens`` are launched before that sync so the
GPU is busy while the host waits. ``cache_compact``'s outputs have the caller's ``capacity`` and need
no sync (its new lengths stay on the device); ``cache_append`` changes nothing's size.
"""

from __future__ import annotations

import torch

from . import checks
from .configs import APPEND, COMPACT, SCAN
from .host import as_bits, cdiv, dense_last_dim, device_guard
from .rows import (
    cache_append_kernel,
    cache_compact_kernel,
    compact_cu_seqlens_kernel,
    compact_rows_kernel,
    count_kept_kernel,
    scan_counts_kernel,
)


def _kept_offsets(keep_u8: torch.Tensor, lengths: torch.Tensor | None, length_limit: int):
    """Launches count + scan over mask rows ``keep_u8`` ``[R, length_limit]`` (contiguous).

    Returns (offsets int32 ``[R, blocks + 1]``, totals int32 ``[R]``, blocks); see ``rows.py``."""
    rows = keep_u8.shape[0]
    blocks = cdiv(length_limit, COMPACT.block)
    counts = torch.empty((rows, blocks), dtype=torch.int32, device=keep_u8.device)
    offsets = torch.empty((rows, blocks + 1), dtype=torch.int32, device=keep_u8.device)
    totals = torch.empty((rows,), dtype=torch.int32, device=keep_u8.device)
    if blocks:
        count_kept_kernel[(blocks, rows)](
            keep_u8, keep_u8 if lengths is None else lengths, counts, keep_u8.stride(0), length_limit, blocks,
            HAS_LENGTHS=lengths is not None, BLOCK=COMPACT.block, num_warps=COMPACT.num_warps,
        )
    scan_counts_kernel[(rows,)](counts, offsets, totals, blocks, CHUNK=SCAN.block, num_warps=SCAN.num_warps)
    return offsets, totals, blocks


def compact_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor):
    """``(x[keep], new cu_seqlens)``; one host sync for the kept count (module docstring)."""
    op = "skiplayers_triton::compact_rows"
    if x.dim() < 1:
        checks.fail(op, "x must have a row dimension")
    if keep.dtype != torch.bool or keep.dim() != 1 or keep.shape[0] != x.shape[0]:
        checks.fail(op, f"keep must be bool [{x.shape[0]}], got {keep.dtype} {list(keep.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        checks.fail(op, "cu_seqlens must be [B + 1]")
    checks.check_int32_vector(cu_seqlens, cu_seqlens.shape[0], op, "cu_seqlens")
    checks.check_same_device(x, dict(keep=keep, cu_seqlens=cu_seqlens), op)
    if checks.value_checks_enabled(x):
        checks.check_cu_seqlens_values(cu_seqlens, x.shape[0], op, "cu_seqlens")

    rows = x.shape[0]
    keep_u8 = keep.contiguous().view(torch.uint8)
    with device_guard(x):
        offsets, totals, blocks = _kept_offsets(keep_u8.view(1, rows), None, rows)
        new_cu = torch.empty_like(cu_seqlens)
        compact_cu_seqlens_kernel[(cu_seqlens.shape[0],)](
            keep_u8, offsets, cu_seqlens.contiguous(), new_cu, rows, cu_seqlens.shape[0], BLOCK=COMPACT.block,
            num_warps=COMPACT.num_warps,
        )
        kept = int(totals.item())  # the one host sync: the output's row count is data-dependent
        out = x.new_empty((kept, *x.shape[1:]))
        width = out[0].numel() if kept else 0
        if kept and width:
            x2 = dense_last_dim(x.reshape(rows, width))
            compact_rows_kernel[(blocks,)](
                as_bits(x2, op), keep_u8, offsets, as_bits(out.view(kept, width), op), rows, width, x2.stride(0),
                BLOCK=COMPACT.block, BLOCK_C=COMPACT.block_c, num_warps=COMPACT.num_warps,
            )
    return out, new_cu


def cache_append(k_cache, v_cache, pos_cache, tag_cache, k, v, pos, tag, cu_seqlens, cache_seqlens) -> None:
    """Writes the new rows of sequence b at its slots ``cache_seqlens[b] ..``, in place."""
    op = "skiplayers_triton::cache_append"
    checks.check_contiguous_caches(op, k_cache, v_cache)
    batch, capacity, kv_heads, head_dim = k_cache.shape
    if k.dim() != 3 or v.shape != k.shape or k.shape[1] != kv_heads or k.shape[2] != head_dim:
        checks.fail(op, f"k and v must be [total, kv_heads, head_dim] matching the cache, got {list(k.shape)} and {list(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        checks.fail(op, "k, v and the caches must share a dtype")
    checks.check_cache_metadata(op, pos_cache, tag_cache, batch, capacity, contiguous=True)
    checks.check_int32_vector(pos, k.shape[0], op, "pos")
    checks.check_int32_vector(tag, k.shape[0], op, "tag")
    checks.check_int32_vector(cu_seqlens, batch + 1, op, "cu_seqlens")
    checks.check_int32_vector(cache_seqlens, batch, op, "cache_seqlens")
    checks.check_same_device(
        k_cache, dict(v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, k=k, v=v, pos=pos, tag=tag,
                      cu_seqlens=cu_seqlens, cache_seqlens=cache_seqlens), op,
    )
    if checks.value_checks_enabled(k_cache):
        checks.check_cu_seqlens_values(cu_seqlens, k.shape[0], op, "cu_seqlens")
        cu, lens = cu_seqlens.tolist(), cache_seqlens.tolist()
        for b, start in enumerate(lens):
            n = cu[b + 1] - cu[b]
            if start < 0 or start + n > capacity:
                checks.fail(op, f"sequence {b} holds {start} slots and appends {n}, but the cache has capacity {capacity}")
    rows = k.shape[0]
    if rows == 0 or batch == 0:
        return
    k, v = dense_last_dim(k), dense_last_dim(v)
    with device_guard(k_cache):
        cache_append_kernel[(cdiv(rows, APPEND.block),)](
            as_bits(k_cache, op), as_bits(v_cache, op), pos_cache, tag_cache, as_bits(k, op), as_bits(v, op),
            pos.contiguous(), tag.contiguous(), cu_seqlens.contiguous(), cache_seqlens.contiguous(),
            rows, batch, batch.bit_length(), capacity, kv_heads, head_dim,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            BLOCK=APPEND.block, BLOCK_C=APPEND.block_c, num_warps=APPEND.num_warps,
        )


def cache_compact(k_cache, v_cache, pos_cache, tag_cache, cache_seqlens, keep, capacity: int):
    """Per sequence, the kept slots moved to the front of new buffers of ``capacity`` slots; returns
    ``(k_cache, v_cache, pos_cache, tag_cache, cache_seqlens)``. Slots past each new length are left
    uninitialised (the op leaves them unspecified). No host sync unless value checks are on."""
    op = "skiplayers_triton::cache_compact"
    checks.check_contiguous_caches(op, k_cache, v_cache)
    batch, old_capacity, kv_heads, head_dim = k_cache.shape
    checks.check_cache_metadata(op, pos_cache, tag_cache, batch, old_capacity, contiguous=True)
    if keep.dtype != torch.bool or tuple(keep.shape) != (batch, old_capacity) or not keep.is_contiguous():
        checks.fail(op, "keep must be contiguous bool [B, S_cap]")
    checks.check_int32_vector(cache_seqlens, batch, op, "cache_seqlens")
    if capacity < 0:
        checks.fail(op, "capacity must be >= 0")
    checks.check_same_device(
        k_cache, dict(v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, cache_seqlens=cache_seqlens, keep=keep), op
    )
    if checks.value_checks_enabled(k_cache):
        checks.check_cache_lengths_values(cache_seqlens, old_capacity, op)
    shape = (batch, capacity, kv_heads, head_dim)
    new_k, new_v = k_cache.new_empty(shape), v_cache.new_empty(shape)
    new_pos, new_tag = pos_cache.new_empty((batch, capacity)), tag_cache.new_empty((batch, capacity))
    if batch == 0:
        return new_k, new_v, new_pos, new_tag, cache_seqlens.new_empty((0,))
    with device_guard(k_cache):
        offsets, new_lengths, blocks = _kept_offsets(keep.view(torch.uint8), cache_seqlens.contiguous(), old_capacity)
        if checks.value_checks_enabled(k_cache):
            for b, kept in enumerate(new_lengths.tolist()):
                if kept > capacity:
                    checks.fail(op, f"sequence {b} keeps {kept} slots, more than the new capacity {capacity}")
        if blocks and capacity:
            cache_compact_kernel[(batch, blocks)](
                as_bits(k_cache, op), as_bits(v_cache, op), pos_cache, tag_cache, keep.view(torch.uint8),
                cache_seqlens.contiguous(), offsets,
                as_bits(new_k, op), as_bits(new_v, op), new_pos, new_tag,
                old_capacity, capacity, blocks, kv_heads * head_dim,
                BLOCK=COMPACT.block, BLOCK_C=COMPACT.block_c, num_warps=COMPACT.num_warps,
            )
    return new_k, new_v, new_pos, new_tag, new_lengths
