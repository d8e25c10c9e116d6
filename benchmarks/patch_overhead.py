"""Per-call cost of the patched forward on the CPU: one prefill and one decode step of SmolLM2,
patched (the demo's task and layer), as medians in one process; the unpatched model is timed in
the same loop, interleaved, as the yardstick.

It uses only the public API, so the same file times two versions of the patch side by side, one
process each, in turn (how the redesign of issue 15 was compared with the patch before it)::

    for i in 1 2 3; do for tree in /path/old /path/new; do
        PYTHONPATH=$tree python benchmarks/patch_overhead.py --label $tree; done; done

Prints one JSON line: medians in ms of ``prefill`` and ``decode`` (patched, backend "cpu") and of
``prefill_unpatched`` / ``decode_unpatched``; with ``--auto`` also ``prefill_auto`` / ``decode_auto``
(patched with ``backend="auto"``, which on CPU runs the same kernels plus the attention dispatch:
the difference is the dispatch's own cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import skiplayers as sk
from common import demo_batch


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer", type=int, default=27)
    parser.add_argument("--auto", action="store_true", help="also time backend='auto' (interleaved)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, ids, attn, ctx = demo_batch()
    step_ids = torch.full((ids.shape[0], 1), int(ids[0, -1]))
    step_mask = torch.cat([attn, attn.new_ones(ids.shape[0], 1)], dim=1)
    policy = sk.SkipPolicy(context_stop_layer=args.layer)
    variants = {"": "cpu", "_unpatched": None, **({"_auto": "auto"} if args.auto else {})}
    times = {f"{kind}{suffix}": [] for suffix in variants for kind in ("prefill", "decode")}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for suffix, backend in variants.items():
            patched = backend is not None
            if patched:
                sk.patch(model, policy, backend=backend)
            kwargs = {"context_mask": ctx} if patched else {}
            out = {}
            times["prefill" + suffix].append(_timed(lambda: out.setdefault(
                "o", model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1, **kwargs))))
            cache = out["o"].past_key_values
            times["decode" + suffix].append(_timed(lambda: model(
                step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)))
            if patched:
                sk.unpatch(model)
    medians = {k: round(statistics.median(v[1:]), 3) for k, v in times.items()}
    print(json.dumps({"label": args.label, "threads": torch.get_num_threads(), **medians}))


if __name__ == "__main__":
    main()
