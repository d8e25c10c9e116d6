"""Inputs of the attention-kernel benchmarks (``cpu_attention``, ``bench_kernels``,
``test_bench_cpu_ops``, ``registration_overhead``): packed sequences in the
layout of the skiplayers ops, the same data laid out or padded for SDPA, a context-stopped prefill in
both its forms, and paged decode caches with their metadata.

Layouts: *packed* rows are ``[N, H, D]`` (N = total tokens of all sequences, sequence b in rows
``cu_seqlens[b] .. cu_seqlens[b + 1]``); *SDPA* tensors are ``[B, H, T, D]``; *paged* caches are pools
``[num_pages, page_size, H_kv, D]`` read through an int32 ``block_table [B, max_pages]`` (the layout of
the cache ops, ``skiplayers/ops.py``). The benchmarks' pages are in order: sequence b owns pages
``b * max_pages .. (b + 1) * max_pages - 1``, so ``dense_view`` sees the same memory as
``[B, max_pages * page_size, H_kv, D]`` for the baselines that take rectangular caches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from skiplayers.meta import TAG_CONTEXT

# (query heads, KV heads, head dim) of the models whose shapes the kernel benchmarks use.
SMOLLM2 = (9, 3, 64)
LLAMA3_8B = (32, 8, 128)
PAGE_SIZE = 16  # SkipCache's default page size


def random_qkv(rows: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32, device="cpu"):
    """Standard-normal ``q`` [rows, heads, dim], ``k`` and ``v`` [rows, kv_heads, dim], drawn in
    that order from torch's global generator."""
    return tuple(torch.randn(rows, h, dim, dtype=dtype, device=device) for h in (heads, kv_heads, kv_heads))


def cu_seqlens(lengths, device="cpu") -> torch.Tensor:
    """int32 [B + 1]: 0 and the running sums of ``lengths`` (the row offsets of packed sequences)."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed(lengths, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens`` int32 [B + 1] and positions int32 [N] (0 .. n - 1 within each sequence)."""
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths]).to(device)
    return cu_seqlens(lengths, device), pos


def packed_problem(lengths, heads: int, kv_heads: int, dim: int, dtype=torch.float32, device="cpu"):
    """Random causal self-attention of sequences of ``lengths`` packed: ``q, k, v, cu, pos``
    (``random_qkv`` of ``sum(lengths)`` rows, then ``packed(lengths)``)."""
    q, k, v = random_qkv(sum(lengths), heads, kv_heads, dim, dtype, device)
    return (q, k, v, *packed(lengths, device))


def sdpa_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each packed one-sequence tensor [T, H, D] as a contiguous SDPA batch of one, [1, H, T, D]."""
    return tuple(t.transpose(0, 1)[None].contiguous() for t in tensors)


def pad_packed(x: torch.Tensor, lengths) -> torch.Tensor:
    """Packed ``x`` [N, H, D] as [B, max(lengths), H, D], sequence b in ``[b, :lengths[b]]`` and
    zeros after it. ``.transpose(1, 2)`` gives SDPA's [B, H, T, D]."""
    out = x.new_zeros(len(lengths), max(lengths), *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start : start + n]
        start += n
    return out


def ragged_causal_mask(lengths, device="cpu") -> torch.Tensor:
    """bool [B, 1, T, T] (T = max(lengths), True = attend) for left-aligned padded sequences:
    causal over each sequence's own tokens, padding keys hidden. Padding query rows see every key,
    so that no row is fully masked (their outputs are not used)."""
    longest = max(lengths)
    idx = torch.arange(longest, device=device)
    valid = idx[None, :] < torch.tensor(lengths, device=device)[:, None]  # [B, T]
    mask = ((idx[None, :, None] >= idx[None, None, :]) & valid[:, None, :]) | ~valid[:, :, None]
    return mask[:, None]


