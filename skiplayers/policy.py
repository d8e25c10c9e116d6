"""SkipPolicy: which work a patched model skips (and EarlyExit, its token-level exit rule)."""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_KV_MODES = ("propagate", "none")


def _layer_tuple(name: str, layers) -> tuple[int, ...]:
    """Sorted, de-duplicated layer indices; a clear error for anything that is not a set of ints."""
    if layers is None:
        return ()
    if isinstance(layers, (int, str)):
        raise TypeError(f"{name} must be a collection of layer indices (e.g. range(24, 30)), got {layers!r}")
    out = []
    for item in layers:
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name} must hold ints (layer indices), got {item!r}")
        out.append(item)
    return tuple(sorted(set(out)))


@dataclass(frozen=True)
class EarlyExit:
    """Token-level early exit (LITE, Varshney et al. 2023; CALM, Schuster et al. 2022).

    After each layer in ``layers`` (0-based: the exit reads the output of that layer), the normed
    hidden state of every generated token goes through the LM head. A token whose top probability
    reaches ``threshold`` exits: the next token comes from those logits and the token's deeper layers
    are not computed. ``kv`` says what deeper layers store for it: "propagate" (the default) writes
    its K/V at every deeper layer from its exit hidden state (that layer's input norm, K/V
    projections and RoPE), so later tokens still attend to it; "none" stores nothing for it there.
    Only decode steps exit (calls that feed at most one token per sequence); a prompt runs every layer.
    """

    layers: tuple[int, ...]
    threshold: float
    kv: str = "propagate"

    def __post_init__(self):
        object.__setattr__(self, "layers", _layer_tuple("EarlyExit.layers", self.layers))
        if not self.layers:
            raise ValueError("EarlyExit needs at least one exit layer")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise TypeError(f"EarlyExit.threshold must be a number in (0, 1], got {self.threshold!r}")
        if not 0.0 < float(self.threshold) <= 1.0:
            raise ValueError(f"EarlyExit.threshold must be in (0, 1], got {self.threshold}")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.kv not in EXIT_KV_MODES:
            raise ValueError(f"EarlyExit.kv must be one of {EXIT_KV_MODES}, got {self.kv!r}")

    @property
    def propagates(self) -> bool:
        return self.kv == "propagate"


@dataclass(frozen=True)
class SkipPolicy:
    """What to skip. Every part composes with the others on one :class:`SkipCache`.

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
        drop_attention_layers: layers whose attention sublayer is skipped (the residual passes, the
            MLP runs): no Q/K/V projections and nothing stored there (Tyukin et al. 2024).
        skip_layers: layers skipped whole, for every token (their input is their output; nothing
            stored). Per-sequence skipping is the ``layer_mask`` argument of the forward and
            ``generate()`` (Glavas et al. 2024).
        early_exit: an :class:`EarlyExit` rule, or None.
    """

    context_stop_layer: int | None = None
    anchor_token_ids: tuple[int, ...] = field(default_factory=tuple)
    anchor_keep_first: int = 0
    drop_attention_layers: tuple[int, ...] = field(default_factory=tuple)
    skip_layers: tuple[int, ...] = field(default_factory=tuple)
    early_exit: EarlyExit | None = None

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
        drop = _layer_tuple("drop_attention_layers", self.drop_attention_layers)
        skip = _layer_tuple("skip_layers", self.skip_layers)
        object.__setattr__(self, "drop_attention_layers", drop)
        object.__setattr__(self, "skip_layers", skip)
        both = sorted(set(drop) & set(skip))
        if both:
            raise ValueError(
                f"layers {both} are in both skip_layers and drop_attention_layers: a skipped layer has no attention "
                "to drop; list each layer once"
            )
        if self.early_exit is not None and not isinstance(self.early_exit, EarlyExit):
            raise TypeError(f"early_exit must be a skiplayers.EarlyExit or None, got {type(self.early_exit).__name__}")

    @property
    def anchors_enabled(self) -> bool:
        return bool(self.anchor_token_ids)

    @property
    def skips_layers(self) -> bool:
        """Whether some layer is not computed for every row (static skips or early exit)."""
        return bool(self.skip_layers) or self.early_exit is not None

    def validate_for(self, num_layers: int) -> None:
        """Raises a clear error if the policy does not fit a model of ``num_layers`` layers."""
        ell = self.context_stop_layer
        if ell is not None and not 0 <= ell <= num_layers:
            raise ValueError(f"context_stop_layer={ell} is outside [0, {num_layers}] for this {num_layers}-layer model")
        for name, layers in (("drop_attention_layers", self.drop_attention_layers), ("skip_layers", self.skip_layers)):
            outside = [i for i in layers if not 0 <= i < num_layers]
            if outside:
                raise ValueError(f"{name} {outside} are outside [0, {num_layers - 1}] for this {num_layers}-layer model")
        if len(self.skip_layers) == num_layers:
            raise ValueError(f"skip_layers covers all {num_layers} layers: nothing would be computed")
        if self.early_exit is not None:
            outside = [i for i in self.early_exit.layers if not 0 <= i < num_layers - 1]
            if outside:
                raise ValueError(
                    f"EarlyExit.layers {outside} are outside [0, {num_layers - 2}]: an exit reads a layer's output and "
                    f"must leave a deeper layer to save (this model has {num_layers} layers)"
                )
