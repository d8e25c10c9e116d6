"""What calibration finds for the built-in tasks on the default model, and the file the demo ships.

First run the calibration of each task (resumable; the masked-model check included)::

    skiplayers calibrate --task builtin:NAME --out CAL/NAME --max-new-tokens 8 --verify

then this script, which reads ``CAL/NAME/calibration.json``, measures the prefill speedup at the
recommended ℓ on one batch of the task's prompts (interleaved medians, ``measure.compare``), and
writes ``benchmarks/results/calibration_default.json``, ``benchmarks/results/calibration_NAME.png``
and ``skiplayers/calibrated.json`` (installed with the package; ``skiplayers demo`` reads it)::

    python -m benchmarks.calibrate_builtin --cal-dir CAL [--runs 5] [--demo-task NAME]
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch

import skiplayers as sk
from benchmarks.common import RESULTS, arg_parser
from skiplayers.calibration import SHIPPED_FILE
from skiplayers.measure import compare, token_layer_bound
from skiplayers.tasks import BUILTIN_TASKS, builtin_task

BATCH = 8


def measure(model, tokenizer, task: str, layer: int, runs: int, steps: int) -> dict:
    items = builtin_task(task)[:BATCH]
    ids, attn, ctx = sk.fewshot_batch(tokenizer, [it.instructions for it in items],
                                      [list(it.examples) for it in items], [it.query for it in items])
    result = compare(model, sk.SkipPolicy(context_stop_layer=layer), ids, attn, ctx, runs=runs, steps=steps)
    full, skip = result.median("full", "prefill_s"), result.median("skip", "prefill_s")
    bound = token_layer_bound(ctx.sum(1).tolist(), attn.sum(1).tolist(), model.config.num_hidden_layers, layer)
    return {"batch": len(items), "prefill_full_ms": full * 1e3, "prefill_skip_ms": skip * 1e3,
            "prefill_speedup": full / skip, "bound": bound, "runs": runs}


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--cal-dir", required=True, type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--demo-task", default=None, help="default: the task whose recommendation agrees most with the full model")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = sk.load_default_model(), sk.load_default_tokenizer()
    tasks = {}
    for name in BUILTIN_TASKS:
        path = args.cal_dir / name / "calibration.json"
        if not path.exists():
            print(f"{name}: no {path}, skipped")
            continue
        cal = json.loads(path.read_text())
        rec = cal["recommended"]
        row = {"num_items": cal["num_items"], "budget": cal["budget"], "metric": cal["metric"],
               "max_new_tokens": cal["max_new_tokens"], "full_score": cal["full_score"], "recommended": rec,
               "uninformative": cal["uninformative"], "calibration_seconds": cal["seconds"],
               "settings_swept": [p["setting"] for p in cal["curve"]]}
        if rec is not None:
            point = next(p for p in cal["curve"] if p["setting"] == rec)
            outputs, full_outputs = cal["items"][str(rec)]["outputs"], cal["full"]["outputs"]
            row["agreement_with_full"] = sum(a == b for a, b in zip(outputs, full_outputs)) / len(full_outputs)
            row.update(score_at_recommended=point["score"], savings=point["savings"],
                       bound=cal["recommended_bound"])
            row["measured"] = measure(model, tokenizer, name, rec, args.runs, cal["max_new_tokens"])
        if "verify" in cal:
            v = cal["verify"]
            row["masked_check"] = {"passed": v["passed"], "recommendation_confirmed": v.get("recommendation_confirmed"),
                                   "summary": v["summary"]}
        tasks[name] = row
        shutil.copyfile(args.cal_dir / name / "calibration.png", RESULTS / f"calibration_{name}.png")
        print(name, json.dumps(row, indent=1))
    informative = {k: v for k, v in tasks.items() if v["recommended"] is not None}
    # The demo shows the full and the context-stopped answers side by side: pick the task whose
    # recommended layer answers most like the full model (a score within budget can still hide
    # different answers), then the one that saves most.
    demo_task = args.demo_task or max(
        informative, key=lambda k: (informative[k]["agreement_with_full"], informative[k]["savings"])
    )
    meta = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "model": "SmolLM2-135M-Instruct (float32)"}
    (RESULTS / "calibration_default.json").write_text(json.dumps({"meta": meta, "tasks": tasks}, indent=1) + "\n")
    shipped = {
        "model": "SmolLM2-135M-Instruct",
        "produced_by": "skiplayers calibrate --task builtin:NAME --max-new-tokens 8 --verify, "
                       "then benchmarks/calibrate_builtin.py",
        "demo_task": demo_task,
        "tasks": {k: {key: v[key] for key in ("recommended", "full_score", "score_at_recommended", "savings", "bound",
                                              "agreement_with_full", "budget", "num_items", "metric", "max_new_tokens")
                      if key in v}
                  for k, v in tasks.items()},
    }
    SHIPPED_FILE.write_text(json.dumps(shipped, indent=1) + "\n")
    print(f"wrote {SHIPPED_FILE} (demo task {demo_task})")


if __name__ == "__main__":
    main()
