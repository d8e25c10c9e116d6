"""Pure-PyTorch semantics of every skiplayers op: the truth every backend is tested against.

Everything is computed in float32 (float64 where asked) from the inputs, one sequence at a time,
with a dense mask built from the visibility predicate. Slow on purpose: it is written to be read.

Layout conventions (see ``skiplayers/ops.py`` for the full argument documentation):

* packed activations ``[total_tokens, heads, head_dim]`` with ``cu_seqlens`` int32 ``[B + 1]``;
* caches ``[B, S_cap, kv_heads, head_dim]`` with ``cache_seqlens`` int32 ``[B]``;
* per-token metadata ``pos`` and ``tag`` int32 (bits in ``skiplayers/meta.py``).

A query that sees no key at all gets an all-zero output row.
"""

from __future__ import annotations

import torch

from .meta import TAG_ANCHOR, TAG_CONTEXT, TAG_SINK, Rule, tag_has, tag_sentence


def visibility_mask(
    rule: int, q_pos: torch.Tensor, q_tag: torch.Tensor, k_pos: torch.Tensor, k_tag: torch.Tensor
) -> torch.Tensor:
    """Bool ``[Nq, Nk]``: may query i attend to key j? (the predicate of ``visibility.h``)."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    qt, kt = q_tag[:, None], k_tag[None, :]
    visible = kp <= qp
    if rule & Rule.HIDE_CONTEXT:
        visible = visible & ~tag_has(kt, TAG_CONTEXT)
    if rule & Rule.ANCHORS:
        qs, ks = tag_sentence(qt), tag_sentence(kt)
        same_sentence = ks == qs
        earlier_anchor = ~tag_has(qt, TAG_ANCHOR) & tag_has(kt, TAG_ANCHOR) & (ks < qs)
        visible = visible & (same_sentence | earlier_anchor | tag_has(kt, TAG_SINK))
    return visible


def _tags_or_zeros(tag: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=torch.int32) if tag is None else tag


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense attention of one sequence. q ``[Nq, H, D]``, k/v ``[Nk, Hkv, D]``, visible ``[Nq, Nk]``.

    Returns ``[Nq, H, D]`` in ``compute_dtype``; rows with no visible key are zero.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    qf = q.to(compute_dtype).transpose(0, 1)  # [H, Nq, D]
    kf = k.to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)  # [H, Nk, D]
    vf = v.to(compute_dtype).transpose(0, 1).repeat_interleave(group, dim=0)
    scores = (qf @ kf.transpose(1, 2)) * scale
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: softmax gives NaN
    return (probs @ vf).transpose(0, 1)


def _attend_sequences(q, spans, scale: float, compute_dtype: torch.dtype | None) -> torch.Tensor:
    """Runs :func:`masked_attention` over ``spans``: ``(q_start, q_end, k, v, visible)`` per sequence.
    Computed in float32 and returned in q's dtype, or computed and returned in ``compute_dtype``."""
    out_dtype = q.dtype if compute_dtype is None else compute_dtype
    compute_dtype = compute_dtype or torch.float32
    out = torch.zeros(q.shape, dtype=compute_dtype, device=q.device)
    for qs, qe, k, v, visible in spans:
        if qe > qs:
            out[qs:qe] = masked_attention(q[qs:qe], k, v, visible, scale, compute_dtype)
    return out.to(out_dtype)


