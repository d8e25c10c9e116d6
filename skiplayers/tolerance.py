"""The tolerance policy for attention outputs, shared by the op tests and the dispatch tuner.

Flash-attention's rule, against a float64 truth::

    max |out - ref64|  <=  2 * max |ref_low - ref64|  +  ATOL[dtype]

where ``ref_low`` is the same reference computed in plain low precision (float32 for float32
inputs, the input dtype for float16/bfloat16). A kernel may thus be at most twice as far from the
truth as the naive computation in its own precision, plus a small absolute floor that covers the
rounding of the output itself.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def attention_error(out: torch.Tensor, truth: torch.Tensor, low: torch.Tensor) -> tuple[float, float]:
    """``(max |out - truth|, bound)``: ``truth`` computed in float64, ``low`` in the plain precision
    of ``out``'s dtype (all the same shape)."""
    if truth.numel() == 0:
        return 0.0, ATOL[out.dtype]
    baseline = (low.double() - truth).abs().max().item()
    err = (out.detach().cpu().double() - truth).abs().max().item()
    return err, 2 * baseline + ATOL[out.dtype]
