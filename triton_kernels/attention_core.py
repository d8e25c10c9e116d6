"""The attention inner loop shared by the prefill and decode kernels (``@triton.jit`` helpers only).

Tiling, GQA: one program owns one KV head and a tile of ``BLOCK_M`` *rows*, each row a (query,
query head) pair of that KV head's group: row ``r`` is query ``first + r // gsub``, head
``g0 + r % gsub`` of the group (``gsub = min(group, BLOCK_M)`` heads per tile, ``BLOCK_M // gsub``
queries per tile). The group's heads therefore share every K/V tile that is loaded, and one query
with a GQA group of 8 fills 8 rows of a 16-row decode tile instead of 8 programs.

Online softmax in base 2: scores are scaled by ``scale * log2(e)``; ``m`` is the running row max and
``l`` the running sum of ``exp2(s - m)``. A row that has seen no visible key keeps ``m = -inf`` and
``l = 0`` (its accumulator stays 0), and :func:`normalise` outputs zeros for it.

Head dims that are not a power of two (96): ``tl.arange`` needs a power of two, so every tile's head
axis has ``HEAD_PAD`` columns (``HEAD_DIM`` rounded up; ``configs.head_pad``) and :func:`head_tile`
masks columns ``>= HEAD_DIM`` off every load and store. The padded columns of q, K and V load as
zeros, so they add nothing to ``q @ k^T`` and leave the accumulator's padded columns zero. With
``HEAD_PAD == HEAD_DIM`` no head-dim mask is emitted at all.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .visibility import INT32_MAX, key_block_may_be_visible, key_visible, query_summary


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
    mask from here; masked loads give 0 (see the module docstring)."""
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
def softmax_step(
    m_i, l_i, q, k, q_pos, q_tag, k_pos, k_tag, k_valid, rule, qk_scale,
    USE_TAGS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """The scores of one loaded key block (``k`` ``[BLOCK_N, HEAD_PAD]``, per-key ``k_pos``, ``k_tag``,
    ``k_valid``) against the query tile, folded into the running softmax statistics: returns
    ``(p, alpha, m_new, l_new)``; the caller finishes with ``acc * alpha[:, None] + p @ v``
    (:func:`fold_values`). Invalid or invisible keys get probability 0. ``qk_scale`` is
    ``scale * log2(e)``."""
    s = mma(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
    visible = key_visible(rule, q_pos[:, None], q_tag[:, None], k_pos[None, :], k_tag[None, :], USE_TAGS)
    s = tl.where(visible & k_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def fold_values(acc, p, alpha, v, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc * alpha[:, None] + p @ v`` (the second half of an online-softmax step)."""
    return acc * alpha[:, None] + mma(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def attend_key_range(
    acc, m_i, l_i, q, q_pos, q_tag, q_valid,
    k_ptr, v_ptr, stride_k, stride_v, k_pos_ptr, k_tag_ptr, stride_meta,
    key_begin, key_end, rule, qk_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, USE_TAGS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Folds keys ``[key_begin, key_end)`` of a packed (contiguous-row) key range into the running
    ``(acc, m_i, l_i)`` of the query tile (the prefill kernel's loop; the decode kernel walks paged
    caches with its own loop, ``decode_attention.attend_paged_keys``).

    Key ``j`` of the range lives at ``k_ptr + j * stride_k`` (this KV head, head dim dense; likewise V)
    and its metadata at ``k_pos_ptr + j * stride_meta``, ``k_tag_ptr + j * stride_meta``. A key block
    whose metadata summary rules out every (query, key) pair is skipped before its K/V are loaded.
    """
    q_max_pos, q_min_sentence, q_max_sentence = query_summary(q_pos, q_tag, q_valid, USE_TAGS)
    for start in range(key_begin, key_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_valid = offs_n < key_end
        k_pos = tl.load(k_pos_ptr + offs_n * stride_meta, mask=k_valid, other=INT32_MAX)
        if USE_TAGS:
            k_tag = tl.load(k_tag_ptr + offs_n * stride_meta, mask=k_valid, other=0)
        else:
            k_tag = k_pos * 0
        if key_block_may_be_visible(rule, q_max_pos, q_min_sentence, q_max_sentence, k_pos, k_tag, k_valid, USE_TAGS):
            rows = offs_n.to(tl.int64)[:, None]
            offs_d, kv_mask = head_tile(k_valid, HEAD_DIM, HEAD_PAD)
            k = tl.load(k_ptr + rows * stride_k + offs_d, mask=kv_mask, other=0.0)
            p, alpha, m_i, l_i = softmax_step(
                m_i, l_i, q, k, q_pos, q_tag, k_pos, k_tag, k_valid, rule, qk_scale, USE_TAGS, DOT_PRECISION, UPCAST_DOT
            )
            v = tl.load(v_ptr + rows * stride_v + offs_d, mask=kv_mask, other=0.0)
            acc = fold_values(acc, p, alpha, v, DOT_PRECISION, UPCAST_DOT)
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
