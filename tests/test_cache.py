"""SkipCacheLayer owns its buffers and both copies of its stored lengths (device ``lengths``, host
``host_lengths``): appending, compaction, dropping the last slots and batch selection keep the two
equal, ``check_lengths`` says where they differ, and the model-level hook finds a forward that lets
them drift.

The model-level tests (generate, crop, beam search, anchors, layer_mask, early exit) check the
mirrors after every step through ``model_helpers.checking_cache_lengths`` and direct
``check_lengths()`` calls; this file tests the layer on its own.
"""

from __future__ import annotations

import pytest
import torch

import skiplayers as sk
from cases import cu_seqlens
from model_helpers import checking_cache_lengths, decode_step_inputs
from skiplayers.ops import get_ops

H_KV, D = 2, 4


def rows(counts: list[int], start: int = 0):
    """Packed new rows for ``counts`` rows per sequence: ``k, v [N, H_kv, D]``, ``pos, tag`` int32
    ``[N]`` (positions ``start ..`` per sequence, tag 0), ``cu_seqlens`` int32 ``[B + 1]``, host
    ``counts`` int64 ``[B]``; each row's keys hold its position, so a slot says what it stores."""
    host = torch.tensor(counts, dtype=torch.int64)
    pos = torch.cat([torch.arange(start, start + n, dtype=torch.int32) for n in counts])
    k = pos.float()[:, None, None].expand(-1, H_KV, D).contiguous()
    return k, k.clone(), pos, torch.zeros_like(pos), cu_seqlens(counts, "cpu"), host


def filled(counts: list[int], layers: int = 2) -> sk.SkipCache:
    cache = sk.SkipCache(layers)
    for layer in cache.layers:
        layer.append(*rows(counts), ops=get_ops("torch"))
    return cache


def stored_positions(layer) -> list[list[int]]:
    return [layer.pos[b, :n].tolist() for b, n in enumerate(layer.host_lengths.tolist())]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_append_grows_the_buffers_and_moves_both_lengths(backend):
    cache = sk.SkipCache(1)
    layer = cache.layers[0]
    layer.append(*rows([3, 0, 5]), ops=get_ops(backend))
    first = layer.capacity
    layer.append(*rows([first, 1, 0], start=10), ops=get_ops(backend))  # more than the margin: grows
    assert layer.capacity > first
    assert layer.host_lengths.tolist() == [3 + first, 1, 5]
    assert stored_positions(layer)[1] == [10] and stored_positions(layer)[2] == [0, 1, 2, 3, 4]
    assert stored_positions(layer)[0] == [0, 1, 2, *range(10, 10 + first)]  # the old slots survived growth
    cache.check_lengths()
    with pytest.raises(ValueError, match="holds 3 sequences, the input has 2"):
        layer.append(*rows([1, 1]), ops=get_ops(backend))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compact_keeps_the_marked_slots_in_order(backend):
    cache = filled([4, 6, 2])
    layer = cache.layers[0]
    keep = torch.zeros(3, layer.capacity, dtype=torch.bool)
    keep[0, [1, 3]] = True
    keep[1, :] = True  # slots past the stored length are never kept
    keep[2, 0] = True
    layer.compact(keep, get_ops(backend))
    assert layer.host_lengths.tolist() == [2, 6, 1]
    assert stored_positions(layer) == [[1, 3], list(range(6)), [0]]
    cache.check_lengths()
    before = layer.keys
    layer.compact(torch.ones(3, layer.capacity, dtype=torch.bool), get_ops(backend))
    assert layer.keys is before  # nothing dropped: the buffers stay


def test_drop_last_and_batch_selection_keep_the_mirrors_together():
    cache = filled([4, 6, 2])
    layer = cache.layers[1]
    layer.drop_last(torch.tensor([1, 0, 2]))
    assert layer.host_lengths.tolist() == [3, 6, 0]
    with pytest.raises(RuntimeError, match="layer 1 holds fewer slots"):
        layer.drop_last(torch.tensor([0, 7, 0]))
    cache.reorder_cache(torch.tensor([1, 1, 0]))  # beam search: repeats allowed
    assert layer.host_lengths.tolist() == [6, 6, 3]
    cache.batch_repeat_interleave(2)
    assert layer.host_lengths.tolist() == [6, 6, 6, 6, 3, 3]
    cache.batch_select_indices(torch.tensor([4, 0]))
    assert layer.host_lengths.tolist() == [3, 6] and stored_positions(layer) == [[0, 1, 2], list(range(6))]
    cache.check_lengths()


def test_the_lengths_cannot_be_rebound_from_outside():
    layer = filled([1]).layers[0]
    for name in ("lengths", "host_lengths", "pos", "tag"):
        with pytest.raises(AttributeError):
            setattr(layer, name, None)


@pytest.mark.parametrize("mirror", ["host", "device"])
def test_check_lengths_names_the_layer_and_sequences_that_disagree(mirror):
    cache = filled([4, 6, 2], layers=3)
    cache.check_lengths()
    corrupted = cache.layers[2].host_lengths if mirror == "host" else cache.layers[2].lengths
    corrupted[1] -= 1  # in place, as no code may: the check must see it
    with pytest.raises(RuntimeError, match=r"layer 2: stored lengths inconsistent for sequences \[1\]"):
        cache.check_lengths()


def test_check_lengths_refuses_a_length_past_the_capacity():
    cache = filled([4, 6])
    layer = cache.layers[0]
    layer.host_lengths[0] += layer.capacity
    layer.lengths[0] += layer.capacity
    with pytest.raises(RuntimeError, match=r"layer 0: .* sequences \[0\]"):
        cache.check_lengths()


@torch.no_grad()
def test_the_model_level_hook_fails_the_forward_that_lets_the_mirrors_drift(model, batch):
    ids, attn, ctx, pos = batch
    step, step_mask, step_pos = decode_step_inputs(batch)
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=2), backend="cpu"), checking_cache_lengths(model):
        cache = sk.SkipCache(model.config.num_hidden_layers)
        model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, past_key_values=cache)
        cache.layers[3].lengths[0] -= 1  # the device lengths drift; the next step writes from there
        with pytest.raises(RuntimeError, match=r"layer 3: .* sequences \[0\]"):
            model(step, attention_mask=step_mask, position_ids=step_pos, context_mask=ctx, past_key_values=cache)
