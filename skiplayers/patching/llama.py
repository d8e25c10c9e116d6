"""The patch for the LLaMA family: a packed, compacting forward for ``LlamaModel``.

The patched forward reuses the model's own modules (norms, projections, MLP, rotary embedding)
and replaces only the data flow around them:

1. padding columns are dropped and the real tokens packed into ragged rows (``packing.py``);
2. at layer ℓ (``context_stop_layer``) the context rows are dropped from the hidden states with the
   backend's compaction kernel, so layers >= ℓ never compute, attend to or store them;
3. attention runs through the backend's ops on the packed rows and the :class:`SkipCache`;
4. the final hidden states are scattered back to ``[B, T, hidden]``. Columns that were not
   computed (padding, and context columns when ℓ < L) hold NaN, so nothing reads them silently.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama import modeling_llama

from ..anchors import anchor_tags
from ..cache import SkipCache
from ..meta import TAG_CONTEXT
from ..packing import PackedRows, drop_rows, pack, unpack
from .inputs import CallInputs, resolve_inputs
from .state import PatchState

# Keyword arguments of LlamaModel.forward that change what is computed and are not supported.
_UNSUPPORTED_FLAGS = ("output_attentions", "output_hidden_states")


def supports(model) -> bool:
    return isinstance(model, modeling_llama.LlamaForCausalLM)


def _resolve_cache(past_key_values, use_cache: bool, num_layers: int, state: PatchState) -> SkipCache | None:
    if isinstance(past_key_values, SkipCache):
        if past_key_values.policy is not None and past_key_values.policy != state.policy:
            raise ValueError(
                "this SkipCache was filled under another SkipPolicy; start a new cache after re-patching"
            )
        return past_key_values
    if past_key_values is None or (isinstance(past_key_values, DynamicCache) and past_key_values.get_seq_length() == 0):
        return SkipCache(num_layers) if use_cache else None
    raise TypeError(
        f"a model patched by skiplayers needs a SkipCache (or none); got a filled {type(past_key_values).__name__}"
    )


def _tags(call: CallInputs, input_ids, cache: SkipCache | None, policy) -> tuple[torch.Tensor, bool]:
    """int32 ``[B, T]`` tag words of the new columns (on the model's device): the context bit and,
    with anchors on, the anchor / sink / sentence bits continuing the cache's history. Also says
    whether a new anchor arrived (then finished sentences can leave the cache)."""
    tags = call.context.to(torch.int32) * TAG_CONTEXT
    new_anchor = False
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
        new_anchor = bool((sentences > prior[0]).any())
        if cache is not None:
            cache.sentence_counts, cache.tokens_seen = sentences, tokens
    return tags.to(call.positions.device), new_anchor


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


def _builds_graph(decoder, inputs_embeds: torch.Tensor) -> bool:
    """Whether this call records an autograd graph (grad mode on and something requires grad)."""
    if not torch.is_grad_enabled():
        return False
    return inputs_embeds.requires_grad or any(p.requires_grad for p in decoder.parameters())


def _rope(q, k, cos, sin):
    """RoPE on packed ``q [N, H, D]``, ``k [N, H_kv, D]`` with ``cos, sin [N, D]``."""
    return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)


def _attention(layer_idx: int, attn, hidden, rows: PackedRows, cos, sin, cache: SkipCache | None, state: PatchState):
    """Self-attention sublayer on packed rows ``hidden [N, hidden_size]`` -> ``[N, hidden_size]``."""
    n = hidden.shape[0]
    head_dim = attn.head_dim
    q = attn.q_proj(hidden).view(n, -1, head_dim)
    k = attn.k_proj(hidden).view(n, -1, head_dim)
    v = attn.v_proj(hidden).view(n, -1, head_dim)
    q, k = _rope(q, k, cos, sin)
    ops, rule = state.ops, state.rule
    # Without a cache, or when the cache held nothing before these rows, the keys are exactly the
    # packed rows: attend to them packed. Otherwise attend to what the cache stores.
    packed_keys = cache is None or cache.is_empty(layer_idx)
    if cache is not None:  # the cache stores values; gradients flow through this call's own k, v
        cache.append(layer_idx, k.detach(), v.detach(), rows.pos, rows.tag, rows.cu_seqlens, rows.counts, ops)
    if packed_keys:
        out = ops.varlen_attention(
            q, k, v, rows.cu_seqlens, rows.cu_seqlens, rows.pos, rows.pos, rows.tag, rows.tag, rule, attn.scaling
        )
    else:
        keys, values, pos, tag, lengths = cache.stored(layer_idx)
        out = ops.cache_attention(
            q, keys, values, rows.cu_seqlens, lengths, rows.pos, pos, rows.tag, tag, rule, attn.scaling, 0
        )
    return attn.o_proj(out.reshape(n, -1))


def _decoder_layer(layer_idx, layer, hidden, rows, cos, sin, cache, state):
    residual = hidden
    hidden = residual + _attention(
        layer_idx, layer.self_attn, layer.input_layernorm(hidden), rows, cos, sin, cache, state
    )
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


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
    """Replacement for ``LlamaModel.forward`` (bound to the instance by :func:`skiplayers.patch`).

    Takes the usual arguments plus ``context_mask`` (bool ``[B, columns]``, True = context token;
    see ``patching/inputs.py`` for how columns are counted). Returns ``last_hidden_state``
    ``[B, T, hidden]`` with NaN in the columns that were not computed (0 while autograd records a
    graph; see the end of this function), and the :class:`SkipCache`.
    """
    state: PatchState = self._skiplayers
    for flag in _UNSUPPORTED_FLAGS:
        if kwargs.get(flag):
            raise NotImplementedError(f"{flag}=True is not supported by skiplayers' packed forward")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    batch, columns = inputs_embeds.shape[:2]
    use_cache = self.config.use_cache if use_cache is None else use_cache
    cache = _resolve_cache(past_key_values, use_cache, len(self.layers), state)
    past = cache.get_seq_length() if cache is not None else 0
    builds_graph = _builds_graph(self, inputs_embeds)
    if past > 0 and builds_graph:
        raise NotImplementedError(
            "backpropagation through a SkipCache filled by an earlier call is not supported (the cache holds "
            "values, not their graph, so earlier tokens' K/V would get no gradient); train with use_cache=False "
            "or feed the whole sequence in one call, or run under torch.no_grad()"
        )

    call = resolve_inputs(batch, columns, past, attention_mask, position_ids, context_mask, inputs_embeds.device)
    stop = state.policy.context_stop_layer
    if stop is not None and stop < len(self.layers):
        _check_context_coverage(call, cache, context_mask, attention_mask, past)
    if cache is not None:
        cache.policy = state.policy

    tags, new_anchor = _tags(call, input_ids, cache, state.policy)
    rows = pack(call.valid, call.positions, tags)
    hidden = inputs_embeds.reshape(batch * columns, -1)[rows.index]
    cos, sin = self.rotary_emb(hidden, position_ids=rows.pos[None].long())
    cos, sin = cos[0], sin[0]

    for layer_idx, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
        if layer_idx == stop:
            keep = ~rows.is_context()
            if bool(call.context.any()):
                rows, (hidden, cos, sin) = drop_rows(rows, keep, [hidden, cos, sin], state.ops)
        hidden = _decoder_layer(layer_idx, layer, hidden, rows, cos, sin, cache, state)

    hidden = self.norm(hidden)
    if cache is not None:
        cache.advance(columns)
        if new_anchor:  # AnLLM: a finished sentence keeps only its anchor's K/V
            cache.drop_finished_sentences(state.ops)
    # Columns that were not computed hold NaN, so nothing reads them silently; but not when autograd
    # records a graph: a NaN row would poison the lm_head's weight gradient (0 * NaN = NaN), so they
    # hold 0 and the causal-LM forward puts NaN into their logits instead (patching/__init__.py).
    fill = 0.0 if builds_graph else float("nan")
    return BaseModelOutputWithPast(last_hidden_state=unpack(rows, hidden, batch, columns, fill), past_key_values=cache)
