"""The visibility predicate of ``csrc/include/skiplayers/visibility.h``, restated for Triton.

Two ``@triton.jit`` helpers, used by the prefill and decode attention kernels:

* :func:`key_visible` evaluates the predicate elementwise on broadcast tiles (queries ``[M, 1]``,
  keys ``[1, N]``), exactly as ``skiplayers::key_visible`` does per pair;
* :func:`key_block_may_be_visible` summarises a loaded block of key *metadata* (min position,
  sentence range, min anchor sentence, any sink, any non-context key) and tests it against the
  query tile's summary like ``skiplayers::block_may_be_visible``, so a kernel can skip the block
  before loading its K/V. It is conservative: it may answer true for an invisible block, never false
  for a block with a visible pair.

The bit constants come from ``skiplayers.meta`` (which a CPU test checks against the header).
``USE_TAGS`` is a compile-time switch: when it is false the tags are all zero and every rule reduces
to plain causality by position (zero tags are non-context, non-anchor, all in sentence 0), so the
kernels neither load tags nor evaluate the tag terms.
"""

from __future__ import annotations

import triton
import triton.language as tl

from skiplayers import meta

TAG_CONTEXT = tl.constexpr(meta.TAG_CONTEXT)
TAG_ANCHOR = tl.constexpr(meta.TAG_ANCHOR)
TAG_SINK = tl.constexpr(meta.TAG_SINK)
TAG_SENTENCE_SHIFT = tl.constexpr(meta.TAG_SENTENCE_SHIFT)
RULE_HIDE_CONTEXT = tl.constexpr(int(meta.Rule.HIDE_CONTEXT))
RULE_ANCHORS = tl.constexpr(int(meta.Rule.ANCHORS))

INT32_MAX = tl.constexpr(2147483647)
INT32_MIN = tl.constexpr(-2147483647)  # -2**31 + 1: the literal stays an int32; real positions are >= 0


@triton.jit
def key_visible(rule, q_pos, q_tag, k_pos, k_tag, USE_TAGS: tl.constexpr):
    """Bool tile: may each query (``q_pos``/``q_tag`` broadcast as ``[M, 1]``) see each key (``[1, N]``)?"""
    visible = k_pos <= q_pos
    if USE_TAGS:
        hide_context = (rule & RULE_HIDE_CONTEXT) != 0
        anchors_off = (rule & RULE_ANCHORS) == 0
        visible = visible & (((k_tag & TAG_CONTEXT) == 0) | (hide_context == 0))
        q_sentence = q_tag >> TAG_SENTENCE_SHIFT
        k_sentence = k_tag >> TAG_SENTENCE_SHIFT
        earlier_anchor = ((q_tag & TAG_ANCHOR) == 0) & ((k_tag & TAG_ANCHOR) != 0) & (k_sentence < q_sentence)
        ansan = ((k_tag & TAG_SINK) != 0) | (k_sentence == q_sentence) | earlier_anchor
        visible = visible & (ansan | anchors_off)
    return visible


@triton.jit
def query_summary(q_pos, q_tag, valid, USE_TAGS: tl.constexpr):
    """(max position, min sentence, max sentence) over the valid rows of a query tile."""
    max_pos = tl.max(tl.where(valid, q_pos, INT32_MIN), 0)
    if USE_TAGS:
        sentence = q_tag >> TAG_SENTENCE_SHIFT
        min_sentence = tl.min(tl.where(valid, sentence, INT32_MAX), 0)
        max_sentence = tl.max(tl.where(valid, sentence, INT32_MIN), 0)
    else:
        min_sentence = max_pos * 0
        max_sentence = max_pos * 0
    return max_pos, min_sentence, max_sentence


@triton.jit
def key_block_may_be_visible(
    rule, q_max_pos, q_min_sentence, q_max_sentence, k_pos, k_tag, k_valid, USE_TAGS: tl.constexpr
):
    """May some query of the summarised tile see some valid key of this block (1-D ``k_pos``, ``k_tag``)?

    An all-invalid block (past the end of the keys) has min position INT32_MAX and is never visible.
    """
    may = tl.min(tl.where(k_valid, k_pos, INT32_MAX), 0) <= q_max_pos
    if USE_TAGS:
        any_non_context = tl.max(tl.where(k_valid & ((k_tag & TAG_CONTEXT) == 0), 1, 0), 0) > 0
        may = may & (any_non_context | ((rule & RULE_HIDE_CONTEXT) == 0))
        k_sentence = k_tag >> TAG_SENTENCE_SHIFT
        k_min_sentence = tl.min(tl.where(k_valid, k_sentence, INT32_MAX), 0)
        k_max_sentence = tl.max(tl.where(k_valid, k_sentence, INT32_MIN), 0)
        k_min_anchor_sentence = tl.min(tl.where(k_valid & ((k_tag & TAG_ANCHOR) != 0), k_sentence, INT32_MAX), 0)
        any_sink = tl.max(tl.where(k_valid & ((k_tag & TAG_SINK) != 0), 1, 0), 0) > 0
        overlap = (k_min_sentence <= q_max_sentence) & (q_min_sentence <= k_max_sentence)
        earlier_anchor = k_min_anchor_sentence < q_max_sentence
        may = may & (any_sink | overlap | earlier_anchor | ((rule & RULE_ANCHORS) == 0))
    return may
