"""Calibration: how far can a model skip on *your* task before its answers get worse?

``calibrate`` scores the full (unpatched) model once on a few-shot task, then every setting of a
sweep (for context stop: ℓ over a range of layers), and recommends the cheapest setting whose score
is at least ``budget`` times the full model's score. Generation is greedy; an item's output is the
first line of the generated text, stripped, scored against its answer (``exact``, or sentence chrF /
BLEU from ``sacrebleu`` on a 0..1 scale); a setting's score is the mean over items.

Each setting's per-item results are cached as one JSON file under ``out_dir/settings/``, named by
the setting and a hash of everything that decides them (prompt token ids, answers, model config and
a fingerprint of its weights, metric, max_new_tokens, batch size, backend), so an interrupted run
resumes where it stopped and a stale cache is never reused.

Sweep kinds plug in through ``POLICIES`` (see :class:`SweepKind`); ``context-stop`` is the one that
exists now.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .measure import context_stop_savings, token_layer_bound
from .patching import patch, unpatch
from .policy import SkipPolicy
from .prompts import fewshot_prompt_ids, left_padded, pad_token_id
from .tasks import TaskFileError, TaskItem, coerce_items, load_tasks

CACHE_VERSION = 1
SCORE_EPS = 1e-9  # a score equal to budget x full (up to float rounding) passes


# --- sweep kinds -------------------------------------------------------------------------------

Setting = Any  # a JSON scalar; each SweepKind reads its own (context-stop: the layer ℓ)


@dataclass(frozen=True)
class SweepKind:
    """One kind of sweep. Settings are JSON scalars; ``settings`` lists them in sweep order."""

    name: str
    description: str
    settings: Callable[[int, str | None], list[Setting]]  # (num_layers, --layers spec) -> settings
    policy: Callable[[Setting], SkipPolicy]
    # (setting, context_lengths, total_lengths, num_layers) -> fraction of token-layer work left out
    savings: Callable[[Setting, Sequence[int], Sequence[int], int], float]
    cheaper: Callable[[Setting], Setting | None]  # the next cheaper setting (for the masked check)


DEFAULT_SETTINGS = 15  # the default sweep takes every ceil(L / 15)-th layer (then refines, see calibrate)


def default_layer_step(num_layers: int) -> int:
    return max(1, -(-num_layers // DEFAULT_SETTINGS))


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """``a:b`` or ``a:b:step`` like a Python slice over 0..L (ℓ = L is the full model). None: every
    ``default_layer_step(L)``-th layer of 0..L-1 (0, 2, ..., 28 for 30 layers)."""
    if spec is None:
        return list(range(0, num_layers, default_layer_step(num_layers)))
    parts = str(spec).split(":")
    try:
        if len(parts) == 1:
            values = [int(parts[0])]
        elif len(parts) in (2, 3):
            start, stop = (int(p) if p.strip() else None for p in parts[:2])
            step = int(parts[2]) if len(parts) == 3 and parts[2].strip() else 1
            if step <= 0:
                raise ValueError
            values = list(range(num_layers + 1))[slice(start, num_layers if stop is None else stop, step)]
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--layers {spec!r}: expected a:b or a:b:step with a positive step (e.g. 0:{num_layers})") \
            from None
    bad = [v for v in values if not 0 <= v <= num_layers]
    if bad or not values:
        raise ValueError(f"--layers {spec!r} selects no layer in [0, {num_layers}] for this {num_layers}-layer model")
    return values


POLICIES: dict[str, SweepKind] = {}


def register_policy(kind: SweepKind) -> SweepKind:
    POLICIES[kind.name] = kind
    return kind


register_policy(SweepKind(
    name="context-stop",
    description="context tokens are dropped from layer ℓ on (Sia et al. 2024); setting = ℓ",
    settings=lambda num_layers, spec: parse_layers(spec, num_layers),
    policy=lambda ell: SkipPolicy(context_stop_layer=int(ell)),
    savings=lambda ell, c, n, layers: context_stop_savings(c, n, layers, int(ell)),
    cheaper=lambda ell: int(ell) - 1 if int(ell) > 0 else None,
))


def get_policy(name: str) -> SweepKind:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; policies that exist: {', '.join(POLICIES)} "
                         "(attention dropping and layer skipping are not calibrated yet)")
    return POLICIES[name]


# --- metrics -----------------------------------------------------------------------------------


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _exact(hyp: str, ref: str) -> float:
    return float(hyp == ref.strip())


def _sacrebleu(name: str):
    try:
        import sacrebleu
    except ImportError as err:  # pragma: no cover - sacrebleu is in requirements.txt
        raise ImportError(f"--metric {name} needs sacrebleu (pip install sacrebleu)") from err
    if name == "chrf":
        return lambda hyp, ref: sacrebleu.sentence_chrf(hyp, [ref.strip()]).score / 100.0
    return lambda hyp, ref: sacrebleu.sentence_bleu(hyp, [ref.strip()]).score / 100.0


METRICS = ("exact", "chrf", "bleu")


def get_metric(name: str) -> Callable[[str, str], float]:
    """Per-item score in [0, 1]; sacrebleu is imported only for chrf / bleu."""
    if name == "exact":
        return _exact
    if name in ("chrf", "bleu"):
        return _sacrebleu(name)
    raise ValueError(f"unknown metric {name!r}; metrics: {', '.join(METRICS)}")


# --- the recommendation rule -------------------------------------------------------------------


def recommend(curve: Sequence[dict], full_score: float, budget: float) -> tuple[Setting | None, str]:
    """The cheapest setting (largest ``savings``; ties: the first in sweep order) whose score is at
    least ``budget * full_score``. Returns ``(setting or None, reason)``. A task the full model
    scores 0 on says nothing about what can be skipped: no recommendation."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    if full_score <= 0:
        return None, ("uninformative: the full model scores 0 on this task, so every setting trivially "
                      "keeps its score; pick a task the model can do")
    threshold = budget * full_score
    passing = [p for p in curve if p["score"] >= threshold - SCORE_EPS]
    if not passing:
        return None, f"no setting reaches {budget:g} x the full score ({threshold:.4g})"
    best = max(passing, key=lambda p: p["savings"])  # max() keeps the first of equal keys
    return best["setting"], (f"cheapest setting with score >= {budget:g} x full ({threshold:.4g}): "
                             f"{best['setting']} (score {best['score']:.4g}, savings {best['savings']:.3f})")


