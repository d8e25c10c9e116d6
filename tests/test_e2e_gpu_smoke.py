"""The GPU end-to-end benchmark's plumbing, on the CPU: ``benchmarks/e2e_gpu.py --smoke`` (tiny
float32 model, tiny sizes) runs every case and variant and writes its files; at ℓ = L the patched
model computes what the unpatched one does, so the forced backend's greedy tokens must agree."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e_gpu.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("e2e_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_variant(tmp_path):
    e2e = _load_script()
    json_path = e2e.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert json_path == tmp_path / "e2e_gpu.json"
    for suffix in ("json", "csv", "png"):
        assert (tmp_path / f"e2e_gpu.{suffix}").stat().st_size > 0
    result = json.loads(json_path.read_text())
    rows = result["rows"]
    assert not result["skipped_cases"]

    cases = {(r["kind"], r["batch"], r["context"], r["stop_layer"]) for r in rows}
    assert {kind for kind, *_ in cases} == {"prefill", "decode"}
    for case in cases:
        variants = {r["variant"]: r for r in rows if (r["kind"], r["batch"], r["context"], r["stop_layer"]) == case}
        assert set(variants) == set(e2e.VARIANTS), case
        for name, row in variants.items():
            assert row["error"] == "", (case, name, row["error"])
            timing = row["prefill_ms"] if row["kind"] == "prefill" else row["decode_tok_s"]
            assert timing is not None and math.isfinite(timing) and timing > 0, (case, name)

    layers = rows[0]["layers"]
    full = [r for r in rows if r["stop_layer"] == layers and r["variant"] in ("unpatched", "ours")]
    assert full, "the smoke run must include ℓ = L"
    assert all(r["greedy_agree"] == 1.0 for r in full), [(r["kind"], r["variant"], r["greedy_agree"]) for r in full]
