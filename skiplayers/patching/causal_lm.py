"""The patched causal-LM forward: ``context_mask`` in the signature, checks before the decoder runs,
and the treatment of columns the decoder did not compute (padding, dropped context) after it.

* ``generate()`` reads the last column's logits: a prompt ending in context is refused before any
  layer runs (``plan.check_last_columns_computed``, which knows the cache length).
* A loss computed by the model (``labels=``) ignores the predictions of uncomputed columns, as if
  the labels they predict were -100 (transformers' causal-LM loss pairs column c's logits with
  label c + 1), so padding or dropped context never makes it NaN.
* Under autograd the decoder leaves 0 in uncomputed columns (NaN would poison parameter gradients);
  their logits become NaN here, after the lm_head, where masking is gradient-safe. Inference
  without labels (every decode step) does no host work here.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .inputs import resolve_inputs, uncomputed_columns
from .state import PatchState


def _logit_columns(uncomputed: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The rows of ``uncomputed`` ``[B, T]`` that the returned logits cover (transformers' rule)."""
    if isinstance(logits_to_keep, int):
        return uncomputed[:, -logits_to_keep:] if logits_to_keep > 0 else uncomputed
    return uncomputed[:, logits_to_keep.cpu()]


def _labels_without_uncomputed(labels: torch.Tensor, uncomputed: torch.Tensor) -> torch.Tensor:
    """``labels`` with -100 wherever the column predicting them (one to the left) was not computed."""
    ignored = torch.zeros_like(uncomputed)
    ignored[:, 1:] = uncomputed[:, :-1]
    return labels.masked_fill(ignored.to(labels.device), -100)


def causal_lm_forward(model, original_forward):
    """The forward bound to the causal-LM instance by :func:`skiplayers.patch`."""

    @functools.wraps(original_forward)
    def forward(*args, context_mask: torch.Tensor | None = None, **kwargs):
        state: PatchState = model._skiplayers
        layers = model.config.num_hidden_layers
        labels = kwargs.get("labels")
        uncomputed = None
        if labels is not None:
            uncomputed = _uncomputed(state, args, kwargs, context_mask, layers)
            kwargs["labels"] = _labels_without_uncomputed(labels, uncomputed)
        return_dict = kwargs.pop("return_dict", None)
        # The decoder checks that the logits asked for exist (it knows the cache length).
        out = original_forward(*args, context_mask=context_mask, return_dict=True,
                               skiplayers_logits_to_keep=kwargs.get("logits_to_keep", 0), **kwargs)
        logits = out.logits
        if logits is not None and logits.requires_grad:
            if uncomputed is None:
                uncomputed = _uncomputed(state, args, kwargs, context_mask, layers)
            mask = _logit_columns(uncomputed, kwargs.get("logits_to_keep", 0)).to(logits.device)
            out.logits = logits.masked_fill(mask[..., None], float("nan"))
        if return_dict is False or (return_dict is None and getattr(model.config, "return_dict", True) is False):
            return out.to_tuple()
        return out

    # generate() validates model kwargs against the signature: expose context_mask and layer_mask in it.
    params = list(inspect.signature(original_forward).parameters.values())
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("context_mask", "layer_mask")]
    at = len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params)
    params[at:at] = extra
    forward.__signature__ = inspect.Signature(params)
    return forward


def _uncomputed(state: PatchState, args, kwargs, context_mask, layers) -> torch.Tensor:
    """Bool ``[B, T]`` (host): the columns of this call that the decoder does not compute."""
    cache = kwargs.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    ids = kwargs.get("input_ids", args[0] if args else None)
    batch, columns = (ids if ids is not None else kwargs["inputs_embeds"]).shape[:2]
    call = resolve_inputs(batch, columns, past, kwargs.get("attention_mask"), None, context_mask, torch.device("cpu"))
    return uncomputed_columns(call, state.policy.context_stop_layer, layers)
