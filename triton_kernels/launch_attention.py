"""Host launchers of the attention kernels (``varlen_attention``, ``cache_attention``): checks, tile
and grid choice, launch. Semantics and argument shapes are those of the ops (``skiplayers/ops.py``)."""

from __future__ import annotations

import torch

from skiplayers.meta import Rule

from . import checks
from .configs import COMBINE_NUM_WARPS, decode_config, dot_precision, head_pad, prefill_config
from .decode_attention import combine_splits_kernel, decode_attention_kernel
from .host import INTERPRETED, LOG2_E, cdiv, dense_last_dim, device_arch, device_guard, fp32_placeholder, sm_count
from .launch_plan import block_plan
from .prefill_attention import prefill_attention_kernel

MAX_AUTO_SPLITS = 64
# The fewest cache slots (of capacity) an automatic split gets. A split has a fixed cost whatever its
# length (its query tile, its metadata read-ahead prologue, the partial (acc, m, l) it writes and the
# combine pass reads back); with a few hundred keys each, the cache reads of a split outweigh that
# cost, and fewer splits of a short cache leave the SMs to other (batch, head) programs.
MIN_SPLIT_SLOTS = 256


def upcast_dot(dtype: torch.dtype) -> bool:
    """bfloat16 dots under the interpreter go through fp32 (see ``attention_core.mma``)."""
    return INTERPRETED and dtype == torch.bfloat16


def resolve_tags(rule: int, q_tag, k_tag, q_pos, k_pos):
    """(use_tags, q_tag, k_tag) with tensors to pass as pointers.

    With rule 0, or no tags at all, the predicate is plain causality (all-zero tags are non-context,
    non-anchor and share sentence 0), so the kernels skip the tag terms and never read the pointers.
    If only one side has tags, the other side's zeros are materialised (rare, one small allocation).
    """
    if rule == 0 or (q_tag is None and k_tag is None):
        return False, q_pos, k_pos
    q_tag = torch.zeros_like(q_pos) if q_tag is None else q_tag.contiguous()
    k_tag = torch.zeros_like(k_pos) if k_tag is None else k_tag.contiguous()
    return True, q_tag, k_tag


def gqa_tiling(heads: int, kv_heads: int, block_m: int) -> tuple[int, int, int, int]:
    """(group, heads per tile, head chunks per KV head, queries per tile); see attention_core."""
    group = heads // kv_heads
    gsub = min(group, block_m)
    return group, gsub, cdiv(group, gsub), block_m // gsub


