"""Host side of the prefill block plan (``block_plan.py``): its allocation and launch, and the cache
that lets the layers of one forward share one plan.

Why a cache: the plan depends only on (cu_seqlens_q, cu_seqlens_k, positions, tags, rule, tile
shape), and the patched model passes the *same* metadata tensors to every layer of a range
(``dispatch.kernels.Ours.packed``), so computing it once per forward instead of once per layer saves
a launch per layer. How a stale plan is ruled out:

* the key is each metadata tensor's *identity* and its ``_version`` (bumped by every in-place edit
  through torch, including through a view), plus the rule, the tag switch and the tile shape; an
  edited or new tensor misses the cache and gets a fresh plan;
* a plan lives as long as its query positions tensor (``q_pos``: the cache is keyed weakly by it,
  ``torch.utils.weak.WeakIdKeyDictionary``), so the plans of a forward are freed with its metadata
  instead of holding device memory (up to ~100 MB for a 128k-token prefill) after it; the other
  metadata tensors are checked through weak references, so a tensor that died cannot pass for a new
  one that took its ``id``;
* inference tensors (made under ``torch.inference_mode``) keep no version counter, so an in-place
  edit of one cannot be seen: their plans are computed every call, never cached;
* while a CUDA graph is being captured, the plan is computed inside the graph and not cached: a
  cached plan is a value computed *before* the capture, which the graph would bake in as a constant
  buffer, so a replay with new metadata written into the same tensors (the way graphs are fed)
  would read a stale plan. Computed in the graph, the plan is recomputed on every replay;
* writes that bypass the version counter (through ``.data``, DLPack, or a kernel writing through a
  raw pointer outside the dispatcher) are not seen: the same contract as autograd's saved tensors.
  ``clear_plan_cache()`` drops every entry.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from skiplayers.meta import TAG_ANCHOR, TAG_SINK, Rule

from .block_plan import block_plan_kernel
from .configs import PLAN_NUM_WARPS, plan_chunk
from .host import cdiv, device_guard


@dataclass(frozen=True)
class BlockPlan:
    """``full``/``partial`` int32 ``[num_tiles, max_blocks]`` (first key row of each listed block),
    ``counts`` int32 ``[num_tiles, 4]`` (full, partial, anchor list range), ``anchor_rows`` int32 (the
    compact anchor list; a placeholder without ANCHORS); see ``block_plan.py``."""

    full: torch.Tensor
    partial: torch.Tensor
    counts: torch.Tensor
    anchor_rows: torch.Tensor

    @property
    def max_blocks(self) -> int:
        return self.full.shape[1]


def plan_shape(total_q: int, total_k: int, batch: int, queries_per_tile: int, block_n: int) -> tuple[int, int]:
    """(virtual query tiles, list width): from shapes only (no read of the lengths)."""
    return total_q // queries_per_tile + batch, max(1, cdiv(total_k, block_n))


def anchor_list(k_tag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor_rows, anchor_start), int32 on k_tag's device, from device ops only (no host sync):
    ``anchor_rows[:n]`` the packed key rows tagged ANCHOR or SINK, in order (``n`` of them; a spare
    slot at the end takes the scatter of the other rows), ``anchor_start[r]`` ``[total_k + 1]`` the
    number of them in rows ``< r``, so sequence b's are ``anchor_rows[anchor_start[cu[b]] :
    anchor_start[cu[b + 1]]]``."""
    total = k_tag.shape[0]
    flag = (k_tag & (TAG_ANCHOR | TAG_SINK)) != 0
    inclusive = torch.cumsum(flag, 0, dtype=torch.int32)
    anchor_start = torch.zeros(total + 1, dtype=torch.int32, device=k_tag.device)
    anchor_start[1:] = inclusive
    slot = torch.where(flag, inclusive - 1, total).long()
    rows = torch.arange(total, dtype=torch.int32, device=k_tag.device)
    anchor_rows = torch.zeros(total + 1, dtype=torch.int32, device=k_tag.device).scatter_(0, slot, rows)
    return anchor_rows, anchor_start


def compute_block_plan(
    cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, use_tags: bool, rule: int, batch: int,
    block_m: int, block_n: int, queries_per_tile: int,
) -> BlockPlan:
    """Launches ``block_plan_kernel`` (contiguous int32 metadata; tags are read only if ``use_tags``)."""
    tiles, max_blocks = plan_shape(q_pos.shape[0], k_pos.shape[0], batch, queries_per_tile, block_n)
    device = q_pos.device
    full = torch.empty(tiles, max_blocks, dtype=torch.int32, device=device)
    partial = torch.empty(tiles, max_blocks, dtype=torch.int32, device=device)
    counts = torch.empty(tiles, 4, dtype=torch.int32, device=device)
    if use_tags and rule & int(Rule.ANCHORS):
        anchor_rows, anchor_start = anchor_list(k_tag)
    else:  # never read: the anchor ranges are empty
        anchor_rows = anchor_start = k_pos
    with device_guard(q_pos):
        block_plan_kernel[(tiles,)](
            cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, anchor_start, full, partial, counts,
            batch, batch.bit_length(), queries_per_tile, max_blocks, rule,
            BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=plan_chunk(block_n), USE_TAGS=use_tags, num_warps=PLAN_NUM_WARPS,
        )
    return BlockPlan(full, partial, counts, anchor_rows)


@dataclass
class _Entry:
    others: tuple  # weak references to the metadata tensors other than q_pos (a strong one could be q_pos itself)
    versions: tuple  # _version of q_pos and of the others when the plan was computed
    plan: BlockPlan


# q_pos -> {(ids of the other metadata tensors, tag switch, rule, tile shape): _Entry}
_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
stats = {"computed": 0, "reused": 0}  # for tests and benchmarks


def clear_plan_cache() -> None:
    _cache.clear()


def _capturing(t: torch.Tensor) -> bool:
    """Is a CUDA graph being captured on the stream this tensor's kernels would run on?"""
    if not t.is_cuda:
        return False
    with device_guard(t):
        return torch.cuda.is_current_stream_capturing()


def block_plan(
    cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, use_tags: bool, rule: int, batch: int,
    block_m: int, block_n: int, queries_per_tile: int,
) -> BlockPlan:
    """The plan for these metadata and tile shape: reused from an earlier call when the very same
    tensors, unchanged since, were planned for the same rule and tiles; computed otherwise (see the
    module docstring). The tensors must be the kernel's arguments (contiguous int32); pass the tags
    actually read (``use_tags``), or anything when they are not."""
    others = (cu_seqlens_q, cu_seqlens_k, k_pos) + ((q_tag, k_tag) if use_tags else ())
    args = (cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, use_tags, rule, batch, block_m, block_n,
            queries_per_tile)
    if _capturing(q_pos) or any(t.is_inference() for t in (q_pos, *others)):
        return compute_block_plan(*args)
    key = (tuple(id(t) for t in others), use_tags, rule if use_tags else 0, block_m, block_n, queries_per_tile)
    versions = (q_pos._version, *(t._version for t in others))
    plans = _cache.setdefault(q_pos, {})
    entry = plans.get(key)
    if entry is not None and entry.versions == versions and all(r() is t for r, t in zip(entry.others, others)):
        stats["reused"] += 1
        return entry.plan
    plan = compute_block_plan(*args)
    stats["computed"] += 1
    plans[key] = _Entry(tuple(weakref.ref(t) for t in others), versions, plan)
    return plan
