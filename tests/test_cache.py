"""SkipCacheLayer owns its block table and both copies of its stored lengths (device ``lengths`` /
``block_table``, host ``host_lengths`` / ``host_block_table``): appending, compaction, dropping the
last slots and batch selection keep them equal, take pages from the cache's pool only where the
stored slots need them and give emptied pages back; ``check_lengths`` says where they differ, and
the model-level hook finds a forward that lets them drift.

The model-level tests (generate, crop, beam search, anchors, layer_mask, early exit) check the
mirrors after every step through ``model_helpers.checking_cache_lengths`` and direct
``check_lengths()`` calls; this file tests the layer and the pool on their own.
"""

from __future__ import annotations

import pytest
import torch

import skiplayers as sk
from cases import cu_seqlens
from model_helpers import checking_cache_lengths, decode_step_inputs
from skiplayers.ops import get_ops
from skiplayers.pages import PagePool, PoolExhausted

H_KV, D = 2, 4
PAGE = 4  # small pages, so that a few rows span several


def rows(counts: list[int], start: int = 0):
    """Packed new rows for ``counts`` rows per sequence: ``k, v [N, H_kv, D]``, ``pos, tag`` int32
    ``[N]`` (positions ``start ..`` per sequence, tag 0), ``cu_seqlens`` int32 ``[B + 1]``, host
    ``counts`` int64 ``[B]``; each row's keys hold its position, so a slot says what it stores."""
    host = torch.tensor(counts, dtype=torch.int64)
    pos = torch.cat([torch.arange(start, start + n, dtype=torch.int32) for n in counts])
    k = pos.float()[:, None, None].expand(-1, H_KV, D).contiguous()
    return k, k.clone(), pos, torch.zeros_like(pos), cu_seqlens(counts, "cpu"), host


def filled(counts: list[int], layers: int = 2, **cache_args) -> sk.SkipCache:
    cache = sk.SkipCache(layers, page_size=PAGE, **cache_args)
    for layer in cache.layers:
        layer.append(*rows(counts), ops=get_ops("torch"))
    return cache


def stored_positions(layer) -> list[list[int]]:
    return [layer.read("pos", b).tolist() for b in range(layer.host_lengths.shape[0])]


def stored_keys_match_positions(layer) -> bool:
    """Every stored slot's K and V hold the slot's position (as ``rows`` wrote them)."""
    return all(torch.equal(layer.read(name, b), layer.read("pos", b).float()[:, None, None].expand(-1, H_KV, D))
               for b in range(layer.host_lengths.shape[0]) for name in ("keys", "values"))


def pages_in_use(cache: sk.SkipCache) -> int:
    return sum(pool.pages_in_use for pool in cache._pools.values())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_append_takes_pages_as_needed_and_moves_both_lengths(backend):
    cache = sk.SkipCache(1, page_size=PAGE)
    layer = cache.layers[0]
    layer.append(*rows([3, 0, 5]), ops=get_ops(backend))
    assert layer.held_pages.tolist() == [1, 0, 2]  # ceil(3 / 4), none for an empty sequence, ceil(5 / 4)
    layer.append(*rows([9, 1, 0], start=10), ops=get_ops(backend))
    assert layer.held_pages.tolist() == [3, 1, 2]
    assert layer.host_lengths.tolist() == [12, 1, 5]
    assert stored_positions(layer) == [[0, 1, 2, *range(10, 19)], [10], [0, 1, 2, 3, 4]]
    assert stored_keys_match_positions(layer)
    pages = layer.pages()
    assert len(set(pages)) == len(pages) == 6 == pages_in_use(cache)  # no page twice
    cache.check_lengths()
    with pytest.raises(ValueError, match="holds 3 sequences, the input has 2"):
        layer.append(*rows([1, 1]), ops=get_ops(backend))


