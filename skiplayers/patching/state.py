"""What a patched model carries: its policy, the backend's ops, the attention dispatcher, and what
unpatching restores."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dispatch.dispatcher import Dispatcher
from ..meta import Rule
from ..ops import OpSet
from ..policy import SkipPolicy


@dataclass(frozen=True)
class PatchState:
    policy: SkipPolicy
    backend: str  # "auto" or a forced backend (ops.BACKENDS)
    ops: OpSet  # ours: compaction, cache writes, and the attention the dispatcher gives to ours
    dispatcher: Dispatcher
    attention_before: str | None = None  # config._attn_implementation before patching
    lm_head: object = None  # the causal LM's head (early exit reads it)
    dropped_attention: tuple = ()  # the attention modules whose forward the patch replaced (drop_attention_layers)
    work: list = field(default_factory=list)  # work.CallWork of each forward call (sk.work_report)

    @property
    def rule(self) -> int:
        """The visibility rule of the fast path. Context needs no term: it is dropped, not masked."""
        return Rule.ANCHORS if self.policy.anchors_enabled else Rule.CAUSAL
