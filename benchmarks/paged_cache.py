"""The paged SkipCache against the rectangular one it replaced: memory held, decode speed, growth.

The rectangular layout (``[B, S_cap, H_kv, D]`` per layer, every sequence padded to the longest,
reallocated with a margin when it grows) no longer exists in this tree, so the two cannot share a
process. This script times a checkout of each, one process per measurement, alternating old / new
/ old / new (``--rounds`` times), and reports medians and the ratio per round; each process times
the unpatched model (transformers' DynamicCache) in the same loop, interleaved, as the yardstick.
It uses only what both versions have (``sk.patch``, ``SkipCache``, its layers' ``append``), so the
same file runs against both::

    git worktree add --detach /tmp/rect <commit before the paged cache>
    (cd /tmp/rect && SKIPLAYERS_NO_CUDA=1 python setup.py build_ext --inplace)
    python -m benchmarks.paged_cache --compare-with /tmp/rect          # ~20 min on 2 cores

Measurements (SmolLM2-135M, float32, CPU, backend "cpu"):

* ``memory``: K/V bytes held after prefill and after 32 greedy decode steps, against the bytes of
  the stored slots (``layer_lengths`` x bytes per slot) and the paged bound (stored + one page per
  (layer, sequence)), for a left-padded few-shot batch at ℓ=9, a ragged batch of 40 / 320 / 1,300
  tokens with context stop at ℓ=15 (all but the last 16 tokens of each are context), and a text
  batch with anchors (sentence ends, AnLLM);
* ``decode``: ms per decode step at 1k / 2k / 4k / 8k stored tokens, batch 1 and 8, nothing
  skipped (the layout is what differs). The caches are filled with random K/V through the layers'
  own ``append`` (a prefill of 8 x 8k tokens would take most of an hour on 2 cores; the decode work
  does not depend on the values);
* ``growth``: the time to grow a 30-layer cache from 0 to 8,192 tokens one token at a time (what a
  long generation does), and the slowest single step (a reallocation), batch 1; the paged cache
  both growing on demand and reserved up front (``max_tokens``).

Writes results/paged_cache.{json,csv,png}.
"""

from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, arg_parser, demo_batch, pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent.parent
DECODE_TOKENS = (1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 8)
DECODE_LAYER_FOR_MEMORY = {"fewshot": 9, "ragged": 15}
RAGGED = (40, 320, 1300)
QUERY = 16  # non-context tokens at the end of each ragged prompt


# --- the worker: one measurement in this process, with whichever skiplayers is importable --------


def _paged(sk) -> bool:
    return "page_size" in inspect.signature(sk.SkipCache.__init__).parameters


def _slot_bytes(model) -> int:
    cfg = model.config
    return 2 * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()


def _memory_row(sk, model, cache, case: str, when: str) -> dict:
    """K/V bytes held against the stored slots' bytes; for the paged cache also the pool (free pages
    included) and the issue's bound: 1.1 x the stored bytes plus one page per (layer, sequence)."""
    lengths = cache.layer_lengths()
    stored = int(lengths.sum()) * _slot_bytes(model)
    row = dict(case=case, when=when, held=cache.nbytes(), stored=stored, held_over_stored=cache.nbytes() / stored)
    if _paged(sk):
        bound = 1.1 * stored + lengths.numel() * cache.page_size * _slot_bytes(model)
        pool = cache.pool_nbytes()
        row.update(pool=pool, pool_over_stored=pool / stored, bound=int(bound), held_within_bound=row["held"] <= bound,
                   pool_within_bound=pool <= bound)
    return row


