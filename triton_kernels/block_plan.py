"""Block lists for the prefill kernel (FlexAttention's design), computed once per forward from the
per-token metadata.

``block_plan_kernel``, grid ``(num_virtual_tiles,)`` (the prefill kernel's virtual query tiles,
``ragged.ragged_search``): the program of a tile reads its queries' positions and tags, then walks
the key blocks of its sequence, ``CHUNK`` blocks at a time, and classifies each block:

* *empty*: no (query, key) pair can be visible (``visibility.key_block_may_be_visible``, the
  conservative test the kernels used to run in their loop): listed nowhere, never read;
* *full*: every valid query of the tile sees every key of the block and the block lies wholly inside
  the sequence's keys (``visibility.key_block_fully_visible``): the prefill kernel folds it in with no
  predicate and no masks;
* *partial*: any other block: the prefill kernel evaluates the predicate per pair.

Under the ANCHORS rule (AnSAN) a query sees, outside its own sentence, only sinks and the anchors
of earlier sentences: one or two keys per sentence, scattered over every earlier block, which would
make every earlier block partial and the tile read all its keys. So the anchors and sinks of
sentences *outside* the tile's query sentences (``visibility.anchor_handled``) are taken out of the
blocks and read from a compact list of each sequence's anchor and sink key rows (``anchor_rows``,
built on the host by ``launch_plan.anchor_list``, as ``csrc/cpu/anchor_plan.h`` does for the CPU):

* a block is listed (full or partial) only if it may be visible *and* holds a key of one of the
  tile's sentences; a block whose keys all belong to other sentences holds no other visible key;
* a full block holds no anchor-handled key; the partial loop masks them out;
* the tile reads ``anchor_rows[counts[tile, 2] : counts[tile, 3]]``: the sequence's anchor and sink
  keys up to the end of its last block with a possibly visible pair (``anchor_start[r]`` is the
  number of anchor and sink keys in packed rows ``< r``), keeping the anchor-handled ones.

So every visible pair is counted exactly once, and an AnSAN tile reads its own sentences' blocks
plus the anchors before them.

Outputs (int32): ``full[tile, i]`` for ``i < counts[tile, 0]`` and ``partial[tile, i]`` for
``i < counts[tile, 1]`` hold the *first packed key row* of each listed block (key blocks start at the
sequence's first key row, ``cu_seqlens_k[b]``, every ``BLOCK_N`` rows), in increasing order; the rest
of each row is unwritten. ``counts`` is ``[num_virtual_tiles, 4]``: full count, partial count, and the
tile's range of the anchor list (empty unless the rule has ANCHORS and tags are read); tiles past
their sequence's last tile get zeros. The lists are ``[num_virtual_tiles, max_blocks]`` with
``max_blocks = cdiv(total_k, BLOCK_N)`` (no sequence has more key blocks than that), sizes from
shapes only, so computing the plan needs no host read of the lengths. A sequence whose
``cu_seqlens_k`` claims more blocks than that (bad metadata without the host value checks) has only
its first ``max_blocks`` blocks listed: the lists are never written out of bounds.

The queries of a tile are those of the prefill kernel's tile: ``queries_per_tile = BLOCK_M // gsub``
consecutive queries (see ``attention_core``); they are the same for every head of the tile, so one
plan serves all heads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .ragged import ragged_search
from .visibility import (
    INT32_MAX,
    RULE_ANCHORS,
    TAG_SENTENCE_SHIFT,
    anchor_handled,
    key_block_fully_visible,
    key_block_may_be_visible,
    query_full_summary,
    query_summary,
)


@triton.jit
def block_plan_kernel(
    cu_seqlens_q_ptr, cu_seqlens_k_ptr, q_pos_ptr, k_pos_ptr, q_tag_ptr, k_tag_ptr,
    anchor_start_ptr, full_ptr, partial_ptr, counts_ptr,
    batch, search_steps, queries_per_tile, max_blocks, rule,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, USE_TAGS: tl.constexpr,
):
    """cu_seqlens int32 ``[batch + 1]``; positions and tags int32 per packed row; outputs as in the
    module docstring. ``queries_per_tile <= BLOCK_M``."""
    tile = tl.program_id(0)
    seq = ragged_search(cu_seqlens_q_ptr, batch, tile, queries_per_tile, 1, search_steps)
    q_begin = tl.load(cu_seqlens_q_ptr + seq)
    q_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    first_query = q_begin + (tile - (q_begin // queries_per_tile + seq)) * queries_per_tile
    row = tile.to(tl.int64) * max_blocks
    n_full = tile * 0
    n_partial = tile * 0
    anchor_begin = tile * 0
    anchor_end = tile * 0
    if first_query < q_end:
        k_begin = tl.load(cu_seqlens_k_ptr + seq)
        k_end = tl.load(cu_seqlens_k_ptr + seq + 1)
        offs_m = tl.arange(0, BLOCK_M)
        query = first_query + offs_m
        valid = (offs_m < queries_per_tile) & (query < q_end)
        q_pos = tl.load(q_pos_ptr + query, mask=valid, other=0)
        if USE_TAGS:
            q_tag = tl.load(q_tag_ptr + query, mask=valid, other=0)
        else:
            q_tag = q_pos * 0
        q_max_pos, q_min_sentence, q_max_sentence = query_summary(q_pos, q_tag, valid, USE_TAGS)
        q_min_pos, q_any_anchor = query_full_summary(q_pos, q_tag, valid, USE_TAGS)
        num_blocks = tl.minimum(tl.cdiv(k_end - k_begin, BLOCK_N), max_blocks)
        if USE_TAGS:
            anchors_on = (rule & RULE_ANCHORS) != 0
        else:
            anchors_on = k_begin < 0  # false (untagged: plain causality), as a tensor
        last_row = k_begin  # the end of the last block with a possibly visible pair
        for chunk in range(0, num_blocks, CHUNK):
            block = chunk + tl.arange(0, CHUNK)  # [CHUNK] block numbers within the sequence
            start = k_begin + block * BLOCK_N
            offs_n = start[:, None] + tl.arange(0, BLOCK_N)[None, :]  # [CHUNK, BLOCK_N] key rows
            k_valid = (offs_n < k_end) & (block < num_blocks)[:, None]
            k_pos = tl.load(k_pos_ptr + offs_n, mask=k_valid, other=INT32_MAX)
            if USE_TAGS:
                k_tag = tl.load(k_tag_ptr + offs_n, mask=k_valid, other=0)
            else:
                k_tag = k_pos * 0
            may = key_block_may_be_visible(rule, q_max_pos, q_min_sentence, q_max_sentence, k_pos, k_tag, k_valid,
                                           USE_TAGS)
            full = may & key_block_fully_visible(rule, q_min_pos, q_min_sentence, q_max_sentence, q_any_anchor,
                                                 k_pos, k_tag, k_valid, USE_TAGS)
            if anchors_on:
                # AnSAN: a block's keys are seen through the block lists only if they are not
                # anchor-handled (visibility.anchor_handled: anchors and sinks of sentences the tile
                # does not share), which the prefill kernel reads from the compact anchor list. A block
                # with no key of the tile's sentences holds no other visible key: it is not listed.
                # A full block must hold no anchor-handled key (the full loop has no mask to leave
                # it out).
                handled = anchor_handled(rule, k_tag, q_min_sentence, q_max_sentence, USE_TAGS)
                any_handled = tl.max(tl.where(k_valid & handled, 1, 0), -1) > 0
                k_sentence = k_tag >> TAG_SENTENCE_SHIFT
                shared = k_valid & (k_sentence >= q_min_sentence) & (k_sentence <= q_max_sentence)
                any_shared = tl.max(tl.where(shared, 1, 0), -1) > 0
                last_row = tl.maximum(last_row, tl.max(tl.where(may, tl.minimum(start + BLOCK_N, k_end), k_begin), 0))
                may = may & any_shared
                full = full & may & (any_handled == 0)
            partial = may & (full == 0)
            # Append in block order: each listed block's slot is the count so far plus its rank among
            # this chunk's listed blocks (an inclusive prefix sum, minus one).
            full_i = full.to(tl.int32)
            partial_i = partial.to(tl.int32)
            tl.store(full_ptr + row + n_full + tl.cumsum(full_i, 0) - 1, start, mask=full)
            tl.store(partial_ptr + row + n_partial + tl.cumsum(partial_i, 0) - 1, start, mask=partial)
            n_full += tl.sum(full_i, 0)
            n_partial += tl.sum(partial_i, 0)
        if anchors_on:
            # The sequence's anchor and sink keys up to the last block with a possibly visible pair
            # (past it no key is visible): a range of the compact anchor list.
            anchor_begin = tl.load(anchor_start_ptr + k_begin)
            anchor_end = tl.load(anchor_start_ptr + last_row)
    tl.store(counts_ptr + 4 * tile, n_full)
    tl.store(counts_ptr + 4 * tile + 1, n_partial)
    tl.store(counts_ptr + 4 * tile + 2, anchor_begin)
    tl.store(counts_ptr + 4 * tile + 3, anchor_end)
