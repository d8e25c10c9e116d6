"""Shared benchmark plumbing: interleaved timing, machine description, result files."""

from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


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


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                        before: Callable[[str], object] | None = None) -> dict[str, float]:
    """Median seconds of each variant, run round-robin ``repeats`` times after ``warmup`` rounds,
    so that machine noise hits every variant alike. ``before(name)``, if given, runs untimed before
    every call of variant ``name`` (warmup included): per-call set-up such as a fresh cache."""
    for _ in range(warmup):
        for name, fn in variants.items():
            if before is not None:
                before(name)
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if before is not None:
                before(name)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
