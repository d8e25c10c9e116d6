"""The slow masked model: the model-level truth a patched, compacted model must match.

It runs the model's own modules on the full padded batch, every token at every layer, and applies
the visibility predicate as a dense mask per layer (``reference.visibility_mask``): at layers >= ℓ
the context key columns are masked for every query (``Rule.HIDE_CONTEXT``); with anchors, every
layer applies the AnSAN rule (``Rule.ANCHORS``) and nothing is ever dropped from a cache; padding
keys are always masked. Each decoder layer runs through its own ``__call__`` (so its projections,
biases, q/k norms and RoPE are the model's), with the ``"skiplayers"`` attention function
(``patching/attention.py``) and a :class:`MaskedStep` in place of an attention implementation;
attention is computed in float32 by ``reference.masked_attention``. Nothing is skipped, nothing is
cached: it is slow on purpose.

The other techniques, as identities on the full batch (DESIGN: a depth profile per token):

* a layer in ``skip_layers``, or one a sequence skips (``layer_mask`` False), leaves the hidden
  states of those rows as they were (the layer runs on every row; its output is discarded there);
* a layer in ``drop_attention_layers`` computes ``h + mlp(post_attention_layernorm(h))``;
* early exit: after an exit layer, a generated token (a column from ``exit_from`` on) whose top
  probability reaches the threshold keeps its hidden state through every deeper layer. Its K/V at
  a deeper layer are then what that layer computes from the kept state, which is exactly KV
  propagation; with ``kv="none"`` its key column is masked at the deeper layers instead.
"""

from __future__ import annotations

import torch

from . import reference
from .anchors import anchor_tags
from .meta import TAG_CONTEXT, Rule
from .patching.attention import attention_implementation, packed
from .policy import SkipPolicy


def _positions(attention_mask: torch.Tensor | None, position_ids, batch: int, columns: int, device) -> torch.Tensor:
    if position_ids is not None:
        return position_ids.to(device).expand(batch, columns)
    return torch.arange(columns, device=device).expand(batch, columns)


def layer_rule(policy: SkipPolicy, layer_idx: int) -> int:
    """The visibility rule of the masked model at ``layer_idx``."""
    stop = policy.context_stop_layer
    rule = Rule.HIDE_CONTEXT if stop is not None and layer_idx >= stop else Rule.CAUSAL
    return rule | (Rule.ANCHORS if policy.anchors_enabled else 0)


class MaskedStep:
    """Dense masked attention for the layers of one masked forward (see the module docstring).

    pos, tag: int32 ``[B, T]``; valid: bool ``[B, T]`` (padding keys are never visible)."""

    def __init__(self, policy: SkipPolicy, pos: torch.Tensor, tag: torch.Tensor, valid: torch.Tensor):
        self.policy, self.pos, self.tag, self.valid = policy, pos, tag, valid
        self.hidden_keys = torch.zeros_like(valid)  # key columns masked at this layer (exited with kv="none")

    def attend(self, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
        """``query [B, H, T, D]``, ``key/value [B, H_kv, T, D]`` -> ``[B, T, H, D]``."""
        rule = layer_rule(self.policy, layer_idx)
        out = torch.empty(query.shape[0], query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype,
                          device=query.device)
        for b in range(query.shape[0]):
            pos, tag = self.pos[b], self.tag[b]
            keys = self.valid[b] & ~self.hidden_keys[b]
            visible = reference.visibility_mask(rule, pos, tag, pos, tag) & keys[None, :]
            out[b] = reference.masked_attention(
                packed(query[b : b + 1]), packed(key[b : b + 1]), packed(value[b : b + 1]), visible, scaling
            ).to(query.dtype)
        return out


@torch.no_grad()
def masked_forward(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
    policy: SkipPolicy | None = None,
    position_ids: torch.Tensor | None = None,
    layer_mask: torch.Tensor | None = None,
    exit_from: int | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of the masked model (``model``: a causal LM of the LLaMA family,
    patched or not; ``skiplayers.patching.families``). ``layer_mask``: bool ``[B, L]``, True = the
    sequence runs that layer. ``exit_from``: with ``policy.early_exit``, the first column that may
    exit (the generated tokens fed back; ``masked_generate`` sets it)."""
    return masked_run(model, input_ids, attention_mask, context_mask, policy, position_ids, layer_mask, exit_from)[0]


@torch.no_grad()
def masked_run(model, input_ids, attention_mask=None, context_mask=None, policy=None, position_ids=None,
               layer_mask=None, exit_from=None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`masked_forward`, also returning the layer each column exited after (int64 ``[B, T]``,
    -1 where it did not)."""
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

    step = MaskedStep(policy, pos, tag, valid)
    hidden = decoder.embed_tokens(input_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=pos.long())
    rule = policy.early_exit if exit_from is not None else None
    exited = torch.zeros(batch, columns, dtype=torch.bool, device=device)
    exit_layer = torch.full((batch, columns), -1, dtype=torch.int64, device=device)
    may_exit = valid & (torch.arange(columns, device=device) >= (exit_from or 0))[None, :]
    runs = torch.ones(batch, model.config.num_hidden_layers, dtype=torch.bool, device=device) if layer_mask is None \
        else layer_mask.to(device)
    with attention_implementation(model.config):
        for idx, layer in enumerate(decoder.layers[: model.config.num_hidden_layers]):
            if idx not in policy.skip_layers:
                if idx in policy.drop_attention_layers:
                    out = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                else:
                    out = layer(hidden, attention_mask=None, position_ids=pos.long(), past_key_values=None,
                                use_cache=False, position_embeddings=position_embeddings, skiplayers=step)
                    out = out[0] if isinstance(out, tuple) else out
                carried = exited | ~runs[:, idx][:, None]
                hidden = torch.where(carried[..., None], hidden, out)
            if rule is not None and idx in rule.layers:
                confidence = torch.softmax(model.lm_head(decoder.norm(hidden)).float(), dim=-1).amax(dim=-1)
                leaving = may_exit & ~exited & (confidence >= rule.threshold)
                exited |= leaving
                exit_layer[leaving] = idx
                if not rule.propagates:
                    step.hidden_keys = exited.clone()
    return model.lm_head(decoder.norm(hidden)), exit_layer


@torch.no_grad()
def masked_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    context_mask: torch.Tensor | None,
    policy: SkipPolicy,
    max_new_tokens: int,
    layer_mask: torch.Tensor | None = None,
    return_exit_layers: bool = False,
):
    """Greedy decoding with the masked model, recomputing everything at every step. Positions and
    end-of-sequence handling follow ``generate()``: positions are ``cumsum(attention_mask) - 1`` and
    a finished sequence continues with the pad token; with early exit, the generated tokens fed
    back may exit (the prompt never does). Returns ``[B, T + max_new_tokens]``, and with
    ``return_exit_layers`` also the exit layer of every fed column (int64, -1: none)."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    ids, mask = input_ids, attention_mask
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    exit_layer = torch.full((ids.shape[0], 0), -1, dtype=torch.int64)
    for _ in range(max_new_tokens):
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits, exit_layer = masked_run(model, ids, mask, context_mask, policy, positions, layer_mask,
                                        exit_from=input_ids.shape[1])
        token = logits[:, -1].argmax(-1)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        unfinished &= ~torch.isin(token, eos)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return (ids, exit_layer) if return_exit_layers else ids
