"""The host cost of attention dispatch on the CPU: a decode step of SmolLM2 (the demo's batch of 8,
ℓ=27) patched with ``backend="auto"`` against ``backend="cpu"``. On CPU both run the same kernels
(the CPU table names ours for every case), so the ratio is what classifying, choosing and counting
cost per step. Rounds alternate the order of the two variants; each step is undone with
``SkipCache.crop`` so every round decodes the same token over the same cache. Writes
``results/dispatch_overhead.json``.

    python -m benchmarks.dispatch_overhead [--rounds 61]
"""

from __future__ import annotations

import statistics

import torch

import skiplayers as sk
from benchmarks.common import DEMO_LAYER, arg_parser, decode_step_inputs, demo_batch, write_results
from benchmarks.timing import timed


def main(argv=None) -> dict:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=61)
    parser.add_argument("--layer", type=int, default=DEMO_LAYER)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model, ids, attn, ctx = demo_batch()
    step, step_mask = decode_step_inputs(ids, attn)
    policy = sk.SkipPolicy(context_stop_layer=args.layer)
    backends = ("cpu", "auto")
    caches = {}
    for backend in backends:
        with sk.patched(model, policy, backend=backend):
            caches[backend] = model(ids, attention_mask=attn, context_mask=ctx, use_cache=True,
                                    logits_to_keep=1).past_key_values
    times: dict[str, list[float]] = {b: [] for b in backends}
    for r in range(args.rounds):
        for backend in backends if r % 2 else backends[::-1]:
            with sk.patched(model, policy, backend=backend):
                cache = caches[backend]
                _, seconds = timed(model, step, attention_mask=step_mask, context_mask=ctx, past_key_values=cache,
                                   use_cache=True, logits_to_keep=1)
                times[backend].append(seconds * 1e3)
                cache.crop(-1)
    medians = {b: statistics.median(t[1:]) for b, t in times.items()}  # round 0 warms up
    row = dict(decode_ms_cpu=round(medians["cpu"], 3), decode_ms_auto=round(medians["auto"], 3),
               auto_over_cpu=round(medians["auto"] / medians["cpu"], 4), rounds=args.rounds - 1)
    write_results("dispatch_overhead", [row], dict(layer=args.layer, batch=int(ids.shape[0])))
    print(row)
    return row


if __name__ == "__main__":
    main()
