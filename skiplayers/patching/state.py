"""What a patched model carries: its policy and the backend's ops."""

from __future__ import annotations

from dataclasses import dataclass

from ..ops import OpSet
from ..policy import SkipPolicy


@dataclass(frozen=True)
class PatchState:
    policy: SkipPolicy
    backend: str
    ops: OpSet