@dataclass
class ContextStopped:
    """One sequence of c context + q query tokens at a layer >= ℓ, in the forms the benchmarks
    compare (column 0 stays a non-context token, as a BOS would; context is columns 1 .. c):

    * ``masked``: ``q, k, v, cu, pos, tag`` of all T = c + q rows, ``tag`` int32 [T] marking the
      context (``TAG_CONTEXT``), for the op under ``Rule.HIDE_CONTEXT``;
    * ``compacted``: ``q, k, v, cu, pos`` of the kept (non-context) rows only, with their
      absolute positions: the fast path;
    * ``sdpa``: ``q, k, v`` [1, H, T, D] and a bool [T, T] mask: causal, context keys hidden,
      except that context rows keep the first token visible (as the masked model does)."""

    masked: tuple
    compacted: tuple
    sdpa: tuple


def context_stopped_problem(context: int, query: int, heads: int, kv_heads: int, dim: int, dtype=torch.float32,
                    device="cpu") -> ContextStopped:
    """A random ``ContextStopped`` problem (``random_qkv`` of ``context + query`` rows)."""
    total = context + query
    q, k, v, cu, pos = packed_problem([total], heads, kv_heads, dim, dtype, device)
    is_ctx = torch.zeros(total, dtype=torch.bool, device=device)
    is_ctx[1 : context + 1] = True
    tag = is_ctx.to(torch.int32) * TAG_CONTEXT
    keep = ~is_ctx
    kept = tuple(t[keep].contiguous() for t in (q, k, v))
    cu_kept = torch.tensor([0, int(keep.sum())], dtype=torch.int32, device=device)
    mask = torch.ones(total, total, dtype=torch.bool, device=device).tril() & keep[None, :]
    mask[is_ctx, 0] = True
    return ContextStopped(masked=(q, k, v, cu, pos, tag), compacted=(*kept, cu_kept, pos[keep].contiguous()),
                          sdpa=(*sdpa_layout(q, k, v), mask))


def pages_per_sequence(capacity: int, page_size: int = PAGE_SIZE) -> int:
    """The pages a sequence of ``capacity`` slots needs (the block table's width)."""
    return -(-capacity // page_size)


def paged_kv(batch: int, capacity: int, kv_heads: int, dim: int, dtype=torch.float32, device="cpu",
             page_size: int = PAGE_SIZE, fill=torch.randn) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V page pools ``[batch * max_pages, page_size, kv_heads, dim]`` holding ``batch`` sequences
    of ``capacity`` slots each, pages in order (``decode_metadata``'s block table), filled by ``fill``
    (``torch.randn``, drawn K then V from torch's global generator; or ``torch.empty``)."""
    shape = (batch * pages_per_sequence(capacity, page_size), page_size, kv_heads, dim)
    return fill(shape, dtype=dtype, device=device), fill(shape, dtype=dtype, device=device)


def dense_view(pool: torch.Tensor, batch: int) -> torch.Tensor:
    """An in-order page pool ``[batch * max_pages, page_size, H, D]`` as the rectangular cache
    ``[batch, max_pages * page_size, H, D]`` it is in memory (a view, no copy)."""
    return pool.view(batch, -1, *pool.shape[2:])


def decode_metadata(lengths, capacity: int, device="cpu", page_size: int = PAGE_SIZE):
    """Metadata of a decode step, one new token per sequence over paged caches of ``lengths`` keys and
    room for ``capacity`` slots each (``paged_kv``): ``cu_seqlens_q`` int32 [B + 1] (0 .. B),
    ``cache_seqlens`` int32 [B] (= lengths), ``q_pos`` int32 [B] (lengths - 1: the new token's position,
    as the ops take it), ``block_table`` int32 [B, max_pages] (pages in order: sequence b owns pages
    ``b * max_pages ..``) and ``pos_cache`` int32 [B * max_pages, page_size] (slot s of every sequence
    at position s)."""
    batch, max_pages = len(lengths), pages_per_sequence(capacity, page_size)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    block_table = torch.arange(batch * max_pages, dtype=torch.int32, device=device).view(batch, max_pages)
    slots = torch.arange(max_pages * page_size, dtype=torch.int32, device=device)
    pos_cache = slots.view(max_pages, page_size).repeat(batch, 1)
    return cu_seqlens([1] * batch, device), lens, lens - 1, block_table, pos_cache