def _text_batch(tok, lengths=(300, 900)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded English text (CPython's pydoc topics), ``lengths`` tokens each."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    width = max(lengths)
    batch = torch.full((len(lengths), width), tok.pad_token_id or 0)
    attn = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        batch[b, width - n:] = ids[b * 1000 : b * 1000 + n]
        attn[b, width - n:] = 1
    return batch, attn


@torch.no_grad()
def _generate_memory(sk, model, ids, attn, ctx, policy, case: str) -> list[dict]:
    sk.patch(model, policy, backend="cpu")
    try:
        kwargs = {} if ctx is None else {"context_mask": ctx}
        out = model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1, **kwargs)
        cache, rows = out.past_key_values, []
        rows.append(_memory_row(sk, model, cache, case, "prefill"))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(32):
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
            out = model(token, attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
        rows.append(_memory_row(sk, model, cache, case, "after 32 steps"))
        return rows
    finally:
        sk.unpatch(model)


def memory(sk) -> list[dict]:
    model, ids, attn, ctx = demo_batch(3)
    rows = _generate_memory(sk, model, ids, attn, ctx, sk.SkipPolicy(context_stop_layer=9), "fewshot, left-padded, ℓ=9")
    gen = torch.Generator().manual_seed(0)
    width = max(RAGGED)
    ids = torch.randint(3, 40000, (len(RAGGED), width), generator=gen)
    attn = torch.zeros_like(ids)
    ctx = torch.zeros_like(ids, dtype=torch.bool)
    for b, n in enumerate(RAGGED):
        attn[b, width - n:] = 1
        ctx[b, width - n + 1 : width - QUERY] = True  # the first token is never context
    rows += _generate_memory(sk, model, ids, attn, ctx, sk.SkipPolicy(context_stop_layer=15), "ragged 40/320/1300, ℓ=15")
    tok = sk.load_default_tokenizer()
    ids, attn = _text_batch(tok)
    policy = sk.SkipPolicy(anchor_token_ids=sk.anchor_ids(tok, [".", "\n"]))
    rows += _generate_memory(sk, model, ids, attn, None, policy, "text 300/900, anchors")
    return rows


def _filled_caches(sk, model, batch: int, tokens: int, reserve: bool):
    """A SkipCache and a DynamicCache holding ``tokens`` random K/V per sequence at every layer, as a
    prefill of ``tokens`` real tokens (nothing skipped) would leave them."""
    from transformers import DynamicCache

    cfg = model.config
    layers, heads, dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    extra = {"max_tokens": layers * batch * (tokens + 64)} if reserve else {}
    skip = sk.SkipCache(layers, **extra)
    dyn = DynamicCache(config=cfg)
    counts = torch.full((batch,), tokens, dtype=torch.int64)
    cu = torch.arange(batch + 1, dtype=torch.int32) * tokens
    pos = torch.arange(tokens, dtype=torch.int32).repeat(batch)
    ops = sk.ops.get_ops("cpu")
    for idx in range(layers):
        k = torch.randn(batch * tokens, heads, dim)
        v = torch.randn(batch * tokens, heads, dim)
        skip.layers[idx].append(k, v, pos, torch.zeros_like(pos), cu, counts, ops)
        dyn.update(k.view(batch, tokens, heads, dim).transpose(1, 2), v.view(batch, tokens, heads, dim).transpose(1, 2),
                   idx)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    skip.advance(valid, torch.zeros_like(valid), torch.arange(tokens).expand(batch, tokens))
    return skip, dyn


@torch.no_grad()
def decode(sk, batch: int, tokens: int, steps: int) -> dict:
    """Median ms of a decode step over a cache of ``tokens`` (patched, backend "cpu"), and of the
    unpatched model over a DynamicCache, steps interleaved."""
    model = sk.load_default_model()
    skip, dyn = _filled_caches(sk, model, batch, tokens, reserve=False)
    token = torch.full((batch, 1), 42)
    times = {"patched": [], "unpatched": []}
    for step in range(steps + 2):  # the first two steps warm up
        attn = torch.ones(batch, tokens + step + 1, dtype=torch.long)
        for name, cache in (("patched", skip), ("unpatched", dyn)):
            if name == "patched":
                sk.patch(model, sk.SkipPolicy(), backend="cpu")
            start = time.perf_counter()
            model(token, attention_mask=attn, past_key_values=cache, use_cache=True, logits_to_keep=1)
            elapsed = time.perf_counter() - start
            if name == "patched":
                sk.unpatch(model)
            if step >= 2:
                times[name].append(elapsed * 1e3)
    return {f"{k}_ms": statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def growth(sk, tokens: int, reserve: bool) -> dict:
    """Seconds to append one token at a time to every layer of a SmolLM2-shaped cache, from 0 to
    ``tokens``, and the slowest single step in ms (batch 1)."""
    layers, heads, dim = 30, 3, 64
    extra = {"max_tokens": layers * (tokens + 16)} if reserve else {}
    cache = sk.SkipCache(layers, **extra)
    ops = sk.ops.get_ops("cpu")
    one, cu = torch.ones(1, dtype=torch.int64), torch.tensor([0, 1], dtype=torch.int32)
    tag = torch.zeros(1, dtype=torch.int32)
    k = torch.randn(1, heads, dim)
    slowest, start = 0.0, time.perf_counter()
    for t in range(tokens):
        pos = torch.tensor([t], dtype=torch.int32)
        step = time.perf_counter()
        for layer in cache.layers:
            layer.append(k, k, pos, tag, cu, one, ops)
        slowest = max(slowest, time.perf_counter() - step)
    return dict(total_s=time.perf_counter() - start, slowest_step_ms=slowest * 1e3, held=cache.nbytes())


def worker(what: str, args: list[str]) -> None:
    import skiplayers as sk

    torch.set_grad_enabled(False)
    if what == "memory":
        result: object = memory(sk)
    elif what == "decode":
        result = decode(sk, int(args[0]), int(args[1]), int(args[2]))
    else:
        result = growth(sk, int(args[0]), args[1] == "reserved")
    print("RESULT " + json.dumps(dict(paged=_paged(sk), result=result)))


# --- the driver: old and new trees in alternating processes ------------------------------------


def _run(tree: Path, what: str, *args) -> dict:
    # Run as a file, so that ``skiplayers`` (and ``benchmarks``) come from ``tree`` first.
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{HERE}")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", what, *map(str, args)],
                         cwd=HERE, env=env, capture_output=True, text=True, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"the {what} worker failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def compare(old: Path | None, rounds: int, steps: int, growth_tokens: int, batches, sizes,
            sections=("memory", "decode", "growth")) -> list[dict]:
    trees = {"paged": HERE, **({"rectangular": old} if old is not None else {})}
    rows: list[dict] = []
    for layout, tree in trees.items() if "memory" in sections else ():  # deterministic: one run each
        for r in _run(tree, "memory")["result"]:
            rows.append(dict(section="memory", layout=layout, **r))
            print(rows[-1], flush=True)
    for batch in batches if "decode" in sections else ():
        for tokens in sizes:
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(rounds):
                for name, tree in trees.items():
                    runs[name].append(_run(tree, "decode", batch, tokens, steps)["result"])
            for name, results in runs.items():
                rows.append(dict(section="decode", layout=name, batch=batch, tokens=tokens,
                                 patched_ms=statistics.median(r["patched_ms"] for r in results),
                                 unpatched_ms=statistics.median(r["unpatched_ms"] for r in results),
                                 rounds=[round(r["patched_ms"], 2) for r in results]))
                print(rows[-1], flush=True)
    variants = [("paged", HERE, "grow"), ("paged", HERE, "reserved")] + ([("rectangular", old, "grow")] if old else [])
    for layout, tree, mode in variants if "growth" in sections else ():
        r = _run(tree, "growth", growth_tokens, mode)["result"]
        rows.append(dict(section="growth", layout=layout, mode=mode, tokens=growth_tokens, **r))
        print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (ax_mem, ax_dec) = plt.subplots(1, 2, figsize=(13, 4.5))
    mem = [r for r in rows if r["section"] == "memory"]
    labels = [f"{r['case']}\n{r['when']}" for r in mem if r["layout"] == "paged"]
    bars = (("rectangular", "held_over_stored", "rectangular"), ("paged", "held_over_stored", "paged: pages held"),
            ("paged", "pool_over_stored", "paged: whole pool (free pages too)"))
    for i, (layout, key, label) in enumerate(bars):
        values = [r[key] for r in mem if r["layout"] == layout and key in r]
        if values:
            ax_mem.bar([x + 0.27 * i for x in range(len(values))], values, width=0.27, label=label)
    ax_mem.axhline(1.0, color="black", lw=0.8)
    ax_mem.set_xticks([x + 0.27 for x in range(len(labels))], labels, fontsize=6, rotation=30, ha="right")
    ax_mem.set_ylabel("K/V bytes held / bytes of the stored slots")
    ax_mem.set_title("memory held (lower is better; 1.0 = exactly what is stored)")
    ax_mem.legend(fontsize=7)
    dec = [r for r in rows if r["section"] == "decode"]
    for layout, style in (("rectangular", "--"), ("paged", "-")):
        for batch in sorted({r["batch"] for r in dec}):
            pts = [(r["tokens"], r["patched_ms"]) for r in dec if r["layout"] == layout and r["batch"] == batch]
            if pts:
                ax_dec.plot(*zip(*pts), style, marker="o", label=f"{layout}, batch {batch}")
    ax_dec.set_xscale("log", base=2)
    ax_dec.set_xlabel("stored tokens per sequence")
    ax_dec.set_ylabel("ms per decode step (median)")
    ax_dec.set_title("SmolLM2 decode step, CPU, nothing skipped")
    ax_dec.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = arg_parser(__doc__)
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="a checkout of the rectangular cache, built in place (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="old/new process pairs per decode size")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per process")
    parser.add_argument("--growth-tokens", type=int, default=8192)
    parser.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DECODE_TOKENS), help="decode cache sizes")
    parser.add_argument("--sections", nargs="+", default=["memory", "decode", "growth"],
                        choices=["memory", "decode", "growth"])
    parser.add_argument("--quick", action="store_true", help="batch 1 at 1k tokens only, one round (a smoke run)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other sections' rows of the results file in --out (a rerun of some sections)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.growth_tokens, args.batches, args.tokens = 1, 1024, [1], [1024]
    rows = compare(args.compare_with, args.rounds, args.steps, args.growth_tokens, args.batches, args.tokens,
                   args.sections)
    meta = dict(compared_with=str(args.compare_with), rounds=args.rounds, steps=args.steps, sections=args.sections)
    previous = args.out / "paged_cache.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["section"] not in args.sections] + rows
        meta["merged"] = dict(kept_from=old.get("machine", {}).get("date"), sections=args.sections)
    write_results("paged_cache", rows, meta, args.out)
    plot(rows, args.out / "paged_cache.png")


if __name__ == "__main__":
    main()
