"""SkipCache: a `transformers` Cache whose stored length differs per layer and per sequence.

K/V live in pages (``pages.py``): pools ``[num_pages, page_size, H_kv, D]`` shared by all layers, the
layout of vLLM, FlashInfer and torch's ``varlen_attn(block_table=...)``. Per layer and sequence a
block table names the pages that hold the sequence's slots (slot s in page ``block_table[b, s //
page_size]``), so a sequence pays for the pages its stored tokens fill, not for the longest
sequence of the batch: a layer holds at most one partly filled page per sequence. Pages that
context stop never fills are never taken; pages that anchor reduction or ``crop`` empties go back
to the pool.

Each :class:`SkipCacheLayer` owns its block table (int32 ``[B, max_pages]``, on the pool's device,
with a host mirror) and the stored length of each sequence (int32 ``[B]`` on the device, with a host
mirror): page assignment is decided on the host from the mirrors and never waits on the device. The
layer is the only code that changes them (append, compact, drop the last slots, select sequences);
:class:`SkipCache` decides what each layer stores and keeps.

Two lengths, both exposed:

* the **logical** length (``get_seq_length()``): token columns seen so far, padding included —
  what ``generate()`` uses to slice the next input ids;
* the **physical** lengths (``layer_lengths()``): slots actually stored per (layer, sequence). With
  context stop, layers >= ℓ store no context token, so their lengths do not depend on the context.

Memory: ``nbytes()`` counts the K/V pages the layers hold; ``pool_nbytes()`` the pools' tensors
(free pages included). A pool grows on demand, or is reserved up front (``max_tokens`` /
``max_bytes``): then it never reallocates. A write has a host half (``prepare_write``: pages,
host mirrors) and a device half (``write_prepared``); a decode step that runs the host half of all
its writes first takes no page itself (``patching/static_decode.py``).

Writes come through transformers' own path: each attention module of a patched model calls
:meth:`SkipCache.update` with its new K/V, which stores them through the running forward's step
(``patching/attention.py``). :meth:`SkipCache.crop` forgets the last columns fed (assisted and
prompt-lookup decoding); with anchors the reduction a call requests is carried out lazily, before
the cache is next used, so the last call can always be undone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .handles import new_handle
from .meta import TAG_ANCHOR, TAG_SENTENCE_SHIFT, TAG_SINK
from .ops import OpSet
from .pages import PagePool, page_bytes

if TYPE_CHECKING:
    from .packing import PackedRows
    from .policy import SkipPolicy

DEFAULT_PAGE_SIZE = 16


def _read_only(name: str, doc: str) -> property:
    """A property that reads the attribute ``name`` and cannot be set (a plain function, which
    dynamo traces, unlike ``operator.attrgetter``)."""

    def read(self):
        return getattr(self, name)

    return property(read, doc=doc)


def _upload(device_tensor: torch.Tensor, host: torch.Tensor) -> None:
    """``device_tensor.copy_(host)`` without the host waiting for the device. On CUDA a blocking
    copy would synchronise the stream (``StaticDecoder.prepare`` must not: the previous step may
    still be running), so the copy is queued on the current stream from a pinned snapshot of
    ``host``: it runs after the queued work that reads the old values and before the work queued
    after it, and torch's pinned-memory allocator keeps the snapshot until the copy has run, so
    the caller may edit ``host`` at once."""
    if device_tensor.device.type == "cuda":
        device_tensor.copy_(host.pin_memory(), non_blocking=True)
    else:
        device_tensor.copy_(host)


def _pages_for(slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages needed to hold ``slots`` (int64 host tensor) slots each."""
    return (slots + page_size - 1) // page_size


