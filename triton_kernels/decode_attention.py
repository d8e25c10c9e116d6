"""Decode attention against paged KV caches (the ``cache_attention`` op): split-K (flash-decoding)
with a separate reduction kernel.

``decode_attention_kernel``, grid ``(batch, kv_heads * head_chunks, num_splits)``: the program of
split ``s`` folds cache slots ``split_key_range(cache_seqlens[b], num_splits, s)`` into an online
softmax for every query tile of sequence b (usually one tile: a few new queries times the GQA group),
so one long sequence is spread over ``num_splits`` programs instead of serialising the batch.
With one split it writes the normalised output; otherwise it writes the un-normalised partial
``(acc, m, l)`` of its slice, and ``combine_splits_kernel`` merges the slices per (query, head) with
the base-2 rule of ``skiplayers::merge_softmax_stats``. The split boundaries fall on ``BLOCK_N``
multiples and every slice is merged exactly, so the result does not depend on ``num_splits``
beyond floating-point reassociation.

Paging (:func:`attend_paged_keys`): the cache is a pool of pages ``[num_pages, page_size, H_kv, D]``
and sequence b's slot ``s`` is page ``block_table[b, s // page_size]``, offset ``s % page_size``. A key
tile of ``BLOCK_N`` slots looks up the page of each of its slots, so the tile does not depend on the
page size (any ``page_size >= 1``; pages in any order, shared pages read like any other). Per tile:
the block table entries of its slots, then the slots' pos/tag, then the block test, then K and V.

Loads and ruled-out tiles (:func:`attend_paged_keys`): none of the loads is inside a branch. A tile
that the block test rules out (``visibility.key_block_may_be_visible``) has its K/V loads masked off,
so they read no memory, and its arithmetic sits behind the test, so it is not computed either. The
loop reads its metadata ahead by hand: block table entries two tiles ahead, pos/tag one tile ahead,
so that the K/V loads of a tile never wait on the metadata loads of their own iteration. What the
sm_90 PTX of the 16-bit kernels shows (``python -m skiplayers.aot`` compiles them): in the key loop
the predicated ``ld.global.b32`` of the next tiles' table entries and metadata, then the predicated
128-bit ``ld.global.v4`` of the tile's K and V, then the one branch around the ``mma.sync`` work.
Triton 3.8's software pipeliner leaves this loop alone while its dots are behind the branch (with
the arithmetic made unconditional it does issue ``cp.async`` copies, but of the next tile at the end
of the iteration, waited for at the top of the next, through the same chain of dependent table,
metadata and K/V loads; and ruled-out tiles would then be computed on zeros). One
known cost: Triton stores K to shared memory for its transpose right after K's load, before V's load
is issued, so a tile's K and V latencies add up instead of overlapping; loading K/V one tile ahead in
registers avoids that but costs 30-60 registers per thread (measured with the AOT compile: fp32
kernels then spill), so it is not done.

Tile size: the per-slot page numbers and addresses of the tiles in flight cost registers per thread,
which kept 16-bit key tiles at 32 slots with 4 warps; with 8 warps each thread holds half of them,
and 16-bit tiles of 128-256 slots compile without spills (``configs.py`` has the numbers), so the
lookup stays per slot (any page size, no page-size specialisation).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_core import fold_values, head_tile, load_query_tile, normalise, query_rows, softmax_step, store_rows
from .ragged import split_key_range
from .visibility import INT32_MAX, key_block_may_be_visible, query_summary


@triton.jit
def partial_pointers(part_ptr, rows, HEAD_DIM: tl.constexpr):
    """The one fp32 partials buffer (one allocation per call): ``acc [rows, HEAD_DIM]`` (unpadded:
    the columns past ``HEAD_DIM`` of a padded tile are neither stored nor loaded), then ``m [rows]``,
    then ``l [rows]``, with ``rows = num_splits * Nq * H`` ordered (split, query, head)."""
    rows64 = tl.full([], rows, tl.int64)
    return part_ptr, part_ptr + rows64 * HEAD_DIM, part_ptr + rows64 * (HEAD_DIM + 1)


@triton.jit
def tile_pages(table_ptr, start, key_end, page_size, num_pages, BLOCK_N: tl.constexpr):
    """The page of each slot of the key tile ``[start, start + BLOCK_N)``, read from the sequence's
    block table row; -1 for a slot at or past ``key_end`` or whose entry is not a page of the pool
    (``< 0`` or ``>= num_pages``: only without the host value checks), which is then no key."""
    slot = start + tl.arange(0, BLOCK_N)
    page = tl.load(table_ptr + slot // page_size, mask=slot < key_end, other=-1)
    return tl.where((page >= 0) & (page < num_pages), page, -1)


@triton.jit
def tile_metadata(pos_ptr, tag_ptr, page, start, page_size, BLOCK_N: tl.constexpr, USE_TAGS: tl.constexpr):
    """(pos, tag) of the tile's slots from the contiguous ``[num_pages, page_size]`` pools; slots
    without a page read as position INT32_MAX (never visible, see ``key_block_may_be_visible``)."""
    slot = start + tl.arange(0, BLOCK_N)
    valid = page >= 0
    row = tl.where(valid, page, 0).to(tl.int64) * page_size + slot % page_size
    k_pos = tl.load(pos_ptr + row, mask=valid, other=INT32_MAX)
    if USE_TAGS:
        k_tag = tl.load(tag_ptr + row, mask=valid, other=0)
    else:
        k_tag = k_pos * 0
    return k_pos, k_tag


@triton.jit
def tile_keys_values(
    k_ptr, v_ptr, stride_kp, stride_ks, stride_vp, stride_vs, page, start, page_size, load,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """K and V ``[BLOCK_N, HEAD_PAD]`` of the tile's slots where ``load`` (zeros elsewhere and in the
    padded columns, unread)."""
    slot = start + tl.arange(0, BLOCK_N)
    page64 = tl.where(load, page, 0).to(tl.int64)
    offset = slot % page_size
    offs_d, mask = head_tile(load, HEAD_DIM, HEAD_PAD)
    k = tl.load(k_ptr + (page64 * stride_kp + offset * stride_ks)[:, None] + offs_d, mask=mask, other=0.0)
    v = tl.load(v_ptr + (page64 * stride_vp + offset * stride_vs)[:, None] + offs_d, mask=mask, other=0.0)
    return k, v


@triton.jit
def attend_paged_keys(
    acc, m_i, l_i, q, q_pos, q_tag, q_valid,
    k_ptr, v_ptr, stride_kp, stride_ks, stride_vp, stride_vs, pos_ptr, tag_ptr, table_ptr, page_size, num_pages,
    key_begin, key_end, rule, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Folds slots ``[key_begin, key_end)`` of one sequence's paged cache into the running
    ``(acc, m_i, l_i)`` of the query tile.

    ``table_ptr``: the sequence's block table row; slot ``s``'s key is at ``k_ptr + page * stride_kp +
    (s % page_size) * stride_ks`` with ``page = table[s // page_size]`` (``k_ptr`` already at this KV
    head; head dim dense; likewise V) and its metadata at ``page * page_size + s % page_size`` of the
    contiguous pos/tag pools. A slot whose table entry is not a page of the pool is no key, and
    nothing of it is read (:func:`tile_pages`).

    Metadata read ahead (module docstring): the iteration of tile ``i`` first reads the block table
    entries of tile ``i + 2``, the pos/tag of tile ``i + 1`` and, when the block test of tile ``i``
    (on metadata read an iteration earlier) lets it, the K/V of tile ``i``. Every address comes from
    values loaded in an earlier iteration, so the table, metadata and K loads are in flight together
    instead of waiting on each other (V follows K: see the module docstring). None of them is inside
    a branch; loads past ``key_end`` are masked off.
    """
    q_max_pos, q_min_sentence, q_max_sentence = query_summary(q_pos, q_tag, q_valid, USE_TAGS)
    # Prologue: tile 0's pages and metadata, tile 1's pages.
    page0 = tile_pages(table_ptr, key_begin, key_end, page_size, num_pages, BLOCK_N)
    page1 = tile_pages(table_ptr, key_begin + BLOCK_N, key_end, page_size, num_pages, BLOCK_N)
    pos0, tag0 = tile_metadata(pos_ptr, tag_ptr, page0, key_begin, page_size, BLOCK_N, USE_TAGS)
    for start in range(key_begin, key_end, BLOCK_N):
        # Loads: none inside a branch, none waiting on another load of this iteration.
        page2 = tile_pages(table_ptr, start + 2 * BLOCK_N, key_end, page_size, num_pages, BLOCK_N)
        pos1, tag1 = tile_metadata(pos_ptr, tag_ptr, page1, start + BLOCK_N, page_size, BLOCK_N, USE_TAGS)
        valid0 = page0 >= 0
        may0 = key_block_may_be_visible(rule, q_max_pos, q_min_sentence, q_max_sentence, pos0, tag0, valid0, USE_TAGS)
        k, v = tile_keys_values(k_ptr, v_ptr, stride_kp, stride_ks, stride_vp, stride_vs, page0, start, page_size,
                                valid0 & may0, BLOCK_N, HEAD_DIM, HEAD_PAD)
        # A tile that the block test rules out was not read and is not computed.
        if may0:
            p, alpha, m_i, l_i = softmax_step(
                m_i, l_i, q, k, q_pos, q_tag, pos0, tag0, valid0, rule, qk_scale, USE_TAGS, DOT_PRECISION, UPCAST_DOT
            )
            acc = fold_values(acc, p, alpha, v, DOT_PRECISION, UPCAST_DOT)
        page0, page1, pos0, tag0 = page1, page2, pos1, tag1
    return acc, m_i, l_i


