"""The C++ CPU attention op against PyTorch's SDPA (and FlexAttention where it runs), side by side.

Cases (float32, SmolLM2's 9 query / 3 KV heads, head dim 64):

* dense causal, B=1, T in {512, 1024, 2048, 4096}: equal work;
* ragged: 8 sequences of different lengths, packed for us; SDPA pads to the longest and takes a
  dense [B, 1, T, T] mask (causal and padding);
* context-stopped: one sequence of c context + q query tokens at a layer >= ℓ. SDPA runs the masked
  form (all rows, dense mask hiding context keys); we run the compacted form (the q rows only), and
  for reference also our masked form (Rule.HIDE_CONTEXT, which skips the hidden key blocks);
* AnSAN prefill (anchors every 20 tokens, T=4096): our op under Rule.ANCHORS (it reads earlier
  sentences' anchors and the tile's own sentences only) against our own dense causal pass and SDPA
  with the AnSAN rule as a dense mask.

Every variant of a case runs round-robin (interleaved), medians of ``--repeats`` runs are reported
as times and as speed relative to SDPA. Writes results/cpu_attention.{json,csv,png}.

    python -m benchmarks.cpu_attention [--repeats 15] [--quick]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import skiplayers.ops as sk_ops
from benchmarks.attention_inputs import (
    SMOLLM2,
    context_stopped_problem,
    packed_problem,
    pad_packed,
    ragged_causal_mask,
    sdpa_layout,
)
from benchmarks.baselines import causal_block_mask, flex_attention_or_reason
from benchmarks.common import RESULTS, arg_parser, pyplot, save_figure, write_results
from benchmarks.timing import interleaved_medians
from skiplayers.meta import TAG_ANCHOR, TAG_SENTENCE_SHIFT, Rule
from skiplayers.reference import visibility_mask

HEADS, KV_HEADS, DIM = SMOLLM2
SCALE = DIM**-0.5


def dense_causal(T, flex):
    q, k, v, cu, pos = packed_problem([T], *SMOLLM2)
    qs, ks, vs = sdpa_layout(q, k, v)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    variants = {
        "skiplayers_cpu": lambda: sk_ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, SCALE),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True, scale=SCALE),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=SCALE),
    }
    compiled, _ = flex
    if compiled is not None:
        block = causal_block_mask(T, "cpu")
        variants["flex_attention"] = lambda: compiled(qs, ks, vs, block_mask=block, enable_gqa=True, scale=SCALE)
    return variants, "sdpa_causal"


def ragged(lengths, flex):
    q, k, v, cu, pos = packed_problem(lengths, *SMOLLM2)
    # SDPA: left-aligned padding to the longest sequence, dense causal & padding mask.
    qs, ks, vs = (pad_packed(t, lengths).transpose(1, 2).contiguous() for t in (q, k, v))
    mask = ragged_causal_mask(lengths)
    seqs = [(qs[b : b + 1, :, :n], ks[b : b + 1, :, :n], vs[b : b + 1, :, :n]) for b, n in enumerate(lengths)]
    variants = {
        "skiplayers_cpu": lambda: sk_ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, SCALE),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=SCALE),
        "sdpa_loop_causal": lambda: [
            F.scaled_dot_product_attention(a, b_, c, is_causal=True, enable_gqa=True, scale=SCALE) for a, b_, c in seqs
        ],
    }
    return variants, "sdpa_dense_mask"


def context_stopped(context, query, flex):
    problem = context_stopped_problem(context, query, *SMOLLM2)
    q, k, v, cu, pos, tag = problem.masked
    qc, kc, vc, cuc, pc = problem.compacted
    qs, ks, vs, mask = problem.sdpa
    variants = {
        "skiplayers_cpu_compacted": lambda: sk_ops.varlen_attention(qc, kc, vc, cuc, cuc, pc, pc, None, None, 0, SCALE),
        "skiplayers_cpu_masked_form": lambda: sk_ops.varlen_attention(q, k, v, cu, cu, pos, pos, tag, tag,
                                                                       Rule.HIDE_CONTEXT, SCALE),
        "sdpa_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True, scale=SCALE),
    }
    return variants, "sdpa_dense_mask"


def ansan_prefill(T, sentence, flex):
    q, k, v, cu, pos = packed_problem([T], *SMOLLM2)
    anchor = torch.zeros(T, dtype=torch.bool)
    anchor[sentence - 1 :: sentence] = True
    sent = anchor.to(torch.int32).cumsum(0) - anchor.to(torch.int32)
    tag = ((anchor.to(torch.int32) * TAG_ANCHOR) | (sent << TAG_SENTENCE_SHIFT)).to(torch.int32)
    mask = visibility_mask(Rule.ANCHORS, pos, tag, pos, tag)
    qs, ks, vs = sdpa_layout(q, k, v)
    variants = {
        "skiplayers_cpu_ansan": lambda: sk_ops.varlen_attention(q, k, v, cu, cu, pos, pos, tag, tag, Rule.ANCHORS, SCALE),
        "skiplayers_cpu_causal": lambda: sk_ops.varlen_attention(q, k, v, cu, cu, pos, pos, None, None, 0, SCALE),
        "sdpa_ansan_dense_mask": lambda: F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True,
                                                                        scale=SCALE),
    }
    return variants, "sdpa_ansan_dense_mask"


def plot(rows, path):
    plt = pyplot()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 1.5))
    labels, values, colors = [], [], []
    palette = {}
    for r in rows:
        labels.append(f"{r['case']} | {r['variant']}")
        values.append(r["speed_vs_baseline"])
        palette.setdefault(r["variant"], f"C{len(palette)}")
        colors.append(palette[r["variant"]])
    ax.barh(range(len(values)), values, color=colors)
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    for i, value in enumerate(values):
        ax.text(value, i, f" x{value:.2f}", va="center", fontsize=7)
    ax.set_xlabel("speed relative to the case's SDPA baseline (log scale, higher is faster)")
    ax.set_title(f"CPU attention, float32, {HEADS}/{KV_HEADS} heads, D={DIM} ({len(cases)} cases, interleaved medians)")
    save_figure(fig, path)


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    flex = flex_attention_or_reason(200, probe=SMOLLM2)
    if flex[1]:
        print(f"FlexAttention skipped: {flex[1]}")
    cases = [(f"dense causal T={T}", lambda T=T: dense_causal(T, flex)) for T in ((512, 2048) if args.quick else (512, 1024, 2048, 4096))]
    cases.append(("ragged 8 seqs", lambda: ragged([2048, 1024, 512, 256, 1500, 100, 700, 300], flex)))
    cases.append(("context-stopped c=1800 q=248", lambda: context_stopped(1800, 248, flex)))
    cases.append(("AnSAN T=4096, sentences of 20", lambda: ansan_prefill(4096, 20, flex)))
    rows = []
    with torch.no_grad():
        for name, build in cases:
            variants, baseline = build()
            medians = interleaved_medians(variants, args.repeats)
            for variant, seconds in medians.items():
                rows.append(dict(case=name, variant=variant, median_ms=round(seconds * 1e3, 3),
                                 speed_vs_baseline=round(medians[baseline] / seconds, 3), baseline=baseline))
                print(f"{name:32} {variant:28} {seconds * 1e3:9.2f} ms  x{medians[baseline] / seconds:5.2f} vs {baseline}")
    json_path, csv_path = write_results("cpu_attention", rows, {"flex_attention_skip_reason": flex[1],
                                                                "repeats": args.repeats})
    plot(rows, RESULTS / "cpu_attention.png")
    print(f"wrote {json_path}, {csv_path}, {RESULTS / 'cpu_attention.png'}")


if __name__ == "__main__":
    main()
