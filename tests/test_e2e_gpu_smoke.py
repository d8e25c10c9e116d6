"""The GPU end-to-end benchmark's plumbing, on the CPU: ``benchmarks/e2e_gpu.py --smoke`` (tiny
float32 model, tiny sizes) runs every case, decode mode and variant and writes its files. At ℓ = L
the patched model computes what the unpatched one does, so the forced backend's greedy tokens must
agree. The static decode steps (what a GPU captures in a CUDA graph; here run without capture, mode
``static-eager``) must decode what the eager steps decode: the unpatched model over a transformers
``StaticCache`` the same tokens as over its dynamic cache at every ℓ, ``sk.StaticDecoder`` the same
at ℓ = L. The pool reservation the benchmark computes is exact."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import skiplayers as sk

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e_gpu.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("e2e_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _case_key(row):
    return row["kind"], row["mode"], row["batch"], row["context"], row["stop_layer"]


def test_smoke_run_writes_every_variant(e2e, tmp_path):
    json_path = e2e.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert json_path == tmp_path / "e2e_gpu.json"
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"e2e_gpu.{suffix}").stat().st_size > 0
    result = json.loads(json_path.read_text())
    rows = result["rows"]
    assert not result["skipped_cases"]
    assert result["decode_mode"] == "both" and result["static_mode"] == "static-eager"

    cases = {_case_key(r) for r in rows}
    assert {(kind, mode) for kind, mode, *_ in cases} == {("prefill", "eager"), ("decode", "eager"),
                                                          ("decode", "static-eager")}
    decode = {case[2:] for case in cases if case[0] == "decode"}
    assert decode == {case[2:] for case in cases if case[:2] == ("decode", "static-eager")}  # both modes, every case
    for case in cases:
        variants = {r["variant"]: r for r in rows if _case_key(r) == case}
        assert set(variants) == set(e2e.VARIANTS if case[1] == "eager" else e2e.STATIC_VARIANTS), case
        for name, row in variants.items():
            assert row["error"] == "", (case, name, row["error"])
            timing = row["prefill_ms"] if row["kind"] == "prefill" else row["decode_tok_s"]
            assert timing is not None and math.isfinite(timing) and timing > 0, (case, name)
            if row["kind"] == "decode":
                assert row["host_ms_step"] > 0 and row["ms_step"] > 0 and row["prefill_ms"] > 0, (case, name)
                assert "_tokens" not in row

    layers = rows[0]["layers"]
    full = [r for r in rows if r["stop_layer"] == layers and r["variant"] in ("unpatched", "ours")]
    assert full, "the smoke run must include ℓ = L"
    assert all(r["greedy_agree"] == 1.0 for r in full), [(r["kind"], r["mode"], r["variant"], r["greedy_agree"])
                                                          for r in full]
    # The static steps against the eager unpatched decode of the same prompt: the StaticCache step
    # at every ℓ (the unpatched model ignores ℓ), StaticDecoder's at ℓ = L.
    static = [r for r in rows if r["mode"] == "static-eager"]
    expected = [r for r in static if r["variant"] == "unpatched" or r["stop_layer"] == layers]
    assert all(r["agree_eager"] == 1.0 for r in expected), [(r["variant"], r["batch"], r["context"], r["stop_layer"],
                                                             r["agree_eager"]) for r in expected]
    assert all(r["agree_eager"] is not None for r in static)


@torch.no_grad()
@pytest.mark.parametrize("stop", [0, 2, 4])
def test_the_reserved_pool_is_exact(e2e, stop):
    """``skip_cache_slots`` reserves exactly the pages a prefill and its decode steps take: the
    steps run (a reserved pool never grows) and leave no page free."""
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32, seed=0)
    layers, page = model.config.num_hidden_layers, 16
    batch, context, query, steps = 3, 50, 7, 20  # pages end part-filled at both kinds of layer
    ids, attn, ctx = e2e.prompt_batch(batch, context, query, model.config.vocab_size, "cpu", seed=0)
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=stop), backend="cpu"):
        slots = e2e.skip_cache_slots(layers, stop, batch, context, query, steps, page)
        cache = sk.SkipCache(layers, page_size=page, max_tokens=slots)
        out = model(ids, attention_mask=attn, context_mask=ctx, past_key_values=cache, use_cache=True,
                    logits_to_keep=1)
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=steps)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            token = decoder(token).argmax(-1)
        pool = cache.layers[0].pool
        assert pool.num_pages * page == slots and pool.free_pages == 0


@torch.no_grad()
def test_the_static_cache_step_equals_the_dynamic_cache_step(e2e):
    """``StaticCacheDecoder`` (the unpatched graph side, run without capture) against the unpatched
    model's usual decode (``model(...)`` over its dynamic cache, ``skiplayers.measure.greedy_step``'s
    call): the logits of every step, not only the greedy tokens, which a random model's near-uniform
    attention would hide a wrong position from."""
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32, seed=0)
    batch, context, query, steps = 2, 20, 6, 5
    ids, attn, _ = e2e.prompt_batch(batch, context, query, model.config.vocab_size, "cpu", seed=1)
    out = model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1)
    dynamic, mask = out.past_key_values, attn
    static = e2e.StaticCache(config=model.config, max_cache_len=context + query + steps)
    first = model(ids, attention_mask=attn, past_key_values=static, use_cache=True, logits_to_keep=1).logits
    torch.testing.assert_close(first, out.logits, atol=1e-5, rtol=0)
    decoder = e2e.StaticCacheDecoder(model, static, batch, context + query, context + query + steps)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        want = model(token, attention_mask=mask, past_key_values=dynamic, use_cache=True, logits_to_keep=1).logits
        got = decoder(token)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        token = want.argmax(-1)
    with pytest.raises(RuntimeError, match="StaticCache is full"):
        decoder(token)


@torch.no_grad()
def test_the_static_cache_step_traces_whole(e2e):
    """What a CPU can say about capturing ``StaticCacheDecoder.step`` in a CUDA graph: dynamo traces
    it into one graph, no break, so it reads no tensor value on the host (a capture would fail on
    such a read); ``test_static_decode`` checks the same of the patched step."""
    model = e2e.build_model("tiny", torch.device("cpu"), torch.float32, seed=0)
    ids, attn, _ = e2e.prompt_batch(2, 20, 6, model.config.vocab_size, "cpu", seed=0)
    cache = e2e.StaticCache(config=model.config, max_cache_len=40)
    model(ids, attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=1)
    decoder = e2e.StaticCacheDecoder(model, cache, 2, 26, 40)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(decoder.step)()
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("mode", ["eager", "graphs", "both"])
def test_decode_modes_plan_graph_cases_first(e2e, mode):
    """``--decode-mode``: which decode cases run, in which order (the budget cuts the last ones, so
    the cheaper graph cases come first); the static steps are "graphs" on CUDA, "static-eager" elsewhere."""
    args = e2e.parse_args(["--smoke", "--decode-mode", mode])
    for device, static in ((torch.device("cpu"), "static-eager"), (torch.device("cuda"), "graphs")):
        modes = [case.mode for case in e2e.plan_cases(args, device) if case.kind == "decode"]
        want = {"eager": ["eager"], "graphs": [static], "both": [static, "eager"]}[mode]
        assert list(dict.fromkeys(modes)) == want
        assert all(modes.count(m) == len(modes) // len(want) for m in want)
