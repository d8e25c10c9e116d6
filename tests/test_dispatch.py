"""Attention dispatch (``skiplayers/dispatch``): the classifier, the kernels behind it, the tables,
the report, and ``backend="auto"`` at the model level against the slow masked model.

On CPU the shipped table sends every standard pattern to ours (measured faster than SDPA), so the
model-level tests here run ``auto`` with ``Table.always("cpu", "sdpa")``: the standard patterns then
really run on torch's SDPA and the predicate pattern on ours, and both must give the masked model's
result. The test suite runs with ``SKIPLAYERS_VERIFY_DISPATCH=1`` (conftest.py): every call the
classifier calls standard is also checked against the visibility predicate.
"""

from __future__ import annotations

import json

import pytest
import torch

import skiplayers as sk
from model_helpers import (
    FP32_LOGIT_ATOL,
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    computed_columns,
    prefill_and_decode_logits,
    tiny_llama,
)
from skiplayers.dispatch import Pattern, Table, tune, use_table
from skiplayers.dispatch.dispatcher import Dispatcher
from skiplayers.dispatch.kernels import Ours, Sdpa, VarlenAttn
from skiplayers.dispatch.patterns import CallFacts, check_standard, classify, positions_ordered
from skiplayers.dispatch.table import TABLES, band
from skiplayers.meta import Rule, make_tags

ANCHORS = tuple(range(3, 15))  # ~12% of the tiny vocabulary (as in test_anchors.py)
POLICIES = {
    "stop0": sk.SkipPolicy(context_stop_layer=0),
    "stop2": sk.SkipPolicy(context_stop_layer=2),
    "none": sk.SkipPolicy(context_stop_layer=4),
    "anchors": sk.SkipPolicy(anchor_token_ids=ANCHORS),
    "stop2-anchors-sink": sk.SkipPolicy(context_stop_layer=2, anchor_token_ids=ANCHORS, anchor_keep_first=2),
}


@pytest.fixture
def sdpa_for_standard_patterns():
    with use_table(Table.always("cpu", "sdpa")) as table:
        yield table


def calls(model) -> dict:
    return sk.dispatch_report(model).calls


# --- the classifier ---

ORDERED, PLAIN = True, False


@pytest.mark.parametrize("facts, reads_cache, rows, want", [
    (CallFacts(ORDERED, PLAIN), False, 7, Pattern.VARLEN_CAUSAL),
    (CallFacts(ORDERED, PLAIN), True, 1, Pattern.CACHE_DECODE),
    (CallFacts(ORDERED, PLAIN), True, 0, Pattern.CACHE_DECODE),
    (CallFacts(ORDERED, PLAIN), True, 5, Pattern.CACHE_CAUSAL),
    (CallFacts(ORDERED, True), False, 7, Pattern.PREDICATE),  # an anchor among the new rows
    (CallFacts(ORDERED, True), True, 1, Pattern.PREDICATE),  # a fed anchor token
    (CallFacts(False, PLAIN), False, 7, Pattern.PREDICATE),  # positions out of order
    (CallFacts(False, PLAIN), True, 1, Pattern.PREDICATE),
], ids=["varlen", "decode", "decode-empty", "cache-causal", "anchor-prefill", "anchor-decode", "unordered",
        "unordered-decode"])
def test_classify_every_pattern(facts, reads_cache, rows, want):
    pattern, reason = classify(facts, reads_cache, rows)
    assert pattern == want and reason


def test_positions_ordered():
    valid = torch.tensor([[True, True, True], [False, True, True]])
    assert positions_ordered(torch.tensor([[0, 1, 2], [0, 0, 1]]), valid, None)  # padding is ignored
    assert positions_ordered(torch.tensor([[0, 5, 9], [0, 3, 4]]), valid, torch.tensor([-1, 2]))  # gaps are fine
    assert not positions_ordered(torch.tensor([[0, 2, 1], [0, 0, 1]]), valid, None)
    assert not positions_ordered(torch.tensor([[0, 1, 1], [0, 0, 1]]), valid, None)  # a repeated position
    assert not positions_ordered(torch.tensor([[3, 4, 5], [0, 7, 8]]), valid, torch.tensor([2, 7]))  # not past the cache


