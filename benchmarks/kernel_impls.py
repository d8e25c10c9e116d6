"""The implementations of the kernel benchmark (``benchmarks/bench_kernels.py``): a factory per
table column that takes a ``Case`` and an ``Env`` and returns a ``Built`` (a zero-argument call and
how to read its output), or raises ``Unsupported(reason)``. Ours (triton, cuda, cpu, ref) and the
peers (SDPA with its backend named, varlen_attn, FlexAttention with our predicate's block mask
compiled per case, flash-attn)."""

from __future__ import annotations

import importlib
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.attention_inputs import (
    dense_view,
    pad_packed,
)
from benchmarks.baselines import flash_attn_or_reason
from benchmarks.common import error_summary
from benchmarks.kernel_cases import Case
from skiplayers import ops as sk_ops
from skiplayers import reference


class Unsupported(Exception):
    """An implementation cannot run a case (the message says why)."""





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


def _with_cuda_generation(fn: Callable[[], torch.Tensor], generation: str) -> Callable[[], torch.Tensor]:
    """``fn`` run with ``SKIPLAYERS_CUDA_KERNELS=generation`` (the CUDA launchers read it per call,
    csrc/cuda/kernel_generation.h), so the stable and next columns time their own kernels in one
    process whatever the caller's environment says."""
    def call():
        before = os.environ.get("SKIPLAYERS_CUDA_KERNELS")
        os.environ["SKIPLAYERS_CUDA_KERNELS"] = generation
        try:
            return fn()
        finally:
            if before is None:
                del os.environ["SKIPLAYERS_CUDA_KERNELS"]
            else:
                os.environ["SKIPLAYERS_CUDA_KERNELS"] = before

    return call


def _ours(backend: str, cuda_generation: str = "stable") -> Callable[[Case, Env], Built]:
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
        if backend == "cuda":
            return Built(_with_cuda_generation(lambda: op(**args), cuda_generation))
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
    "cuda_next": _ours("cuda", cuda_generation="next"),
    "cpu": _ours("cpu"),
    "ref": _ours("torch"),
    "sdpa": sdpa,
    "varlen_attn": varlen_attn,
    "flex": flex,
    "flash_attn": flash_attn,
}

