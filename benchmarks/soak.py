"""Soak: many ``generate()`` calls on the default model, watching memory, NaN and cache size.

Each call draws a random configuration: batch size 1-4 (left-padded few-shot prompts with a random
number of examples each, so context lengths differ within a batch), context stop layer ℓ in
[0, L] or None, anchors ("." and newline) on or off, 2-4 new tokens. ℓ = None with anchors off runs
either the patched model with an empty policy or the unpatched model (plain transformers), half and
half. The model is patched and unpatched around every patched call, as a user switching policies
would.

It reports:

* resident memory (RSS, after ``gc.collect()``) every ``--sample-every`` calls; the criterion is
  RSS after the last call within ``--tolerance`` (5%) of RSS after call ``--warmup`` (100);
* NaN in any computed logit: ``generate()`` returns the logits of the column it samples from
  (always computed; the patch puts NaN only in columns it skips), checked at every step;
* the K/V bytes of the returned cache (``past_key_values.nbytes()`` for a SkipCache, the tensors of
  a DynamicCache), per call.

Results: ``benchmarks/results/soak.json`` and ``benchmarks/results/soak.png`` (RSS against calls).
Exits 1 if the memory criterion fails or any NaN was seen.

    PYTHONPATH=. python benchmarks/soak.py               # 1,000 calls
    PYTHONPATH=. python benchmarks/soak.py --calls 200 --warmup 20
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time

import psutil
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import skiplayers as sk
from skiplayers.cli import EXAMPLES, INSTRUCTIONS
from skiplayers.measure import kv_cache_bytes

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUERIES = ["cat", "forest", "morning", "bridge", "apple tree", "the old man", "light", "glass"]


def rss_bytes() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def draw_config(rng: random.Random, layers: int, max_examples: int) -> dict:
    batch = rng.randint(1, 4)
    stop = rng.choice([None] + list(range(layers + 1)))
    return dict(
        batch=batch,
        examples=[rng.randint(0, max_examples) for _ in range(batch)],
        queries=[rng.choice(QUERIES) for _ in range(batch)],
        context_stop_layer=stop,
        anchors=rng.random() < 0.5,
        new_tokens=rng.randint(2, 4),
        unpatched=stop is None and rng.random() < 0.5,
    )


def one_call(model, tok, anchors, cfg: dict):
    """Runs one generate(); returns (nan count, cache bytes, prompt width, context tokens)."""
    examples = [EXAMPLES[:n] for n in cfg["examples"]]
    ids, attn, ctx = sk.fewshot_batch(tok, INSTRUCTIONS, examples, cfg["queries"])
    gen = dict(attention_mask=attn, max_new_tokens=cfg["new_tokens"], min_new_tokens=cfg["new_tokens"],
               do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=tok.pad_token_id)
    unpatched = cfg["unpatched"] and not cfg["anchors"]
    if unpatched:
        out = model.generate(ids, **gen)
    else:
        policy = sk.SkipPolicy(context_stop_layer=cfg["context_stop_layer"],
                               anchor_token_ids=anchors if cfg["anchors"] else ())
        sk.patch(model, policy)
        try:
            out = model.generate(ids, context_mask=ctx, **gen)
        finally:
            sk.unpatch(model)
    nans = sum(int(torch.isnan(step).sum()) for step in out.logits)
    assert len(out.logits) == cfg["new_tokens"], (len(out.logits), cfg)
    return nans, kv_cache_bytes(out.past_key_values), ids.shape[1], int(ctx.sum())


def plot(samples, warmup, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = [s["calls"] for s in samples]
    rss = [s["rss_bytes"] / 2**20 for s in samples]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(calls, rss, marker=".", lw=1)
    ax.axvline(warmup, color="grey", ls=":", label=f"end of warm-up ({warmup} calls)")
    ax.set_xlabel("generate() calls")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title("SmolLM2-135M soak: RSS after gc.collect()")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100, help="RSS reference point (calls)")
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed RSS growth after warm-up")
    parser.add_argument("--max-examples", type=int, default=8, help="few-shot examples per prompt: 0..this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "soak"), help="path prefix of .json/.png")
    args = parser.parse_args(argv)
    if not 0 < args.warmup < args.calls:
        parser.error("need 0 < --warmup < --calls")

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    model = sk.load_default_model()
    tok = sk.load_default_tokenizer()
    anchors = sk.anchor_ids(tok, [".", "\n"])
    layers = model.config.num_hidden_layers

    samples = [dict(calls=0, rss_bytes=rss_bytes(), seconds=0.0)]
    per_call = []
    total_nans = 0
    start = time.perf_counter()
    bar = tqdm(range(1, args.calls + 1), desc="soak", file=sys.stdout, mininterval=5)
    for i in bar:
        cfg = draw_config(rng, layers, args.max_examples)
        nans, nbytes, width, context = one_call(model, tok, anchors, cfg)
        total_nans += nans
        per_call.append(dict(cfg, call=i, nan=nans, cache_bytes=nbytes, width=width, context_tokens=context))
        if nans:
            tqdm.write(f"call {i}: {nans} NaN logits, config {cfg}")
        if i % args.sample_every == 0 or i in (args.warmup, args.calls):
            if not samples or samples[-1]["calls"] != i:
                samples.append(dict(calls=i, rss_bytes=rss_bytes(), seconds=time.perf_counter() - start))
            bar.set_postfix(rss_mib=f"{samples[-1]['rss_bytes'] / 2**20:.0f}", nan=total_nans)
    bar.close()
    duration = time.perf_counter() - start

    by_calls = {s["calls"]: s["rss_bytes"] for s in samples}
    rss_warm, rss_end = by_calls[args.warmup], by_calls[args.calls]
    after_warmup = [s["rss_bytes"] for s in samples if s["calls"] >= args.warmup]
    ratio = rss_end / rss_warm
    max_ratio = max(after_warmup) / rss_warm
    memory_ok = abs(ratio - 1) <= args.tolerance
    cache = [c["cache_bytes"] for c in per_call]
    skip_cache = [c["cache_bytes"] for c in per_call if not (c["unpatched"] and not c["anchors"])]
    summary = dict(
        calls=args.calls,
        warmup=args.warmup,
        seconds=round(duration, 1),
        rss_mib_start=samples[0]["rss_bytes"] / 2**20,
        rss_mib_at_warmup=rss_warm / 2**20,
        rss_mib_at_end=rss_end / 2**20,
        rss_mib_max_after_warmup=max(after_warmup) / 2**20,
        rss_ratio_end_over_warmup=ratio,
        rss_ratio_max_over_warmup=max_ratio,
        tolerance=args.tolerance,
        memory_ok=memory_ok,
        nan_logits=total_nans,
        calls_with_nan=sum(1 for c in per_call if c["nan"]),
        cache_bytes=dict(min=min(cache), median=statistics.median(cache), max=max(cache), mean=statistics.fmean(cache)),
        skipcache_bytes=dict(min=min(skip_cache), median=statistics.median(skip_cache), max=max(skip_cache))
        if skip_cache else None,
        calls_unpatched=sum(1 for c in per_call if c["unpatched"] and not c["anchors"]),
        calls_with_anchors=sum(1 for c in per_call if c["anchors"]),
        calls_with_context_stop=sum(1 for c in per_call if c["context_stop_layer"] is not None),
        calls_left_padded=sum(1 for c in per_call if c["batch"] > 1 and len(set(c["examples"])) > 1),
    )
    machine = dict(
        python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
        cpus=os.cpu_count(), threads=torch.get_num_threads(), model="SmolLM2-135M-Instruct float32",
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(dict(summary=summary, machine=machine, args=vars(args), rss_samples=samples, calls=per_call), f, indent=1)
    plot(samples, args.warmup, args.out + ".png")

    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"{args.calls} calls in {duration:.0f} s ({duration / args.calls * 1e3:.0f} ms/call)")
    print(f"RSS: start {mib(samples[0]['rss_bytes'])}, after {args.warmup} calls {mib(rss_warm)}, "
          f"after {args.calls} {mib(rss_end)}: ratio {ratio:.4f} (max after warm-up {max_ratio:.4f}; "
          f"allowed ±{args.tolerance:.0%}) -> {'ok' if memory_ok else 'FAIL'}")
    print(f"NaN in computed logits: {total_nans} ({summary['calls_with_nan']} calls)")
    c = summary["cache_bytes"]
    print(f"cache bytes per call: min {mib(c['min'])}, median {mib(c['median'])}, max {mib(c['max'])}")
    print(f"wrote {args.out}.json and {args.out}.png")
    ok = memory_ok and total_nans == 0 and not math.isnan(ratio)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
