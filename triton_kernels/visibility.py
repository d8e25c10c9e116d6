"""The visibility predicate of ``csrc/include/skiplayers/visibility.h``, restated for Triton.

Two ``@triton.jit`` helpers, used by the prefill and decode attention kernels:

* :func:`key_visible` evaluates the predicate elementwise on broadcast tiles (queries ``[M, 1]``,
  keys ``[1, N]``), exactly as ``skiplayers::key_visible`` does per pair;
* :func:`key_block_may_be_visible` summarises a loaded block of key *metadata* (min position,
  sentence range, min anchor sentence, any sink, any non-context key) and tests it against the
  query tile's summary like ``skiplayers::block_may_be_visible``, so a kernel can skip the block
  before loading its K/V. It is conservative: it may answer true for an invisible block, never false
  for a block with a visible pair;
* :func:`key_block_fully_visible` is the other side of the same summary: may every valid query of the
  tile see every key of the block (so a kernel may run the block without the predicate and without
  masks)? Conservative the other way: it may answer false for a fully visible block, never true for
  a block with an invisible pair or a missing key.

Both block tests reduce over the *last* axis of ``k_pos``/``k_tag``/``k_valid``, so they take one
block ``[BLOCK_N]`` (the kernels' loops) or a stack of blocks ``[CHUNK, BLOCK_N]`` (the block plan,
``block_plan.py``, classifies ``CHUNK`` blocks at a time) and answer per block.

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
    """May some query of the summarised tile see some valid key of this block (``k_pos``, ``k_tag``,
    ``k_valid`` ``[..., BLOCK_N]``; one answer per block)?

    An all-invalid block (past the end of the keys) has min position INT32_MAX and is never visible.
    """
    may = tl.min(tl.where(k_valid, k_pos, INT32_MAX), -1) <= q_max_pos
    if USE_TAGS:
        any_non_context = tl.max(tl.where(k_valid & ((k_tag & TAG_CONTEXT) == 0), 1, 0), -1) > 0
        may = may & (any_non_context | ((rule & RULE_HIDE_CONTEXT) == 0))
        k_sentence = k_tag >> TAG_SENTENCE_SHIFT
        k_min_sentence = tl.min(tl.where(k_valid, k_sentence, INT32_MAX), -1)
        k_max_sentence = tl.max(tl.where(k_valid, k_sentence, INT32_MIN), -1)
        k_min_anchor_sentence = tl.min(tl.where(k_valid & ((k_tag & TAG_ANCHOR) != 0), k_sentence, INT32_MAX), -1)
        any_sink = tl.max(tl.where(k_valid & ((k_tag & TAG_SINK) != 0), 1, 0), -1) > 0
        overlap = (k_min_sentence <= q_max_sentence) & (q_min_sentence <= k_max_sentence)
        earlier_anchor = k_min_anchor_sentence < q_max_sentence
        may = may & (any_sink | overlap | earlier_anchor | ((rule & RULE_ANCHORS) == 0))
    return may


@triton.jit
def query_full_summary(q_pos, q_tag, valid, USE_TAGS: tl.constexpr):
    """(min position, any anchor) over the valid rows of a query tile: what
    :func:`key_block_fully_visible` needs beyond :func:`query_summary`."""
    min_pos = tl.min(tl.where(valid, q_pos, INT32_MAX), 0)
    if USE_TAGS:
        any_anchor = tl.max(tl.where(valid & ((q_tag & TAG_ANCHOR) != 0), 1, 0), 0) > 0
    else:
        any_anchor = min_pos < INT32_MIN  # false (untagged queries are no anchors), as a tensor
    return min_pos, any_anchor


@triton.jit
def key_block_fully_visible(
    rule, q_min_pos, q_min_sentence, q_max_sentence, q_any_anchor, k_pos, k_tag, k_valid, USE_TAGS: tl.constexpr
):
    """Is every (valid query of the summarised tile, key of the block) pair visible, and is every key
    of the block valid (``k_pos``, ``k_tag``, ``k_valid`` ``[..., BLOCK_N]``; one answer per block)?

    True means a kernel may fold the block in with no predicate and no masks. Each clause below is a
    sufficient condition for one term of ``key_visible`` to hold for *all* pairs; a block that fails
    a clause may still be fully visible (then it is run as a partial block: correct, only slower).
    """
    # Every key exists: the mask-free loop reads BLOCK_N rows, so none may lie past the sequence's
    # keys (nor be padding that the predicate would have given probability 0).
    full = tl.min(tl.where(k_valid, 1, 0), -1) > 0
    # Causality by position, for all pairs: the latest key is no later than the earliest query.
    # Positions are arbitrary per row (not the row index), hence max/min over the rows, not indices.
    full = full & (tl.max(tl.where(k_valid, k_pos, INT32_MIN), -1) <= q_min_pos)
    if USE_TAGS:
        # HIDE_CONTEXT: a context key is invisible to every query, so one context key rules it out.
        any_context = tl.max(tl.where(k_valid & ((k_tag & TAG_CONTEXT) != 0), 1, 0), -1) > 0
        full = full & ((any_context == 0) | ((rule & RULE_HIDE_CONTEXT) == 0))
        # ANCHORS. A sink key is visible to every query (the causal term already holds): no condition.
        # A non-sink key is visible to query q iff it is in q's sentence, or it is an anchor of an
        # earlier sentence and q is no anchor. Per kind of non-sink key:
        k_sentence = k_tag >> TAG_SENTENCE_SHIFT
        not_sink = k_valid & ((k_tag & TAG_SINK) == 0)
        is_anchor = (k_tag & TAG_ANCHOR) != 0
        # - a non-anchor key is seen only from its own sentence: all those keys and all queries must
        #   share one sentence (or there are no such keys: min > max);
        plain = not_sink & (is_anchor == 0)
        plain_min = tl.min(tl.where(plain, k_sentence, INT32_MAX), -1)
        plain_max = tl.max(tl.where(plain, k_sentence, INT32_MIN), -1)
        one_sentence = (q_min_sentence == q_max_sentence) & (plain_min == q_min_sentence) & (plain_max == q_max_sentence)
        plain_ok = (plain_min > plain_max) | one_sentence
        # - an anchor key of sentence s is seen by a non-anchor query of sentence >= s (s == its own,
        #   or s earlier); an anchor query sees only its own sentence. So: no anchor query and every
        #   anchor key's sentence <= the earliest query sentence, or all of them in the one sentence
        #   of all queries (no anchor keys: min > max).
        anchor = not_sink & is_anchor
        anchor_min = tl.min(tl.where(anchor, k_sentence, INT32_MAX), -1)
        anchor_max = tl.max(tl.where(anchor, k_sentence, INT32_MIN), -1)
        earlier = (q_any_anchor == 0) & (anchor_max <= q_min_sentence)
        same = (q_min_sentence == q_max_sentence) & (anchor_min == q_min_sentence) & (anchor_max == q_max_sentence)
        anchor_ok = (anchor_min > anchor_max) | earlier | same
        full = full & ((plain_ok & anchor_ok) | ((rule & RULE_ANCHORS) == 0))
    return full


@triton.jit
def anchor_handled(rule, k_tag, q_min_sentence, q_max_sentence, USE_TAGS: tl.constexpr):
    """Under ANCHORS: is the key an anchor or sink of a sentence outside the tile's query sentences
    ``[q_min_sentence, q_max_sentence]``? Such keys are the only visible ones of blocks whose
    sentences the tile does not share (a non-anchor key is seen only from its own sentence), so the
    prefill kernel reads them from each sequence's compact list of anchor and sink keys instead of
    from their blocks (``block_plan.py``); the block loops leave them out, so no key counts twice."""
    if USE_TAGS:
        k_sentence = k_tag >> TAG_SENTENCE_SHIFT
        outside = (k_sentence < q_min_sentence) | (k_sentence > q_max_sentence)
        summary = (k_tag & (TAG_ANCHOR | TAG_SINK)) != 0
        handled = outside & summary & ((rule & RULE_ANCHORS) != 0)
    else:
        handled = k_tag != k_tag  # false: untagged keys are plain causal
    return handled
