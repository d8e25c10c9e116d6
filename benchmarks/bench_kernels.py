"""Our attention ops (Triton, CUDA C++; on the CPU run also the C++ CPU ops and the PyTorch
reference) side by side with the peers a user would pick (SDPA, ``varlen_attn``, FlexAttention,
flash-attn): one registry of cases and implementations, one table, one row per case.

    python -m benchmarks.bench_kernels [--dtype float16] [--quick] [--budget-s 600] [--out DIR]
    python -m benchmarks.bench_kernels --smoke          # CPU, tiny shapes, seconds (CI: tests/test_bench_kernels_smoke.py)

Without a CUDA GPU (and without ``--smoke``) it prints why it skips and exits 0.

**Cases** (``gpu_cases``; SmolLM2 9/3 heads D=64 and Llama-3-8B 32/8 heads D=128): prefill dense
causal B=1 (T = 1k, 4k, 16k); prefill ragged (8 packed sequences); prefill context-stopped at a
layer >= ℓ (75% of T=4096 is context), *masked* (every row, context keys hidden by
``Rule.HIDE_CONTEXT``) and *compacted* (the query rows only, absolute positions); decode (one new
token per sequence over paged caches, pages of ``--page-size`` slots in order) at B = 1 and 8 and
512 .. 32k keys, and a ragged B=8 decode. ``--smoke`` runs the same constructors at tiny sizes
(``smoke_cases``).

**Implementations** (``IMPLEMENTATIONS``): a factory per column that takes a ``Case`` and an ``Env``
and returns a ``Built`` (a zero-argument call, how to read its output as packed ``[Nq, H, D]`` rows,
notes), or raises ``Unsupported(reason)``: the reason goes in the table.

* ours: ``triton`` (``skiplayers_triton::*``; on the CPU run under ``TRITON_INTERPRET=1``),
  ``cuda`` (``torch.ops.skiplayers``, when built with CUDA), ``cpu`` (the C++ CPU ops, CPU run
  only), ``ref`` (``skiplayers.reference``, the PyTorch truth, CPU run only);
* peers: ``sdpa`` (the backend torch picks, ``torch._fused_sdp_choice``, confirmed by forcing it
  with ``sdpa_kernel``; the first of cuDNN / flash / efficient / math that runs when that fails;
  named in ``sdpa_backend``); ``varlen_attn`` (``torch.nn.attention.varlen``, CUDA, when this torch
  has it); ``flex`` (FlexAttention with a block mask built per case from the case's metadata with
  our predicate, ``skiplayers.reference.visibility_mask``, and compiled per case after
  ``torch._dynamo.reset()``: ``flex_compiled`` says whether a graph was compiled for the case, as
  counted by dynamo, and ``flex_note`` why not); ``flash_attn`` (when it imports).

SDPA is the reference peer: ``<impl>_vs_sdpa`` is SDPA's ms / the implementation's ms (> 1: faster
than SDPA).

**Timing.** Prefill: ``triton.testing.do_bench`` median (synchronised, L2 flushed between runs).
Decode: the call captured once in a CUDA graph and its replays timed the same way (``<impl>_timing``
says which; an implementation that cannot be captured is timed eagerly and the reason given).
``<impl>_host_us``: the median wall-clock time of an eager call without synchronisation, i.e. what
the host spends issuing it (on the CPU run, where nothing is asynchronous, the whole call).

**Work is counted, not nominal** (closed forms per case, checked in CI against counts from the
reference mask): FLOPs = 4 * head_dim * heads * (visible (query, key) pairs); bytes = q read and the
output written once, plus K and V of every key that some query sees, read once (metadata excluded:
4 bytes a token against 2 * kv_heads * head_dim * 2). ``<impl>_flops_frac`` and ``<impl>_bw_frac``
are TFLOP/s and GB/s as fractions of the device's ceilings measured in the same run: a bf16 matmul
of 8192^3 and a 1 GiB device-to-device copy (read + write).

**Checks.** Before timing, each output (the replayed graph's, for decode) is compared with the
reference on ``checked_rows`` query rows (all of them on the CPU run; a sample of 128 otherwise)
under the project's tolerance (``skiplayers.tolerance``: twice the plain low-precision error of the
reference plus an absolute floor). A wrong output is not timed: its status says ``wrong``, and the
script exits 1.

Results: ``<out>/kernels.{json,csv,png}`` (``--out``, default ``benchmarks/results``; ``--smoke``
defaults to a temporary directory). Cases left when ``--budget-s`` is spent (checked between cases)
are listed in ``skipped_cases``.
"""

from __future__ import annotations

