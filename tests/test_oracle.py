"""The oracle layer allocator (``skiplayers.oracle``) on a tiny random LLaMA: every route it returns
reproduces the full model's greedy tokens, checked with the slow masked model (not with the patched
model the search used); the candidate families; the routed batch's work; the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import skiplayers as sk
from model_helpers import char_tokenizer, tiny_llama
from skiplayers.oracle import candidate_layers, load_prompts

LAYERS = 6
PROMPTS = [[5, 9, 33, 12, 40], [7, 8, 9, 10], [60, 61, 3, 4, 5, 6, 7], [11, 12]]
NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS)


@pytest.fixture(scope="module")
def result(model):
    return sk.oracle_routes(model, None, PROMPTS, max_new_tokens=NEW, budget=4, progress=False)


@pytest.mark.parametrize("kept", [1, 2, 3, 5, 30])
def test_candidates_have_the_asked_number_of_distinct_layers(kept):
    candidates = candidate_layers(30, kept, budget=5, seed=3)
    assert len({layers for _, layers in candidates}) == len(candidates)
    for _, layers in candidates:
        assert len(layers) == kept and list(layers) == sorted(set(layers)) and 0 <= layers[0] and layers[-1] < 30
    families = [family for family, _ in candidates]
    assert families[0] == "first" and candidates[0][1] == tuple(range(kept))
    assert candidate_layers(30, kept, 5, 3) == candidates  # seeded


def test_candidate_errors():
    with pytest.raises(ValueError, match=r"kept must be in \[1, 6\]"):
        candidate_layers(6, 0, 2, 0)


def test_every_route_reproduces_the_full_output_under_the_masked_model(model, result):
    assert result.layer_mask.shape == (len(PROMPTS), LAYERS)
    assert result.mean_fraction == pytest.approx(result.layer_mask.float().mean().item())
    assert result.mean_fraction < 1.0, "some prompt should need fewer layers on this model"
    for prompt, route in zip(PROMPTS, result.routes):
        ids = torch.tensor([prompt])
        attn = torch.ones_like(ids)
        full = sk.masked_generate(model, ids, attn, None, sk.SkipPolicy(), NEW)
        mask = result.layer_mask[route.prompt : route.prompt + 1]
        routed = sk.masked_generate(model, ids, attn, None, sk.SkipPolicy(), NEW, layer_mask=mask)
        assert torch.equal(routed, full), f"prompt {route.prompt}: route {route.layers} changes the output"
        assert route.agreement == 1.0 and route.tried > 0


def test_routed_batch_costs_the_layers_its_sequences_run(model, result):
    stats = sk.run_routes(model, None, PROMPTS, result, runs=1)
    kept = result.layer_mask.sum(1)
    rows = torch.tensor([len(p) + NEW - 1 for p in PROMPTS])  # the prompt, then NEW - 1 decode steps
    expected = float((rows * LAYERS).sum() / (rows * kept).sum())
    assert stats["work_bound"] == pytest.approx(expected)
    assert stats["batch"] == len(PROMPTS) and 0.0 <= stats["token_agreement"] <= 1.0


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="min_agreement"):
        sk.oracle_routes(model, None, PROMPTS, min_agreement=0.0, progress=False)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sk.oracle_routes(model, None, [[3], []], progress=False)


def test_cli_writes_routes_and_plot(model, tmp_path):
    from skiplayers.cli import main

    checkpoint = tmp_path / "tiny"
    model.save_pretrained(checkpoint)
    char_tokenizer().save_pretrained(checkpoint)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["abc", "hello", "xyz w"]))
    out = tmp_path / "out"
    rc = main(["oracle", str(prompts), "--model", str(checkpoint), "--out", str(out), "--max-new-tokens", "4",
               "--budget", "2", "--runs", "1"])
    assert rc == 0
    saved = json.loads((out / "oracle.json").read_text())
    assert len(saved["routes"]) == 3 and saved["num_layers"] == LAYERS and "batch" in saved
    assert 0 < saved["mean_fraction_of_layers"] <= 1
    assert (out / "oracle.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_names_the_bad_line(model, tmp_path, capsys):
    from skiplayers.cli import main

    checkpoint = tmp_path / "tiny"
    model.save_pretrained(checkpoint)
    char_tokenizer().save_pretrained(checkpoint)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "abc"}\n{"prompt": ""}\n')
    rc = main(["oracle", str(prompts), "--model", str(checkpoint), "--out", str(tmp_path / "o")])
    assert rc == 2 and "line 2" in capsys.readouterr().err


def test_task_items_become_their_fewshot_prompts():
    tokenizer = char_tokenizer()
    name, prompts = load_prompts("builtin:uppercase", tokenizer)
    assert name == "uppercase" and len(prompts) == 40
    assert tokenizer.decode(prompts[0]).rstrip().endswith("A:")
