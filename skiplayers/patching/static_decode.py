"""Decode steps with every host decision made before the step: what a CUDA graph can capture.

A decode step of ``generate()`` decides on the host as it runs: it packs the inputs, takes cache
pages where a layer needs one, copies counts and tables to the device, picks a kernel per call.
:class:`StaticDecoder` splits a step in two:

* :meth:`StaticDecoder.prepare` (host only, before the step): takes, at every layer that stores,
  the page the next token of each sequence needs (from the cache's pool, never waiting on the
  device), counts the token in the cache's host bookkeeping, and widens nothing that a step reads;
* :meth:`StaticDecoder.step` (device only): the embeddings, every decoder layer through its own
  ``__call__`` (the model's projections, norms, RoPE, MLP), the cache writes and attention through
  the backend's paged ops, reading the block tables and lengths the cache keeps on the device, then
  the final norm and the LM head. It takes no page, reads nothing back and branches on no data, so
  ``torch.compile(step, fullgraph=True)`` traces it whole and, on a GPU, :meth:`capture` records it
  in a CUDA graph that :meth:`__call__` replays.

Attention in the step runs the patch backend's paged decode kernel (``cache_attention``): torch's
``varlen_attn`` takes the longest cache length as a host integer, which changes every step. What
needs a decision from data is refused: anchors (a token's anchor bit and the cache reduction
follow the token), ``layer_mask`` and early exit (rows chosen per layer).
"""

from __future__ import annotations

import torch

from ..cache import SkipCache
from .attention import packed
from .decoder import _run_layer
from .graph_replay import GraphReplay
from .state import PatchState


