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

Layers the policy skips, or that no row runs (``layer_mask``, early exit), are not called; a
layer some rows skip runs on the gathered rows that run it (``routes.py``). Hooks on decoder
layers therefore see packed hidden states ``[1, n, hidden]``.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..cache import SkipCache
from ..packing import drop_rows, unpack
from ..work import CallWork
from . import traced
from .attention import PackedStep
from .plan import plan_call
from .routes import LayerRouter, check_layer_mask
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


def _compact(step: PackedStep | traced.TracedStep, hidden, cos, sin):
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


def _run_layer(layer, hidden, positions, cache, position_embeddings, step):
    """One decoder layer through its own ``__call__`` on packed rows ``[1, n, hidden]``."""
    out = layer(
        hidden,
        attention_mask=None,
        position_ids=positions,
        past_key_values=cache,
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        skiplayers=step,
    )
    return out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returned tuples


@torch._dynamo.disable
def _refuse_data_dependent_routes():
    # Run outside the graph (dynamo calls a disabled function eagerly), so the error reaches the
    # caller instead of making dynamo fall back to tracing the checks frame by frame.
    raise NotImplementedError(
        "layer_mask and early exit choose rows per layer from data, which torch.compile cannot trace; run them "
        "eagerly (static skip_layers and drop_attention_layers compile)"
    )


def _run_layer_on_subset(layer, hidden, cache, subset, step):
    """A layer on the rows of ``subset`` (``routes.RowSubset``) of ``hidden [1, N, hidden]``: they
    are gathered, run, and scattered back; the other rows pass unchanged. The cache writes of the
    layer go through the subset's step."""
    index = subset.index.to(hidden.device)
    if cache is not None:
        cache.use_step(subset.step)
    try:
        out = _run_layer(layer, hidden[:, index], subset.positions, cache, (subset.cos, subset.sin), subset.step)
    finally:
        if cache is not None:
            cache.use_step(step)
    return hidden[0].index_copy(0, index.to(out.device), out[0].to(hidden.dtype))[None]


def _checked_layer_mask(decoder, state: PatchState, cache, layer_mask, batch: int, builds_graph: bool):
    """The call's ``layer_mask`` on the host (or None), checked before the call changes the cache;
    refuses what the router cannot do (``routes.py``)."""
    policy = state.policy
    if torch.compiler.is_compiling() and (layer_mask is not None or policy.early_exit is not None):
        _refuse_data_dependent_routes()
    if policy.early_exit is not None and builds_graph:
        raise NotImplementedError("early exit is an inference technique: run it under torch.no_grad()")
    mask = check_layer_mask(layer_mask, batch, len(decoder.layers), policy.skip_layers)
    if cache is not None:
        cache.check_layer_mask(mask)
    return mask


def _router(decoder, state: PatchState, step, mask, context_mask) -> LayerRouter:
    """The call's layer router. Only decode steps (at most one row per sequence, no context) exit."""
    counts = step.rows.counts
    exits = state.policy.early_exit is not None and counts is not None \
        and (counts.numel() == 0 or int(counts.max()) <= 1) and not step.has_context(context_mask)

    def head(h):
        return state.lm_head(decoder.norm(h))

    stop = state.policy.context_stop_layer if step.has_context(context_mask) else None
    return LayerRouter(state.policy, len(decoder.layers), stop, mask, head, exits)


def _log_work(state: PatchState, router: LayerRouter, rows: int, layers: int) -> None:
    """Appends the call's layer-row work to the model's log (``work.py``); not under torch.compile."""
    if torch.compiler.is_compiling():
        return
    exit_rows = exits = exit_sum = 0
    if router.rule is not None:
        exit_rows = rows
        if router.exited is not None:
            exits = int(router.exited.sum())
            exit_sum = int(torch.where(router.exited, router.exit_layer, layers - 1).sum())
        else:
            exit_sum = rows * (layers - 1)
    state.work.append(CallWork(rows, router.row_layers, rows * layers, exit_rows, exits, exit_sum))


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
    layer_mask: torch.Tensor | None = None,
    **kwargs,
) -> BaseModelOutputWithPast:
    """Replacement for the decoder's ``forward`` (bound to the instance by :func:`skiplayers.patch`).

    Takes the usual arguments plus ``context_mask`` (bool ``[B, columns]``, True = context token;
    see ``patching/inputs.py`` for how columns are counted) and ``layer_mask`` (bool ``[B, L]``,
    True = the sequence runs that layer; the same in every call on one cache). Returns ``last_hidden_state``
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
    layer_mask = _checked_layer_mask(self, state, cache, layer_mask, batch, builds_graph)
    step: PackedStep | traced.TracedStep
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
    router = _router(self, state, step, layer_mask, context_mask)
    if cache is not None:
        cache.use_step(step)
    try:
        for layer_idx, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if layer_idx == stop and step.has_context(context_mask):
                step, hidden, cos, sin = _compact(step, hidden, cos, sin)
                positions = step.rows.pos[None].long()
                router.rebase()
            runs, subset = router.route(layer_idx, step, cos, sin)
            if runs and subset is None:
                hidden = _run_layer(layer, hidden, positions, cache, (cos, sin), step)
            elif runs:
                hidden = _run_layer_on_subset(layer, hidden, cache, subset, step)
            router.propagate(layer_idx, layer, step, hidden[0], cos, sin, cache)
            router.decide_exits(layer_idx, hidden[0])
            if collected is not None and layer_idx + 1 < len(self.layers):
                collected.append(unpack(step.rows_on(hidden.device), hidden[0], batch, columns, fill))
    finally:
        if cache is not None:
            cache.end_call()
    if cache is not None and router.exited is not None and not router.rule.propagates and bool(router.exited.any()):
        cache.uneven_exits = True
    _log_work(state, router, rows.num_rows, len(self.layers))

    hidden = self.norm(hidden)[0]
    step.finish(self)
    last = unpack(step.rows_on(hidden.device), hidden, batch, columns, fill)
    return BaseModelOutputWithPast(
        last_hidden_state=last,
        past_key_values=cache,
        hidden_states=tuple(collected) + (last,) if collected is not None else None,
    )
