"""Row subsets of a packed call: ``packing.select_row_sets`` (host-decided sets, used by the layer
routes) must give, subset by subset, what ``packing.drop_rows`` (the backend's compaction kernel,
used at the context-stop layer) gives for the same keep mask, including sequences that keep no
rows, sequences that had none, and subsets that keep nothing or everything."""

from __future__ import annotations

import pytest
import torch

from cases import cu_seqlens
from skiplayers.ops import get_ops
from skiplayers.packing import PackedRows, drop_rows, select_row_sets


def packed_rows(counts: list[int], gen: torch.Generator) -> PackedRows:
    host = torch.tensor(counts, dtype=torch.int64)
    n = int(host.sum())
    return PackedRows(
        index=torch.randperm(4 * n + 1, generator=gen)[:n],
        cu_seqlens=cu_seqlens(counts, "cpu"),
        counts=host,
        pos=torch.randint(0, 1000, (n,), generator=gen, dtype=torch.int32),
        tag=torch.randint(0, 16, (n,), generator=gen, dtype=torch.int32),
    )


@pytest.mark.parametrize("counts", [[1] * 8, [3, 0, 5, 1], [0, 0], [7], [2, 9, 0, 4, 1, 1]], ids=str)
def test_select_row_sets_equals_drop_rows(counts):
    gen = torch.Generator().manual_seed(len(counts) + sum(counts))
    rows = packed_rows(counts, gen)
    n = rows.num_rows
    keep = torch.rand(6, n, generator=gen) < 0.5
    keep[0] = False
    keep[1] = True
    cos = torch.randn(n, 5, generator=gen)
    sin = torch.randn(n, 5, generator=gen)
    subsets = select_row_sets(rows, keep, [cos, sin])
    assert len(subsets) == keep.shape[0]
    ops = get_ops("cpu")
    for k, (sub, index, (sub_cos, sub_sin)) in enumerate(subsets):
        every = torch.arange(n)
        expected, (want_index, want_cos, want_sin) = drop_rows(rows, keep[k], [every, cos, sin], ops)
        assert torch.equal(sub.cu_seqlens, expected.cu_seqlens), k
        assert torch.equal(sub.counts, expected.counts), k
        for name in ("index", "pos", "tag"):
            assert torch.equal(getattr(sub, name), getattr(expected, name)), (k, name)
        assert torch.equal(index, want_index)
        assert torch.equal(sub_cos, want_cos) and torch.equal(sub_sin, want_sin)
        assert sub.cu_seqlens.dtype == torch.int32 and sub.cu_seqlens.is_contiguous()
        assert sub_cos.is_contiguous() and sub.pos.is_contiguous()


def test_select_row_sets_of_no_subsets():
    rows = packed_rows([2, 1], torch.Generator().manual_seed(0))
    assert select_row_sets(rows, torch.zeros(0, rows.num_rows, dtype=torch.bool), []) == []
