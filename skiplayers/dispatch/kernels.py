"""The attention kernels a patched model can call, behind one interface.

* ``ours``: skiplayers' ops of the patch's backend (cpu, cuda, triton, torch); they evaluate the
  visibility predicate, so they compute every pattern.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (cuDNN / flash / efficient / math,
  chosen by torch), on CPU and CUDA; standard patterns only (``patterns.py``).
* ``varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention over packed ragged
  rows, CUDA, float16 / bfloat16); standard patterns only.

A call is described by :class:`PackedCall` (the keys are the call's own packed rows) or
:class:`CacheCall` (the keys are a layer's cache). The standard kernels read only what their
pattern needs: they are exact only for calls the classifier gave them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..ops import OpSet
from .patterns import Pattern


@dataclass
class PackedCall:
    """Attention of packed rows over the same rows.

    q ``[N, H, D]``, k/v ``[N, H_kv, D]``; cu_seqlens int32 ``[B + 1]`` (device); counts int64 ``[B]``
    (host, rows per sequence); pos/tag int32 ``[N]``; rule: ``meta.Rule``; scale: softmax scale.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    counts: torch.Tensor
    pos: torch.Tensor
    tag: torch.Tensor
    rule: int
    scale: float


@dataclass
class CacheCall:
    """Attention of packed new rows over a layer's paged cache, which already holds their own K/V.

    q ``[N, H, D]`` packed by cu_seqlens (device) / counts (host int64 ``[B]``); keys/values: the pool's
    pages ``[num_pages, page_size, H_kv, D]``; sequence b's keys are its first lengths[b] slots
    (int32 ``[B]`` device; host_lengths: the same, int64 host), slot s in page
    ``block_table[b, s // page_size]`` (int32 ``[B, max_pages]``, device); q_pos/q_tag int32 ``[N]``;
    pos_cache/tag_cache int32 ``[num_pages, page_size]``.
    """

    q: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens: torch.Tensor
    counts: torch.Tensor
    lengths: torch.Tensor
    host_lengths: torch.Tensor
    q_pos: torch.Tensor
    q_tag: torch.Tensor
    pos_cache: torch.Tensor
    tag_cache: torch.Tensor
    rule: int
    scale: float

    @property
    def page_size(self) -> int:
        return self.keys.shape[1]

    def slots(self, b: int, n: int) -> torch.Tensor:
        """int64 ``[n]`` on the device: flat indices of sequence b's first n slots in the pool viewed
        as ``[num_pages * page_size, ...]`` (computed on the device: no host read of the table)."""
        s = torch.arange(n, device=self.block_table.device)
        return self.block_table[b, s // self.page_size].long() * self.page_size + s % self.page_size

    def gather(self, pool: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """Sequence b's first n slots of ``pool`` (K, V, pos or tag pages), as ``[n, ...]`` (a copy)."""
        return pool.reshape(-1, *pool.shape[2:])[self.slots(b, n)]


class Ours:
    """skiplayers' own ops (any pattern)."""

    name = "ours"

    def __init__(self, ops: OpSet):
        self.ops = ops

    def unsupported(self, pattern: Pattern, device: torch.device, dtype: torch.dtype, head_dim: int,
                    page_size: int | None = None) -> str | None:
        return None

    def packed(self, c: PackedCall) -> torch.Tensor:
        return self.ops.varlen_attention(
            q=c.q, k=c.k, v=c.v, cu_seqlens_q=c.cu_seqlens, cu_seqlens_k=c.cu_seqlens, q_pos=c.pos, k_pos=c.pos,
            q_tag=c.tag, k_tag=c.tag, rule=c.rule, scale=c.scale,
        )

    def cache(self, c: CacheCall) -> torch.Tensor:
        return self.ops.cache_attention(
            q=c.q, k_cache=c.keys, v_cache=c.values, block_table=c.block_table, cu_seqlens_q=c.cu_seqlens,
            cache_seqlens=c.lengths, q_pos=c.q_pos, pos_cache=c.pos_cache, q_tag=c.q_tag, tag_cache=c.tag_cache,
            rule=c.rule, scale=c.scale, num_splits=0,
        )


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """``[..., T, H, D]`` -> ``[..., H, T, D]`` (a view: SDPA takes strided inputs)."""
    return x.transpose(-3, -2)


def _equal_nonzero(counts: list[int]) -> int | None:
    """The common row count of the sequences that have rows, or None if they differ (or none has)."""
    nonzero = {c for c in counts if c}
    return nonzero.pop() if len(nonzero) == 1 else None


class Sdpa:
    """torch's scaled_dot_product_attention: one batched call when the sequences have the same
    numbers of new rows (and, over the cache, of stored keys), else one call per sequence. Over a
    paged cache it first gathers each sequence's slots into contiguous K/V (a copy per call)."""

    name = "sdpa"

    def unsupported(self, pattern: Pattern, device: torch.device, dtype: torch.dtype, head_dim: int,
                    page_size: int | None = None) -> str | None:
        return "computes standard patterns only" if pattern == Pattern.PREDICATE else None

    def _sdpa(self, q, k, v, scale, causal=False, mask=None):
        gqa = q.shape[-3] != k.shape[-3]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)

    def packed(self, c: PackedCall) -> torch.Tensor:
        counts = c.counts.tolist()
        heads, dim = c.q.shape[1:]
        if c.q.shape[0] == 0:
            return torch.empty_like(c.q)
        n = _equal_nonzero(counts)
        if n is not None:  # the rows of the non-empty sequences tile [batch, n]
            shape = (c.q.shape[0] // n, n)
            q, k, v = (_heads_first(t.reshape(*shape, *t.shape[1:])) for t in (c.q, c.k, c.v))
            return _heads_first(self._sdpa(q, k, v, c.scale, causal=True)).reshape(-1, heads, dim)
        outs, start = [], 0
        for count in counts:
            if count:
                q, k, v = (_heads_first(t[start:start + count]) for t in (c.q, c.k, c.v))
                outs.append(_heads_first(self._sdpa(q, k, v, c.scale, causal=True)))
            start += count
        return torch.cat(outs)

    def cache(self, c: CacheCall) -> torch.Tensor:
        counts, lengths = c.counts.tolist(), c.host_lengths.tolist()
        heads, dim = c.q.shape[1:]
        if c.q.shape[0] == 0:
            return torch.empty_like(c.q)
        # One batched call only when every sequence reads the same number of slots; a ragged batch is
        # attended sequence by sequence (a padded batch would need a mask over padding, and any
        # NaN a padded key held would still poison SDPA's sum: NaN * 0).
        n = _equal_nonzero(counts)
        if n is not None and all(counts) and len(set(lengths)) == 1:
            q = _heads_first(c.q.reshape(len(counts), n, heads, dim))
            k = _heads_first(torch.stack([c.gather(c.keys, b, lengths[0]) for b in range(len(counts))]))
            v = _heads_first(torch.stack([c.gather(c.values, b, lengths[0]) for b in range(len(counts))]))
            mask = causal_lower_right(n, lengths[0]) if n > 1 else None
            return _heads_first(self._sdpa(q, k, v, c.scale, mask=mask)).reshape(-1, heads, dim)
        outs, start = [], 0
        for b, (count, length) in enumerate(zip(counts, lengths)):
            if count:
                q = _heads_first(c.q[start:start + count])
                k, v = _heads_first(c.gather(c.keys, b, length)), _heads_first(c.gather(c.values, b, length))
                mask = causal_lower_right(count, length) if count > 1 else None
                outs.append(_heads_first(self._sdpa(q, k, v, c.scale, mask=mask)))
            start += count
        return torch.cat(outs)


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn  # absent from older torch
    except ImportError:
        return None
    return varlen_attn


# FlashAttention-2's paged KV reads pages of a multiple of 256 slots only (its mha_varlen_fwd checks
# "Paged KV cache block size must be divisible by 256"); torch's varlen_attn runs it.
VARLEN_PAGE_MULTIPLE = 256


class VarlenAttn:
    """``torch.nn.attention.varlen.varlen_attn``: one call over the packed rows; over the paged
    cache, one call over the pool with ``block_table`` and ``seqused_k`` (its per-sequence lengths)."""

    name = "varlen_attn"

    def __init__(self):
        self.fn = _varlen_fn()
        self.params = set(inspect.signature(self.fn).parameters) if self.fn is not None else set()

    def unsupported(self, pattern: Pattern, device: torch.device, dtype: torch.dtype, head_dim: int,
                    page_size: int | None = None) -> str | None:
        if pattern == Pattern.PREDICATE:
            return "computes standard patterns only"
        if self.fn is None:
            return f"torch {torch.__version__} has no torch.nn.attention.varlen"
        # The arguments this adapter passes appeared over torch releases: 2.9 had is_causal only,
        # 2.10 scale and window_size, 2.12 enable_gqa and seqused_k (the documentation of each).
        if device.type != "cuda":
            return "flash attention runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return "flash attention takes float16 / bfloat16 only"
        if "scale" not in self.params:  # torch 2.9
            return "this torch's varlen_attn takes no softmax scale"
        if "enable_gqa" not in self.params:  # torch 2.10: whether GQA works is not documented there
            return "this torch's varlen_attn has no enable_gqa (grouped K/V heads)"
        if pattern != Pattern.VARLEN_CAUSAL:
            if "seqused_k" not in self.params or "block_table" not in self.params:
                return "this torch's varlen_attn takes no seqused_k / block_table (paged cache lengths)"
            if page_size is not None and page_size % VARLEN_PAGE_MULTIPLE:
                return (f"flash attention's paged KV takes pages of a multiple of {VARLEN_PAGE_MULTIPLE} slots "
                        f"(the SkipCache has {page_size}: SkipCache(page_size=256) lets it run)")
        return None

    def _call(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, **extra):
        kwargs = dict(scale=scale, **extra)
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)  # causal is a window (torch >= 2.10)
        kwargs["enable_gqa"] = q.shape[1] != k.shape[1]
        return self.fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    def packed(self, c: PackedCall) -> torch.Tensor:
        if c.q.shape[0] == 0:
            return torch.empty_like(c.q)
        longest = int(c.counts.max())
        return self._call(c.q, c.k, c.v, c.cu_seqlens, c.cu_seqlens, longest, longest, True, c.scale)

    def cache(self, c: CacheCall) -> torch.Tensor:
        if c.q.shape[0] == 0:
            return torch.empty_like(c.q)
        batch = c.block_table.shape[0]
        cu_k = torch.arange(batch + 1, device=c.q.device, dtype=torch.int32) * (c.block_table.shape[1] * c.page_size)
        max_q, max_k = int(c.counts.max()), int(c.host_lengths.max())
        # Flash aligns causality bottom-right, to each sequence's used keys: the new rows are the last ones.
        return self._call(c.q, c.keys, c.values, c.cu_seqlens, cu_k, max_q, max_k, max_q > 1, c.scale,
                          seqused_k=c.lengths.to(torch.int32), block_table=c.block_table)


STANDARD_KERNELS = {"sdpa": Sdpa, "varlen_attn": VarlenAttn}
