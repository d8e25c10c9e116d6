"""The host-side plan of one patched forward call, and its bookkeeping after the layers.

Everything a call decides on the host before its layers run: the checks (logits asked for, sliding
window, context coverage, cache policy, training over a filled cache), the cache's per-sequence
counts, the tag words (context, anchors) and the packing. The eager forward (``decoder.py``) calls
:func:`plan_call` and :func:`finish_call` directly; under ``torch.compile`` the opaque ops of
``traced.py`` call the same functions when the graph runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..anchors import anchor_tags
from ..cache import SkipCache
from ..dispatch.patterns import CallFacts, positions_ordered
from ..meta import TAG_ANCHOR, TAG_CONTEXT
from ..packing import PackedRows, pack
from .families import sliding_window
from .inputs import CallInputs, resolve_inputs
from .state import PatchState


def check_last_columns_computed(policy, context_mask, past: int, columns: int, logits_to_keep, layers: int):
    """generate() reads the logits of the last column: it must not be a dropped context column."""
    stop = policy.context_stop_layer
    if context_mask is None or stop is None or stop >= layers or not isinstance(logits_to_keep, int):
        return
    if logits_to_keep <= 0:
        return
    first = past + columns - logits_to_keep
    kept = context_mask[:, first : past + columns]
    if kept.numel() and bool(kept.any()):
        raise ValueError(
            "logits were requested for context columns, which stop at the context-stop layer and have no "
            "logits; the prompt of every sequence must end with a non-context token (e.g. the query)"
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


@dataclass
class CallPlan:
    """The host-side plan of one forward call: its packed rows, its inputs, (with anchors) which
    new columns are anchors (bool ``[B, T]``, host), and the facts attention dispatch reads."""

    rows: PackedRows
    call: CallInputs
    anchors: torch.Tensor | None
    facts: CallFacts


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
        cache.expect_writes(expected_writes(state.policy, layers, call, cache.layer_mask, bool(call.context.any())))
    tags, anchors = _tags(call, input_ids, cache, state.policy)
    facts = CallFacts(
        positions_ordered=positions_ordered(call.host_positions, call.valid,
                                            cache.last_positions if cache is not None else None),
        new_anchor=anchors is not None and bool(anchors.any()),
    )
    return CallPlan(pack(call.valid, call.positions, tags), call, anchors, facts)


def expected_writes(policy, layers: int, call: CallInputs, layer_mask: torch.Tensor | None,
                    context_dropped: bool) -> torch.Tensor:
    """An upper bound of the slots each layer stores in this call, host int64 ``[L, B]``: every real
    token below ℓ, the non-context ones from ℓ on (when the context is dropped), nothing at skipped
    layers or dropped attention, nothing where ``layer_mask`` skips a sequence. (Rows that exit
    early store no more than this.) What lets a growing page pool grow once per call."""
    valid = call.valid.sum(dim=1)
    plain = (call.valid & ~call.context).sum(dim=1)
    writes = valid.expand(layers, -1).clone()
    stop = policy.context_stop_layer
    if context_dropped and stop is not None and stop < layers:
        writes[stop:] = plain
    none = [*policy.skip_layers, *policy.drop_attention_layers]
    if none:
        writes[none] = 0
    if layer_mask is not None:
        writes *= layer_mask.T.to(torch.int64)
    return writes


def finish_call(decoder, cache: SkipCache | None, plan: CallPlan) -> None:
    """The cache's bookkeeping after the layers: the columns are seen; a finished sentence asks
    for the anchor reduction (AnLLM: it keeps only its anchor's K/V)."""
    if cache is None:
        return
    cache.expect_writes(None)
    cache.advance(plan.call.valid, plan.call.context, plan.call.host_positions, plan.anchors)
    if plan.anchors is not None and bool(plan.anchors.any()):
        cache.request_reduction(decoder._skiplayers.ops)


