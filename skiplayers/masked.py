"""The slow masked model: the model-level truth a patched, compacted model must match.

It runs the model's own modules on the full padded batch, every token at every layer, and applies
the visibility predicate as a dense mask per layer (``reference.visibility_mask``): at layers >= ℓ
the context key columns are masked for every query (``RULE_HIDE_CONTEXT``); with anchors, every
layer applies the AnSAN rule (``RULE_ANCHORS``) and nothing is ever dropped from a cache; padding
keys are always masked. Attention is computed in float32 by ``reference.masked_attention``. Nothing is
skipped, nothing is cached: it is slow on purpose.
"""

from __future__ import annotations

import torch
from transformers.models.llama import modeling_llama

from . import reference
from .anchors import anchor_tags
from .meta import RULE_ANCHORS, RULE_CAUSAL, RULE_HIDE_CONTEXT, TAG_CONTEXT
from .policy import SkipPolicy


def _positions(attention_mask: torch.Tensor | None, position_ids, batch: int, columns: int, device) -> torch.Tensor:
    if position_ids is not None:
        return position_ids.to(device).expand(batch, columns)
    return torch.arange(columns, device=device).expand(batch, columns)


def layer_rule(policy: SkipPolicy, layer_idx: int) -> int:
    """The visibility rule of the masked model at ``layer_idx``."""
    stop = policy.context_stop_layer
    rule = RULE_HIDE_CONTEXT if stop is not None and layer_idx >= stop else RULE_CAUSAL
    return rule | (RULE_ANCHORS if policy.anchors_enabled else 0)


@torch.no_grad()
def masked_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    policy: SkipPolicy | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of the masked model (``model`` is a LlamaForCausalLM, patched or not)."""
    policy = policy or SkipPolicy()
    decoder = model.model
    batch, columns = input_ids.shape
    device = input_ids.device
    valid = torch.ones(batch, columns, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool()
    pos = _positions(attention_mask, position_ids, batch, columns, device).to(torch.int32)
    tag = torch.zeros(batch, columns, dtype=torch.int32, device=device)
    if context_mask is not None:  # it may cover fewer columns (a prompt's mask during decoding)
        context = torch.zeros_like(valid)
        context[:, : context_mask.shape[1]] = context_mask.to(device)
        tag |= (context & valid).to(torch.int32) * TAG_CONTEXT
    if policy.anchors_enabled:
        zeros = torch.zeros(batch, dtype=torch.int64)
        bits, _, _ = anchor_tags(input_ids.cpu(), valid.cpu(), policy.anchor_token_ids, policy.anchor_keep_first,
                                 zeros, zeros)
        tag |= bits.to(device)

    hidden = decoder.embed_tokens(input_ids)
    cos, sin = decoder.rotary_emb(hidden, position_ids=pos.long())
    for layer_idx, layer in enumerate(decoder.layers[: model.config.num_hidden_layers]):
        rule = layer_rule(policy, layer_idx)
        attn = layer.self_attn
        h = layer.input_layernorm(hidden)
        shape = (batch, columns, -1, attn.head_dim)
        q, k, v = attn.q_proj(h).view(shape), attn.k_proj(h).view(shape), attn.v_proj(h).view(shape)
        q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        out = torch.empty_like(q)
        for b in range(batch):
            visible = reference.visibility_mask(rule, pos[b], tag[b], pos[b], tag[b]) & valid[b][None, :]
            out[b] = reference.masked_attention(q[b], k[b], v[b], visible, attn.scaling).to(q.dtype)
        hidden = hidden + attn.o_proj(out.reshape(batch, columns, -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(decoder.norm(hidden))


@torch.no_grad()
def masked_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_mask: torch.Tensor | None,
    policy: SkipPolicy,
    max_new_tokens: int,
) -> torch.Tensor:
    """Greedy decoding with the masked model, recomputing everything at every step. Positions and
    end-of-sequence handling follow ``generate()``: positions are ``cumsum(attention_mask) - 1`` and
    a finished sequence continues with the pad token. Returns ``[B, T + max_new_tokens]``."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    ids, mask = input_ids, attention_mask
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = masked_forward(model, ids, mask, context_mask, policy, positions)
        token = logits[:, -1].argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        unfinished &= ~torch.isin(token, eos)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids
