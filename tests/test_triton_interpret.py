"""The Triton backend against reference.py (tolerance policy in op_contract.py).

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before anything imports triton) on CPU tensors, through the registered ``skiplayers_triton::*`` ops
(the interpreter registers them for the CPU key too). With a GPU the same tests run the compiled
kernels on CUDA tensors. Shapes are small: the interpreter runs every program in Python.

Also here: the ahead-of-time compile check (``skiplayers.aot``) for sm_80 and sm_90.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import cases
import op_contract
import skiplayers as sk
from model_helpers import assert_forward_matches_masked, assert_generate_matches_masked, ragged_batch, tiny_llama
from skiplayers import aot, reference
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule, make_tags
from skiplayers.triton_kernels import launchers, registration
from skiplayers.triton_kernels.visibility import key_block_may_be_visible, key_visible, query_summary

pytestmark = pytest.mark.triton

DEVICE = "cpu" if registration.INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1 on a machine without a GPU")
if registration.INTERPRETED and isinstance(tl.standard.max, triton.runtime.JITFunction):
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so the interpreter cannot run "
                       "triton.language's own helpers; set it in the environment (tests/conftest.py does so)")

TRITON = sk_ops.get_ops("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = [0, Rule.HIDE_CONTEXT, Rule.ANCHORS, Rule.HIDE_CONTEXT | Rule.ANCHORS]
# GQA ratios 3, 3, 8, 1, 8, 40 (more heads per KV head than a decode tile has rows); odd head counts
HEADS = [(6, 2), (9, 3), (8, 1), (7, 7), (16, 2), (40, 1)]


def _args(case: dict, names) -> list:
    return [case[k] for k in names]


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
        rule = RULES[trial % 4]
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


# --- varlen_attention (prefill) --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lengths", [[1], [0, 5, 0, 37], [3, 70, 0, 77, 2]])
def test_varlen_attention_ragged(dtype, rule, lengths):
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=rule, gapped=True, seed=len(lengths) + rule,
                                       device=DEVICE)
    op_contract.check_varlen_attention(TRITON, case)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_attention_gqa_and_head_dims(heads, kv_heads, head_dim):
    case = cases.make_varlen_attention([19, 45], heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=heads,
                                       dtype=torch.float16, rule=Rule.ANCHORS, device=DEVICE)
    op_contract.check_varlen_attention(TRITON, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_long_sequence(dtype):
    case = cases.make_varlen_attention([300], heads=9, kv_heads=3, dtype=dtype, seed=300, device=DEVICE)
    op_contract.check_varlen_attention(TRITON, case)


def test_varlen_attention_noncontiguous_and_untagged():
    case = cases.make_varlen_attention([33, 0, 70], noncontiguous=True, with_tags=False, device=DEVICE)
    assert not case["q"].is_contiguous()
    op_contract.check_varlen_attention(TRITON, case)


@pytest.mark.parametrize("rule", RULES)
def test_varlen_attention_queries_are_a_suffix_of_the_keys(rule):
    case = cases.make_varlen_attention([1, 3, 0, 7], [50, 150, 10, 7], rule=rule, gapped=True, seed=3, device=DEVICE)
    op_contract.check_varlen_attention(TRITON, case)


def test_varlen_attention_anchors_with_unordered_sentences():
    """Sentence ids that do not grow along the sequence: block summaries must stay conservative."""
    case = cases.make_varlen_attention([60, 150], rule=Rule.ANCHORS, seed=11, device=DEVICE)
    gen = torch.Generator().manual_seed(1)
    sentence = torch.randint(0, 6, case["k_tag"].shape, generator=gen, dtype=torch.int32).to(DEVICE)
    case["k_tag"] = (case["k_tag"] & 7) | (sentence << 3)
    case["q_tag"] = case["k_tag"]
    op_contract.check_varlen_attention(TRITON, case)


def test_varlen_attention_one_sided_tags():
    case = cases.make_varlen_attention([6, 20], rule=Rule.HIDE_CONTEXT | Rule.ANCHORS, seed=5, device=DEVICE)
    case["q_tag"] = None  # query tags read as zero: sentence 0, not an anchor
    op_contract.check_varlen_attention(TRITON, case)


def test_varlen_attention_hidden_context_gives_zero_rows_when_nothing_is_visible():
    case = cases.make_varlen_attention([4], rule=Rule.HIDE_CONTEXT, seed=1, device=DEVICE)
    case["k_tag"] = torch.ones_like(case["k_tag"])  # every key is context: nothing visible
    out = TRITON.varlen_attention(*_args(case, op_contract._VARLEN_ARGS))
    assert torch.equal(out, torch.zeros_like(out))


def test_varlen_attention_launcher_called_directly():
    case = cases.make_varlen_attention([5, 9], rule=Rule.ANCHORS, device=DEVICE)
    ops = sk_ops.OpSet("launchers", **launchers.LAUNCHERS)
    op_contract.check_varlen_attention(ops, case)


# --- skipped key blocks are neither loaded nor computed ----------------------------------------------
# V rows of blocks that no query can see are set to NaN: had such a block been loaded and multiplied
# by its zero probabilities, NaN would reach the output (0 * NaN = NaN). Block boundaries: every
# configuration's BLOCK_N divides 64 (configs.py), so 64-aligned key ranges are whole blocks.


def _skip_case(kind: str, dtype, decode: bool):
    n_keys, n_new = 200, 8
    pos = torch.arange(n_keys, dtype=torch.int32)
    context = torch.zeros(n_keys, dtype=torch.bool)
    anchor = torch.zeros(n_keys, dtype=torch.bool)
    sentence = torch.zeros(n_keys, dtype=torch.int32)
    if kind == "context":  # keys 0..127 are context, hidden by the rule
        context[:128], rule, poisoned = True, Rule.HIDE_CONTEXT, slice(0, 128)
    elif kind == "anchors":  # sentence 0 = keys 0..127 (anchor 127): queries of sentence 1 skip keys 0..63
        anchor[127], sentence[128:], rule, poisoned = True, 1, Rule.ANCHORS, slice(0, 64)
    else:  # causal: the queries are the first tokens, keys 64.. are all in their future
        rule, poisoned = 0, slice(64, n_keys)
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
    if decode:
        args = dict(q=q, k_cache=k[None], v_cache=v[None], cu_seqlens_q=cu_q,
                    cache_seqlens=torch.tensor([n_keys], dtype=torch.int32), q_pos=pos[queries], pos_cache=pos[None],
                    q_tag=tag[queries], tag_cache=tag[None], rule=rule, scale=0.125, num_splits=2)
        return {k_: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for k_, t in args.items()}, clean[None]
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=torch.tensor([0, n_keys], dtype=torch.int32),
                q_pos=pos[queries], k_pos=pos, q_tag=tag[queries], k_tag=tag, rule=rule, scale=0.125)
    return {k_: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for k_, t in args.items()}, clean


@pytest.mark.parametrize("kind", ["context", "anchors", "causal"])
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ruled_out_key_blocks_are_skipped(kind, decode, dtype):
    case, clean_v = _skip_case(kind, dtype, decode)
    if decode:
        out = TRITON.cache_attention(*_args(case, op_contract._CACHE_ARGS))
        case["v_cache"] = clean_v.to(DEVICE)
        check = op_contract.assert_attention_close
        check(out, case, reference.cache_attention)
    else:
        out = TRITON.varlen_attention(*_args(case, op_contract._VARLEN_ARGS))
        case["v"] = clean_v.to(DEVICE)
        op_contract.assert_attention_close(out, case, reference.varlen_attention)


# --- cache_attention (decode, split-K) -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7])
def test_cache_attention_decode(dtype, rule, num_splits):
    case = cases.make_cache_attention([1, 0, 150, 260], dtype=dtype, rule=rule, num_splits=num_splits, seed=rule,
                                      device=DEVICE)
    op_contract.check_cache_attention(TRITON, case)


def test_cache_attention_does_not_depend_on_num_splits():
    case = cases.make_cache_attention([3, 200, 77], rule=Rule.ANCHORS, seed=2, device=DEVICE)
    outs = []
    for splits in (1, 2, 5, 13):
        case["num_splits"] = splits
        outs.append(TRITON.cache_attention(*_args(case, op_contract._CACHE_ARGS)))
    for out in outs[1:]:  # only floating-point reassociation may differ
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_cache_attention_gqa_multi_query(heads, kv_heads):
    case = cases.make_cache_attention([9, 100, 33], q_lengths=[4, 1, 33], heads=heads, kv_heads=kv_heads, seed=heads,
                                      rule=Rule.HIDE_CONTEXT, num_splits=2, device=DEVICE)
    op_contract.check_cache_attention(TRITON, case)


def test_cache_attention_noncontiguous_and_untagged():
    case = cases.make_cache_attention([5, 130], noncontiguous=True, with_tags=False, head_dim=128, device=DEVICE)
    op_contract.check_cache_attention(TRITON, case)


# --- row ops ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[0], [5], [0, 7, 0, 130, 1]])
def test_compact_rows(dtype, lengths):
    op_contract.check_compact_rows(TRITON, cases.make_compact_rows(lengths, dtype=dtype, seed=len(lengths), device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_compact_rows_other_dtypes_and_vectors(dtype):
    case = cases.make_compact_rows([3, 0, 70], seed=4, device=DEVICE)
    case["x"] = (case["x"] * 10).to(dtype)
    op_contract.check_compact_rows(TRITON, case)
    case["x"] = case["x"][:, 0, 0]  # one value per row
    op_contract.check_compact_rows(TRITON, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_append(dtype):
    case = cases.make_cache_append([0, 3, 10, 0], [5, 0, 7, 1], capacity=17, dtype=dtype, noncontiguous=True,
                                   device=DEVICE)
    op_contract.check_cache_append(TRITON, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_capacity", [None, 40])
def test_cache_compact(dtype, new_capacity):
    case = cases.make_cache_compact([0, 12, 130, 3], capacity=130, new_capacity=new_capacity, dtype=dtype,
                                    device=DEVICE)
    op_contract.check_cache_compact(TRITON, case)


# --- registration: schemas, opcheck, torch.compile -------------------------------------------------


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_schemas_are_the_cpp_schemas(op):
    mine = str(getattr(torch.ops.skiplayers_triton, op).default._schema)
    assert mine == str(getattr(torch.ops.skiplayers, op).default._schema).replace("skiplayers::", "skiplayers_triton::", 1)


def _opcheck_cases():
    v = cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS, device=DEVICE)
    c = cases.make_cache_attention([4, 9], num_splits=2, device=DEVICE)
    r = cases.make_compact_rows([2, 5], device=DEVICE)
    a = cases.make_cache_append([1, 2], [2, 1], capacity=6, device=DEVICE)
    p = cases.make_cache_compact([3, 6], capacity=8, device=DEVICE)
    return dict(
        varlen_attention=_args(v, op_contract._VARLEN_ARGS),
        cache_attention=_args(c, op_contract._CACHE_ARGS),
        compact_rows=[r["x"], r["cu_seqlens"], r["keep"]],
        cache_append=_args(a, op_contract._APPEND_ARGS),
        cache_compact=_args(p, op_contract._COMPACT_ARGS),
    )


@pytest.mark.parametrize("op", sk_ops.OP_NAMES)
def test_opcheck(op):
    torch.library.opcheck(getattr(torch.ops.skiplayers_triton, op).default, tuple(_opcheck_cases()[op]),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_decode_step_under_torch_compile():
    """append + attend, traced by torch.compile (fullgraph): fakes and the in-place op must trace."""
    case = cases.make_cache_attention([5, 40], q_lengths=[1, 1], rule=Rule.ANCHORS, device=DEVICE)
    new_k = torch.randn(2, 2, 64, device=DEVICE)
    new_v = torch.randn(2, 2, 64, device=DEVICE)
    new_pos = case["q_pos"] + 1000
    new_tag = case["q_tag"]
    lens = case["cache_seqlens"]

    def step(k_cache, v_cache, pos_cache, tag_cache):
        torch.ops.skiplayers_triton.cache_append(k_cache, v_cache, pos_cache, tag_cache, new_k, new_v, new_pos, new_tag,
                                                 case["cu_seqlens_q"], lens)
        return torch.ops.skiplayers_triton.cache_attention(
            case["q"], k_cache, v_cache, case["cu_seqlens_q"], lens + 1, new_pos, pos_cache, new_tag, tag_cache,
            Rule.ANCHORS, 0.125, 0)

    buffers = [case[k].clone() for k in ("k_cache", "v_cache", "pos_cache", "tag_cache")]
    expected = step(*[b.clone() for b in buffers])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*buffers)
    torch.testing.assert_close(got, expected)


# --- clear errors for bad input ----------------------------------------------------------------------


def _varlen_args(**changes):
    case = cases.make_varlen_attention([4, 6], device=DEVICE)
    case.update(changes)
    return _args(case, op_contract._VARLEN_ARGS)


@pytest.mark.parametrize(
    "changes,message",
    op_contract.BAD_VARLEN_INPUTS
    + [(dict(q=torch.randn(10, 6, 80), k=torch.randn(10, 2, 80), v=torch.randn(10, 2, 80)), "head_dim 64 and 128")],
)
def test_varlen_attention_rejects_bad_input(changes, message):
    changes = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in changes.items()}
    with pytest.raises(RuntimeError, match=message):
        TRITON.varlen_attention(*_varlen_args(**changes))


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), "ends at"),
    ],
)
def test_varlen_attention_rejects_bad_metadata_values(monkeypatch, changes, message):
    # On CUDA tensors these checks cost a host sync and run only when asked for.
    monkeypatch.setenv("SKIPLAYERS_TRITON_CHECKS", "1")
    changes = {k: v.to(DEVICE) for k, v in changes.items()}
    with pytest.raises(RuntimeError, match=message):
        TRITON.varlen_attention(*_varlen_args(**changes))


@pytest.mark.skipif(DEVICE != "cpu", reason="value checks need host metadata (or SKIPLAYERS_TRITON_CHECKS=1)")
def test_value_errors():
    case = cases.make_cache_append([4], [3], capacity=6)
    with pytest.raises(RuntimeError, match="capacity 6"):
        TRITON.cache_append(*_args(case, op_contract._APPEND_ARGS))
    case = cases.make_cache_attention([3], capacity=4)
    case["cache_seqlens"] = torch.tensor([9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside"):
        TRITON.cache_attention(*_args(case, op_contract._CACHE_ARGS))
    case = cases.make_cache_compact([30], capacity=30, new_capacity=2, keep_fraction=0.9)
    with pytest.raises(RuntimeError, match="new capacity 2"):
        TRITON.cache_compact(*_args(case, op_contract._COMPACT_ARGS))


# --- model level: patch(model, policy, backend="triton") against the masked model ----------------------


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama(device=DEVICE)


@pytest.fixture(scope="module")
def tiny_batch():
    return ragged_batch(device=DEVICE)


def test_triton_op_set_runs_on_this_device():
    sk_ops.check_backend_device("triton", torch.device(DEVICE))  # CPU only under the interpreter
    assert TRITON.name == "triton"
    assert all(getattr(TRITON, op).namespace == "skiplayers_triton" for op in sk_ops.OP_NAMES)


@pytest.mark.parametrize("stop", [None, 0, 2, 4])
@pytest.mark.parametrize("use_cache", [False, True])
def test_model_forward_matches_masked_model(tiny_model, tiny_batch, stop, use_cache):
    assert_forward_matches_masked(tiny_model, sk.SkipPolicy(context_stop_layer=stop), "triton", tiny_batch,
                                  use_cache=use_cache)


@pytest.mark.parametrize("stop", [None, 2])
def test_model_generate_matches_masked_model(tiny_model, tiny_batch, stop):
    assert_generate_matches_masked(tiny_model, sk.SkipPolicy(context_stop_layer=stop), "triton", tiny_batch,
                                   new_tokens=8)


ANCHORS = tuple(range(3, 15))  # as tests/test_anchors.py: sentences of ~8 tokens


@pytest.mark.parametrize("stop,keep_first", [(None, 0), (2, 2)])
def test_model_anchor_cache_matches_ansan_masked_model(tiny_model, tiny_batch, stop, keep_first):
    """AnSAN attention (Rule.ANCHORS) and the anchor-only cache (cache_compact) through the Triton ops."""
    policy = sk.SkipPolicy(context_stop_layer=stop, anchor_token_ids=ANCHORS, anchor_keep_first=keep_first)
    assert_forward_matches_masked(tiny_model, policy, "triton", tiny_batch, use_cache=True)
    assert_generate_matches_masked(tiny_model, policy, "triton", tiny_batch, new_tokens=8)


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
