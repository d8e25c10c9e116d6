"""SmolLM2-135M-Instruct with the skipping family: savings against their bounds, and quality.

**Savings** (rows with ``section="savings"``). The batch is ``common.demo_batch``: the first 8 prompts
of the built-in ``number_words`` task (5-shot, 61-70 tokens each, left-padded to 70; float32, CPU).
For each setting the unpatched model and the patched model run interleaved in one process
(``skiplayers.measure.compare``): a prefill, then ``--steps`` greedy decode steps; medians of
``--runs``. Settings: the model patched with nothing to skip (the patch's own cost, and its not
computing padding rows); attention dropped in the last k layers; static skip sets; early exit; and
one batch of 8 sequences with 8 different ``layer_mask`` s (sequence i keeps the first 4 and the
last 2 layers and skips a seeded random share (i + 1) / 10 of the 24 layers between them).

Bounds, per phase (prefill = the first forward call, decode = the others), from one untimed run of
the patched model:

* ``*_bound``: the layer-row work left, ``full_row_layers / row_layers`` of ``sk.work_report``
  (rows = real tokens). Attention dropping leaves it at 1 (its layers still run their MLP), so for it
  the bound is ``1 / (1 - k / L * a)`` with ``a`` the attention share of a layer's per-token
  multiply-adds, from the config: q, k, v, o projections ``d * (2 q + 2 kv)`` plus QK^T and PV
  ``2 q * keys`` (``keys``: mean attended keys of the phase) against that plus the MLP's
  ``3 d * intermediate`` (d = hidden size, q / kv = query / key-value heads x head dim).
* ``*_union_bound`` (the layer_mask batches): the work if every sequence ran every layer that any
  sequence runs, ``L / |union of the layers run|``; the batch should cost the layers it runs
  (``*_vs_bound`` >= 0.8), not the union, wherever a layer's cost follows its rows.

**Where a layer's cost follows its rows** (``section="layer_cost"``): the decoder layers' linear
projections timed on n rows, cycling through all L layers so that every layer's weights come from
memory as they do in a decode step (``--cost-rows``). On the machine this was written on, 1 to 8
rows cost 1.3 to 2.2 ms per layer, not in proportion to the rows (the weights' read, not the
multiply-adds, is the cost; 2 and 3 rows cost more than 4 or 8), and the cost per row falls towards
a floor only from about 32 rows on. So a decode step of the batch of
8 costs about the union of the layers its sequences run, which for these 8 masks is all L: no
kernel can make it cost the rows (every layer's weights must be read once per step if one
sequence runs it). The row savings of a decode step appear with more rows per layer, so the
layer_mask setting also runs on ``--wide`` times the batch (the 8 prompts and their 8 masks
repeated: 64 sequences by default, the same masks, so the same bounds).
* ``*_flop_bound``: multiply-adds of the unpatched run over those of the patched run, counted by
  forward hooks on every ``nn.Linear`` (so the unpatched model's padding rows, the LM head, early
  exit's head calls at every exit layer and its K/V propagation count) plus QK^T / PV at the
  phase's mean keys. It says what the row bound leaves out.

``*_vs_bound`` = measured speedup / bound, ``*_vs_flop_bound`` likewise. The unpatched model also
computes the padding rows of the left-padded prompts (560 rows for 517 tokens), the patched one does
not: that alone makes a patched prefill up to ~8% faster, which the FLOP bound counts and the row
bound does not. ``decode_token_agreement``: the share of greedy tokens the
patched model decodes equal to the unpatched model's.

**Quality** (``section="quality"``): greedy few-shot accuracy (exact match of the first output line,
``--max-new-tokens`` 8) on ``builtin:number_words`` (``--items`` of its 40 items, batches of 8, as
``skiplayers.calibration`` prepares and generates them) of the full model; attention dropped in the
last k layers; static skip sets; and early exit after layers 12, 18, 24 at several thresholds, with
the exit rate and mean exit layer of the decode rows (``sk.work_report``; rows fed after a sequence
finished its line count too). SmolLM2 was not trained for any of this: the numbers say what the
techniques do to a model that was not made for them.

Writes ``results/skipping.{json,csv,png}``; ``--smoke`` runs a few settings on 4 prompts and 8
items and writes ``skipping_smoke.*`` to a temporary directory (or ``--out``).

    python -m benchmarks.skipping [--runs 5] [--steps 16] [--items 40] [--threads 1] [--wide 8]
    python -m benchmarks.skipping --smoke
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import skiplayers as sk
from benchmarks.common import RESULTS, arg_parser, demo_batch, pyplot, save_figure, write_results
from skiplayers.calibration import generate_outputs, get_metric, prepare
from skiplayers.measure import compare, run_once
from skiplayers.tasks import builtin_task

TASK = "number_words"
EXIT_LAYERS = (12, 18, 24)
KEEP_FIRST, KEEP_LAST = 4, 2  # layers every sequence of the layer_mask batch keeps


@dataclass(frozen=True)
class Setting:
    name: str
    kind: str  # full | none | drop_attention | skip_layers | layer_mask | early_exit
    policy: sk.SkipPolicy | None  # None: the unpatched model
    layer_mask: torch.Tensor | None = None
    x: float | None = None  # the swept value: k dropped layers, or the exit threshold


def drop_last(k: int, layers: int) -> Setting:
    return Setting(f"drop attention, last {k}", "drop_attention",
                   sk.SkipPolicy(drop_attention_layers=range(layers - k, layers)), x=k)


def skip(name: str, layers) -> Setting:
    return Setting(f"skip {name}", "skip_layers", sk.SkipPolicy(skip_layers=layers), x=len(layers))


def early_exit(threshold: float) -> Setting:
    return Setting(f"early exit {threshold:g}", "early_exit",
                   sk.SkipPolicy(early_exit=sk.EarlyExit(layers=EXIT_LAYERS, threshold=threshold)), x=threshold)


def per_sequence_masks(batch: int, layers: int, seed: int = 0) -> torch.Tensor:
    """bool [batch, layers]: sequence i keeps the first KEEP_FIRST and last KEEP_LAST layers and
    skips a seeded random share (i + 1) / (batch + 2) of the layers between them."""
    gen = torch.Generator().manual_seed(seed)
    middle = torch.arange(KEEP_FIRST, layers - KEEP_LAST)
    mask = torch.ones(batch, layers, dtype=torch.bool)
    for i in range(batch):
        n_skip = round(len(middle) * (i + 1) / (batch + 2))
        mask[i, middle[torch.randperm(len(middle), generator=gen)[:n_skip]]] = False
    return mask


def savings_settings(layers: int, batch: int, smoke: bool) -> list[Setting]:
    masks = Setting(f"layer_mask, {batch} masks", "layer_mask", sk.SkipPolicy(), per_sequence_masks(batch, layers))
    if smoke:
        return [drop_last(6, layers), skip("last 6", range(layers - 6, layers)), masks, early_exit(0.9)]
    return [Setting("patched, nothing skipped", "none", sk.SkipPolicy()),
            drop_last(6, layers), drop_last(12, layers),
            skip("10-20 every other", range(10, 21, 2)), skip("last 6", range(layers - 6, layers)),
            masks, early_exit(0.9), early_exit(0.5)]


def quality_settings(layers: int, smoke: bool) -> list[Setting]:
    full = Setting("full model", "full", None, x=0)
    if smoke:
        return [full, drop_last(6, layers), skip("last 6", range(layers - 6, layers)), early_exit(0.9), early_exit(0.5)]
    return [full, *(drop_last(k, layers) for k in (2, 4, 6, 8, 12)),
            skip("15", [15]), skip("20-23", range(20, 24)), skip("10-20 every other", range(10, 21, 2)),
            skip("last 6", range(layers - 6, layers)),
            *(early_exit(t) for t in (0.5, 0.7, 0.9, 0.99))]


# --- bounds ------------------------------------------------------------------------------------


def widths(config) -> tuple[int, int, int]:
    """Hidden size d, query width q (heads x head dim) and key-value width kv."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    return d, config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim


