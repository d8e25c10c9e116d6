"""What a patched model carries: its policy, the backend's ops, and what unpatching restores."""

from __future__ import annotations

from dataclasses import dataclass

from ..meta import RULE_ANCHORS, RULE_CAUSAL
from ..ops import OpSet
from ..policy import SkipPolicy


@dataclass(frozen=True)
class PatchState:
    policy: SkipPolicy
    backend: str
    ops: OpSet
    attention_before: str | None = None  # config._attn_implementation before patching

    @property
    def rule(self) -> int:
        """The visibility rule of the fast path. Context needs no term: it is dropped, not masked."""
        return RULE_ANCHORS if self.policy.anchors_enabled else RULE_CAUSAL
