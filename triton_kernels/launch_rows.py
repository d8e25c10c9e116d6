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


def _kept_offsets(keep_u8: torch.Tensor, length: int):
    """Launches count + scan over the mask ``keep_u8`` ``[length]`` (contiguous).

    Returns (offsets int32 ``[1, blocks + 1]``, totals int32 ``[1]``, blocks); see ``rows.py``."""
    blocks = cdiv(length, COMPACT.block)
    counts = torch.empty((1, blocks), dtype=torch.int32, device=keep_u8.device)
    offsets = torch.empty((1, blocks + 1), dtype=torch.int32, device=keep_u8.device)
    totals = torch.empty((1,), dtype=torch.int32, device=keep_u8.device)
    if blocks:
        count_kept_kernel[(blocks,)](keep_u8, counts, length, BLOCK=COMPACT.block, num_warps=COMPACT.num_warps)
    scan_counts_kernel[(1,)](counts, offsets, totals, blocks, CHUNK=SCAN.block, num_warps=SCAN.num_warps)
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
        offsets, totals, blocks = _kept_offsets(keep_u8, rows)
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


def cache_append(k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag, cu_seqlens, cache_seqlens) -> None:
    """Writes the new rows of sequence b at its slots ``cache_seqlens[b] ..`` through its block table
    row, in place."""
    op = "skiplayers_triton::cache_append"
    batch = checks.check_cache_append(op, k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag,
                                      cu_seqlens, cache_seqlens)
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    if checks.value_checks_enabled(k_cache):
        checks.check_cu_seqlens_values(cu_seqlens, k.shape[0], op, "cu_seqlens")
        added = cu_seqlens.diff().tolist()
        checks.check_paged_slots_values(op, block_table, cache_seqlens, added, num_pages, page_size)
    rows = k.shape[0]
    if rows == 0 or batch == 0 or kv_heads * head_dim == 0:
        return
    k, v = dense_last_dim(k), dense_last_dim(v)
    with device_guard(k_cache):
        cache_append_kernel[(cdiv(rows, APPEND.block),)](
            as_bits(k_cache, op), as_bits(v_cache, op), pos_cache, tag_cache, block_table, as_bits(k, op),
            as_bits(v, op), pos.contiguous(), tag.contiguous(), cu_seqlens.contiguous(), cache_seqlens.contiguous(),
            rows, batch, batch.bit_length(), block_table.shape[1], page_size, num_pages, kv_heads, head_dim,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            BLOCK=APPEND.block, BLOCK_C=APPEND.block_c, num_warps=APPEND.num_warps,
        )


def cache_compact(k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep):
    """In place, per sequence, the kept slots moved to the front of the sequence's own slots, order
    kept; returns the new ``cache_seqlens`` (int32 ``[B]``, on the device). Slots past each new length
    keep whatever they held (the op leaves them unspecified). No host sync unless value checks are on."""
    op = "skiplayers_triton::cache_compact"
    batch = checks.check_cache_compact(op, k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep)
    num_pages, page_size, kv_heads, head_dim = k_cache.shape
    if checks.value_checks_enabled(k_cache):
        checks.check_paged_slots_values(op, block_table, cache_seqlens, None, num_pages, page_size)
    new_lengths = torch.empty((batch,), dtype=torch.int32, device=cache_seqlens.device)
    if batch == 0:
        return new_lengths
    width = kv_heads * head_dim
    with device_guard(k_cache):
        cache_compact_kernel[(batch, max(1, cdiv(width, COMPACT.block_c)))](
            as_bits(k_cache, op), as_bits(v_cache, op), pos_cache, tag_cache, block_table, cache_seqlens.contiguous(),
            keep.view(torch.uint8), new_lengths, block_table.shape[1], page_size, num_pages, width,
            BLOCK=COMPACT.block, BLOCK_C=COMPACT.block_c, num_warps=COMPACT.num_warps,
        )
    return new_lengths
