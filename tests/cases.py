"""Random op problems shared by every backend's tests: ragged and empty sequences, gapped positions
(as after compaction), context / anchor / sink tags, GQA, non-contiguous inputs.

Each ``make_*`` returns a dict of the op's arguments (names as in the schemas), so a test calls
``ops.<op>(**case)`` for any backend and ``reference.<op>(**case)`` for the truth.
"""

from __future__ import annotations

import torch

from skiplayers.meta import TAG_ANCHOR, TAG_CONTEXT, TAG_SENTENCE_SHIFT, TAG_SINK, Rule


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
    """Queries are the last ``q_lengths[b]`` keys of sequence b (self-attention when equal)."""
    gen = torch.Generator().manual_seed(seed)
    k_lengths = list(q_lengths) if k_lengths is None else k_lengths
    q_pos, k_pos, q_tag, k_tag = [], [], [], []
    for nq, nk in zip(q_lengths, k_lengths):
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


def make_cache_attention(
    cache_lengths: list[int],
    q_lengths: list[int] | None = None,
    capacity: int | None = None,
    heads: int = 6,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype=torch.float32,
    device="cpu",
    rule: int = 0,
    gapped: bool = True,
    noncontiguous: bool = False,
    with_tags: bool = True,
    num_splits: int = 0,
    seed: int = 0,
) -> dict:
    """Sequence b's cache holds ``cache_lengths[b]`` slots, the last ``q_lengths[b]`` (default 1,
    0 for an empty cache) of which are the new queries' own tokens."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(cache_lengths)
    q_lengths = [min(1, n) for n in cache_lengths] if q_lengths is None else q_lengths
    capacity = max([*cache_lengths, 1]) + 5 if capacity is None else capacity
    k_cache = torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    pos_cache = torch.full((batch, capacity), -7, dtype=torch.int32)  # garbage past each length
    tag_cache = torch.full((batch, capacity), 0x5A5A, dtype=torch.int32)
    q_pos, q_tag = [], []
    for b, (n, nq) in enumerate(zip(cache_lengths, q_lengths)):
        assert nq <= n
        pos, tag = sequence_metadata(n, gen, rule, gapped)
        pos_cache[b, :n], tag_cache[b, :n] = pos, tag
        q_pos.append(pos[n - nq :])
        q_tag.append(tag[n - nq :])
    return dict(
        q=_strided_rows(sum(q_lengths), heads, head_dim, dtype, device, gen, noncontiguous),
        k_cache=k_cache,
        v_cache=v_cache,
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
    cache_lengths: list[int], new_lengths: list[int], capacity: int, kv_heads=2, head_dim=64, dtype=torch.float32,
    device="cpu", noncontiguous=False, seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, n = len(cache_lengths), sum(new_lengths)
    return dict(
        k_cache=torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        v_cache=torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        pos_cache=torch.randint(0, 1000, (batch, capacity), generator=gen, dtype=torch.int32).to(device),
        tag_cache=torch.randint(0, 1000, (batch, capacity), generator=gen, dtype=torch.int32).to(device),
        k=_strided_rows(n, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        v=_strided_rows(n, kv_heads, head_dim, dtype, device, gen, noncontiguous),
        pos=torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32).to(device),
        tag=torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32).to(device),
        cu_seqlens=cu_seqlens(new_lengths, device),
        cache_seqlens=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
    )


def make_cache_compact(
    cache_lengths: list[int], capacity: int, new_capacity: int | None = None, kv_heads=2, head_dim=64,
    dtype=torch.float32, device="cpu", keep_fraction: float = 0.3, seed: int = 0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch = len(cache_lengths)
    keep = torch.rand(batch, capacity, generator=gen) < keep_fraction
    needed = max([int(keep[b, :n].sum()) for b, n in enumerate(cache_lengths)] + [0])
    return dict(
        k_cache=torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        v_cache=torch.randn(batch, capacity, kv_heads, head_dim, generator=gen).to(dtype=dtype, device=device),
        pos_cache=torch.randint(0, 1000, (batch, capacity), generator=gen, dtype=torch.int32).to(device),
        tag_cache=torch.randint(0, 1000, (batch, capacity), generator=gen, dtype=torch.int32).to(device),
        cache_seqlens=torch.tensor(cache_lengths, dtype=torch.int32, device=device),
        keep=keep.to(device),
        capacity=needed + 3 if new_capacity is None else new_capacity,
    )
