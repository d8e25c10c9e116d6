"""Checking and normalising the inputs of a patched forward call.

``context_mask`` describes token columns from the start of the sequence: column c is the c-th
token fed to the model (padding included), exactly like ``attention_mask``. ``generate()`` keeps
passing the prompt's ``[B, T_prompt]`` mask while it feeds one new column per step; columns past
the mask's width are not context. Context must be marked when its tokens are first fed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CallInputs:
    """The new columns of one forward call.

    valid:     bool ``[B, T]`` (host): the column is a real token (attention_mask 1).
    positions: int64 ``[B, T]`` (model device): absolute positions (RoPE indices).
    host_positions: the same on the host (one copy of ``position_ids`` per call when they are given).
    context:   bool ``[B, T]`` (host): the column is a context token (always False on padding).
    """

    valid: torch.Tensor
    positions: torch.Tensor
    context: torch.Tensor
    host_positions: torch.Tensor


def _check_context_mask(context_mask: torch.Tensor, batch: int, seen: int) -> None:
    if not isinstance(context_mask, torch.Tensor):
        raise TypeError(f"context_mask must be a torch.Tensor of dtype torch.bool, got {type(context_mask).__name__}")
    if context_mask.dtype != torch.bool:
        raise TypeError(f"context_mask must have dtype torch.bool (True = context token), got {context_mask.dtype}")
    if context_mask.dim() != 2 or context_mask.shape[0] != batch:
        raise ValueError(
            f"context_mask must have shape [batch={batch}, columns], like attention_mask; got {tuple(context_mask.shape)}"
        )
    if context_mask.shape[1] > seen:
        raise ValueError(
            f"context_mask covers {context_mask.shape[1]} columns but only {seen} token columns have been fed "
            "(cache length + this call's input length)"
        )


def resolve_inputs(
    batch: int,
    columns: int,
    past: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    device: torch.device,
) -> CallInputs:
    """Validates and normalises the masks of a call feeding ``columns`` new columns after ``past``."""
    if attention_mask is None:
        valid = torch.ones(batch, columns, dtype=torch.bool)
    else:
        if attention_mask.dim() != 2:
            raise NotImplementedError(
                "skiplayers needs a 2-D attention_mask [batch, columns] (1 = token, 0 = padding); "
                f"got {attention_mask.dim()}-D (custom 4-D masks are not supported by the packed kernels)"
            )
        if attention_mask.shape != (batch, past + columns):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected [{batch}, {past + columns}] "
                "(cache length + this call's input length)"
            )
        valid = attention_mask[:, past:].detach().cpu().bool()

    if position_ids is None:
        host_positions = torch.arange(past, past + columns).expand(batch, columns)
        positions = host_positions.to(device)
    else:
        if position_ids.dim() != 2 or position_ids.shape[-1] != columns or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be [batch or 1, {columns}], got {tuple(position_ids.shape)}")
        positions = position_ids.to(device).expand(batch, columns)
        host_positions = position_ids.detach().cpu().to(torch.int64).expand(batch, columns)

    context = torch.zeros(batch, columns, dtype=torch.bool)
    if context_mask is not None:
        _check_context_mask(context_mask, batch, past + columns)
        width = context_mask.shape[1]
        if width > past:
            context[:, : width - past] = context_mask[:, past:].detach().cpu()
        context &= valid  # padding columns are never computed, context or not
    return CallInputs(valid=valid, positions=positions, context=context, host_positions=host_positions)


def uncomputed_columns(call: CallInputs, stop: int | None, num_layers: int) -> torch.Tensor:
    """Bool ``[B, T]`` (host): columns a patched forward does not compute, so they have no logits:
    padding, and context columns when context stops before the last layer."""
    dropped = call.context if stop is not None and stop < num_layers else torch.zeros_like(call.context)
    return ~call.valid | dropped