import importlib
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.attention_inputs import (
    LLAMA3_8B,
    PAGE_SIZE,
    SMOLLM2,
    cu_seqlens,
    decode_metadata,
    dense_view,
    pad_packed,
    paged_kv,
    random_qkv,
)
from benchmarks.baselines import flash_attn_or_reason
from benchmarks.common import RESULTS, arg_parser, error_summary, pyplot, save_figure, skip_without_cuda, write_results
from benchmarks.timing import gpu_median_ms, gpu_timer_name, timed
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import TAG_CONTEXT, Rule
from skiplayers.tolerance import attention_error

STEM = "kernels"
MODELS = {"smollm2": SMOLLM2, "llama3-8b": LLAMA3_8B, "smoke": (4, 2, 64)}  # heads, kv heads, head dim
RAGGED_PREFILL = [3000, 17, 1200, 640, 2048, 5, 900, 1500]
RAGGED_DECODE = [100, 4096, 700, 16384, 5, 2000, 9000, 300]
PEER = "sdpa"  # the reference peer of the ratio columns
CHECK_ROWS = 128  # query rows checked per case on the GPU (the reference is dense: [H, rows, keys])


class Unsupported(Exception):
    """An implementation cannot run a case (the message says why)."""


# --- cases -------------------------------------------------------------------------------------------


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


# --- implementations ---------------------------------------------------------------------------------


@dataclass
class Env:
    """What a run is: its device and dtype, and how FlexAttention runs (``flex_block``: block size of
    its block masks; ``flex_compile``: compile per case, else eager)."""

    device: torch.device
    smoke: bool
    flex_block: int = 128
    flex_compile: bool = True
    flex_backend: str = "inductor"  # torch.compile's backend ("eager" in the test of the compile bookkeeping)


@dataclass
class Built:
    """A runnable implementation of a case: ``fn()`` returns its own output, ``packed(out)`` reads
    that as packed ``[Nq, H, D]`` rows (outside the timed call); ``notes`` go into the row;
    ``after()``, if set, runs after timing and may add notes."""

    fn: Callable[[], torch.Tensor]
    packed: Callable[[torch.Tensor], torch.Tensor] = lambda out: out
    notes: dict = field(default_factory=dict)
    after: Callable[[], None] | None = None
    block_mask: object = None  # FlexAttention's, for the check that it equals our predicate's mask


def _ours(backend: str) -> Callable[[Case, Env], Built]:
    def factory(case: Case, env: Env) -> Built:
        if backend == "cuda":
            if case.device.type != "cuda":
                raise Unsupported("the CUDA kernels take CUDA tensors (this run is on the CPU)")
            if not sk_ops.cuda_kernels_built():
                raise Unsupported("skiplayers._C was built without CUDA kernels")
        if backend in ("cpu", "torch") and case.device.type != "cpu":
            raise Unsupported("CPU run only" if backend == "cpu" else
                              "the pure-PyTorch reference is what outputs are checked against; timed on the CPU run only")
        if backend == "triton" and case.device.type == "cpu":
            try:
                triton_kernels = importlib.import_module("skiplayers.triton_kernels")  # imports triton: only here
            except ImportError as err:
                raise Unsupported(f"the Triton backend does not import: {error_summary(err, 100)}") from err
            if not triton_kernels.interpreted():
                raise Unsupported("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
        ops = sk_ops.get_ops(backend)
        op = ops.varlen_attention if case.kind == "prefill" else ops.cache_attention
        args = case.args
        return Built(lambda: op(**args))

    return factory


def _prefill_mask(case: Case) -> torch.Tensor:
    """bool ``[B, 1, T, T]`` (T = the longest sequence, True = attend) for the padded batch: our
    predicate within each sequence; padding keys hidden; padding query rows see key 0 (their
    outputs are dropped; a row with no key would give NaN)."""
    a, t = case.args, max(case.lengths)
    mask = torch.zeros(case.batch, 1, t, t, dtype=torch.bool, device=case.device)
    mask[:, :, :, 0] = True
    cu = a["cu_seqlens_q"].tolist()
    tag = a["q_tag"] if a["q_tag"] is not None else torch.zeros_like(a["q_pos"])
    for b, n in enumerate(case.lengths):
        rows = slice(cu[b], cu[b + 1])
        pos = a["q_pos"][rows]
        mask[b, 0, :n, :n] = reference.visibility_mask(a["rule"], pos, tag[rows], pos, tag[rows])
    return mask


def _unpad(case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    """SDPA's padded ``[B, H, T, D]`` output as packed rows."""
    return lambda out: torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(case.lengths)])