def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, rule: int, scale: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention of packed ragged queries ``[Nq, H, D]`` over packed keys ``[Nk, Hkv, D]``.

    Computed in float32 and returned in q's dtype; with ``compute_dtype`` given, computed and
    returned in that dtype instead (tests use float64 for the truth and q's own dtype to measure
    how far a plain low-precision computation strays)."""
    q_tag = _tags_or_zeros(q_tag, q_pos)
    k_tag = _tags_or_zeros(k_tag, k_pos)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    spans = (
        (qs, qe, k[ks:ke], v[ks:ke], visibility_mask(rule, q_pos[qs:qe], q_tag[qs:qe], k_pos[ks:ke], k_tag[ks:ke]))
        for qs, qe, ks, ke in zip(cq[:-1], cq[1:], ck[:-1], ck[1:])
    )
    return _attend_sequences(q, spans, scale, compute_dtype)


def cache_attention(
    q, k_cache, v_cache, cu_seqlens_q, cache_seqlens, q_pos, pos_cache, q_tag, tag_cache, rule: int,
    scale: float, num_splits: int = 0, compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``[Nq, H, D]`` over caches ``[B, S_cap, Hkv, D]``.

    Sequence b's keys are slots ``0 .. cache_seqlens[b] - 1``. ``num_splits`` only changes how
    backends parallelise; the result does not depend on it. ``compute_dtype`` as in
    :func:`varlen_attention`.
    """
    del num_splits
    q_tag = _tags_or_zeros(q_tag, q_pos)
    tag_cache = _tags_or_zeros(tag_cache, pos_cache)
    cq, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()
    spans = (
        (qs, qe, k_cache[b, :n], v_cache[b, :n],
         visibility_mask(rule, q_pos[qs:qe], q_tag[qs:qe], pos_cache[b, :n], tag_cache[b, :n]))
        for b, (qs, qe, n) in enumerate(zip(cq[:-1], cq[1:], lens))
    )
    return _attend_sequences(q, spans, scale, compute_dtype)


def compact_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor):
    """Rows of ``x`` ``[N, ...]`` where ``keep`` (bool ``[N]``), in order, and the new ``cu_seqlens``."""
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int32), keep.cumsum(0, dtype=torch.int32)])
    return x[keep], kept_before[cu_seqlens.long()].to(torch.int32)


def cache_append(k_cache, v_cache, pos_cache, tag_cache, k, v, pos, tag, cu_seqlens, cache_seqlens) -> None:
    """Writes sequence b's new rows ``cu_seqlens[b] ..`` into its slots ``cache_seqlens[b] ..`` (in place).

    ``cache_seqlens`` itself is not changed; the caller adds the new counts.
    """
    cu, lens = cu_seqlens.tolist(), cache_seqlens.tolist()
    for b, start in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        if start + n > k_cache.shape[1]:
            raise ValueError(f"cache_append: sequence {b} needs {start + n} slots, capacity is {k_cache.shape[1]}")
        rows = slice(cu[b], cu[b + 1])
        k_cache[b, start:start + n] = k[rows]
        v_cache[b, start:start + n] = v[rows]
        pos_cache[b, start:start + n] = pos[rows]
        tag_cache[b, start:start + n] = tag[rows]


def cache_compact(k_cache, v_cache, pos_cache, tag_cache, cache_seqlens, keep, capacity: int):
    """Per sequence, the slots ``s < cache_seqlens[b]`` with ``keep[b, s]``, moved to the front of new
    buffers with ``capacity`` slots. Slots past the new length are unspecified (zero here). Returns
    ``(k_cache, v_cache, pos_cache, tag_cache, cache_seqlens)``."""
    batch = k_cache.shape[0]
    new_k = k_cache.new_zeros((batch, capacity, *k_cache.shape[2:]))
    new_v = v_cache.new_zeros((batch, capacity, *v_cache.shape[2:]))
    new_pos = pos_cache.new_zeros((batch, capacity))
    new_tag = tag_cache.new_zeros((batch, capacity))
    new_lens = torch.zeros(batch, dtype=torch.int32, device=cache_seqlens.device)
    for b, n in enumerate(cache_seqlens.tolist()):
        idx = keep[b, :n].nonzero().flatten()
        m = idx.numel()
        if m > capacity:
            raise ValueError(f"cache_compact: sequence {b} keeps {m} slots, capacity is {capacity}")
        new_k[b, :m] = k_cache[b, idx]
        new_v[b, :m] = v_cache[b, idx]
        new_pos[b, :m] = pos_cache[b, idx]
        new_tag[b, :m] = tag_cache[b, idx]
        new_lens[b] = m
    return new_k, new_v, new_pos, new_tag, new_lens
