"""Compiled vs eager decode step of a patched model on the CPU (issue 15, torch.compile).

Patches SmolLM2 (context stop at the demo's layer), compiles the patched forward with
``torch.compile(fullgraph=True)`` and times one decode step of a batch of 8 prompts, compiled and
eager, interleaved, medians; also checks that both give the same logits and counts recompilations
over the steps. Prints one JSON line (ms)::

    python -m benchmarks.compile_decode [--steps 16] [--layer 27]
"""

from __future__ import annotations

import json
import statistics
import time

import torch

import skiplayers as sk
from benchmarks.common import DEMO_LAYER, arg_parser, demo_batch
from benchmarks.timing import timed


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layer", type=int, default=DEMO_LAYER)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, ids, attn, ctx = demo_batch()
    sk.patch(model, sk.SkipPolicy(context_stop_layer=args.layer), backend="cpu")
    layers = model.config.num_hidden_layers
    eager = model.forward
    compiled = torch.compile(model.forward, fullgraph=True)
    caches = {"eager": sk.SkipCache(layers), "compiled": sk.SkipCache(layers)}
    forwards = {"eager": eager, "compiled": compiled}
    start = time.perf_counter()
    for name in ("eager", "compiled"):
        forwards[name](ids, attention_mask=attn, context_mask=ctx, past_key_values=caches[name], logits_to_keep=1)
    first_call_s = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    worst = 0.0
    mask, token = attn, ids[:, -1:]
    for step in range(args.steps):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = {}
        for name in ("compiled", "eager") if step % 2 else ("eager", "compiled"):
            out, seconds = timed(forwards[name], token, attention_mask=mask, context_mask=ctx,
                                 past_key_values=caches[name], logits_to_keep=1)
            logits[name] = out.logits
            times[name].append(seconds * 1e3)
        worst = max(worst, (logits["eager"] - logits["compiled"]).abs().max().item())
        token = logits["eager"][:, -1:].argmax(-1)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    warm = slice(2, None)  # the first steps compile (prefill graph, then the decode graph)
    result = {
        "decode_eager_ms": round(statistics.median(times["eager"][warm]), 2),
        "decode_compiled_ms": round(statistics.median(times["compiled"][warm]), 2),
        "max_abs_logit_diff": worst,
        "unique_graphs": frames,
        "prefill_both_s": round(first_call_s, 1),
        "threads": torch.get_num_threads(),
    }
    result["speedup"] = round(result["decode_eager_ms"] / result["decode_compiled_ms"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
