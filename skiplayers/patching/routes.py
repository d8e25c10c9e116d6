"""Which rows each decoder layer computes in one patched call: static layer skips, the per-sequence
``layer_mask`` and token early exit (``SkipPolicy``; DESIGN: every token has a depth profile).

At each layer a packed row is either computed (it runs the layer), carried (its hidden state passes
unchanged: its sequence skips the layer, or it exited), or, after an exit with KV propagation,
propagated: the layer stores its K/V, computed from the carried hidden state, and nothing else.

Rows that do not run a layer are left out of the computation, not masked: the layer runs on the
gathered subset of rows and its output is scattered back. A subset is built once per distinct set
of rows and reused by the layers that share it. The set is decided on the host (the mask, the
exits), so ``packing.select_row_sets`` builds its row metadata (``cu_seqlens``, in which a skipping
sequence has no rows; positions, tags) and rotary tables by ``index_select`` with no read back from
the device; each layer then gathers the hidden states with the same indices and scatters its output
back with ``index_copy`` (one indexed copy each, native on every device: a kernel of ours would move
the same bytes).

The routing is host work on every layer of every call, so it is kept to Python over lists: the
mask's columns are read once per call, and a subset's key is looked up before any tensor is made.
With a compaction kernel per tensor and a per-layer ``repeat_interleave`` it took 6.5 ms of a
SmolLM2 decode step (batch of 8, 8 different masks, CPU, about 5% of the step; timed around
``route``); built this way it takes 1.0 ms.

Propagated K/V go through the same ``SkipCache.append`` (``ops.cache_append``) as computed rows.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..packing import select_row_sets
from .attention import packed

if TYPE_CHECKING:
    from .attention import PackedStep
    from .traced import TracedStep


def check_layer_mask(layer_mask, batch: int, num_layers: int, skip_layers) -> torch.Tensor | None:
    """Validates ``layer_mask`` (bool ``[B, L]``, True = the sequence runs that layer). Returns it on
    the host, or None when absent."""
    if layer_mask is None:
        return None
    if not isinstance(layer_mask, torch.Tensor):
        raise TypeError(f"layer_mask must be a torch.Tensor of dtype torch.bool, got {type(layer_mask).__name__}")
    if layer_mask.dtype != torch.bool:
        raise TypeError(f"layer_mask must have dtype torch.bool (True = the sequence runs the layer), got {layer_mask.dtype}")
    if layer_mask.shape != (batch, num_layers):
        raise ValueError(f"layer_mask must have shape [batch={batch}, layers={num_layers}], got {tuple(layer_mask.shape)}")
    mask = layer_mask.detach().cpu()
    runs = mask.clone()
    if skip_layers:
        runs[:, list(skip_layers)] = False
    empty = (~runs.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"layer_mask (with the policy's skip_layers) leaves sequences {empty} without any layer to run"
        )
    return mask


def propagated_kv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """K/V a layer would compute for rows whose hidden states are ``hidden`` ``[1, n, hidden]``:
    the layer's input norm, its K/V projections (and k-norm, where the family has one: Qwen3) and
    RoPE at the rows' positions (``cos, sin [1, n, D]``; none on a SmolLM3 NoPE layer), by the
    family's own modules and RoPE function. Returns packed ``k, v [n, H_kv, D]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(x).view(shape)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = k.transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    if getattr(attn, "use_rope", True):
        apply_rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        _, k = apply_rope(k, k, cos, sin)
    return packed(k), packed(v)


@dataclass
class RowSubset:
    """The rows of the base step that run a layer: their step, their indices among the base rows
    (int64 ``[n]``, device) and their rotary tables ``[1, n, D]`` and positions ``[1, n]``."""

    step: PackedStep | TracedStep
    index: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor


class LayerRouter:
    """Per call: which base rows (the step's rows after the context-stop layer) each layer computes,
    which rows exited (early exit), and the layer-row work done.

    ``num_layers``: L; ``stop``: the layer where this call drops its context rows, or None;
    ``layer_mask``: host bool ``[B, L]`` or None; ``head``: hidden ``[n, hidden]`` -> logits (the
    final norm and LM head), used by the exit test; ``exits``: whether this call may exit (decode
    steps only, see ``EarlyExit``)."""

    def __init__(self, policy, num_layers: int, stop: int | None, layer_mask: torch.Tensor | None, head,
                 exits: bool):
        self.num_layers = num_layers
        self.stop = stop
        self.skip = frozenset(policy.skip_layers)
        self.dropped = frozenset(policy.drop_attention_layers)
        # Per layer: None when every sequence runs it, else a tuple of bools over the sequences
        # (hashable, so it names the layer's subset as it is).
        self._columns = None if layer_mask is None else \
            [None if all(column) else tuple(column) for column in layer_mask.T.tolist()]
        self.rule = policy.early_exit if exits else None
        self.head = head
        self.exited: torch.Tensor | None = None  # host bool [N] over the base rows
        self.exit_layer: torch.Tensor | None = None  # host int64 [N]: the layer a row exited after, -1: none
        self._version = 0  # bumps when rows exit (subsets keyed by it); 0: no row has exited
        self._subsets: dict = {}
        self.row_layers = 0  # rows computed, summed over layers (the work done)

    def rebase(self) -> None:
        """The base rows changed (the context-stop layer): subsets built on the old rows are stale."""
        if self.exited is not None:
            raise RuntimeError("rows exited before the context-stop layer compacted them")  # exits need no context
        self._subsets.clear()

    def _sequences(self, layer_idx: int) -> tuple[bool, ...] | None:
        """The sequences running the layer (bools over ``[B]``); None when all do."""
        return None if self._columns is None else self._columns[layer_idx]

    def _subset(self, kind: str, layer_idx: int, step, cos, sin) -> RowSubset | None:
        """The rows of ``kind`` ("run": computing the layer; "propagate": exited rows whose K/V it
        stores) at the layer; None when there are none. Named by the kind, the sequences running the
        layer and the exits so far, so layers with the same sequences share one."""
        key = kind, self._sequences(layer_idx), self._version, cos.device
        if key not in self._subsets:
            self._build(kind, layer_idx, step, cos, sin)
        return self._subsets[key]

    def _build(self, kind: str, first: int, step, cos, sin) -> None:
        """Builds the missing subsets of ``kind`` for the layers from ``first`` on, all in one
        ``select_row_sets`` call (the exits so far are known; later exits make new keys)."""
        device = cos.device
        # Up to the context-stop layer when it is ahead: it changes the base rows (rebase).
        last = self.stop if self.stop is not None and first < self.stop else self.num_layers
        wanted: dict = {}
        for layer_idx in range(first, last):
            if layer_idx in self.skip or (kind == "propagate" and layer_idx in self.dropped):
                continue
            sequences = self._sequences(layer_idx)
            key = kind, sequences, self._version, device
            if key not in self._subsets:
                wanted.setdefault(key, sequences)
        rows = step.rows_on(device)
        batch = rows.counts.shape[0]
        running = torch.tensor([(True,) * batch if s is None else s for s in wanted.values()], dtype=torch.bool)
        keep = running.view(-1, batch).repeat_interleave(rows.counts, dim=1)  # [K, N]
        if self._version:
            keep &= self.exited if kind == "propagate" else ~self.exited
        has_rows = keep.any(dim=1).tolist()
        built = iter(select_row_sets(rows, keep[torch.tensor(has_rows, dtype=torch.bool)], [cos[0], sin[0]]))
        for key, nonempty in zip(wanted, has_rows):
            subset = None
            if nonempty:
                sub_rows, index, (sub_cos, sub_sin) = next(built)
                subset = RowSubset(step.with_rows(sub_rows), index, sub_cos[None], sub_sin[None],
                                   sub_rows.pos[None].long())
            self._subsets[key] = subset

    def route(self, layer_idx: int, step, cos, sin) -> tuple[bool, RowSubset | None]:
        """Whether any row computes the layer and, if only some do, their :class:`RowSubset`
        (None: every base row computes it)."""
        if layer_idx in self.skip:
            return False, None
        if self._sequences(layer_idx) is None and self._version == 0:
            self.row_layers += step.rows.num_rows
            return True, None
        subset = self._subset("run", layer_idx, step, cos, sin)
        if subset is None:
            return False, None
        self.row_layers += subset.index.shape[0]
        return True, subset

    def propagate(self, layer_idx: int, layer, step, hidden, cos, sin, cache) -> None:
        """Stores the K/V of exited rows at a deeper layer (``EarlyExit(kv="propagate")``) from
        their carried hidden states (``hidden [N, hidden]``). Nothing where the layer is skipped for
        the row's sequence or its attention is dropped (such a layer stores nothing)."""
        if self.rule is None or not self.rule.propagates or self._version == 0 or cache is None:
            return
        if layer_idx in self.skip or layer_idx in self.dropped:
            return
        subset = self._subset("propagate", layer_idx, step, cos, sin)
        if subset is None:
            return
        k, v = propagated_kv(layer, hidden[subset.index.to(hidden.device)][None], subset.cos, subset.sin)
        r = subset.step.rows_on(k.device)
        cache.append(layer_idx, k.detach(), v.detach(), r, step.state.ops)

    def decide_exits(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """After an exit layer: rows still computing whose top probability reaches the threshold
        exit (``hidden [N, hidden]``)."""
        if self.rule is None or layer_idx not in self.rule.layers:
            return
        n = hidden.shape[0]
        if self.exited is None:
            self.exited = torch.zeros(n, dtype=torch.bool)
            self.exit_layer = torch.full((n,), -1, dtype=torch.int64)
        candidates = (~self.exited).nonzero().flatten()
        if candidates.numel() == 0:
            return
        logits = self.head(hidden[candidates.to(hidden.device)])
        confidence = torch.softmax(logits.float(), dim=-1).amax(dim=-1).cpu()
        leaving = candidates[confidence >= self.rule.threshold]
        if leaving.numel():
            self.exited[leaving] = True
            self.exit_layer[leaving] = layer_idx
            self._version += 1