def _dense_decode(case: Case) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The decode caches as contiguous ``[B, Hkv, S, D]`` K and V (S = the longest cache), copied
    outside the timed call: the layout SDPA-style kernels read best."""
    a, s = case.args, max(case.lengths)
    k, v = (dense_view(a[x], case.batch)[:, :s].transpose(1, 2).contiguous() for x in ("k_cache", "v_cache"))
    return k, v, s


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa_choice(q, k, v, mask, causal: bool) -> str | None:
    """The backend plain ``scaled_dot_product_attention`` picks for these inputs (torch's own
    ``_fused_sdp_choice``), or None where this torch cannot say."""
    from torch.nn.attention import SDPBackend

    try:
        index = torch._fused_sdp_choice(q, k, v, mask, 0.0, causal, scale=None, enable_gqa=True)
        chosen = SDPBackend(index).name
    except Exception:  # noqa: BLE001 - a private function: any failure means "cannot say"
        return None
    return {"CUDNN_ATTENTION": "cudnn", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
            "MATH": "math"}.get(chosen)


def sdpa(case: Case, env: Env) -> Built:
    """``F.scaled_dot_product_attention`` on contiguous ``[B, H, T, D]`` copies made outside the timed
    call (the layout it reads best): dense causal B=1 and compacted prefill with ``is_causal``;
    ragged and masked prefill padded to the longest sequence with a dense bool mask of our
    predicate; decode over ``[B, Hkv, S, D]`` caches (ragged: padded, with a key mask). The backend torch picks is confirmed by forcing it;
    if that fails, the first of cuDNN, flash, efficient, math that runs is forced in the call."""
    from torch.nn.attention import sdpa_kernel

    a, scale = case.args, case.args["scale"]
    mask = None
    if case.kind == "prefill":
        if case.batch == 1 and not case.hides_keys:
            q, k, v = (a[x].transpose(0, 1)[None].contiguous() for x in ("q", "k", "v"))
            causal = True
        else:
            q, k, v = (pad_packed(a[x], case.lengths).transpose(1, 2).contiguous() for x in ("q", "k", "v"))
            mask, causal = _prefill_mask(case), False
        packed = _unpad(case)
    else:
        q = a["q"][:, :, None]  # [B, H, 1, D]
        k, v, s = _dense_decode(case)
        if len(set(case.lengths)) > 1:
            mask = (torch.arange(s, device=case.device)[None, :] < a["cache_seqlens"][:, None])[:, None, None]
        causal = False

        def packed(out):
            return out[:, :, 0]

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)

    detected = _sdpa_choice(q, k, v, mask, causal)
    order = ([detected] if detected else []) + [b for b in SDPA_BACKENDS if b != detected]
    failures = []
    for name in order:
        try:
            with sdpa_kernel([_sdpa_backend(name)]):
                call()
        except RuntimeError as err:
            failures.append(f"{name}: {error_summary(err, 60)}")
            continue
        if name == detected:  # what a user's plain call runs: time it plain (no context manager per call)
            return Built(call, packed, {"sdpa_backend": f"{name} (torch's choice)"})

        def forced(name=name):
            with sdpa_kernel([_sdpa_backend(name)]):
                return call()

        why = "torch's choice unknown" if detected is None else f"torch's choice {detected} failed"
        return Built(forced, packed, {"sdpa_backend": f"{name} (forced; {why})"})
    raise Unsupported("no SDPA backend runs these inputs: " + "; ".join(failures))


def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_attn(case: Case, env: Env) -> Built:
    """``torch.nn.attention.varlen.varlen_attn`` (flash attention over packed rows, CUDA, half
    precision): causal prefill of packed sequences (a sequence whose keys are hidden cannot be
    expressed); decode over the rectangular cache's rows with ``seqused_k`` (torch >= 2.12). Where
    this torch has no ``enable_gqa``, K/V heads are repeated outside the timed call (noted)."""
    import inspect

    fn = _varlen_fn()
    if fn is None:
        raise Unsupported(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if case.device.type != "cuda":
        raise Unsupported("flash attention runs on CUDA only")
    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported("flash attention takes float16 / bfloat16 only")
    if case.hides_keys:
        raise Unsupported("cannot hide context keys inside a sequence (masked form)")
    params = set(inspect.signature(fn).parameters)
    a, notes = case.args, {}
    kwargs: dict = {"scale": a["scale"]} if "scale" in params else {}

    def heads(k, v):
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
            return k, v
        group = case.heads // case.kv_heads
        notes["varlen_note"] = "K/V heads repeated outside the call (this torch's varlen_attn has no enable_gqa)"
        return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

    if case.kind == "prefill":
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # causal, aligned bottom-right (torch >= 2.10)
        elif "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            raise Unsupported("this torch's varlen_attn takes neither window_size nor is_causal")
        k, v = heads(a["k"], a["v"])
        cu, longest = a["cu_seqlens_q"], max(case.lengths)
        return Built(lambda: fn(a["q"], k, v, cu, cu, longest, longest, **kwargs), notes=notes)
    if "seqused_k" not in params:
        raise Unsupported("this torch's varlen_attn takes no seqused_k (keys of a sequence fewer than its rows)")
    slots = a["k_cache"].shape[0] // case.batch * a["k_cache"].shape[1]  # rows of a sequence in the rectangular view
    k, v = (dense_view(a[x], case.batch).flatten(0, 1) for x in ("k_cache", "v_cache"))
    k, v = heads(k, v)
    cu_k = torch.arange(case.batch + 1, dtype=torch.int32, device=case.device) * slots
    lens, longest = a["cache_seqlens"], max(case.lengths)
    return Built(lambda: fn(a["q"], k, v, a["cu_seqlens_q"], cu_k, 1, longest, seqused_k=lens, **kwargs), notes=notes)


def flex_mask_mod(case: Case):
    """``(mask_mod, B, Q_LEN, KV_LEN)`` of the case in FlexAttention's layout, the mask evaluated by
    our predicate (``reference.visibility_mask``) on the case's own pos/tag metadata.

    Prefill: one batch of all packed rows, ``[1, H, N, D]``; query i sees key j iff they belong to
    the same sequence and the predicate holds. Decode: ``[B, H, 1, D]`` over the rectangular caches'
    first S = max(lengths) slots; slot j of sequence b is a key iff ``j < cache_seqlens[b]`` and the
    predicate holds for the query's and the slot's pos/tag."""
    a, rule = case.args, case.args["rule"]
    if case.kind == "prefill":
        seq = torch.repeat_interleave(torch.arange(case.batch, device=case.device),
                                      torch.tensor(case.lengths, device=case.device))
        pos = a["q_pos"]
        tag = a["q_tag"] if a["q_tag"] is not None else torch.zeros_like(pos)

        def prefill_mod(b, h, qi, ki):
            visible = reference.visibility_mask(rule, pos[qi][None], tag[qi][None], pos[ki][None], tag[ki][None])
            return (seq[qi] == seq[ki]) & visible[0, 0]

        return prefill_mod, 1, case.q_rows, case.q_rows
    s = max(case.lengths)
    lens, q_pos = a["cache_seqlens"], a["q_pos"]
    q_tag = a["q_tag"] if a["q_tag"] is not None else torch.zeros_like(q_pos)
    pos = dense_view(a["pos_cache"], case.batch)  # [B, slots]: the pages are in order
    tag = dense_view(a["tag_cache"], case.batch) if a["tag_cache"] is not None else torch.zeros_like(pos)

    def decode_mod(b, h, qi, ki):
        visible = reference.visibility_mask(rule, q_pos[b][None], q_tag[b][None], pos[b, ki][None], tag[b, ki][None])
        return (ki < lens[b]) & visible[0, 0]

    return decode_mod, case.batch, 1, s


def flex_block_mask(case: Case, block: int):
    """The case's FlexAttention ``BlockMask`` (``flex_mask_mod``), blocks of ``block`` queries and keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod, batch, q_len, kv_len = flex_mask_mod(case)
    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=case.device, BLOCK_SIZE=block)


