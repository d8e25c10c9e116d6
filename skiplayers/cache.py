"""SkipCache: a `transformers` Cache whose stored length differs per layer and per sequence.

Per layer it keeps K/V buffers ``[B, S_cap, H_kv, D]``, the absolute position and tag of every
stored slot (``[B, S_cap]`` int32) and the stored length of each sequence (``[B]`` int32, on the
model's device, with a host mirror so capacity decisions never wait on the device). Each
:class:`SkipCacheLayer` owns these and is the only code that changes them (append, compact, drop
the last slots, select sequences); :class:`SkipCache` decides what each layer stores and keeps.

Two lengths, both exposed:

* the **logical** length (``get_seq_length()``): token columns seen so far, padding included —
  what ``generate()`` uses to slice the next input ids;
* the **physical** lengths (``layer_lengths()``): slots actually stored per (layer, sequence). With
  context stop, layers >= ℓ store no context token, so their lengths do not depend on the context.

Buffers are allocated for what is stored plus a small growth margin for decoding; at layers >= ℓ
the context never enters them, not even during prefill (the rows are dropped before layer ℓ).

Writes come through transformers' own path: each attention module of a patched model calls
:meth:`SkipCache.update` with its new K/V, which stores them through the running forward's step
(``patching/attention.py``). :meth:`SkipCache.crop` forgets the last columns fed (assisted and
prompt-lookup decoding); with anchors the reduction a call requests is carried out lazily, before
the cache is next used, so the last call can always be undone.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .handles import new_handle
from .meta import TAG_ANCHOR, TAG_SENTENCE_SHIFT, TAG_SINK
from .ops import OpSet

if TYPE_CHECKING:
    from .policy import SkipPolicy


def _grown_capacity(needed: int) -> int:
    """Capacity for ``needed`` slots: room for some decoding steps, rounded to 16 slots."""
    margin = min(256, max(16, needed // 8))
    return -(-(needed + margin) // 16) * 16


def _read_only(name: str, doc: str) -> property:
    """A property that reads the attribute ``name`` and cannot be set."""
    return property(operator.attrgetter(name), doc=doc)


class SkipCacheLayer(CacheLayerMixin):
    """One layer's buffers and stored lengths, and the only code that changes them.

    ``keys, values [B, S_cap, H_kv, D]`` and ``pos, tag`` (int32 ``[B, S_cap]``) hold sequence b's
    first ``lengths[b]`` slots. The stored length of each sequence is kept twice: ``lengths`` (int32
    ``[B]``, on the buffers' device) is what the kernels read, ``host_lengths`` (int64 ``[B]``, cpu)
    is its mirror, so that capacity and dispatch decisions never wait on the device. Both change
    only together, inside :meth:`append`, :meth:`compact`, :meth:`drop_last` and the batch
    selections; from outside they are read-only properties (read, never modify in place), and
    :meth:`check_lengths` verifies that they agree.
    """

    is_compileable = False
    is_croppable = True  # SkipCache.crop undoes the columns of the last call (anchors included)
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: SkipCache, index: int):
        super().__init__()
        self._owner = owner
        self.index = index  # the decoder layer it caches (named in errors)
        self._pos: torch.Tensor | None = None
        self._tag: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None
        self._host_lengths: torch.Tensor | None = None

    # Read-only from outside: only the layer's own methods rebind them.
    pos = _read_only("_pos", "int32 ``[B, S_cap]``: the absolute position of every stored slot.")
    tag = _read_only("_tag", "int32 ``[B, S_cap]``: the tag word of every stored slot (``meta.py``).")
    lengths = _read_only("_lengths", "int32 ``[B]`` on the buffers' device: slots stored per sequence.")
    host_lengths = _read_only("_host_lengths", "int64 ``[B]`` on the host: the mirror of ``lengths``.")

    # --- the transformers CacheLayerMixin interface ---

    def lazy_initialization(self, key_states, value_states) -> None:
        raise TypeError(_NOT_HF_WRITABLE)

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError(_NOT_HF_WRITABLE)

    def get_seq_length(self) -> int:
        return self._owner.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        host = self._host_lengths
        stored = int(host.max()) if host is not None and host.numel() else 0
        return stored + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self._pos = self._tag = self._lengths = self._host_lengths = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences ``indices`` (int64 ``[B']``, repeats allowed: beam search), in that order."""
        if not self.is_initialized:
            return
        dev = indices.to(self.keys.device)
        self.keys, self.values, self._pos, self._tag = self.keys[dev], self.values[dev], self._pos[dev], self._tag[dev]
        self._lengths, self._host_lengths = self._lengths[dev], self._host_lengths[indices.cpu()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        for name in ("keys", "values", "_pos", "_tag", "_lengths", "_host_lengths"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise TypeError("crop a SkipCache as a whole (SkipCache.crop): a layer alone does not know which columns it holds")

    # --- skiplayers ---

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[1]

    def nbytes(self, include_metadata: bool = False) -> int:
        if self.keys is None:
            return 0
        total = self.keys.nbytes + self.values.nbytes
        if include_metadata:
            total += self._pos.nbytes + self._tag.nbytes + self._lengths.nbytes
        return total

    def append(self, k, v, pos, tag, cu_seqlens, counts: torch.Tensor, ops: OpSet) -> None:
        """Stores sequence b's ``counts[b]`` new rows after its stored slots (packed ``k, v [N, H_kv, D]``,
        ``pos, tag [N]`` int32, ``cu_seqlens`` int32 ``[B + 1]`` on the device; ``counts`` int64 ``[B]``
        on the host), growing the buffers first when they are too small."""
        batch = counts.shape[0]
        if self.keys is None:
            self._allocate(batch, _grown_capacity(int(counts.max()) if batch else 0), k)
        else:
            if self.keys.shape[0] != batch:
                raise ValueError(f"SkipCache holds {self.keys.shape[0]} sequences, the input has {batch}")
            needed = int((self._host_lengths + counts).max()) if batch else 0
            if needed > self.capacity:
                self._allocate(batch, _grown_capacity(needed), k)
        ops.cache_append(
            k_cache=self.keys, v_cache=self.values, pos_cache=self._pos, tag_cache=self._tag, k=k, v=v, pos=pos,
            tag=tag, cu_seqlens=cu_seqlens, cache_seqlens=self._lengths,
        )
        self._host_lengths += counts
        self._lengths += counts.to(device=self._lengths.device, dtype=torch.int32)

    def compact(self, keep: torch.Tensor, ops: OpSet) -> None:
        """Keeps, per sequence b, the stored slots ``s < lengths[b]`` with ``keep[b, s]`` (bool
        ``[B, S_cap]`` on the buffers' device; slots past a sequence's length are never kept), moved
        to the front of buffers sized for what is kept (memory is released, not only marked free).
        Reads the kept counts back (one device sync); does nothing when every stored slot is kept."""
        if self.keys is None:
            return
        keep = keep & (torch.arange(self.capacity, device=keep.device)[None, :] < self._lengths[:, None])
        kept = keep.sum(dim=1).cpu()
        if torch.equal(kept, self._host_lengths):
            return
        self.keys, self.values, self._pos, self._tag, self._lengths = ops.cache_compact(
            k_cache=self.keys, v_cache=self.values, pos_cache=self._pos, tag_cache=self._tag,
            cache_seqlens=self._lengths, keep=keep, capacity=_grown_capacity(int(kept.max()) if kept.numel() else 0),
        )
        self._host_lengths = kept.to(torch.int64)

    def drop_last(self, counts: torch.Tensor) -> None:
        """Forgets sequence b's last ``counts[b]`` stored slots (int64 ``[B]``, host); the buffers keep
        their capacity."""
        if self._host_lengths is None:
            return
        if bool((counts > self._host_lengths).any()):
            raise RuntimeError(f"SkipCache layer {self.index} holds fewer slots than the columns to crop; "
                               "it is inconsistent")
        self._host_lengths -= counts
        self._lengths -= counts.to(device=self._lengths.device, dtype=torch.int32)

    def check_lengths(self) -> None:
        """Raises ``RuntimeError`` naming this layer and the sequences whose host mirror differs from
        the device lengths, or whose length is outside ``0 .. capacity``. Reads the device lengths
        back (a device sync): for tests and debugging, never called on the forward path."""
        host, device = self._host_lengths, self._lengths
        if host is None and device is None:
            return
        if host is None or device is None:
            raise RuntimeError(f"SkipCache layer {self.index}: only one of the host and device lengths is set")
        device = device.cpu().to(torch.int64)
        if host.shape != device.shape:
            raise RuntimeError(f"SkipCache layer {self.index}: host lengths hold {host.shape[0]} sequences, "
                               f"device lengths {device.shape[0]}")
        wrong = ((host != device) | (host < 0) | (host > self.capacity)).nonzero().flatten().tolist()
        if wrong:
            raise RuntimeError(
                f"SkipCache layer {self.index}: stored lengths inconsistent for sequences {wrong} (host "
                f"{host[wrong].tolist()}, device {device[wrong].tolist()}, capacity {self.capacity})"
            )

    def _allocate(self, batch: int, capacity: int, like: torch.Tensor) -> None:
        """Buffers of ``capacity`` slots for ``batch`` sequences, like ``like [N, H_kv, D]``; what is
        stored is kept (growth), and a first allocation starts with nothing stored."""
        kv_shape = (batch, capacity, *like.shape[1:])
        keys = like.new_empty(kv_shape)
        values = like.new_empty(kv_shape)
        pos = torch.zeros((batch, capacity), dtype=torch.int32, device=like.device)
        tag = torch.zeros((batch, capacity), dtype=torch.int32, device=like.device)
        if self.keys is not None:  # grow: keep what is stored
            old = self.capacity
            keys[:, :old], values[:, :old] = self.keys, self.values
            pos[:, :old], tag[:, :old] = self._pos, self._tag
        else:
            self._lengths = torch.zeros(batch, dtype=torch.int32, device=like.device)
            self._host_lengths = torch.zeros(batch, dtype=torch.int64)
        self.keys, self.values, self._pos, self._tag = keys, values, pos, tag
        self.is_initialized = True


_NOT_HF_WRITABLE = (
    "SkipCache is written by models patched with skiplayers.patch(); an unpatched model cannot use it "
    "(pass past_key_values=None or a DynamicCache to an unpatched model)"
)


class SkipCache(Cache):
    """KV cache for a model patched by :func:`skiplayers.patch`; see the module docstring."""

    layers: list[SkipCacheLayer]  # type: ignore[assignment]  # Cache declares its layer union; all are ours

    def __init__(self, num_layers: int):
        super().__init__(layers=[SkipCacheLayer(self, idx) for idx in range(num_layers)])
        self.logical_length = 0
        # Per sequence: context tokens and non-context tokens seen so far (host int64 [B]).
        self.context_counts: torch.Tensor | None = None
        self.noncontext_counts: torch.Tensor | None = None
        self.policy: SkipPolicy | None = None  # the SkipPolicy that wrote the cache; a later call must use the same one
        # With anchors: per sequence, anchors (= finished sentences) and real tokens seen (host int64 [B]).
        self.sentence_counts: torch.Tensor | None = None
        self.tokens_seen: torch.Tensor | None = None
        # Per sequence, the largest position fed so far (host int64 [B]; -1: none), which tells
        # attention dispatch whether new positions continue the stored ones (dispatch/patterns.py).
        self.last_positions: torch.Tensor | None = None
        # Per fed column (host [B, T] chunks): a real token? a context token? an anchor? its position
        # (-1 on padding)? What crop undoes.
        self._fed_valid: list[torch.Tensor] = []
        self._fed_context: list[torch.Tensor] = []
        self._fed_anchor: list[torch.Tensor] = []
        self._fed_positions: list[torch.Tensor] = []
        self._anchor_through = 0  # logical length when finished sentences were last dropped
        # With anchors, finished sentences leave the cache lazily (see request_reduction): the ops to do it with.
        self._pending_reduction: OpSet | None = None
        # Per sequence and layer, whether the sequence runs it (host bool [B, L], the forward's
        # layer_mask; None: every sequence runs every layer the policy keeps).
        self.layer_mask: torch.Tensor | None = None
        # Whether some rows exited early and deeper layers stored nothing for them (EarlyExit(kv="none")):
        # then the layers hold different columns, which crop cannot undo.
        self.uneven_exits = False
        self._active_step = None  # the patched forward call now writing (set by use_step)
        self.handle = new_handle(self)  # names this cache inside compiled graphs (handles.py)

    # --- writing ---

    def check_layer_mask(self, mask: torch.Tensor | None) -> None:
        """A call's ``layer_mask`` (host bool ``[B, L]`` or None) must be the one the cache was filled
        with: a sequence stores nothing at a layer it skips, so it cannot start running it later."""
        if self.logical_length == 0:
            self.layer_mask = mask
            return
        same = (mask is None and self.layer_mask is None) or (
            mask is not None and self.layer_mask is not None and torch.equal(mask, self.layer_mask))
        if not same:
            raise ValueError(
                "layer_mask differs from the one this SkipCache was filled with (pass the same layer_mask to every "
                "call of a generation, or none to all; generate() does so)"
            )

    def use_step(self, step) -> None:
        """The layers of a patched forward start (or reach the context-stop layer, which gets a new
        step): the attention modules' ``update`` calls go to ``step.store``."""
        self._active_step = step

    def end_call(self) -> None:
        self._active_step = None

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None, *args, **kwargs):
        """transformers' write path, called by each attention module with its new K/V
        (``[1, H_kv, N, D]``, the packed rows of the current call); stores them through the step of
        the patched forward (``patching/attention.py``) and returns them unchanged."""
        if self._active_step is None:
            raise TypeError(_NOT_HF_WRITABLE)
        return self._active_step.store(self, layer_idx, key_states, value_states)

    def append(self, layer_idx: int, k, v, pos, tag, cu_seqlens, counts: torch.Tensor, ops: OpSet) -> None:
        """Stores new rows at layer ``layer_idx`` (:meth:`SkipCacheLayer.append`)."""
        self.layers[layer_idx].append(k, v, pos, tag, cu_seqlens, counts, ops)

    def request_reduction(self, ops: OpSet) -> None:
        """A sentence finished: its tokens (but its anchor) leave the cache before it is next used
        (:meth:`settle`). Deferring is exact (the AnSAN rule already hides them from every later
        query) and lets :meth:`crop` undo the columns of the last call, anchors included, as
        assisted decoding needs."""
        self._pending_reduction = ops

    def settle(self) -> None:
        """Does a requested reduction now (before a forward, or when lengths or bytes are read)."""
        ops, self._pending_reduction = self._pending_reduction, None
        if ops is not None:
            self.drop_finished_sentences(ops)

    def drop_finished_sentences(self, ops: OpSet) -> None:
        """AnLLM cache reduction: in every layer and sequence, keeps only the anchors (and sinks) of
        finished sentences and the tokens of the current one, compacted by the backend's kernel into
        buffers sized for what is kept (memory is released, not only marked free)."""
        self._anchor_through = self.logical_length
        for layer in self.layers:
            if layer.keys is None:
                continue
            current = self.sentence_counts.to(device=layer.tag.device, dtype=torch.int32)  # sentence each sequence is in
            kept_tokens = (layer.tag & (TAG_ANCHOR | TAG_SINK)) != 0
            current_sentence = (layer.tag >> TAG_SENTENCE_SHIFT) >= current[:, None]
            layer.compact(kept_tokens | current_sentence, ops)

    def stored(self, layer_idx: int):
        """``(keys, values, pos, tag, lengths, host_lengths)`` of a layer: the layout of
        ``cache_attention`` and the host mirror of the lengths (read only)."""
        layer = self.layers[layer_idx]
        return layer.keys, layer.values, layer.pos, layer.tag, layer.lengths, layer.host_lengths

    def is_empty(self, layer_idx: int) -> bool:
        layer = self.layers[layer_idx]
        return layer.host_lengths is None or bool((layer.host_lengths == 0).all())

    def advance(self, valid: torch.Tensor, context: torch.Tensor, positions: torch.Tensor,
                anchor: torch.Tensor | None = None) -> None:
        """Counts the columns of a finished call as seen: ``valid`` / ``context`` / ``anchor`` bool
        ``[B, T]`` (host) say which were real tokens, context and anchors, ``positions`` (int64
        ``[B, T]``, host) their positions (kept so :meth:`crop` can undo them)."""
        self.logical_length += valid.shape[1]
        self._fed_valid.append(valid)
        self._fed_context.append(context)
        self._fed_anchor.append(torch.zeros_like(valid) if anchor is None else anchor)
        fed = torch.where(valid, positions, -1)
        self._fed_positions.append(fed)
        newest = fed.max(dim=1).values if fed.shape[1] else torch.full((valid.shape[0],), -1, dtype=torch.int64)
        self.last_positions = newest if self.last_positions is None else torch.maximum(self.last_positions, newest)

    # --- reading ---

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def layer_lengths(self) -> torch.Tensor:
        """LongTensor ``[L, B]``: slots stored per layer and sequence (0 where nothing is stored)."""
        self.settle()
        batch = self.batch_size if self.batch_size > 0 else 0
        rows = [
            layer.host_lengths if layer.host_lengths is not None else torch.zeros(batch, dtype=torch.int64)
            for layer in self.layers
        ]
        return torch.stack(rows) if rows else torch.zeros(0, batch, dtype=torch.int64)

    def nbytes(self, include_metadata: bool = False) -> int:
        """Bytes the K/V buffers occupy (allocated capacity, not only the used slots); with
        ``include_metadata`` also the position, tag and length buffers."""
        self.settle()
        return sum(layer.nbytes(include_metadata) for layer in self.layers)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.keys is not None:
                return layer.keys.shape[0]
        return -1 if self.context_counts is None else self.context_counts.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        """Forgets the last columns fed, in every layer and sequence, as if they had never been fed
        (what assisted and prompt-lookup decoding do with rejected candidates).

        ``tokens_to_remove`` < 0 removes that many columns; > 0 is the legacy form, the logical length
        to keep; 0 does nothing. Per layer and sequence the slots removed are the real tokens of those
        columns that the layer stored: at layers >= ℓ the context tokens were never stored. With
        anchors, columns up to the end of a call in which a sentence finished cannot be removed (the
        reduction already dropped that sentence's tokens) and are refused; the reduction a call
        requests is deferred (:meth:`request_reduction`), so the columns of the last call can
        always be removed."""
        remove = -tokens_to_remove if tokens_to_remove <= 0 else self.logical_length - tokens_to_remove
        if remove == 0:
            return
        if self.uneven_exits:
            raise NotImplementedError(
                "cannot crop a SkipCache after early exits with kv='none' (deeper layers hold different columns); "
                "use EarlyExit(kv='propagate') with assisted decoding"
            )
        if not 0 < remove <= self.logical_length:
            raise ValueError(f"cannot crop {remove} columns from a SkipCache holding {self.logical_length}")
        keep = self.logical_length - remove
        if keep < self._anchor_through:
            raise NotImplementedError(
                f"cannot crop the SkipCache to {keep} columns: a sentence finished within the last {remove} columns "
                f"and the anchor cache already dropped its tokens (columns up to {self._anchor_through} are fixed)"
            )
        valid, context = torch.cat(self._fed_valid, dim=1), torch.cat(self._fed_context, dim=1)
        anchor = torch.cat(self._fed_anchor, dim=1)
        tokens = valid[:, keep:].sum(dim=1)
        contexts = context[:, keep:].sum(dim=1)
        stop = self.policy.context_stop_layer if self.policy is not None else None
        for idx, layer in enumerate(self.layers):
            stored = tokens - contexts if stop is not None and idx >= stop else tokens
            if self.layer_mask is not None:  # a sequence stores nothing at a layer it skips
                stored = stored * self.layer_mask[:, idx]
            layer.drop_last(stored)
        if self.context_counts is not None:
            self.context_counts = self.context_counts - contexts
            self.noncontext_counts = self.noncontext_counts - (tokens - contexts)
        if self.tokens_seen is not None:
            self.tokens_seen = self.tokens_seen - tokens
            self.sentence_counts = self.sentence_counts - anchor[:, keep:].sum(dim=1)
        self.logical_length = keep
        self._fed_valid, self._fed_context, self._fed_anchor = [valid[:, :keep]], [context[:, :keep]], [anchor[:, :keep]]
        positions = torch.cat(self._fed_positions, dim=1)[:, :keep]
        self._fed_positions = [positions]
        self.last_positions = positions.max(dim=1).values if keep else torch.full_like(self.last_positions, -1)

    def check_lengths(self) -> None:
        """Raises ``RuntimeError`` if some layer's host and device lengths disagree
        (:meth:`SkipCacheLayer.check_lengths`; a device sync per layer, for tests and debugging)."""
        for layer in self.layers:
            layer.check_lengths()

    def reset(self) -> None:
        super().reset()
        self.logical_length = 0
        self.context_counts = self.noncontext_counts = self.sentence_counts = self.tokens_seen = None
        self._fed_valid, self._fed_context, self._fed_anchor, self._anchor_through = [], [], [], 0
        self._fed_positions, self.last_positions = [], None
        self._pending_reduction = None
        self.layer_mask, self.uneven_exits = None, False

    def _select(self, fn) -> None:
        """Applies a batch selection to the per-sequence host counters and column history."""
        for name in ("context_counts", "noncontext_counts", "sentence_counts", "tokens_seen", "last_positions",
                     "layer_mask"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        for name in ("_fed_valid", "_fed_context", "_fed_anchor", "_fed_positions"):
            setattr(self, name, [fn(chunk) for chunk in getattr(self, name)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select(lambda t: t[beam_idx.cpu()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select(lambda t: t[indices.cpu()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def __repr__(self) -> str:
        return f"SkipCache(layers={len(self.layers)}, logical_length={self.logical_length}, nbytes={self.nbytes()})"
