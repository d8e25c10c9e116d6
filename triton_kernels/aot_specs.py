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


def _sig(ptrs: dict, ints: tuple = (), floats: tuple = (), constexprs: tuple = ()) -> dict:
    sig = {name: f"*{t}" for name, t in ptrs.items()}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "fp32" for name in floats})
    sig.update({name: "constexpr" for name in constexprs})
    return sig


_PKG = "skiplayers.triton_kernels"
_ATTN_CONSTEXPRS = ("BLOCK_M", "BLOCK_N", "HEAD_DIM", "HEAD_PAD", "USE_TAGS", "DOT_PRECISION", "UPCAST_DOT")


def _attention_constexprs(cfg, dtype, head_dim, use_tags) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_PAD=configs.head_pad(head_dim),
                USE_TAGS=use_tags,
                DOT_PRECISION=configs.dot_precision(dtype), UPCAST_DOT=False)  # True only under the interpreter


_PREFILL_STRIDES = ("stride_qm", "stride_qh", "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_om", "stride_oh")
_DECODE_STRIDES = ("stride_qm", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp", "stride_vs", "stride_vh",
                   "stride_om", "stride_oh")


def _variant(dtype, head_dim: int, use_tags: bool) -> str:
    return f"{_TT[dtype]} D{head_dim}{' tags' if use_tags else ''}"


def prefill_spec(dtype, head_dim: int, use_tags: bool, cfg=None) -> CompileSpec:
    """The prefill kernel for one variant, with ``cfg`` (default: ``configs.prefill_config``; another
    one to try a tile)."""
    t = _TT[dtype]
    cfg = cfg or configs.prefill_config(dtype, head_dim)
    sig = _sig(
        dict(q_ptr=t, k_ptr=t, v_ptr=t, out_ptr=t, cu_seqlens_q_ptr="i32", cu_seqlens_k_ptr="i32",
             q_pos_ptr="i32", k_pos_ptr="i32", q_tag_ptr="i32", k_tag_ptr="i32"),
        ints=_PREFILL_STRIDES + ("batch", "search_steps", "group", "gsub", "rule"),
        floats=("qk_scale",), constexprs=_ATTN_CONSTEXPRS,
    )
    return CompileSpec(
        f"{_PKG}.prefill_attention", "prefill_attention_kernel", cfg.label, _variant(dtype, head_dim, use_tags), sig,
        _attention_constexprs(cfg, dtype, head_dim, use_tags), cfg.num_warps, cfg.num_stages,
        tuple(n for n in sig if n.endswith("_ptr")) + _PREFILL_STRIDES,
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


def attention_specs() -> list[CompileSpec]:
    specs = []
    for dtype in configs.ATTENTION_DTYPES:
        for head_dim in configs.HEAD_DIMS:
            for use_tags in (False, True):
                specs.append(prefill_spec(dtype, head_dim, use_tags))
                specs.append(decode_spec(dtype, head_dim, use_tags))
            specs.append(combine_spec(dtype, head_dim))
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
    return attention_specs() + row_specs()
