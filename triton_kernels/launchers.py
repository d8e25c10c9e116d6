"""The five ops as plain Python functions on tensors: the launchers behind ``skiplayers_triton::*``.

Call these directly to skip the ``torch.ops`` dispatch (e.g. on CPU tensors under
``TRITON_INTERPRET=1``, or to measure the registration's overhead). Arguments are those of the
schemas in ``csrc/skiplayers.cpp``, documented in ``skiplayers/ops.py``.
"""

from __future__ import annotations

from .launch_attention import cache_attention, varlen_attention
from .launch_rows import cache_append, cache_compact, compact_rows

LAUNCHERS = dict(
    varlen_attention=varlen_attention,
    cache_attention=cache_attention,
    compact_rows=compact_rows,
    cache_append=cache_append,
    cache_compact=cache_compact,
)

__all__ = ["LAUNCHERS", "cache_append", "cache_attention", "cache_compact", "compact_rows", "varlen_attention"]
