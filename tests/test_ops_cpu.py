"""The C++ CPU kernels against reference.py (tolerance policy in op_contract.py)."""

from __future__ import annotations

import pytest
import torch

import cases
import op_contract
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule

CPU = sk_ops.get_ops("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
RULES = [0, Rule.HIDE_CONTEXT, Rule.ANCHORS, Rule.HIDE_CONTEXT | Rule.ANCHORS]
HEADS = [(6, 2), (9, 3), (8, 1), (7, 7), (16, 2)]  # GQA ratios 3, 3, 8, 1, 8; odd head counts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("lengths", [[1], [111], [0, 5, 0, 37], [3, 130, 0, 77, 2]])
def test_varlen_attention_ragged(dtype, rule, lengths):
    case = cases.make_varlen_attention(lengths, dtype=dtype, rule=rule, gapped=True, seed=len(lengths) + rule)
    op_contract.check_varlen_attention(CPU, case)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_varlen_attention_gqa_and_head_dims(heads, kv_heads, head_dim):
    case = cases.make_varlen_attention([19, 200], heads=heads, kv_heads=kv_heads, head_dim=head_dim, seed=heads)
    op_contract.check_varlen_attention(CPU, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_attention_long_sequence(dtype):
    case = cases.make_varlen_attention([989], heads=9, kv_heads=3, dtype=dtype, seed=989)
    op_contract.check_varlen_attention(CPU, case)


def test_varlen_attention_noncontiguous_and_untagged():
    case = cases.make_varlen_attention([33, 0, 140], noncontiguous=True, with_tags=False)
    assert not case["q"].is_contiguous()
    op_contract.check_varlen_attention(CPU, case)


@pytest.mark.parametrize("rule", RULES)
def test_varlen_attention_queries_are_a_suffix_of_the_keys(rule):
    case = cases.make_varlen_attention([1, 3, 0, 7], [50, 300, 10, 7], rule=rule, gapped=True, seed=3)
    op_contract.check_varlen_attention(CPU, case)


def test_varlen_attention_hidden_context_gives_zero_rows_when_nothing_is_visible():
    case = cases.make_varlen_attention([4], rule=Rule.HIDE_CONTEXT, seed=1)
    case["k_tag"] = torch.ones_like(case["k_tag"])  # every key is context: nothing visible
    out = CPU.varlen_attention(*[case[k] for k in op_contract._VARLEN_ARGS])
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("num_splits", [0, 1, 3, 7])
def test_cache_attention_decode(dtype, rule, num_splits):
    case = cases.make_cache_attention([1, 0, 150, 700], dtype=dtype, rule=rule, num_splits=num_splits, seed=rule)
    op_contract.check_cache_attention(CPU, case)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_cache_attention_gqa_multi_query(heads, kv_heads):
    case = cases.make_cache_attention([9, 300, 33], q_lengths=[4, 1, 33], heads=heads, kv_heads=kv_heads, seed=heads)
    op_contract.check_cache_attention(CPU, case)


def test_cache_attention_noncontiguous_and_untagged():
    case = cases.make_cache_attention([5, 260], noncontiguous=True, with_tags=False, head_dim=128)
    op_contract.check_cache_attention(CPU, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", [[0], [5], [0, 7, 0, 130, 1]])
def test_compact_rows(dtype, lengths):
    op_contract.check_compact_rows(CPU, cases.make_compact_rows(lengths, dtype=dtype, seed=len(lengths)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_append(dtype):
    case = cases.make_cache_append([0, 3, 10, 0], [5, 0, 7, 1], capacity=17, dtype=dtype, noncontiguous=True)
    op_contract.check_cache_append(CPU, case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("new_capacity", [None, 40])
def test_cache_compact(dtype, new_capacity):
    case = cases.make_cache_compact([0, 12, 30, 3], capacity=30, new_capacity=new_capacity, dtype=dtype)
    op_contract.check_cache_compact(CPU, case)


# --- torch.library.opcheck: schema, fake tensor, autograd registration, dispatch consistency ---

def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_varlen_attention():
    case = cases.make_varlen_attention([3, 0, 9], rule=Rule.ANCHORS)
    _opcheck(torch.ops.skiplayers.varlen_attention.default, tuple(case[k] for k in op_contract._VARLEN_ARGS))


def test_opcheck_cache_attention():
    case = cases.make_cache_attention([4, 9], num_splits=2)
    _opcheck(torch.ops.skiplayers.cache_attention.default, tuple(case[k] for k in op_contract._CACHE_ARGS))


def test_opcheck_compact_rows():
    case = cases.make_compact_rows([2, 5])
    _opcheck(torch.ops.skiplayers.compact_rows.default, (case["x"], case["cu_seqlens"], case["keep"]))


def test_opcheck_cache_append():
    case = cases.make_cache_append([1, 2], [2, 1], capacity=6)
    _opcheck(torch.ops.skiplayers.cache_append.default, tuple(case[k] for k in op_contract._APPEND_ARGS))


def test_opcheck_cache_compact():
    case = cases.make_cache_compact([3, 6], capacity=8)
    _opcheck(torch.ops.skiplayers.cache_compact.default, tuple(case[k] for k in op_contract._COMPACT_ARGS))


# --- clear errors for bad input ---

def _varlen_args(**changes):
    case = cases.make_varlen_attention([4, 6])
    case.update(changes)
    return [case[k] for k in op_contract._VARLEN_ARGS]


@pytest.mark.parametrize(
    "changes,message",
    op_contract.BAD_VARLEN_INPUTS
    + [
        # values the CPU launcher can check on the host
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32)), "non-decreasing"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), "ends at"),
    ],
)
def test_varlen_attention_rejects_bad_input(changes, message):
    with pytest.raises(RuntimeError, match=message):
        CPU.varlen_attention(*_varlen_args(**changes))


def test_cache_append_rejects_overflow():
    case = cases.make_cache_append([4], [3], capacity=6)
    with pytest.raises(RuntimeError, match="capacity 6"):
        CPU.cache_append(*[case[k] for k in op_contract._APPEND_ARGS])


def test_cache_attention_rejects_length_past_capacity():
    case = cases.make_cache_attention([3], capacity=4)
    case["cache_seqlens"] = torch.tensor([9], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside"):
        CPU.cache_attention(*[case[k] for k in op_contract._CACHE_ARGS])


def test_varlen_attention_anchors_with_unordered_sentences():
    """Sentence ids that do not grow along the sequence: the CPU launcher must not use its
    anchor/window plan there, and the result must still follow the predicate."""
    case = cases.make_varlen_attention([60, 150], rule=Rule.ANCHORS, seed=11)
    gen = torch.Generator().manual_seed(1)
    sentence = torch.randint(0, 6, case["k_tag"].shape, generator=gen, dtype=torch.int32)
    case["k_tag"] = (case["k_tag"] & 7) | (sentence << 3)
    case["q_tag"] = case["k_tag"]
    op_contract.check_varlen_attention(CPU, case)
