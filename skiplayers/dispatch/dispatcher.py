"""Per patched model: classify each attention call, pick its kernel, run it, count it.

``backend="auto"`` (the default of ``sk.patch``): standard patterns go to the kernel the device's
table names (``table.py``), the predicate pattern to ours. A named backend (``"cpu"``, ``"cuda"``,
``"triton"``, ``"torch"``) forces ours for every call: benchmarks and kernel tests use that.
Choices are remembered per case, so a call costs a classification and a dictionary lookup.
"""

from __future__ import annotations

import os
from collections import Counter

import torch

from ..ops import OpSet
from .kernels import STANDARD_KERNELS, CacheCall, Ours, PackedCall
from .patterns import STANDARD, CallFacts, Pattern, check_standard, classify
from .table import band, device_key, table_for, tables_epoch

_standard_kernels: dict[str, object] = {}  # one instance per process: they hold no state


def standard_kernel(name: str):
    if name not in _standard_kernels:
        _standard_kernels[name] = STANDARD_KERNELS[name]()
    return _standard_kernels[name]


def verifying() -> bool:
    """``SKIPLAYERS_VERIFY_DISPATCH=1``: every call classified standard is checked against the
    predicate (a device sync and dense masks per call: for tests, not for speed)."""
    return os.environ.get("SKIPLAYERS_VERIFY_DISPATCH") == "1"


class Dispatcher:
    def __init__(self, ops: OpSet, backend: str):
        self.ours = Ours(ops)
        self.backend = backend  # "auto", or the forced backend's name
        self.calls: Counter = Counter()  # (pattern, kernel name) -> calls since patching
        self._chosen: dict = {}

    @property
    def forced(self) -> bool:
        return self.backend != "auto"

    def choose(self, pattern: Pattern, device: torch.device, dtype: torch.dtype, head_dim: int, size_band: str,
               page_size: int | None = None):
        """``(kernel, reason)`` for one case (``page_size``: the cache's, for the patterns over it)."""
        key = (pattern, device, dtype, head_dim, size_band, page_size, tables_epoch())
        chosen = self._chosen.get(key)
        if chosen is None:
            table = None if self.forced or pattern == Pattern.PREDICATE else table_for(device)
            chosen = self._chosen[key] = self._decide(pattern, device, dtype, head_dim, size_band, table, page_size)
        return chosen

    def _usable(self, name: str, pattern, device, dtype, head_dim, page_size):
        kernel = self.ours if name == "ours" else standard_kernel(name)
        return None if kernel.unsupported(pattern, device, dtype, head_dim, page_size) else kernel

    def _decide(self, pattern, device, dtype, head_dim, size_band, table, page_size):
        if self.forced:
            return self.ours, f"backend={self.backend!r} forces skiplayers' kernels"
        if pattern == Pattern.PREDICATE:
            return self.ours, "only skiplayers' kernels evaluate the visibility predicate"
        entry = table.lookup(pattern, dtype, head_dim, size_band) if table is not None else None
        if entry is not None and entry.get("named"):
            kernel = self._usable(entry["kernel"], pattern, device, dtype, head_dim, page_size)
            if kernel is not None:
                return kernel, f"the table '{table.source}' names it"
        elif entry is not None:
            times = dict(entry["median_us"])
            if entry.get("ours_backend") != self.ours.ops.name:
                times.pop("ours", None)  # measured with another backend of ours than this model runs
            ranked = sorted(times.items(), key=lambda item: item[1])
            for name, us in ranked:
                kernel = self._usable(name, pattern, device, dtype, head_dim, page_size)
                if kernel is not None:
                    others = ", ".join(f"{n} {t:.0f} µs" for n, t in ranked if n != name)
                    return kernel, f"fastest measured on {table.device}: {us:.0f} µs ({others or 'no other'})"
        if device.type == "cuda":
            where = table.device if table is not None else "this GPU"
            kernel = self._usable("varlen_attn", pattern, device, dtype, head_dim, page_size)
            if kernel is not None:
                return kernel, f"not measured on {where}: torch's kernel for a standard pattern"
            if page_size is not None:
                return self.ours, (f"not measured on {where}: ours reads the paged cache in place (varlen_attn "
                                   "cannot read its pages here; SDPA would copy every page at every call)")
            return standard_kernel("sdpa"), f"not measured on {where}: torch's kernel for a standard pattern"
        return self.ours, (f"not measured on {device_key(device)}: ours (skiplayers' CPU attention beat SDPA "
                           "where measured)")

    def _kernel_for(self, facts: CallFacts, reads_cache: bool, longest: int, q: torch.Tensor, tokens: int,
                    page_size: int | None = None):
        """Classifies one call, picks its kernel and counts it. ``longest``: the most new rows of one
        sequence (host); ``tokens``: the call's size for the band (rows, or stored keys read)."""
        pattern, _ = classify(facts, reads_cache=reads_cache, max_new_rows=longest)
        kernel, _ = self.choose(pattern, q.device, q.dtype, q.shape[-1], band(tokens), page_size)
        self.calls[(pattern, kernel.name)] += 1
        return pattern, kernel

    def packed(self, facts: CallFacts, c: PackedCall, longest: int) -> torch.Tensor:
        pattern, kernel = self._kernel_for(facts, False, longest, c.q, c.q.shape[0])
        if pattern in STANDARD and verifying():
            cu = c.cu_seqlens.tolist()
            for s, e in zip(cu[:-1], cu[1:]):
                check_standard(pattern, c.rule, c.pos[s:e], c.tag[s:e], c.pos[s:e], c.tag[s:e])
        return kernel.packed(c)

    def cache(self, facts: CallFacts, c: CacheCall, longest: int) -> torch.Tensor:
        pattern, kernel = self._kernel_for(facts, True, longest, c.q, int(c.host_lengths.sum()), c.page_size)
        if pattern in STANDARD and verifying():
            cu = c.cu_seqlens.tolist()
            for b, (s, e, n) in enumerate(zip(cu[:-1], cu[1:], c.host_lengths.tolist())):
                if e > s:
                    check_standard(pattern, c.rule, c.q_pos[s:e], c.q_tag[s:e], c.gather(c.pos_cache, b, n),
                                   c.gather(c.tag_cache, b, n))
        return kernel.cache(c)
