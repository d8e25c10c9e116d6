"""Every backend's ops against ``skiplayers/reference.py``: odd and ragged sizes, empty sequences, GQA,
each dtype, every rule, the refusals of bad input. Tolerance policy: ``tests/op_contract.py``
(``skiplayers/tolerance.py``); row-moving ops must be exact.

Which backend runs which case comes from the table of ``tests/backends.py`` (its features, head dims,
the value checks it makes, the case sizes it affords): ``cpu`` (the C++ kernels), ``triton`` (the
interpreter on CPU tensors without a GPU; marked ``triton``), ``cuda`` (marked ``cuda``; skipped
without a GPU) and ``torch`` (the reference itself: only where a test checks a property directly).
What only one backend has lives in its own file: ``test_triton_kernels.py``,
``test_triton_registration.py``, ``test_cuda_graphs_and_asserts.py``.
"""

from __future__ import annotations

import pytest
import torch
from sanitized import sanitized

import cases
import op_contract
from backends import CPU, GPU, grid, over_backends, sized, together
from constants import (
    DECODE,
    DECODE_LARGE,
    DTYPES,
    HEAD_DIMS,
    HEADS,
    NUM_SPLITS,
    NUM_SPLITS_LARGE,
    PAGE_SIZES,
    RAGGED,
    RAGGED_LARGE,
    ROWS,
    ROWS_LARGE,
    RULES,
)
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import Rule, make_tags
from skiplayers.tolerance import ATOL

LOW = sized(GPU, torch.bfloat16, torch.float16)  # the low-precision dtypes of cases sized for a GPU
F32_THEN_LOW = [torch.float32, *LOW]


def _on(device, changes: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}


# --- varlen_attention (prefill) ------------------------------------------------------------------


@sanitized("memcheck", dtype=torch.float16)
@over_backends("dtype,rule,lengths", grid(DTYPES, RULES, [*RAGGED, *sized(CPU, *RAGGED_LARGE)]))
def test_varlen_attention_ragged(ops, backend, dtype, rule, lengths):
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=rule, gapped=True, seed=len(lengths) + rule,
                                       device=backend.device)
    op_contract.check_varlen_attention(ops, case)


# Short anchored batches in float16 (the interpreter's share), the longer causal ones in each dtype.
_GQA_SHAPES = [
    together(torch.float16, Rule.ANCHORS, [19, 45]),
    *sized(CPU, together(torch.float32, Rule.CAUSAL, [19, 200])),
    *sized(GPU, together(torch.bfloat16, Rule.CAUSAL, [19, 200]), together(torch.float16, Rule.CAUSAL, [19, 200])),
]


@sanitized("racecheck", dtype=torch.bfloat16)
@over_backends("heads,head_dim,dtype,rule,lengths", grid(HEADS, HEAD_DIMS, _GQA_SHAPES))
def test_varlen_attention_gqa_and_head_dims(ops, backend, heads, head_dim, dtype, rule, lengths):
    case = cases.make_varlen_attention(lengths, heads=heads.q, kv_heads=heads.kv, head_dim=head_dim, dtype=dtype,
                                       rule=rule, seed=heads.q, device=backend.device)
    op_contract.check_varlen_attention(ops, case)


@over_backends("dtype,lengths,head_dim", grid(DTYPES, [[300], *sized(CPU, [989])], [64, *sized(GPU, 128)]))
def test_varlen_attention_long_sequence(ops, backend, dtype, lengths, head_dim):
    case = cases.make_varlen_attention(lengths, heads=9, kv_heads=3, head_dim=head_dim, dtype=dtype, seed=lengths[0],
                                       device=backend.device)
    op_contract.check_varlen_attention(ops, case)


