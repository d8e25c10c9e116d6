"""The page pool of a :class:`~skiplayers.cache.SkipCache`: K/V pages and a host-side allocator.

A pool holds ``num_pages`` pages of ``page_size`` slots: ``keys, values [num_pages, page_size, H_kv, D]``
and the slots' metadata ``pos, tag`` (int32 ``[num_pages, page_size]``), the layout of vLLM,
FlashInfer and torch's ``varlen_attn(block_table=...)``. Every layer of a cache draws its pages
from the same pool (one per device, dtype and head shape): with context stop the layers from ℓ on
store fewer tokens than those below it, and a shared pool lets whatever layer needs a page take it,
so a reserved budget covers the whole model instead of being split per layer in advance.

Which page is free is decided on the host, from a free list: taking or returning pages never waits
on the device. A pool either grows on demand (its tensors are reallocated and the pages copied; page
numbers stay valid, so block tables do not change) and shrinks when most of it has been freed (the
pages in use are renumbered into smaller tensors and the block tables follow), or is *reserved*:
sized once (``SkipCache(max_tokens=...)`` / ``max_bytes``), it never reallocates, so tensors
captured by a CUDA graph stay valid, and running out of pages raises an error that names the budget.
"""

from __future__ import annotations

import torch


class PoolExhausted(RuntimeError):
    """A reserved pool has fewer free pages than a write needs."""


def page_bytes(page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one page of K and V together (the metadata pages not included)."""
    return 2 * page_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagePool:
    """Pages of K/V and slot metadata, and the free list that hands them out.

    ``keys, values [num_pages, page_size, H_kv, D]`` and ``pos, tag`` int32 ``[num_pages, page_size]``
    live on one device; ``reserved`` pools never grow (see the module docstring). Pages are handed
    out lowest number first, so a fresh cache's pages lie in order.
    """

    FIELDS = ("keys", "values", "pos", "tag")  # the tensors of a page, all indexed by page first

    def __init__(self, page_size: int, like: torch.Tensor, num_pages: int, reserved: bool):
        """``like``: K/V rows ``[N, H_kv, D]`` whose dtype, device and head shape the pages take."""
        self.page_size = page_size
        self.reserved = reserved
        self.keys = like.new_empty((num_pages, page_size, *like.shape[1:]))
        self.values = like.new_empty(self.keys.shape)
        self.pos = torch.zeros((num_pages, page_size), dtype=torch.int32, device=like.device)
        self.tag = torch.zeros((num_pages, page_size), dtype=torch.int32, device=like.device)
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() gives the lowest number

    @property
    def num_pages(self) -> int:
        return self.keys.shape[0]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page of K and V."""
        return page_bytes(self.page_size, self.keys.shape[2], self.keys.shape[3], self.keys.dtype)

    def nbytes(self, include_metadata: bool = False) -> int:
        """Bytes the pool's tensors occupy (every page, free or not)."""
        total = self.keys.nbytes + self.values.nbytes
        return total + (self.pos.nbytes + self.tag.nbytes if include_metadata else 0)

    def take(self, count: int, to_come: int = 0) -> list[int]:
        """``count`` free pages (their numbers), growing the pool if it is not reserved. ``to_come``:
        pages the running call will take after these (a growth makes room for them too, so that a
        call reallocates the pool once, not at every layer)."""
        if count > len(self._free):
            if self.reserved:
                raise PoolExhausted(
                    f"the SkipCache's reserved pool is full: {count} more pages of {self.page_size} slots are needed, "
                    f"{len(self._free)} of {self.num_pages} are free (reserve more with SkipCache(max_tokens=...) or "
                    "max_bytes=..., or leave both unset to let the pool grow)"
                )
            self.make_room(count + to_come)
        return [self._free.pop() for _ in range(count)]

    def make_room(self, count: int) -> None:
        """At least ``count`` free pages, growing once now if the pool may grow (a reserved pool
        raises when a ``take`` finds too few)."""
        if count > len(self._free) and not self.reserved:
            self._grow(count - len(self._free))

    def give(self, pages: list[int]) -> None:
        """Returns pages to the free list (their contents are left as they are)."""
        self._free.extend(sorted(pages, reverse=True))

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        """Page ``dst[i]`` becomes a copy of page ``src[i]`` (K, V, pos and tag)."""
        if not src:
            return
        s = torch.tensor(src, dtype=torch.int64, device=self.keys.device)
        d = torch.tensor(dst, dtype=torch.int64, device=self.keys.device)
        for name in self.FIELDS:
            pool = getattr(self, name)
            pool.index_copy_(0, d, pool.index_select(0, s))

    def shrink_to(self, used: list[int]) -> dict[int, int]:
        """Keeps only the pages ``used`` (every page in use), renumbered ``0 ..`` in that order, in
        tensors sized for them, so the freed memory goes back to the device allocator. Returns
        ``{old: new}`` for the block tables to follow. A reserved pool is never shrunk."""
        if self.reserved:
            raise RuntimeError("a reserved pool keeps its size")
        index = torch.tensor(used, dtype=torch.int64, device=self.keys.device)
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, index))
        self._free = []
        return {old: new for new, old in enumerate(used)}

    def _grow(self, at_least: int) -> None:
        """Reallocates with ``at_least`` more pages plus a sixteenth of the grown pool: growth is
        amortised (a copy of the pool every sixteenth of its size, not at every page), and a first
        allocation leaves room for the first decode steps after a prefill."""
        old = self.num_pages
        new = old + at_least + (old + at_least) // 16
        for name in self.FIELDS:
            t = getattr(self, name)
            grown = t.new_zeros((new, *t.shape[1:])) if name in ("pos", "tag") else t.new_empty((new, *t.shape[1:]))
            grown[:old] = t
            setattr(self, name, grown)
        self._free = list(range(new - 1, old - 1, -1)) + self._free
