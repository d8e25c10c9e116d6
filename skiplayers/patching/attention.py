"""The attention function skiplayers registers with transformers, and what it computes.

A patched model's config names ``"skiplayers"`` as its attention implementation, so each attention
module runs its own forward (projections, biases, q/k norms, RoPE), hands its new K/V to the cache
(``SkipCache.update``) and then calls :func:`skiplayers_attention`. That function does no work of
its own: the model-level loop passes a *step* object through the layers' keyword arguments
(``skiplayers=step``), and the step attends. Two kinds of step exist:

* :class:`PackedStep` (the fast path, ``decoder.py``): the hidden states are packed rows
  ``[1, N, hidden]``; attention over the packed rows or the cache goes through the patch's
  dispatcher (``skiplayers/dispatch``), which runs the standard patterns on the fastest kernel
  and the rest on the backend's ops;
* the masked step of ``masked.py`` (the slow reference): dense ``[B, T]`` columns and a mask.

Tensors arrive as transformers lays them out: ``query [1, H, N, D]``, ``key/value [1, H_kv, N, D]``;
the output is ``[1, N, H, D]``.
"""

from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface

from ..dispatch.kernels import CacheCall, PackedCall
from ..dispatch.patterns import UNKNOWN
from ..packing import PackedRows
from .plan import finish_call
from .state import PatchState

ATTENTION_NAME = "skiplayers"


def skiplayers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    step = kwargs.get("skiplayers")
    if step is None:
        raise RuntimeError(
            "the skiplayers attention function was called outside a skiplayers forward (a layer of a patched "
            "model was called directly, or the config names 'skiplayers' on an unpatched model)"
        )
    if dropout:
        raise NotImplementedError(
            f"attention dropout ({dropout}) is not supported by skiplayers' attention; set config.attention_dropout "
            "to 0 or call model.eval()"
        )
    return step.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, skiplayers_attention)


@contextlib.contextmanager
def attention_implementation(config, name: str = ATTENTION_NAME):
    """Sets ``config._attn_implementation`` for the duration of a block (restored on exit)."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def packed(x: torch.Tensor) -> torch.Tensor:
    """``[1, H, N, D]`` (transformers' layout of one packed call) -> contiguous ``[N, H, D]``."""
    return x[0].transpose(0, 1).contiguous()


class PackedStep:
    """One patched forward call as its layers see it: the packed rows, the backend, and the cache.

    ``SkipCache.update`` calls :meth:`store`; the attention function calls :meth:`attend`. A layer
    attends to the cache when it held keys before this call, else to this call's own K/V (which is
    also what happens when gradient checkpointing withholds the cache from the layer). The rows of
    a step never change (gradient checkpointing recomputes a layer with the step it first got);
    the context-stop layer gets a new step (:meth:`with_rows`)."""

    def __init__(self, rows: PackedRows, state: PatchState, cache, plan=None, reads_cache: set[int] | None = None):
        self.state = state
        self.cache = cache
        self.plan = plan  # the call's host-side plan (plan.CallPlan)
        self._reads_cache = set() if reads_cache is None else reads_cache  # shared by the steps of one call
        self.rows = rows
        self._moved = {rows.cu_seqlens.device: rows}
        self._longest: int | None = None  # the most rows of one sequence (host), once per step

    def with_rows(self, rows: PackedRows) -> PackedStep:
        return PackedStep(rows, self.state, self.cache, self.plan, self._reads_cache)

    def has_context(self, context_mask) -> bool:
        """Whether this call has context rows to drop at the context-stop layer."""
        return bool(self.plan.call.context.any())

    def finish(self, decoder) -> None:
        finish_call(decoder, self.cache, self.plan)

    def rows_on(self, device: torch.device) -> PackedRows:
        """The rows with their device tensors on ``device`` (layers of a multi-device map), moved once."""
        if device not in self._moved:
            self._moved[device] = self.rows.to(device)
        return self._moved[device]

    def store(self, cache, layer_idx: int, key_states, value_states):
        rows = self.rows_on(key_states.device)
        if not cache.is_empty(layer_idx):
            self._reads_cache.add(layer_idx)
        # The cache stores values; gradients flow through this call's own K/V (attend's packed path).
        cache.append(layer_idx, packed(key_states).detach(), packed(value_states).detach(), rows, self.state.ops)
        return key_states, value_states

    def attend(self, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
        rows = self.rows_on(query.device)
        dispatcher, rule = self.state.dispatcher, self.state.rule
        facts = self.plan.facts if self.plan is not None else UNKNOWN
        if self._longest is None:
            self._longest = int(rows.counts.max()) if rows.counts.numel() else 0
        q = packed(query)
        if layer_idx in self._reads_cache:
            layer = self.cache.stored(layer_idx)
            out = dispatcher.cache(facts, CacheCall(
                q=q, keys=layer.pool.keys, values=layer.pool.values, block_table=layer.block_table,
                cu_seqlens=rows.cu_seqlens, counts=rows.counts, lengths=layer.lengths, host_lengths=layer.host_lengths,
                q_pos=rows.pos, q_tag=rows.tag, pos_cache=layer.pool.pos, tag_cache=layer.pool.tag, rule=rule,
                scale=scaling,
            ), self._longest)
        else:  # the keys are exactly this call's packed rows
            out = dispatcher.packed(facts, PackedCall(
                q=q, k=packed(key), v=packed(value), cu_seqlens=rows.cu_seqlens, counts=rows.counts, pos=rows.pos,
                tag=rows.tag, rule=rule, scale=scaling,
            ), self._longest)
        return out[None]