@over_backends("dtype,lengths", grid(F32_THEN_LOW, [[33, 0, 70], *sized(CPU, [33, 0, 140])]))
def test_varlen_attention_noncontiguous_and_untagged(ops, backend, dtype, lengths):
    case = cases.make_varlen_attention(lengths, noncontiguous=True, with_tags=False, dtype=dtype, device=backend.device)
    assert not case["q"].is_contiguous()
    op_contract.check_varlen_attention(ops, case)


@over_backends("rule,dtype,k_lengths", grid(RULES, F32_THEN_LOW, [[50, 150, 10, 7], *sized(CPU, [50, 300, 10, 7])]))
def test_varlen_attention_queries_are_a_suffix_of_the_keys(ops, backend, rule, dtype, k_lengths):
    case = cases.make_varlen_attention([1, 3, 0, 7], k_lengths, rule=rule, gapped=True, dtype=dtype, seed=3,
                                       device=backend.device)
    op_contract.check_varlen_attention(ops, case)


@over_backends("dtype", sized(GPU, *DTYPES))
def test_varlen_attention_many_sequences(ops, backend, dtype):
    # > 32 sequences: the CUDA tile locator walks several warp-sized chunks of cu_seqlens.
    lengths = torch.randint(0, 40, (70,), generator=torch.Generator().manual_seed(70)).tolist()
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=Rule.ANCHORS, gapped=True, seed=70,
                                       device=backend.device)
    op_contract.check_varlen_attention(ops, case)


@over_backends()
def test_varlen_attention_anchors_with_unordered_sentences(ops, backend):
    """Sentence ids that do not grow along the sequence: the CPU launcher must not use its
    anchor/window plan there, block summaries must stay conservative, and the result must still
    follow the predicate."""
    case = cases.make_varlen_attention([60, 150], rule=Rule.ANCHORS, seed=11, device=backend.device)
    gen = torch.Generator().manual_seed(1)
    sentence = torch.randint(0, 6, case["k_tag"].shape, generator=gen, dtype=torch.int32).to(backend.device)
    case["k_tag"] = (case["k_tag"] & 7) | (sentence << 3)
    case["q_tag"] = case["k_tag"]
    op_contract.check_varlen_attention(ops, case)


@over_backends()
def test_varlen_attention_one_sided_tags(ops, backend):
    case = cases.make_varlen_attention([6, 20], rule=Rule.HIDE_CONTEXT | Rule.ANCHORS, seed=5, device=backend.device)
    case["q_tag"] = None  # query tags read as zero: sentence 0, not an anchor
    op_contract.check_varlen_attention(ops, case)


# The reference too: "a query that sees no key outputs zeros" is part of the ops' contract.
@over_backends("lengths,dtype", grid([[4], *sized(CPU, [4, 70])], F32_THEN_LOW), needs=())
def test_varlen_attention_hidden_context_gives_zero_rows_when_nothing_is_visible(ops, backend, lengths, dtype):
    case = cases.make_varlen_attention(lengths, rule=Rule.HIDE_CONTEXT, dtype=dtype, seed=1, device=backend.device)
    case["k_tag"] = torch.ones_like(case["k_tag"])  # every key is context: nothing visible
    out = op_contract.call(ops, "varlen_attention", case)
    assert torch.equal(out, torch.zeros_like(out))


@over_backends("dtype", [torch.float32, torch.float16])
def test_varlen_attention_misaligned_rows(ops, backend, dtype):
    case = cases.make_varlen_attention([17, 40], dtype=dtype, seed=5, device=backend.device)
    q = case["q"]
    flat = torch.empty(q.numel() + 1, dtype=dtype, device=backend.device)
    case["q"] = flat[1:].view(q.shape).copy_(q)  # storage offset of one element: rows not 16-byte aligned
    op_contract.check_varlen_attention(ops, case)


# --- cache_attention (decode, split-K) -----------------------------------------------------------


@sanitized("memcheck", dtype=torch.bfloat16)
@sanitized("racecheck", dtype=torch.float32)
@over_backends("dtype,rule,num_splits,lengths",
               grid(DTYPES, RULES, [*NUM_SPLITS, *sized(GPU, *NUM_SPLITS_LARGE)], [DECODE, *sized(CPU, DECODE_LARGE)]))