class _StaticStep:
    """The step object the layers see (``PackedStep``'s interface, device work only): one new row
    per sequence, at positions ``pos`` (int32 ``[B]``), tags ``tag``, packed by ``cu_seqlens``."""

    def __init__(self, state: PatchState, cache: SkipCache, pos, tag, cu_seqlens):
        self.state, self.cache = state, cache
        self.pos, self.tag, self.cu_seqlens = pos, tag, cu_seqlens

    def store(self, cache, layer_idx: int, key_states, value_states):
        cache.layers[layer_idx].write_prepared(packed(key_states), packed(value_states), self.pos, self.tag,
                                               self.cu_seqlens, self.state.ops)
        return key_states, value_states

    def attend(self, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
        layer = self.cache.layers[layer_idx]
        pool = layer.pool
        assert pool is not None  # StaticDecoder checked that every storing layer holds pages
        out = self.state.ops.cache_attention(
            q=packed(query), k_cache=pool.keys, v_cache=pool.values, block_table=layer.block_table,
            cu_seqlens_q=self.cu_seqlens, cache_seqlens=layer.lengths, q_pos=self.pos, pos_cache=pool.pos,
            q_tag=self.tag, tag_cache=pool.tag, rule=self.state.rule, scale=scaling, num_splits=0,
        )
        return out[None]


class StaticDecoder:
    """Decode steps of a patched causal LM over a filled :class:`SkipCache`, host work before each.

    ``model``: patched by :func:`skiplayers.patch`; ``cache``: the SkipCache of its prefill (one
    row per sequence per step follows, at the position after each sequence's last);
    ``max_new_tokens``: how many steps will run, so that every block table is sized once (a step
    never replaces a device tensor). ``decoder(tokens)`` (int64 ``[B, 1]``) prepares and runs one
    step and returns the logits ``[B, 1, vocab]``; after :meth:`capture` it replays the CUDA graph.
    The module docstring says what is refused.
    """

    def __init__(self, model, cache: SkipCache, max_new_tokens: int):
        from . import is_patched  # the package imports this module

        if not is_patched(model):
            raise ValueError("StaticDecoder needs a model patched by skiplayers.patch()")
        state: PatchState = model._skiplayers
        policy = state.policy
        if policy.anchors_enabled:
            raise NotImplementedError("StaticDecoder: anchors decide per token (anchor bits, cache reduction); "
                                      "decode with generate()")
        if policy.early_exit is not None or cache.layer_mask is not None:
            raise NotImplementedError("StaticDecoder: layer_mask and early exit choose rows per layer from data; "
                                      "decode with generate()")
        if not isinstance(cache, SkipCache) or cache.logical_length == 0 or cache.last_positions is None:
            raise ValueError("StaticDecoder needs the SkipCache of a prefill (past_key_values of a patched forward)")
        if cache.policy is not None and cache.policy != policy:
            raise ValueError("this SkipCache was filled under another SkipPolicy")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.state, self.cache = model, state, cache
        decoder = model.model
        layers = len(decoder.layers)
        self.runs = [i for i in range(layers) if i not in set(policy.skip_layers)]
        self.stores = [i for i in self.runs if i not in set(policy.drop_attention_layers)]
        if any(cache.layers[i].held_pages is None for i in self.stores):
            raise ValueError("StaticDecoder: the cache holds nothing at a layer that stores (was it filled by this model "
                             "under this policy?)")
        device = cache.layers[self.stores[0]].block_table.device if self.stores else decoder.embed_tokens.weight.device
        batch = cache.batch_size
        self.batch = batch
        self._ones = torch.ones(batch, dtype=torch.int64)
        longest = int(cache.layer_lengths().max()) + max_new_tokens
        self._max_pages = -(-longest // cache.page_size)
        self._remaining = max_new_tokens
        self.pos = (cache.last_positions + 1).to(device=device, dtype=torch.int32)
        self.tag = torch.zeros(batch, dtype=torch.int32, device=device)  # generated tokens: no context, no anchor
        self.cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self._tokens = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # the graph's input
        self._replay = GraphReplay()

    def prepare(self) -> None:
        """Host work for the next step: pages for one more token per sequence at every layer that
        stores, and the token counted in the cache's host bookkeeping."""
        if self._remaining == 0:
            raise RuntimeError("StaticDecoder: max_new_tokens steps have run; make a new one to decode further")
        self._remaining -= 1
        cache = self.cache
        writes = torch.zeros(len(cache.layers), self.batch, dtype=torch.int64)
        writes[self.stores] = 1
        cache.expect_writes(writes)  # a growing pool grows once for all the layers
        for idx in self.stores:
            cache.layers[idx].prepare_write(self._ones, max_pages=self._max_pages)
        cache.expect_writes(None)
        last = cache.last_positions
        assert last is not None  # a prefill's cache (checked when the decoder was made)
        positions = (last + 1)[:, None]
        valid = torch.ones(self.batch, 1, dtype=torch.bool)
        cache.advance(valid, torch.zeros_like(valid), positions)
        if cache.noncontext_counts is not None:
            cache.noncontext_counts = cache.noncontext_counts + 1

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step on the device only (after :meth:`prepare`): ``tokens`` int64 ``[B, 1]`` ->
        logits ``[B, 1, vocab]``. Advances the device positions."""
        decoder, cache = self.model.model, self.cache
        hidden = decoder.embed_tokens(tokens).reshape(1, self.batch, -1)
        positions = self.pos[None].long()
        cos, sin = decoder.rotary_emb(hidden, position_ids=positions)
        step = _StaticStep(self.state, cache, self.pos, self.tag, self.cu_seqlens)
        cache.use_step(step)
        try:
            for idx in self.runs:
                hidden = _run_layer(decoder.layers[idx], hidden, positions, cache, (cos, sin), step)
        finally:
            cache.end_call()
        logits = self.model.lm_head(decoder.norm(hidden))
        self.pos.add_(1)
        return logits.reshape(self.batch, 1, -1)

    def capture(self, warmup: int = 1) -> None:
        """Records :meth:`step` in a CUDA graph (CUDA only; the cache's pool must be reserved, since a
        growing pool reallocates the tensors the graph reads). Runs ``warmup`` eager steps first
        (they decode real tokens: feed their outputs as usual)."""
        if not torch.cuda.is_available() or self.pos.device.type != "cuda":
            raise NotImplementedError("StaticDecoder.capture records a CUDA graph: the model must be on a CUDA device")
        if not self.cache.reserved:
            raise ValueError("capture needs a reserved pool: SkipCache(..., max_tokens=...) or max_bytes=...")
        self._replay.arm(warmup)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.prepare()
        if not self._replay.armed:
            return self.step(tokens)
        self._tokens.copy_(tokens)
        return self._replay(lambda: self.step(self._tokens))
