"""What a patched model carries: its policy, the backend's ops, the attention dispatcher, and what
unpatching restores."""

from __future__ import annotations

from dataclasses import dataclass

from ..dispatch.dispatcher import Dispatcher
from ..meta import RULE_ANCHORS, RULE_CAUSAL
from ..ops import OpSet
from ..policy import SkipPolicy


@dataclass(frozen=True)
class PatchState:
    policy: SkipPolicy
    backend: str  # "auto" or a forced backend (ops.BACKENDS)
    ops: OpSet  # ours: compaction, cache writes, and the attention the dispatcher gives to ours
    dispatcher: Dispatcher
    attention_before: str | None = None  # config._attn_implementation before patching

    @property
    def rule(self) -> int:
        """The visibility rule of the fast path. Context needs no term: it is dropped, not masked."""
        return RULE_ANCHORS if self.policy.anchors_enabled else RULE_CAUSAL
