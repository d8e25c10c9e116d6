"""Fused prefill attention over packed ragged batches (the ``varlen_attention`` op), one kernel.

Grid ``(total_q // queries_per_tile + batch, kv_heads * head_chunks)``: axis 0 enumerates *virtual*
query tiles (``ragged.ragged_search``), so the grid depends only on tensor shapes (no host sync to
find the longest sequence); programs whose virtual tile lies past their sequence's last tile exit at
once. Axis 1 picks the KV head and, when a GQA group has more heads than ``BLOCK_M`` rows, the chunk
of the group (see ``attention_core`` for the row layout). Each program walks its sequence's keys in
``BLOCK_N`` blocks, skipping blocks that the metadata summary rules out (causality by absolute
position, hidden context, the AnSAN rule) before loading their K/V.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_core import attend_key_range, load_query_tile, normalise, query_rows, store_rows
from .ragged import ragged_search


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, q_pos_ptr, k_pos_ptr, q_tag_ptr, k_tag_ptr,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_om, stride_oh,
    batch, search_steps, group, gsub, rule, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """q ``[Nq, H, D]``, k/v ``[Nk, H_kv, D]``, out ``[Nq, H, D]`` (head dim dense, other strides free);
    cu_seqlens int32 ``[batch + 1]``; positions and tags int32 per packed row. ``HEAD_PAD``: the tiles'
    head axis, ``HEAD_DIM`` rounded up to a power of two (``attention_core.head_tile``)."""
    virtual_tile = tl.program_id(0)
    head_axis = tl.program_id(1)
    queries_per_tile = BLOCK_M // gsub
    head_chunks = tl.cdiv(group, gsub)
    kv_head = head_axis // head_chunks
    g0 = (head_axis % head_chunks) * gsub

    seq = ragged_search(cu_seqlens_q_ptr, batch, virtual_tile, queries_per_tile, 1, search_steps)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    first_query = q_begin + (virtual_tile - (q_begin // queries_per_tile + seq)) * queries_per_tile
    if first_query < q_end:
        k_begin = tl.load(cu_seqlens_k_ptr + seq)
        k_end = tl.load(cu_seqlens_k_ptr + seq + 1)
        query, head, valid = query_rows(first_query, q_end, kv_head, g0, group, gsub, BLOCK_M)
        q, q_pos, q_tag = load_query_tile(
            q_ptr, q_pos_ptr, q_tag_ptr, stride_qm, stride_qh, query, head, valid, HEAD_DIM, HEAD_PAD, USE_TAGS
        )
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_key_range(
            acc, m_i, l_i, q, q_pos, q_tag, valid,
            k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh, stride_kn, stride_vn,
            k_pos_ptr, k_tag_ptr, 1,
            k_begin, k_end, rule, qk_scale,
            BLOCK_N, HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
        )
        store_rows(out_ptr, stride_om, stride_oh, query, head, valid, normalise(acc, l_i), HEAD_DIM, HEAD_PAD)
