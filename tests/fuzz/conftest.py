"""The fuzz suite's summary: cases run and the worst error/bound ratio of each (op, backend) batch,
printed in pytest's terminal summary (shown under ``-q`` too, so CI logs always carry the counts)."""

from __future__ import annotations

import pytest

_RESULTS = pytest.StashKey[list]()


@pytest.fixture
def fuzz_results(request) -> list:
    return request.config.stash.setdefault(_RESULTS, [])


def _coverage(c: dict) -> str:
    keys = ("B=0", "empty seq", "heads=0", "len>70", "int32-top pos", "strided", "page=1", "page odd", "page=64",
            "1 page/seq", "exact table", "shared pages", "garbage table", "bad input", "meta input")
    return " ".join(f"{k}:{c[k]}" for k in keys if c.get(k))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(_RESULTS, [])
    if not results:
        return
    tr = terminalreporter
    tr.section("skiplayers fuzz")
    tr.write_line(f"{'op':<18} {'backend':<7} {'cases':>6} {'failures':>8} {'worst err/bound':>15} {'s':>6}  coverage")
    total, worst, failed = 0, 0.0, 0
    for r in results:
        cases = r.get("cases")
        ratio = r.get("worst_ratio")
        kinds = ", ".join(dict.fromkeys(f.get("key", f["kind"]) for f in r["failures"])) or "0"
        tr.write_line(f"{r['op']:<18} {r['backend']:<7} {cases if cases is not None else '-':>6} {kinds:>8}"
                      f"{ratio if ratio is not None else float('nan'):>15.3f} {r.get('seconds', 0):>6}  "
                      f"{_coverage(r.get('coverage', {}))}")
        total += cases or 0
        worst = max(worst, ratio or 0.0)
        failed += bool(r["failures"])
    seeds = sorted({r["seed"] for r in results})
    tr.write_line(f"total: {total} cases in {len(results)} batches, {failed} failing, worst error/bound {worst:.3f}, "
                  f"seed {', '.join(map(str, seeds))}")
