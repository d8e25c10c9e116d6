"""The Triton kernels' own building blocks, below the ops (the ops themselves: tests/test_ops.py):
the visibility predicate and the block test of ``triton_kernels/visibility.py`` against
``reference.visibility_mask``, run inside a probe kernel; what the paged kernels do with bad
metadata when the host value checks are off (as on CUDA tensors by default); and the ahead-of-time
compile check (``skiplayers.aot``) for sm_80 and sm_90.

Without a GPU the probe runs under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before anything imports triton) on CPU tensors; with a GPU, compiled on CUDA tensors.
"""

from __future__ import annotations

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
from skiplayers.meta import Rule
from skiplayers.triton_kernels import checks, configs, launch_attention
from skiplayers.triton_kernels.visibility import key_block_may_be_visible, key_visible, query_summary

pytestmark = pytest.mark.triton

DEVICE = triton_device()


# --- the predicate and the block test, against reference.visibility_mask ---------------------------


@triton.jit
def _visibility_probe(q_pos_ptr, q_tag_ptr, k_pos_ptr, k_tag_ptr, visible_ptr, may_ptr, rule, num_keys,
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


def _probe(rule, q_pos, q_tag, k_pos, k_tag, use_tags=True, num_keys=None):
    m, n = q_pos.numel(), k_pos.numel()
    visible = torch.empty(m, n, dtype=torch.int8, device=DEVICE)
    may = torch.empty(1, dtype=torch.int8, device=DEVICE)
    t = [x.to(DEVICE) for x in (q_pos, q_tag, k_pos, k_tag)]
    _visibility_probe[(1,)](*t, visible, may, rule, n if num_keys is None else num_keys, M=m, N=n, USE_TAGS=use_tags)
    return visible.bool().cpu(), bool(may.item())


def test_predicate_and_block_test_match_reference_on_random_blocks():
    gen = torch.Generator().manual_seed(7)
    ruled_out = 0
    for trial in range(80):
        rule = RULES[trial % len(RULES)]
        pos, tag = cases.sequence_metadata(96, gen, rule | Rule.ANCHORS, gapped=True)
        if trial % 2:  # scattered rows
            qi = torch.randint(0, 96, (16,), generator=gen)
            kj = torch.randint(0, 96, (16,), generator=gen)
        else:  # contiguous blocks, as the kernels tile them
            qi = torch.randint(0, 80, (1,), generator=gen) + torch.arange(16)
            kj = torch.randint(0, 80, (1,), generator=gen) + torch.arange(16)
        visible, may = _probe(rule, pos[qi], tag[qi], pos[kj], tag[kj])
        truth = reference.visibility_mask(rule, pos[qi], tag[qi], pos[kj], tag[kj])
        assert torch.equal(visible, truth), f"predicate differs from reference (rule {rule})"
        assert may or not truth.any(), f"block test ruled out a block with a visible pair (rule {rule})"
        ruled_out += not may
    # untagged kernels: plain causality, whatever the rule
    visible, _ = _probe(Rule.ANCHORS | Rule.HIDE_CONTEXT, pos[qi], tag[qi], pos[kj], tag[kj], use_tags=False)
    assert torch.equal(visible, reference.visibility_mask(0, pos[qi], tag[qi], pos[kj], tag[kj]))
    assert ruled_out > 0, "the block test never skipped a block: it would be sound but useless"


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