def flex(case: Case, env: Env) -> Built:
    """FlexAttention with the case's own block mask (``flex_block_mask``). Compiled per case:
    ``torch._dynamo.reset()`` first, so that no case inherits another shape's graphs or hits the
    recompile limit (past it dynamo runs flex_attention eagerly: the materialised-scores path), and
    ``flex_compiled`` is True only if dynamo compiled a graph for this case's first call and none
    after it."""
    try:
        from torch._dynamo.utils import counters
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError as err:
        raise Unsupported(f"no FlexAttention: {err}") from err
    a = case.args
    block = flex_block_mask(case, env.flex_block)
    if case.kind == "prefill":
        q, k, v = (a[x].transpose(0, 1)[None].contiguous() for x in ("q", "k", "v"))  # [1, H, N, D]

        def packed(out):
            return out[0].transpose(0, 1)
    else:
        q = a["q"][:, :, None]
        k, v, _ = _dense_decode(case)

        def packed(out):
            return out[:, :, 0]

    kwargs = dict(block_mask=block, enable_gqa=True, scale=a["scale"])

    def eager():
        with warnings.catch_warnings():  # "called without torch.compile()": flex_note says so instead
            warnings.simplefilter("ignore", UserWarning)
            return flex_attention(q, k, v, **kwargs)

    if not env.flex_compile:
        why = "eager (the CPU smoke run: compiling per case takes seconds)" if env.smoke else "eager (--flex-eager)"
        return Built(eager, packed, {"flex_compiled": False, "flex_note": why}, block_mask=block)
    torch._dynamo.reset()
    # fullgraph: a graph break or the recompile limit raises instead of running parts eagerly.
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True, backend=env.flex_backend)
    before = counters["stats"]["unique_graphs"]
    start = time.perf_counter()
    try:
        compiled(q, k, v, **kwargs)
    except Exception as err:  # noqa: BLE001 - what a user without fullgraph gets: eager; the row says why
        note = f"compile failed ({error_summary(err, 120)}): ran eager"
        return Built(eager, packed, {"flex_compiled": False, "flex_note": note}, block_mask=block)
    compile_s = time.perf_counter() - start
    graphs = counters["stats"]["unique_graphs"] - before
    notes = {"flex_compiled": graphs > 0,
             "flex_note": f"compiled in {compile_s:.1f} s" if graphs else "no graph compiled: ran eager"}
    first = counters["stats"]["unique_graphs"]

    def after():
        extra = counters["stats"]["unique_graphs"] - first
        if extra:
            notes["flex_compiled"] = False
            notes["flex_note"] += f"; recompiled {extra} times while checked and timed"

    return Built(lambda: compiled(q, k, v, **kwargs), packed, notes, after, block_mask=block)