@triton.jit
def decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr, block_table_ptr,
    cu_seqlens_q_ptr, cache_seqlens_ptr, q_pos_ptr, pos_cache_ptr, q_tag_ptr, tag_cache_ptr,
    stride_qm, stride_qh, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_om, stride_oh, max_pages,
    num_queries, heads, num_pages, page_size, num_splits, group, gsub, rule, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """q/out ``[Nq, H, D]``; K/V pools ``[num_pages, page_size, H_kv, D]`` (strides ``stride_kp``,
    ``stride_ks``, ``stride_kh``; head dim dense); pos/tag pools contiguous int32 ``[num_pages,
    page_size]``; block table contiguous int32 ``[B, max_pages]``; ``part_ptr``: the fp32 partials (see
    :func:`partial_pointers`; unused when ``num_splits == 1``). Cache lengths are clamped to
    ``[0, max_pages * page_size]`` and slots whose table entry is not a page of the pool are skipped
    (:func:`attend_paged_keys`), so bad metadata cannot read outside the tensors. ``HEAD_PAD``: the
    tiles' head axis, ``HEAD_DIM`` rounded up to a power of two (``attention_core.head_tile``)."""
    seq = tl.program_id(0)
    head_axis = tl.program_id(1)
    split = tl.program_id(2)
    head_chunks = tl.cdiv(group, gsub)
    kv_head = head_axis // head_chunks
    g0 = (head_axis % head_chunks) * gsub
    queries_per_tile = BLOCK_M // gsub

    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    length = tl.minimum(tl.maximum(tl.load(cache_seqlens_ptr + seq), 0), max_pages * page_size)
    key_begin, key_end = split_key_range(length, num_splits, split, BLOCK_N)
    k_base = k_cache_ptr + kv_head * stride_kh
    v_base = v_cache_ptr + kv_head * stride_vh
    table_row = block_table_ptr + seq.to(tl.int64) * max_pages
    for first_query in range(q_begin, q_end, queries_per_tile):
        query, head, valid = query_rows(first_query, q_end, kv_head, g0, group, gsub, BLOCK_M)
        q, q_pos, q_tag = load_query_tile(
            q_ptr, q_pos_ptr, q_tag_ptr, stride_qm, stride_qh, query, head, valid, HEAD_DIM, HEAD_PAD, USE_TAGS
        )
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_paged_keys(
            acc, m_i, l_i, q, q_pos, q_tag, valid,
            k_base, v_base, stride_kp, stride_ks, stride_vp, stride_vs,
            pos_cache_ptr, tag_cache_ptr, table_row, page_size, num_pages,
            key_begin, key_end, rule, qk_scale,
            BLOCK_N, HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
        )
        if num_splits == 1:
            store_rows(out_ptr, stride_om, stride_oh, query, head, valid, normalise(acc, l_i), HEAD_DIM, HEAD_PAD)
        else:
            # Every split writes its slice, even an empty one (m = -inf, l = 0), so the merge needs no mask.
            row = (split * num_queries + query).to(tl.int64) * heads + head
            part_acc_ptr, part_m_ptr, part_l_ptr = partial_pointers(part_ptr, num_splits * num_queries * heads, HEAD_DIM)
            tl.store(part_m_ptr + row, m_i, mask=valid)
            tl.store(part_l_ptr + row, l_i, mask=valid)
            offs_d, mask = head_tile(valid, HEAD_DIM, HEAD_PAD)
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d, acc, mask=mask)


