"""The attention inner loop shared by the prefill and decode kernels (``@triton.jit`` helpers only).

Tiling, GQA: one program owns one KV head and a tile of ``BLOCK_M`` *rows*, each row a (query,
query head) pair of that KV head's group: row ``r`` is query ``first + r // gsub``, head
``g0 + r % gsub`` of the group (``gsub = min(group, BLOCK_M)`` heads per tile, ``BLOCK_M // gsub``
queries per tile). The group's heads therefore share every K/V tile that is loaded, and one query
with a GQA group of 8 fills 8 rows of a 16-row decode tile instead of 8 programs.

Online softmax in base 2: every kernel multiplies the fp32 scores by ``qk_scale = scale * log2(e)``
(the query is *not* pre-scaled: rounding ``q * qk_scale`` back to 16 bits perturbs every score by
up to 2^-11 of its size, which the fuzz caught as an fp16 error over the tolerance bound at
``scale = 1``, head dim 128); ``m`` is the running row max and
``l`` the running sum of ``exp2(s - m)``. A row that has seen no visible key keeps ``m = -inf`` and
``l = 0`` (its accumulator stays 0), and :func:`normalise` outputs zeros for it.

Head dims that are not a power of two (96): ``tl.arange`` needs a power of two, so every tile's head
axis has ``HEAD_PAD`` columns (``HEAD_DIM`` rounded up; ``configs.head_pad``) and :func:`head_tile`
masks columns ``>= HEAD_DIM`` off every load and store. The padded columns of q, K and V load as
zeros, so they add nothing to ``q @ k^T`` and leave the accumulator's padded columns zero. With
``HEAD_PAD == HEAD_DIM`` no head-dim mask is emitted at all: the prefill's full-block loop
(:func:`attend_full_blocks`) then loads K/V with no mask whatsoever, as before padding existed; its
partial and anchor loops (:func:`attend_partial_blocks`, :func:`attend_anchor_keys`), the query
load, the output store and the decode kernel's loads keep their row masks only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .visibility import INT32_MAX, anchor_handled, key_visible


@triton.jit
def query_rows(first_query, query_end, kv_head, g0, group, gsub, BLOCK_M: tl.constexpr):
    """Per row of a tile: (query index, query head, valid). See the module docstring for the layout."""
    rows = tl.arange(0, BLOCK_M)
    query = first_query + rows // gsub
    g = g0 + rows % gsub
    valid = (rows // gsub < BLOCK_M // gsub) & (query < query_end) & (g < group)
    return query, kv_head * group + g, valid


@triton.jit
def head_tile(row_ok, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Column offsets ``[1, HEAD_PAD]`` and the mask of a ``[R, HEAD_PAD]`` tile of head-dim rows
    whose rows ``row_ok`` (``[R]``) hold data: ``row_ok[:, None]`` (``[R, 1]``) when ``HEAD_PAD ==
    HEAD_DIM``, so power-of-two kernels get no head-dim mask; else also ``column < HEAD_DIM``
    (``[R, HEAD_PAD]``). Every load and store of q, K, V, the output and the partials takes its
    offsets and mask from here; masked loads give 0 (see the module docstring). The prefill's
    full-block loop, whose rows all exist, passes all-true rows and drops the mask altogether when
    ``HEAD_PAD == HEAD_DIM`` (:func:`attend_full_blocks`)."""
    offs_d = tl.arange(0, HEAD_PAD)[None, :]
    if HEAD_PAD == HEAD_DIM:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)
    return offs_d, mask


@triton.jit
def load_query_tile(
    q_ptr, q_pos_ptr, q_tag_ptr, stride_qm, stride_qh, query, head, valid,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr,
):
    """The tile's query vectors ``[BLOCK_M, HEAD_PAD]`` (zero past ``HEAD_DIM``) and per-row position and tag."""
    offs_d, mask = head_tile(valid, HEAD_DIM, HEAD_PAD)
    ptrs = q_ptr + query.to(tl.int64)[:, None] * stride_qm + head[:, None] * stride_qh + offs_d
    q = tl.load(ptrs, mask=mask, other=0.0)
    q_pos = tl.load(q_pos_ptr + query, mask=valid, other=0)
    if USE_TAGS:
        q_tag = tl.load(q_tag_ptr + query, mask=valid, other=0)
    else:
        q_tag = q_pos * 0
    return q, q_pos, q_tag


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``tl.dot`` with fp32 accumulation. ``UPCAST_DOT`` is for the interpreter only: it stores bfloat16
    as uint16 and its ``tl.dot`` multiplies the bit patterns (triton-lang/triton#11584, unsupported in
    3.8), so the launchers set it for bfloat16 under ``TRITON_INTERPRET=1``. The upcast computes the
    same products of bf16 values in fp32 as the tensor cores do; compiled kernels never set it."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def online_softmax(m_i, l_i, s):
    """Folds the base-2 scores ``s`` ``[BLOCK_M, BLOCK_N]`` (already scaled; ``-inf`` where a key is
    not visible) into the running statistics: returns ``(p, alpha, m_new, l_new)``; the caller
    finishes with :func:`fold_values`."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def softmax_step(
    m_i, l_i, q, k, q_pos, q_tag, k_pos, k_tag, k_valid, rule, qk_scale,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The scores of one loaded key block (``k`` ``[BLOCK_N, HEAD_PAD]``, per-key ``k_pos``, ``k_tag``,
    ``k_valid``) against the query tile, folded into the running softmax statistics: returns
    ``(p, alpha, m_new, l_new)``; the caller finishes with ``acc * alpha[:, None] + p @ v``
    (:func:`fold_values`). Invalid or invisible keys get probability 0. ``qk_scale`` multiplies the
    fp32 scores (``scale * log2(e)``, see the module docstring)."""
    s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
    return online_softmax(m_i, l_i, mask_scores(s, rule, q_pos, q_tag, k_pos, k_tag, k_valid, USE_TAGS))


