"""Row-moving kernels: compaction by a keep mask (``compact_rows``, ``cache_compact``) and the cache
write at each sequence's own offset (``cache_append``). All copies are bit-exact: the launchers pass
the data as same-width integers, so no value is ever converted.

Compaction is two small passes over the *mask* and one over the data:

1. ``count_kept_kernel``  grid ``(blocks, R)``: kept entries per ``BLOCK`` of each of R mask rows
   (blocks on axis 0, whose limit is 2**31 - 1, so a packed batch of millions of rows fits);
2. ``scan_counts_kernel``  grid ``(R,)``: exclusive prefix over the blocks of each row, plus the total;
3. a copy kernel moves each kept entry to ``offset[block] + (kept before it inside the block)``.

``compact_rows`` uses R = 1 (the packed batch is one mask row); ``cache_compact`` uses one mask row
per sequence, limited to that sequence's cache length.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ragged import ragged_search


@triton.jit
def _mask_block(keep_ptr, stride_keep, lengths_ptr, length_limit, r, block, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr):
    """(indices, kept as int32) for one block of mask row r; entries at or past the row's length count as dropped."""
    idx = block * BLOCK + tl.arange(0, BLOCK)
    length = length_limit
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + r), 0), length_limit)
    inside = idx < length
    kept = tl.load(keep_ptr + r.to(tl.int64) * stride_keep + idx, mask=inside, other=0) != 0
    return idx, (kept & inside).to(tl.int32)


@triton.jit
def _destinations(kept, block_offset):
    """Compacted index of every kept entry of a block: its block's offset plus the kept entries before it."""
    return block_offset + tl.cumsum(kept, 0) - kept