def flash_attn(case: Case, env: Env) -> Built:
    """flash-attn: ``flash_attn_varlen_func`` (causal) for prefill without hidden keys,
    ``flash_attn_with_kvcache`` over the rectangular caches (``cache_seqlens``) for decode."""
    fa, why = flash_attn_or_reason(160)
    if fa is None:
        raise Unsupported(f"flash-attn does not import: {why}")
    if case.device.type != "cuda":
        raise Unsupported("flash-attn runs on CUDA only")
    if case.hides_keys:
        raise Unsupported("cannot hide context keys inside a sequence (masked form)")
    a = case.args
    if case.kind == "prefill":
        cu, longest = a["cu_seqlens_q"], max(case.lengths)
        return Built(lambda: fa.flash_attn_varlen_func(a["q"], a["k"], a["v"], cu, cu, longest, longest,
                                                       softmax_scale=a["scale"], causal=True))
    k_cache, v_cache = (dense_view(a[x], case.batch) for x in ("k_cache", "v_cache"))
    return Built(lambda: fa.flash_attn_with_kvcache(a["q"][:, None], k_cache, v_cache,
                                                    cache_seqlens=a["cache_seqlens"], softmax_scale=a["scale"]),
                 lambda out: out[:, 0])


# The columns, in table order: ours, then the peers.
IMPLEMENTATIONS: dict[str, Callable[[Case, Env], Built]] = {
    "triton": _ours("triton"),
    "cuda": _ours("cuda"),
    "cpu": _ours("cpu"),
    "ref": _ours("torch"),
    "sdpa": sdpa,
    "varlen_attn": varlen_attn,
    "flex": flex,
    "flash_attn": flash_attn,
}

CASE_COLUMNS = ("case", "kind", "model", "heads", "kv_heads", "head_dim", "dtype", "batch", "q_rows", "keys_read",
                "visible_pairs", "gflop", "bytes_moved", "checked_rows", "sdpa_backend", "flex_compiled", "flex_note")
METRICS = ("ms", "vs_sdpa", "tflops", "gbps", "flops_frac", "bw_frac", "host_us", "timing", "max_abs_diff",
           "tolerance", "status")


def columns(impls) -> list[str]:
    """The table's columns: the case's, then each metric for every implementation side by side."""
    return [*CASE_COLUMNS, *(f"{impl}_{metric}" for metric in METRICS for impl in impls)]


# --- checks and timing -------------------------------------------------------------------------------


def check_rows(case: Case, limit: int | None) -> torch.Tensor:
    """The query rows whose outputs are checked: all (``limit`` None or at least the rows), else
    ``limit`` rows spread evenly plus each sequence's first and last row."""
    n = case.q_rows
    if limit is None or n <= limit:
        return torch.arange(n)
    cu = case.args["cu_seqlens_q"].cpu().long()
    rows = torch.cat([torch.linspace(0, n - 1, limit).long(), cu[:-1], cu[1:] - 1])
    return torch.unique(rows.clamp(0, n - 1))