@triton.jit
def mask_scores(s, rule, q_pos, q_tag, k_pos, k_tag, k_valid, USE_TAGS: tl.constexpr):
    """``s`` where key j is valid and visible to query i (the predicate per pair), ``-inf`` elsewhere."""
    visible = key_visible(rule, q_pos[:, None], q_tag[:, None], k_pos[None, :], k_tag[None, :], USE_TAGS)
    return tl.where(visible & k_valid[None, :], s, float("-inf"))


@triton.jit
def fold_values(acc, p, alpha, v, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc * alpha[:, None] + p @ v`` (the second half of an online-softmax step)."""
    return acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def attend_full_blocks(
    acc, m_i, l_i, q, k_ptr, v_ptr, stride_k, stride_v, list_ptr, count, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Folds the ``count`` *full* key blocks listed at ``list_ptr`` (the first packed key row of each,
    ``block_plan.py``) into ``(acc, m_i, l_i)``; ``qk_scale`` scales the fp32 scores.

    Every (query, key) pair of a full block is visible and all its ``BLOCK_N`` keys exist, so the loop
    has no predicate, no masks and no branch around its loads: Triton's software pipeliner
    multi-buffers the K/V loads (``cp.async`` into shared memory, ``num_stages`` buffers). The list
    entry of the *next* block is read one iteration ahead, so a block's K/V addresses are loop-carried
    values rather than the result of a load in the same iteration: with that, Triton 3.8 keeps the
    next block's copies in flight while this block computes (``async_wait {num = 2}`` in the sm_80 and
    sm_90 TTGIR with ``num_stages = 3``; reading the entry in the iteration that uses it gave
    ``num = 0``, a wait for the copy just issued). The scores are finite, so no row's max stays
    ``-inf`` after the first block.

    Head axis (:func:`head_tile`, every row present): with ``HEAD_PAD == HEAD_DIM`` (32, 64, 128, 256)
    the K/V loads take no mask at all, so the loop above is exactly the mask-free one; with a padded
    head axis (96) they take the column mask ``column < HEAD_DIM`` only (a compile-time constant
    pattern, the same for every block; the padded columns load as zeros).
    """
    offs_d, d_mask = head_tile(tl.full([BLOCK_N], 1, tl.int1), HEAD_DIM, HEAD_PAD)
    start = tl.load(list_ptr, mask=count > 0, other=0)
    for i in range(0, count):
        rows = (start + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None]
        start = tl.load(list_ptr + i + 1, mask=i + 1 < count, other=0)  # read ahead (docstring)
        if HEAD_PAD == HEAD_DIM:
            k = tl.load(k_ptr + rows * stride_k + offs_d)
        else:
            k = tl.load(k_ptr + rows * stride_k + offs_d, mask=d_mask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
        p, alpha, m_i, l_i = online_softmax(m_i, l_i, s)
        if HEAD_PAD == HEAD_DIM:
            v = tl.load(v_ptr + rows * stride_v + offs_d)
        else:
            v = tl.load(v_ptr + rows * stride_v + offs_d, mask=d_mask, other=0.0)
        acc = fold_values(acc, p, alpha, v, DOT_PRECISION, UPCAST_DOT)
    return acc, m_i, l_i


@triton.jit
def fold_masked_keys(
    acc, m_i, l_i, q, q_pos, q_tag, k_ptr, v_ptr, stride_k, stride_v, key_rows, k_pos, k_tag, k_valid, rule, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """Folds the keys at packed rows ``key_rows`` (``[BLOCK_N]``; K of row ``j`` at ``k_ptr + j *
    stride_k``, likewise V; metadata ``k_pos``, ``k_tag`` already loaded) into ``(acc, m_i, l_i)``,
    with the predicate per (query, key) pair; keys not ``k_valid`` are neither read nor counted. The
    step of the partial-block and anchor loops; ``qk_scale`` scales the fp32 scores before the
    predicate masks them (so a masked score is ``-inf`` whatever the scale's sign). K/V masks from
    :func:`head_tile`."""
    rows = key_rows.to(tl.int64)[:, None]
    offs_d, kv_mask = head_tile(k_valid, HEAD_DIM, HEAD_PAD)
    k = tl.load(k_ptr + rows * stride_k + offs_d, mask=kv_mask, other=0.0)
    s = mask_scores(mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale, rule, q_pos, q_tag, k_pos, k_tag, k_valid,
                    USE_TAGS)
    p, alpha, m_i, l_i = online_softmax(m_i, l_i, s)
    v = tl.load(v_ptr + rows * stride_v + offs_d, mask=kv_mask, other=0.0)
    return fold_values(acc, p, alpha, v, DOT_PRECISION, UPCAST_DOT), m_i, l_i


@triton.jit
def attend_partial_blocks(
    acc, m_i, l_i, q, q_pos, q_tag,
    k_ptr, v_ptr, stride_k, stride_v, k_pos_ptr, k_tag_ptr, list_ptr, count, key_end, rule,
    q_min_sentence, q_max_sentence, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ANCHOR_LIST: tl.constexpr,
):
    """Folds the ``count`` *partial* key blocks listed at ``list_ptr`` into ``(acc, m_i, l_i)``,
    evaluating the predicate per (query, key) pair. The loads are unconditional,
    masked only by the sequence's key range (``[start, key_end)``): the block may hold invisible
    keys, which get probability 0. Key ``j`` lives at ``k_ptr + j * stride_k`` (this KV head, head dim
    dense; likewise V) and its metadata at ``k_pos_ptr + j``, ``k_tag_ptr + j``. The K/V masks come
    from :func:`head_tile` (rows ``k_valid``; plus ``column < HEAD_DIM`` when the head axis is padded).
    """
    start = tl.load(list_ptr, mask=count > 0, other=0)
    for i in range(0, count):
        offs_n = start + tl.arange(0, BLOCK_N)
        start = tl.load(list_ptr + i + 1, mask=i + 1 < count, other=0)  # read ahead: see attend_full_blocks
        k_valid = offs_n < key_end
        k_pos = tl.load(k_pos_ptr + offs_n, mask=k_valid, other=INT32_MAX)
        if USE_TAGS:
            k_tag = tl.load(k_tag_ptr + offs_n, mask=k_valid, other=0)
            if ANCHOR_LIST:
                k_valid = k_valid & (anchor_handled(rule, k_tag, q_min_sentence, q_max_sentence, USE_TAGS) == 0)
        else:
            k_tag = k_pos * 0
        acc, m_i, l_i = fold_masked_keys(
            acc, m_i, l_i, q, q_pos, q_tag, k_ptr, v_ptr, stride_k, stride_v, offs_n, k_pos, k_tag, k_valid, rule, qk_scale,
            HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
        )
    return acc, m_i, l_i


@triton.jit
def attend_anchor_keys(
    acc, m_i, l_i, q, q_pos, q_tag,
    k_ptr, v_ptr, stride_k, stride_v, k_pos_ptr, k_tag_ptr, rows_ptr, begin, end, rule,
    q_min_sentence, q_max_sentence, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Folds the anchor-handled keys among ``rows_ptr[begin:end]`` (packed key rows of anchor and sink
    keys, ``block_plan.py``) into ``(acc, m_i, l_i)``, ``BLOCK_N`` gathered keys per step, with the
    predicate per pair. Keys that are not anchor-handled (those of the tile's own
    sentences, read with their blocks) are masked off before their K/V are loaded. Called only for the
    ANCHORS rule (``ANCHOR_LIST``). K/V masks from :func:`head_tile`, as in the partial loop."""
    for first in range(begin, end, BLOCK_N):
        offs = first + tl.arange(0, BLOCK_N)
        in_range = offs < end
        row = tl.load(rows_ptr + offs, mask=in_range, other=0)
        k_pos = tl.load(k_pos_ptr + row, mask=in_range, other=INT32_MAX)
        k_tag = tl.load(k_tag_ptr + row, mask=in_range, other=0)
        k_valid = in_range & anchor_handled(rule, k_tag, q_min_sentence, q_max_sentence, USE_TAGS)
        acc, m_i, l_i = fold_masked_keys(
            acc, m_i, l_i, q, q_pos, q_tag, k_ptr, v_ptr, stride_k, stride_v, row, k_pos, k_tag, k_valid, rule, qk_scale,
            HEAD_DIM, HEAD_PAD, USE_TAGS, DOT_PRECISION, UPCAST_DOT,
        )
    return acc, m_i, l_i


@triton.jit
def normalise(acc, l_i):
    """``acc / l`` per row; rows that saw no visible key (``l == 0``, ``acc == 0``) give zeros."""
    return acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]


@triton.jit
def store_rows(out_ptr, stride_om, stride_oh, query, head, valid, tile, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr):
    """Writes the rows ``valid`` of ``tile`` ``[BLOCK_M, HEAD_PAD]``, columns ``< HEAD_DIM``, in out's dtype."""
    offs_d, mask = head_tile(valid, HEAD_DIM, HEAD_PAD)
    ptrs = out_ptr + query.to(tl.int64)[:, None] * stride_om + head[:, None] * stride_oh + offs_d
    tl.store(ptrs, tile.to(out_ptr.dtype.element_ty), mask=mask)
