"""The CUDA C++ attention kernels against PyTorch's SDPA (and FlexAttention / flash-attn when
importable), on one GPU.

Cases (SmolLM2's 9 query / 3 KV heads unless noted; --dtype, default bfloat16):

* prefill, dense causal, B=1, T=2048, head dim 64 and 128;
* prefill, ragged: 8 sequences of different lengths, packed for us; SDPA pads to the longest and
  takes a dense [B, 1, T, T] causal + padding mask;
* prefill, context-stopped: one sequence of c context + q query tokens at a layer >= ℓ. SDPA runs
  the masked form (all rows, dense mask hiding the context keys); we run the compacted form (the q
  rows only) and, for reference, our masked form (Rule.HIDE_CONTEXT, which skips hidden key blocks);
* decode: one new token per sequence over caches of 512 .. 16384 keys, B=1 and B=8, and a ragged
  B=8 batch (SDPA pads it and masks). Our op reads paged caches (pages of ``--page-size`` slots, in
  order); SDPA and flash-attn read the same memory as rectangular caches
  (``attention_inputs.dense_view``).

Times are medians of ``triton.testing.do_bench`` (which clears the L2 cache between runs) or, when
triton is missing, of CUDA-event timings. Throughput comes from counted work, the same for every
variant of a case: TFLOP/s = 4 * D * (visible query-key pairs) * heads / time (QK^T and PV), and for
decode GB/s = (K and V bytes of the keys each sequence must read + q + out) / time.
Writes results/cuda_kernels.{json,csv}. Without a GPU (or without the CUDA kernels) it prints why
and exits 0.

    python -m benchmarks.bench_cuda_kernels [--dtype bfloat16] [--quick] [--page-size 16]
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.attention_inputs import (
    PAGE_SIZE,
    SMOLLM2,
    context_stopped_problem,
    decode_metadata,
    dense_view,
    packed_problem,
    pad_packed,
    paged_kv,
    ragged_causal_mask,
    sdpa_layout,
)
from benchmarks.baselines import causal_block_mask, flash_attn_or_reason, flash_varlen, flex_attention_or_reason
from benchmarks.common import arg_parser, error_summary, skip_without_cuda, write_results
from benchmarks.timing import gpu_median_ms, gpu_timer_name
from skiplayers.meta import Rule

HEADS, KV_HEADS, _ = SMOLLM2  # head dims vary by case
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


# --- prefill --------------------------------------------------------------------------------------


def prefill_dense(T, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    q, k, v, cu, pos = packed_problem([T], HEADS, KV_HEADS, dim, dtype, dev)
    qs, ks, vs = sdpa_layout(q, k, v)
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, scale),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True, scale=scale),
    }
    flex, _ = extras["flex"]
    if flex is not None:
        try:  # compiles on the first call; a failure is reported, not fatal
            block = causal_block_mask(T, dev)
            flex(qs, ks, vs, block_mask=block, enable_gqa=True, scale=scale)
            variants["flex_attention"] = lambda: flex(qs, ks, vs, block_mask=block, enable_gqa=True, scale=scale)
        except Exception as err:  # noqa: BLE001
            print(f"flex_attention skipped for this case: {error_summary(err, 160)}")
    fa = extras["flash_attn"][0]
    if fa is not None and dtype != torch.float32:
        variants["flash_attn_varlen"] = flash_varlen(fa, q, k, v, cu, T, scale)
    return variants, "sdpa_causal", dict(flops=4 * dim * HEADS * _causal_pairs(T))


def prefill_ragged(lengths, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    q, k, v, cu, pos = packed_problem(lengths, HEADS, KV_HEADS, dim, dtype, dev)
    qs, ks, vs = (pad_packed(t, lengths).transpose(1, 2).contiguous() for t in (q, k, v))
    mask = ragged_causal_mask(lengths, dev)
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, scale),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=scale),
    }
    fa = extras["flash_attn"][0]
    if fa is not None and dtype != torch.float32:
        variants["flash_attn_varlen"] = flash_varlen(fa, q, k, v, cu, max(lengths), scale)
    return variants, "sdpa_dense_mask", dict(flops=4 * dim * HEADS * sum(_causal_pairs(n) for n in lengths))


def prefill_context_stopped(context, query, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    problem = context_stopped_problem(context, query, HEADS, KV_HEADS, dim, dtype, dev)
    q, k, v, cu, pos, tag = problem.masked
    qc, kc, vc, cuc, pc = problem.compacted
    qs, ks, vs, mask = problem.sdpa
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda_compacted": lambda: ops.varlen_attention(qc, kc, vc, cuc, cuc, pc, pc, None, None, 0, scale),
        "skiplayers_cuda_masked_form": lambda: ops.varlen_attention(q, k, v, cu, cu, pos, pos, tag, tag,
                                                                    Rule.HIDE_CONTEXT, scale),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=scale),
    }
    # Counted work: what the compacted form needs (the q query rows over the kept keys).
    return variants, "sdpa_dense_mask", dict(flops=4 * dim * HEADS * _causal_pairs(query + 1))


# --- decode ---------------------------------------------------------------------------------------


def decode(lengths, dim, dtype, extras, page_size: int = PAGE_SIZE, dev="cuda"):
    """Paged caches of ``lengths`` keys (room for the longest), pages of ``page_size`` slots in order.
    (``dev="cpu"`` builds the same variants on CPU tensors, the ops' CPU kernels included: a dry run.)"""
    scale = dim**-0.5
    batch = len(lengths)
    q = torch.randn(batch, HEADS, dim, dtype=dtype, device=dev)
    k_pages, v_pages = paged_kv(batch, max(lengths), KV_HEADS, dim, dtype, dev, page_size)
    cu, lens, q_pos, block_table, pos_cache = decode_metadata(lengths, max(lengths), dev, page_size)
    k_cache, v_cache = dense_view(k_pages, batch), dense_view(v_pages, batch)  # [B, S, Hkv, D], S = pages' slots
    capacity = k_cache.shape[1]
    qs = q[:, :, None]  # [B, H, 1, D]
    ks, vs = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, Hkv, S, D] views (SDPA reads strided)
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.cache_attention(q, k_pages, v_pages, block_table, cu, lens, q_pos, pos_cache,
                                                       None, None, 0, scale, 0),
    }
    if len(set(lengths)) == 1:  # the keys themselves (the pages' last slots past them are not keys)
        ksc, vsc = ks[:, :, : lengths[0]].contiguous(), vs[:, :, : lengths[0]].contiguous()
        variants["sdpa"] = lambda: F.scaled_dot_product_attention(qs, ksc, vsc, enable_gqa=True, scale=scale)
        baseline = "sdpa"
    else:
        mask = (torch.arange(capacity, device=dev)[None, :] < lens[:, None])[:, None, None]
        ksc, vsc = ks.contiguous(), vs.contiguous()
        variants["sdpa_padded_mask"] = lambda: F.scaled_dot_product_attention(qs, ksc, vsc, attn_mask=mask,
                                                                              enable_gqa=True, scale=scale)
        baseline = "sdpa_padded_mask"
    fa = extras["flash_attn"][0]
    if fa is not None and dtype != torch.float32:
        q4 = q[:, None]  # [B, 1, H, D]
        variants["flash_attn_kvcache"] = lambda: fa.flash_attn_with_kvcache(q4, k_cache, v_cache, cache_seqlens=lens,
                                                                            softmax_scale=scale, causal=True)
    elt = torch.finfo(dtype).bits // 8
    bytes_moved = 2 * sum(lengths) * KV_HEADS * dim * elt + 2 * batch * HEADS * dim * elt
    return variants, baseline, dict(bytes=bytes_moved)