def reference_rows(case: Case, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(truth, low)`` ``[len(rows), H, D]`` on the CPU: the reference's output for those query rows
    computed in float64 and in the case's dtype (the tolerance's two terms), from our predicate on
    each sequence's keys."""
    a, rule, scale = case.args, case.args["rule"], case.args["scale"]
    q_pos = a["q_pos"]
    q_tag = a["q_tag"] if a["q_tag"] is not None else torch.zeros_like(q_pos)
    cu = a["cu_seqlens_q"].tolist()
    rows_dev = rows.to(case.device)
    truth, low = [], []
    for b in range(case.batch):
        sel = rows_dev[(rows_dev >= cu[b]) & (rows_dev < cu[b + 1])]
        if sel.numel() == 0:
            continue
        if case.kind == "prefill":
            keys = slice(cu[b], cu[b + 1])
            k, v, k_pos = a["k"][keys], a["v"][keys], a["k_pos"][keys]
            k_tag = a["k_tag"][keys] if a["k_tag"] is not None else torch.zeros_like(k_pos)
        else:
            n, table = case.lengths[b], a["block_table"]
            k, v = (reference.gather_slots(a[x], table, b, n) for x in ("k_cache", "v_cache"))
            k_pos = reference.gather_slots(a["pos_cache"], table, b, n)
            k_tag = (reference.gather_slots(a["tag_cache"], table, b, n) if a["tag_cache"] is not None
                     else torch.zeros_like(k_pos))
        visible = reference.visibility_mask(rule, q_pos[sel], q_tag[sel], k_pos, k_tag)
        truth.append(reference.masked_attention(a["q"][sel], k, v, visible, scale, torch.float64).cpu())
        low.append(reference.masked_attention(a["q"][sel], k, v, visible, scale, case.dtype).cpu())
    return torch.cat(truth), torch.cat(low)


def graph_call(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], torch.Tensor], Callable[[], object]]:
    """``fn`` captured in a CUDA graph: ``(output, replay)``-style pair ``(result, replay)`` where
    ``result()`` returns the graph's output tensor (valid after a replay). Warm-up runs on a side
    stream first, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return (lambda: out), graph.replay


def host_us(fn: Callable[[], object], calls: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall-clock microseconds of ``calls`` eager calls of ``fn``, each timed without
    synchronising (what the host spends issuing it). With ``sync`` (a device), one call and a
    synchronisation first, and a synchronisation after (untimed)."""
    if sync is not None:
        fn()
        sync()
    times = [timed(fn)[1] for _ in range(calls)]
    if sync is not None:
        sync()
    return statistics.median(times) * 1e6


def device_ceilings() -> dict:
    """The device's measured ceilings: a bf16 matmul of 8192^3 (TFLOP/s = 2 n^3 / time) and a copy
    of 1 GiB between two device buffers (GB/s = 2 * bytes / time: read and write), timed as the
    kernels are (``gpu_median_ms``)."""
    n, nbytes = 8192, 2**30

    def matmul_ms() -> float:
        x, y = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        return gpu_median_ms(lambda: x @ y)

    def copy_ms() -> float:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        return gpu_median_ms(lambda: dst.copy_(src))

    ceilings = {"matmul_tflops": 2 * n**3 / matmul_ms() / 1e9, "copy_gbps": 2 * nbytes / copy_ms() / 1e6,
                "how": f"bf16 matmul {n}x{n}x{n}; device-to-device copy of 1 GiB (read + write); {gpu_timer_name()}"}
    torch.cuda.empty_cache()
    return ceilings


@dataclass
class Settings:
    check: bool = True
    check_limit: int | None = CHECK_ROWS
    repeats: int = 5  # host-clock repeats on the CPU run
    host_calls: int = 50


def run_impl(name: str, case: Case, env: Env, settings: Settings, truth, rows) -> dict:
    """One implementation on one case: ``{metric: value}`` (``status`` always) plus notes."""
    result: dict = {}
    try:
        built = IMPLEMENTATIONS[name](case, env)
    except Unsupported as why:
        return {"status": f"skipped: {why}"}
    except Exception as err:  # noqa: BLE001 - one failing implementation must not end the run
        return {"status": f"error: {error_summary(err, 160)}"}
    result.update(built.notes)
    on_gpu = case.device.type == "cuda"
    try:
        fn, timing = built.fn, "host clock (CPU run: ms and host_us are one measurement)"
        if on_gpu and case.kind == "decode":
            try:
                result_fn, replay = graph_call(built.fn)
                replay()

                def fn():  # replays the graph; the output tensor is the graph's
                    replay()
                    return result_fn()

                timing = "cuda graph replay"
            except Exception as err:  # noqa: BLE001 - an uncapturable call is timed eagerly, with the reason
                timing = f"eager (graph capture failed: {error_summary(err, 100)})"
                torch.cuda.synchronize()
        elif on_gpu:
            timing = "do_bench"
        first, first_s = timed(fn)
        out = built.packed(first)
        if settings.check:
            got = out[rows.to(out.device)]
            diff, bound = attention_error(got, *truth)
            result.update(max_abs_diff=diff, tolerance=bound)
            if not (diff <= bound):  # NaN fails too
                result["status"] = f"wrong: max |diff| {diff:.3g} > tolerance {bound:.3g}"
                if built.after:
                    built.after()
                result.update(built.notes)
                return result
        if on_gpu:
            ms = gpu_median_ms(fn)
            result["host_us"] = host_us(built.fn, settings.host_calls, torch.cuda.synchronize)
        else:  # the CPU run: the checked call above was the warm-up. Nothing runs asynchronously
            # there, so the host's time per call is the call's time: one measurement, both columns.
            # Slow calls (Triton's interpreter, eager FlexAttention) are not repeated: ~50 ms each at most.
            ms = host_us(built.fn, max(1, min(settings.repeats, int(0.05 / max(first_s, 1e-6))))) / 1e3
            result["host_us"] = ms * 1e3
        if built.after:
            built.after()
        result.update(built.notes)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: the row says so, the run goes on
        result["status"] = f"error: {error_summary(err, 160)}"
        return result
    result.update(ms=ms, timing=timing, tflops=case.flops() / ms / 1e9, gbps=case.bytes_moved() / ms / 1e6,
                  status="ok")
    return result


