"""Runs one fuzz batch (one op on one backend) and writes a JSON summary; started by test_fuzz_ops.py.

    python tests/fuzz/worker.py --op varlen_attention --backend cpu --seed 1 --examples 200 \\
        --summary out.json --case-log case.json
    python tests/fuzz/worker.py --backend cpu --serve      # batches requested as JSON lines on stdin
    python tests/fuzz/worker.py --backend cpu --replay '<spec json>'     # one case, in this process

Hypothesis runs here; every case runs in an *executor*, a child forked from this process after torch,
skiplayers and the backend are imported (so a restart costs milliseconds). When a case kills the
executor (a signal such as SIGSEGV or SIGFPE) or hangs, the worker starts a new one and reports the
case as a failure, so Hypothesis shrinks crashes like any other failure. Before each case the spec is
written to ``--case-log`` (and flushed): if the worker itself dies, the parent prints the last case.

``--serve`` keeps one worker per backend for a whole pytest session (importing skiplayers takes seconds):
each stdin line is a JSON object of the batch options (op, seed, examples, summary, case_log); the
summary goes to its file and ``FUZZ-DONE`` to stdout.

Failure kinds (Hypothesis shrinks each kind separately): ``crash``, ``hang``, ``mismatch`` (wrong answer
or an input written to), ``refused`` (a legal input raised), ``accepted`` (bad input did not raise).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # tests/fuzz (specs, build), tests (op_contract)
# The Triton kernels run under the interpreter on CPU tensors; the switch must precede any triton import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import build  # noqa: E402
from skiplayers import ops as sk_ops  # noqa: E402


class CaseFailure(AssertionError):
    kind = "mismatch"


class Crash(CaseFailure):
    kind = "crash"


class Hang(CaseFailure):
    kind = "hang"


class Refused(CaseFailure):
    kind = "refused"


class Accepted(CaseFailure):
    kind = "accepted"


FAILURES = {c.kind: c for c in (CaseFailure, Crash, Hang, Refused, Accepted)}
_SUBCLASSES: dict[str, type] = {}


def failure_key(result: dict, spec: dict) -> str:
    """Which bug a failed case shows: its kind, the signal of a crash, the bad-input kind of an
    accepted bad input (a meta tensor accepted and a bad length accepted are different bugs)."""
    if result["kind"] == "crash":
        return f"crash {result['signal']}"
    if result["kind"] == "accepted":
        return "accepted meta" if spec.get("meta") else f"accepted {spec.get('expect')}"
    return result["kind"]


def failure_class(key: str) -> type:
    """The exception for a failed case: one class per ``failure_key``, because Hypothesis tells bugs
    apart by exception type, so that each is shrunk and reported separately."""
    kind = key.split()[0]
    if key == kind:
        return FAILURES[kind]
    if key not in _SUBCLASSES:
        name = "".join(w.capitalize() for w in key.replace("_", " ").split())
        _SUBCLASSES[key] = type(name, (FAILURES[kind],), {})
    return _SUBCLASSES[key]


def signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def evaluate(spec: dict, ops) -> dict:
    """One case, in this process: ``{"ratio": r}`` or ``{"kind": ..., "message": ...}``."""
    try:
        return {"ratio": build.run_case(spec, ops)}
    except build.BadInputAccepted as err:
        return {"kind": "accepted", "message": str(err)}
    except AssertionError as err:
        return {"kind": "mismatch", "message": str(err) or traceback.format_exc(limit=-3)}
    except Exception as err:  # noqa: BLE001  (a legal input the backend refused, or a bug in the judge)
        return {"kind": "refused", "message": f"{type(err).__name__}: {err}"}


def _serve(conn, parent_end, backend: str) -> None:
    parent_end.close()  # the fork copied the worker's end: closed here, the worker's close() means EOF
    ops = sk_ops.get_ops(backend)
    while True:
        try:
            spec = conn.recv()
        except (EOFError, OSError):  # the worker closed its end, or died
            return
        conn.send(evaluate(spec, ops))


class Executor:
    """A forked child that evaluates cases; restarted after a crash or a hang."""

    def __init__(self, backend: str, case_timeout: float):
        self.backend, self.case_timeout = backend, case_timeout
        self.ctx = multiprocessing.get_context("fork")
        self.proc = self.conn = None
        self.restarts = 0

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_serve, args=(child, self.conn, self.backend), daemon=True)
        self.proc.start()
        child.close()

    def _stop(self) -> str:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        code = self.proc.exitcode
        self.conn.close()
        self.proc = self.conn = None
        self.restarts += 1
        return signal_name(code)

    def run(self, spec: dict) -> dict:
        if self.proc is None:
            self._start()
        self.conn.send(spec)
        if not self.conn.poll(self.case_timeout):
            self._stop()
            return {"kind": "hang", "message": f"no answer after {self.case_timeout:.0f} s (executor killed)"}
        try:
            return self.conn.recv()
        except EOFError:
            how = self._stop()
            return {"kind": "crash", "signal": how, "message": f"the executor died: {how}"}

    def close(self) -> None:
        if self.proc is not None:
            self.conn.close()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()


def coverage(spec: dict) -> list[str]:
    """Labels of the rarer features a spec exercises, counted in the summary."""
    labels = []
    batch = len(spec.get("lengths", spec.get("cache_lengths", [])))
    labels += ["B=0"] * (batch == 0)
    lengths = spec.get("lengths") or spec.get("cache_lengths") or []
    flat = [n for x in lengths for n in (x if isinstance(x, list) else [x])]
    labels += ["empty seq"] * (0 in flat) + ["len>70"] * any(n > 70 for n in flat)
    labels += ["heads=0"] * (spec.get("heads") == 0)
    labels += ["int32-top pos"] * (spec.get("pos", {}).get("base") == "extreme")
    layout = spec.get("layout") or []
    layouts = [spec.get("q_layout"), spec.get("cache_layout"), *([layout] if isinstance(layout, str) else layout)]
    labels += ["strided"] * any(x not in (None, "contig") for x in layouts)
    labels += ["bad input"] * (spec.get("expect", "ok") != "ok") + ["meta input"] * bool(spec.get("meta"))
    paging = spec.get("paging")
    if paging:
        slots = [a + b for a, b in zip(spec["cache_lengths"], spec.get("new_lengths", [0] * len(flat)))]
        ps, longest = paging["page_size"], max([0, *slots])
        labels += [f"page={ps}" if ps in (1, 16, 64) else "page odd" if ps in (3, 5, 7) else "1 page/seq"]
        labels += ["exact table"] * (paging["extra"] == 0 and longest % ps == 0)
        labels += ["shared pages"] * build.shares_pages(spec) + ["garbage table"] * (paging["tail"] == "garbage")
    if "rule" in spec:
        tags = spec["tags"]
        labels += [f"rule {spec['rule']}", {(True, True): "tags both", (True, False): "tags q only",
                                             (False, True): "tags k only", (False, False): "tags none"}[tags["q"], tags["k"]]]
    return labels


def run_batch(args) -> dict:
    """Legal specs (``args.examples``), then, on the validating backends, bad-input specs of each kind
    (``specs.bad_kinds``; a twelfth as many, at least 8), each kind in its own Hypothesis run so that
    one bug cannot stop the search for another."""
    import specs

    if args.backend == "triton":
        sk_ops.get_ops("triton")  # import triton and the kernels once, before forking
    executor = Executor(args.backend, args.case_timeout)
    stats = dict(cases=Counter(), worst_ratio=0.0, worst_spec=None, coverage=Counter(), case_log=args.case_log)
    failures, reports = [], []
    start = time.time()
    for spec in specs.edge_specs(args.op, args.backend):
        failure = _run_edge(spec, executor, stats)
        failures += [failure] if failure and failure["key"] not in {f["key"] for f in failures} else []
    runs = [("legal", args.examples, None)]
    if args.backend in ("cpu", "triton"):
        runs += [(f"bad input ({kind})", max(8, args.examples // 12), kind) for kind in specs.bad_kinds(args.op)]
    try:
        for name, examples, bad in runs:
            failed, report = _run_hypothesis(args, specs.spec_strategy(args.op, args.backend, bad=bad), examples,
                                             executor, stats, name)
            failures += [dict(f, run=name) for f in failed]
            reports += [f"--- {name} run ---\n{report}"] if report else []
    finally:
        executor.close()
    return dict(
        op=args.op, backend=args.backend, seed=args.seed, examples=args.examples, cases=sum(stats["cases"].values()),
        cases_by_run=dict(stats["cases"]), worst_ratio=stats["worst_ratio"], worst_spec=stats["worst_spec"],
        coverage=dict(stats["coverage"]), failures=failures, report="\n".join(reports) or None,
        executor_restarts=executor.restarts, seconds=round(time.time() - start, 1),
    )


def _run_edge(spec: dict, executor: Executor, stats: dict) -> dict | None:
    """One fixed case (``specs.edge_specs``); returns its failure, if any (already minimal: not shrunk)."""
    _log_case(spec, stats, "edge")
    result = executor.run(spec)
    if "kind" in result:
        return dict(result, key=failure_key(result, spec), spec=spec, run="edge")
    _note_ratio(result["ratio"], spec, stats)
    return None


def _log_case(spec: dict, stats: dict, run: str) -> None:
    with open(stats["case_log"], "w") as f:
        f.write(json.dumps(spec) + "\n")
        f.flush()
    stats["cases"][run] += 1
    stats["coverage"].update(coverage(spec))


def _note_ratio(ratio: float, spec: dict, stats: dict) -> None:
    if ratio >= stats["worst_ratio"]:
        stats["worst_ratio"], stats["worst_spec"] = ratio, spec


def _run_hypothesis(args, strategy, examples: int, executor: Executor, stats: dict, name: str):
    """One Hypothesis run; returns (the minimal failing case of each failure kind, Hypothesis' report)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings, target

    failures: dict[str, dict] = {}  # failure_key -> the last failing case: after shrinking, the minimal one

    @seed(args.seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=True,
              phases=(Phase.explicit, Phase.generate, Phase.target, Phase.shrink))
    @given(strategy)
    def fuzz(spec):
        _log_case(spec, stats, name)
        result = executor.run(spec)
        if "kind" in result:
            key = failure_key(result, spec)
            failures[key] = dict(result, key=key, spec=spec)
            raise failure_class(key)(result["message"])
        if args.target and result["ratio"] > 0:
            target(result["ratio"], label="error/bound")
        _note_ratio(result["ratio"], spec, stats)

    try:
        fuzz()
    except Exception as err:  # noqa: BLE001  (Hypothesis raises one error or a group of them)
        return list(failures.values()), "".join(traceback.format_exception(err, limit=0))[-6000:]
    return [], None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", choices=sk_ops.OP_NAMES)
    p.add_argument("--backend", required=True, choices=("torch", "cpu", "triton"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--summary", help="where to write the JSON summary")
    p.add_argument("--case-log", default=os.devnull, help="the spec of the case running now")
    p.add_argument("--case-timeout", type=float, default=300.0, help="seconds before a case counts as a hang")
    p.add_argument("--target", action="store_true", help="steer Hypothesis towards large error/bound ratios "
                   "(hypothesis.target; finds tolerance trouble sooner but narrows the search)")
    p.add_argument("--replay", help="run this one spec (JSON) in this process and print the outcome")
    p.add_argument("--serve", action="store_true", help="run the batches requested on stdin, one JSON line each")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.serve:
        for line in sys.stdin:
            request = vars(args) | json.loads(line)
            summary = run_batch(argparse.Namespace(**request))
            with open(request["summary"], "w") as f:
                json.dump(summary, f, indent=1)
            print("FUZZ-DONE", flush=True)
        return 0
    if args.replay:
        spec = json.loads(args.replay)
        print(json.dumps(evaluate(spec, sk_ops.get_ops(args.backend))))
        return 0
    summary = run_batch(args)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
