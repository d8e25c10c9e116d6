"""What ``python -m skiplayers.aot`` compiles: every kernel, with its configuration from ``configs.py``,
for every dtype (and compile-time variant) its launcher can use.

A spec names the kernel by module and attribute (so worker processes can import it afresh) and gives
the argument types as Triton signature strings. ``skiplayers.aot`` checks that each signature names
exactly the kernel's parameters, so a kernel and its spec cannot drift apart silently.

Alignment: pointers and the row/head strides are declared divisible by 16, as the runtime
specialises them for the usual (aligned) tensors; that is the case with the most vectorised loads
and the largest shared-memory use, which is the limit being checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import configs

_TT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_BITS = {torch.float32: "i32", torch.float16: "i16", torch.bfloat16: "i16"}


@dataclass(frozen=True)
class CompileSpec:
    module: str  # e.g. "skiplayers.triton_kernels.prefill_attention"
    kernel: str
    config: str  # label of the launch configuration
    variant: str  # dtype and compile-time switches, for the table
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    aligned: tuple = field(default_factory=tuple)  # parameters declared divisible by 16
    archs: tuple | None = None  # compile only for these compute capabilities (None: every one asked for)


def _sig(ptrs: dict, ints: tuple = (), floats: tuple = (), constexprs: tuple = ()) -> dict:
    sig = {name: f"*{t}" for name, t in ptrs.items()}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


_PKG = "skiplayers.triton_kernels"
# The architectures of each family that configs.py may configure apart (by compute capability major).
_FAMILIES = ((8, (80, 86, 89)), (9, (90,)))


def _prefill_configs(dtype, head_dim) -> list[tuple[configs.AttentionConfig, tuple | None]]:
    """(configuration, the architectures it is for; None: all) of the prefill kernel."""
    by_config: dict = {}
    for major, archs in _FAMILIES:
        by_config.setdefault(configs.prefill_config(dtype, head_dim, 10 * major), []).extend(archs)
    if len(by_config) == 1:
        return [(next(iter(by_config)), None)]
    return [(cfg, tuple(archs)) for cfg, archs in by_config.items()]
_ATTN_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "USE_TAGS", "DOT_PRECISION", "UPCAST_DOT")


def _attention_constexprs(cfg, dtype, head_dim, use_tags) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, USE_TAGS=use_tags,
                DOT_PRECISION=configs.dot_precision(dtype), UPCAST_DOT=False)  # True only under the interpreter


def attention_specs() -> list[CompileSpec]:
    specs = []
    for dtype in configs.ATTENTION_DTYPES:
        t = _TT[dtype]
        for head_dim in configs.HEAD_DIMS:
            for use_tags, anchor_list in ((False, False), (True, False), (True, True)):
                variant = f"{t} D{head_dim}{' tags' if use_tags else ''}{' anchors' if anchor_list else ''}"
                strides: tuple[str, ...] = (
                    "stride_qm", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_om", "stride_oh")
                sig = _sig(
                    dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32",
                         q_pos_ptr="i32", k_pos_ptr="i32", q_tag_ptr="i32", k_tag_ptr="i32", full_ptr="i32",
                         partial_ptr="i32", counts_ptr="i32", anchor_rows_ptr="i32"),
                    ints=strides + ("batch", "search_steps", "group", "gsub", "head_programs", "max_blocks", "rule"),
                    floats=("qk_scale",), constexprs=_ATTN_CONSTEXPRS + ("ANCHOR_LIST",),
                )
                for cfg, archs in _prefill_configs(dtype, head_dim):
                    specs.append(CompileSpec(
                        f"{_PKG}.prefill_attention", "prefill_attention_kernel", cfg.label, variant, sig,
                        dict(_attention_constexprs(cfg, dtype, head_dim, use_tags), ANCHOR_LIST=anchor_list),
                        cfg.num_warps, cfg.num_stages, tuple(n for n in sig if n.endswith("_ptr")) + strides, archs,
                    ))
                if anchor_list:
                    continue  # the decode kernel has no such variant
                cfg = configs.decode_config(dtype, head_dim)
                strides = ("stride_qm", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs",
                           "stride_vh", "stride_om", "stride_oh")
                sig = _sig(
                    dict(q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, out_ptr=t, part_ptr="fp32", block_table_ptr="i32",
                         cu_seqlens_q_ptr="i32", cache_seqlens_ptr="i32", q_pos_ptr="i32", pos_cache_ptr="i32",
                         q_tag_ptr="i32", tag_cache_ptr="i32"),
                    ints=strides + ("max_pages", "num_queries", "heads", "num_pages", "page_size", "num_splits", "group",
                                    "gsub", "rule"),
                    floats=("qk_scale",), constexprs=_ATTN_CONSTEXPRS,
                )
                specs.append(CompileSpec(
                    f"{_PKG}.decode_attention", "decode_attention_kernel", cfg.label, variant, sig,
                    _attention_constexprs(cfg, dtype, head_dim, use_tags), cfg.num_warps, cfg.num_stages,
                    tuple(n for n in sig if n.endswith("_ptr")) + strides,
                ))
            sig = _sig(dict(part_ptr="fp32", out_ptr=t),
                       ints=("stride_om", "stride_oh", "num_queries", "heads", "num_splits"), constexprs=("HEAD_DIM",))
            specs.append(CompileSpec(
                f"{_PKG}.decode_attention", "combine_splits_kernel", f"w{configs.COMBINE_NUM_WARPS}", f"{t} D{head_dim}",
                sig, dict(HEAD_DIM=head_dim), configs.COMBINE_NUM_WARPS, 1,
                tuple(n for n in sig if n.endswith("_ptr")) + ("stride_om", "stride_oh"),
            ))
    return specs


def plan_specs() -> list[CompileSpec]:
    """The prefill block plan, once per distinct prefill tile shape (it reads no K/V: no dtype)."""
    specs = []
    shapes = sorted({(c.block_m, c.block_n) for d in configs.ATTENTION_DTYPES for h in configs.HEAD_DIMS
                     for c, _ in _prefill_configs(d, h)})
    sig = _sig(dict(cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32", q_pos_ptr="i32", k_pos_ptr="i32",
                    q_tag_ptr="i32", k_tag_ptr="i32", anchor_start_ptr="i32", full_ptr="i32", partial_ptr="i32",
                    counts_ptr="i32"),
               ints=("batch", "search_steps", "queries_per_tile", "max_blocks", "rule"),
               constexprs=("BLOCK_M", "BLOCK_N", "CHUNK", "USE_TAGS"))
    for block_m, block_n in shapes:
        for use_tags in (False, True):
            specs.append(CompileSpec(
                f"{_PKG}.block_plan", "block_plan_kernel", f"M{block_m}/N{block_n}/C{configs.PLAN_CHUNK}/w{configs.PLAN_NUM_WARPS}",
                "tags" if use_tags else "causal", sig,
                dict(BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=configs.PLAN_CHUNK, USE_TAGS=use_tags),
                configs.PLAN_NUM_WARPS, 1, tuple(n for n in sig if n.endswith("_ptr")),
            ))
    return specs


def row_specs() -> list[CompileSpec]:
    c, s, a = configs.COMPACT, configs.SCAN, configs.APPEND
    specs = []

    def add(kernel, cfg, variant, sig, constexprs):
        aligned = tuple(n for n in sig if n.endswith("_ptr"))
        specs.append(CompileSpec(f"{_PKG}.rows", kernel, cfg.label, variant, sig, constexprs, cfg.num_warps,
                                 cfg.num_stages, aligned))

    add("count_kept_kernel", c, "u8",
        _sig(dict(keep_ptr="u8", counts_ptr="i32"), ints=("length",), constexprs=("BLOCK",)), dict(BLOCK=c.block))
    add("scan_counts_kernel", s, "i32",
        _sig(dict(counts_ptr="i32", offsets_ptr="i32", totals_ptr="i32"), ints=("num_blocks",), constexprs=("CHUNK",)),
        dict(CHUNK=s.block))
    add("compact_cu_seqlens_kernel", c, "i32",
        _sig(dict(keep_ptr="u8", offsets_ptr="i32", cu_ptr="i32", new_cu_ptr="i32"), ints=("num_rows", "batch_plus_one"),
             constexprs=("BLOCK",)),
        dict(BLOCK=c.block))
    for bits in ("u8", "i16", "i32", "i64"):  # compact_rows moves any dtype as same-width integers
        add("compact_rows_kernel", c, bits,
            _sig(dict(x_ptr=bits, keep_ptr="u8", offsets_ptr="i32", out_ptr=bits), ints=("num_rows", "width", "stride_xm"),
                 constexprs=("BLOCK", "BLOCK_C")),
            dict(BLOCK=c.block, BLOCK_C=c.block_c))
    for bits in sorted(set(_BITS.values())):  # caches hold the attention dtypes
        add("cache_compact_kernel", c, bits,
            _sig(dict(k_ptr=bits, v_ptr=bits, pos_ptr="i32", tag_ptr="i32", block_table_ptr="i32", lengths_ptr="i32",
                      keep_ptr="u8", new_lengths_ptr="i32"),
                 ints=("max_pages", "page_size", "num_pages", "row_width"), constexprs=("BLOCK", "BLOCK_C")),
            dict(BLOCK=c.block, BLOCK_C=c.block_c))
        add("cache_append_kernel", a, bits,
            _sig(dict(k_cache_ptr=bits, v_cache_ptr=bits, pos_cache_ptr="i32", tag_cache_ptr="i32",
                      block_table_ptr="i32", k_ptr=bits, v_ptr=bits, pos_ptr="i32", tag_ptr="i32",
                      cu_seqlens_ptr="i32", cache_seqlens_ptr="i32"),
                 ints=("num_rows", "batch", "search_steps", "max_pages", "page_size", "num_pages", "kv_heads",
                       "head_dim", "stride_kn", "stride_kh", "stride_vn", "stride_vh"),
                 constexprs=("BLOCK", "BLOCK_C")),
            dict(BLOCK=a.block, BLOCK_C=a.block_c))
    return specs


def all_specs() -> list[CompileSpec]:
    return attention_specs() + plan_specs() + row_specs()
