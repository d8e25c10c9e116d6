"""Plumbing every benchmark script shares: result files with the machine description, the command
line, figures, error strings, the CUDA check, and the demo's batch.

Timing lives in ``benchmarks.timing``; the attention benchmarks' inputs and other libraries'
implementations in ``benchmarks.attention_inputs`` and ``benchmarks.baselines``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# --- result files ------------------------------------------------------------------------------


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def write_results(stem: str, rows: list[dict], meta: dict, directory: Path | None = None) -> tuple[Path, Path]:
    """Writes ``<directory>/<stem>.json`` (rows + machine) and ``<directory>/<stem>.csv``;
    ``directory`` defaults to ``results/``."""
    directory = Path(directory) if directory is not None else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / f"{stem}.json", directory / f"{stem}.csv"
    json_path.write_text(json.dumps({"machine": machine(), **meta, "rows": rows}, indent=2))
    if rows:
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return json_path, csv_path


# --- scripts -----------------------------------------------------------------------------------


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: ``--help`` shows the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path | str, dpi: int = 110) -> None:
    """Lays ``fig`` out tightly, writes it to ``path`` (PNG by the suffix) and closes it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def error_summary(err: BaseException, limit: int) -> str:
    """``"TypeName: first line of the message"``, the line cut to ``limit`` characters: an error
    that goes into a result row or a skip reason."""
    message = str(err)
    return f"{type(err).__name__}: {message.splitlines()[0][:limit] if message else ''}"


def skip_without_cuda(script: str, kernels: bool = False) -> bool:
    """For GPU-only scripts: prints ``"<script>: skipped: <reason>; nothing was written"`` and
    returns True when no CUDA GPU is visible to torch or (``kernels``) skiplayers was built without
    its CUDA kernels; else returns False."""
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    elif kernels:
        import skiplayers.ops as sk_ops

        if not sk_ops.cuda_kernels_built():
            reason = "skiplayers._C was built without CUDA kernels"
    if reason is not None:
        print(f"{script}: skipped: {reason}; nothing was written")
    return reason is not None


# --- the demo's batch --------------------------------------------------------------------------

# The demo's context stop layer: the recommended ℓ of builtin:number_words in skiplayers/calibrated.json.
DEMO_LAYER = 27


def demo_batch(items: int = 8):
    """SmolLM2 (float32) and the demo's batch: the first ``items`` prompts of the built-in
    ``number_words`` task as ``sk.fewshot_batch`` builds them. Returns ``model, ids, attn, ctx``."""
    import skiplayers as sk
    from skiplayers.tasks import builtin_task

    model, tok = sk.load_default_model(), sk.load_default_tokenizer()
    chosen = builtin_task("number_words")[:items]
    ids, attn, ctx = sk.fewshot_batch(tok, [it.instructions for it in chosen], [list(it.examples) for it in chosen],
                                      [it.query for it in chosen])
    return model, ids, attn, ctx


def decode_step_inputs(ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of one decode step after prefilling ``ids`` [B, T] with ``attn`` [B, T]: every
    row's next token is ``ids[0, -1]`` (what it is does not change the work), as ``[B, 1]`` long,
    and the attention mask widened by one column of ones, ``[B, T + 1]``."""
    batch = ids.shape[0]
    return torch.full((batch, 1), int(ids[0, -1])), torch.cat([attn, attn.new_ones(batch, 1)], dim=1)
