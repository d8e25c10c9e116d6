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


_ATTN_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "HEAD_PAD", "USE_TAGS", "DOT_PRECISION", "UPCAST_DOT")


def _attention_constexprs(cfg, dtype, head_dim, use_tags) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_PAD=configs.head_pad(head_dim),
                USE_TAGS=use_tags,
                DOT_PRECISION=configs.dot_precision(dtype), UPCAST_DOT=False)  # True only under the interpreter


_PREFILL_STRIDES = ("stride_qm", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_om", "stride_oh")
_DECODE_STRIDES = ("stride_qm", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh",
                   "stride_om", "stride_oh")


def _variant(dtype, head_dim: int, use_tags: bool, anchor_list: bool = False) -> str:
    return f"{_TT[dtype]} D{head_dim}{' tags' if use_tags else ''}{' anchors' if anchor_list else ''}"


# The prefill kernel's compile-time variants (USE_TAGS, ANCHOR_LIST): causal, tags, tags with the
# anchor-list loop (the ANCHORS rule).
_PREFILL_VARIANTS = ((False, False), (True, False), (True, True))


def prefill_spec(dtype, head_dim: int, use_tags: bool, anchor_list: bool = False, cfg=None,
                 archs: tuple | None = None) -> CompileSpec:
    """The prefill kernel for one variant, with ``cfg`` (default: ``configs.prefill_config``'s default
    table; another one to try a tile), compiled for ``archs`` (None: every one asked for)."""
    t = _TT[dtype]
    cfg = cfg or configs.prefill_config(dtype, head_dim)
    sig = _sig(
        dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32",
             q_pos_ptr="i32", k_pos_ptr="i32", q_tag_ptr="i32", k_tag_ptr="i32", full_ptr="i32",
             partial_ptr="i32", counts_ptr="i32", anchor_rows_ptr="i32"),
        ints=_PREFILL_STRIDES + ("batch", "search_steps", "group", "gsub", "head_programs", "max_blocks", "rule"),
        floats=("qk_scale",), constexprs=_ATTN_CONSTEXPRS + ("ANCHOR_LIST",),
    )
    return CompileSpec(
        f"{_PKG}.prefill_attention", "prefill_attention_kernel", cfg.label,
        _variant(dtype, head_dim, use_tags, anchor_list), sig,
        dict(_attention_constexprs(cfg, dtype, head_dim, use_tags), ANCHOR_LIST=anchor_list),
        cfg.num_warps, cfg.num_stages, tuple(n for n in sig if n.endswith("_ptr")) + _PREFILL_STRIDES, archs,
    )


def decode_spec(dtype, head_dim: int, use_tags: bool, cfg=None) -> CompileSpec:
    """The decode kernel for one variant, with ``cfg`` (default: ``configs.decode_config``)."""
    t = _TT[dtype]
    cfg = cfg or configs.decode_config(dtype, head_dim)
    sig = _sig(
        dict(q_ptr=t, k_cache_ptr=t, v_cache_ptr=t, out_ptr=t, part_ptr="fp32", block_table_ptr="i32",
             cu_seqlens_q_ptr="i32", cache_seqlens_ptr="i32", q_pos_ptr="i32", pos_cache_ptr="i32",
             q_tag_ptr="i32", tag_cache_ptr="i32"),
        ints=_DECODE_STRIDES + ("max_pages", "num_queries", "heads", "num_pages", "page_size", "num_splits", "group",
                                "gsub", "rule"),
        floats=("qk_scale",), constexprs=_ATTN_CONSTEXPRS,
    )
    return CompileSpec(
        f"{_PKG}.decode_attention", "decode_attention_kernel", cfg.label, _variant(dtype, head_dim, use_tags), sig,
        _attention_constexprs(cfg, dtype, head_dim, use_tags), cfg.num_warps, cfg.num_stages,
        tuple(n for n in sig if n.endswith("_ptr")) + _DECODE_STRIDES,
    )


def combine_spec(dtype, head_dim: int) -> CompileSpec:
    t = _TT[dtype]
    sig = _sig(dict(part_ptr="fp32", out_ptr=t),
               ints=("stride_om", "stride_oh", "num_queries", "heads", "num_splits"), constexprs=("HEAD_DIM", "HEAD_PAD"))
    return CompileSpec(
        f"{_PKG}.decode_attention", "combine_splits_kernel", f"w{configs.COMBINE_NUM_WARPS}", f"{t} D{head_dim}",
        sig, dict(HEAD_DIM=head_dim, HEAD_PAD=configs.head_pad(head_dim)), configs.COMBINE_NUM_WARPS, 1,
        tuple(n for n in sig if n.endswith("_ptr")) + ("stride_om", "stride_oh"),
    )


# How much of the prefill kernel is compiled. CI compiles every spec (test_every_kernel_compiles_for_sm80_and_sm90,
# on 2 cores; keep it near 200 s), and the prefill kernel is the slowest to compile (3 variants, 3
# loops: 2-9 s each). Head dims 64 and 128 (the common models) are covered in full: every dtype, on
# both families' architectures. 32, 96 and 256 in fp32 and fp16 only (bf16 gets fp16's tile and
# compiled to within 0-30 registers of it wherever both were compiled), and each configuration on
# the architectures it serves: one that the families share (32, 256) on the default family's
# (sm_90) only, one that a family configures apart (96) on that family's. ``python -m
# skiplayers.aot`` with the trimmed specs added back (edit here) compiles the rest. The decode kernel
# is covered in full (every dtype and head dim on every architecture).
_FULL_PREFILL_HEAD_DIMS = (64, 128)
_DEFAULT_FAMILY_ARCH = 90


def attention_specs() -> list[CompileSpec]:
    specs = []
    for dtype in configs.ATTENTION_DTYPES:
        for head_dim in configs.HEAD_DIMS:
            for use_tags, anchor_list in _PREFILL_VARIANTS:
                for cfg, archs in _prefill_configs(dtype, head_dim):
                    if head_dim not in _FULL_PREFILL_HEAD_DIMS:
                        if dtype == torch.bfloat16:
                            continue
                        archs = archs or (_DEFAULT_FAMILY_ARCH,)
                    specs.append(prefill_spec(dtype, head_dim, use_tags, anchor_list, cfg, archs))
            for use_tags in (False, True):
                specs.append(decode_spec(dtype, head_dim, use_tags))
            specs.append(combine_spec(dtype, head_dim))
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
                f"{_PKG}.block_plan", "block_plan_kernel", f"M{block_m}/N{block_n}/C{configs.plan_chunk(block_n)}/w{configs.PLAN_NUM_WARPS}",
                "tags" if use_tags else "causal", sig,
                dict(BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=configs.plan_chunk(block_n), USE_TAGS=use_tags),
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