# --- generation --------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Items tokenised once: prompt ids, context flags and the batches (sorted by length)."""

    items: list[TaskItem]
    ids: list[list[int]]
    context: list[list[bool]]
    batches: list[list[int]]  # item indices per batch

    @property
    def context_lengths(self) -> list[int]:
        return [sum(c) for c in self.context]

    @property
    def total_lengths(self) -> list[int]:
        return [len(i) for i in self.ids]


def prepare(tokenizer, items: list[TaskItem], batch_size: int, max_new_tokens: int, max_positions: int | None):
    ids, context = [], []
    for index, item in enumerate(items):
        i, c = fewshot_prompt_ids(tokenizer, item.instructions, item.examples, item.query)
        if max_positions is not None and len(i) + max_new_tokens > max_positions:
            raise TaskFileError(f"{item.where(index)}: the prompt has {len(i)} tokens; with {max_new_tokens} new "
                                f"tokens it exceeds the model's context of {max_positions} positions "
                                "(config.max_position_embeddings)")
        if all(c):
            raise TaskFileError(f"{item.where(index)}: the prompt is all context")
        ids.append(i)
        context.append(c)
    order = sorted(range(len(items)), key=lambda k: len(ids[k]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return Prepared(items, ids, context, batches)


def _batch_tensors(prep: Prepared, batch: list[int], pad_id: int, device):
    ids, attn, ctx = left_padded([(prep.ids[k], prep.context[k]) for k in batch], pad_id)
    return ids.to(device), attn.to(device), ctx.to(device)


@torch.no_grad()
def generate_outputs(model, tokenizer, prep: Prepared, policy: SkipPolicy | None, max_new_tokens: int,
                     backend: str | None = None, progress=None, masked: bool = False) -> list[str]:
    """First lines of the greedy generations, one per item (in item order).

    ``policy=None``: the unpatched model. ``masked=True``: the slow masked model
    (:func:`skiplayers.masked.masked_generate`) with ``policy`` instead of the patched model."""
    device = next(model.parameters()).device
    outputs: list[str | None] = [None] * len(prep.items)
    for batch in prep.batches:
        ids, attn, ctx = _batch_tensors(prep, batch, pad_token_id(tokenizer), device)
        if masked:
            seqs = _masked_first_lines(model, tokenizer, ids, attn, ctx, policy, max_new_tokens)
        else:
            # Generation stops once every sequence has produced a newline: only the first line counts.
            kwargs = dict(attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                          stop_strings=["\n"], tokenizer=tokenizer)
            if policy is None:
                seqs = model.generate(ids, **kwargs)
            else:
                patch(model, policy, backend=backend)
                try:
                    seqs = model.generate(ids, context_mask=ctx, **kwargs)
                finally:
                    unpatch(model)
        texts = tokenizer.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True)
        for k, text in zip(batch, texts):
            outputs[k] = first_line(text)
        if progress is not None:
            progress.update(len(batch))
    return cast(list[str], outputs)  # every item is in one of the batches


def _newline_token_ids(tokenizer) -> torch.Tensor:
    ids = getattr(tokenizer, "_skiplayers_newline_ids", None)
    if ids is None:
        vocab = tokenizer.get_vocab().values()
        ids = torch.tensor(sorted(t for t in vocab if "\n" in tokenizer.decode([t])), dtype=torch.long)
        tokenizer._skiplayers_newline_ids = ids
    return ids


def _masked_first_lines(model, tokenizer, ids, attn, ctx, policy, max_new_tokens):
    """The masked model's greedy generation, one ``masked_generate`` step at a time, stopped once
    every sequence has ended its first line (a newline or an end-of-sequence token); later tokens of
    a finished sequence are padding, as in ``generate()``. Only the first line is scored, so this
    equals ``masked_generate(..., max_new_tokens)`` where it matters and saves the extra steps."""
    from .masked import masked_generate

    eos = model.generation_config.eos_token_id
    stop = torch.cat([_newline_token_ids(tokenizer),
                      torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                                   dtype=torch.long)]).to(ids.device)
    pad = pad_token_id(tokenizer)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        token = masked_generate(model, ids, attn, ctx, policy, 1)[:, -1]
        token = torch.where(finished, torch.full_like(token, pad), token)
        finished |= torch.isin(token, stop)
        ids = torch.cat([ids, token[:, None]], dim=1)
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        if finished.all():
            break
    return ids


