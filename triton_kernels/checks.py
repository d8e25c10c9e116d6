"""Input checks of the Triton launchers: the same rules and messages as ``csrc/common/op_checks.h``
(so bad input reads the same whichever backend runs), plus the Triton backend's own limits.

Two kinds of check:

* shape / dtype / device checks read only tensor attributes and always run;
* *value* checks (``cu_seqlens`` well formed; cache lengths and appends that fit a sequence's block
  table row; block table entries that name pages of the pool, for the slots a call touches) read the
  metadata, which costs a device-to-host copy and a stream sync for CUDA tensors. They run when the
  metadata is on the CPU (interpreter), or on CUDA when ``SKIPLAYERS_TRITON_CHECKS=1``, with the
  messages of ``csrc/cpu/host_checks.h``. Without them the kernels still never touch memory outside
  the pools: they clamp cache lengths to ``[0, max_pages * page_size]``, treat a slot whose block
  table entry is not a page of the pool (``< 0`` or ``>= num_pages``) as absent (attention: no key;
  append and compaction: no read, no write) and drop writes past a sequence's block table row. That
  is documented, not silent: the caller owns the block tables.
"""

from __future__ import annotations

import os

import torch

from skiplayers.meta import Rule

from .configs import ATTENTION_DTYPES, HEAD_DIM_REFUSAL, HEAD_DIMS


def fail(op: str, message: str) -> None:
    raise RuntimeError(f"{op}: {message}")


def value_checks_enabled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or os.environ.get("SKIPLAYERS_TRITON_CHECKS") == "1"


def check_same_device(ref: torch.Tensor, tensors: dict, op: str) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            fail(op, f"{name} is on {t.device} but {ref.device} was expected")