def per_token_macs(config, keys: float) -> tuple[float, float]:
    """Multiply-adds per token and layer: (attention, MLP). Attention: the q, k, v, o projections
    and QK^T + PV over ``keys`` keys; MLP: gate, up and down projections."""
    d, q, kv = widths(config)
    return d * (2 * q + 2 * kv) + 2 * q * keys, 3 * d * config.intermediate_size


def attention_drop_bound(config, dropped: int, keys: float) -> float:
    attention, mlp = per_token_macs(config, keys)
    return 1.0 / (1.0 - dropped / config.num_hidden_layers * attention / (attention + mlp))


def mean_keys(attn: torch.Tensor, steps: int) -> tuple[float, float]:
    """Mean keys a query attends to in prefill (causal over each prompt's real tokens) and decode."""
    n = attn.sum(1).double()
    return float((n * (n + 1) / 2).sum() / n.sum()), float(n.mean()) + steps / 2


class Recorder:
    """Untimed instrumentation of one run: multiply-adds of every ``nn.Linear`` call and the rows of
    every q projection (forward hooks), and on a patched model ``sk.work_report``, all three
    snapshotted (cumulative) after each top-level forward call."""

    def __init__(self, model):
        self.model, self.macs, self.q_rows, self.calls = model, 0, 0, []
        self.q_projs = {m for name, m in model.named_modules() if name.endswith("self_attn.q_proj")}

    def _linear(self, module, args, out):
        rows = args[0].numel() // module.in_features
        self.macs += rows * module.in_features * module.out_features
        if module in self.q_projs:
            self.q_rows += rows

    def _call(self, module, args, out):
        report = sk.work_report(self.model) if sk.is_patched(self.model) else None
        self.calls.append((self.macs, self.q_rows, report))

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._linear) for m in self.model.modules()
                        if isinstance(m, torch.nn.Linear)]
        self.handles.append(self.model.register_forward_hook(self._call))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def phases(self, config, keys: tuple[float, float]) -> dict:
        """Per phase (prefill: the first call; decode: the rest): multiply-adds (linear layers plus
        QK^T / PV at the phase's mean keys), and the layer-rows of the work report."""
        (m0, q0, r0), (m1, q1, r1) = self.calls[0], self.calls[-1]
        q = widths(config)[1]
        out = {"prefill": {"macs": m0 + q0 * 2 * q * keys[0]},
               "decode": {"macs": (m1 - m0) + (q1 - q0) * 2 * q * keys[1]}}
        if r0 is not None:
            out["prefill"].update(row_layers=r0.row_layers, full_row_layers=r0.full_row_layers)
            out["decode"].update(row_layers=r1.row_layers - r0.row_layers,
                                 full_row_layers=r1.full_row_layers - r0.full_row_layers,
                                 exits=r1.exits, exit_rows=r1.exit_rows, mean_exit_layer=r1.mean_exit_layer)
        return out