def choose_num_splits(programs: int, capacity: int, block_n: int, device: torch.device) -> int:
    """Split-K factor for ``num_splits=0``: enough programs (``programs`` = batch times head programs
    before splitting) for about two waves over the SMs, with every split at least ``MIN_SPLIT_SLOTS``
    slots and one key tile of the ``capacity`` (slots a sequence's block table holds) and at most
    ``MAX_AUTO_SPLITS``. Chosen from shapes only (no sync on the lengths, so a decode step stays
    CUDA-graph capturable); each program splits its own sequence's actual length. 1 means no
    combine pass."""
    sms = sm_count(device)
    if programs >= sms:
        return 1
    most = capacity // max(MIN_SPLIT_SLOTS, block_n)
    return max(1, min(most, cdiv(2 * sms, programs), MAX_AUTO_SPLITS))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, rule: int, scale: float):
    """Prefill attention; returns ``[Nq, H, D]`` in q's dtype (see ``skiplayers.ops.varlen_attention``)."""
    op = "skiplayers_triton::varlen_attention"
    batch = checks.check_varlen_attention(op, q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, rule)
    if checks.value_checks_enabled(q):
        checks.check_cu_seqlens_values(cu_seqlens_q, q.shape[0], op, "cu_seqlens_q")
        checks.check_cu_seqlens_values(cu_seqlens_k, k.shape[0], op, "cu_seqlens_k")

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out
    q, k, v = dense_last_dim(q), dense_last_dim(k), dense_last_dim(v)
    use_tags, q_tag, k_tag = resolve_tags(rule, q_tag, k_tag, q_pos, k_pos)
    cfg = prefill_config(q.dtype, q.shape[2], device_arch(q.device))
    group, gsub, chunks, per_tile = gqa_tiling(q.shape[1], k.shape[1], cfg.block_m)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    q_pos, k_pos = q_pos.contiguous(), k_pos.contiguous()
    plan = block_plan(cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, use_tags, rule, batch,
                      cfg.block_m, cfg.block_n, per_tile)
    head_programs = k.shape[1] * chunks
    tiles = plan.counts.shape[0]
    with device_guard(q):
        prefill_attention_kernel[(tiles * head_programs,)](
            q, k, v, out,
            cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, plan.full, plan.partial, plan.counts,
            plan.anchor_rows,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            batch, batch.bit_length(), group, gsub, head_programs, plan.max_blocks, rule, scale * LOG2_E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=q.shape[2], HEAD_PAD=head_pad(q.shape[2]),
            USE_TAGS=use_tags,
            DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype),
            ANCHOR_LIST=use_tags and bool(rule & int(Rule.ANCHORS)),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def cache_attention(
    q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos, pos_cache, q_tag, tag_cache, rule: int,
    scale: float, num_splits: int = 0,
):
    """Decode attention over paged caches with split-K; returns ``[Nq, H, D]`` (see
    ``skiplayers.ops.cache_attention``)."""
    op = "skiplayers_triton::cache_attention"
    batch = checks.check_cache_attention(op, q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos,
                                         pos_cache, q_tag, tag_cache, rule, num_splits)
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    capacity = checks.slots_per_sequence(block_table, k_cache)
    if checks.value_checks_enabled(q):
        checks.check_cu_seqlens_values(cu_seqlens_q, q.shape[0], op, "cu_seqlens_q")
        checks.check_paged_slots_values(op, block_table, cache_seqlens, None, num_pages, page_size)

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out
    q = dense_last_dim(q)
    use_tags, q_tag, tag_cache = resolve_tags(rule, q_tag, tag_cache, q_pos, pos_cache)
    heads, kv_heads, head_dim = q.shape[1], k_cache.shape[2], q.shape[2]
    cfg = decode_config(q.dtype, head_dim)
    group, gsub, chunks, _ = gqa_tiling(heads, kv_heads, cfg.block_m)
    head_programs = kv_heads * chunks
    splits = num_splits or choose_num_splits(batch * head_programs, capacity, cfg.block_n, q.device)
    splits = max(1, min(splits, cdiv(capacity, cfg.block_n)))  # more splits than key blocks would stay empty
    if splits > 1:  # acc, m and l of every (split, query, head) in one allocation (decode_attention.py)
        part = torch.empty(splits * q.shape[0] * heads * (head_dim + 2), dtype=torch.float32, device=q.device)
    else:
        part = fp32_placeholder(q.device)  # never touched with one split
    with device_guard(q):
        decode_attention_kernel[(batch, head_programs, splits)](
            q, k_cache, v_cache, out, part, block_table,
            cu_seqlens_q.contiguous(), cache_seqlens.contiguous(), q_pos.contiguous(), pos_cache, q_tag, tag_cache,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
            block_table.shape[1],
            q.shape[0], heads, num_pages, page_size, splits, group, gsub, rule, scale * LOG2_E,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, HEAD_PAD=head_pad(head_dim), USE_TAGS=use_tags,
            DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if splits > 1:
            combine_splits_kernel[(q.shape[0], heads)](
                part, out, out.stride(0), out.stride(1), q.shape[0], heads, splits,
                HEAD_DIM=head_dim, HEAD_PAD=head_pad(head_dim), num_warps=COMBINE_NUM_WARPS,
            )
    return out