def run_case(case: Case, env: Env, impls: list[str], settings: Settings, ceilings: dict) -> dict:
    """The table row of one case (``columns``)."""
    rows = check_rows(case, settings.check_limit)
    truth = reference_rows(case, rows) if settings.check else None
    row: dict = dict.fromkeys(columns(impls))
    row.update(case=case.name, kind=case.kind, model=case.model, heads=case.heads, kv_heads=case.kv_heads,
               head_dim=case.dim, dtype=str(case.dtype).removeprefix("torch."), batch=case.batch, q_rows=case.q_rows,
               keys_read=case.keys_read(), visible_pairs=case.visible_pairs(), gflop=case.flops() / 1e9,
               bytes_moved=case.bytes_moved(), checked_rows=len(rows) if settings.check else 0)
    results = {}
    for name in impls:
        res = run_impl(name, case, env, settings, truth, rows)
        for note in ("sdpa_backend", "flex_compiled", "flex_note"):
            if note in res:
                row[note] = res.pop(note)
        if "varlen_note" in res:
            res["timing"] = f"{res.get('timing', '')}; {res.pop('varlen_note')}"
        results[name] = res
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    peer_ms = results.get(PEER, {}).get("ms")
    for name, res in results.items():
        if "ms" in res:
            if peer_ms:
                res["vs_sdpa"] = peer_ms / res["ms"]
            if "matmul_tflops" in ceilings:
                res["flops_frac"] = res["tflops"] / ceilings["matmul_tflops"]
                res["bw_frac"] = res["gbps"] / ceilings["copy_gbps"]
        for metric, value in res.items():
            row[f"{name}_{metric}"] = value
    return row


# --- output ------------------------------------------------------------------------------------------


def _cell(row: dict, impl: str) -> str:
    status = row[f"{impl}_status"] or ""
    if status == "ok":
        ratio = row[f"{impl}_vs_sdpa"]
        return f"{row[f'{impl}_ms']:9.4f}" + (f" x{ratio:5.2f}" if ratio is not None else "       ")
    return f"{status.split(':')[0]:>16}"


def print_table(rows: list[dict], impls: list[str]) -> None:
    """One line a case: each implementation's median ms and its speed relative to SDPA; then the
    reasons of the cells that did not run."""
    print(f"{'case':44} " + " ".join(f"{impl:>16}" for impl in impls))
    for row in rows:
        print(f"{row['case'][:44]:44} " + " ".join(_cell(row, impl) for impl in impls))
    reasons: dict[str, set[str]] = {}
    for row in rows:
        for impl in impls:
            status = row[f"{impl}_status"] or ""
            if status != "ok":
                reasons.setdefault(impl, set()).add(status if status.startswith("skipped") else f"{row['case']}: {status}")
    for impl, why in reasons.items():
        for line in sorted(why):
            print(f"  {impl}: {line}")
    for row in rows:
        notes = [f"sdpa={row['sdpa_backend']}"] if row["sdpa_backend"] else []
        if row["flex_compiled"] is not None:
            notes.append(f"flex compiled={row['flex_compiled']} ({row['flex_note']})")
        if notes:
            print(f"  {row['case']}: {', '.join(notes)}")


