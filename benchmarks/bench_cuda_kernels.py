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
  B=8 batch (SDPA pads it and masks).

Times are medians of ``triton.testing.do_bench`` (which clears the L2 cache between runs) or, when
triton is missing, of CUDA-event timings. Throughput comes from counted work, the same for every
variant of a case: TFLOP/s = 4 * D * (visible query-key pairs) * heads / time (QK^T and PV), and for
decode GB/s = (K and V bytes of the keys each sequence must read + q + out) / time.
Writes results/cuda_kernels.{json,csv}. Without a GPU (or without the CUDA kernels) it prints why
and exits 0.

    python benchmarks/bench_cuda_kernels.py [--dtype bfloat16] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results

HEADS, KV_HEADS = 9, 3
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    import skiplayers.ops as sk_ops

    if not sk_ops.cuda_kernels_built():
        return "skiplayers._C was built without CUDA kernels"
    return None


def timer_name() -> str:
    try:
        import triton.testing  # noqa: F401

        return "triton.testing.do_bench median (L2 cleared between runs)"
    except ImportError:
        return "median of 50 CUDA-event timings after 5 warm-up runs"


def bench(fn) -> float:
    """Median milliseconds of fn()."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        for _ in range(5):
            fn()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def _flash_attn():
    try:
        import flash_attn

        return flash_attn, None
    except Exception as err:  # noqa: BLE001 - any import failure is a skip reason
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return torch.compile(flex_attention, dynamic=False), create_block_mask, None
    except Exception as err:  # noqa: BLE001
        return None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def _packed(lengths, dev):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    pos = torch.cat([torch.arange(n, dtype=torch.int32) for n in lengths]).to(dev)
    return cu, pos


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


# --- prefill --------------------------------------------------------------------------------------


def prefill_dense(T, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    q, k, v = (torch.randn(T, h, dim, dtype=dtype, device=dev) for h in (HEADS, KV_HEADS, KV_HEADS))
    cu, pos = _packed([T], dev)
    qs, ks, vs = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, scale),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True, scale=scale),
    }
    flex, create_block_mask, _ = extras["flex"]
    if flex is not None:
        try:  # compiles on the first call; a failure is reported, not fatal
            block = create_block_mask(lambda b, h, qi, ki: ki <= qi, 1, None, T, T, device=dev)
            flex(qs, ks, vs, block_mask=block, enable_gqa=True, scale=scale)
            variants["flex_attention"] = lambda: flex(qs, ks, vs, block_mask=block, enable_gqa=True, scale=scale)
        except Exception as err:  # noqa: BLE001
            print(f"flex_attention skipped for this case: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    fa = extras["flash_attn"][0]
    if fa is not None and dtype != torch.float32:
        variants["flash_attn_varlen"] = lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, T, T, softmax_scale=scale,
                                                                          causal=True)
    return variants, "sdpa_causal", dict(flops=4 * dim * HEADS * _causal_pairs(T))


def prefill_ragged(lengths, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    total, longest, batch = sum(lengths), max(lengths), len(lengths)
    q, k, v = (torch.randn(total, h, dim, dtype=dtype, device=dev) for h in (HEADS, KV_HEADS, KV_HEADS))
    cu, pos = _packed(lengths, dev)

    def padded(x, heads):
        out = torch.zeros(batch, heads, longest, dim, dtype=dtype, device=dev)
        for b, n in enumerate(lengths):
            out[b, :, :n] = x[cu[b] : cu[b + 1]].transpose(0, 1)
        return out

    qs, ks, vs = padded(q, HEADS), padded(k, KV_HEADS), padded(v, KV_HEADS)
    idx = torch.arange(longest, device=dev)
    valid = idx[None, :] < torch.tensor(lengths, device=dev)[:, None]
    mask = ((idx[None, :, None] >= idx[None, None, :]) & valid[:, None, :]) | ~valid[:, :, None]
    mask = mask[:, None]
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, scale),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=scale),
    }
    fa = extras["flash_attn"][0]
    if fa is not None and dtype != torch.float32:
        variants["flash_attn_varlen"] = lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest,
                                                                          softmax_scale=scale, causal=True)
    return variants, "sdpa_dense_mask", dict(flops=4 * dim * HEADS * sum(_causal_pairs(n) for n in lengths))


def prefill_context_stopped(context, query, dim, dtype, extras):
    from skiplayers.meta import TAG_CONTEXT, Rule

    dev, scale, T = "cuda", dim**-0.5, context + query
    q, k, v = (torch.randn(T, h, dim, dtype=dtype, device=dev) for h in (HEADS, KV_HEADS, KV_HEADS))
    cu, pos = _packed([T], dev)
    is_ctx = torch.zeros(T, dtype=torch.bool, device=dev)
    is_ctx[1 : context + 1] = True
    tag = is_ctx.to(torch.int32) * TAG_CONTEXT
    keep = ~is_ctx
    qc, kc, vc, pc = q[keep].contiguous(), k[keep].contiguous(), v[keep].contiguous(), pos[keep].contiguous()
    cuc = torch.tensor([0, int(keep.sum())], dtype=torch.int32, device=dev)
    qs, ks, vs = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril() & keep[None, :]
    mask[is_ctx, 0] = True
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


def decode(lengths, dim, dtype, extras):
    dev, scale = "cuda", dim**-0.5
    batch, capacity = len(lengths), max(lengths)
    q = torch.randn(batch, HEADS, dim, dtype=dtype, device=dev)
    k_cache = torch.randn(batch, capacity, KV_HEADS, dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    lens = torch.tensor(lengths, dtype=torch.int32, device=dev)
    pos_cache = torch.arange(capacity, dtype=torch.int32, device=dev).expand(batch, capacity).contiguous()
    q_pos = lens - 1
    cu = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    qs = q[:, :, None]  # [B, H, 1, D]
    ks, vs = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, Hkv, S, D] views (SDPA reads strided)
    ops = torch.ops.skiplayers
    variants = {
        "skiplayers_cuda": lambda: ops.cache_attention(q, k_cache, v_cache, cu, lens, q_pos, pos_cache, None, None, 0,
                                                       scale, 0),
    }
    if len(set(lengths)) == 1:
        ksc, vsc = ks.contiguous(), vs.contiguous()
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"bench_cuda_kernels: skipped: {reason}")
        return 0
    import skiplayers.ops  # noqa: F401  (loads the extension: registers torch.ops.skiplayers)

    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    extras = {"flex": _flex(), "flash_attn": _flash_attn()}
    for name, (_, *rest) in (("flash_attn", extras["flash_attn"]), ("flex_attention", extras["flex"])):
        if rest[-1]:
            print(f"{name} skipped: {rest[-1]}")

    cases = [(f"prefill dense causal T=2048 D={d}", lambda d=d: prefill_dense(2048, d, dtype, extras)) for d in (64, 128)]
    cases.append(("prefill ragged 8 seqs D=64",
                  lambda: prefill_ragged([2048, 1024, 512, 256, 1500, 100, 700, 300], 64, dtype, extras)))
    cases.append(("prefill context-stopped c=1800 q=248 D=64",
                  lambda: prefill_context_stopped(1800, 248, 64, dtype, extras)))
    lengths = (512, 4096) if args.quick else (512, 1024, 4096, 16384)
    for batch in (1, 8):
        for n in lengths:
            cases.append((f"decode B={batch} L={n} D=64", lambda b=batch, n=n: decode([n] * b, 64, dtype, extras)))
    cases.append(("decode ragged B=8 D=64", lambda: decode([100, 4096, 700, 16384, 5, 2000, 9000, 300], 64, dtype, extras)))

    rows = []
    with torch.no_grad():
        for name, build in cases:
            variants, baseline, work = build()
            times = {variant: bench(fn) for variant, fn in variants.items()}
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
    meta = {"dtype": args.dtype, "timer": timer_name(),
            "flash_attn_skip_reason": extras["flash_attn"][1], "flex_attention_skip_reason": extras["flex"][2]}
    json_path, csv_path = write_results("cuda_kernels", rows, meta)
    print(f"wrote {json_path}, {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
