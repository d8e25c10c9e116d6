"""Fused prefill attention over packed ragged batches (the ``varlen_attention`` op), driven by the
block lists of ``block_plan.py`` (FlexAttention's design).

Grid ``(num_virtual_tiles * head_programs,)``, ``head_programs = kv_heads * head_chunks``: the
virtual query tiles (``ragged.ragged_search``) make the grid depend only on tensor shapes (no host
sync to find the longest sequence); programs whose virtual tile lies past their sequence's last tile
exit at once. The head program picks the KV head and, when a GQA group has more heads than
``BLOCK_M`` rows, the chunk of the group (see ``attention_core`` for the row layout). Programs are
numbered *heaviest first*: program 0 takes the last virtual tile, with every head of a tile next to
each other, so under causal attention the tiles with the most key blocks start first and the short
ones fill the tail of the launch.

Per program: the query tile is loaded (in its own dtype; the fp32 scores are scaled by ``scale *
log2(e)``, see ``attention_core``); then the tile's *full* key blocks are folded in by a loop with
no predicate, no masks and no loads behind a branch (``attend_full_blocks``, which Triton's
pipeliner multi-buffers), then its *partial* blocks with the predicate per pair
(``attend_partial_blocks``), then, under ANCHORS, the anchor and sink keys of other sentences from
the compact anchor list (``attend_anchor_keys``; see ``block_plan.py``). The loop bounds are the
plan's counts, so a causal tile stops at its causal limit, and blocks that the plan left out (no
visible pair, or under ANCHORS no key of the tile's sentences) are never read.

Head dims 32, 64, 96, 128, 256: every tile's head axis is ``HEAD_PAD`` columns (``HEAD_DIM`` rounded
up to a power of two) and every load and store of the three loops, the query load and the output
store take their head-axis offsets and masks from ``attention_core.head_tile``. For the power-of-two
dims the full-block loop has no mask at all (the pipelined ``cp.async`` loop, with ``wgmma`` on
sm_90); for 96 (padded to 128) its K/V loads take the constant column mask ``column < 96`` only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attention_core import (
    attend_anchor_keys,
    attend_full_blocks,
    attend_partial_blocks,
    load_query_tile,
    normalise,
    query_rows,
    store_rows,
)
from .ragged import ragged_search
from .visibility import query_summary


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, q_pos_ptr, k_pos_ptr, q_tag_ptr, k_tag_ptr,
    full_ptr, partial_ptr, counts_ptr, anchor_rows_ptr,
    stride_qm, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_om, stride_oh,
    batch, search_steps, group, gsub, head_programs, max_blocks, rule, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ANCHOR_LIST: tl.constexpr,
):
    """q ``[Nq, H, D]``, k/v ``[Nk, H_kv, D]``, out ``[Nq, H, D]`` (head dim dense, other strides free);
    cu_seqlens int32 ``[batch + 1]``; positions and tags int32 per packed row; the block plan
    (``full``/``partial`` ``[num_virtual_tiles, max_blocks]``, ``counts`` ``[num_virtual_tiles, 4]``,
    ``anchor_rows``) computed by ``block_plan_kernel`` for this tile shape. ``HEAD_PAD``: the tiles'
    head axis, ``HEAD_DIM`` rounded up to a power of two (``attention_core.head_tile``)."""
    program = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first (module docstring)
    virtual_tile = program // head_programs
    head_axis = program % head_programs
    queries_per_tile = BLOCK_M // gsub
    head_chunks = tl.cdiv(group, gsub)
    kv_head = head_axis // head_chunks
    g0 = (head_axis % head_chunks) * gsub

    seq = ragged_search(cu_seqlens_q_ptr, batch, virtual_tile, queries_per_tile, 1, search_steps)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    first_query = q_begin + (virtual_tile - (q_begin // queries_per_tile + seq)) * queries_per_tile
    if first_query < q_end:
        k_end = tl.load(cu_seqlens_k_ptr + seq + 1)
        query, head, valid = query_rows(first_query, q_end, kv_head, g0, group, gsub, BLOCK_M)
        q, q_pos, q_tag = load_query_tile(
            q_ptr, q_pos_ptr, q_tag_ptr, stride_qm, stride_qh, query, head, valid, HEAD_DIM, HEAD_PAD, USE_TAGS
        )
        n_full = tl.load(counts_ptr + 4 * virtual_tile)
        n_partial = tl.load(counts_ptr + 4 * virtual_tile + 1)
        if ANCHOR_LIST:  # the tile's sentence range decides which keys the anchor list serves
            _, q_min_sentence, q_max_sentence = query_summary(q_pos, q_tag, valid, USE_TAGS)
        else:  # unused
            q_min_sentence = n_full
            q_max_sentence = n_full
        lists = virtual_tile.to(tl.int64) * max_blocks
        k_head = k_ptr + kv_head * stride_kh
        v_head = v_ptr + kv_head * stride_vh
        acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_full_blocks(
            acc, m_i, l_i, q, k_head, v_head, stride_kn, stride_vn, full_ptr + lists, n_full, qk_scale,
            BLOCK_N, HEAD_DIM, HEAD_PAD, DOT_PRECISION, UPCAST_DOT,
        )
        acc, m_i, l_i = attend_partial_blocks(
            acc, m_i, l_i, q, q_pos, q_tag, k_head, v_head, stride_kn, stride_vn, k_pos_ptr, k_tag_ptr,
            partial_ptr + lists, n_partial, k_end, rule, q_min_sentence, q_max_sentence, qk_scale,
            BLOCK_N, HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT, ANCHOR_LIST,
        )
        if ANCHOR_LIST:
            acc, m_i, l_i = attend_anchor_keys(
                acc, m_i, l_i, q, q_pos, q_tag, k_head, v_head, stride_kn, stride_vn, k_pos_ptr, k_tag_ptr,
                anchor_rows_ptr, tl.load(counts_ptr + 4 * virtual_tile + 2), tl.load(counts_ptr + 4 * virtual_tile + 3),
                rule, q_min_sentence, q_max_sentence, qk_scale,
                BLOCK_N, HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
            )
        store_rows(out_ptr, stride_om, stride_oh, query, head, valid, normalise(acc, l_i), HEAD_DIM, HEAD_PAD)