def plot(rows: list[dict], impls: list[str], path: Path) -> bool:
    """Horizontal bars: each implementation's speed relative to SDPA, per case (log scale).
    Returns False where matplotlib is missing."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    shown = [impl for impl in impls if impl != PEER and any(r[f"{impl}_vs_sdpa"] for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(1, len(rows)) * max(1, len(shown)) / 2 + 1.5))
    height = 0.8 / max(1, len(shown))
    for i, impl in enumerate(shown):
        values = [r[f"{impl}_vs_sdpa"] or float("nan") for r in rows]
        ax.barh([y + i * height for y in range(len(rows))], values, height=height, label=impl)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], [r["case"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("SDPA ms / implementation ms (> 1: faster than SDPA)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


# --- driver ------------------------------------------------------------------------------------------


def main(argv=None, reexec: bool = False) -> int:
    """Runs the benchmark; returns the exit status. ``reexec`` (the command line): a ``--smoke`` run
    whose process imported triton without ``TRITON_INTERPRET=1`` starts itself again with it."""
    parser = arg_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32: the plumbing (CI)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default float16 (float32 with --smoke)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--budget-s", type=float, default=600.0, help="no case starts after this many seconds")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated columns to run")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output comparison")
    parser.add_argument("--page-size", type=int, default=None, help="slots per page (default 16; 8 with --smoke)")
    parser.add_argument("--flex-block", type=int, default=None, help="FlexAttention block size (128; 16 with --smoke)")
    parser.add_argument("--flex-compile", dest="flex_compile", action="store_true", default=None,
                        help="compile FlexAttention per case (the default on a GPU)")
    parser.add_argument("--flex-eager", dest="flex_compile", action="store_false", help="run FlexAttention eagerly")
    parser.add_argument("--out", type=Path, default=None, help="directory of kernels.{json,csv,png}")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    impls = [name for name in args.impls.split(",") if name]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}; choose from {list(IMPLEMENTATIONS)}")

    if args.smoke:
        # The Triton kernels run on CPU tensors under the interpreter, which must be chosen before
        # triton.language is first imported (importing skiplayers does): the same command again.
        if reexec and "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        dtype = getattr(torch, args.dtype or "float32")
        device = torch.device("cpu")
        page_size = args.page_size or 8
        env = Env(device, smoke=True, flex_block=args.flex_block or 16, flex_compile=bool(args.flex_compile))
        constructors = smoke_cases(dtype, device, page_size)
        settings = Settings(args.check, check_limit=None, repeats=5, host_calls=1)
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_kernels_smoke_"))
        ceilings = {"skipped": "CPU smoke run: the ceilings (bf16 matmul, device-to-device copy) are measured on a GPU"}
        graphs = "skipped: CPU smoke run (CUDA graphs need a GPU); every call is timed eagerly by the host clock"
    else:
        if skip_without_cuda("bench_kernels"):
            return 0
        dtype = getattr(torch, args.dtype or "float16")
        device = torch.device("cuda")
        page_size = args.page_size or PAGE_SIZE
        env = Env(device, smoke=False, flex_block=args.flex_block or 128,
                  flex_compile=args.flex_compile is not False)
        constructors = gpu_cases(dtype, device, args.quick, page_size)
        settings = Settings(args.check)
        out_dir = args.out or RESULTS
        ceilings = device_ceilings()
        print(f"ceilings: {ceilings['matmul_tflops']:.0f} TFLOP/s, {ceilings['copy_gbps']:.0f} GB/s ({ceilings['how']})")
        graphs = "decode: CUDA graph replays; prefill: do_bench of eager calls"

    torch.manual_seed(0)
    rows: list[dict] = []
    skipped_cases: list[str] = []
    threads = torch.get_num_threads()
    if args.smoke:  # tiny calls: a second OpenMP thread only adds waits for it (a time slice, on a busy machine)
        torch.set_num_threads(1)
    try:
        for name, make in constructors:
            if args.cases not in name:
                continue
            if time.perf_counter() - began > args.budget_s:
                skipped_cases.append(name)
                continue
            case = make()
            with torch.no_grad():
                row = run_case(case, env, impls, settings, ceilings)
            rows.append(row)
            print(f"{row['case']:44} " + " ".join(_cell(row, impl) for impl in impls), flush=True)
            del case
    finally:
        torch.set_num_threads(threads)
    print()
    print_table(rows, impls)
    meta = {"dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke, "quick": args.quick, "page_size": page_size,
            "flex_block": env.flex_block, "flex_compile": env.flex_compile, "timing": graphs,
            "gpu_timer": gpu_timer_name() if not args.smoke else None, "ceilings": ceilings,
            "reference_peer": PEER, "columns": columns(impls), "skipped_cases": skipped_cases,
            "elapsed_s": round(time.perf_counter() - began, 1)}
    json_path, csv_path = write_results(STEM, rows, meta, out_dir)
    png = out_dir / f"{STEM}.png"
    wrote = [json_path, csv_path] + ([png] if plot(rows, impls, png) else [])
    print(f"wrote {', '.join(map(str, wrote))}; {meta['elapsed_s']} s; skipped cases: {len(skipped_cases)}")
    wrong = [(r["case"], impl) for r in rows for impl in impls if (r[f"{impl}_status"] or "").startswith("wrong")]
    if wrong:
        print(f"WRONG outputs: {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