def test_layers_share_one_pool_and_a_grown_pool_keeps_every_page():
    cache = sk.SkipCache(3, page_size=PAGE)
    for i, layer in enumerate(cache.layers):
        layer.append(*rows([1 + 5 * i, 2]), ops=get_ops("cpu"))
    pools = {id(layer.pool) for layer in cache.layers}
    assert len(pools) == 1
    grown_from = cache.layers[0].pool.num_pages
    cache.layers[0].append(*rows([40, 40], start=100), ops=get_ops("cpu"))  # more pages than the pool has
    assert cache.layers[0].pool.num_pages > grown_from
    for layer in cache.layers:
        assert stored_keys_match_positions(layer)
    assert stored_positions(cache.layers[2])[0] == list(range(11))
    cache.check_lengths()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compact_keeps_the_marked_slots_in_order_and_frees_emptied_pages(backend):
    cache = filled([4, 11, 2])
    layer = cache.layers[0]
    width = layer.block_table.shape[1] * PAGE
    keep = torch.zeros(3, width, dtype=torch.bool)
    keep[0, [1, 3]] = True
    keep[1, :] = True  # slots past the stored length are never kept
    keep[2, 0] = True
    before = pages_in_use(cache)
    layer.compact(keep, get_ops(backend))
    assert layer.host_lengths.tolist() == [2, 11, 1]
    assert stored_positions(layer) == [[1, 3], list(range(11)), [0]]
    assert stored_keys_match_positions(layer)
    assert layer.held_pages.tolist() == [1, 3, 1]
    cache.check_lengths()
    keep = torch.zeros(3, width, dtype=torch.bool)
    keep[1, 9] = True
    layer.compact(keep, get_ops(backend))
    assert layer.host_lengths.tolist() == [0, 1, 0] and stored_positions(layer)[1] == [9]
    assert layer.held_pages.tolist() == [0, 1, 0]
    assert pages_in_use(cache) == before - 4  # layer 0 went from 5 pages to 1: the emptied pages went back to the pool
    cache.check_lengths()


def test_a_mostly_free_pool_shrinks_and_the_block_tables_follow():
    cache = filled([40, 3, 29], layers=2)
    ops = get_ops("cpu")
    for layer in cache.layers:  # keep every 8th slot: most pages empty
        keep = torch.zeros(3, layer.block_table.shape[1] * PAGE, dtype=torch.bool)
        keep[:, ::8] = True
        layer.compact(keep, ops)
    expected = [stored_positions(layer) for layer in cache.layers]
    before = cache.pool_nbytes()
    cache.shrink_pools()
    assert cache.pool_nbytes() == cache.nbytes() < before  # only the pages in use are left
    assert [stored_positions(layer) for layer in cache.layers] == expected
    assert all(stored_keys_match_positions(layer) for layer in cache.layers)
    cache.check_lengths()
    cache.layers[0].append(*rows([5, 5, 5], start=100), ops=ops)  # and it grows again from there
    assert stored_positions(cache.layers[0])[1] == [0, 100, 101, 102, 103, 104]
    cache.check_lengths()
    reserved = filled([40, 3], layers=1, max_tokens=20 * PAGE)
    reserved.layers[0].drop_last(torch.tensor([40, 3]))
    reserved.shrink_pools()  # a reserved pool keeps its size
    assert reserved.pool_nbytes() == 20 * PAGE * 2 * H_KV * D * 4


def test_drop_last_frees_emptied_pages_and_batch_selection_copies_only_repeats():
    cache = filled([4, 6, 2])
    layer = cache.layers[1]
    layer.drop_last(torch.tensor([1, 2, 2]))
    assert layer.host_lengths.tolist() == [3, 4, 0] and layer.held_pages.tolist() == [1, 1, 0]
    with pytest.raises(RuntimeError, match="layer 1 holds fewer slots"):
        layer.drop_last(torch.tensor([0, 7, 0]))
    moved = layer.host_block_table[1, 0].item()
    cache.reorder_cache(torch.tensor([1, 1, 0]))  # beam search: repeats allowed
    assert layer.host_lengths.tolist() == [4, 4, 3]
    assert layer.host_block_table[0, 0].item() == moved  # a first selection keeps its pages
    assert layer.host_block_table[1, 0].item() != moved  # a repeat gets a copy of them
    assert stored_positions(layer) == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2]] and stored_keys_match_positions(layer)
    cache.batch_repeat_interleave(2)
    assert layer.host_lengths.tolist() == [4, 4, 4, 4, 3, 3]
    pages = layer.pages()
    assert len(set(pages)) == len(pages)  # every page belongs to one sequence
    cache.batch_select_indices(torch.tensor([4, 0]))
    assert layer.host_lengths.tolist() == [3, 4] and stored_positions(layer) == [[0, 1, 2], [0, 1, 2, 3]]
    assert pages_in_use(cache) == sum(len(layer.pages()) for layer in cache.layers)  # the rest went back
    cache.check_lengths()


