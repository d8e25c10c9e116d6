"""Per-call cost of the patched forward on the CPU: one prefill and one decode step of SmolLM2,
patched (the demo's task and layer), as medians in one process; the unpatched model is timed in
the same loop, interleaved, as the yardstick.

It uses only the public API, so the same file times two versions of the patch side by side, one
process each, in turn (how the redesign of issue 15 was compared with the patch before it)::

    for i in 1 2 3; do for tree in /path/old /path/new; do
        PYTHONPATH=$tree:. python benchmarks/patch_overhead.py --label $tree; done; done

(run from this checkout: skiplayers comes from ``$tree``; ``.`` supplies the ``benchmarks`` package
to trees older than it).

Prints one JSON line: medians in ms of ``prefill`` and ``decode`` (patched, backend "cpu") and of
``prefill_unpatched`` / ``decode_unpatched``; with ``--auto`` also ``prefill_auto`` / ``decode_auto``
(patched with ``backend="auto"``, which on CPU runs the same kernels plus the attention dispatch:
the difference is the dispatch's own cost).
"""

from __future__ import annotations

import json
import statistics

import torch

import skiplayers as sk
from benchmarks.common import DEMO_LAYER, arg_parser, decode_step_inputs, demo_batch
from benchmarks.timing import timed


def main() -> None:
    parser = arg_parser(__doc__)
    parser.add_argument("--label", default="")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layer", type=int, default=DEMO_LAYER)
    parser.add_argument("--auto", action="store_true", help="also time backend='auto' (interleaved)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, ids, attn, ctx = demo_batch()
    step_ids, step_mask = decode_step_inputs(ids, attn)
    policy = sk.SkipPolicy(context_stop_layer=args.layer)
    variants = {"": "cpu", "_unpatched": None, **({"_auto": "auto"} if args.auto else {})}
    times = {f"{kind}{suffix}": [] for suffix in variants for kind in ("prefill", "decode")}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for suffix, backend in variants.items():
            patched = backend is not None
            if patched:
                sk.patch(model, policy, backend=backend)
            kwargs = {"context_mask": ctx} if patched else {}
            out, seconds = timed(model, ids, attention_mask=attn, use_cache=True, logits_to_keep=1, **kwargs)
            times["prefill" + suffix].append(seconds * 1e3)
            _, seconds = timed(model, step_ids, attention_mask=step_mask, past_key_values=out.past_key_values,
                               use_cache=True, logits_to_keep=1, **kwargs)
            times["decode" + suffix].append(seconds * 1e3)
            if patched:
                sk.unpatch(model)
    medians = {k: round(statistics.median(v[1:]), 3) for k, v in times.items()}
    print(json.dumps({"label": args.label, "threads": torch.get_num_threads(), **medians}))


if __name__ == "__main__":
    main()