def test_a_wrong_standard_claim_is_caught():
    """The verifier behind SKIPLAYERS_VERIFY_DISPATCH fails on a call that is not its pattern."""
    pos = torch.arange(4, dtype=torch.int32)
    plain = torch.zeros(4, dtype=torch.int32)
    check_standard(Pattern.VARLEN_CAUSAL, Rule.ANCHORS, pos, plain, pos, plain)  # one sentence: causal
    tags = make_tags(anchor=torch.tensor([False, True, False, False]), sentence=torch.tensor([0, 0, 1, 1]))
    with pytest.raises(RuntimeError, match="not that pattern"):
        check_standard(Pattern.VARLEN_CAUSAL, Rule.ANCHORS, pos, tags, pos, tags)  # token 2 cannot see token 0
    with pytest.raises(RuntimeError, match="not that pattern"):
        check_standard(Pattern.CACHE_DECODE, Rule.CAUSAL, pos[:1], plain[:1], pos, plain)  # keys past the query


# --- the kernels, against the reference (tolerance policy of skiplayers/tolerance.py) ---


@pytest.mark.parametrize("pattern", [p for p in Pattern if p != Pattern.PREDICATE], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compute_each_standard_pattern(pattern, dtype, head_dim):
    """Ragged sequences, an empty one, GQA; SDPA both batched (equal lengths) and per sequence."""
    heads, kv_heads = tune.HEADS[head_dim]
    gen = torch.Generator().manual_seed(1)
    for sizes in (tune.CHECK_VARLEN if pattern == Pattern.VARLEN_CAUSAL else tune.CHECK_CACHE, [19, 19], [9]):
        case = tune.make_case(pattern, sizes, heads, kv_heads, head_dim, dtype, torch.device("cpu"), gen)
        for kernel in (Ours(sk.ops.get_ops("cpu")), Sdpa()):
            assert tune.check(kernel, case) is None, (kernel.name, sizes, tune.check(kernel, case))


def test_standard_kernels_refuse_what_they_cannot_compute():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Sdpa().unsupported(Pattern.PREDICATE, cpu, torch.float32, 64)
    varlen = VarlenAttn()
    assert varlen.unsupported(Pattern.VARLEN_CAUSAL, cpu, torch.bfloat16, 64)  # CUDA only
    assert varlen.unsupported(Pattern.VARLEN_CAUSAL, cuda, torch.float32, 64)  # flash: half precision only
    assert varlen.unsupported(Pattern.PREDICATE, cuda, torch.bfloat16, 64)
    assert varlen.unsupported(Pattern.CACHE_DECODE, cuda, torch.bfloat16, 128) is None  # torch 2.14 has seqused_k


# --- choosing: tables, defaults, the CUDA branch ---


def test_the_shipped_cpu_table_was_measured_and_is_consistent():
    table = Table.load(TABLES / "cpu.json")
    assert table.device == "cpu" and table.entries
    for entry in table.entries.values():
        assert entry["ours_backend"] == "cpu" and "ours" not in entry["wrong"]
        assert entry["kernel"] == min(entry["median_us"], key=entry["median_us"].get)


def test_auto_on_cpu_follows_the_cpu_table():
    dispatcher = Dispatcher(sk.ops.get_ops("cpu"), "auto")
    table = Table.load(TABLES / "cpu.json")
    for entry in table.entries.values():
        kernel, reason = dispatcher.choose(Pattern(entry["pattern"]), torch.device("cpu"),
                                           getattr(torch, entry["dtype"]), entry["head_dim"], entry["band"])
        assert kernel.name == entry["kernel"] and "measured on cpu" in reason
    kernel, reason = dispatcher.choose(Pattern.VARLEN_CAUSAL, torch.device("cpu"), torch.float16, 96, "xl")
    assert kernel.name == "ours" and "not measured" in reason


def test_the_cuda_branch_of_the_decision():
    """What auto picks on a GPU, decided without one (the kernels run in test_dispatch_cuda.py)."""
    cuda = torch.device("cuda")
    auto = Dispatcher(sk.ops.get_ops("cpu"), "auto")  # the ops only name "ours" here; nothing runs
    decide = auto._decide
    assert decide(Pattern.VARLEN_CAUSAL, cuda, torch.bfloat16, 128, "l", None, None)[0].name == "varlen_attn"
    assert decide(Pattern.VARLEN_CAUSAL, cuda, torch.float32, 64, "s", None, None)[0].name == "sdpa"  # flash: no fp32
    # Over the paged cache: flash reads pages of a multiple of 256 slots only; else ours reads the
    # pages in place (SDPA would gather them at every call).
    assert decide(Pattern.CACHE_DECODE, cuda, torch.float16, 64, "s", None, 256)[0].name == "varlen_attn"
    kernel, reason = decide(Pattern.CACHE_DECODE, cuda, torch.float16, 64, "s", None, 16)
    assert kernel.name == "ours" and "cannot read its pages" in reason
    assert decide(Pattern.CACHE_CAUSAL, cuda, torch.float32, 64, "s", None, 256)[0].name == "ours"  # flash: no fp32
    assert decide(Pattern.PREDICATE, cuda, torch.bfloat16, 128, "l", None, 16)[0].name == "ours"
    entry = dict(pattern="varlen_causal", dtype="bfloat16", head_dim=128, band="l", kernel="ours",
                 ours_backend="cpu", median_us={"ours": 10.0, "sdpa": 30.0, "varlen_attn": 20.0})
    measured = Table("sm_90", {Table.key("varlen_causal", "bfloat16", 128, "l"): entry}, source="test")
    kernel, reason = decide(Pattern.VARLEN_CAUSAL, cuda, torch.bfloat16, 128, "l", measured, None)
    assert kernel.name == "ours" and "10 µs" in reason
    entry["ours_backend"] = "cuda"  # measured with our CUDA kernels, this model would run others: not comparable
    assert decide(Pattern.VARLEN_CAUSAL, cuda, torch.bfloat16, 128, "l", measured, None)[0].name == "varlen_attn"
    forced = Dispatcher(sk.ops.get_ops("cpu"), "cpu")
    kernel, reason = forced._decide(Pattern.VARLEN_CAUSAL, cuda, torch.bfloat16, 128, "l", measured, None)
    assert kernel.name == "ours" and "forces" in reason


def test_a_table_from_the_environment(tmp_path, monkeypatch):
    entries = [dict(pattern="cache_decode", dtype="float32", head_dim=64, band=b, kernel="sdpa", ours_backend="cpu",
                    median_us={"sdpa": 1.0, "ours": 2.0}, wrong={}, unsupported={}) for b in ("s", "m")]
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"device": "cpu", "entries": entries}))
    monkeypatch.setenv("SKIPLAYERS_DISPATCH_TABLE", str(path))
    kernel, reason = Dispatcher(sk.ops.get_ops("cpu"), "auto").choose(
        Pattern.CACHE_DECODE, torch.device("cpu"), torch.float32, 64, band(100))
    assert kernel.name == "sdpa" and "1 µs" in reason