def test_cache_attention_decode(ops, backend, dtype, rule, num_splits, lengths):
    case = cases.make_cache_attention(lengths, dtype=dtype, rule=rule, num_splits=num_splits, seed=rule,
                                      device=backend.device)
    op_contract.check_cache_attention(ops, case)


_MULTI_QUERY_SHAPES = [together(Rule.HIDE_CONTEXT, 2, [9, 100, 33]),
                       *sized(CPU, together(Rule.CAUSAL, 0, [9, 300, 33]))]


@over_backends("heads,head_dim,dtype,rule,num_splits,lengths",
               grid(HEADS, [64, *sized(GPU, 128)], F32_THEN_LOW, _MULTI_QUERY_SHAPES))
def test_cache_attention_gqa_multi_query(ops, backend, heads, head_dim, dtype, rule, num_splits, lengths):
    case = cases.make_cache_attention(lengths, q_lengths=[4, 1, 33], heads=heads.q, kv_heads=heads.kv,
                                      head_dim=head_dim, dtype=dtype, rule=rule, num_splits=num_splits, seed=heads.q,
                                      device=backend.device)
    op_contract.check_cache_attention(ops, case)


# Every head dim, one query per sequence: one split (the decode kernel writes the output; in fp32
# and, past the interpreter, bf16) and three (partials, then the combine kernel), so the head-dim
# padding of each path is exercised; caches of
# several key tiles of each configuration (fp32 tiles are small, and slow in the interpreter).
@over_backends("head_dim,dtype,num_splits,lengths",
               grid(HEAD_DIMS, [together(torch.float32, 1, [1, 0, 40, 150]), together(torch.float16, 3, [1, 0, 150, 300]),
                                *sized(CPU, together(torch.bfloat16, 1, [1, 0, 150, 300]))]))
def test_cache_attention_head_dims(ops, backend, head_dim, dtype, num_splits, lengths):
    case = cases.make_cache_attention(lengths, heads=6, kv_heads=2, head_dim=head_dim, dtype=dtype,
                                      rule=Rule.ANCHORS, num_splits=num_splits, seed=head_dim, device=backend.device)
    op_contract.check_cache_attention(ops, case)


# Keys stored in a random order, queries anywhere in their sequence (many early) and a sequence of
# queries over no keys: kernels must compare positions, not rows, and may not stop a query tile's
# loop at the sequence's end. The GPU cases run past 16,384 keys (and 8,192 at head dim 256), so a
# kernel that classifies key blocks a window at a time (the CUDA sm_80 prefill: 256 blocks) refills
# its window.
@over_backends("q_lengths,k_lengths,head_dim,dtype,rule", grid(
    [together([5, 0, 3, 2], [70, 0, 33, 0]),
     *sized(GPU, together([5, 0, 3, 2], [16500, 0, 8300, 0]), together([40, 7], [9000, 20000]))],
    [64, 256], [torch.float16, *sized(CPU, torch.bfloat16, torch.float32)],
    [Rule.CAUSAL, Rule.ANCHORS | Rule.HIDE_CONTEXT]))
def test_varlen_attention_shuffled_keys_and_early_queries(ops, backend, q_lengths, k_lengths, head_dim, dtype, rule):
    case = cases.make_varlen_attention(q_lengths, k_lengths, heads=6, kv_heads=2, head_dim=head_dim, dtype=dtype,
                                       rule=rule, seed=sum(k_lengths), device=backend.device)
    op_contract.check_varlen_attention(ops, cases.shuffle_metadata(case, seed=head_dim))