# --- cache -------------------------------------------------------------------------------------


def model_fingerprint(model) -> dict:
    """Config plus a cheap digest of the weights (per-parameter float64 sums), so a cache made with
    other weights of the same architecture is never reused."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        s = p.detach().sum(dtype=torch.float64).item()
        a = p.detach().abs().sum(dtype=torch.float64).item()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}{s!r}{a!r}".encode())
    device = next(model.parameters()).device
    return {"config": model.config.to_dict(), "weights": digest.hexdigest(), "device": device.type}


def run_key(prep: Prepared, model, metric: str, max_new_tokens: int, batch_size: int, backend) -> str:
    payload = {
        "version": CACHE_VERSION,
        "prompts": prep.ids,
        "context": prep.context,
        "answers": [it.answer for it in prep.items],
        "model": model_fingerprint(model),
        "metric": metric,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "backend": backend,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)  # atomic: an interrupted write never leaves a half file


def _read_cached(path: Path, key: str, n_items: int) -> dict | None:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if obj.get("key") != key or len(obj.get("item_scores", ())) != n_items:
        return None
    return obj


# --- calibrate ---------------------------------------------------------------------------------


def _score_setting(name, setting, run, cache_dir: Path, progress_desc: str):
    """Per-item outputs and scores of one setting (``setting=None``: the full model), cached."""
    from tqdm import tqdm

    label = "full" if setting is None else f"{name}_{setting}"
    path = cache_dir / f"{label}_{run['key']}.json"
    cached = _read_cached(path, run["key"], len(run["prep"].items))
    if cached is not None:
        cached["cached"] = True
        return cached
    kind = run["kind"]
    policy = None if setting is None else kind.policy(setting)
    start = time.perf_counter()
    with tqdm(total=len(run["prep"].items), desc=progress_desc, unit="item", file=sys.stderr, leave=False,
              disable=not run["progress"]) as bar:
        outputs = generate_outputs(run["model"], run["tokenizer"], run["prep"], policy, run["max_new_tokens"],
                                   backend=run["backend"], progress=bar)
    scores = [run["metric_fn"](o, it.answer) for o, it in zip(outputs, run["prep"].items)]
    result = {"key": run["key"], "setting": setting, "score": sum(scores) / len(scores), "item_scores": scores,
              "outputs": outputs, "seconds": time.perf_counter() - start}
    _write_json(path, result)
    result["cached"] = False
    return result


def calibrate(model, tokenizer, tasks, out_dir, policy: str = "context-stop", budget: float = 0.95,
              layers: str | None = None, metric: str = "exact", batch_size: int = 8, max_new_tokens: int = 16,
              verify: bool = False, backend: str | None = None, progress: bool = True,
              task_name: str | None = None, plot: bool = True, log=print) -> dict:
    """Calibrates ``policy`` on ``tasks`` (a JSONL path, ``builtin:NAME``, or a list of items /
    dicts) and writes ``out_dir/calibration.json`` (returned) and ``out_dir/calibration.png``.

    ``verify=True`` re-runs the items with the slow masked model at the recommended setting and the
    next cheaper one, and records whether its per-item scores equal the fast path's."""
    from tqdm import tqdm

    kind = get_policy(policy)
    metric_fn = get_metric(metric)
    if not 0 < budget <= 1:
        raise ValueError(f"--budget must be in (0, 1], got {budget}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if isinstance(tasks, (str, Path)):
        name, items = load_tasks(tasks)
    else:
        name, items = "tasks", coerce_items(tasks)
    task_name = task_name or name
    num_layers = model.config.num_hidden_layers
    settings = kind.settings(num_layers, layers)
    prep = prepare(tokenizer, items, batch_size, max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    out_dir = Path(out_dir)
    cache_dir = out_dir / "settings"
    cache_dir.mkdir(parents=True, exist_ok=True)
    run = dict(kind=kind, model=model, tokenizer=tokenizer, prep=prep, metric_fn=metric_fn, backend=backend,
               max_new_tokens=max_new_tokens, progress=progress,
               key=run_key(prep, model, metric, max_new_tokens, batch_size, backend))
    c, n = prep.context_lengths, prep.total_lengths
    log(f"calibrate {policy} on {task_name}: {len(items)} items, context tokens {min(c)}..{max(c)}, "
        f"prompt tokens {min(n)}..{max(n)}; {len(settings)} settings; metric {metric}; cache {cache_dir}")

    start = time.perf_counter()
    full = _score_setting(kind.name, None, run, cache_dir, "full model")
    curve, per_setting = [], {}
    with tqdm(settings, desc=f"{policy} sweep", unit="setting", file=sys.stderr, disable=not progress) as bar:
        for setting in bar:
            res = _score_setting(kind.name, setting, run, cache_dir, f"{policy}={setting}")
            per_setting[setting] = res
            curve.append({"setting": setting, "score": res["score"], "savings": kind.savings(setting, c, n, num_layers),
                          "seconds": res["seconds"], "cached": res["cached"]})
    rec, reason = recommend(curve, full["score"], budget)
    # Refine: a stepped sweep leaves gaps; evaluate the cheaper settings between the recommendation
    # and the swept setting below it, so the recommendation is the cheapest passing one at step 1.
    while rec is not None:
        below = [s for s in settings if s < rec]
        cand = kind.cheaper(rec)
        if cand is None or not below or cand <= max(below) or cand in per_setting:
            break
        res = _score_setting(kind.name, cand, run, cache_dir, f"{policy}={cand} (refine)")
        per_setting[cand] = res
        curve.append({"setting": cand, "score": res["score"], "savings": kind.savings(cand, c, n, num_layers),
                      "seconds": res["seconds"], "cached": res["cached"], "refined": True})
        curve.sort(key=lambda p: p["setting"])
        new_rec, new_reason = recommend(curve, full["score"], budget)
        if new_rec == rec:
            break
        rec, reason = new_rec, new_reason
    uninformative = full["score"] <= 0
    log(f"full score {full['score']:.4f}; {reason}")
    result = {
        "task": task_name,
        "policy": policy,
        "metric": metric,
        "budget": budget,
        "num_layers": num_layers,
        "num_items": len(items),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "key": run["key"],
        "full_score": full["score"],
        "threshold": budget * full["score"],
        "uninformative": uninformative,
        "recommended": rec,
        "reason": reason,
        "curve": curve,
        "context_tokens": c,
        "prompt_tokens": n,
        "full": {"item_scores": full["item_scores"], "outputs": full["outputs"], "seconds": full["seconds"]},
        "items": {str(s): {"item_scores": r["item_scores"], "outputs": r["outputs"]} for s, r in per_setting.items()},
        "answers": [it.answer for it in items],
        "queries": [it.query for it in items],
    }
    if rec is not None and kind.name == "context-stop":
        result["recommended_bound"] = token_layer_bound(c, n, num_layers, int(rec))
    if verify:
        result["verify"] = verify_with_masked(run, result, per_setting, cache_dir)
        log(f"masked-model check: {result['verify']['summary']}")
    result["seconds"] = time.perf_counter() - start
    _write_json(out_dir / "calibration.json", result)
    if plot:
        plot_curve(result, out_dir / "calibration.png")
    return result


def verify_with_masked(run, result, per_setting, cache_dir) -> dict:
    """Per-item scores of the slow masked model at the recommended setting and the next cheaper
    one, against the fast path's (the fast path is run there too if the sweep skipped it)."""
    from tqdm import tqdm

    kind, rec = run["kind"], result["recommended"]
    if rec is None:
        return {"checked": [], "passed": None, "summary": "nothing to check (no recommendation)"}
    settings = [rec] + ([kind.cheaper(rec)] if kind.cheaper(rec) is not None else [])
    checks, threshold = [], result["threshold"]
    for setting in settings:
        fast = per_setting.get(setting) or _score_setting(kind.name, setting, run, cache_dir, f"{kind.name}={setting}")
        start = time.perf_counter()
        with tqdm(total=len(run["prep"].items), desc=f"masked model, {kind.name}={setting}", unit="item",
                  file=sys.stderr, leave=False, disable=not run["progress"]) as bar:
            outputs = generate_outputs(run["model"], run["tokenizer"], run["prep"], kind.policy(setting),
                                       run["max_new_tokens"], progress=bar, masked=True)
        scores = [run["metric_fn"](o, it.answer) for o, it in zip(outputs, run["prep"].items)]
        differ = [k for k, (a, b) in enumerate(zip(scores, fast["item_scores"])) if a != b]
        text_differ = [k for k, (a, b) in enumerate(zip(outputs, fast["outputs"])) if a != b]
        masked_score = sum(scores) / len(scores)
        checks.append({"setting": setting, "masked_score": masked_score, "fast_score": fast["score"],
                       "item_scores_equal": not differ, "items_differing": differ,
                       "outputs_equal": not text_differ, "outputs_differing": text_differ,
                       "masked_passes_budget": masked_score >= threshold - SCORE_EPS,
                       "masked_item_scores": scores, "seconds": time.perf_counter() - start})
    passed = all(ch["item_scores_equal"] for ch in checks)
    # The masked model makes the same recommendation when it passes at rec and fails at the cheaper one.
    confirmed = checks[0]["masked_passes_budget"] and all(not ch["masked_passes_budget"] for ch in checks[1:])
    summary = "; ".join(f"{kind.name}={ch['setting']}: masked {ch['masked_score']:.4f} vs fast {ch['fast_score']:.4f}, "
                        f"per-item scores {'equal' if ch['item_scores_equal'] else 'DIFFER at ' + str(ch['items_differing'])}"
                        for ch in checks)
    return {"checked": checks, "passed": passed, "recommendation_confirmed": confirmed, "summary": summary}


# --- plot --------------------------------------------------------------------------------------


def plot_curve(result: dict, path) -> Path:
    """Score vs setting, savings on a second axis, the full score and the budget line, the
    recommendation marked (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    xs = [p["setting"] for p in curve]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(xs, [p["score"] for p in curve], "o-", color="tab:blue", label=f"score ({result['metric']})")
    ax.axhline(result["full_score"], color="tab:green", ls="--", label=f"full model {result['full_score']:.3f}")
    ax.axhline(result["threshold"], color="tab:red", ls=":",
               label=f"budget {result['budget']:g} x full = {result['threshold']:.3f}")
    rec = result["recommended"]
    if rec is not None:
        score = next(p["score"] for p in curve if p["setting"] == rec)
        ax.axvline(rec, color="gray", lw=0.8)
        ax.plot([rec], [score], "*", ms=16, color="tab:orange", label=f"recommended {rec}")
    ax.set_xlabel("context stop layer ℓ" if result["policy"] == "context-stop" else result["policy"])
    ax.set_ylabel("score")
    ax.set_ylim(-0.03, max(1.0, max(p["score"] for p in curve), result["full_score"]) + 0.03)
    ax2 = ax.twinx()
    ax2.plot(xs, [100 * p["savings"] for p in curve], "s-", ms=3, color="tab:purple", alpha=0.6, label="savings")
    ax2.set_ylabel("token-layer work saved (%)", color="tab:purple")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    title = f"{result['policy']} on {result['task']} ({result['num_items']} items)"
    if result["uninformative"]:
        title += ": uninformative (full model scores 0)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SHIPPED_FILE = Path(__file__).with_name("calibrated.json")


def shipped_calibration() -> dict:
    """What calibration found for the built-in tasks on the default model (``skiplayers/calibrated.json``,
    written by ``benchmarks/calibrate_builtin.py``; installed with the package)."""
    return json.loads(SHIPPED_FILE.read_text(encoding="utf-8"))


def load_model_and_tokenizer(path: str | None):
    """The default model, or a local Hugging Face checkpoint directory (offline)."""
    if path is None:
        from .models import load_default_model, load_default_tokenizer

        return load_default_model(), load_default_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer


__all__ = ["POLICIES", "SweepKind", "calibrate", "get_policy", "parse_layers", "plot_curve", "recommend",
           "register_policy", "verify_with_masked"]