def test_tune_measures_and_writes_a_table(tmp_path):
    out = tmp_path / "cpu.json"
    assert tune.main(["--device", "cpu", "--head-dims", "64", "--dtypes", "float32", "--bands", "s",
                      "--repeats", "1", "--out", str(out)]) == 0
    table = Table.load(out)
    assert {key[0] for key in table.entries} == {"varlen_causal", "cache_decode", "cache_causal"}
    for entry in table.entries.values():
        assert set(entry["median_us"]) == {"ours", "sdpa"} and "varlen_attn" in entry["unsupported"]
        assert all(t > 0 for t in entry["median_us"].values())


# --- the model: auto through torch's kernels equals the masked model ---


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("use_cache", [False, True])
def test_auto_forward_matches_masked_model(model, batch, policy, use_cache, sdpa_for_standard_patterns):
    assert_forward_matches_masked(model, policy, "auto", batch, use_cache=use_cache)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_auto_generate_matches_masked_model(model, batch, policy, sdpa_for_standard_patterns):
    assert_generate_matches_masked(model, policy, "auto", batch, new_tokens=8)


@torch.no_grad()
def test_the_patterns_that_run_where(model, batch, sdpa_for_standard_patterns):
    """Context stop: prefill and decode are standard (SDPA); anchors: the prompts hold anchors
    (predicate, ours), decode steps whose token is no anchor are standard."""
    ids, attn, ctx, _ = batch
    with sk.patched(model, POLICIES["stop2"]):
        model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=4, do_sample=False)
        assert calls(model) == {("varlen_causal", "sdpa"): 4, ("cache_decode", "sdpa"): 3 * 4}
    with sk.patched(model, POLICIES["anchors"]):
        out = model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
        ran = calls(model)
    new = out[:, ids.shape[1]:-1]  # the tokens fed in decode steps
    anchor_steps = sum(bool(torch.isin(new[:, s], torch.tensor(ANCHORS)).any()) for s in range(new.shape[1]))
    assert ran[("predicate", "ours")] == 4 * (1 + anchor_steps)
    assert ran.get(("cache_decode", "sdpa"), 0) == 4 * (new.shape[1] - anchor_steps)


@torch.no_grad()
def test_a_later_turn_over_the_cache_matches_the_masked_model(model, batch, sdpa_for_standard_patterns):
    """The second turn's rows attend to the cache and to each other (cache_causal)."""
    ids, attn, ctx, pos = batch
    policy = POLICIES["stop2"]
    split = 17  # every sequence's context ends before column 17: the second turn is query only
    assert not ctx[:, split:].any()
    truth = sk.masked_forward(model, ids, attn, ctx, policy, pos)
    with sk.patched(model, policy):
        cache = sk.SkipCache(4)
        model(ids[:, :split], attention_mask=attn[:, :split], context_mask=ctx[:, :split], past_key_values=cache)
        second = model(ids[:, split:], attention_mask=attn, context_mask=ctx, past_key_values=cache).logits
        assert calls(model)[("cache_causal", "sdpa")] == 4
    err = (second - truth[:, split:]).abs().max().item()
    assert err <= FP32_LOGIT_ATOL