# K / V as views that repeat one KV head (stride 0 over the heads): legal, and not describable by a
# TMA descriptor (the CUDA sm_90a prefill hands such calls to its sm_80 kernel).
@over_backends("dtype", [torch.float16, *sized(CPU, torch.bfloat16, torch.float32)])
def test_varlen_attention_kv_heads_repeated_by_a_zero_stride(ops, backend, dtype):
    case = cases.make_varlen_attention([7, 0, 40], heads=6, kv_heads=3, head_dim=64, dtype=dtype, seed=11,
                                       device=backend.device)
    for name in ("k", "v"):
        case[name] = case[name][:, :1].expand(-1, 3, -1)
        assert case[name].stride(1) == 0
    op_contract.check_varlen_attention(ops, case)


# A softmax scale of any sign: the kernels that fold the scale into one FMA per score with the row
# max taken before scaling flip Q's sign for a negative scale and zero Q for a zero one (uniform
# attention over the visible keys).
@over_backends("op,scale,dtype", grid(["varlen_attention", "cache_attention"], [-0.3, 0.0],
                                      [torch.float16, *sized(CPU, torch.bfloat16, torch.float32)]))
def test_attention_takes_a_negative_or_zero_scale(ops, backend, op, scale, dtype):
    if op == "varlen_attention":
        case = cases.make_varlen_attention([19, 0, 70], heads=6, kv_heads=2, head_dim=64, dtype=dtype,
                                           rule=Rule.ANCHORS, seed=5, device=backend.device)
    else:
        case = cases.make_cache_attention([1, 0, 150], heads=6, kv_heads=2, head_dim=64, dtype=dtype,
                                          rule=Rule.ANCHORS, num_splits=2, seed=5, device=backend.device)
    case["scale"] = scale
    check = op_contract.check_varlen_attention if op == "varlen_attention" else op_contract.check_cache_attention
    check(ops, case)


@over_backends("dtype,lengths", grid(F32_THEN_LOW, [[5, 130], *sized(CPU, [5, 260])]))
def test_cache_attention_noncontiguous_and_untagged(ops, backend, dtype, lengths):
    case = cases.make_cache_attention(lengths, noncontiguous=True, with_tags=False, head_dim=128, dtype=dtype,
                                      device=backend.device)
    op_contract.check_cache_attention(ops, case)


@over_backends("dtype,num_splits", grid(sized(GPU, *DTYPES), [0, 5]))
def test_cache_attention_many_sequences_and_long_caches(ops, backend, dtype, num_splits):
    gen = torch.Generator().manual_seed(41)
    lengths = torch.randint(0, 3000, (41,), generator=gen).tolist()
    lengths[3] = 0
    case = cases.make_cache_attention(lengths, heads=9, kv_heads=3, dtype=dtype, rule=Rule.HIDE_CONTEXT,
                                      num_splits=num_splits, seed=41, device=backend.device)
    op_contract.check_cache_attention(ops, case)


@over_backends("dtype", [*sized(CPU, torch.float32), *LOW])
def test_cache_attention_strided_cache_views(ops, backend, dtype):
    case = cases.make_cache_attention([40, 300], heads=6, kv_heads=2, dtype=dtype, seed=9, noncontiguous_cache=True,
                                      device=backend.device)
    assert not case["k_cache"].is_contiguous()  # heads strided inside a wider buffer
    op_contract.check_cache_attention(ops, case)


# Page sizes 1 / 16 / 64 with pages shuffled through the pool (tests/cases.page_table), one-token and
# multi-token queries, caches ending inside a page and on a page boundary.
@sanitized("memcheck", dtype=torch.bfloat16)
@over_backends("page_size,dtype,rule,q_lengths", grid(PAGE_SIZES, F32_THEN_LOW, [Rule.CAUSAL, Rule.ANCHORS],
                                                      [[1, 0, 1, 1], [3, 0, 17, 1]]))
