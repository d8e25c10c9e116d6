"""Calibration: task files, the recommendation rule, the plot, the resumable cache, and a tiny-model
end-to-end run (random LlamaForCausalLM + a character tokenizer, seconds) checked against the slow
masked model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import skiplayers as sk
from model_helpers import char_tokenizer, tiny_llama
from skiplayers import calibration as cal
from skiplayers.measure import context_stop_savings, token_layer_bound
from skiplayers.tasks import BUILTIN_TASKS, TaskFileError, load_tasks, parse_jsonl


def line(**kw):
    item = {"instructions": "Copy.", "examples": [["a", "a"], ["b", "b"]], "query": "c", "answer": "c"}
    item.update(kw)
    return json.dumps(item)


# --- task files --------------------------------------------------------------------------------


def test_parse_jsonl_good_lines_keep_their_line_numbers():
    items = parse_jsonl([line(), "\n", line(query="d", answer="D", id=7)])
    assert [it.line for it in items] == [1, 3]
    assert items[1].query == "d" and items[1].answer == "D"
    assert items[0].examples == (("a", "a"), ("b", "b"))


@pytest.mark.parametrize("bad, message", [
    ('{"instructions": "x", ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"instructions": "x", "examples": [], "query": "q"}), "missing key(s) answer"),
    (line(query=3), "'query' must be a string"),
    (line(examples=[["a", "b", "c"]]), "examples[0] must be a [source, target] pair"),
    (line(examples="a b"), "'examples' must be a list"),
    (line(query="   "), "the query is empty"),
])
def test_parse_jsonl_bad_line_names_its_line_number(bad, message):
    with pytest.raises(TaskFileError) as err:
        parse_jsonl([line(), "", bad, line()], source="t.jsonl")
    assert "t.jsonl line 3" in str(err.value) and message in str(err.value)


def test_empty_task_file_is_an_error(tmp_path):
    for text in ("", "\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(text)
        with pytest.raises(TaskFileError, match="no items"):
            load_tasks(path)
    with pytest.raises(TaskFileError, match="no such file.*builtin:number_words"):
        load_tasks(tmp_path / "missing.jsonl")
    with pytest.raises(TaskFileError, match="built-in tasks: number_words"):
        load_tasks("builtin:nope")


def test_builtin_tasks_come_from_package_data():
    import calendar

    for name in BUILTIN_TASKS:
        _, items = load_tasks(f"builtin:{name}")
        assert 19 <= len(items) <= 40
        for it in items:
            assert len(it.examples) == 5 and (it.query, it.answer) not in it.examples
    words = {it.query: it.answer for it in load_tasks("builtin:number_words")[1]}
    assert words["7"] == "seven" and words["21"] == "twenty-one" and words["40"] == "forty"
    nxt = {it.query: it.answer for it in load_tasks("builtin:next_month_or_day")[1]}
    assert nxt[calendar.month_name[12]] == calendar.month_name[1] and nxt["Sunday"] == "Monday"


# --- settings, policies, metrics ---------------------------------------------------------------


def test_parse_layers():
    assert cal.parse_layers(None, 30) == list(range(0, 30, 2)) and cal.parse_layers(None, 4) == [0, 1, 2, 3]
    assert cal.parse_layers("0:30", 30) == list(range(30))
    assert cal.parse_layers("10:", 30) == list(range(10, 30))  # an open end stops at L - 1
    assert cal.parse_layers("28:31", 30) == [28, 29, 30]  # ℓ = L (the full computation) on request
    assert cal.parse_layers("0:30:5", 30) == [0, 5, 10, 15, 20, 25]
    assert cal.parse_layers("7", 30) == [7]
    for bad in ("0:30:0", "a:b", "40:50", "1:2:3:4"):
        with pytest.raises(ValueError, match="--layers"):
            cal.parse_layers(bad, 30)


def test_unknown_policy_is_refused_naming_what_exists(tmp_path, capsys):
    with pytest.raises(ValueError, match="policies that exist: context-stop"):
        cal.get_policy("attention-drop")
    rc = sk_main(["calibrate", "--task", "builtin:uppercase", "--policy", "layer-skip", "--out", str(tmp_path)])
    assert rc == 2 and "context-stop" in capsys.readouterr().err


def sk_main(argv):
    from skiplayers.cli import main

    return main(argv)


def test_metrics():
    assert cal.get_metric("exact")("Paris", " Paris ") == 1.0
    assert cal.get_metric("exact")("paris", "Paris") == 0.0
    chrf = cal.get_metric("chrf")
    assert chrf("maison", "maison") == pytest.approx(1.0) and 0 < chrf("maisons", "maison") < 1
    assert cal.get_metric("bleu")("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exact, chrf, bleu"):
        cal.get_metric("rouge")
    assert cal.first_line(" seven\nQ: 8 A: eight") == "seven"


def test_sacrebleu_is_imported_only_for_chrf_and_bleu():
    code = ("import sys, skiplayers.calibration as c; c.get_metric('exact'); a = 'sacrebleu' in sys.modules; "
            "c.get_metric('chrf'); print(a, 'sacrebleu' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_savings_formula_and_bound_agree():
    c, n, L = [40, 10], [50, 20], 30
    s = context_stop_savings(c, n, L, 12)
    assert s == pytest.approx((40 + 10) * 18 / (70 * 30))
    assert token_layer_bound(c, n, L, 12) == pytest.approx(1 / (1 - s))
    assert context_stop_savings(c, n, L, 30) == 0


# --- the recommendation rule -------------------------------------------------------------------


def curve(scores, layers=30, context=0.8):
    return [{"setting": ell, "score": s, "savings": context * (layers - ell) / layers} for ell, s in scores]


def test_recommend_smallest_layer_within_budget():
    c = curve([(0, 0.1), (4, 0.5), (8, 0.9), (12, 1.0), (16, 1.0)])
    assert cal.recommend(c, 1.0, 0.95)[0] == 12
    assert cal.recommend(c, 1.0, 0.9)[0] == 8  # score == budget x full passes
    assert cal.recommend(c, 1.0, 0.5)[0] == 4
    # the first passing setting wins even if a later one dips (the rule is "cheapest that passes")
    c2 = curve([(10, 0.95), (11, 0.7), (12, 1.0)])
    assert cal.recommend(c2, 1.0, 0.95)[0] == 10


def test_recommend_threshold_is_inclusive_despite_rounding():
    full = 21 / 40
    c = curve([(3, 0.95 * full), (5, full)])
    assert cal.recommend(c, full, 0.95)[0] == 3


def test_recommend_ties_in_savings_take_the_first_in_sweep_order():
    c = [{"setting": s, "score": 1.0, "savings": 0.0} for s in (5, 6, 7)]  # no context at all
    assert cal.recommend(c, 1.0, 0.95)[0] == 5


def test_recommend_none_when_nothing_passes_and_for_uninformative_tasks():
    c = curve([(0, 0.2), (10, 0.5)])
    rec, why = cal.recommend(c, 1.0, 0.95)
    assert rec is None and "no setting reaches" in why
    rec, why = cal.recommend(curve([(0, 0.0), (10, 0.0)]), 0.0, 0.95)
    assert rec is None and "uninformative" in why
    with pytest.raises(ValueError, match="budget"):
        cal.recommend(c, 1.0, 0.0)


def test_plot_is_written(tmp_path):
    result = {"policy": "context-stop", "metric": "exact", "task": "t", "num_items": 3, "full_score": 0.9,
              "threshold": 0.855, "budget": 0.95, "recommended": 12, "uninformative": False,
              "curve": curve([(0, 0.1), (6, 0.6), (12, 0.9), (18, 0.9)])}
    path = cal.plot_curve(result, tmp_path / "c.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    result.update(recommended=None, uninformative=True, full_score=0.0, threshold=0.0)
    assert cal.plot_curve(result, tmp_path / "u.png").stat().st_size > 5000


# --- tiny model end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(layers=4), char_tokenizer()


def tiny_items(model, tokenizer, n=5):
    """Items whose answers are what the full tiny model generates (so the full score is 1)."""
    items = [{"instructions": "Copy the word.", "examples": [[w, w] for w in ("ab", "cd", "ef")][: 1 + k % 3],
              "query": q, "answer": ""} for k, q in enumerate(["gh", "ij", "kl", "mn", "op", "qr"][:n])]
    prep = cal.prepare(tokenizer, cal.coerce_items(items), 8, 4, None)
    full = cal.generate_outputs(model, tokenizer, prep, None, 4)
    return [dict(it, answer=a) for it, a in zip(items, full)]


def test_tiny_model_end_to_end_with_masked_check(tiny, tmp_path):
    model, tokenizer = tiny
    items = tiny_items(model, tokenizer)
    res = sk.calibrate(model, tokenizer, items, tmp_path, layers="0:5", max_new_tokens=4, batch_size=2,
                       verify=True, progress=False, log=lambda *a: None)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["recommended"] == res["recommended"]
    for key in ("policy", "metric", "full_score", "curve", "budget", "recommended", "uninformative", "verify"):
        assert key in saved
    assert saved["full_score"] == 1.0 and not saved["uninformative"]
    assert [p["setting"] for p in saved["curve"]] == [0, 1, 2, 3, 4]
    prep = cal.prepare(tokenizer, cal.coerce_items(items), 2, 4, None)
    for p in saved["curve"]:
        assert p["savings"] == pytest.approx(context_stop_savings(prep.context_lengths, prep.total_lengths, 4,
                                                                  p["setting"]))
        scores = saved["items"][str(p["setting"])]["item_scores"]
        assert len(scores) == 5 and p["score"] == pytest.approx(sum(scores) / 5)
    passing = [p["setting"] for p in saved["curve"] if p["score"] >= 0.95 * saved["full_score"] - 1e-9]
    assert saved["recommended"] == min(passing)  # ℓ = L (4) always passes: it is the full computation
    check = saved["verify"]
    assert [c["setting"] for c in check["checked"]] == [saved["recommended"], saved["recommended"] - 1][
        : 1 + (saved["recommended"] > 0)]
    assert check["passed"] is True and all(c["outputs_equal"] for c in check["checked"])
    assert check["recommendation_confirmed"] is True
    assert (tmp_path / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_uninformative_task_gives_no_recommendation(tiny, tmp_path):
    model, tokenizer = tiny
    items = [dict(it, answer="never generated \u2603") for it in tiny_items(model, tokenizer, 3)]
    res = sk.calibrate(model, tokenizer, items, tmp_path, layers="2:4", max_new_tokens=3, progress=False,
                       log=lambda *a: None)
    assert res["uninformative"] is True and res["recommended"] is None and "uninformative" in res["reason"]
    assert (tmp_path / "calibration.png").exists()


def test_too_long_items_are_refused(tiny, tmp_path):
    model, tokenizer = tiny
    items = [{"instructions": "", "examples": [["x" * 600, "y"]], "query": "q", "answer": "a"}]
    with pytest.raises(TaskFileError, match="item 0: the prompt has 61[0-9] tokens.*512 positions"):
        sk.calibrate(model, tokenizer, items, tmp_path, progress=False, log=lambda *a: None)


def test_resume_reuses_cached_settings_and_never_a_stale_cache(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    items = tiny_items(model, tokenizer, 4)
    calls = []
    real = cal.generate_outputs

    def counting(model, tokenizer, prep, policy, *args, **kwargs):
        calls.append(None if policy is None else policy.context_stop_layer)
        if fail_after[0] is not None and len(calls) > fail_after[0]:
            raise KeyboardInterrupt  # an interrupted run
        return real(model, tokenizer, prep, policy, *args, **kwargs)

    fail_after = [3]
    monkeypatch.setattr(cal, "generate_outputs", counting)
    kw = dict(layers="0:5", max_new_tokens=3, batch_size=8, progress=False, log=lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        sk.calibrate(model, tokenizer, items, tmp_path, **kw)
    assert calls == [None, 0, 1, 2]  # full, ℓ=0, ℓ=1 done and cached; interrupted at ℓ=2
    assert len(list((tmp_path / "settings").glob("*.json"))) == 3

    fail_after[0] = None
    calls.clear()
    first = sk.calibrate(model, tokenizer, items, tmp_path, **kw)
    assert calls == [2, 3, 4]  # only what was missing
    calls.clear()
    again = sk.calibrate(model, tokenizer, items, tmp_path, **kw)
    assert calls == [] and again["curve"][0]["cached"] and again["recommended"] == first["recommended"]
    assert again["items"] == first["items"]

    calls.clear()
    sk.calibrate(model, tokenizer, items, tmp_path, **dict(kw, max_new_tokens=2))  # other key: all recomputed
    assert calls == [None, 0, 1, 2, 3, 4]
    calls.clear()
    changed = [dict(items[0], answer=items[0]["answer"] + "!")] + items[1:]
    sk.calibrate(model, tokenizer, changed, tmp_path, **kw)
    assert calls == [None, 0, 1, 2, 3, 4]
    # a corrupt cache file (e.g. written by an older version) is recomputed, not trusted
    path = tmp_path / "settings" / f"context-stop_3_{first['key']}.json"
    assert path.exists() and len(list((tmp_path / "settings").glob("context-stop_3_*.json"))) == 3
    path.write_text("{not json")
    calls.clear()
    sk.calibrate(model, tokenizer, items, tmp_path, **kw)
    assert calls == [3]


# --- the default model ---------------------------------------------------------------------------


def test_shipped_calibration_is_consistent():
    shipped = cal.shipped_calibration()
    assert shipped["demo_task"] in shipped["tasks"]
    for name, row in shipped["tasks"].items():
        assert name in BUILTIN_TASKS and row["num_items"] == len(load_tasks(f"builtin:{name}")[1])
        if row.get("recommended") is not None:
            assert 0 <= row["recommended"] < 30
            assert row["score_at_recommended"] >= row["budget"] * row["full_score"] - 1e-9
            assert row["bound"] == pytest.approx(1 / (1 - row["savings"]))


@pytest.fixture(scope="module")
def smollm2():
    return sk.load_default_model(), sk.load_default_tokenizer()


@pytest.mark.slow
def test_smollm2_short_calibration_matches_masked_model(smollm2, tmp_path):
    model, tokenizer = smollm2
    items = [it.to_json() for it in load_tasks("builtin:next_month_or_day")[1][:8]]
    res = sk.calibrate(model, tokenizer, items, tmp_path, layers="18:19", max_new_tokens=6, verify=True,
                       budget=0.01, progress=False, log=lambda *a: None)
    assert res["full_score"] > 0 and res["recommended"] == 18
    assert [c["setting"] for c in res["verify"]["checked"]] == [18, 17]
    assert res["verify"]["passed"] is True, res["verify"]["summary"]


@pytest.mark.slow
def test_demo_task_answers_agree_with_the_full_model(smollm2):
    from skiplayers.cli import DEMO_ITEMS
    from skiplayers.tasks import builtin_task

    model, tokenizer = smollm2
    shipped = cal.shipped_calibration()
    task = shipped["demo_task"]
    prep = cal.prepare(tokenizer, builtin_task(task)[:DEMO_ITEMS], DEMO_ITEMS, 8, None)
    full = cal.generate_outputs(model, tokenizer, prep, None, 8)
    stop = cal.generate_outputs(model, tokenizer, prep, sk.SkipPolicy(context_stop_layer=shipped["tasks"][task]
                                                                      ["recommended"]), 8)
    assert stop == full
