"""The Triton kernels' own building blocks, below the ops (the ops themselves: tests/test_ops.py):
the visibility predicate and the block tests of ``triton_kernels/visibility.py`` against
``reference.visibility_mask``, run inside a probe kernel; the prefill block plan
(``triton_kernels/block_plan.py``) against a classification computed with the reference predicate,
and its reuse across calls (``launch_plan.py``); what the paged kernels do with bad
metadata when the host value checks are off (as on CUDA tensors by default); and the ahead-of-time
compile check (``skiplayers.aot``) for sm_80 and sm_90.

Without a GPU the probe runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before anything imports triton) on CPU tensors; with a GPU, compiled on CUDA tensors.
"""

from __future__ import annotations

import gc

import pytest
import torch
import triton
import triton.language as tl

import cases
import op_contract
from backends import triton_device
from constants import RULES
from skiplayers import aot, reference
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule, make_tags
from skiplayers.triton_kernels import checks, configs, launch_attention, launch_plan
from skiplayers.triton_kernels.launch_attention import gqa_tiling
from skiplayers.triton_kernels.visibility import (
    key_block_fully_visible,
    key_block_may_be_visible,
    key_visible,
    query_full_summary,
    query_summary,
)

pytestmark = pytest.mark.triton

DEVICE = triton_device()


# --- the predicate and the block test, against reference.visibility_mask ---------------------------


@triton.jit
def _visibility_probe(q_pos_ptr, q_tag_ptr, k_pos_ptr, k_tag_ptr, visible_ptr, may_ptr, full_ptr, rule, num_keys,
                      M: tl.constexpr, N: tl.constexpr, USE_TAGS: tl.constexpr):
    qi = tl.arange(0, M)
    kj = tl.arange(0, N)
    k_valid = kj < num_keys
    q_pos, q_tag = tl.load(q_pos_ptr + qi), tl.load(q_tag_ptr + qi)
    k_pos = tl.load(k_pos_ptr + kj, mask=k_valid, other=0)
    k_tag = tl.load(k_tag_ptr + kj, mask=k_valid, other=0)
    visible = key_visible(rule, q_pos[:, None], q_tag[:, None], k_pos[None, :], k_tag[None, :], USE_TAGS)
    tl.store(visible_ptr + qi[:, None] * N + kj[None, :], (visible & k_valid[None, :]).to(tl.int8))
    q_max_pos, q_min_sentence, q_max_sentence = query_summary(q_pos, q_tag, qi < M, USE_TAGS)
    may = key_block_may_be_visible(rule, q_max_pos, q_min_sentence, q_max_sentence, k_pos, k_tag, k_valid, USE_TAGS)
    tl.store(may_ptr, may.to(tl.int8))
    q_min_pos, q_any_anchor = query_full_summary(q_pos, q_tag, qi < M, USE_TAGS)
    full = key_block_fully_visible(rule, q_min_pos, q_min_sentence, q_max_sentence, q_any_anchor, k_pos, k_tag, k_valid,
                                   USE_TAGS)
    tl.store(full_ptr, full.to(tl.int8))


def _probe(rule, q_pos, q_tag, k_pos, k_tag, use_tags=True, num_keys=None, with_full=False):
    m, n = q_pos.numel(), k_pos.numel()
    visible = torch.empty(m, n, dtype=torch.int8, device=DEVICE)
    may = torch.empty(1, dtype=torch.int8, device=DEVICE)
    full = torch.empty(1, dtype=torch.int8, device=DEVICE)
    t = [x.to(DEVICE) for x in (q_pos, q_tag, k_pos, k_tag)]
    _visibility_probe[(1,)](*t, visible, may, full, rule, n if num_keys is None else num_keys, M=m, N=n,
                            USE_TAGS=use_tags)
    if with_full:
        return visible.bool().cpu(), bool(may.item()), bool(full.item())
    return visible.bool().cpu(), bool(may.item())