def test_cache_attention_page_sizes(ops, backend, page_size, dtype, rule, q_lengths):
    case = cases.make_cache_attention([5, 0, 128, 193], q_lengths=q_lengths, page_size=page_size, dtype=dtype,
                                      rule=rule, num_splits=3, seed=page_size, device=backend.device)
    op_contract.check_cache_attention(ops, case)


@over_backends()
def test_cache_attention_pages_of_one_slot_with_any_slot_stride(ops, backend):
    """Torch gives a dimension of size 1 any stride: with pages of one slot, a slot is a page apart,
    whatever ``k_cache.stride(1)`` says."""
    case = cases.make_cache_attention([5, 9], page_size=1, seed=4, device=backend.device)
    for name in ("k_cache", "v_cache"):
        pool = case[name]
        odd = pool.as_strided(pool.shape, (pool.stride(0), 7, pool.stride(2), 1))  # same memory, odd stride(1)
        assert torch.equal(odd, pool) and odd.stride(1) != pool.stride(0)
        case[name] = odd
    op_contract.check_cache_attention(ops, case)


@over_backends()
def test_cache_attention_shares_pages_between_sequences(ops, backend):
    """Attention only reads pages: two sequences may name the same pages (a shared prompt)."""
    case = cases.make_cache_attention([40, 40, 7], q_lengths=[1, 1, 1], page_size=16, seed=3, device=backend.device)
    case["block_table"][1] = case["block_table"][0]
    case["q_pos"][1] = case["q_pos"][0]
    op_contract.check_cache_attention(ops, case)


# (cache lengths, the split counts to compare): a short batch, and long caches sized for a GPU
_SPLIT_CASES = [together([3, 200, 77], (1, 2, 5, 13)), *sized(GPU, together([2000, 77, 1], (1, 2, 5, 16, 0)))]


@over_backends("dtype,lengths,splits", grid(F32_THEN_LOW, _SPLIT_CASES), needs=("split_k",))
def test_cache_attention_does_not_depend_on_num_splits(ops, backend, dtype, lengths, splits):
    case = cases.make_cache_attention(lengths, dtype=dtype, rule=Rule.ANCHORS, seed=2, device=backend.device)
    outs = []
    for n in splits:
        case["num_splits"] = n
        outs.append(op_contract.call(ops, "cache_attention", case).float())
    for out in outs[1:]:  # only floating-point reassociation may differ
        torch.testing.assert_close(out, outs[0], atol=2 * ATOL[dtype], rtol=0)


# --- skipped key blocks are neither loaded nor computed ------------------------------------------
# V rows of blocks that no query can see are set to NaN: had such a block been loaded and multiplied
# by its zero probabilities, NaN would reach the output (0 * NaN = NaN). Block boundaries: every
# Triton configuration's BLOCK_N divides SKIP_ALIGN (configs.py; test_triton_kernels checks it), so
# SKIP_ALIGN-aligned key ranges are whole blocks.
SKIP_ALIGN = 256


