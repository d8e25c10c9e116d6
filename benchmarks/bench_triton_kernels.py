"""GPU benchmark of the Triton attention kernels against SDPA, FlexAttention, flash-attn and (when
built) the CUDA C++ ops, side by side.

    python -m benchmarks.bench_triton_kernels [--dtype float16] [--quick] [--no-check] [--page-size 16]

Needs a CUDA GPU; elsewhere it prints why it skips and exits 0. Times are ``triton.testing.do_bench``
medians (it synchronises and flushes the L2 cache between runs). Work is *counted*, not nominal:

* FLOPs = 4 * head_dim * query_heads * (visible (query, key) pairs), i.e. QK^T and PV over the pairs
  the mask lets through (a causal square counts T(T+1)/2 pairs, not T^2);
* bytes = the q, k, v (or the visible part of the caches) read once plus the output written once.

Cases: prefill dense causal (B=1), prefill ragged (8 packed sequences), prefill context-stopped at a
layer >= ℓ (compacted: only the query rows; masked: every row, context keys hidden by the rule), and
decode (one new token per sequence, B=1 and B=8, several cache lengths; our ops read paged caches,
pages of ``--page-size`` slots in order, the others the same memory as rectangular caches, through
``attention_inputs.dense_view``). Every implementation of a
case is checked against the Triton result first (``max_abs_diff`` column) unless ``--no-check``.

Implementations are a dict of named factories (``IMPLEMENTATIONS``): each returns a zero-argument
callable for a case, or raises ``Unsupported`` with the reason. Add a backend by adding an entry;
"cuda" (``torch.ops.skiplayers.*``) is included when ``skiplayers.ops.cuda_kernels_built()``.
Results: ``benchmarks/results/triton_kernels.{json,csv}``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

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
from benchmarks.baselines import block_mask, compiled_flex_attention, flash_attn_or_reason, flash_varlen
from benchmarks.common import arg_parser, error_summary, skip_without_cuda, write_results
from benchmarks.timing import gpu_median_ms
from skiplayers import ops as sk_ops
from skiplayers.meta import TAG_CONTEXT, Rule

MODELS = {"smollm2": SMOLLM2, "llama-7b": (32, 32, 128), "llama3-8b": LLAMA3_8B}  # heads, kv heads, dim


class Unsupported(Exception):
    """An implementation cannot run a case (the message says why)."""


@dataclass
class Case:
    kind: str  # "prefill" or "decode"
    name: str
    heads: int
    kv_heads: int
    dim: int
    args: dict  # the skiplayers op's arguments
    visible_pairs: int
    bytes_moved: int
    lengths: list = field(default_factory=list)  # per-sequence query lengths (prefill) / cache lengths (decode)
    context: torch.Tensor | None = None  # bool per key row, for masked variants


# --- cases -------------------------------------------------------------------------------------------


def prefill_case(name, lengths, model, dtype, device, context_fraction=0.0, compacted=False) -> Case:
    """Self-attention of packed sequences. With ``context_fraction``, that share of each sequence
    (after its first token) is context hidden from every query (Rule.HIDE_CONTEXT); ``compacted``
    drops those rows instead (the fast path at layers >= ℓ), keeping absolute positions."""
    heads, kv_heads, dim = model
    pos_parts, ctx_parts = [], []
    for n in lengths:
        c = int(n * context_fraction)
        ctx = torch.zeros(n, dtype=torch.bool)
        ctx[1:1 + c] = True
        pos = torch.arange(n, dtype=torch.int32)
        if compacted:
            pos, ctx = pos[~ctx], ctx[~ctx]
        pos_parts.append(pos)
        ctx_parts.append(ctx)
    kept = [p.numel() for p in pos_parts]
    total = sum(kept)
    pos, ctx = torch.cat(pos_parts).to(device), torch.cat(ctx_parts).to(device)
    tag = ctx.to(torch.int32) * TAG_CONTEXT
    rule = Rule.HIDE_CONTEXT if ctx.any() else 0
    q, k, v = random_qkv(total, heads, kv_heads, dim, dtype, device)
    cu = cu_seqlens(kept, device)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, q_pos=pos, k_pos=pos, q_tag=tag, k_tag=tag,
                rule=rule, scale=dim**-0.5)
    pairs = 0
    for c in ctx_parts:  # per query: the non-hidden keys at or before its position
        seen = torch.cumsum((~c).long(), 0)
        pairs += int(seen.sum())
    nbytes = (q.numel() * 2 + k.numel() + v.numel()) * q.element_size()
    return Case("prefill", name, heads, kv_heads, dim, args, pairs, nbytes, kept, ctx)


def decode_case(name, batch, cache_len, model, dtype, device, page_size: int = PAGE_SIZE) -> Case:
    """One new token per sequence over paged caches of ``cache_len`` keys (room for 64 more), pages of
    ``page_size`` slots in order (``attention_inputs.paged_kv``)."""
    heads, kv_heads, dim = model
    cap = cache_len + 64
    k_cache, v_cache = paged_kv(batch, cap, kv_heads, dim, dtype, device, page_size)
    q = torch.randn(batch, heads, dim, dtype=dtype, device=device)
    cu, cache_seqlens, q_pos, block_table, pos_cache = decode_metadata([cache_len] * batch, cap, device, page_size)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu,
                cache_seqlens=cache_seqlens, q_pos=q_pos, pos_cache=pos_cache, q_tag=None, tag_cache=None, rule=0,
                scale=dim**-0.5, num_splits=0)
    nbytes = (2 * batch * cache_len * kv_heads * dim + 2 * q.numel()) * q.element_size()
    return Case("decode", name, heads, kv_heads, dim, args, batch * cache_len, nbytes, [cache_len] * batch)


def all_cases(dtype, device, quick: bool, page_size: int = PAGE_SIZE) -> list[Case]:
    cases = []
    for model in ("smollm2", "llama3-8b"):
        dims = MODELS[model]
        for t in ((1024, 4096) if quick else (1024, 4096, 16384)):
            cases.append(prefill_case(f"{model} causal T={t}", [t], dims, dtype, device))
        ragged = [3000, 17, 1200, 640, 2048, 5, 900, 1500]
        cases.append(prefill_case(f"{model} ragged B=8", ragged, dims, dtype, device))
        for form, compacted in (("masked", False), ("compacted", True)):
            cases.append(prefill_case(f"{model} context-stopped 75% {form} T=4096", [4096], dims, dtype, device,
                                      context_fraction=0.75, compacted=compacted))
        for batch in (1, 8):
            for n in ((512, 8192) if quick else (512, 2048, 8192, 32768)):
                cases.append(decode_case(f"{model} decode B={batch} S={n}", batch, n, dims, dtype, device,
                                         page_size))
    return cases


# --- implementations ------------------------------------------------------------------------------------


def _skiplayers_op(ops_getter: Callable[[], sk_ops.OpSet]):
    def factory(case: Case):
        ops = ops_getter()
        fn = ops.varlen_attention if case.kind == "prefill" else ops.cache_attention
        return lambda: fn(**case.args)

    return factory


def _padded_prefill(case: Case):
    """[B, H, T, D] views for SDPA: padded to the longest sequence, plus a [B, 1, T, T] bool mask
    (causal by position, hidden context, padding). Built outside the timed call."""
    a, lengths = case.args, case.lengths
    batch, t = len(lengths), max(lengths)
    q, k, v = (pad_packed(a[x], lengths) for x in ("q", "k", "v"))
    mask = torch.zeros(batch, 1, t, t, dtype=torch.bool, device=a["q"].device)
    cu = a["cu_seqlens_q"].tolist()
    for b, n in enumerate(lengths):
        rows = slice(cu[b], cu[b + 1])
        pos, ctx = a["q_pos"][rows], case.context[rows]
        mask[b, 0, :n, :n] = (pos[None, :] <= pos[:, None]) & ~ctx[None, :]
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask


def _unpad(out, case):
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(case.lengths)])


def sdpa(case: Case):
    if case.kind == "prefill":
        q, k, v, mask = _padded_prefill(case)
        plain_causal = len(case.lengths) == 1 and not case.context.any()
        if plain_causal:
            return lambda: _unpad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), case)
        return lambda: _unpad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), case)
    a, n, batch = case.args, case.lengths[0], len(case.lengths)
    q = a["q"][:, :, None]  # [B, H, 1, D]
    k = dense_view(a["k_cache"], batch)[:, :n].transpose(1, 2)
    v = dense_view(a["v_cache"], batch)[:, :n].transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)[:, :, 0]


def flex(case: Case):
    try:
        compiled = compiled_flex_attention()
    except ImportError as err:
        raise Unsupported(f"no FlexAttention: {err}") from err
    a = case.args
    if case.kind == "prefill":  # packed form: one "batch" of all rows, documents by cu_seqlens
        doc = torch.repeat_interleave(torch.arange(len(case.lengths), device=a["q"].device),
                                      torch.tensor(case.lengths, device=a["q"].device))
        pos, ctx = a["q_pos"], case.context

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (pos[ki] <= pos[qi]) & ~ctx[ki]

        n = a["q"].shape[0]
        block = block_mask(mask_mod, n, a["q"].device)
        q, k, v = (a[x].transpose(0, 1)[None] for x in ("q", "k", "v"))
        return lambda: compiled(q, k, v, block_mask=block, enable_gqa=True)[0].transpose(0, 1)
    n, batch = case.lengths[0], len(case.lengths)
    q = a["q"][:, :, None]
    k, v = (dense_view(a[x], batch)[:, :n].transpose(1, 2) for x in ("k_cache", "v_cache"))
    return lambda: compiled(q, k, v, enable_gqa=True)[:, :, 0]


def flash_attn(case: Case):
    fa, why = flash_attn_or_reason(200)
    if fa is None:
        raise Unsupported(f"flash-attn does not import: {why}")
    a = case.args
    if case.kind == "prefill":
        if case.context.any():
            raise Unsupported("flash-attn cannot hide context keys inside a sequence (masked form)")
        return flash_varlen(fa, a["q"], a["k"], a["v"], a["cu_seqlens_q"], max(case.lengths), a["scale"])
    k_cache, v_cache = (dense_view(a[x], len(case.lengths)) for x in ("k_cache", "v_cache"))
    return lambda: fa.flash_attn_with_kvcache(a["q"][:, None], k_cache, v_cache,
                                              cache_seqlens=a["cache_seqlens"], softmax_scale=a["scale"])[:, 0]


def implementations() -> dict[str, Callable[[Case], Callable[[], torch.Tensor]]]:
    impls = {"triton": _skiplayers_op(lambda: sk_ops.get_ops("triton"))}
    if sk_ops.cuda_kernels_built():
        impls["cuda"] = _skiplayers_op(lambda: sk_ops.get_ops("cuda"))
    impls.update(sdpa=sdpa, flex=flex, flash_attn=flash_attn)
    return impls


# --- driver ------------------------------------------------------------------------------------------------


def run(cases: list[Case], check: bool) -> list[dict]:
    rows = []
    for case in cases:
        reference_out = None
        for name, factory in implementations().items():
            row = dict(kind=case.kind, case=case.name, impl=name, heads=case.heads, kv_heads=case.kv_heads,
                       head_dim=case.dim, dtype=str(case.args["q"].dtype).removeprefix("torch."))
            try:
                fn = factory(case)
                out = fn()
                if reference_out is None:
                    reference_out = out
                elif check:
                    row["max_abs_diff"] = (out.float() - reference_out.float()).abs().max().item()
                ms = gpu_median_ms(fn)
            except Unsupported as why:
                row["skipped"] = str(why)
                rows.append(row)
                print(f"{case.name:48s} {name:10s} skipped: {why}")
                continue
            except Exception as err:  # noqa: BLE001  (one failing implementation must not end the run)
                row["error"] = error_summary(err, 200)
                rows.append(row)
                print(f"{case.name:48s} {name:10s} ERROR {row['error']}")
                continue
            flops = 4 * case.dim * case.heads * case.visible_pairs
            row.update(ms=ms, tflops=flops / ms / 1e9, gbps=case.bytes_moved / ms / 1e6)
            rows.append(row)
            diff = f"  diff {row['max_abs_diff']:.2e}" if "max_abs_diff" in row else ""
            print(f"{case.name:48s} {name:10s} {ms * 1e3:10.1f} us {row['tflops']:8.2f} TFLOP/s {row['gbps']:8.1f} GB/s{diff}")
    return rows


def main(argv=None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output comparison")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="slots per page of the decode caches")
    args = parser.parse_args(argv)
    if skip_without_cuda("bench_triton_kernels"):
        return 0
    torch.manual_seed(0)
    cases = all_cases(getattr(torch, args.dtype), torch.device("cuda"), args.quick, args.page_size)
    rows = run(cases, args.check)
    json_path, csv_path = write_results("triton_kernels", rows, {"dtype": args.dtype, "quick": args.quick,
                                                                 "page_size": args.page_size})
    print(f"wrote {json_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