@torch.no_grad()
def test_a_call_grows_the_pool_once_and_a_prefill_holds_what_it_stores(model, batch, monkeypatch):
    """The patched forward tells the cache what each layer will store (plan.expected_writes), so a
    pool that must grow grows once per call, not at every layer; a first prefill's pool is the pages
    its layers hold plus a sixteenth (room for the first decode steps)."""
    grown = []
    real_grow = PagePool._grow
    monkeypatch.setattr(PagePool, "_grow", lambda self, n: (grown.append(n), real_grow(self, n)))
    ids, attn, ctx, pos = batch
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=2), backend="cpu"):
        cache = sk.SkipCache(model.config.num_hidden_layers, page_size=PAGE)
        model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, past_key_values=cache)
        assert len(grown) == 1
        held = cache.nbytes() // (PAGE * 2 * 2 * 64 * 4)  # the tiny model's pages: 2 KV heads, D 64, float32
        assert cache.layers[0].pool.num_pages == held + held // 16
        step_ids, step_mask, step_pos = decode_step_inputs(batch)
        for i in range(3 * PAGE):  # steps that take pages at several layers and sequences
            before = len(grown)
            model(step_ids, attention_mask=torch.cat([step_mask, step_mask.new_ones(3, i)], 1),
                  position_ids=step_pos + i, context_mask=ctx, past_key_values=cache)
            assert len(grown) - before <= 1
        assert len(grown) > 1  # the pool did grow while decoding
        cache.check_lengths()


def test_a_reserved_pool_never_grows_and_names_its_budget_when_full():
    cache = filled([4, 4], layers=2, max_tokens=5 * PAGE)  # 5 pages: 2 layers x 2 sequences take 4
    pool = cache.layers[0].pool
    tensors = (pool.keys, pool.values, pool.pos, pool.tag)
    cache.layers[0].reserve(torch.tensor([1, 0]))  # one more page for sequence 0 at layer 0
    assert cache.layers[0].held_pages.tolist() == [2, 1] and pool.free_pages == 0
    assert all(a is b for a, b in zip(tensors, (pool.keys, pool.values, pool.pos, pool.tag)))
    cache.layers[0].append(*rows([1, 0], start=4), ops=get_ops("cpu"))  # within the reserved page
    with pytest.raises(PoolExhausted, match=r"reserved pool is full: 1 more pages .* 0 of 5 are free"):
        cache.layers[1].append(*rows([1, 0], start=4), ops=get_ops("cpu"))
    assert cache.pool_nbytes() == 5 * PAGE * 2 * H_KV * D * 4


def test_memory_follows_what_is_stored():
    """``nbytes`` counts the pages held: the stored slots' bytes plus at most one partly filled page
    per (layer, sequence), however ragged the batch."""
    cache = filled([1, 37, 0, 300], layers=3)
    slot = 2 * H_KV * D * 4
    assert cache.stored_nbytes() == 3 * 338 * slot
    assert cache.stored_nbytes() <= cache.nbytes() <= cache.stored_nbytes() + 3 * 4 * PAGE * slot
    assert cache.nbytes() == 3 * (1 + 10 + 0 + 75) * PAGE * slot


def test_bad_cache_arguments_are_refused():
    for kwargs, message in ((dict(page_size=0), "page_size must be >= 1"),
                            (dict(max_tokens=16, max_bytes=1 << 20), "not both"),
                            (dict(max_tokens=0), "max_tokens must be > 0")):
        with pytest.raises(ValueError, match=message):
            sk.SkipCache(2, **kwargs)
    with pytest.raises(ValueError, match="holds no page"):
        filled([1], max_bytes=8)


def test_the_lengths_cannot_be_rebound_from_outside():
    layer = filled([1]).layers[0]
    for name in ("lengths", "host_lengths", "block_table", "host_block_table"):
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


def test_check_lengths_refuses_a_length_past_the_pages_held_and_a_drifted_block_table():
    cache = filled([4, 6])
    layer = cache.layers[0]
    layer.host_lengths[0] += PAGE
    layer.lengths[0] += PAGE
    with pytest.raises(RuntimeError, match=r"layer 0: .* sequences \[0\]"):
        cache.check_lengths()
    cache = filled([4, 6])
    cache.layers[1].block_table[1, 0] += 1
    with pytest.raises(RuntimeError, match="layer 1: the device block table differs"):
        cache.check_lengths()
    cache = filled([4, 6])
    layer = cache.layers[0]
    layer.host_block_table[1, 0] = layer.host_block_table[0, 0]  # both mirrors: only the page check sees it
    layer.block_table[1, 0] = layer.block_table[0, 0]
    with pytest.raises(RuntimeError, match="layer 0: a page is held twice"):
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