def _skip_case(kind: str, dtype, decode: bool, device):
    a = SKIP_ALIGN
    n_keys, n_new = 2 * a + 72, 8
    pos = torch.arange(n_keys, dtype=torch.int32)
    context = torch.zeros(n_keys, dtype=torch.bool)
    anchor = torch.zeros(n_keys, dtype=torch.bool)
    sentence = torch.zeros(n_keys, dtype=torch.int32)
    if kind == "context":  # keys 0..2a-1 are context, hidden by the rule
        context[:2 * a], rule, poisoned = True, Rule.HIDE_CONTEXT, slice(0, 2 * a)
    elif kind == "anchors":  # sentence 0 = keys 0..2a-1 (anchor 2a-1): queries of sentence 1 skip keys 0..a-1
        anchor[2 * a - 1], sentence[2 * a:], rule, poisoned = True, 1, Rule.ANCHORS, slice(0, a)
    else:  # causal: the queries are the first tokens, keys a.. are all in their future
        rule, poisoned = Rule.CAUSAL, slice(a, n_keys)
    tag = make_tags(context=context, anchor=anchor, sentence=sentence)
    queries = slice(0, n_new) if kind == "causal" else slice(n_keys - n_new, n_keys)
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(n_new, 4, 64, generator=gen).to(dtype)
    k = torch.randn(n_keys, 2, 64, generator=gen).to(dtype)
    v = torch.randn(n_keys, 2, 64, generator=gen).to(dtype)
    clean = v.clone()
    clean[poisoned] = 0
    v[poisoned] = float("nan")
    cu_q = torch.tensor([0, n_new], dtype=torch.int32)
    if decode:  # one sequence in pages of 8 slots, in order
        pages = n_keys // 8
        args = dict(q=q, k_cache=k.view(pages, 8, 2, 64), v_cache=v.view(pages, 8, 2, 64),
                    block_table=torch.arange(pages, dtype=torch.int32)[None], cu_seqlens_q=cu_q,
                    cache_seqlens=torch.tensor([n_keys], dtype=torch.int32), q_pos=pos[queries],
                    pos_cache=pos.view(pages, 8), q_tag=tag[queries], tag_cache=tag.view(pages, 8), rule=rule,
                    scale=0.125, num_splits=2)
        return _on(device, args), clean.view(pages, 8, 2, 64).to(device)
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, n_keys], dtype=torch.int32),
                q_pos=pos[queries], k_pos=pos, q_tag=tag[queries], k_tag=tag, rule=rule, scale=0.125)
    return _on(device, args), clean.to(device)


@over_backends("kind,mode,dtype", grid(["context", "anchors", "causal"], ["prefill", "decode"],
                                       [torch.float32, torch.float16]), needs=("skips_ruled_out_blocks",))
def test_ruled_out_key_blocks_are_skipped(ops, backend, kind, mode, dtype):
    op, value = ("cache_attention", "v_cache") if mode == "decode" else ("varlen_attention", "v")
    case, clean_v = _skip_case(kind, dtype, mode == "decode", backend.device)
    out = op_contract.call(ops, op, case)
    case[value] = clean_v
    op_contract.assert_attention_close(out, case, getattr(reference, op))


# --- row ops -------------------------------------------------------------------------------------


@sanitized("memcheck")
@over_backends("dtype,lengths", grid(DTYPES, [*ROWS, *sized(GPU, *ROWS_LARGE)]))
def test_compact_rows(ops, backend, dtype, lengths):
    op_contract.check_compact_rows(ops, cases.make_compact_rows(lengths, dtype=dtype, seed=len(lengths),
                                                                device=backend.device))


@over_backends("dtype", [torch.int64, torch.bool, torch.int8])
def test_compact_rows_other_dtypes_and_vectors(ops, backend, dtype):
    case = cases.make_compact_rows([3, 0, 70], seed=4, device=backend.device)
    case["x"] = (case["x"] * 10).to(dtype)
    op_contract.check_compact_rows(ops, case)
    case["x"] = case["x"][:, 0, 0]  # one value per row
    op_contract.check_compact_rows(ops, case)


@sanitized("memcheck")
@over_backends("dtype,noncontiguous,page_size", grid(DTYPES, [True, False], [*PAGE_SIZES, 5]))
def test_cache_append(ops, backend, dtype, noncontiguous, page_size):
    case = cases.make_cache_append([0, 3, 10, 0], [5, 0, 7, 1], page_size=page_size, dtype=dtype,
                                   noncontiguous=noncontiguous, device=backend.device)
    op_contract.check_cache_append(ops, case)


@sanitized("memcheck")
@over_backends("dim", [64, 128, 32, 96, 256, 80, 5])  # 5: 10-byte rows, 2-byte copies
def test_cache_append_head_dims(ops, backend, dim):
    case = cases.make_cache_append([2, 0], [1, 3], page_size=2, kv_heads=3, head_dim=dim, dtype=torch.bfloat16,
                                   device=backend.device)
    op_contract.check_cache_append(ops, case)