def record(model, setting: Setting | None, ids, attn, steps: int, keys, backend) -> dict:
    """The phases of one untimed run (``setting=None``: the unpatched model)."""
    recorder = Recorder(model)
    if setting is None:
        with recorder:
            run_once(model, ids, attn, None, steps)
    else:
        with sk.patched(model, setting.policy, backend), recorder:
            run_once(model, ids, attn, None, steps, setting.layer_mask)
    return recorder.phases(model.config, keys)


# --- savings -----------------------------------------------------------------------------------


def savings_row(setting: Setting, res, full: dict, patched: dict, config, keys, steps: int) -> dict:
    row = {"section": "savings", "setting": setting.name, "kind": setting.kind}
    for i, phase in enumerate(("prefill", "decode")):
        t_full, t_skip = res.median("full", f"{phase}_s"), res.median("skip", f"{phase}_s")
        work = patched[phase]
        if setting.kind == "drop_attention":
            bound = attention_drop_bound(config, len(setting.policy.drop_attention_layers), keys[i])
        else:
            bound = work["full_row_layers"] / work["row_layers"]
        flop_bound = full[phase]["macs"] / work["macs"]
        row.update({f"full_{phase}_ms": round(t_full * 1e3, 2), f"patched_{phase}_ms": round(t_skip * 1e3, 2),
                    f"{phase}_speedup": round(t_full / t_skip, 3), f"{phase}_bound": round(bound, 3),
                    f"{phase}_vs_bound": round(t_full / t_skip / bound, 3),
                    f"{phase}_flop_bound": round(flop_bound, 3),
                    f"{phase}_vs_flop_bound": round(t_full / t_skip / flop_bound, 3),
                    f"{phase}_row_layers": work["row_layers"], f"{phase}_full_row_layers": work["full_row_layers"]})
    if setting.layer_mask is not None:
        union = int(setting.layer_mask.any(0).sum())
        row["layers_run_per_sequence"] = " ".join(str(int(n)) for n in setting.layer_mask.sum(1))
        row["union_layers"] = union
        for phase in ("prefill", "decode"):  # rows x union layers against rows x L
            row[f"{phase}_union_bound"] = round(config.num_hidden_layers / union, 3)
    if setting.kind == "early_exit":
        d = patched["decode"]
        row.update(exit_rate=round(d["exits"] / d["exit_rows"], 3), mean_exit_layer=round(d["mean_exit_layer"], 2))
    row["decode_token_agreement"] = round((res.skip[0].tokens == res.full[0].tokens).float().mean().item(), 3)
    row["decode_steps"] = steps
    return row


