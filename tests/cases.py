"""Random op problems shared by every backend's tests: ragged and empty sequences, gapped positions
(as after compaction), context / anchor / sink tags, GQA, non-contiguous inputs, paged caches whose
pages are shuffled through the pool, with unassigned pages and unused slots full of garbage.

Each ``make_*`` returns a dict of the op's arguments (names as in the schemas), so a test calls
``ops.<op>(**case)`` for any backend and ``reference.<op>(**case)`` for the truth.
"""

from __future__ import annotations

import torch

from skiplayers import reference
from skiplayers.meta import TAG_ANCHOR, TAG_CONTEXT, TAG_SENTENCE_SHIFT, TAG_SINK, Rule

PAGE_SIZE = 16  # SkipCache's default


def sequence_metadata(length: int, gen: torch.Generator, rule: int, gapped: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Strictly increasing positions (with random gaps if ``gapped``) and tags for one sequence."""
    steps = torch.randint(1, 4, (length,), generator=gen) if gapped else torch.ones(length, dtype=torch.int64)
    pos = (steps.cumsum(0) - 1).to(torch.int32)
    context = torch.rand(length, generator=gen) < 0.35
    context[:1] = False  # like fewshot_batch: the first token is never context
    anchor = torch.rand(length, generator=gen) < (0.2 if rule & Rule.ANCHORS else 0.0)
    sentence = torch.cumsum(anchor.to(torch.int32), 0) - anchor.to(torch.int32)
    sink = torch.arange(length) < (2 if rule & Rule.ANCHORS else 0)
    tag = (
        context.to(torch.int32) * TAG_CONTEXT
        | anchor.to(torch.int32) * TAG_ANCHOR
        | sink.to(torch.int32) * TAG_SINK
        | (sentence.to(torch.int32) << TAG_SENTENCE_SHIFT)
    )
    return pos, tag


def _strided_rows(rows: int, heads: int, dim: int, dtype, device, gen, noncontiguous: bool) -> torch.Tensor:
    """``[rows, heads, dim]``; if ``noncontiguous``, a view into a wider buffer (as from a fused QKV)."""
    width = heads + 3 if noncontiguous else heads
    full = torch.randn(rows, width, dim, generator=gen).to(dtype=dtype, device=device)
    return full[:, 1 : heads + 1] if noncontiguous else full


def cu_seqlens(lengths: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32, device=device)


def make_varlen_attention(
    q_lengths: list[int],
    k_lengths: list[int] | None = None,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype=torch.float32,
    device="cpu",
    rule: int = 0,
    gapped: bool = False,
    noncontiguous: bool = False,
    with_tags: bool = True,
    seed: int = 0,
) -> dict:
    """Queries are the last ``q_lengths[b]`` keys of sequence b (self-attention when equal); a
    sequence with queries and no keys gets query metadata of its own (its rows see nothing)."""
    gen = torch.Generator().manual_seed(seed)
    k_lengths = list(q_lengths) if k_lengths is None else k_lengths
    q_pos, k_pos, q_tag, k_tag = [], [], [], []
    for nq, nk in zip(q_lengths, k_lengths):
        if nk == 0:
            pos, tag = sequence_metadata(nq, gen, rule, gapped)
            k_pos.append(pos[:0])
            k_tag.append(tag[:0])
            q_pos.append(pos)
            q_tag.append(tag)
            continue
        assert nq <= nk, "queries are a suffix of the keys"
        pos, tag = sequence_metadata(nk, gen, rule, gapped)
        k_pos.append(pos)
        k_tag.append(tag)
        q_pos.append(pos[nk - nq :])
        q_tag.append(tag[nk - nq :])
    nq_total, nk_total = sum(q_lengths), sum(k_lengths)
    return dict(
        q=_strided_rows(nq_total, heads, head_dim, dtype, device, gen, noncontiguous),
        k=_strided_rows(nk_total, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        v=_strided_rows(nk_total, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        cu_seqlens_q=cu_seqlens(q_lengths, device),
        cu_seqlens_k=cu_seqlens(k_lengths, device),
        q_pos=torch.cat(q_pos).to(device),
        k_pos=torch.cat(k_pos).to(device),
        q_tag=torch.cat(q_tag).to(device) if with_tags else None,
        k_tag=torch.cat(k_tag).to(device) if with_tags else None,
        rule=rule,
        scale=head_dim**-0.5,
    )


def shuffle_metadata(case: dict, seed: int) -> dict:
    """``case`` (from :func:`make_varlen_attention`) with each sequence's keys stored in a random order
    (every key's (pos, tag) pair moves together) and its queries at positions drawn from the
    sequence's whole range (many early: they see few keys), with the tags of the keys at those
    positions; a sequence with queries but no keys keeps its query metadata.
    Kernels must then compare positions, never rows, and the causal limit of a query tile is no
    longer the end of the sequence."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(case)
    cu_q, cu_k = case["cu_seqlens_q"].tolist(), case["cu_seqlens_k"].tolist()
    k_pos, q_pos = case["k_pos"].cpu().clone(), case["q_pos"].cpu().clone()
    k_tag = case["k_tag"].cpu().clone() if case["k_tag"] is not None else None
    q_tag = case["q_tag"].cpu().clone() if case["q_tag"] is not None else None
    for b in range(len(cu_q) - 1):
        ks, ke, qs, qe = cu_k[b], cu_k[b + 1], cu_q[b], cu_q[b + 1]
        if ke > ks:
            order = ks + torch.randperm(ke - ks, generator=gen)
            pick = order[torch.randint(0, ke - ks, (qe - qs,), generator=gen)]
            q_pos[qs:qe] = k_pos[pick]
            if k_tag is not None and q_tag is not None:
                q_tag[qs:qe] = k_tag[pick]
                k_tag[ks:ke] = k_tag[order]
            k_pos[ks:ke] = k_pos[order]
    device = case["q"].device
    out.update(k_pos=k_pos.to(device), q_pos=q_pos.to(device))
    if k_tag is not None:
        out.update(k_tag=k_tag.to(device), q_tag=q_tag.to(device))
    return out


def page_table(slots: list[int], page_size: int, gen: torch.Generator, max_pages: int | None = None,
               spare_pages: int = 3, shuffled: bool = True) -> tuple[torch.Tensor, int]:
    """A block table for sequences that need ``slots[b]`` slots, and the pool's page count.

    Sequence b gets the ``ceil(slots[b] / page_size)`` pages it needs, drawn from a shuffled
    permutation of the pool's pages (so neither page order nor adjacency follows the sequence);
    ``spare_pages`` pages stay unassigned; entries past a sequence's pages are -1. ``max_pages``
    (default: the most any sequence needs, plus one) is the table's width.
    """
    needed = [-(-n // page_size) for n in slots]
    width = max([*needed, 0]) + 1 if max_pages is None else max_pages
    num_pages = sum(needed) + spare_pages
    order = torch.randperm(num_pages, generator=gen) if shuffled else torch.arange(num_pages)
    table = torch.full((len(slots), width), -1, dtype=torch.int32)
    first = 0
    for b, n in enumerate(needed):
        n = min(n, width)  # a narrower table than the slots need: for the refusal tests
        table[b, :n] = order[first : first + n].to(torch.int32)
        first += n
    return table, num_pages


def write_slots(pool: torch.Tensor, block_table: torch.Tensor, b: int, values: torch.Tensor) -> None:
    """Writes ``values [n, ...]`` into sequence b's slots ``0 .. n - 1`` of a paged ``pool``."""
    pool[reference.page_slots(pool, block_table, b, 0, values.shape[0])] = values.to(pool.dtype)


def _pool(num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype, device, gen,
          noncontiguous: bool = False) -> torch.Tensor:
    """K or V pages ``[num_pages, page_size, kv_heads, head_dim]`` of random values; if
    ``noncontiguous``, heads strided inside a wider buffer."""
    width = kv_heads + 2 if noncontiguous else kv_heads
    full = torch.randn(num_pages, page_size, width, head_dim, generator=gen).to(dtype=dtype, device=device)
    return full[:, :, 1 : kv_heads + 1] if noncontiguous else full


def _metadata_pools(num_pages: int, page_size: int, gen, garbage: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 pos and tag pages; unused slots hold garbage (a visible position, a random tag word)."""
    if garbage:
        return (torch.full((num_pages, page_size), -7, dtype=torch.int32),
                torch.full((num_pages, page_size), 0x5A5A, dtype=torch.int32))
    return (torch.randint(0, 1000, (num_pages, page_size), generator=gen, dtype=torch.int32),
            torch.randint(0, 1000, (num_pages, page_size), generator=gen, dtype=torch.int32))


def make_cache_attention(
    cache_lengths: list[int],
    q_lengths: list[int] | None = None,
    page_size: int = PAGE_SIZE,
    max_pages: int | None = None,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype=torch.float32,
    device="cpu",
    rule: int = 0,
    gapped: bool = True,
    noncontiguous: bool = False,
    noncontiguous_cache: bool = False,
    with_tags: bool = True,
    num_splits: int = 0,
    seed: int = 0,
) -> dict:
    """Sequence b's paged cache holds ``cache_lengths[b]`` slots, the last ``q_lengths[b]`` (default
    1, 0 for an empty cache) of which are the new queries' own tokens (:func:`page_table`)."""
    gen = torch.Generator().manual_seed(seed)
    q_lengths = [min(1, n) for n in cache_lengths] if q_lengths is None else q_lengths
    block_table, num_pages = page_table(cache_lengths, page_size, gen, max_pages)
    k_cache = _pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen, noncontiguous_cache)
    v_cache = _pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen, noncontiguous_cache)
    pos_cache, tag_cache = _metadata_pools(num_pages, page_size, gen)
    q_pos, q_tag = [], []
    for b, (n, nq) in enumerate(zip(cache_lengths, q_lengths)):
        assert nq <= n
        pos, tag = sequence_metadata(n, gen, rule, gapped)
        write_slots(pos_cache, block_table, b, pos)
        write_slots(tag_cache, block_table, b, tag)
        q_pos.append(pos[n - nq :])
        q_tag.append(tag[n - nq :])
    return dict(
        q=_strided_rows(sum(q_lengths), heads, head_dim, dtype, device, gen, noncontiguous),
        k_cache=k_cache,
        v_cache=v_cache,
        block_table=block_table.to(device),
        cu_seqlens_q=cu_seqlens(q_lengths, device),
        cache_seqlens=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
        q_pos=torch.cat(q_pos).to(device),
        pos_cache=pos_cache.to(device),
        q_tag=torch.cat(q_tag).to(device) if with_tags else None,
        tag_cache=tag_cache.to(device) if with_tags else None,
        rule=rule,
        scale=head_dim**-0.5,
        num_splits=num_splits,
    )


def make_compact_rows(lengths: list[int], width: int = 5, dtype=torch.float32, device="cpu", seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return dict(
        x=torch.randn(n, width, 3, generator=gen).to(dtype=dtype, device=device),
        cu_seqlens=cu_seqlens(lengths, device),
        keep=(torch.rand(n, generator=gen) < 0.6).to(device),
    )


def make_cache_append(
    cache_lengths: list[int], new_lengths: list[int], page_size: int = 4, max_pages: int | None = None, kv_heads=2,
    head_dim=64, dtype=torch.float32, device="cpu", noncontiguous=False, seed: int = 0,
) -> dict:
    """Sequence b holds ``cache_lengths[b]`` slots and appends ``new_lengths[b]`` rows; its block table
    row has the pages both need (:func:`page_table`)."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(new_lengths)
    block_table, num_pages = page_table([a + b for a, b in zip(cache_lengths, new_lengths)], page_size, gen,
                                        max_pages)
    pos_cache, tag_cache = _metadata_pools(num_pages, page_size, gen, garbage=False)
    return dict(
        k_cache=_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen),
        v_cache=_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen),
        pos_cache=pos_cache.to(device),
        tag_cache=tag_cache.to(device),
        block_table=block_table.to(device),
        k=_strided_rows(n, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        v=_strided_rows(n, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        pos=torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32).to(device),
        tag=torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32).to(device),
        cu_seqlens=cu_seqlens(new_lengths, device),
        cache_seqlens=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
    )


def make_cache_compact(
    cache_lengths: list[int], page_size: int = 4, max_pages: int | None = None, kv_heads=2, head_dim=64,
    dtype=torch.float32, device="cpu", keep_fraction: float = 0.3, seed: int = 0,
) -> dict:
    """Sequence b holds ``cache_lengths[b]`` slots; ``keep`` (bool ``[B, max_pages * page_size]``)
    keeps about ``keep_fraction`` of them, and is random past each length too."""
    gen = torch.Generator().manual_seed(seed)
    block_table, num_pages = page_table(cache_lengths, page_size, gen, max_pages)
    pos_cache, tag_cache = _metadata_pools(num_pages, page_size, gen, garbage=False)
    keep = torch.rand(len(cache_lengths), block_table.shape[1] * page_size, generator=gen) < keep_fraction
    return dict(
        k_cache=_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen),
        v_cache=_pool(num_pages, page_size, kv_heads, head_dim, dtype, device, gen),
        pos_cache=pos_cache.to(device),
        tag_cache=tag_cache.to(device),
        block_table=block_table.to(device),
        cache_seqlens=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
        keep=keep.to(device),
    )