@sanitized("memcheck")
@over_backends()
def test_cache_append_reads_only_the_pages_it_writes(ops, backend):
    """Block table entries of pages an append does not write are never read: not those of the stored
    slots, nor any of a sequence that appends nothing (they may be anything, e.g. -1)."""
    case = cases.make_cache_append([4, 6], [0, 3], page_size=2, device=backend.device)
    case["block_table"][0, :2] = -1  # sequence 0 appends nothing
    case["block_table"][1, :3] = -1  # sequence 1's stored slots 0..5; it writes slots 6..8 (pages 3, 4)
    op_contract.check_cache_append(ops, case)


@sanitized("memcheck", "racecheck")
@over_backends("dtype,page_size,lengths", grid(DTYPES, [*PAGE_SIZES, 5], [[0, 12, 30, 3], [0, 12, 130, 3]]))
def test_cache_compact(ops, backend, dtype, page_size, lengths):
    case = cases.make_cache_compact(lengths, page_size=page_size, dtype=dtype, seed=page_size, device=backend.device)
    op_contract.check_cache_compact(ops, case)


@sanitized("memcheck", "racecheck")
@over_backends("keep_fraction", [0.0, 1.0])
def test_cache_compact_keeps_nothing_or_everything(ops, backend, keep_fraction):
    case = cases.make_cache_compact([7, 0, 40], page_size=16, keep_fraction=keep_fraction, device=backend.device)
    op_contract.check_cache_compact(ops, case)


@sanitized("memcheck", "racecheck")
@over_backends("", sized(CPU, ()))
def test_cache_compact_long_cache(ops, backend):
    case = cases.make_cache_compact([1000, 0, 777], page_size=16, keep_fraction=0.5, device=backend.device)
    op_contract.check_cache_compact(ops, case)


# --- the contract wrappers of skiplayers.ops (documented defaults, keyword calls) -----------------


@over_backends(needs=())
def test_documented_wrappers_pass_every_argument(ops, backend):
    """``sk.ops.<op>(..., ops=...)`` with its defaults (scale D**-0.5, num_splits 0) equals the op."""
    varlen = cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS, device=backend.device)
    cache = cases.make_cache_attention([4, 9], rule=Rule.HIDE_CONTEXT, device=backend.device)
    for op, case, defaults in (("varlen_attention", varlen, ("scale",)),
                               ("cache_attention", cache, ("scale", "num_splits"))):
        wrapped = getattr(sk_ops, op)(**{k: v for k, v in case.items() if k not in defaults}, ops=ops)
        assert torch.equal(wrapped, op_contract.call(ops, op, case)), f"{op}: the wrapper's call differs"


# --- torch.library.opcheck: schema, fake tensor, autograd registration ---------------------------

_OPCHECK_CASES = {
    "varlen_attention": lambda dtype, dev: cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS, dtype=dtype,
                                                                       device=dev),
    "cache_attention": lambda dtype, dev: cases.make_cache_attention([4, 9], num_splits=2, dtype=dtype, device=dev),
    "compact_rows": lambda dtype, dev: cases.make_compact_rows([2, 5], dtype=dtype, device=dev),
    "cache_append": lambda dtype, dev: cases.make_cache_append([1, 2], [2, 1], dtype=dtype, device=dev),
    "cache_compact": lambda dtype, dev: cases.make_cache_compact([3, 6], dtype=dtype, device=dev),
}


@over_backends("op,dtype", [(op, torch.float32) for op in sk_ops.OP_NAMES]
               + sized(GPU, ("varlen_attention", torch.bfloat16), ("cache_attention", torch.float16)),
               needs=("registered",))
