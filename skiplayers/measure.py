"""Side-by-side timing of an unpatched and a patched model, shared by the demo and the benchmarks.

Every measurement alternates the two variants run by run in one process (same inputs) and reports
medians, because the machines are shared and noisy. Prefill is one forward over the prompt with a
fresh cache that returns the last column's logits (what ``generate()`` does first); decode is
``steps`` greedy single-token forwards against that cache.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .patching import patch, unpatch
from .policy import SkipPolicy


def kv_cache_bytes(cache) -> int:
    """Bytes of K/V a cache holds (SkipCache: allocated buffers; DynamicCache: its tensors)."""
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.keys is not None)


def context_stop_savings(context_lengths, total_lengths, num_layers: int, stop_layer: int) -> float:
    """Fraction of the prompts' token-layer work that context stop at ℓ leaves out: context tokens
    skip layers >= ℓ, so ``sum_i c_i (L - ℓ) / sum_i n_i L`` (c_i context, n_i prompt tokens)."""
    full = sum(total_lengths) * num_layers
    return sum(c * (num_layers - stop_layer) for c in context_lengths) / full


def token_layer_bound(context_lengths, total_lengths, num_layers: int, stop_layer: int) -> float:
    """Upper bound on the prefill speedup of context stop: token-layers of the full model over
    token-layers left (context tokens skip layers >= ℓ), i.e. ``1 / (1 - savings)``. For one
    sequence this is ``1 / (1 - (L - ℓ) / L * c / (c + q))``."""
    return 1.0 / (1.0 - context_stop_savings(context_lengths, total_lengths, num_layers, stop_layer))


@dataclass
class RunResult:
    prefill_s: float
    decode_s: float
    tokens: torch.Tensor  # [B, steps] greedy tokens
    kv_bytes: int


def greedy_step(model, token: torch.Tensor, attention_mask: torch.Tensor, cache, layer_mask=None):
    """One greedy decode step: feeds ``token`` [B, 1] with the cache, the mask grown by one column
    (and ``layer_mask`` [B, L], a patched model's per-sequence layers, when given).
    Returns the next token [B, 1] and the grown mask [B, T + 1]."""
    mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
    kwargs = {} if layer_mask is None else {"layer_mask": layer_mask}
    out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1].argmax(-1, keepdim=True), mask


@torch.no_grad()
def run_once(model, input_ids, attention_mask, context_mask, steps: int, layer_mask=None) -> RunResult:
    """Prefill and ``steps - 1`` greedy decode steps (``layer_mask``: a patched model's per-sequence
    layers, passed to every call)."""
    kwargs = {} if context_mask is None else {"context_mask": context_mask}
    if layer_mask is not None:
        kwargs["layer_mask"] = layer_mask
    start = time.perf_counter()
    out = model(input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1, **kwargs)
    prefill = time.perf_counter() - start
    cache, mask = out.past_key_values, attention_mask
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    start = time.perf_counter()
    for _ in range(steps - 1):
        token, mask = greedy_step(model, token, mask, cache, layer_mask)
        tokens.append(token)
    decode = time.perf_counter() - start
    return RunResult(prefill, decode, torch.cat(tokens, dim=1), kv_cache_bytes(cache))


@dataclass
class Comparison:
    full: list[RunResult] = field(default_factory=list)
    skip: list[RunResult] = field(default_factory=list)

    def median(self, variant: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in getattr(self, variant))


def compare(model, policy: SkipPolicy, input_ids, attention_mask, context_mask, runs: int, steps: int,
            backend: str | None = None, progress=None, layer_mask=None) -> Comparison:
    """Interleaved runs of the unpatched model and the model patched with ``policy`` (which alone
    gets ``context_mask`` and ``layer_mask``)."""
    result = Comparison()
    for _ in range(runs):
        result.full.append(run_once(model, input_ids, attention_mask, None, steps))
        patch(model, policy, backend=backend)
        try:
            result.skip.append(run_once(model, input_ids, attention_mask, context_mask, steps, layer_mask))
        finally:
            unpatch(model)
        if progress is not None:
            progress.update(1)
    return result
