"""SkipPolicy: which work a patched model skips."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SkipPolicy:
    """What to skip.

    Attributes:
        context_stop_layer: ℓ (0-based). From layer ℓ on, context tokens (``context_mask`` True) are
            gone: their rows leave the hidden states at layer ℓ and their K/V is never stored at
            layers >= ℓ (Sia et al. 2024). ``None`` turns context stop off; ℓ = L (the number of
            layers) keeps every layer, which is the unpatched computation.
        anchor_token_ids: token ids that end a sentence (AnLLM anchors, Pang et al. 2024). Empty:
            anchors off. With anchors on, attention follows the AnSAN rule and the cache keeps only
            the anchors of finished sentences.
        anchor_keep_first: with anchors on, the first n tokens of every sequence stay visible to
            every later token and stay in the cache (an attention sink; beyond the paper).
    """

    context_stop_layer: int | None = None
    anchor_token_ids: tuple[int, ...] = field(default_factory=tuple)
    anchor_keep_first: int = 0

    def __post_init__(self):
        if self.context_stop_layer is not None and (
            not isinstance(self.context_stop_layer, int) or isinstance(self.context_stop_layer, bool)
        ):
            raise TypeError(f"context_stop_layer must be an int or None, got {self.context_stop_layer!r}")
        object.__setattr__(self, "anchor_token_ids", tuple(int(t) for t in self.anchor_token_ids))
        if self.anchor_keep_first < 0:
            raise ValueError(f"anchor_keep_first must be >= 0, got {self.anchor_keep_first}")
        if self.anchor_keep_first and not self.anchor_token_ids:
            raise ValueError("anchor_keep_first needs anchor_token_ids (it is an option of the anchor cache)")

    @property
    def anchors_enabled(self) -> bool:
        return bool(self.anchor_token_ids)

    def validate_for(self, num_layers: int) -> None:
        """Raises a clear error if the policy does not fit a model of ``num_layers`` layers."""
        ell = self.context_stop_layer
        if ell is not None and not 0 <= ell <= num_layers:
            raise ValueError(f"context_stop_layer={ell} is outside [0, {num_layers}] for this {num_layers}-layer model")