def check_int32_vector(t: torch.Tensor, length: int, op: str, name: str) -> None:
    if t.dtype != torch.int32:
        fail(op, f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != length:
        fail(op, f"{name} must have shape [{length}], got {list(t.shape)}")


def check_query(op: str, q, cu_seqlens_q, q_pos, q_tag, kv_heads: int, head_dim: int) -> int:
    """The query side of both attention ops (``op_checks.h``: ``check_query``, plus the Triton
    backend's head dims); returns the batch size."""
    if q.dtype not in ATTENTION_DTYPES:
        fail(op, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 3:
        fail(op, f"q must be [total_q, heads, head_dim], got {list(q.shape)}")
    if q.shape[2] != head_dim:
        fail(op, f"q head_dim {q.shape[2]} differs from the keys' {head_dim}")
    if q.shape[2] not in HEAD_DIMS:
        fail(op, HEAD_DIM_REFUSAL.format(q.shape[2]))
    if kv_heads == 0 or q.shape[1] % kv_heads:
        fail(op, f"query heads ({q.shape[1]}) must be a multiple of KV heads ({kv_heads})")
    if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 1:
        fail(op, "cu_seqlens_q must be [B + 1]")
    check_int32_vector(cu_seqlens_q, cu_seqlens_q.shape[0], op, "cu_seqlens_q")
    check_int32_vector(q_pos, q.shape[0], op, "q_pos")
    if q_tag is not None:
        check_int32_vector(q_tag, q.shape[0], op, "q_tag")
    check_same_device(q, dict(cu_seqlens_q=cu_seqlens_q, q_pos=q_pos, q_tag=q_tag), op)
    return cu_seqlens_q.shape[0] - 1


def check_rule(op: str, rule: int) -> None:
    if int(rule) & ~int(Rule.ALL):
        fail(op, f"unknown bits in rule {rule}")


def check_varlen_attention(op: str, q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, rule: int) -> int:
    """``op_checks.h``: ``check_varlen_attention``; returns the batch size."""
    check_rule(op, rule)
    if k.dim() != 3 or v.shape != k.shape:
        fail(op, f"k and v must both be [total_k, kv_heads, head_dim], got {list(k.shape)} and {list(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        fail(op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch = check_query(op, q, cu_seqlens_q, q_pos, q_tag, k.shape[1], k.shape[2])
    check_int32_vector(cu_seqlens_k, batch + 1, op, "cu_seqlens_k")
    check_int32_vector(k_pos, k.shape[0], op, "k_pos")
    if k_tag is not None:
        check_int32_vector(k_tag, k.shape[0], op, "k_tag")
    check_same_device(q, dict(k=k, v=v, cu_seqlens_k=cu_seqlens_k, k_pos=k_pos, k_tag=k_tag), op)
    return batch


def check_cache_attention(op: str, q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos, pos_cache,
                          q_tag, tag_cache, rule: int, num_splits: int) -> int:
    """``op_checks.h``: ``check_cache_attention``; returns the batch size."""
    check_rule(op, rule)
    if num_splits < 0:
        fail(op, f"num_splits must be >= 0 (0 = automatic), got {num_splits}")
    check_kv_pages(op, k_cache, v_cache, contiguous=False)
    if k_cache.dtype != q.dtype:
        fail(op, "q and the caches must share a dtype")
    batch = check_query(op, q, cu_seqlens_q, q_pos, q_tag, k_cache.shape[2], k_cache.shape[3])
    check_block_table(op, block_table, batch)
    check_int32_vector(cache_seqlens, batch, op, "cache_seqlens")
    check_metadata_pages(op, pos_cache, k_cache, "pos_cache")
    if tag_cache is not None:
        check_metadata_pages(op, tag_cache, k_cache, "tag_cache")
    check_same_device(q, dict(k_cache=k_cache, v_cache=v_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                              pos_cache=pos_cache, tag_cache=tag_cache), op)
    return batch


def check_cache_append(op: str, k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag, cu_seqlens,
                       cache_seqlens) -> int:
    """``op_checks.h``: ``check_cache_append``; returns the batch size."""
    check_cache_pages(op, k_cache, v_cache, pos_cache, tag_cache)
    if k.dim() != 3 or v.shape != k.shape or k.shape[1] != k_cache.shape[2] or k.shape[2] != k_cache.shape[3]:
        fail(op, f"k and v must be [total, kv_heads, head_dim] matching the cache, got {list(k.shape)} and "
                 f"{list(v.shape)}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        fail(op, "k, v and the caches must share a dtype")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        fail(op, "cu_seqlens must be [B + 1]")
    batch = cu_seqlens.shape[0] - 1
    check_block_table(op, block_table, batch)
    check_int32_vector(pos, k.shape[0], op, "pos")
    check_int32_vector(tag, k.shape[0], op, "tag")
    check_int32_vector(cu_seqlens, batch + 1, op, "cu_seqlens")
    check_int32_vector(cache_seqlens, batch, op, "cache_seqlens")
    check_same_device(k_cache, dict(v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, block_table=block_table,
                                    k=k, v=v, pos=pos, tag=tag, cu_seqlens=cu_seqlens, cache_seqlens=cache_seqlens), op)
    return batch


def check_cache_compact(op: str, k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep) -> int:
    """``op_checks.h``: ``check_cache_compact``; returns the batch size."""
    check_cache_pages(op, k_cache, v_cache, pos_cache, tag_cache)
    if cache_seqlens.dim() != 1:
        fail(op, "cache_seqlens must be [B]")
    batch = cache_seqlens.shape[0]
    check_int32_vector(cache_seqlens, batch, op, "cache_seqlens")
    check_block_table(op, block_table, batch)
    slots = slots_per_sequence(block_table, k_cache)
    if keep.dtype != torch.bool or keep.dim() != 2 or tuple(keep.shape) != (batch, slots) or not keep.is_contiguous():
        fail(op, f"keep must be contiguous bool [B, max_pages * page_size] = [{batch}, {slots}], got {keep.dtype} "
                 f"{list(keep.shape)}")
    check_same_device(k_cache, dict(v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, block_table=block_table,
                                    cache_seqlens=cache_seqlens, keep=keep), op)
    return batch


def check_cu_seqlens_values(cu: torch.Tensor, rows: int, op: str, name: str) -> None:
    c = cu.tolist()
    if c[0] != 0:
        fail(op, f"{name}[0] must be 0, got {c[0]}")
    for a, b in zip(c, c[1:]):
        if b < a:
            fail(op, f"{name} must be non-decreasing, got {a} then {b}")
    if c[-1] != rows:
        fail(op, f"{name} ends at {c[-1]} but there are {rows} rows")


def check_kv_pages(op: str, k_cache, v_cache, contiguous: bool) -> None:
    """K/V page pools ``[num_pages, page_size, kv_heads, head_dim]`` of one dtype, head_dim dense; the
    ops that write them (append, compact) need them contiguous (``op_checks.h``: ``check_kv_pages``)."""
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        fail(op, "k_cache and v_cache must both be pages [num_pages, page_size, kv_heads, head_dim], got "
                 f"{list(k_cache.shape)} and {list(v_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        fail(op, "k_cache and v_cache must share a dtype")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        fail(op, "cache head_dim must be contiguous")
    if contiguous and not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        fail(op, "k_cache and v_cache must be contiguous")


def check_metadata_pages(op: str, t, k_cache, name: str) -> None:
    """Slot metadata pages: contiguous int32 ``[num_pages, page_size]`` (``check_metadata_pages``)."""
    if t.dtype != torch.int32 or t.dim() != 2 or tuple(t.shape) != tuple(k_cache.shape[:2]) or not t.is_contiguous():
        fail(op, f"{name} must be contiguous int32 [num_pages, page_size] = [{k_cache.shape[0]}, {k_cache.shape[1]}], "
                 f"got {t.dtype} {list(t.shape)}")


def check_block_table(op: str, block_table, batch: int) -> None:
    """block_table: contiguous int32 ``[B, max_pages]`` (``check_block_table``)."""
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != batch \
            or not block_table.is_contiguous():
        fail(op, f"block_table must be contiguous int32 [B, max_pages] with B = {batch}, got {block_table.dtype} "
                 f"{list(block_table.shape)}")


def slots_per_sequence(block_table, k_cache) -> int:
    """The most slots a sequence can hold: its block table row's pages."""
    return block_table.shape[1] * k_cache.shape[1]


def check_cache_pages(op: str, k_cache, v_cache, pos_cache, tag_cache) -> None:
    """The pools as the writing ops need them (``check_cache_pages``)."""
    check_kv_pages(op, k_cache, v_cache, contiguous=True)
    check_metadata_pages(op, pos_cache, k_cache, "pos_cache")
    check_metadata_pages(op, tag_cache, k_cache, "tag_cache")


def check_paged_slots_values(op: str, block_table, lengths: torch.Tensor, added, num_pages: int,
                             page_size: int) -> None:
    """Sequence b's slots ``[0, lengths[b] + added[b])`` (``added``: None for none) fit its block table
    row, and every page the op touches is a page of the pool: the pages of slots ``[0, lengths[b])``
    when reading (``added`` None), those of the new slots ``[lengths[b], lengths[b] + added[b])`` when
    appending (``csrc/cpu/host_checks.h``: ``check_paged_slots``, same messages). Reads the metadata
    on the host."""
    max_pages = block_table.shape[1]
    capacity = max_pages * page_size
    table = block_table.tolist()
    lens = lengths.tolist()
    for b, length in enumerate(lens):
        n = added[b] if added is not None else 0
        if added is not None:
            if length < 0 or length + n > capacity:
                fail(op, f"sequence {b} holds {length} slots and appends {n}, but its block table holds "
                         f"{capacity} slots")
        elif not 0 <= length <= capacity:
            fail(op, f"cache_seqlens[{b}] = {length} is outside [0, {capacity}]")
        first, end = (length if added is not None else 0), length + n  # the slots the op touches
        if first >= end:
            continue
        for i in range(first // page_size, -(-end // page_size)):
            page = table[b][i]
            if not 0 <= page < num_pages:
                fail(op, f"block_table[{b}, {i}] = {page} is not a page of the pool (num_pages {num_pages})")
