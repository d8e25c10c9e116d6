"""Pure-PyTorch semantics of every skiplayers op: the truth every backend is tested against.

Everything is computed in float32 (float64 where asked) from the inputs, one sequence at a time,
with a dense mask built from the visibility predicate. Slow on purpose: it is written to be read.

Layout conventions (see ``skiplayers/ops.py`` for the full argument documentation):

* packed activations ``[total_tokens, heads, head_dim]`` with ``cu_seqlens`` int32 ``[B + 1]``;
* paged caches: a pool of pages ``[num_pages, page_size, kv_heads, head_dim]`` (pos/tag int32
  ``[num_pages, page_size]``); sequence b's slot s is page ``block_table[b, s // page_size]``, offset
  ``s % page_size``; it holds ``cache_seqlens[b]`` slots (int32 ``[B]``);
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


def page_slots(pool: torch.Tensor, block_table: torch.Tensor, b: int, first: int, count: int):
    """``(pages, offsets)`` int64 ``[count]``: where slots ``first .. first + count - 1`` of sequence b
    lie in ``pool [num_pages, page_size, ...]``. Raises ``ValueError`` when a slot lies past the
    block table's row or in an entry that is not a page of the pool."""
    num_pages, page_size = pool.shape[:2]
    slots = torch.arange(first, first + count, device=block_table.device)
    if count and first + count > block_table.shape[1] * page_size:
        raise ValueError(f"sequence {b} needs {first + count} slots, its block table holds "
                         f"{block_table.shape[1] * page_size} ({block_table.shape[1]} pages of {page_size})")
    pages = block_table[b, slots // page_size].long()
    bad = pages[(pages < 0) | (pages >= num_pages)]
    if bad.numel():
        raise ValueError(f"sequence {b}: block_table names page {int(bad[0])}, outside the pool's {num_pages} pages")
    return pages, slots % page_size


def gather_slots(pool: torch.Tensor, block_table: torch.Tensor, b: int, count: int) -> torch.Tensor:
    """Slots ``0 .. count - 1`` of sequence b from a paged ``pool [num_pages, page_size, ...]``, as
    ``[count, ...]`` (a copy)."""
    return pool[page_slots(pool, block_table, b, 0, count)]


def cache_attention(
    q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos, pos_cache, q_tag, tag_cache, rule: int,
    scale: float, num_splits: int = 0, compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``[Nq, H, D]`` over paged caches ``[num_pages, page_size, Hkv, D]``.

    Sequence b's keys are its slots ``0 .. cache_seqlens[b] - 1`` (through ``block_table[b]``).
    ``num_splits`` only changes how backends parallelise; the result does not depend on it.
    ``compute_dtype`` as in :func:`varlen_attention`.
    """
    del num_splits
    q_tag = _tags_or_zeros(q_tag, q_pos)
    tag_cache = _tags_or_zeros(tag_cache, pos_cache)
    cq, lens = cu_seqlens_q.tolist(), cache_seqlens.tolist()

    def span(b, qs, qe, n):
        k_pos, k_tag = gather_slots(pos_cache, block_table, b, n), gather_slots(tag_cache, block_table, b, n)
        visible = visibility_mask(rule, q_pos[qs:qe], q_tag[qs:qe], k_pos, k_tag)
        return qs, qe, gather_slots(k_cache, block_table, b, n), gather_slots(v_cache, block_table, b, n), visible

    spans = (span(b, qs, qe, n) for b, (qs, qe, n) in enumerate(zip(cq[:-1], cq[1:], lens)))
    return _attend_sequences(q, spans, scale, compute_dtype)


def compact_rows(x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor):
    """Rows of ``x`` ``[N, ...]`` where ``keep`` (bool ``[N]``), in order, and the new ``cu_seqlens``."""
    kept_before = torch.cat([keep.new_zeros(1, dtype=torch.int32), keep.cumsum(0, dtype=torch.int32)])
    return x[keep], kept_before[cu_seqlens.long()].to(torch.int32)


def cache_append(k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag, cu_seqlens,
                 cache_seqlens) -> None:
    """Writes sequence b's new rows ``cu_seqlens[b] ..`` into its slots ``cache_seqlens[b] ..`` (in
    place, through ``block_table[b]``). ``cache_seqlens`` itself is not changed; the caller adds the
    new counts (and has assigned the pages the new slots fall in)."""
    cu, lens = cu_seqlens.tolist(), cache_seqlens.tolist()
    for b, start in enumerate(lens):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        pages, offsets = page_slots(k_cache, block_table, b, start, n)
        rows = slice(cu[b], cu[b + 1])
        k_cache[pages, offsets] = k[rows]
        v_cache[pages, offsets] = v[rows]
        pos_cache[pages, offsets] = pos[rows]
        tag_cache[pages, offsets] = tag[rows]


def cache_compact(k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep) -> torch.Tensor:
    """Per sequence, the slots ``s < cache_seqlens[b]`` with ``keep[b, s]`` (bool ``[B, max_pages *
    page_size]``) move to the front of the sequence's own slots, order kept (in place; slots past the
    new length are unspecified: unchanged here). Returns the new ``cache_seqlens`` (int32 ``[B]``)."""
    new_lens = torch.zeros_like(cache_seqlens)
    for b, n in enumerate(cache_seqlens.tolist()):
        pages, offsets = page_slots(k_cache, block_table, b, 0, n)
        kept = keep[b, :n].nonzero().flatten()
        m = kept.numel()
        for pool in (k_cache, v_cache, pos_cache, tag_cache):
            pool[pages[:m], offsets[:m]] = pool[pages[kept], offsets[kept]]  # the right side is a copy
        new_lens[b] = m
    return new_lens