def run_savings(model, batches, args) -> list[dict]:
    """``batches``: ``(ids, attn, settings)`` triples; each batch's settings run against the
    unpatched model on that batch."""
    rows = []
    total = sum(len(settings) for _, _, settings in batches) * args.runs
    with tqdm(total=total, desc="savings (interleaved runs)") as bar:
        for ids, attn, settings in batches:
            keys = mean_keys(attn, args.steps)
            full = record(model, None, ids, attn, args.steps, keys, args.backend)
            for setting in settings:
                patched = record(model, setting, ids, attn, args.steps, keys, args.backend)  # also a warmup
                res = compare(model, setting.policy, ids, attn, None, args.runs, args.steps, args.backend,
                              progress=bar, layer_mask=setting.layer_mask)
                rows.append({**savings_row(setting, res, full, patched, model.config, keys, args.steps),
                             "batch": ids.shape[0]})
                r = rows[-1]
                bar.write(f"{setting.name:28}: prefill x{r['prefill_speedup']:.2f} (bound x{r['prefill_bound']:.2f}, "
                          f"flops x{r['prefill_flop_bound']:.2f}); decode x{r['decode_speedup']:.2f} "
                          f"(bound x{r['decode_bound']:.2f}, flops x{r['decode_flop_bound']:.2f})")
    return rows


def wide_batch(ids, attn, masks: Setting, repeat: int):
    """The batch and its masks repeated ``repeat`` times: the same bounds, ``repeat`` x the rows per layer."""
    setting = Setting(f"{masks.name} x {repeat} ({repeat * ids.shape[0]} seqs)", masks.kind, masks.policy,
                      masks.layer_mask.repeat(repeat, 1))
    return ids.repeat(repeat, 1), attn.repeat(repeat, 1), [setting]


# --- the cost of a layer vs its rows -----------------------------------------------------------


