"""Row-moving kernels: compaction of packed rows by a keep mask (``compact_rows``), the in-place
compaction of paged caches (``cache_compact``) and the cache write at each sequence's own slots
(``cache_append``). All copies are bit-exact: the launchers pass the data as same-width integers, so
no value is ever converted.

``compact_rows`` is two small passes over the *mask* and one over the data:

1. ``count_kept_kernel``  grid ``(blocks,)``: kept entries per ``BLOCK`` of the mask (blocks on axis
   0, whose limit is 2**31 - 1, so a packed batch of millions of rows fits);
2. ``scan_counts_kernel``  grid ``(1,)``: exclusive prefix over the blocks, plus the total;
3. ``compact_rows_kernel`` moves each kept row to ``offset[block] + (kept before it inside the block)``.

Paged caches: sequence b's slot ``s`` is page ``block_table[b, s // page_size]``, offset
``s % page_size``, i.e. row ``page * page_size + offset`` of a pool viewed as ``[num_pages *
page_size, ...]``. A slot whose table entry is not a page of the pool (``< 0`` or ``>= num_pages``,
possible only without the launchers' value checks) is neither read nor written.

``cache_compact`` works in place, so its order matters (see :func:`cache_compact_kernel`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ragged import ragged_search


@triton.jit
def _mask_block(keep_ptr, length, block, BLOCK: tl.constexpr):
    """(indices, kept as int32) for one block of a mask of ``length`` entries."""
    idx = block * BLOCK + tl.arange(0, BLOCK)
    inside = idx < length
    kept = tl.load(keep_ptr + idx, mask=inside, other=0) != 0
    return idx, (kept & inside).to(tl.int32)


@triton.jit
def _page_rows(table_ptr, slot, valid, page_size, num_pages):
    """(pool row ``page * page_size + slot % page_size`` as int64, valid) of sequence slots ``slot``
    through one block table row; slots whose entry is not a page of the pool become invalid."""
    page = tl.load(table_ptr + slot // page_size, mask=valid, other=-1)
    valid = valid & (page >= 0) & (page < num_pages)
    return tl.where(valid, page, 0).to(tl.int64) * page_size + slot % page_size, valid


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
def count_kept_kernel(keep_ptr, counts_ptr, length, BLOCK: tl.constexpr):
    """Grid ``(blocks,)``. keep uint8 ``[length]``; counts int32 ``[blocks]``."""
    block = tl.program_id(0)
    _, kept = _mask_block(keep_ptr, length, block, BLOCK)
    tl.store(counts_ptr + block, tl.sum(kept, 0))


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
    idx, kept = _mask_block(keep_ptr, num_rows, block, BLOCK)
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
    k_ptr, v_ptr, pos_ptr, tag_ptr, block_table_ptr, lengths_ptr, keep_ptr, new_lengths_ptr,
    max_pages, page_size, num_pages, row_width,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(B, cdiv(row_width, BLOCK_C))``: in place, the kept slots ``s < cache_seqlens[b]``
    (clamped to ``[0, max_pages * page_size]``) of sequence b move to its slots ``0, 1, ..`` in order.
    Program ``(b, c)`` moves columns ``[c * BLOCK_C, (c + 1) * BLOCK_C)`` of the K/V rows (``row_width =
    kv_heads * head_dim`` values, contiguous pools); program ``(b, 0)`` also moves pos/tag and writes
    the new length. keep uint8 ``[B, max_pages * page_size]``.

    Race freedom: slot ``s`` moves to ``d <= s`` (the kept slots before it). A program walks its
    sequence in chunks of ``BLOCK`` slots, in slot order; within a chunk every load completes before
    any store (a CTA barrier between them), so a destination that is another kept slot's source of
    the same chunk has already been read. The destinations of a chunk lie below the chunk's end and
    the sources of later chunks at or above it, so no later source is written before it is read.
    Programs of other columns or sequences touch disjoint memory (sequences never share pages when
    compacted; pos/tag belong to the ``c == 0`` programs only). Slots already in place are not written.
    """
    b = tl.program_id(0)
    c = tl.program_id(1)
    capacity = max_pages * page_size
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + b), 0), capacity)
    table_row = block_table_ptr + b.to(tl.int64) * max_pages
    keep_row = keep_ptr + b.to(tl.int64) * capacity
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = (cols < row_width)[None, :]
    kept_before = length * 0
    for start in range(0, length, BLOCK):
        slot, kept = _mask_block(keep_row, length, start // BLOCK, BLOCK)
        dest = _destinations(kept, kept_before)
        src_row, src_ok = _page_rows(table_row, slot, kept != 0, page_size, num_pages)
        dst_row, dst_ok = _page_rows(table_row, dest, kept != 0, page_size, num_pages)
        move = src_ok & dst_ok & (dest != slot)
        move_meta = move & (c == 0)
        src = src_row[:, None] * row_width + cols[None, :]
        dst = dst_row[:, None] * row_width + cols[None, :]
        k = tl.load(k_ptr + src, mask=move[:, None] & col_ok)
        v = tl.load(v_ptr + src, mask=move[:, None] & col_ok)
        pos = tl.load(pos_ptr + src_row, mask=move_meta)
        tag = tl.load(tag_ptr + src_row, mask=move_meta)
        tl.debug_barrier()  # every load of the chunk before any of its stores (see above)
        tl.store(k_ptr + dst, k, mask=move[:, None] & col_ok)
        tl.store(v_ptr + dst, v, mask=move[:, None] & col_ok)
        tl.store(pos_ptr + dst_row, pos, mask=move_meta)
        tl.store(tag_ptr + dst_row, tag, mask=move_meta)
        kept_before += tl.sum(kept, 0)
    if c == 0:
        tl.store(new_lengths_ptr + b, kept_before)


@triton.jit
def cache_append_kernel(
    k_cache_ptr, v_cache_ptr, pos_cache_ptr, tag_cache_ptr, block_table_ptr, k_ptr, v_ptr, pos_ptr, tag_ptr,
    cu_seqlens_ptr, cache_seqlens_ptr,
    num_rows, batch, search_steps, max_pages, page_size, num_pages, kv_heads, head_dim,
    stride_kn, stride_kh, stride_vn, stride_vh,
    BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid ``(blocks,)``: new row i of sequence b (``cu[b] <= i < cu[b+1]``) goes to slot
    ``cache_seqlens[b] + i - cu[b]`` of the sequence, through its block table row, in contiguous pools
    ``[num_pages, page_size, kv_heads, head_dim]``. Slots outside ``[0, max_pages * page_size)`` or in
    an entry that is not a page of the pool are not written (the launcher reports them where it can)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < num_rows
    seq = ragged_search(cu_seqlens_ptr, batch, rows, 1, 0, search_steps)
    seq = tl.where(in_range, seq, 0)
    slot = tl.load(cache_seqlens_ptr + seq, mask=in_range, other=0) + rows - tl.load(cu_seqlens_ptr + seq, mask=in_range, other=0)
    in_slots = in_range & (slot >= 0) & (slot < max_pages * page_size)
    dst_slot, move = _page_rows(block_table_ptr + seq.to(tl.int64) * max_pages, slot, in_slots, page_size, num_pages)
    tl.store(pos_cache_ptr + dst_slot, tl.load(pos_ptr + rows, mask=move), mask=move)
    tl.store(tag_cache_ptr + dst_slot, tl.load(tag_ptr + rows, mask=move), mask=move)
    width = kv_heads * head_dim
    rows64 = rows.to(tl.int64)
    _copy_head_rows(k_ptr, rows64 * stride_kn, stride_kh, k_cache_ptr, dst_slot * width, move, width, head_dim, BLOCK_C)
    _copy_head_rows(v_ptr, rows64 * stride_vn, stride_vh, v_cache_ptr, dst_slot * width, move, width, head_dim, BLOCK_C)
