"""From Hugging Face's padded ``[B, T]`` inputs to skiplayers' packed ragged rows, and back.

Padding tokens (attention_mask 0) are dropped: they are never computed and never stored. Rows are
packed sequence by sequence, so sequence b owns rows ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .meta import TAG_CONTEXT
from .ops import OpSet


@dataclass
class PackedRows:
    """The tokens of one forward call that are computed, packed.

    Attributes:
        index: int64 ``[N]``, each row's flat index into the ``[B * T]`` input columns.
        cu_seqlens: int32 ``[B + 1]`` on the model's device.
        counts: int64 ``[B]`` on the host (rows per sequence); None while dynamo traces (traced.py).
        pos: int32 ``[N]`` absolute positions; tag: int32 ``[N]`` tag words (``meta.py``).
    """

    index: torch.Tensor
    cu_seqlens: torch.Tensor
    counts: torch.Tensor
    pos: torch.Tensor
    tag: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.index.shape[0]

    @functools.cached_property
    def device_counts(self) -> torch.Tensor:
        """int32 ``[B]`` on the rows' device: rows per sequence (``cu_seqlens.diff()``), computed once
        for all the layers that store these rows."""
        return self.cu_seqlens.diff()

    def is_context(self) -> torch.Tensor:
        return (self.tag & TAG_CONTEXT) != 0

    def to(self, device: torch.device) -> PackedRows:
        """The same rows with the device tensors on ``device`` (``counts`` stays on the host)."""
        return PackedRows(
            self.index.to(device), self.cu_seqlens.to(device), self.counts, self.pos.to(device), self.tag.to(device)
        )


def pack(valid: torch.Tensor, positions: torch.Tensor, tags: torch.Tensor) -> PackedRows:
    """Packs the columns where ``valid`` (bool ``[B, T]``, host) of ``positions`` / ``tags`` (``[B, T]``)."""
    device = positions.device
    counts = valid.sum(dim=1, dtype=torch.int64)
    index = valid.reshape(-1).nonzero().squeeze(1)
    cu = torch.zeros(counts.shape[0] + 1, dtype=torch.int32)
    torch.cumsum(counts, 0, out=cu[1:])
    index_dev = index.to(device)
    return PackedRows(
        index=index_dev,
        cu_seqlens=cu.to(device),
        counts=counts,
        pos=positions.reshape(-1)[index_dev].to(torch.int32),
        tag=tags.reshape(-1)[index_dev].to(torch.int32),
    )


def drop_rows(rows: PackedRows, keep: torch.Tensor, tensors: list[torch.Tensor], ops: OpSet):
    """Drops the rows where ``keep`` (bool ``[N]``, device) is False from ``rows`` and from each of
    ``tensors`` (all ``[N, ...]``), with the backend's compaction kernel. Returns the new
    ``PackedRows`` and the compacted tensors."""
    def compacted_rows(x):
        return ops.compact_rows(x=x, cu_seqlens=rows.cu_seqlens, keep=keep)

    compacted = [compacted_rows(t)[0] for t in tensors]
    index, cu = compacted_rows(rows.index)
    pos = compacted_rows(rows.pos)[0]
    tag = compacted_rows(rows.tag)[0]
    for t in (*compacted, pos, tag):  # the same rows were kept in each: say so to a compiler (unbacked sizes)
        torch._check(t.shape[0] == index.shape[0])
    # Host counts (a device sync) only where the rows carry them: the traced path reads them in its ops.
    counts = cu.diff().cpu().to(torch.int64) if rows.counts is not None else None
    return PackedRows(index, cu, counts, pos, tag), compacted


def select_row_sets(rows: PackedRows, keep: torch.Tensor, tensors: list[torch.Tensor]):
    """Several subsets of ``rows`` at once: subset k holds the rows where ``keep[k]`` (bool
    ``[K, N]``, **host**) is True, with each of ``tensors`` (all ``[N, ...]``, on the rows' device)
    gathered likewise. Returns one ``(PackedRows, index, gathered tensors)`` per subset; ``index``
    (int64 ``[n_k]``, the rows' device) gives the kept rows' indices among the old ones.

    For row sets decided on the host (the layer routes: ``layer_mask``, exits). The counts and
    ``cu_seqlens`` come from ``keep`` and the host counts, so unlike :func:`drop_rows` this reads
    nothing back from the device; and all K subsets cost one ``index_select`` per tensor and one
    host-to-device copy in all (each subset's tensors are views of the combined ones), because on
    CPU the per-op host cost, not the bytes, is what a decode step pays here. Needs ``rows.counts``
    (the eager path)."""
    subsets, batch = keep.shape[0], rows.counts.shape[0]
    sequence_of_row = torch.repeat_interleave(torch.arange(batch), rows.counts)
    which, kept = keep.nonzero().unbind(1)  # ordered by subset, then row
    sizes = keep.sum(dim=1).tolist()
    counts = torch.bincount(which * batch + sequence_of_row[kept], minlength=subsets * batch).view(subsets, batch)
    cu = torch.zeros(subsets, batch + 1, dtype=torch.int32)
    torch.cumsum(counts, 1, out=cu[:, 1:])
    device = rows.index.device
    kept, cu = kept.to(device), cu.to(device)
    indices = kept.split(sizes)
    gathered = [t.index_select(0, kept).split(sizes) for t in (rows.index, rows.pos, rows.tag, *tensors)]
    out = []
    for k in range(subsets):
        flat, pos, tag, *rest = (g[k] for g in gathered)
        out.append((PackedRows(flat, cu[k], counts[k], pos, tag), indices[k], rest))
    return out


def unpack(rows: PackedRows, values: torch.Tensor, batch: int, columns: int, fill: float) -> torch.Tensor:
    """Scatters ``values`` ``[N, ...]`` back to ``[batch, columns, ...]``; other columns get ``fill``."""
    out = values.new_full((batch * columns, *values.shape[1:]), fill)
    out[rows.index] = values
    return out.view(batch, columns, *values.shape[1:])