def layer_cost(model, row_counts: list[int], repeats: int = 7) -> list[dict]:
    """``section="layer_cost"``: median time of the decoder layers' linear projections on n rows
    (``[1, n, in_features]`` inputs), per layer, over passes through all layers in order, so each
    layer's weights are read from memory as in a decode step rather than from a warm cache."""
    projections = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    layers = model.config.num_hidden_layers
    out = []
    for n in tqdm(row_counts, desc="layer cost vs rows"):
        inputs = {f: torch.randn(1, n, f) for f in {m.in_features for m in projections}}
        times = []
        for _ in range(repeats + 1):  # the first pass warms the allocator
            start = time.perf_counter()
            for module in projections:
                module(inputs[module.in_features])
            times.append(time.perf_counter() - start)
        ms = statistics.median(times[1:]) * 1e3 / layers
        out.append({"section": "layer_cost", "setting": f"{n} rows", "kind": "layer_cost", "rows": n,
                    "ms_per_layer": round(ms, 3), "ms_per_row_layer": round(ms / n, 4)})
    return out


# --- quality -----------------------------------------------------------------------------------


def score_setting(model, tok, prep, setting: Setting, args, bar) -> tuple[list[str], object]:
    """First output lines of every item and the work report (None for the full model)."""
    if setting.policy is None:
        return generate_outputs(model, tok, prep, None, args.max_new_tokens, progress=bar), None
    # generate_outputs(policy=None) generates with the model as it is: patched here, by us, so that
    # its work log (exits, mean exit layer) is still there to read after the generations.
    with sk.patched(model, setting.policy, args.backend):
        outputs = generate_outputs(model, tok, prep, None, args.max_new_tokens, progress=bar)
        return outputs, sk.work_report(model)


def run_quality(model, tok, settings, args) -> list[dict]:
    items = builtin_task(TASK)[: args.items]
    prep = prepare(tok, items, 8, args.max_new_tokens, model.config.max_position_embeddings)
    exact = get_metric("exact")
    rows, full_outputs = [], None
    with tqdm(total=len(settings) * len(items), desc=f"quality ({TASK})", unit="item") as bar:
        for setting in settings:
            start = time.perf_counter()
            outputs, report = score_setting(model, tok, prep, setting, args, bar)
            full_outputs = outputs if full_outputs is None else full_outputs
            row = {"section": "quality", "setting": setting.name, "kind": setting.kind, "x": setting.x,
                   "task": TASK, "items": len(items),
                   "accuracy": round(sum(exact(o, it.answer) for o, it in zip(outputs, items)) / len(items), 4),
                   "agreement_with_full": round(sum(a == b for a, b in zip(outputs, full_outputs)) / len(items), 4),
                   "layer_rows_saved": round(report.fraction_saved, 4) if report else 0.0,
                   "seconds": round(time.perf_counter() - start, 1)}
            if report is not None and report.exit_rows:
                row.update(exit_rate=round(report.exit_rate, 4), mean_exit_layer=round(report.mean_exit_layer, 2))
            rows.append(row)
            bar.write(f"{setting.name:28}: accuracy {row['accuracy']:.3f}, agreement {row['agreement_with_full']:.3f}"
                      + (f", exit rate {row['exit_rate']:.2f}, mean exit layer {row['mean_exit_layer']:.1f}"
                         if "exit_rate" in row else ""))
    return rows


# --- plot --------------------------------------------------------------------------------------


