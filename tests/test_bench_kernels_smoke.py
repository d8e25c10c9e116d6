"""The kernel benchmark's registry on the CPU (``benchmarks/bench_kernels.py --smoke``): tiny cases,
every implementation that runs on the CPU (our C++ CPU ops, the PyTorch reference, Triton under the
interpreter, SDPA, FlexAttention eagerly).

Checked here against counts and masks built independently of the script, from
``skiplayers.reference.visibility_mask`` on each case's own tensors: the counted work of every case
(visible pairs, bytes), FlexAttention's block mask of every case (element by element, as
FlexAttention applies it: empty blocks skipped, full blocks unmasked, partial blocks masked by the
mask_mod), every implementation's output, and the result files' columns and values. Each check
has a control showing that it can fail."""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` run directly: benchmarks/ is a package of the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_kernels as bench  # noqa: E402
from benchmarks import kernel_cases, kernel_impls  # noqa: E402
from skiplayers import reference  # noqa: E402
from skiplayers.tolerance import attention_error  # noqa: E402


def _triton_interpreted() -> bool:
    """Whether the Triton ops run on CPU tensors here (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    try:
        return importlib.import_module("skiplayers.triton_kernels").interpreted()
    except ImportError:
        return False


# What must run on the CPU, and what must say why it does not.
RUNS_ON_CPU = ("cpu", "ref", "sdpa", "flex", *(("triton",) if _triton_interpreted() else ()))
GPU_ONLY = ("cuda", "varlen_attn", "flash_attn")
METRICS = ("ms", "vs_sdpa", "tflops", "gbps", "flops_frac", "bw_frac", "host_us", "timing", "max_abs_diff",
           "tolerance", "status")
CASES = kernel_cases.smoke_cases()
ENV = kernel_impls.Env(torch.device("cpu"), smoke=True, flex_block=16, flex_compile=False)


def _case(name: str) -> kernel_cases.Case:
    torch.manual_seed(0)
    return dict(CASES)[name]()


def _tags(tag, like):
    return tag if tag is not None else torch.zeros_like(like)


def reference_masks(case: kernel_cases.Case) -> list[torch.Tensor]:
    """Per sequence, bool [queries, keys] of the reference predicate on the case's own tensors."""
    a = case.args
    cu = a["cu_seqlens_q"].tolist()
    q_tag = _tags(a["q_tag"], a["q_pos"])
    masks = []
    for b in range(case.batch):
        rows = slice(cu[b], cu[b + 1])
        if case.kind == "prefill":
            k_pos, k_tag = a["k_pos"][rows], _tags(a["k_tag"], a["k_pos"])[rows]
        else:
            n = int(a["cache_seqlens"][b])
            k_pos = reference.gather_slots(a["pos_cache"], a["block_table"], b, n)
            k_tag = _tags(None, k_pos)
        masks.append(reference.visibility_mask(a["rule"], a["q_pos"][rows], q_tag[rows], k_pos, k_tag))
    return masks


def counted(case: kernel_cases.Case) -> tuple[int, int]:
    """(visible pairs, bytes moved) from the reference masks: q and out once, K and V of every key
    that some query sees once."""
    masks = reference_masks(case)
    pairs = sum(int(m.sum()) for m in masks)
    keys = sum(int(m.any(0).sum()) for m in masks)
    elt = case.args["q"].element_size()
    return pairs, elt * (2 * case.q_rows * case.heads * case.dim + 2 * keys * case.kv_heads * case.dim)


def flex_layout_mask(case: kernel_cases.Case) -> torch.Tensor:
    """bool [B, Q_LEN, KV_LEN] of the reference masks in FlexAttention's layout: prefill one batch of
    all packed rows (block-diagonal); decode a query per sequence over the first max(lengths) slots."""
    masks = reference_masks(case)
    if case.kind == "prefill":
        return torch.block_diag(*masks)[None]
    out = torch.zeros(case.batch, 1, max(case.lengths), dtype=torch.bool)
    for b, m in enumerate(masks):
        out[b, :, : m.shape[1]] = m
    return out


def applied_mask(block_mask) -> torch.Tensor:
    """bool [B, Q_LEN, KV_LEN]: which (query, key) pairs FlexAttention computes under ``block_mask``
    (head 0): pairs in a full block, and pairs in a partial block that its mask_mod lets through;
    nothing in a block listed in neither."""
    from torch.nn.attention.flex_attention import create_mask

    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_mask.BLOCK_SIZE
    batch = block_mask.kv_num_blocks.shape[0]

    def blocks(num, indices):
        dense = torch.zeros(batch, indices.shape[2], -(-kv_len // kv_block), dtype=torch.bool)
        if num is None:
            return dense
        for b in range(batch):
            for i in range(indices.shape[2]):
                dense[b, i, indices[b, 0, i, : int(num[b, 0, i])].long()] = True
        return dense

    def elements(dense):
        return dense.repeat_interleave(q_block, 1).repeat_interleave(kv_block, 2)[:, :q_len, :kv_len]

    partial = elements(blocks(block_mask.kv_num_blocks, block_mask.kv_indices))
    full = elements(blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    mod = create_mask(block_mask.mask_mod, batch, 1, q_len, kv_len, device="cpu")[:, 0]
    return full | (partial & mod)


# --- the counted work ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_counted_work_matches_the_reference_mask(name):
    case = _case(name)
    pairs, nbytes = counted(case)
    assert (case.visible_pairs(), case.bytes_moved()) == (pairs, nbytes)
    assert case.flops() == 4 * case.dim * case.heads * pairs


def test_counted_work_tells_the_forms_apart():
    """Control: the masked and compacted forms of one problem differ in pairs and bytes, and so do
    their independent counts (a count that ignored the context would fail one of them)."""
    masked, compacted = _case("smoke context-stopped masked B=2"), _case("smoke context-stopped compacted B=2")
    assert counted(masked) != counted(compacted)
    causal_pairs = sum(n * (n + 1) // 2 for n, _ in masked.seqs)
    assert masked.visible_pairs() != causal_pairs


# --- FlexAttention's block mask ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_flex_block_mask_is_our_predicate(name):
    case = _case(name)
    built = kernel_impls.flex(case, ENV)  # the block mask the flex column runs with
    expected = flex_layout_mask(case)
    assert tuple(built.block_mask.seq_lengths) == tuple(expected.shape[1:])
    assert torch.equal(applied_mask(built.block_mask), expected)


def test_flex_block_mask_check_catches_wrong_masks():
    """Controls: a plain causal block mask on a context-stopped case, and the right mask_mod with every
    block declared full (FlexAttention then skips the mask_mod), both differ from the reference."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    case = _case("smoke context-stopped masked B=2")
    expected = flex_layout_mask(case)
    n = case.q_rows
    causal = create_block_mask(lambda b, h, q, k: k <= q, 1, None, n, n, device="cpu", BLOCK_SIZE=16)
    assert not torch.equal(applied_mask(causal), expected)

    right = kernel_impls.flex_block_mask(case, 16)
    blocks = -(-n // 16)
    all_full = torch.arange(blocks, dtype=torch.int32).expand(1, 1, blocks, blocks).contiguous()
    count = torch.full((1, 1, blocks), blocks, dtype=torch.int32)
    no_partial = torch.zeros_like(count)
    wrong = BlockMask.from_kv_blocks(no_partial, all_full, count, all_full, BLOCK_SIZE=16,
                                     mask_mod=right.mask_mod, seq_lengths=(n, n))
    assert torch.equal(applied_mask(right), expected)
    assert not torch.equal(applied_mask(wrong), expected)


# --- outputs -------------------------------------------------------------------------------------------


def _truth(case: kernel_cases.Case):
    fn = reference.varlen_attention if case.kind == "prefill" else reference.cache_attention
    return fn(**case.args, compute_dtype=torch.float64), fn(**case.args, compute_dtype=case.dtype)


@pytest.mark.parametrize("name", [name for name, _ in CASES])
def test_every_cpu_implementation_agrees_with_the_reference(name):
    case = _case(name)
    truth, low = _truth(case)
    for impl in RUNS_ON_CPU:
        built = kernel_impls.IMPLEMENTATIONS[impl](case, ENV)
        out = built.packed(built.fn())
        assert out.shape == case.args["q"].shape, impl
        err, bound = attention_error(out, truth, low)
        assert err <= bound, (impl, err, bound)


def test_the_run_marks_a_wrong_output(monkeypatch):
    """Control: an implementation whose output is off is reported ``wrong`` and not timed."""
    case = _case("smoke ragged B=3")
    rows = bench.check_rows(case, None)
    truth = bench.reference_rows(case, rows)
    good = kernel_impls.IMPLEMENTATIONS["ref"]

    def off_by_a_little(case, env):
        built = good(case, env)
        return kernel_impls.Built(lambda: built.fn() + 1e-3)

    monkeypatch.setitem(kernel_impls.IMPLEMENTATIONS, "ref", off_by_a_little)
    result = bench.run_impl("ref", case, ENV, bench.Settings(check_limit=None, repeats=1, host_calls=1), truth, rows)
    assert result["status"].startswith("wrong"), result
    assert "ms" not in result


# --- the whole run and its files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_kernels")
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    result = json.loads((out / "kernels.json").read_text())
    with open(out / "kernels.csv", newline="") as f:
        table = list(csv.DictReader(f))
    return out, result, table


def test_result_files_have_one_row_per_case_and_every_column(smoke_run):
    out, result, table = smoke_run
    assert [r["case"] for r in table] == [name for name, _ in CASES]
    assert [r["case"] for r in result["rows"]] == [name for name, _ in CASES]
    header = list(table[0])
    for column in ("case", "kind", "visible_pairs", "bytes_moved", "gflop", "sdpa_backend", "flex_compiled",
                   "flex_note", "checked_rows"):
        assert column in header
    for impl in ("triton", "cpu", "ref", "sdpa", "flex", *GPU_ONLY):
        for metric in METRICS:
            assert f"{impl}_{metric}" in header, (impl, metric)
    assert header == result["columns"]
    assert (out / "kernels.png").stat().st_size > 0
    assert result["ceilings"]["skipped"] and "smoke" in result["timing"].lower()
    assert not result["skipped_cases"]


def test_result_rows_hold_the_counted_work_and_consistent_rates(smoke_run):
    _, result, _ = smoke_run
    if not torch.cuda.is_available():  # conftest runs Triton under the interpreter there: it must be checked
        assert "triton" in RUNS_ON_CPU
    for row in result["rows"]:
        case = _case(row["case"])
        pairs, nbytes = counted(case)
        assert (row["visible_pairs"], row["bytes_moved"]) == (pairs, nbytes), row["case"]
        assert row["checked_rows"] == case.q_rows
        for impl in RUNS_ON_CPU:
            assert row[f"{impl}_status"] == "ok", (row["case"], impl, row[f"{impl}_status"])
            ms = row[f"{impl}_ms"]
            assert math.isfinite(ms) and ms > 0
            assert row[f"{impl}_tflops"] == pytest.approx(4 * case.dim * case.heads * pairs / ms / 1e9)
            assert row[f"{impl}_gbps"] == pytest.approx(nbytes / ms / 1e6)
            assert row[f"{impl}_vs_sdpa"] == pytest.approx(row["sdpa_ms"] / ms)
            assert row[f"{impl}_max_abs_diff"] <= row[f"{impl}_tolerance"]
            assert row[f"{impl}_host_us"] > 0 and "CPU" in row[f"{impl}_timing"]
            assert row[f"{impl}_flops_frac"] is None  # no ceilings on the CPU run
        for impl in GPU_ONLY:
            assert row[f"{impl}_status"].startswith("skipped: ") and len(row[f"{impl}_status"]) > 12
            assert row[f"{impl}_ms"] is None
        assert row["sdpa_backend"].split()[0] in kernel_impls.SDPA_BACKENDS
        assert row["flex_compiled"] is False and row["flex_note"].startswith("eager")


def test_flex_compiles_per_case_and_says_when_it_did_not(monkeypatch):
    """FlexAttention is compiled for each case's shapes (dynamo reset first), so cases never share
    graphs or the recompile limit. Control: without the reset, with a recompile limit of 1, the second
    shape cannot compile, and ``flex_compiled`` says so. (The "eager" backend of torch.compile keeps
    this fast: dynamo's bookkeeping is the same as under inductor, which compiles for seconds a case.)"""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    env = kernel_impls.Env(torch.device("cpu"), smoke=True, flex_block=16, flex_compile=True, flex_backend="eager")

    def run(name):
        case = _case(name)
        built = kernel_impls.flex(case, env)
        out = built.packed(built.fn())
        if built.after:
            built.after()
        err, bound = attention_error(out, *_truth(case))
        assert err <= bound, (name, err, bound)
        return built.notes

    for name in ("smoke causal T=50", "smoke ragged B=3", "smoke decode ragged B=3"):
        notes = run(name)
        assert notes["flex_compiled"] is True and notes["flex_note"].startswith("compiled"), (name, notes)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)  # the old harness: one compiled flex for all shapes
    notes = run("smoke decode B=1 S=37")
    assert notes["flex_compiled"] is False and "compile failed" in notes["flex_note"], notes


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_why_and_writes_nothing(tmp_path, capsys):
    assert bench.main(["--out", str(tmp_path)]) == 0
    assert "bench_kernels: skipped: no CUDA GPU" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
