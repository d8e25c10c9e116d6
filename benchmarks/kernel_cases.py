"""The cases of the kernel benchmark (``benchmarks/bench_kernels.py``): one attention call each, in
the layout of the skiplayers ops, with its work counted in closed form (visible pairs, keys read,
FLOPs, bytes). ``gpu_cases`` are the benchmark's; ``smoke_cases`` the same constructors at tiny
sizes for the CPU run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from benchmarks.attention_inputs import (
    LLAMA3_8B,
    PAGE_SIZE,
    SMOLLM2,
    cu_seqlens,
    decode_metadata,
    dense_view,
    paged_kv,
    random_qkv,
)
from skiplayers.meta import TAG_CONTEXT, Rule

MODELS = {"smollm2": SMOLLM2, "llama3-8b": LLAMA3_8B, "smoke": (4, 2, 64)}  # heads, kv heads, head dim
RAGGED_PREFILL = [3000, 17, 1200, 640, 2048, 5, 900, 1500]
RAGGED_DECODE = [100, 4096, 700, 16384, 5, 2000, 9000, 300]





@dataclass
class Case:
    """One attention call, in the layout of the skiplayers ops (``args``, by schema name).

    Prefill: packed self-attention of sequences of ``seqs[b] = (n, c)`` tokens at positions 0..n-1,
    of which positions 1..c are context (hidden from every query by ``Rule.HIDE_CONTEXT``, or, with
    ``compacted``, dropped: the rows left keep their absolute positions). ``lengths``: rows per
    sequence as packed. Decode: one new query per sequence over paged caches of ``lengths[b]``
    keys (every key visible: positions 0..n-1, the query at n-1; the slots after them say 0)."""

    kind: str  # "prefill" or "decode"
    name: str
    model: str
    heads: int
    kv_heads: int
    dim: int
    args: dict
    lengths: list[int]
    seqs: list[tuple[int, int]] = field(default_factory=list)
    compacted: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.args["q"].dtype

    @property
    def device(self) -> torch.device:
        return self.args["q"].device

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def q_rows(self) -> int:
        return self.args["q"].shape[0]

    @property
    def hides_keys(self) -> bool:
        """Whether some key before a query is hidden from it (only our ops and masks express that)."""
        return self.kind == "prefill" and not self.compacted and any(c for _, c in self.seqs)

    def visible_pairs(self) -> int:
        """(query, key) pairs the predicate lets through, in closed form. A masked sequence of n
        tokens with context 1..c: query 0 sees 1 key, queries 1..c see key 0 only, query i > c sees
        key 0 and c+1..i: n + (n-1-c)(n-c)/2 in all. Compacted, the m = n - c rows left are causal:
        m(m+1)/2. Decode: every key of every cache."""
        if self.kind == "decode":
            return sum(self.lengths)
        if self.compacted:
            return sum((n - c) * (n - c + 1) // 2 for n, c in self.seqs)
        return sum(n + (n - 1 - c) * (n - c) // 2 for n, c in self.seqs)

    def keys_read(self) -> int:
        """Keys that at least one query sees (each read once): every non-context key."""
        return sum(self.lengths) if self.kind == "decode" else sum(n - c for n, c in self.seqs)

    def flops(self) -> int:
        """QK^T and PV over the visible pairs: 2 * 2 * head_dim FLOPs a pair and query head."""
        return 4 * self.dim * self.heads * self.visible_pairs()

    def bytes_moved(self) -> int:
        """q read and the output written once, K and V of ``keys_read`` keys read once."""
        elt = self.args["q"].element_size()
        return elt * (2 * self.q_rows * self.heads * self.dim + 2 * self.keys_read() * self.kv_heads * self.dim)


def prefill_case(name: str, model: str, seqs: list[tuple[int, int]], dtype, device, compacted: bool = False) -> Case:
    """Packed sequences ``seqs = [(n, c), ...]`` (see ``Case``), random q/k/v (``random_qkv``)."""
    heads, kv_heads, dim = MODELS[model]
    pos_parts, ctx_parts = [], []
    for n, c in seqs:
        if not 0 <= c < n:
            raise ValueError(f"context {c} must leave token 0 of a sequence of {n}")
        pos = torch.arange(n, dtype=torch.int32)
        ctx = (pos >= 1) & (pos <= c)
        if compacted:
            pos, ctx = pos[~ctx], ctx[~ctx]
        pos_parts.append(pos)
        ctx_parts.append(ctx)
    lengths = [p.numel() for p in pos_parts]
    pos, ctx = torch.cat(pos_parts).to(device), torch.cat(ctx_parts).to(device)
    tag = ctx.to(torch.int32) * TAG_CONTEXT
    q, k, v = random_qkv(sum(lengths), heads, kv_heads, dim, dtype, device)
    cu = cu_seqlens(lengths, device)
    hidden = bool(ctx.any())
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, q_pos=pos, k_pos=pos, q_tag=tag if hidden else None,
                k_tag=tag if hidden else None, rule=int(Rule.HIDE_CONTEXT) if hidden else 0, scale=dim**-0.5)
    return Case("prefill", name, model, heads, kv_heads, dim, args, lengths, list(seqs), compacted)


def decode_case(name: str, model: str, lengths: list[int], dtype, device, page_size: int = PAGE_SIZE,
                room: int = 64) -> Case:
    """One new token per sequence over paged caches of ``lengths`` keys and ``room`` more slots
    (``attention_inputs.paged_kv`` / ``decode_metadata``: pages in order)."""
    heads, kv_heads, dim = MODELS[model]
    capacity = max(lengths) + room
    k_cache, v_cache = paged_kv(len(lengths), capacity, kv_heads, dim, dtype, device, page_size)
    q = torch.randn(len(lengths), heads, dim, dtype=dtype, device=device)
    cu, cache_seqlens, q_pos, block_table, pos_cache = decode_metadata(lengths, capacity, device, page_size)
    # Slots past a sequence's length hold stale metadata, as freed or compacted slots do: position 0,
    # which the predicate alone would let through. Every implementation must stop at cache_seqlens.
    slots = dense_view(pos_cache, len(lengths))
    slots[torch.arange(slots.shape[1], device=device)[None, :] >= cache_seqlens[:, None]] = 0
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu,
                cache_seqlens=cache_seqlens, q_pos=q_pos, pos_cache=pos_cache, q_tag=None, tag_cache=None, rule=0,
                scale=dim**-0.5, num_splits=0)
    return Case("decode", name, model, heads, kv_heads, dim, args, list(lengths))


CaseList = list[tuple[str, Callable[[], Case]]]


def gpu_cases(dtype, device, quick: bool, page_size: int = PAGE_SIZE) -> CaseList:
    """The GPU run's cases as ``(name, constructor)``: a case's tensors exist only while it runs.
    The two models alternate, so that a budget spent early still leaves both measured alike."""
    per_model: dict[str, CaseList] = {}

    def add(name, make):
        per_model.setdefault(name.split()[0], []).append((name, lambda: make(name)))

    for m in ("smollm2", "llama3-8b"):
        for t in ((1024, 4096) if quick else (1024, 4096, 16384)):
            add(f"{m} causal T={t}", lambda name, m=m, t=t: prefill_case(name, m, [(t, 0)], dtype, device))
        add(f"{m} ragged B=8", lambda name, m=m: prefill_case(name, m, [(n, 0) for n in RAGGED_PREFILL], dtype, device))
        for form, compacted in (("masked", False), ("compacted", True)):
            add(f"{m} context-stopped 75% {form} T=4096",
                lambda name, m=m, c=compacted: prefill_case(name, m, [(4096, 3072)], dtype, device, c))
        for batch in (1, 8):
            for n in ((512, 8192) if quick else (512, 2048, 8192, 32768)):
                add(f"{m} decode B={batch} S={n}",
                    lambda name, m=m, b=batch, n=n: decode_case(name, m, [n] * b, dtype, device, page_size))
        add(f"{m} decode ragged B=8", lambda name, m=m: decode_case(name, m, RAGGED_DECODE, dtype, device, page_size))
    return [case for pair in zip(*per_model.values()) for case in pair]


def smoke_cases(dtype=torch.float32, device="cpu", page_size: int = 8) -> CaseList:
    """The same kinds of case at tiny sizes (4/2 heads, D=64: the Triton kernels' smallest head dim),
    lengths chosen so that FlexAttention blocks of 16 and pages of 8 are partly filled."""
    m = "smoke"
    specs: list[tuple[str, Callable[[str], Case]]] = [
        ("smoke causal T=50", lambda name: prefill_case(name, m, [(50, 0)], dtype, device)),
        ("smoke ragged B=3", lambda name: prefill_case(name, m, [(40, 0), (7, 0), (37, 0)], dtype, device)),
        ("smoke context-stopped masked B=2", lambda name: prefill_case(name, m, [(64, 40), (23, 9)], dtype, device)),
        ("smoke context-stopped compacted B=2",
         lambda name: prefill_case(name, m, [(64, 40), (23, 9)], dtype, device, True)),
        ("smoke decode B=1 S=37", lambda name: decode_case(name, m, [37], dtype, device, page_size, room=5)),
        ("smoke decode ragged B=3", lambda name: decode_case(name, m, [30, 70, 5], dtype, device, page_size, room=5)),
    ]
    return [(name, _named(make, name)) for name, make in specs]


def _named(make: Callable[[str], Case], name: str) -> Callable[[], Case]:
    return lambda: make(name)