def plot(rows, layers: int, title: str, path: Path) -> None:
    plt = pyplot()
    savings = [r for r in rows if r["section"] == "savings"]
    quality = [r for r in rows if r["section"] == "quality"]
    cost = [r for r in rows if r["section"] == "layer_cost"]
    full = next((r["accuracy"] for r in quality if r["kind"] == "full"), None)
    fig = plt.figure(figsize=(19, 10))
    grid = fig.add_gridspec(2, 3)
    axes = {"savings": fig.add_subplot(grid[0, :2]), "cost": fig.add_subplot(grid[0, 2]),
            "drop": fig.add_subplot(grid[1, 0]), "skip": fig.add_subplot(grid[1, 1]),
            "exit": fig.add_subplot(grid[1, 2])}

    ax, x = axes["savings"], range(len(savings))
    for shift, phase, color in ((-0.2, "prefill", "C0"), (0.2, "decode", "C1")):
        xs = [i + shift for i in x]
        ax.bar(xs, [r[f"{phase}_speedup"] for r in savings], 0.4, color=color, label=f"{phase} measured")
        ax.plot(xs, [r[f"{phase}_bound"] for r in savings], "_", ms=18, mew=2.5, color="black")
        ax.plot(xs, [r[f"{phase}_flop_bound"] for r in savings], "_", ms=12, mew=1.5, color="tab:red")
        union = [(i, r[f"{phase}_union_bound"]) for i, r in zip(xs, savings) if f"{phase}_union_bound" in r]
        if union:
            ax.plot(*zip(*union), "x", ms=9, color="tab:purple")
    ax.plot([], [], "_", color="black", mew=2.5, ms=12, label="bound (layer-rows; attention share for drops)")
    ax.plot([], [], "_", color="tab:red", mew=1.5, ms=12, label="FLOP bound (linear layers, head, exits)")
    ax.plot([], [], "x", color="tab:purple", label="union bound (layer_mask)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(list(x), [r["setting"] for r in savings], rotation=30, ha="right", fontsize=8)
    top = max(r[k] for r in savings for k in r if k.endswith(("_speedup", "_bound")))
    ax.set(title="speedup over unpatched (interleaved medians)", ylabel="speedup (x)", ylim=(0, 1.45 * top))
    ax.legend(fontsize=7, loc="upper left", ncol=2)

    def quality_line(ax, kind, label):
        sel = sorted((r for r in quality if r["kind"] in (kind, "full")), key=lambda r: r["x"])
        ax.plot([r["x"] for r in sel], [r["accuracy"] for r in sel], "o-", label="accuracy")
        ax.plot([r["x"] for r in sel], [r["agreement_with_full"] for r in sel], "s--", ms=4,
                label="agreement with full")
        ax.set(xlabel=label, ylabel="exact match", ylim=(-0.03, 1.03))

    ax = axes["cost"]
    if cost:
        ns = [r["rows"] for r in cost]
        ax.plot(ns, [r["ms_per_layer"] for r in cost], "o-", label="measured")
        ax.plot(ns, [cost[0]["ms_per_layer"] * n / ns[0] for n in ns], ":", color="gray",
                label=f"proportional to rows (from {ns[0]})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(title="a decoder layer's linear projections vs rows\n(weights read from memory, as in decode)",
               xlabel="rows computed by the layer", ylabel="ms per layer")
        ax.legend(fontsize=8)

    quality_line(axes["drop"], "drop_attention", f"attention dropped in the last k of {layers} layers")
    axes["drop"].set_title(f"{TASK}: dropped attention layers")
    axes["drop"].legend(fontsize=8)

    ax = axes["skip"]
    sel = [r for r in quality if r["kind"] == "skip_layers"]
    ax.bar([i - 0.2 for i in range(len(sel))], [r["accuracy"] for r in sel], 0.4, color="C0", label="accuracy")
    ax.bar([i + 0.2 for i in range(len(sel))], [r["agreement_with_full"] for r in sel], 0.4, color="C1",
           label="agreement with full")
    for i, r in enumerate(sel):
        ax.text(i, max(r["accuracy"], r["agreement_with_full"]) + 0.02,
                f"{r['accuracy']:.2f}, {100 * r['layer_rows_saved']:.0f}% rows saved", ha="center", fontsize=7)
    if full is not None:
        ax.axhline(full, color="black", ls="--", lw=1, label=f"full model {full:.2f}")
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(sel)), [r["setting"] for r in sel], rotation=20, ha="right", fontsize=8)
    ax.set(title=f"{TASK}: static skip sets", ylabel="exact match", ylim=(0, 1.1))

    ax = axes["exit"]
    sel = sorted((r for r in quality if r["kind"] == "early_exit"), key=lambda r: r["x"])
    ts = [r["x"] for r in sel]
    ax.plot(ts, [r["accuracy"] for r in sel], "o-", label="accuracy")
    ax.plot(ts, [r["exit_rate"] for r in sel], "^-", color="C4", label="exit rate (decode rows)")
    if full is not None:
        ax.axhline(full, color="black", ls="--", lw=1, label=f"full model {full:.2f}")
    ax.set(title=f"{TASK}: early exit after layers {', '.join(map(str, EXIT_LAYERS))}", xlabel="threshold",
           ylabel="exact match / exit rate", ylim=(-0.03, 1.03))
    ax2 = ax.twinx()
    ax2.plot(ts, [r["mean_exit_layer"] for r in sel], "s:", color="C3", label="mean exit layer")
    ax2.set(ylabel="mean exit layer", ylim=(0, layers))
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = ax2.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, fontsize=8, loc="lower left")

    fig.suptitle(title)
    save_figure(fig, path)


