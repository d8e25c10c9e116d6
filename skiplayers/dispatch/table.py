"""Which kernel runs a standard pattern: a table measured per device, shipped with the package.

A table (``tables/<device>.json``, written by ``python -m skiplayers.dispatch.tune``) holds, per
``(pattern, dtype, head_dim, size band)``, the median time of every kernel that computed that case
correctly on the device it was measured on, and the fastest one. ``device`` is ``"cpu"`` or the
CUDA architecture (``"sm_90"``). Where the table has no entry:

* on CUDA, torch's kernels: ``varlen_attn`` where it can compute the call, else ``sdpa``;
* on CPU, ours (skiplayers' CPU attention, measured faster than SDPA when the CPU table was made).

The predicate pattern always goes to ours: no other kernel evaluates the predicate. Another table
can be used for a block (``with use_table(path): ...``) or the process (``SKIPLAYERS_DISPATCH_TABLE``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch

from .patterns import Pattern

TABLES = Path(__file__).resolve().parent / "tables"

# Size bands: the pattern's work in tokens (the call's rows for VARLEN_CAUSAL, the stored keys
# read for the cache patterns). The edges are chosen, not measured: a decade apart, so that a
# table can follow a kernel whose relative speed changes with size.
BAND_EDGES = (512, 4096, 32768)
BANDS = ("s", "m", "l", "xl")


def band(tokens: int) -> str:
    """``"s"`` (< 512 tokens), ``"m"`` (< 4096), ``"l"`` (< 32768) or ``"xl"``."""
    for edge, name in zip(BAND_EDGES, BANDS):
        if tokens < edge:
            return name
    return BANDS[-1]


def device_key(device: torch.device) -> str:
    """``"cpu"``, or ``"sm_<major><minor>"`` for a CUDA device."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    return device.type


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Table:
    """Measured choices of one device: ``entries[(pattern, dtype, head_dim, band)] = entry`` with
    ``entry["kernel"]`` (the fastest correct kernel) and ``entry["median_us"]`` per kernel."""

    device: str
    entries: dict = field(default_factory=dict)
    source: str = ""
    measured_on: dict = field(default_factory=dict)
    every_case: str | None = None  # a kernel named for every case (Table.always), instead of entries

    @classmethod
    def always(cls, device: str, kernel: str) -> Table:
        """A table that names ``kernel`` for every standard pattern on ``device`` (``"cpu"``,
        ``"sm_90"``), e.g. to run torch's kernels wherever they can compute the call."""
        return cls(device=device, source=f"always {kernel}", every_case=kernel)

    @staticmethod
    def key(pattern: Pattern | str, dtype: str, head_dim: int, size_band: str) -> tuple:
        return str(pattern), dtype, int(head_dim), size_band

    def lookup(self, pattern: Pattern, dtype: torch.dtype, head_dim: int, size_band: str) -> dict | None:
        if self.every_case is not None:
            return {"kernel": self.every_case, "median_us": {}, "named": True}
        return self.entries.get(self.key(pattern, dtype_name(dtype), head_dim, size_band))

    @classmethod
    def from_json(cls, data: dict, source: str = "") -> Table:
        entries = {cls.key(e["pattern"], e["dtype"], e["head_dim"], e["band"]): e for e in data["entries"]}
        return cls(device=data["device"], entries=entries, source=source, measured_on=data.get("measured_on", {}))

    def to_json(self) -> dict:
        return {"device": self.device, "measured_on": self.measured_on, "entries": list(self.entries.values())}

    @classmethod
    def load(cls, path: str | Path) -> Table:
        path = Path(path)
        return cls.from_json(json.loads(path.read_text()), source=str(path))


_override: list[Table] = []


@contextlib.contextmanager
def use_table(table: Table | str | Path):
    """Dispatch by ``table`` (a :class:`Table` or a JSON path) inside the block, for its device."""
    _override.append(table if isinstance(table, Table) else Table.load(table))
    try:
        yield _override[-1]
    finally:
        _override.pop()


@cache
def _shipped(device: str, env_path: str | None) -> Table | None:
    if env_path:
        table = Table.load(env_path)
        return table if table.device == device else None
    path = TABLES / f"{device}.json"
    return Table.load(path) if path.exists() else None


def tables_epoch() -> tuple:
    """Changes whenever :func:`table_for` could answer differently (an override entered or left,
    the environment's table changed): what a cached choice is keyed by."""
    return (id(_override[-1]) if _override else None, len(_override), os.environ.get("SKIPLAYERS_DISPATCH_TABLE"))


def table_for(device: torch.device) -> Table | None:
    """The table dispatch uses for ``device``: an override, else the environment's, else the shipped one."""
    key = device_key(device)
    for table in reversed(_override):
        if table.device == key:
            return table
    return _shipped(key, os.environ.get("SKIPLAYERS_DISPATCH_TABLE"))
