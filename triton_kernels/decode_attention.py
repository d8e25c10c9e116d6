"""Decode attention against per-sequence KV caches (the ``cache_attention`` op): split-K
(flash-decoding) with a separate reduction kernel.

``decode_attention_kernel``, grid ``(batch, kv_heads * head_chunks, num_splits)``: the program of
split ``s`` folds cache slots ``split_key_range(cache_seqlens[b], num_splits, s)`` into an online
softmax for every query tile of sequence b (usually one tile: a few new queries times the GQA group),
so one long sequence is spread over ``num_splits`` programs instead of serialising the batch.
With one split it writes the normalised output; otherwise it writes the un-normalised partial
``(acc, m, l)`` of its slice, and ``combine_splits_kernel`` merges the slices per (query, head) with
the base-2 rule of ``skiplayers::merge_softmax_stats``. The split boundaries fall on ``BLOCK_N``
multiples and every slice is merged exactly, so the result does not depend on ``num_splits``
beyond floating-point reassociation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_core import attend_key_range, load_query_tile, normalise, query_rows, store_rows
from .ragged import split_key_range


@triton.jit
def partial_pointers(part_ptr, rows, HEAD_DIM: tl.constexpr):
    """The one fp32 partials buffer (one allocation per call): ``acc [rows, HEAD_DIM]``, then ``m [rows]``,
    then ``l [rows]``, with ``rows = num_splits * Nq * H`` ordered (split, query, head)."""
    rows64 = tl.full([], rows, tl.int64)
    return part_ptr, part_ptr + rows64 * HEAD_DIM, part_ptr + rows64 * (HEAD_DIM + 1)


@triton.jit
def decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_ptr,
    cu_seqlens_q_ptr, cache_seqlens_ptr, q_pos_ptr, pos_cache_ptr, q_tag_ptr, tag_cache_ptr,
    stride_qm, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_om, stride_oh, stride_pb, stride_ps,
    num_queries, heads, capacity, num_splits, group, gsub, rule, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """q/out ``[Nq, H, D]``; caches ``[B, S_cap, H_kv, D]``; pos/tag caches int32 ``[B, S_cap]`` (same
    strides, ``stride_pb``/``stride_ps``); ``part_ptr``: the fp32 partials (see :func:`partial_pointers`;
    unused when ``num_splits == 1``). Cache lengths are clamped to ``[0, capacity]`` so that a bad
    length cannot read outside the buffers."""
    seq = tl.program_id(0)
    head_axis = tl.program_id(1)
    split = tl.program_id(2)
    head_chunks = tl.cdiv(group, gsub)
    kv_head = head_axis // head_chunks
    g0 = (head_axis % head_chunks) * gsub
    queries_per_tile = BLOCK_M // gsub

    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    length = tl.minimum(tl.maximum(tl.load(cache_seqlens_ptr + seq), 0), capacity)
    key_begin, key_end = split_key_range(length, num_splits, split, BLOCK_N)
    seq64 = seq.to(tl.int64)
    k_base = k_cache_ptr + seq64 * stride_kb + kv_head * stride_kh
    v_base = v_cache_ptr + seq64 * stride_vb + kv_head * stride_vh
    meta_offset = seq64 * stride_pb
    for first_query in range(q_begin, q_end, queries_per_tile):
        query, head, valid = query_rows(first_query, q_end, kv_head, g0, group, gsub, BLOCK_M)
        q, q_pos, q_tag = load_query_tile(
            q_ptr, q_pos_ptr, q_tag_ptr, stride_qm, stride_qh, query, head, valid, HEAD_DIM, USE_TAGS
        )
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_key_range(
            acc, m_i, l_i, q, q_pos, q_tag, valid,
            k_base, v_base, stride_ks, stride_vs,
            pos_cache_ptr + meta_offset, tag_cache_ptr + meta_offset, stride_ps,
            key_begin, key_end, rule, qk_scale,
            BLOCK_N, HEAD_DIM, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
        )
        if num_splits == 1:
            store_rows(out_ptr, stride_om, stride_oh, query, head, valid, normalise(acc, l_i), HEAD_DIM)
        else:
            # Every split writes its slice, even an empty one (m = -inf, l = 0), so the merge needs no mask.
            row = (split * num_queries + query).to(tl.int64) * heads + head
            part_acc_ptr, part_m_ptr, part_l_ptr = partial_pointers(part_ptr, num_splits * num_queries * heads, HEAD_DIM)
            tl.store(part_m_ptr + row, m_i, mask=valid)
            tl.store(part_l_ptr + row, l_i, mask=valid)
            offs_d = tl.arange(0, HEAD_DIM)
            tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=valid[:, None])


@triton.jit
def combine_splits_kernel(
    part_ptr, out_ptr, stride_om, stride_oh, num_queries, heads, num_splits, HEAD_DIM: tl.constexpr,
):
    """Grid ``(Nq, H)``: merges the ``num_splits`` partials of one (query, head) and writes the output."""
    query = tl.program_id(0)
    head = tl.program_id(1)
    part_acc_ptr, part_m_ptr, part_l_ptr = partial_pointers(part_ptr, num_splits * num_queries * heads, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for split in range(num_splits):
        row = (split * num_queries + query).to(tl.int64) * heads + head
        m_s = tl.load(part_m_ptr + row)
        l_s = tl.load(part_l_ptr + row)
        acc_s = tl.load(part_acc_ptr + row * HEAD_DIM + offs_d)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # neither side saw a visible key
        a = tl.exp2(m - m_safe)
        b = tl.exp2(m_s - m_safe)
        l = l * a + l_s * b
        acc = acc * a + acc_s * b
        m = m_new
    out = acc / tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + query.to(tl.int64) * stride_om + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