# --- main --------------------------------------------------------------------------------------


def main(argv=None):
    parser = arg_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5, help="interleaved timed runs per savings setting")
    parser.add_argument("--steps", type=int, default=16, help="greedy tokens per run (prefill + steps - 1 decode)")
    parser.add_argument("--items", type=int, default=40, help=f"quality items of builtin:{TASK} (of 40)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared machine's noise down)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--wide", type=int, default=8,
                        help="the layer_mask batch is also run repeated this many times (64 sequences)")
    parser.add_argument("--cost-rows", type=lambda t: [int(n) for n in t.split(",")],
                        default=[1, 2, 3, 4, 6, 8, 16, 32, 64], help="row counts of the layer-cost section")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default: benchmarks/results)")
    parser.add_argument("--smoke", action="store_true",
                        help="4 prompts, 8 steps, 1 run, a few settings, 8 items; writes skipping_smoke.* "
                             "to a temporary directory unless --out")
    args = parser.parse_args(argv)
    if args.smoke:
        args.runs, args.steps, args.items, args.wide, args.cost_rows = 1, 8, 8, 2, [1, 8]
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    stem = "skipping_smoke" if args.smoke else "skipping"
    out = args.out or (Path(tempfile.mkdtemp(prefix="skipping_")) if args.smoke else RESULTS)

    start = time.perf_counter()
    batch = 4 if args.smoke else 8
    model, ids, attn, _ = demo_batch(batch)
    tok = sk.load_default_tokenizer()
    layers = model.config.num_hidden_layers
    savings = savings_settings(layers, batch, args.smoke)
    masks = next(s for s in savings if s.layer_mask is not None)
    rows = layer_cost(model, args.cost_rows)
    rows += run_savings(model, [(ids, attn, savings), wide_batch(ids, attn, masks, args.wide)], args)
    savings_s = time.perf_counter() - start
    rows += run_quality(model, tok, quality_settings(layers, args.smoke), args)
    mask = masks.layer_mask
    keys = mean_keys(attn, args.steps)
    meta = {
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "runs": args.runs, "decode_steps": args.steps,
        "savings_batch": f"common.demo_batch({batch}): builtin:{TASK} prompts", "batch": batch,
        "prompt_tokens": attn.sum(1).tolist(), "padded_length": ids.shape[1],
        "mean_keys_prefill_decode": [round(k, 1) for k in keys],
        "per_token_layer_macs_prefill": dict(zip(("attention", "mlp"), per_token_macs(model.config, keys[0]))),
        "layer_mask": mask.int().tolist(), "wide_repeat": args.wide, "exit_layers": list(EXIT_LAYERS),
        "quality_task": f"builtin:{TASK}", "max_new_tokens": args.max_new_tokens, "smoke": args.smoke,
        "seconds": {"savings": round(savings_s, 1), "total": round(time.perf_counter() - start, 1)},
    }
    json_path, csv_path = write_results(stem, rows, meta, out)
    png = Path(out) / f"{stem}.png"
    plot(rows, layers, f"SmolLM2-135M-Instruct, float32, CPU, {args.threads} thread(s); savings: batch {batch}, "
         f"{args.steps} tokens, {args.runs} runs (layer_mask also x{args.wide}); quality: {args.items} items", png)
    print(f"wrote {json_path}, {csv_path}, {png} in {meta['seconds']['total']:.0f} s")


if __name__ == "__main__":
    main()
