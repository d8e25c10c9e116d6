"""Anchor-only KV caches (AnLLM) on real English text: memory, decode speed and perplexity.

Text: the Python documentation bundled with CPython (``pydoc_data.topics``), tokenised with
SmolLM2's tokenizer; anchors are every token ending in "." or a newline (``sk.anchor_ids``).

* K/V bytes after prefilling 2k/4k/8k tokens: full cache vs anchor cache (``SkipCache.nbytes()``:
  allocated buffers).
* Decode time per token at each length, full cache vs anchor cache, both on the same kernels,
  steps interleaved in one process (medians), next to the bound given by bytes read per step:
  (weights + K/V of the full cache) / (weights + K/V of the anchor cache).
* Perplexity of SmolLM2 on the first ``--ppl-tokens`` tokens: full attention, AnSAN, AnSAN with
  sinks (the first 4 tokens kept visible). SmolLM2 was never trained with anchors, so AnSAN's
  perplexity measures how much this untrained model loses when it may only see earlier sentences
  through their anchors; it says nothing about AnLLM-trained models.

Writes results/anchor_cache.{json,csv,png}.

    python benchmarks/anchor_cache.py [--lengths 2048 4096 8192] [--steps 12]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import skiplayers as sk
from common import RESULTS, write_results


def document_ids(tokenizer, tokens: int) -> torch.Tensor:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise ValueError(f"pydoc_data.topics has only {ids.shape[1]} tokens")
    return ids


def kv_bytes_read(cache, model) -> int:
    """Bytes of K/V a decode step reads: the stored slots (not the spare capacity)."""
    cfg = model.config
    row = 2 * cfg.num_key_value_heads * cfg.head_dim * next(model.parameters()).element_size()
    return int(cache.layer_lengths().sum()) * row


@torch.no_grad()
def prefill(model, policy, ids):
    sk.patch(model, policy)
    try:
        out = model(ids, use_cache=True, logits_to_keep=1)
    finally:
        sk.unpatch(model)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode_step(model, policy, cache, token, columns):
    sk.patch(model, policy)
    try:
        start = time.perf_counter()
        out = model(token, attention_mask=torch.ones(1, columns + 1, dtype=torch.long), past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        elapsed = time.perf_counter() - start
    finally:
        sk.unpatch(model)
    return out.logits[:, -1:].argmax(-1), elapsed


@torch.no_grad()
def perplexity(model, policy, ids) -> float:
    sk.patch(model, policy)
    try:
        logits = model(ids, use_cache=False).logits[0, :-1].float()
    finally:
        sk.unpatch(model)
    return math.exp(F.cross_entropy(logits, ids[0, 1:]).item())


def plot(rows, ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    n = [r["tokens"] for r in rows]
    axes[0].plot(n, [r["full_kv_mib"] for r in rows], "o-", label="full cache")
    axes[0].plot(n, [r["anchor_kv_mib"] for r in rows], "o-", label="anchor cache")
    axes[0].set(title="K/V bytes held (MiB)", xlabel="tokens", yscale="log")
    axes[1].plot(n, [r["full_decode_ms"] for r in rows], "o-", label="full cache")
    axes[1].plot(n, [r["anchor_decode_ms"] for r in rows], "o-", label="anchor cache")
    axes[1].set(title="decode time per token (ms)", xlabel="tokens")
    axes[2].bar(list(ppl), list(ppl.values()), color=["C0", "C1", "C2"])
    axes[2].set(title="SmolLM2 perplexity (not trained with anchors)", yscale="log")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle("SmolLM2-135M, float32, CPU: anchors '.' and newline on pydoc_data.topics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--steps", type=int, default=12, help="decode steps per variant (interleaved)")
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    model, tokenizer = sk.load_default_model(), sk.load_default_tokenizer()
    anchors = sk.anchor_ids(tokenizer, [".", "\n"])
    full_policy, anchor_policy = sk.SkipPolicy(), sk.SkipPolicy(anchor_token_ids=anchors)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # lm_head is tied to the embedding
    rows = []
    for n in tqdm(args.lengths, desc="lengths"):
        ids = document_ids(tokenizer, n)
        caches, tokens = {}, {}
        for name, policy in (("full", full_policy), ("anchor", anchor_policy)):
            caches[name], tokens[name] = prefill(model, policy, ids)
        nbytes = {name: caches[name].nbytes() for name in caches}
        read = {name: kv_bytes_read(caches[name], model) for name in caches}
        times = {"full": [], "anchor": []}
        columns = n
        for _ in range(args.steps):
            for name, policy in (("full", full_policy), ("anchor", anchor_policy)):
                tokens[name], elapsed = decode_step(model, policy, caches[name], tokens[name], columns)
                times[name].append(elapsed)
            columns += 1
        full_ms, anchor_ms = (statistics.median(times[k][1:]) * 1e3 for k in ("full", "anchor"))
        bound = (weight_bytes + read["full"]) / (weight_bytes + read["anchor"])
        rows.append(dict(
            tokens=n, anchors=int(torch.isin(ids, torch.tensor(anchors)).sum()),
            full_kv_mib=round(nbytes["full"] / 2**20, 2), anchor_kv_mib=round(nbytes["anchor"] / 2**20, 2),
            kv_reduction=round(1 - nbytes["anchor"] / nbytes["full"], 4),
            full_decode_ms=round(full_ms, 2), anchor_decode_ms=round(anchor_ms, 2),
            decode_speedup=round(full_ms / anchor_ms, 3), bytes_bound=round(bound, 3),
            speedup_over_bound=round(full_ms / anchor_ms / bound, 3),
        ))
        tqdm.write(str(rows[-1]))
    ppl_ids = document_ids(tokenizer, args.ppl_tokens)
    ppl = {
        "full attention": perplexity(model, full_policy, ppl_ids),
        "AnSAN": perplexity(model, anchor_policy, ppl_ids),
        "AnSAN + 4 sinks": perplexity(model, sk.SkipPolicy(anchor_token_ids=anchors, anchor_keep_first=4), ppl_ids),
    }
    print("perplexity:", {k: round(v, 2) for k, v in ppl.items()})
    json_path, csv_path = write_results("anchor_cache", rows, {
        "perplexity": ppl, "perplexity_tokens": args.ppl_tokens, "anchor_token_count": len(anchors),
        "weight_bytes": weight_bytes, "decode_steps": args.steps,
    })
    plot(rows, ppl, RESULTS / "anchor_cache.png")
    print(f"wrote {json_path}, {csv_path}, {RESULTS / 'anchor_cache.png'}")


if __name__ == "__main__":
    main()
