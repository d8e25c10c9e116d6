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

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from ..anchors import anchor_tags
from ..cache import SkipCache
from ..meta import TAG_ANCHOR, TAG_CONTEXT
from ..packing import PackedRows, drop_rows, pack, unpack
from .attention import PackedStep
from .families import sliding_window
from . import traced
from .causal_lm import check_last_columns_computed
from .inputs import CallInputs, resolve_inputs
from .state import PatchState


def _resolve_cache(past_key_values, use_cache: bool, num_layers: int, state: PatchState) -> SkipCache | None:
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


def _tags(call: CallInputs, input_ids, cache: SkipCache | None, policy) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int32 ``[B, T]`` tag words of the new columns (on the model's device): the context bit and,
    with anchors on, the anchor / sink / sentence bits continuing the cache's history. Also, with
    anchors on, which new columns are anchors (bool ``[B, T]``, host; then finished sentences can
    leave the cache)."""
    tags = call.context.to(torch.int32) * TAG_CONTEXT
    anchors = None
    if policy.anchors_enabled:
        if input_ids is None:
            raise NotImplementedError("anchors need input_ids (anchor tokens are recognised by id), not inputs_embeds")
        batch = input_ids.shape[0]
        prior = (cache.sentence_counts, cache.tokens_seen) if cache is not None and cache.sentence_counts is not None \
            else (torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int64))
        anchor_bits, sentences, tokens = anchor_tags(
            input_ids.detach().cpu(), call.valid, policy.anchor_token_ids, policy.anchor_keep_first, *prior
        )
        tags |= anchor_bits
        anchors = (anchor_bits & TAG_ANCHOR) != 0
        if cache is not None:
            cache.sentence_counts, cache.tokens_seen = sentences, tokens
    return tags.to(call.positions.device), anchors


def _check_context_coverage(call: CallInputs, cache: SkipCache | None, context_mask, attention_mask, past: int):
    """Errors for context that would leave a sequence without any computed token, and for context
    marks on already-fed columns that differ from what the cache was filled with."""
    new_context = call.context.sum(dim=1)
    new_plain = (call.valid & ~call.context).sum(dim=1)
    if cache is not None and cache.context_counts is not None:
        if context_mask is not None and past > 0:
            width = min(context_mask.shape[1], past)
            fed = context_mask[:, :width].cpu()
            if attention_mask is not None:
                fed = fed & attention_mask[:, :width].cpu().bool()
            if not torch.equal(fed.sum(dim=1), cache.context_counts):
                raise ValueError(
                    "context_mask marks other context columns among the already-fed tokens than when they were "
                    "fed; context must be marked when its tokens are first fed"
                )
        prior_plain, prior_context = cache.noncontext_counts, cache.context_counts
    else:
        prior_plain = prior_context = torch.zeros_like(new_plain)
    total_plain = prior_plain + new_plain
    for b in range(total_plain.shape[0]):
        if total_plain[b] == 0 and (prior_context[b] + new_context[b]) > 0:
            raise ValueError(
                f"context_mask covers every token of sequence {b}: nothing would be left to compute after the "
                "context-stop layer (the paper never masks the first token; mark only instructions and examples)"
            )
    if cache is not None:
        cache.context_counts = prior_context + new_context
        cache.noncontext_counts = total_plain


def _check_sliding_window(config, position_ids, past: int, columns: int) -> None:
    """skiplayers' visibility predicate has no window: a windowed model is exact only while no query
    is a window or more past the first key, i.e. while every position is below the window."""
    window = sliding_window(config)
    if window is None:
        return
    last = past + columns - 1 if position_ids is None else int(position_ids.max())
    if last >= window:
        raise NotImplementedError(
            f"this model's attention has a sliding window of {window} tokens; skiplayers does not apply sliding "
            f"windows, so it is exact only for positions below {window} (this call reaches position {last})"
        )


def _builds_graph(decoder, inputs_embeds: torch.Tensor) -> bool:
    """Whether this call records an autograd graph (grad mode on and something requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return inputs_embeds.requires_grad or any(p.requires_grad for p in decoder.parameters())


@dataclass
class CallPlan:
    """The host-side plan of one forward call: its packed rows, its inputs, and (with anchors) which
    new columns are anchors (bool ``[B, T]``, host)."""

    rows: PackedRows
    call: CallInputs
    anchors: torch.Tensor | None


def plan_call(decoder, cache: SkipCache | None, input_ids, like: torch.Tensor, attention_mask, position_ids,
              context_mask, logits_to_keep, builds_graph: bool) -> CallPlan:
    """Every host-side decision of a forward call, before its layers run: the checks, the cache's
    per-sequence bookkeeping, the tags, and the packing. ``like`` is the input embeddings
    ``[B, T, hidden]`` (their shape and device)."""
    state: PatchState = decoder._skiplayers
    layers = len(decoder.layers)
    batch, columns = like.shape[:2]
    if cache is not None and cache.policy is not None and cache.policy != state.policy:
        raise ValueError("this SkipCache was filled under another SkipPolicy; start a new cache after re-patching")
    past = cache.get_seq_length() if cache is not None else 0
    if past > 0 and builds_graph:
        raise NotImplementedError(
            "backpropagation through a SkipCache filled by an earlier call is not supported (the cache holds "
            "values, not their graph, so earlier tokens' K/V would get no gradient); train with use_cache=False "
            "or feed the whole sequence in one call, or run under torch.no_grad()"
        )
    check_last_columns_computed(state.policy, context_mask, past, columns, logits_to_keep, layers)
    _check_sliding_window(decoder.config, position_ids, past, columns)
    call = resolve_inputs(batch, columns, past, attention_mask, position_ids, context_mask, like.device)
    stop = state.policy.context_stop_layer
    if stop is not None and stop < layers:
        _check_context_coverage(call, cache, context_mask, attention_mask, past)
    if cache is not None:
        cache.policy = state.policy
        cache.settle()  # a reduction the previous call requested, with that call's sentence counts
    tags, anchors = _tags(call, input_ids, cache, state.policy)
    return CallPlan(pack(call.valid, call.positions, tags), call, anchors)


def finish_call(decoder, cache: SkipCache | None, plan: CallPlan) -> None:
    """The cache's bookkeeping after the layers: the columns are seen; a finished sentence asks
    for the anchor reduction (AnLLM: it keeps only its anchor's K/V)."""
    if cache is None:
        return
    cache.advance(plan.call.valid, plan.call.context, plan.anchors)
    if plan.anchors is not None and bool(plan.anchors.any()):
        cache.request_reduction(decoder._skiplayers.ops)


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
    cache = _resolve_cache(past_key_values, use_cache, len(self.layers), state)
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

    if cache is not None:
        cache.begin_call(step)
    try:
        for layer_idx, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            if layer_idx == stop and step.has_context(context_mask):
                step, hidden, cos, sin = _compact(step, hidden, cos, sin)
            out = layer(
                hidden,
                attention_mask=None,
                position_ids=step.rows.pos[None].long(),
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