def test_predicate_and_block_test_match_reference_on_random_blocks():
    gen = torch.Generator().manual_seed(7)
    ruled_out = called_full = 0
    for trial in range(80):
        rule = RULES[trial % len(RULES)]
        pos, tag = cases.sequence_metadata(96, gen, rule | Rule.ANCHORS, gapped=True)
        if trial % 2:  # scattered rows
            qi = torch.randint(0, 96, (16,), generator=gen)
            kj = torch.randint(0, 96, (16,), generator=gen)
        else:  # contiguous blocks, as the kernels tile them
            qi = torch.randint(0, 80, (1,), generator=gen) + torch.arange(16)
            kj = torch.randint(0, 80, (1,), generator=gen) + torch.arange(16)
        visible, may, full = _probe(rule, pos[qi], tag[qi], pos[kj], tag[kj], with_full=True)
        truth = reference.visibility_mask(rule, pos[qi], tag[qi], pos[kj], tag[kj])
        assert torch.equal(visible, truth), f"predicate differs from reference (rule {rule})"
        assert may or not truth.any(), f"block test ruled out a block with a visible pair (rule {rule})"
        assert not full or truth.all(), f"full-block test called a block with an invisible pair full (rule {rule})"
        ruled_out += not may
        called_full += full
    # untagged kernels: plain causality, whatever the rule
    visible, _ = _probe(Rule.ANCHORS | Rule.HIDE_CONTEXT, pos[qi], tag[qi], pos[kj], tag[kj], use_tags=False)
    assert torch.equal(visible, reference.visibility_mask(0, pos[qi], tag[qi], pos[kj], tag[kj]))
    assert ruled_out > 0, "the block test never skipped a block: it would be sound but useless"
    assert called_full > 0, "the full-block test never held: it would be sound but useless"


