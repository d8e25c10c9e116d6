"""Regression tests for what fuzzing found (issue 14): legal calls that crashed the process, error
contracts that differed between backends, and calls that returned garbage silently.

Crashes are run in a child process, so a regression is a failing test, not a dead test run.
Every backend that runs here is checked: ``cpu``, ``torch`` and ``triton`` (interpreter).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import cases
import op_contract
from skiplayers import ops as sk_ops
from skiplayers.meta import Rule

BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def _run_child(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter (after ``import torch, skiplayers``); a signal shows as a
    negative return code instead of killing the test run."""
    prelude = "import torch\nimport skiplayers\nfrom skiplayers import ops as sk_ops\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def _assert_child_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


# --- 1. q_tag absent, k_tag present, anchors on: the CPU anchor plan read q_tag (SIGSEGV) -------------


def test_anchor_rule_without_query_tags_does_not_crash_the_process():
    proc = _run_child("""
        q = k = v = torch.randn(5, 2, 64)
        cu = torch.tensor([0, 5], dtype=torch.int32)
        pos = torch.arange(5, dtype=torch.int32)
        out = torch.ops.skiplayers.varlen_attention(q, k, v, cu, cu, pos, pos, None, torch.zeros(5, dtype=torch.int32),
                                                    2, 0.125)
        print(tuple(out.shape))
    """)
    _assert_child_ok(proc)
    assert "(5, 2, 64)" in proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("missing", ["q_tag", "k_tag", "both"])
@pytest.mark.parametrize("rule", [Rule.ANCHORS, Rule.ANCHORS | Rule.HIDE_CONTEXT])
def test_one_sided_tags_under_anchor_rule_match_reference(backend, missing, rule):
    """Absent tags mean all-zero tags, on every backend (the docstring's contract)."""
    case = cases.make_varlen_attention([7, 0, 40], rule=rule, gapped=True, seed=11)
    for name in (["q_tag", "k_tag"] if missing == "both" else [missing]):
        case[name] = None
    op_contract.check_varlen_attention(sk_ops.get_ops(backend), case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sided_tags_under_anchor_rule_in_cache_attention(backend):
    case = cases.make_cache_attention([30, 9], [3, 1], rule=Rule.ANCHORS, seed=5)
    case["q_tag"] = None
    op_contract.check_cache_attention(sk_ops.get_ops(backend), case)


# --- 2. zero query heads: heads / kv_heads == 0 sized the query tiles (SIGFPE) -------------------------


def test_zero_query_heads_do_not_crash_the_process():
    proc = _run_child("""
        cu = torch.tensor([0, 4], dtype=torch.int32)
        pos = torch.arange(4, dtype=torch.int32)
        q, kv = torch.randn(4, 0, 64), torch.randn(4, 1, 64)
        out = torch.ops.skiplayers.varlen_attention(q, kv, kv, cu, cu, pos, pos, None, None, 0, 0.125)
        cache = torch.randn(3, 2, 1, 64)  # one sequence of 6 slots in 3 pages of 2, shuffled
        table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
        lens = torch.tensor([4], dtype=torch.int32)
        slots = torch.tensor([[2, 3], [4, 5], [0, 1]], dtype=torch.int32)
        out2 = torch.ops.skiplayers.cache_attention(q, cache, cache, table, cu, lens, pos, slots, None, None, 0, 0.125,
                                                    0)
        print(tuple(out.shape), tuple(out2.shape))
    """)
    _assert_child_ok(proc)
    assert "(4, 0, 64) (4, 0, 64)" in proc.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_query_heads_give_an_empty_output(backend):
    ops = sk_ops.get_ops(backend)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    pos = torch.arange(4, dtype=torch.int32)
    q, kv = torch.randn(4, 0, 64), torch.randn(4, 1, 64)
    out = ops.varlen_attention(q, kv, kv, cu, cu, pos, pos, None, None, 0, 0.125)
    assert out.shape == (4, 0, 64)
    cache = torch.randn(3, 2, 1, 64)  # one sequence of 6 slots in 3 pages of 2, shuffled
    table = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    slots = torch.tensor([[2, 3], [4, 5], [0, 1]], dtype=torch.int32)
    out = ops.cache_attention(q, cache, cache, table, cu, torch.tensor([4], dtype=torch.int32), pos, slots, None, None,
                              0, 0.125, 0)
    assert out.shape == (4, 0, 64)


# --- 3. one error contract: cache_seqlens outside [0, max_pages * page_size] ----------------------------


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("bad_length", [7, -1])
def test_cache_compact_refuses_lengths_outside_capacity(backend, bad_length):
    case = cases.make_cache_compact([2, 5], page_size=2, max_pages=3, seed=2)  # block tables of 6 slots
    case["cache_seqlens"] = torch.tensor([2, bad_length], dtype=torch.int32)
    args = [case[k] for k in op_contract._COMPACT_ARGS]
    with pytest.raises(RuntimeError, match=rf"cache_seqlens\[1\] = {bad_length} is outside \[0, 6\]"):
        sk_ops.get_ops(backend).cache_compact(*args)


# --- 4. a meta tensor among CPU inputs routed the call to the fake, which returned garbage -------------


def _with_meta(args: list, index: int) -> list:
    args = list(args)
    args[index] = args[index].to("meta")
    return args


def test_meta_tensor_among_cpu_inputs_is_refused_by_every_op():
    varlen = cases.make_varlen_attention([3, 4])
    cache = cases.make_cache_attention([5, 6], [1, 2])
    append = cases.make_cache_append([2, 3], [1, 0], page_size=2)
    compact = cases.make_cache_compact([2, 5], page_size=2)
    rows = cases.make_compact_rows([3, 4])
    calls = [
        (torch.ops.skiplayers.varlen_attention, varlen, op_contract._VARLEN_ARGS, ["q_pos"]),
        (torch.ops.skiplayers.cache_attention, cache, op_contract._CACHE_ARGS, ["cache_seqlens", "block_table"]),
        (torch.ops.skiplayers.cache_append, append, op_contract._APPEND_ARGS, ["cache_seqlens", "block_table"]),
        (torch.ops.skiplayers.cache_compact, compact, op_contract._COMPACT_ARGS, ["cache_seqlens", "block_table"]),
        (torch.ops.skiplayers.compact_rows, rows, ["x", "cu_seqlens", "keep"], ["keep"]),
    ]
    for op, case, names, on_meta in calls:
        for name in on_meta:
            with pytest.raises(RuntimeError, match="is on meta but"):
                op(*_with_meta([case[k] for k in names], names.index(name)))


def test_all_meta_inputs_still_trace_shapes():
    """The fakes still serve their purpose: every input on ``meta`` gives outputs of the right shape."""
    case = cases.make_varlen_attention([3, 4])
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in (case[k] for k in op_contract._VARLEN_ARGS)]
    out = torch.ops.skiplayers.varlen_attention(*args)
    assert out.device.type == "meta" and out.shape == case["q"].shape
