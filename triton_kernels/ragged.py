"""Index math for packed ragged batches, restated for Triton from ``csrc/include/skiplayers/ragged.h``."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ragged_search(cu_seqlens_ptr, batch, target, divisor, step, search_steps):
    """Largest ``b`` in ``[0, batch)`` with ``cu_seqlens[b] // divisor + b * step <= target``.

    ``target`` may be a scalar or a tensor (one search per element). ``search_steps`` must be at least
    ``batch.bit_length()`` (the launcher passes exactly that). Two uses:

    * ``divisor=1, step=0``: the sequence owning packed row ``target`` (``sequence_of_row``; empty
      sequences never own a row);
    * ``divisor=rows_per_tile, step=1``: the sequence owning *virtual tile* ``target``, where sequence
      ``b``'s tiles are numbered from ``cu_seqlens[b] // rows_per_tile + b``. These ranges never
      overlap (each sequence adds at least its tile count to the start of the next), so a grid of
      ``total_rows // rows_per_tile + batch`` programs covers every tile without a host-side max.
    """
    lo = target * 0
    hi = lo + batch
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        ok = (tl.load(cu_seqlens_ptr + mid) // divisor + mid * step) <= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    return lo


@triton.jit
def split_key_range(length, num_splits, split, BLOCK_N: tl.constexpr):
    """Keys ``[begin, end)`` of piece ``split`` when ``[0, length)`` is cut into ``num_splits`` pieces
    whose boundaries fall on multiples of ``BLOCK_N`` (``skiplayers::split_key_range``)."""
    blocks = tl.cdiv(length, BLOCK_N)
    per_split = tl.cdiv(blocks, num_splits)
    begin = tl.minimum(split * per_split * BLOCK_N, length)
    end = tl.minimum((split + 1) * per_split * BLOCK_N, length)
    return begin, end