class SkipCacheLayer(CacheLayerMixin):
    """One layer's block tables and stored lengths, and the only code that changes them.

    The pages themselves are the cache pool's (``pool.keys``, ``pool.values``, ``pool.pos``,
    ``pool.tag``); transformers' ``keys`` / ``values`` attributes stay None. Sequence b holds ``lengths[b]`` slots in the pages ``block_table[b, :held[b]]`` of the cache's
    pool (-1 past them). The block table and the lengths are kept twice: on the pool's device
    (``block_table`` int32 ``[B, max_pages]``, ``lengths`` int32 ``[B]``: what the kernels read) and on
    the host (``host_block_table``, ``host_lengths`` int64 ``[B]``), so that page assignment and
    dispatch never wait on the device. Both change only together, inside :meth:`append`,
    :meth:`compact`, :meth:`drop_last` and the batch selections; from outside they are read-only
    properties (read, never modify in place), and :meth:`check_lengths` verifies that they agree.
    """

    is_compileable = False
    is_croppable = True  # SkipCache.crop undoes the columns of the last call (anchors included)
    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: SkipCache, index: int):
        super().__init__()
        self._owner = owner
        self.index = index  # the decoder layer it caches (named in errors)
        self.pool: PagePool | None = None
        self._clear()

    def _clear(self) -> None:
        self._table: torch.Tensor | None = None  # device int32 [B, max_pages]
        self._host_table: torch.Tensor | None = None  # host int32 [B, max_pages]
        self._held: torch.Tensor | None = None  # host int64 [B]: pages held per sequence
        self._slots_held: torch.Tensor | None = None  # host int64 [B]: _held * page_size (the fast check)
        self._lengths: torch.Tensor | None = None
        self._host_lengths: torch.Tensor | None = None

    # Read-only from outside: only the layer's own methods rebind them.
    block_table = _read_only("_table", "int32 ``[B, max_pages]`` on the pool's device: each sequence's pages.")
    host_block_table = _read_only("_host_table", "int32 ``[B, max_pages]`` on the host: the mirror of ``block_table``.")
    lengths = _read_only("_lengths", "int32 ``[B]`` on the pool's device: slots stored per sequence.")
    host_lengths = _read_only("_host_lengths", "int64 ``[B]`` on the host: the mirror of ``lengths``.")

    @property
    def held_pages(self) -> torch.Tensor | None:
        """int64 ``[B]`` (host): pages each sequence holds at this layer."""
        return self._held

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
        self._release_all()
        self._clear()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the sequences ``indices`` (int64 ``[B']``, repeats allowed: beam search), in that order.

        Pages move with their sequence: a sequence's first selection takes its block table row as
        it is (no copy), each further selection of it gets copies of its pages (the writing ops
        need every page to belong to one sequence), and the pages of sequences not selected go back
        to the pool."""
        if self._host_table is None:
            return
        chosen, before = indices.cpu().tolist(), self._rows()
        rows, held, first_use = [], [], set()
        for old in chosen:
            pages = before[old]
            if old not in first_use:
                first_use.add(old)
                rows.append(pages)
            else:
                copies = self.pool.take(len(pages))
                self.pool.copy_pages(pages, copies)
                rows.append(copies)
            held.append(len(pages))
        dropped = [p for b, pages in enumerate(before) if b not in first_use for p in pages]
        self.pool.give(dropped)
        self._set_held(torch.tensor(held, dtype=torch.int64))
        self._set_table(rows)
        self._lengths = self._lengths[indices.to(self._lengths.device)]
        self._host_lengths = self._host_lengths[indices.cpu()]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._host_table is None:
            return
        self.batch_select_indices(torch.arange(self._host_table.shape[0]).repeat_interleave(repeats))

    def pages_to_copy(self, indices: torch.Tensor) -> int:
        """Pages :meth:`batch_select_indices` would copy for ``indices``: those of every selection of
        a sequence after its first."""
        if self._held is None:
            return 0
        seen: set[int] = set()
        total = 0
        for old in indices.cpu().tolist():
            if old in seen:
                total += int(self._held[old])
            seen.add(old)
        return total

    def crop(self, tokens_to_remove: int) -> None:
        raise TypeError("crop a SkipCache as a whole (SkipCache.crop): a layer alone does not know which columns it holds")

    # --- skiplayers ---

    @property
    def page_size(self) -> int:
        return self._owner.page_size

    def nbytes(self, include_metadata: bool = False) -> int:
        """Bytes of the K/V pages this layer holds (with ``include_metadata``, also their pos/tag
        pages, the block tables and the lengths)."""
        if self._held is None:
            return 0
        pages = int(self._held.sum())
        total = pages * self.pool.page_nbytes
        if include_metadata:
            total += pages * 2 * self.page_size * 4 + self._table.nbytes + self._lengths.nbytes
        return total

    def reserve(self, counts: torch.Tensor, like: torch.Tensor | None = None) -> None:
        """Makes sure sequence b holds the pages for ``counts[b]`` more slots (int64 ``[B]``, host),
        taking them from the pool; host work only, plus a copy of the block table to the device
        when it changed. ``like`` (K/V rows ``[N, H_kv, D]``) sizes the pool at a first write."""
        batch = counts.shape[0]
        self._owner.written(self.index)
        if self._held is None:
            if like is None:
                raise RuntimeError(f"SkipCache layer {self.index}: no pages yet, and no K/V to size them by")
            self.pool = self._owner.pool_for(like)
            self._set_held(torch.zeros(batch, dtype=torch.int64))
            self._host_lengths = torch.zeros(batch, dtype=torch.int64)
            self._lengths = torch.zeros(batch, dtype=torch.int32, device=self.pool.keys.device)
            self._set_table([[] for _ in range(batch)])
            self.is_initialized = True
        elif self._held.shape[0] != batch:
            raise ValueError(f"SkipCache holds {self._held.shape[0]} sequences, the input has {batch}")
        if bool((self._host_lengths + counts <= self._slots_held).all()):
            return  # the pages held have room (most decode steps)
        # A few sequences: host lists are cheaper than tensor ops here.
        ps, held = self.page_size, self._held.tolist()
        needed = [max(0, -(-n // ps) - h) for n, h in zip((self._host_lengths + counts).tolist(), held)]
        wanted = sum(needed)
        # What the rest of the call will take counts only when the pool must grow (one reallocation).
        to_come = self._owner.pages_to_come(self.pool) if wanted > self.pool.free_pages else 0
        taken = self.pool.take(wanted, to_come=to_come)
        new_held = [h + n for h, n in zip(held, needed)]
        if max(new_held) > self._host_table.shape[1]:
            self._set_table(self._rows(), width=-(-max(new_held) // 8) * 8)  # wider, in steps of 8 pages
        for b, n in enumerate(needed):  # the new pages go after each sequence's last
            if n:
                self._host_table[b, held[b] : held[b] + n] = torch.tensor(taken[:n], dtype=torch.int32)
                taken = taken[n:]
        self._set_held(torch.tensor(new_held, dtype=torch.int64))
        _upload(self._table, self._host_table)  # in place: graphs that read it stay valid

    def pages_needed(self, counts: torch.Tensor) -> int:
        """Pages this layer would take to store ``counts[b]`` more slots per sequence (int64 ``[B]``)."""
        if self._held is None:
            return int(_pages_for(counts, self.page_size).sum())
        if self._held.shape[0] != counts.shape[0]:
            return 0  # refused when the write comes
        return int((_pages_for(self._host_lengths + counts, self.page_size) - self._held).clamp(min=0).sum())

    def append(self, k, v, pos, tag, cu_seqlens, counts: torch.Tensor, ops: OpSet,
               device_counts: torch.Tensor | None = None) -> None:
        """Stores sequence b's ``counts[b]`` new rows after its stored slots (packed ``k, v [N, H_kv, D]``,
        ``pos, tag [N]`` int32, ``cu_seqlens`` int32 ``[B + 1]`` on the device; ``counts`` int64 ``[B]``
        on the host; ``device_counts``: the same counts on the device, ``cu_seqlens.diff()`` when not
        given), taking pages first where they are needed: both halves of a write at once."""
        self.prepare_write(counts, like=k)
        self.write_prepared(k, v, pos, tag, cu_seqlens, ops, device_counts)

    def prepare_write(self, counts: torch.Tensor, max_pages: int | None = None,
                      like: torch.Tensor | None = None) -> None:
        """The host half of a write (:meth:`write_prepared` is the device half): takes the pages
        ``counts[b]`` more slots need and counts them in the host mirror (int64 ``[B]``). Until the
        device half runs, the host mirror is ahead of the device. ``max_pages`` widens the block
        table once to that many pages per sequence, so that later writes never replace the device
        table (a captured graph holds its address); ``like`` sizes the pool at a first write."""
        if max_pages is not None and self._host_table is not None and max_pages > self._host_table.shape[1]:
            self._set_table(self._rows(), width=max_pages)  # a new device table, of the new width
        self.reserve(counts, like=like)
        self._host_lengths += counts

    def write_prepared(self, k, v, pos, tag, cu_seqlens, ops: OpSet, device_counts: torch.Tensor | None = None) -> None:
        """The device half of a write whose host half :meth:`prepare_write` did: stores the packed rows
        and advances the device lengths (by ``device_counts``, or ``cu_seqlens.diff()``), on the
        device only (no page taken, nothing read back, no host-to-device copy)."""
        ops.cache_append(
            k_cache=self.pool.keys, v_cache=self.pool.values, pos_cache=self.pool.pos, tag_cache=self.pool.tag,
            block_table=self._table, k=k, v=v, pos=pos, tag=tag, cu_seqlens=cu_seqlens, cache_seqlens=self._lengths,
        )
        self._lengths += cu_seqlens.diff() if device_counts is None else device_counts

    def slot_tags(self) -> torch.Tensor:
        """int32 ``[B, max_pages * page_size]`` on the device: the tag word of each sequence's slots in
        slot order (garbage past each length)."""
        batch, width = self._table.shape
        return self.pool.tag[self._table.clamp(min=0).long()].reshape(batch, width * self.page_size)

    def compact(self, keep: torch.Tensor, ops: OpSet) -> None:
        """Keeps, per sequence b, the stored slots ``s < lengths[b]`` with ``keep[b, s]`` (bool
        ``[B, max_pages * page_size]`` on the device), moved in place to the front of the sequence's
        pages; the pages left empty go back to the pool. Reads the new lengths back (one device sync)."""
        if self._held is None:
            return
        new_lengths = ops.cache_compact(
            k_cache=self.pool.keys, v_cache=self.pool.values, pos_cache=self.pool.pos, tag_cache=self.pool.tag,
            block_table=self._table, cache_seqlens=self._lengths, keep=keep.contiguous(),
        )
        self._lengths = new_lengths
        self._host_lengths = new_lengths.cpu().to(torch.int64)
        self._release_unused()

    def drop_last(self, counts: torch.Tensor) -> None:
        """Forgets sequence b's last ``counts[b]`` stored slots (int64 ``[B]``, host); pages left empty
        go back to the pool."""
        if self._host_lengths is None:
            return
        if bool((counts > self._host_lengths).any()):
            raise RuntimeError(f"SkipCache layer {self.index} holds fewer slots than the columns to crop; "
                               "it is inconsistent")
        self._host_lengths -= counts
        self._lengths -= counts.to(device=self._lengths.device, dtype=torch.int32)
        self._release_unused()

    def check_lengths(self) -> None:
        """Raises ``RuntimeError`` naming this layer and the sequences whose host mirror differs from
        the device lengths, whose length is outside ``0 .. held pages * page_size``, or whose block
        table differs between host and device or names a page twice. Reads the device back (a
        device sync): for tests and debugging, never called on the forward path."""
        host, device = self._host_lengths, self._lengths
        if host is None and device is None:
            return
        if host is None or device is None:
            raise RuntimeError(f"SkipCache layer {self.index}: only one of the host and device lengths is set")
        device = device.cpu().to(torch.int64)
        if host.shape != device.shape:
            raise RuntimeError(f"SkipCache layer {self.index}: host lengths hold {host.shape[0]} sequences, "
                               f"device lengths {device.shape[0]}")
        capacity = self._slots_held
        wrong = ((host != device) | (host < 0) | (host > capacity)).nonzero().flatten().tolist()
        if wrong:
            raise RuntimeError(
                f"SkipCache layer {self.index}: stored lengths inconsistent for sequences {wrong} (host "
                f"{host[wrong].tolist()}, device {device[wrong].tolist()}, capacity {capacity[wrong].tolist()})"
            )
        if not torch.equal(self._table.cpu(), self._host_table):
            raise RuntimeError(f"SkipCache layer {self.index}: the device block table differs from its host mirror")
        pages = self.pages()
        if len(set(pages)) != len(pages):
            raise RuntimeError(f"SkipCache layer {self.index}: a page is held twice (the writing ops need each page "
                               "to belong to one sequence)")

    def read(self, field: str, b: int) -> torch.Tensor:
        """Sequence b's stored slots of the pool's ``field`` (``"keys"``, ``"values"``, ``"pos"`` or
        ``"tag"``) in slot order, ``[lengths[b], ...]`` (a copy; for tests and inspection)."""
        n = int(self._host_lengths[b])
        slots = torch.arange(n)
        pages = self._host_table[b, slots // self.page_size].long()
        pool = getattr(self.pool, field)
        return pool[pages.to(pool.device), (slots % self.page_size).to(pool.device)]

    def pages(self) -> list[int]:
        """The pages this layer holds, over all sequences (host)."""
        if self._host_table is None:
            return []
        return [p for row in self._rows() for p in row]

    def _rows(self) -> list[list[int]]:
        """Each sequence's pages (host lists)."""
        return [self._host_table[b, : int(self._held[b])].tolist() for b in range(self._held.shape[0])]

    def _set_table(self, rows: list[list[int]], width: int | None = None) -> None:
        """Rebuilds the block table from per-sequence page lists (host), and its device copy (in
        place when its shape stays). The width grows in steps of 8 pages, so that a decode step
        that takes a page rarely widens it."""
        needed = max([len(r) for r in rows] + [0])
        if width is not None:
            width = max(width, needed)
        elif self._host_table is not None and needed <= self._host_table.shape[1]:
            width = self._host_table.shape[1]
        else:
            width = -(-needed // 8) * 8
        table = torch.full((len(rows), width), -1, dtype=torch.int32)
        for b, r in enumerate(rows):
            table[b, : len(r)] = torch.tensor(r, dtype=torch.int32)
        self._host_table = table
        device = self.pool.keys.device
        if self._table is not None and self._table.shape == table.shape:
            _upload(self._table, table)  # in place: graphs that read it stay valid
        else:
            self._table = table.to(device, copy=True)  # never the host mirror itself, even on the CPU

    def renumber_pages(self, mapping: dict[int, int]) -> None:
        """Follows a shrink of the pool (``PagePool.shrink_to``): page ``old`` is now ``mapping[old]``."""
        if self._host_table is None:
            return
        self._set_table([[mapping[p] for p in row] for row in self._rows()])

    def _set_held(self, pages: torch.Tensor) -> None:
        self._held, self._slots_held = pages, pages * self.page_size

    def _release_unused(self) -> None:
        """Returns the pages past each sequence's stored slots to the pool."""
        keep = _pages_for(self._host_lengths, self.page_size)
        if not bool((keep < self._held).any()):
            return
        rows, freed = [], []
        for pages, kept in zip(self._rows(), keep.tolist()):
            rows.append(pages[:kept])
            freed += pages[kept:]
        self.pool.give(freed)
        self._set_held(keep.clone())
        self._set_table(rows)

    def _release_all(self) -> None:
        if self.pool is not None:
            self.pool.give(self.pages())


_NOT_HF_WRITABLE = (
    "SkipCache is written by models patched with skiplayers.patch(); an unpatched model cannot use it "
    "(pass past_key_values=None or a DynamicCache to an unpatched model)"
)


class SkipCache(Cache):
    """KV cache for a model patched by :func:`skiplayers.patch`; see the module docstring."""

    layers: list[SkipCacheLayer]  # type: ignore[assignment]  # Cache declares its layer union; all are ours

    def __init__(self, num_layers: int, page_size: int = DEFAULT_PAGE_SIZE, max_tokens: int | None = None,
                 max_bytes: int | None = None):
        """``num_layers``: the model's decoder layers. ``page_size``: slots per page (16 by default;
        torch's ``varlen_attn`` reads pages of a multiple of 256 slots only). A pool grows on
        demand unless reserved: ``max_tokens`` slots (over all layers and sequences, each (layer,
        sequence) rounding up to whole pages) or ``max_bytes`` of K/V pages, allocated at the first
        write and never reallocated."""
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        if max_tokens is not None and max_bytes is not None:
            raise ValueError("reserve the pool by max_tokens or by max_bytes, not both")
        for name, value in (("max_tokens", max_tokens), ("max_bytes", max_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        super().__init__(layers=[SkipCacheLayer(self, idx) for idx in range(num_layers)])
        self.page_size = page_size
        self.max_tokens, self.max_bytes = max_tokens, max_bytes
        self._pools: dict[tuple, PagePool] = {}
        # Slots each layer may still write in the running call (host int64 [L, B], an upper bound,
        # or None): what a pool that must grow makes room for at once (expect_writes).
        self._writes_to_come: torch.Tensor | None = None
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

    @property
    def reserved(self) -> bool:
        """Whether the pools are sized up front (``max_tokens`` / ``max_bytes``) and never grow."""
        return self.max_tokens is not None or self.max_bytes is not None

    def pool_for(self, like: torch.Tensor) -> PagePool:
        """The pool of pages like ``like`` (K/V rows ``[N, H_kv, D]``: device, dtype, head shape),
        created at its first use: reserved as asked, or a first size that grows with use."""
        key = (like.device, like.dtype, *like.shape[1:])
        if key not in self._pools:
            per_page = page_bytes(self.page_size, like.shape[1], like.shape[2], like.dtype)
            if self.max_tokens is not None:
                pages = -(-self.max_tokens // self.page_size)
            elif self.max_bytes is not None:
                pages = self.max_bytes // per_page
                if pages == 0:
                    raise ValueError(f"max_bytes={self.max_bytes} holds no page ({per_page} bytes each)")
            else:
                pages = 0
            self._pools[key] = PagePool(self.page_size, like, pages, reserved=self.reserved)
        return self._pools[key]

    def expect_writes(self, per_layer: torch.Tensor | None) -> None:
        """The slots each layer may write in the call that starts (host int64 ``[L, B]``, an upper
        bound; None when the call ends): a pool that must grow grows once for all of them."""
        self._writes_to_come = None if per_layer is None else per_layer.clone()

    def written(self, layer_idx: int) -> None:
        """Layer ``layer_idx`` has taken its pages for the running call (:meth:`expect_writes`)."""
        if self._writes_to_come is not None:
            self._writes_to_come[layer_idx] = 0

    def pages_to_come(self, pool: PagePool) -> int:
        """Pages the layers not yet written may still take from ``pool`` in the running call (a layer
        with no pool yet is counted: it will draw from one of this device's pools)."""
        writes = self._writes_to_come
        if writes is None:
            return 0
        return sum(layer.pages_needed(writes[idx]) for idx, layer in enumerate(self.layers)
                   if bool(writes[idx].any()) and layer.pool in (None, pool))

    def append(self, layer_idx: int, k, v, rows: PackedRows, ops: OpSet) -> None:
        """Stores the new ``rows`` (``packing.PackedRows``: their positions, tags and counts) with their
        K/V ``k, v [N, H_kv, D]`` at layer ``layer_idx`` (:meth:`SkipCacheLayer.append`)."""
        self.layers[layer_idx].append(k, v, rows.pos, rows.tag, rows.cu_seqlens, rows.counts, ops,
                                      device_counts=rows.device_counts)

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
            if layer.held_pages is None:
                continue
            tags = layer.slot_tags()
            current = self.sentence_counts.to(device=tags.device, dtype=torch.int32)  # sentence each sequence is in
            kept_tokens = (tags & (TAG_ANCHOR | TAG_SINK)) != 0
            current_sentence = (tags >> TAG_SENTENCE_SHIFT) >= current[:, None]
            layer.compact(kept_tokens | current_sentence, ops)
        self.shrink_pools()

    def shrink_pools(self) -> None:
        """Gives the memory of a pool that is mostly free back to the device allocator (after an
        anchor reduction or a crop freed pages): a pool that is not reserved and has more free
        pages than pages in use keeps only those, renumbered, and every layer's block table follows."""
        for pool in self._pools.values():
            if pool.reserved or pool.free_pages <= pool.pages_in_use:
                continue
            layers = [layer for layer in self.layers if layer.pool is pool]
            mapping = pool.shrink_to(sorted(p for layer in layers for p in layer.pages()))
            for layer in layers:
                layer.renumber_pages(mapping)

    def stored(self, layer_idx: int) -> SkipCacheLayer:
        """The layer that holds ``layer_idx``'s cache: its ``pool`` (pages ``keys``, ``values``, ``pos``,
        ``tag``), ``block_table``, ``lengths`` and their host mirrors (read only)."""
        return self.layers[layer_idx]

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
        """Bytes of the K/V pages the layers hold (whole pages: a partly filled page counts whole);
        with ``include_metadata`` also their position/tag pages, the block tables and the lengths.
        Free pages of the pools are not counted: :meth:`pool_nbytes`."""
        self.settle()
        return sum(layer.nbytes(include_metadata) for layer in self.layers)

    def pool_nbytes(self, include_metadata: bool = False) -> int:
        """Bytes the pools' tensors occupy, free pages included (what the device allocator gave)."""
        return sum(pool.nbytes(include_metadata) for pool in self._pools.values())

    def stored_nbytes(self) -> int:
        """Bytes the stored slots' K/V need (no page rounding): the floor :meth:`nbytes` approaches."""
        self.settle()
        return sum(int(layer.host_lengths.sum()) * layer.pool.page_nbytes // self.page_size
                   for layer in self.layers if layer.host_lengths is not None)

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.held_pages is not None:
                return layer.held_pages.shape[0]
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
        self.shrink_pools()
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

    def _make_room_for_copies(self, indices: torch.Tensor) -> None:
        """Grows each pool once for the page copies a selection makes in all its layers."""
        for pool in self._pools.values():
            pool.make_room(sum(layer.pages_to_copy(indices) for layer in self.layers if layer.pool is pool))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._make_room_for_copies(beam_idx)
        super().reorder_cache(beam_idx)
        self._select(lambda t: t[beam_idx.cpu()])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._make_room_for_copies(indices)
        super().batch_select_indices(indices)
        self._select(lambda t: t[indices.cpu()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.batch_size
        if batch > 0:
            self._make_room_for_copies(torch.arange(batch).repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def __repr__(self) -> str:
        return (f"SkipCache(layers={len(self.layers)}, page_size={self.page_size}, logical_length={self.logical_length}, "
                f"nbytes={self.nbytes()}, pool_nbytes={self.pool_nbytes()})")