def main(argv=None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="slots per page of the decode caches")
    args = parser.parse_args(argv)
    if skip_without_cuda("bench_cuda_kernels", kernels=True):
        return 0
    import skiplayers.ops  # noqa: F401  (loads the extension: registers torch.ops.skiplayers)

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    extras = {"flex": flex_attention_or_reason(160), "flash_attn": flash_attn_or_reason(160)}
    for name, (_, reason) in (("flash_attn", extras["flash_attn"]), ("flex_attention", extras["flex"])):
        if reason:
            print(f"{name} skipped: {reason}")

    cases = [(f"prefill dense causal T=2048 D={d}", lambda d=d: prefill_dense(2048, d, dtype, extras)) for d in (64, 128)]
    cases.append(("prefill ragged 8 seqs D=64",
                  lambda: prefill_ragged([2048, 1024, 512, 256, 1500, 100, 700, 300], 64, dtype, extras)))
    cases.append(("prefill context-stopped c=1800 q=248 D=64",
                  lambda: prefill_context_stopped(1800, 248, 64, dtype, extras)))
    lengths = (512, 4096) if args.quick else (512, 1024, 4096, 16384)
    for batch in (1, 8):
        for n in lengths:
            cases.append((f"decode B={batch} L={n} D=64",
                          lambda b=batch, n=n: decode([n] * b, 64, dtype, extras, args.page_size)))
    cases.append(("decode ragged B=8 D=64", lambda: decode([100, 4096, 700, 16384, 5, 2000, 9000, 300], 64, dtype, extras,
                                                           args.page_size)))

    rows = []
    with torch.no_grad():
        for name, build in cases:
            variants, baseline, work = build()
            times = {variant: gpu_median_ms(fn) for variant, fn in variants.items()}
            for variant, ms in times.items():
                row = dict(case=name, variant=variant, dtype=args.dtype, median_ms=round(ms, 4),
                           speed_vs_baseline=round(times[baseline] / ms, 3), baseline=baseline)
                if "flops" in work:
                    row["tflops"] = round(work["flops"] / ms / 1e9, 2)
                if "bytes" in work:
                    row["gbps"] = round(work["bytes"] / ms / 1e6, 1)
                rows.append(row)
                rate = f"{row['tflops']:8.2f} TFLOP/s" if "tflops" in row else f"{row['gbps']:8.1f} GB/s"
                print(f"{name:44} {variant:28} {ms:9.4f} ms {rate}  x{row['speed_vs_baseline']:5.2f} vs {baseline}")
    meta = {"dtype": args.dtype, "page_size": args.page_size, "timer": gpu_timer_name(),
            "flash_attn_skip_reason": extras["flash_attn"][1], "flex_attention_skip_reason": extras["flex"][1]}
    json_path, csv_path = write_results("cuda_kernels", rows, meta)
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