def test_opcheck(ops, backend, op, dtype):
    case = _OPCHECK_CASES[op](dtype, backend.device)
    args = tuple(op_contract.arguments(op, case))
    registered = getattr(getattr(torch.ops, backend.namespace), op).default
    torch.library.opcheck(registered, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


# --- clear errors for bad input ------------------------------------------------------------------


@over_backends("changes,message", op_contract.BAD_VARLEN_INPUTS, needs=("validates",))
def test_varlen_attention_rejects_bad_input(ops, backend, changes, message):
    case = cases.make_varlen_attention([4, 6], device=backend.device)
    case.update(_on(backend.device, changes))
    with pytest.raises(RuntimeError, match=message):
        op_contract.call(ops, "varlen_attention", case)


@over_backends("op,refused_head_dim", [("varlen_attention", 80), ("cache_attention", 80), ("cache_attention", 96)],
               needs=("validates",))
def test_attention_rejects_unsupported_head_dim(ops, backend, op, refused_head_dim):
    make = cases.make_varlen_attention if op == "varlen_attention" else cases.make_cache_attention
    case = make([4, 6], head_dim=refused_head_dim, device=backend.device)
    with pytest.raises(RuntimeError, match=backend.head_dim_refusal.format(refused_head_dim)):
        op_contract.call(ops, op, case)


@over_backends(needs=("refuses_host_tensors",))
def test_varlen_attention_rejects_a_host_tensor(ops, backend):
    case = cases.make_varlen_attention([4, 6], device=backend.device)
    case["k_pos"] = case["k_pos"].cpu()
    with pytest.raises(RuntimeError, match="is on cpu"):
        op_contract.call(ops, "varlen_attention", case)


def _bad_value(check: str, device) -> tuple[str, dict]:
    """(op, case) whose metadata *values* break a rule (the shapes are right)."""
    if check in ("cu_seqlens_q_decreasing", "cu_seqlens_k_short"):
        case = cases.make_varlen_attention([4, 6], device=device)
        name, cu = ("cu_seqlens_q", [0, 6, 4]) if check == "cu_seqlens_q_decreasing" else ("cu_seqlens_k", [0, 4, 9])
        case[name] = torch.tensor(cu, dtype=torch.int32, device=device)
        return "varlen_attention", case
    if check == "append_overflow":  # 4 + 3 slots, a block table of 3 pages of 2
        return "cache_append", cases.make_cache_append([4], [3], page_size=2, max_pages=3, device=device)
    if check == "length_past_capacity":
        case = cases.make_cache_attention([3], page_size=4, max_pages=1, device=device)
        case["cache_seqlens"] = torch.tensor([9], dtype=torch.int32, device=device)
        return "cache_attention", case
    if check == "unassigned_page":  # slot 9 of 20 lies in a page the table does not name
        case = cases.make_cache_compact([20], page_size=4, device=device)
        case["block_table"][0, 2] = -1
        return "cache_compact", case
    case = cases.make_compact_rows([3, 4], device=device)  # rows_cu_seqlens
    case["cu_seqlens"] = torch.tensor([0, 5, 4], dtype=torch.int32, device=device)
    return "compact_rows", case


BAD_VALUES = {  # check -> the message every backend that makes it on the host raises
    "cu_seqlens_q_decreasing": "non-decreasing",
    "cu_seqlens_k_short": "ends at",
    "append_overflow": "block table holds 6 slots",
    "length_past_capacity": "outside",
    "unassigned_page": r"block_table\[0, 2\] = -1 is not a page of the pool",
    "rows_cu_seqlens": "non-decreasing",
}


@over_backends("check", list(BAD_VALUES), needs=("validates",))
def test_rejects_bad_metadata_values(ops, backend, check, monkeypatch):
    # The Triton backend reads CUDA metadata on the host (a sync) only when asked to.
    monkeypatch.setenv("SKIPLAYERS_TRITON_CHECKS", "1")
    op, case = _bad_value(check, backend.device)
    with pytest.raises(RuntimeError, match=BAD_VALUES[check]):
        op_contract.call(ops, op, case)
