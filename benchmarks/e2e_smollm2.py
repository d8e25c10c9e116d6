"""SmolLM2-135M-Instruct end to end: prefill and decode, patched (context stop) vs unpatched.

For each context length c (q = 50 query tokens, batch 1, float32) and each stop layer ℓ, the
unpatched model and the model patched with ``SkipPolicy(context_stop_layer=ℓ)`` run interleaved in
one process on the same inputs (``skiplayers.measure.compare``); medians are reported next to the
token-layer bound 1 / (1 - (L - ℓ)/L * c/(c+q)). Writes results/e2e_smollm2.{json,csv,png}.

    python benchmarks/e2e_smollm2.py [--runs 5] [--contexts 100 250 500 1000] [--layers 0 5 10 15 20 29]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import skiplayers as sk
from common import RESULTS, write_results
from skiplayers.measure import compare, token_layer_bound


def plot(rows, layers_count, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    contexts = sorted({r["context"] for r in rows})
    for i, c in enumerate(contexts):
        sel = sorted((r for r in rows if r["context"] == c), key=lambda r: r["stop_layer"])
        x = [r["stop_layer"] for r in sel]
        axes[0].plot(x, [r["prefill_speedup"] for r in sel], "o-", color=f"C{i}", label=f"c={c} measured")
        axes[0].plot(x, [r["token_layer_bound"] for r in sel], "--", color=f"C{i}", alpha=0.6, label=f"c={c} bound")
        axes[1].plot(x, [r["decode_speedup"] for r in sel], "o-", color=f"C{i}", label=f"c={c}")
    axes[0].set(title="prefill speedup vs unpatched", xlabel=f"context stop layer ℓ (of {layers_count})",
                ylabel="speedup (x)")
    axes[1].set(title="decode speedup vs unpatched (tokens/s ratio)", xlabel="context stop layer ℓ", ylabel="speedup (x)")
    for ax in axes:
        ax.axhline(1.0, color="black", lw=0.8)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, float32, q=50, batch 1, CPU (interleaved medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per run")
    parser.add_argument("--query", type=int, default=50)
    parser.add_argument("--contexts", type=int, nargs="+", default=[100, 250, 500, 1000])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 29])
    parser.add_argument("--backend", default=None)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model = sk.load_default_model()
    layers_count = model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    rows = []
    with tqdm(total=len(args.contexts) * len(args.layers) * args.runs, desc="SmolLM2 prefill/decode") as bar:
        for c in args.contexts:
            total = c + args.query
            ids = torch.randint(100, model.config.vocab_size, (1, total), generator=gen)
            attn = torch.ones_like(ids)
            ctx = torch.zeros_like(ids, dtype=torch.bool)
            ctx[0, 1 : c + 1] = True
            for stop in args.layers:
                policy = sk.SkipPolicy(context_stop_layer=stop)
                res = compare(model, policy, ids, attn, ctx, args.runs, args.steps, args.backend, progress=bar)
                full_p, skip_p = res.median("full", "prefill_s"), res.median("skip", "prefill_s")
                full_d, skip_d = res.median("full", "decode_s"), res.median("skip", "decode_s")
                rows.append(dict(
                    context=c, query=args.query, stop_layer=stop,
                    full_prefill_ms=round(full_p * 1e3, 2), skip_prefill_ms=round(skip_p * 1e3, 2),
                    prefill_speedup=round(full_p / skip_p, 3),
                    token_layer_bound=round(token_layer_bound([c], [total], layers_count, stop), 3),
                    full_decode_tok_s=round((args.steps - 1) / full_d, 2),
                    skip_decode_tok_s=round((args.steps - 1) / skip_d, 2),
                    decode_speedup=round(full_d / skip_d, 3),
                    full_kv_bytes=int(res.median("full", "kv_bytes")), skip_kv_bytes=int(res.median("skip", "kv_bytes")),
                ))
                r = rows[-1]
                bar.write(f"c={c:5} ℓ={stop:2}: prefill {r['full_prefill_ms']:8.1f} -> {r['skip_prefill_ms']:8.1f} ms "
                          f"(x{r['prefill_speedup']:.2f}, bound x{r['token_layer_bound']:.2f}); decode "
                          f"{r['full_decode_tok_s']:.1f} -> {r['skip_decode_tok_s']:.1f} tok/s")
    json_path, csv_path = write_results("e2e_smollm2", rows, {"runs": args.runs, "decode_steps": args.steps,
                                                              "dtype": "float32", "batch": 1})
    plot(rows, layers_count, RESULTS / "e2e_smollm2.png")
    print(f"wrote {json_path}, {csv_path}, {RESULTS / 'e2e_smollm2.png'}")


if __name__ == "__main__":
    main()
