"""Triton kernels of skiplayers (installed as ``skiplayers.triton_kernels``).

Layout: ``@triton.jit`` kernels in ``visibility.py`` (the predicate and the block tests), ``ragged.py``,
``attention_core.py``, ``block_plan.py`` (the prefill's per-tile block lists), ``prefill_attention.py``,
``decode_attention.py`` and ``rows.py``; their host launchers in ``launch_attention.py``,
``launch_plan.py`` (the block plan and its reuse across layers) and ``launch_rows.py`` (gathered in
``launchers.py``); fixed
launch configurations in ``configs.py``; torch op registration in ``registration.py``.

``op_set()`` returns the ops ``skiplayers_triton::*`` (CUDA tensors; also CPU tensors when
``TRITON_INTERPRET=1`` was set before triton was imported).
"""

from __future__ import annotations


def interpreted() -> bool:
    """Whether the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` at import), in
    which case the ops are registered for CPU tensors too."""
    from .host import INTERPRETED

    return INTERPRETED


def op_set():
    """The Triton backend as a ``skiplayers.ops.OpSet`` calling ``torch.ops.skiplayers_triton.*``."""
    import torch

    from skiplayers.ops import OP_NAMES, OpSet

    from . import registration  # defines the namespace on first use

    namespace = getattr(torch.ops, registration.NAMESPACE)
    return OpSet("triton", *(getattr(namespace, op).default for op in OP_NAMES))