@triton.jit
def _copy_head_rows(
    src_ptr, src_rows, stride_src_h, dst_ptr, dst_rows, row_mask, width, head_dim, BLOCK_C: tl.constexpr
):
    """Copies ``width`` elements of each masked row: element c is (head c // head_dim, d c % head_dim),
    read at ``src_rows + head * stride_src_h + d`` and written densely at ``dst_rows + c``."""
    for c0 in range(0, width, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        src_cols = (cols // head_dim) * stride_src_h + cols % head_dim
        mask = row_mask[:, None] & (cols < width)[None, :]
        vals = tl.load(src_ptr + src_rows[:, None] + src_cols[None, :], mask=mask)
        tl.store(dst_ptr + dst_rows[:, None] + cols[None, :], vals, mask=mask)


@triton.jit
def count_kept_kernel(
    keep_ptr, lengths_ptr, counts_ptr, stride_keep, length_limit, num_blocks,
    HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(num_blocks, R)``. keep uint8 ``[R, stride_keep]``; counts int32 ``[R, num_blocks]``. Row
    r's length is ``lengths[r]`` clamped to ``[0, length_limit]`` if HAS_LENGTHS, else ``length_limit``."""
    block = tl.program_id(0)
    r = tl.program_id(1)
    _, kept = _mask_block(keep_ptr, stride_keep, lengths_ptr, length_limit, r, block, HAS_LENGTHS, BLOCK)
    tl.store(counts_ptr + r * num_blocks + block, tl.sum(kept, 0))


@triton.jit
def scan_counts_kernel(counts_ptr, offsets_ptr, totals_ptr, num_blocks, CHUNK: tl.constexpr):
    """offsets int32 ``[R, num_blocks + 1]``: kept entries before each block (the last is the row's
    total, also written to totals ``[R]``)."""
    r = tl.program_id(0)
    running = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, num_blocks, CHUNK):
        idx = c0 + tl.arange(0, CHUNK)
        counts = tl.load(counts_ptr + r * num_blocks + idx, mask=idx < num_blocks, other=0)
        tl.store(offsets_ptr + r * (num_blocks + 1) + idx, running + tl.cumsum(counts, 0) - counts, mask=idx < num_blocks)
        running += tl.sum(counts, 0)
    tl.store(offsets_ptr + r * (num_blocks + 1) + num_blocks, running)
    tl.store(totals_ptr + r, running)


@triton.jit
def compact_rows_kernel(
    x_ptr, keep_ptr, offsets_ptr, out_ptr, num_rows, width, stride_xm, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Grid ``(blocks,)``: kept rows of x (``[N, width]``, row stride ``stride_xm``) to the dense out."""
    block = tl.program_id(0)
    idx, kept = _mask_block(keep_ptr, 0, keep_ptr, num_rows, block * 0, block, False, BLOCK)
    dest = _destinations(kept, tl.load(offsets_ptr + block))
    _copy_head_rows(
        x_ptr, idx.to(tl.int64) * stride_xm, width, out_ptr, dest.to(tl.int64) * width, kept != 0, width, width, BLOCK_C
    )


@triton.jit
def compact_cu_seqlens_kernel(keep_ptr, offsets_ptr, cu_ptr, new_cu_ptr, num_rows, batch_plus_one, BLOCK: tl.constexpr):
    """Grid ``(batch + 1,)``: ``new_cu[b]`` = kept rows before row ``cu[b]`` (clamped to ``[0, N]``)."""
    b = tl.program_id(0)
    row = tl.minimum(tl.maximum(tl.load(cu_ptr + b), 0), num_rows)
    block = row // BLOCK
    idx = block * BLOCK + tl.arange(0, BLOCK)
    kept = tl.load(keep_ptr + idx, mask=idx < row, other=0) != 0
    tl.store(new_cu_ptr + b, tl.load(offsets_ptr + block) + tl.sum(kept.to(tl.int32), 0))


@triton.jit
def cache_compact_kernel(
    k_ptr, v_ptr, pos_ptr, tag_ptr, keep_ptr, lengths_ptr, offsets_ptr,
    new_k_ptr, new_v_ptr, new_pos_ptr, new_tag_ptr,
    capacity, new_capacity, num_blocks, row_width,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(B, blocks)`` (blocks of one cache's capacity: few): kept slots of sequence b's first ``cache_seqlens[b]`` (clamped to the
    capacity) to the front of the new contiguous buffers; slots that would land at or past
    ``new_capacity`` are not written (the launcher reports the overflow where it can check it)."""
    b = tl.program_id(0)
    block = tl.program_id(1)
    idx, kept = _mask_block(keep_ptr, capacity, lengths_ptr, capacity, b, block, True, BLOCK)
    dest = _destinations(kept, tl.load(offsets_ptr + b * (num_blocks + 1) + block))
    move = (kept != 0) & (dest < new_capacity)
    src_slot = b.to(tl.int64) * capacity + idx
    dst_slot = b.to(tl.int64) * new_capacity + dest
    tl.store(new_pos_ptr + dst_slot, tl.load(pos_ptr + src_slot, mask=move), mask=move)
    tl.store(new_tag_ptr + dst_slot, tl.load(tag_ptr + src_slot, mask=move), mask=move)
    _copy_head_rows(k_ptr, src_slot * row_width, row_width, new_k_ptr, dst_slot * row_width, move, row_width, row_width, BLOCK_C)
    _copy_head_rows(v_ptr, src_slot * row_width, row_width, new_v_ptr, dst_slot * row_width, move, row_width, row_width, BLOCK_C)


@triton.jit
def cache_append_kernel(
    k_cache_ptr, v_cache_ptr, pos_cache_ptr, tag_cache_ptr, k_ptr, v_ptr, pos_ptr, tag_ptr,
    cu_seqlens_ptr, cache_seqlens_ptr,
    num_rows, batch, search_steps, capacity, kv_heads, head_dim,
    stride_kn, stride_kh, stride_vn, stride_vh,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(blocks,)``: new row i of sequence b (``cu[b] <= i < cu[b+1]``) goes to slot
    ``cache_seqlens[b] + i - cu[b]`` of contiguous caches ``[B, capacity, kv_heads, head_dim]``.
    Slots outside ``[0, capacity)`` are not written (the launcher reports the overflow where it can)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < num_rows
    seq = ragged_search(cu_seqlens_ptr, batch, rows, 1, 0, search_steps)
    seq = tl.where(in_range, seq, 0)
    slot = tl.load(cache_seqlens_ptr + seq, mask=in_range, other=0) + rows - tl.load(cu_seqlens_ptr + seq, mask=in_range, other=0)
    move = in_range & (slot >= 0) & (slot < capacity)
    dst_slot = seq.to(tl.int64) * capacity + slot
    tl.store(pos_cache_ptr + dst_slot, tl.load(pos_ptr + rows, mask=move), mask=move)
    tl.store(tag_cache_ptr + dst_slot, tl.load(tag_ptr + rows, mask=move), mask=move)
    width = kv_heads * head_dim
    rows64 = rows.to(tl.int64)
    _copy_head_rows(k_ptr, rows64 * stride_kn, stride_kh, k_cache_ptr, dst_slot * width, move, width, head_dim, BLOCK_C)
    _copy_head_rows(v_ptr, rows64 * stride_vn, stride_vh, v_cache_ptr, dst_slot * width, move, width, head_dim, BLOCK_C)