@torch.no_grad()
def test_positions_out_of_order_go_to_the_predicate(model, batch, sdpa_for_standard_patterns):
    """User position_ids that are not increasing: causal by row would be wrong; ours computes it."""
    ids, attn, ctx, pos = batch
    shuffled = pos.clone()
    shuffled[:, -4:] = shuffled[:, -4:].flip(1)
    policy = POLICIES["stop2"]
    truth = sk.masked_forward(model, ids, attn, ctx, policy, shuffled)
    with sk.patched(model, policy):
        out = model(ids, attention_mask=attn, position_ids=shuffled, context_mask=ctx).logits
        assert calls(model) == {("predicate", "ours"): 4}
    keep = computed_columns(attn, ctx, policy, 4)
    assert (out - truth)[keep].abs().max().item() <= FP32_LOGIT_ATOL


@torch.no_grad()
def test_assisted_and_beam_search_through_torch_kernels_equal_ours(model, batch, sdpa_for_standard_patterns):
    ids, attn, ctx, _ = batch
    policy = POLICIES["stop2"]
    runs = {}
    for backend in ("cpu", "auto"):
        with sk.patched(model, policy, backend=backend):
            runs[backend] = (
                model.generate(ids[:1], context_mask=ctx[:1], max_new_tokens=10, do_sample=False,
                               prompt_lookup_num_tokens=3),
                model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=5, num_beams=3,
                               do_sample=False),
            )
            if backend == "auto":
                assert any(kernel == "sdpa" for _, kernel in calls(model))
    assert all(torch.equal(a, b) for a, b in zip(runs["cpu"], runs["auto"]))


def test_training_through_torch_kernels_gives_ours_gradients(batch, sdpa_for_standard_patterns):
    ids, attn, ctx, _ = batch
    grads = {}
    for backend in ("cpu", "auto"):
        model = tiny_llama()
        with sk.patched(model, POLICIES["stop2"], backend=backend):
            out = model(ids, attention_mask=attn, context_mask=ctx, labels=ids, use_cache=False)
            out.loss.backward()
        grads[backend] = model.model.layers[0].self_attn.q_proj.weight.grad
    assert (grads["cpu"] - grads["auto"]).abs().max().item() <= 1e-5


# --- what the user sees ---


@torch.no_grad()
def test_dispatch_report(model, batch):
    ids, attn, ctx, _ = batch
    with pytest.raises(ValueError, match="patched"):
        sk.dispatch_report(model)
    with sk.patched(model, POLICIES["stop2"]):
        report = sk.dispatch_report(model)
        assert report.backend == "auto" and report.ours == "cpu" and report.table.endswith("cpu.json")
        assert report.kernel_for(Pattern.PREDICATE) == "ours" and report.calls == {}
        model(ids, attention_mask=attn, context_mask=ctx)
        text = str(sk.dispatch_report(model))
    assert "varlen_causal -> ours: 4" in text and "visibility predicate" in text
    with sk.patched(model, POLICIES["stop2"], backend="torch"):
        report = sk.dispatch_report(model)
    assert {c["kernel"] for c in report.choices} == {"ours"} and "forces" in str(report)
    assert len(report.choices) == len(Pattern)  # forced: one row per pattern


def test_unknown_backend_names_auto(model):
    with pytest.raises(ValueError, match="'auto'"):
        sk.patch(model, POLICIES["stop2"], backend="fastest")


@torch.no_grad()
def test_compiled_auto_runs_torch_kernels_and_equals_eager(batch, sdpa_for_standard_patterns):
    """Under torch.compile the attention runs inside the attend host op (traced.py), through the same
    dispatcher."""
    model = tiny_llama(layers=3)
    with sk.patched(model, POLICIES["stop2"]):
        compiled = torch.compile(model, fullgraph=True)
        logits = {name: prefill_and_decode_logits(run, batch, 3) for name, run in (("eager", model),
                                                                                    ("compiled", compiled))}
        assert calls(model) == {("varlen_causal", "sdpa"): 2 * 3, ("cache_decode", "sdpa"): 2 * 3}
    for eager, compiled_out in zip(logits["eager"][:2], logits["compiled"][:2]):
        torch.testing.assert_close(compiled_out, eager, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits["eager"][2], logits["compiled"][2])
