"""Other libraries' attention for ``cpu_attention.py``: FlexAttention (compiled once per process,
with block masks) and the import check of flash-attn. Each is optional: the ``*_or_reason``
functions return the implementation or why it cannot run here.

(``bench_kernels.py`` builds its FlexAttention per case instead: a block mask from the case's own
metadata, compiled for the case's shapes after ``torch._dynamo.reset()``, see ``bench_kernels.flex``.
One compiled object called with more shapes than dynamo's recompile limit runs eagerly past it.)

Tensors follow ``benchmarks.attention_inputs``: packed [N, H, D], SDPA-style [B, H, T, D]."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from benchmarks.common import error_summary


@functools.cache
def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)``, built once per process (compiled graphs
    are cached on it, so every case reuses them). Raises ImportError where torch has none."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_mask(mask_mod: Callable, n: int, device):
    """FlexAttention block mask of ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend) over
    ``n`` queries and ``n`` keys, one batch, the same for every head."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, 1, None, n, n, device=device)


def causal_block_mask(n: int, device):
    """``block_mask`` of plain causal attention by index (key <= query)."""
    return block_mask(lambda b, h, qi, ki: ki <= qi, n, device)


def flex_attention_or_reason(limit: int, probe: tuple[int, int, int] | None = None):
    """``(compiled_flex_attention(), None)``, or ``(None, reason)`` when it cannot run here: the
    error's type and first line, cut to ``limit`` characters. With ``probe`` = (heads, kv_heads,
    dim), first runs it on 128 random CPU tokens (causal, drawn from torch's global generator):
    compiling for the CPU needs a working C++ toolchain, which only a call shows."""
    try:
        compiled = compiled_flex_attention()
        if probe is not None:
            heads, kv_heads, dim = probe
            q = torch.randn(1, heads, 128, dim)
            kv = torch.randn(1, kv_heads, 128, dim)
            compiled(q, kv, kv, block_mask=causal_block_mask(128, "cpu"), enable_gqa=True)
        return compiled, None
    except Exception as err:  # noqa: BLE001 - any failure is the reason it is skipped
        return None, error_summary(err, limit)


def flash_attn_or_reason(limit: int):
    """``(flash_attn module, None)``, or ``(None, reason)`` if it does not import (not installed,
    or built for another torch): the error's type and first line, cut to ``limit`` characters."""
    try:
        import flash_attn

        return flash_attn, None
    except Exception as err:  # noqa: BLE001 - any import failure is a skip reason
        return None, error_summary(err, limit)
