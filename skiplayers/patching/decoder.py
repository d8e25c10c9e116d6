"""The patched model-level forward: pack, compact at ℓ, run the model's own layers, unpack.

The forward bound to the decoder (``model.model.forward``) replaces only the data flow around the
model's modules:

1. padding columns are dropped and the real tokens packed into ragged rows (``packing.py``), the
   hidden states shaped ``[1, N, hidden]`` (one packed "sequence" in transformers' layout);
2. every decoder layer runs through its own ``__call__`` (so forward hooks, accelerate's hooks and
   gradient checkpointing run), with the packed rows' positions, their rotary embeddings, the
   :class:`SkipCache`, and the step object (``attention.py``) that the registered attention
   function uses to attend through the backend's ops;
3. at layer ℓ (``context_stop_layer``) the context rows are dropped from the hidden states with the
   backend's compaction kernel, so layers >= ℓ never compute, attend to or store them;
4. the final hidden states are scattered back to ``[B, T, hidden]``. Columns that were not
   computed (padding, and context columns when ℓ < L) hold NaN, so nothing reads them silently.

Hooks on decoder layers therefore see packed hidden states ``[1, N, hidden]``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..cache import SkipCache
from ..packing import drop_rows, unpack
from . import traced
from .attention import PackedStep
from .plan import plan_call
from .state import PatchState


def _resolve_cache(past_key_values, use_cache: bool, num_layers: int) -> SkipCache | None:
    if isinstance(past_key_values, SkipCache):
        return past_key_values
    if past_key_values is None or (isinstance(past_key_values, DynamicCache) and past_key_values.get_seq_length() == 0):
        if not use_cache:
            return None
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "under torch.compile, pass the cache (past_key_values=sk.SkipCache(num_layers)) or use_cache=False; "
                "generate() passes one itself"
            )
        return SkipCache(num_layers)
    raise TypeError(
        f"a model patched by skiplayers needs a SkipCache (or none); got a filled {type(past_key_values).__name__}"
    )


def _builds_graph(decoder, inputs_embeds: torch.Tensor) -> bool:
    """Whether this call records an autograd graph (grad mode on and something requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return inputs_embeds.requires_grad or any(p.requires_grad for p in decoder.parameters())


def _compact(step: PackedStep, hidden, cos, sin):
    """Drops the context rows (layer ℓ). ``hidden [1, N, hidden]``, ``cos, sin [1, N, D]``.
    Returns the step of the remaining layers and the compacted tensors."""
    rows = step.rows_on(hidden.device)
    keep = ~rows.is_context()
    moved = [t[0].to(hidden.device) for t in (hidden, cos, sin)]
    rows, (hidden, cos, sin) = drop_rows(rows, keep, moved, step.state.ops)
    step = step.with_rows(rows)
    if step.cache is not None:
        step.cache.use_step(step)
    return step, hidden[None], cos[None], sin[None]


def _output_hidden_states(self, kwargs) -> bool:
    wanted = kwargs.get("output_hidden_states")
    wanted = self.config.output_hidden_states if wanted is None else wanted
    if not isinstance(wanted, bool):
        raise NotImplementedError(
            f"output_hidden_states={wanted!r}: a skiplayers-patched model returns all hidden states (True) or none"
        )
    return wanted


def packed_model_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values=None,
    inputs_embeds: torch.Tensor | None = None,
    use_cache: bool | None = None,
    context_mask: torch.Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """Replacement for the decoder's ``forward`` (bound to the instance by :func:`skiplayers.patch`).

    Takes the usual arguments plus ``context_mask`` (bool ``[B, columns]``, True = context token;
    see ``patching/inputs.py`` for how columns are counted). Returns ``last_hidden_state``
    ``[B, T, hidden]`` with NaN in the columns that were not computed (0 while autograd records a
    graph; see the end of this function), the :class:`SkipCache`, and with
    ``output_hidden_states=True`` the transformers tuple of L + 1 ``[B, T, hidden]`` tensors (the
    embeddings, each layer's output, the last one after the final norm), NaN where that layer did
    not compute a column (context columns after layer ℓ, padding after the embeddings).
    """
    state: PatchState = self._skiplayers
    if kwargs.get("output_attentions"):
        raise NotImplementedError(
            "output_attentions=True is not supported by skiplayers: its kernels never form attention weights"
        )
    want_hidden = _output_hidden_states(self, kwargs)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    batch, columns = inputs_embeds.shape[:2]
    use_cache = self.config.use_cache if use_cache is None else use_cache
    cache = _resolve_cache(past_key_values, use_cache, len(self.layers))
    builds_graph = _builds_graph(self, inputs_embeds)
    logits_to_keep = kwargs.get("skiplayers_logits_to_keep", 0)
    stop = state.policy.context_stop_layer
    if torch.compiler.is_compiling():  # the host-side work runs inside opaque ops (traced.py)
        step = traced.begin_call(self, cache, input_ids, inputs_embeds, attention_mask, position_ids, context_mask,
                                 logits_to_keep, builds_graph)
    else:
        plan = plan_call(self, cache, input_ids, inputs_embeds, attention_mask, position_ids, context_mask,
                         logits_to_keep, builds_graph)
        step = PackedStep(plan.rows, state, cache, plan=plan)
    rows = step.rows
    hidden = inputs_embeds.reshape(batch * columns, -1)[rows.index][None]
    cos, sin = self.rotary_emb(hidden, position_ids=rows.pos[None].long())
    # Columns that were not computed hold NaN, so nothing reads them silently; but not when autograd
    # records a graph: a NaN row would poison the lm_head's weight gradient (0 * NaN = NaN), so they
    # hold 0 and the causal-LM forward puts NaN into their logits instead (causal_lm.py).
    fill = 0.0 if builds_graph else float("nan")
    collected = [inputs_embeds] if want_hidden else None

    positions = rows.pos[None].long()  # [1, N]: what the layers take as position_ids
    if cache is not None:
        cache.use_step(step)
    try:
        for layer_idx, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if layer_idx == stop and step.has_context(context_mask):
                step, hidden, cos, sin = _compact(step, hidden, cos, sin)
                positions = step.rows.pos[None].long()
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=positions,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=(cos, sin),
                skiplayers=step,
            )
            hidden = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returned tuples
            if collected is not None and layer_idx + 1 < len(self.layers):
                collected.append(unpack(step.rows_on(hidden.device), hidden[0], batch, columns, fill))
    finally:
        if cache is not None:
            cache.end_call()

    hidden = self.norm(hidden)[0]
    step.finish(self)
    last = unpack(step.rows_on(hidden.device), hidden, batch, columns, fill)
    return BaseModelOutputWithPast(
        last_hidden_state=last,
        past_key_values=cache,
        hidden_states=tuple(collected) + (last,) if collected is not None else None,
    )