@triton.jit
def combine_splits_kernel(
    part_ptr, out_ptr, stride_om, stride_oh, num_queries, heads, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Grid ``(Nq, H)``: merges the ``num_splits`` partials of one (query, head) and writes the output.
    The (query, head) is a one-row tile ``[1, HEAD_PAD]`` so that its loads and store take their
    head-dim mask from ``head_tile`` like every other tile (its row mask is a constant true, which
    Triton folds away)."""
    query = tl.program_id(0)
    head = tl.program_id(1)
    part_acc_ptr, part_m_ptr, part_l_ptr = partial_pointers(part_ptr, num_splits * num_queries * heads, HEAD_DIM)
    offs_d, mask = head_tile(tl.full([1], 1, tl.int1), HEAD_DIM, HEAD_PAD)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([1, HEAD_PAD], dtype=tl.float32)
    for split in range(num_splits):
        row = (split * num_queries + query).to(tl.int64) * heads + head
        m_s = tl.load(part_m_ptr + row)
        l_s = tl.load(part_l_ptr + row)
        acc_s = tl.load(part_acc_ptr + row * HEAD_DIM + offs_d, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # neither side saw a visible key
        a = tl.exp2(m - m_safe)
        b = tl.exp2(m_s - m_safe)
        l = l * a + l_s * b
        acc = acc * a + acc_s * b
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + query.to(tl.int64) * stride_om + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=mask)