@pytest.mark.parametrize(
    "name,rule,k_pos,k_tag",
    [
        ("future keys", 0, torch.arange(40, 56), torch.zeros(16)),
        ("hidden context", Rule.HIDE_CONTEXT, torch.arange(0, 16), torch.ones(16)),
        # queries are in sentence 3; the keys are non-anchor tokens of sentences 0..1
        ("earlier sentences' non-anchors", Rule.ANCHORS, torch.arange(0, 16), (torch.arange(16) // 8) << 3),
        ("padding only", 0, torch.arange(0, 16), torch.zeros(16)),
    ],
)
def test_block_test_rules_out(name, rule, k_pos, k_tag):
    q_pos = torch.arange(20, 36, dtype=torch.int32)
    q_tag = torch.full((16,), 3 << 3, dtype=torch.int32)
    num_keys = 0 if name == "padding only" else 16
    _, may = _probe(rule, q_pos, q_tag, k_pos.to(torch.int32), k_tag.to(torch.int32), num_keys=num_keys)
    assert not may, f"{name}: block should be ruled out"


def test_full_block_test_needs_every_key():
    """All pairs visible, but the block runs past the keys: not full (the mask-free loop would read
    rows that are no keys); with every key present it is full."""
    q_pos = torch.arange(100, 116, dtype=torch.int32)
    k_pos = torch.arange(0, 16, dtype=torch.int32)
    zeros = torch.zeros(16, dtype=torch.int32)
    assert not _probe(0, q_pos, zeros, k_pos, zeros, num_keys=9, with_full=True)[2]
    assert _probe(0, q_pos, zeros, k_pos, zeros, with_full=True)[2]


# --- the prefill block plan, against a classification by the reference predicate ------------------


def _plan_metadata(lengths: list[int], gen: torch.Generator, order: str, sentence_len: int):
    """Positions and tags of a packed batch. ``order``: "monotone" (increasing, with gaps),
    "shuffled" (each sequence's positions permuted) or "random" (arbitrary int32 values, repeats
    allowed). Tags: a context prefix and scattered context tokens, two sinks, sentences of about
    ``sentence_len`` tokens ending in an anchor (so that whole key blocks can be fully visible)."""
    pos, tag = [], []
    for n in lengths:
        p = (torch.randint(1, 3, (n,), generator=gen).cumsum(0) - 1).to(torch.int32)
        if order == "shuffled":
            p = p[torch.randperm(n, generator=gen)]
        elif order == "random":
            p = torch.randint(0, max(1, 2 * n), (n,), generator=gen, dtype=torch.int32)
        context = (torch.arange(n) < n // 4) | (torch.rand(n, generator=gen) < 0.05)
        anchor = torch.rand(n, generator=gen) < 1.0 / sentence_len
        sentence = torch.cumsum(anchor.to(torch.int32), 0) - anchor.to(torch.int32)
        sink = torch.arange(n) < 2
        pos.append(p)
        tag.append(make_tags(context=context, anchor=anchor, sink=sink, sentence=sentence))
    return torch.cat(pos), torch.cat(tag)


def _expected_plan(cu_q, cu_k, q_pos, q_tag, k_pos, k_tag, rule, per_tile, block_n):
    """{virtual tile: facts} for every tile that has queries, from ``reference.visibility_mask``:
    its key rows, the key rows visible to some query of the tile, the starts of its sequence's key
    blocks, those whose pairs are all visible (whole blocks only), and the anchor-handled key rows
    (``visibility.anchor_handled``: under ANCHORS, anchors and sinks of sentences outside the tile's)."""
    tiles = {}
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        for i, first in enumerate(range(q0, q1, per_tile)):
            qs = slice(first, min(first + per_tile, q1))
            vis = reference.visibility_mask(rule, q_pos[qs], q_tag[qs], k_pos[k0:k1], k_tag[k0:k1])
            all_visible = {start for start in range(k0, k1 - block_n + 1, block_n)
                           if vis[:, start - k0 : start - k0 + block_n].all()}
            sentence = q_tag[qs] >> 3
            k_sentence = k_tag[k0:k1] >> 3
            outside = (k_sentence < sentence.min()) | (k_sentence > sentence.max())
            handled = outside & ((k_tag[k0:k1] & 6) != 0) & bool(rule & Rule.ANCHORS)
            tiles[q0 // per_tile + b + i] = dict(
                keys=set(range(k0, k1)), visible={k0 + j for j in vis.any(0).nonzero().flatten().tolist()},
                starts=set(range(k0, k1, block_n)), all_visible=all_visible,
                handled={k0 + j for j in handled.nonzero().flatten().tolist()})
    return tiles


def _check_plan(plan, expected, block_n, exact_full: bool, label: str) -> tuple[int, int]:
    """Asserts the plan against ``expected``: listed blocks are blocks of the sequence, each listed
    once; full blocks are fully visible and hold no anchor-handled key; every visible key is read
    exactly once, from a listed block (if not anchor-handled) or from the tile's range of the anchor
    list (if anchor-handled). Returns (full, partial) blocks listed."""
    counts = plan.counts.cpu()
    full_lists, partial_lists, anchor_rows = plan.full.cpu(), plan.partial.cpu(), plan.anchor_rows.cpu()
    n_full = n_partial = 0
    for tile in range(counts.shape[0]):
        nf, np_, a0, a1 = counts[tile].tolist()
        if tile not in expected:  # a virtual tile past its sequence's last tile
            assert nf == np_ == 0 and a0 == a1, f"{label}: tile {tile} has no queries but lists keys"
            continue
        facts = expected[tile]
        full, partial = full_lists[tile, :nf].tolist(), partial_lists[tile, :np_].tolist()
        where = f"{label}, tile {tile}"
        assert full == sorted(set(full)) and partial == sorted(set(partial)), f"{where}: repeated or unordered blocks"
        assert not set(full) & set(partial), f"{where}: a block listed as full and as partial"
        assert set(full) | set(partial) <= facts["starts"], f"{where}: a listed block is no key block of the sequence"
        assert set(full) <= facts["all_visible"], f"{where}: a block with an invisible pair or a missing key listed as full"
        block_keys = {k for start in full + partial for k in range(start, start + block_n)} & facts["keys"]
        assert not block_keys & facts["handled"] & {k for s in full for k in range(s, s + block_n)}, \
            f"{where}: a full block holds an anchor-handled key"
        from_blocks = block_keys - facts["handled"]
        listed = anchor_rows[a0:a1].tolist() if a1 > a0 else []
        assert len(listed) == len(set(listed)) and set(listed) <= facts["keys"], f"{where}: bad anchor list range"
        from_anchors = set(listed) & facts["handled"]
        assert facts["visible"] <= from_blocks | from_anchors, f"{where}: a visible key is read by no loop"
        if exact_full:  # plain causality: the summary test is exact (max key pos <= min query pos)
            assert set(full) == facts["all_visible"], f"{where}: a fully visible block not listed as full (causal)"
        n_full, n_partial = n_full + nf, n_partial + np_
    return n_full, n_partial


# (query lengths, key lengths or None for the same as the queries: the patched model's prefill);
# empty sequences first, last and between; keys longer than queries (chunked prefill over a prefix).
_PLAN_BATCHES = [
    ([0, 110, 1, 0, 37, 0], None),
    ([64, 0, 97], [200, 5, 97]),
]


@pytest.mark.parametrize("batch,order", [(0, "monotone"), (0, "random"), (1, "shuffled")])
def test_block_plan_matches_reference_classification(batch, order):
    """Every rule (tagged and untagged kernels) at the tile shapes of every prefill configuration, GQA
    groups that change the queries per tile (1, 3 and 8 query heads per KV head in turn, and 40: more
    than a tile has rows, one query per tile, once per case: the interpreter runs each tile's program
    in Python)."""
    gen = torch.Generator().manual_seed(5 + batch)
    q_lengths, k_lengths = _PLAN_BATCHES[batch]
    same = k_lengths is None
    k_lengths = q_lengths if same else k_lengths
    k_pos, k_tag = _plan_metadata(k_lengths, gen, order, sentence_len=40)
    cu_q, cu_k = cases.cu_seqlens(q_lengths, "cpu"), cases.cu_seqlens(k_lengths, "cpu")
    if same:
        q_pos, q_tag = k_pos, k_tag
    else:  # the queries are the last keys of each sequence
        rows = torch.cat([torch.arange(int(cu_k[b + 1]) - n, int(cu_k[b + 1])) for b, n in enumerate(q_lengths)])
        q_pos, q_tag = k_pos[rows], k_tag[rows]
    shapes = sorted({(c.block_m, c.block_n) for arch in (None, 80, 90) for d in (torch.float32, torch.float16)
                     for h in configs.HEAD_DIMS for c in (configs.prefill_config(d, h, arch),)})
    runs = [(shape, (1, 3, 8)[(i + j) % 3], rule, use_tags)
            for i, shape in enumerate(shapes) for j, rule in enumerate(RULES)
            for use_tags in ((True, False) if rule == Rule.CAUSAL else (True,))]
    runs.append((shapes[batch % len(shapes)], 40, Rule.ALL, True))
    totals = [0, 0]
    meta = [t.to(DEVICE) for t in (cu_q, cu_k, q_pos, k_pos, q_tag, k_tag)]
    for (block_m, block_n), group, rule, use_tags in runs:
        per_tile = gqa_tiling(group, 1, block_m)[3]
        plan = launch_plan.compute_block_plan(*meta, use_tags, int(rule), len(q_lengths), block_m, block_n, per_tile)
        assert plan.counts.shape[0] == sum(q_lengths) // per_tile + len(q_lengths)
        expected = _expected_plan(cu_q, cu_k, q_pos, q_tag, k_pos, k_tag, int(rule) if use_tags else 0, per_tile,
                                  block_n)
        label = f"M{block_m} N{block_n} per_tile {per_tile} {rule!r} tags {use_tags}"
        n_full, n_partial = _check_plan(plan, expected, block_n, exact_full=rule == Rule.CAUSAL or not use_tags,
                                        label=label)
        totals[0] += n_full
        totals[1] += n_partial
    assert totals[0] > 0 and totals[1] > 0, "the plan never listed a full (or a partial) block: a useless test case"


def test_block_plan_finds_full_blocks_under_every_rule():
    """Monotone positions, long sentences: the full-block test is not only sound but useful under the
    tag rules too (blocks of earlier anchors, sinks, or the query's own sentence are run mask-free)."""
    gen = torch.Generator().manual_seed(3)
    lengths = [256]
    pos, tag = _plan_metadata(lengths, gen, "monotone", sentence_len=60)
    cu = cases.cu_seqlens(lengths, DEVICE)
    for rule in (Rule.HIDE_CONTEXT, Rule.ANCHORS, Rule.HIDE_CONTEXT | Rule.ANCHORS):
        plan = launch_plan.compute_block_plan(cu, cu, pos.to(DEVICE), pos.to(DEVICE), tag.to(DEVICE), tag.to(DEVICE),
                                              True, int(rule), 1, 32, 16, 32)
        expected = _expected_plan(cu.cpu(), cu.cpu(), pos, tag, pos, tag, int(rule), 32, 16)
        n_full, _ = _check_plan(plan, expected, 16, exact_full=False, label=repr(rule))
        assert n_full > 0, f"{rule!r}: no full block found"


@pytest.mark.parametrize("arch", [80, 90])
def test_prefill_runs_each_architectures_tiles(monkeypatch, arch):
    """The interpreter has no architecture and runs the default tile table; here the launcher is told
    it runs on sm_80 / sm_90, so the tiles of every family (configs._PREFILL_BY_MAJOR) run too: each
    (dtype class, head dim) that some family configures apart, on both families."""
    monkeypatch.setattr(launch_attention, "device_arch", lambda device: arch)
    keys = sorted({key for family in configs._PREFILL_BY_MAJOR.values() for key in family})
    for dtype, head_dim in [(torch.float32 if cls == "fp32" else torch.float16, d) for cls, d in keys]:
        case = cases.make_varlen_attention([70, 0, 45], rule=int(Rule.ALL), dtype=dtype, head_dim=head_dim,
                                           gapped=True, device=DEVICE)
        op_contract.assert_attention_close(_attend(case), case, reference.varlen_attention)


# --- plan reuse across calls (layers), and never a stale plan --------------------------------------


def _plan_case(rule=Rule.ANCHORS):
    case = cases.make_varlen_attention([40, 0, 75], rule=int(rule), gapped=True, device=DEVICE)
    # The patched model's prefill: the very same metadata tensors for queries and keys.
    case["cu_seqlens_k"], case["k_pos"], case["k_tag"] = case["cu_seqlens_q"], case["q_pos"], case["q_tag"]
    return case


def _attend(case):
    return op_contract.call(TRITON, "varlen_attention", case)


def _counts():
    return dict(launch_plan.stats)


def test_block_plan_is_reused_while_the_metadata_is_unchanged():
    launch_plan.clear_plan_cache()
    case = _plan_case()
    before = _counts()
    first = _attend(case)
    second = _attend({**case, "q": case["q"] * 0.5})  # another layer: new q/k/v, the same metadata
    assert launch_plan.stats["computed"] - before["computed"] == 1
    assert launch_plan.stats["reused"] - before["reused"] == 1
    op_contract.assert_attention_close(first, case, reference.varlen_attention)
    op_contract.assert_attention_close(second, {**case, "q": case["q"] * 0.5}, reference.varlen_attention)


def test_block_plans_are_freed_with_their_metadata():
    """The cache holds no metadata tensor: once a forward's metadata is gone, so are its plans (they
    would otherwise keep device memory after the forward)."""
    launch_plan.clear_plan_cache()
    case = _plan_case()
    _attend(case)
    assert len(launch_plan._cache) == 1
    del case
    gc.collect()
    assert len(launch_plan._cache) == 0


@pytest.mark.parametrize("change", ["pos in place", "tag in place", "cu_seqlens in place", "new pos tensor",
                                    "pos through a view", "rule"])
def test_block_plan_is_recomputed_when_the_metadata_changes(change):
    """Each change makes some blocks visible that were not (or the reverse), so a stale plan would
    give a wrong output: the result must match the reference on the changed metadata."""
    launch_plan.clear_plan_cache()
    case = _plan_case()
    _attend(case)
    computed = launch_plan.stats["computed"]
    pos, tag, cu = case["q_pos"], case["q_tag"], case["cu_seqlens_q"]
    if change == "pos in place":
        pos[40:75] += 30  # sequence 2's first 35 tokens move after its last ones: causal blocks change
    elif change == "tag in place":
        tag.copy_(tag & ~7)  # no anchors, sinks or context: other sentences' tokens lose visibility
    elif change == "cu_seqlens in place":
        cu[2] = 60  # the sequences split differently (keys move between sequences)
    elif change == "new pos tensor":
        case = {**case, "q_pos": pos.flip(0).contiguous()}
        case["k_pos"] = case["q_pos"]
    elif change == "pos through a view":
        pos.view(-1, 5)[:, 0] = 0  # every fifth token moves to position 0
    elif change == "rule":
        case = {**case, "rule": int(Rule.HIDE_CONTEXT)}
    out = _attend(case)
    assert launch_plan.stats["computed"] == computed + 1, "changed metadata reused a plan"
    op_contract.assert_attention_close(out, case, reference.varlen_attention)


def test_block_plan_is_not_cached_for_inference_tensors():
    """Inference tensors keep no version counter (an in-place edit cannot be seen): computed each call."""
    launch_plan.clear_plan_cache()
    with torch.inference_mode():
        case = _plan_case()
        computed = launch_plan.stats["computed"]
        _attend(case)
        case["q_pos"][10:20] += 50
        out = _attend(case)
        op_contract.assert_attention_close(out, case, reference.varlen_attention)
    assert launch_plan.stats["computed"] == computed  # neither call went through the cache
    assert not launch_plan._cache


@pytest.mark.cuda
def test_block_plan_in_a_cuda_graph_follows_the_metadata_on_replay():
    """Captured with metadata whose plan is cached, then replayed after an in-place edit of that
    metadata: the graph computes the plan itself (a cached plan would be a stale constant in it)."""
    launch_plan.clear_plan_cache()
    case = _plan_case()
    _attend(case)  # eager: compiles the kernels and caches the plan of these very tensors
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _attend(case)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _attend(case)
    case["q_pos"][40:75] += 30  # the same edit as test_block_plan_is_recomputed_when_the_metadata_changes
    graph.replay()
    torch.cuda.synchronize()
    op_contract.assert_attention_close(out, case, reference.varlen_attention)


# --- paged kernels without the host value checks: bad metadata never leaves the pools ---------------
# A slot whose block table entry is not a page of the pool is no slot (attention: no key; append and
# compaction: neither read nor written); cache lengths are clamped to the block table's slots.

TRITON = sk_ops.get_ops("triton")
_FAR = 2**30  # a position no query reaches: a slot holding it is never visible


@pytest.fixture
def no_value_checks(monkeypatch):
    monkeypatch.setattr(checks, "value_checks_enabled", lambda t: False)


def _bad_pages(case: dict) -> tuple[dict, dict]:
    """(case, expected_case): sequence 1's block table names page -1 and a page past the pool; in
    ``expected_case`` both entries name a spare page whose slots are never visible."""
    bad, good = {**case, "block_table": case["block_table"].clone()}, {**case}
    num_pages = case["k_cache"].shape[0]
    spare = sorted(set(range(num_pages)) - set(case["block_table"].flatten().tolist()))[0]
    bad["block_table"][1, 1], bad["block_table"][1, 3] = -1, num_pages + 5
    good["block_table"] = case["block_table"].clone()
    good["block_table"][1, 1] = good["block_table"][1, 3] = spare
    good["pos_cache"] = case["pos_cache"].clone()
    good["pos_cache"][spare] = _FAR
    return bad, good


@pytest.mark.parametrize("num_splits", [1, 3])
def test_cache_attention_skips_slots_outside_the_pool(no_value_checks, num_splits):
    case = cases.make_cache_attention([30, 70], q_lengths=[1, 2], page_size=8, rule=Rule.ANCHORS, seed=4,
                                      num_splits=num_splits, device=DEVICE)
    bad, good = _bad_pages(case)
    out = op_contract.call(TRITON, "cache_attention", bad)
    op_contract.assert_attention_close(out, good, reference.cache_attention)


def test_cache_attention_clamps_lengths_to_the_block_table(no_value_checks):
    case = cases.make_cache_attention([12, 11], page_size=4, max_pages=3, seed=2, device=DEVICE)
    out = op_contract.call(TRITON, "cache_attention", {**case, "cache_seqlens": case["cache_seqlens"] + 9})
    clamped = {**case, "cache_seqlens": torch.full((2,), 12, dtype=torch.int32, device=DEVICE)}
    op_contract.assert_attention_close(out, clamped, reference.cache_attention)


def test_cache_append_writes_nothing_outside_the_pool(no_value_checks):
    case = cases.make_cache_append([3, 2], [6, 9], page_size=2, device=DEVICE)
    case["block_table"][0, 2] = -1  # slots 4, 5 of sequence 0
    case["block_table"][1, 4] = case["k_cache"].shape[0]  # slots 8, 9 of sequence 1
    case["cache_seqlens"][1] = case["block_table"].shape[1] * 2 - 4  # its last rows fall past the table
    mine = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    op_contract.call(TRITON, "cache_append", mine)
    # The expected pools: the reference's writes of the rows whose slots have a page.
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    cu, table, capacity = case["cu_seqlens"].tolist(), case["block_table"], case["block_table"].shape[1] * 2
    for b, start in enumerate(case["cache_seqlens"].tolist()):
        for i in range(cu[b + 1] - cu[b]):
            slot, row = start + i, cu[b] + i
            page = int(table[b, slot // 2]) if slot < capacity else -1
            if 0 <= page < case["k_cache"].shape[0]:
                for pool, src in (("k_cache", "k"), ("v_cache", "v"), ("pos_cache", "pos"), ("tag_cache", "tag")):
                    expected[pool][page, slot % 2] = case[src][row]
    for pool in ("k_cache", "v_cache", "pos_cache", "tag_cache"):
        assert torch.equal(mine[pool], expected[pool]), f"{pool} differs"


def test_cache_compact_moves_nothing_through_a_missing_page(no_value_checks):
    """Sequence 1's page 1 is missing: its slots are neither read nor written; the other sequences'
    compaction is exact, and no page outside the sequences' pages is touched."""
    case = cases.make_cache_compact([9, 14, 5], page_size=4, keep_fraction=0.5, seed=3, device=DEVICE)
    good = {k: v.clone() for k, v in case.items()}
    mine = {k: v.clone() for k, v in case.items()}
    mine["block_table"][1, 1] = -1
    lengths = op_contract.call(TRITON, "cache_compact", mine)
    ref_lengths = op_contract.call(reference, "cache_compact", good)
    assert torch.equal(lengths, ref_lengths)  # the kept count does not depend on the pages
    for b in (0, 2):
        for pool in ("k_cache", "v_cache", "pos_cache", "tag_cache"):
            n = int(ref_lengths[b])
            assert torch.equal(reference.gather_slots(mine[pool], case["block_table"], b, n),
                               reference.gather_slots(good[pool], case["block_table"], b, n)), f"{pool} {b}"
    owned = torch.zeros(case["k_cache"].shape[0], dtype=torch.bool)
    owned[case["block_table"][case["block_table"] >= 0].long()] = True
    page = int(case["block_table"][1, 1])
    owned[page] = False  # the missing page: nothing may be written to it
    for pool in ("k_cache", "v_cache", "pos_cache", "tag_cache"):
        assert torch.equal(mine[pool][~owned], case[pool][~owned]), f"{pool}: a page outside the sequences was written"


# --- ahead-of-time compilation for sm_80 and sm_90 -----------------------------------------------------


def test_every_kernel_compiles_for_sm80_and_sm90():
    rows = aot.compile_all((80, 90), jobs=2)
    print("\n" + aot.format_table(rows))
    failed = [f"{r.kernel} {r.config} {r.variant} sm_{r.arch}: {r.error or 'shared memory over the limit'}"
              for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
    kernels = {r.kernel for r in rows}
    assert {"prefill_attention_kernel", "decode_attention_kernel", "combine_splits_kernel", "compact_rows_kernel",
            "cache_append_kernel", "cache_compact_kernel"} <= kernels


# --- head dims and launch choices -------------------------------------------------------------------


def test_unsupported_head_dim_refusal_names_every_supported_one():
    case = cases.make_varlen_attention([4, 6], head_dim=80, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"supports head_dim 32, 64, 96, 128 and 256, got 80$"):
        op_contract.call(TRITON, "varlen_attention", case)
    assert configs.HEAD_DIM_REFUSAL.format(80).endswith("got 80")
    assert all(configs.head_pad(d) >= d and configs.head_pad(d) & (configs.head_pad(d) - 1) == 0
               for d in configs.HEAD_DIMS)


def test_key_tiles_divide_the_skip_test_alignment():
    """test_ops' ruled-out-block test poisons SKIP_ALIGN-aligned key ranges, whole blocks of every tile."""
    from test_ops import SKIP_ALIGN

    for dtype in configs.ATTENTION_DTYPES:
        for d in configs.HEAD_DIMS:
            for cfg in (configs.prefill_config(dtype, d), configs.decode_config(dtype, d)):
                assert SKIP_ALIGN % cfg.block_n == 0, (dtype, d, cfg)


@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("capacity", [2048, 4096, 8192, 16384, 32768])
def test_choose_num_splits(monkeypatch, sms, batch, capacity):
    """Shapes only: about two waves of programs, every split at least MIN_SPLIT_SLOTS slots of capacity
    and one key tile, at most MAX_AUTO_SPLITS; one split (no combine pass) once the programs fill the SMs."""
    monkeypatch.setattr(launch_attention, "sm_count", lambda device: sms)
    heads = 8  # KV head programs (e.g. LLaMA-3 8B: 8 KV heads, a GQA group of 4 in one decode tile)
    for block_n in (16, 64, 256):
        splits = launch_attention.choose_num_splits(batch * heads, capacity, block_n, torch.device("cuda"))
        assert 1 <= splits <= launch_attention.MAX_AUTO_SPLITS
        assert splits == 1 or capacity // splits >= max(launch_attention.MIN_SPLIT_SLOTS, block_n)
        waves = batch * heads * splits / sms
        # Enough programs for ~2 waves unless the capacity or the cap on splits stops it.
        limited = splits in (capacity // max(launch_attention.MIN_SPLIT_SLOTS, block_n), launch_attention.MAX_AUTO_SPLITS)
        assert waves >= 2 or limited, (splits, waves)
        assert waves < 2 + batch * heads / sms  # not more than the two waves need
    assert launch_attention.choose_num_splits(sms, 32768, 64, torch.device("cuda")) == 1  # programs fill the SMs
    assert launch_attention.choose_num_splits(1, 300, 64, torch.device("cuda")) == 1  # a short cache: one split


def test_choose_num_splits_examples(monkeypatch):
    monkeypatch.setattr(launch_attention, "sm_count", lambda device: 132)  # H100 SXM
    choose = launch_attention.choose_num_splits
    cuda = torch.device("cuda")
    assert choose(8, 2048, 256, cuda) == 8  # B=1: 2048 / 256 slots
    assert choose(8, 32768, 256, cuda) == 33  # B=1: two waves (264 programs) of ~1000 slots each
    assert choose(64, 2048, 256, cuda) == 5  # B=8: two waves
    assert choose(64, 32768, 16, cuda) == 5
