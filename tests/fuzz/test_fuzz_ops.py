"""Property-based fuzzing of every op on every backend that runs here (torch, cpu, triton under the
interpreter), judged against the float64 reference with the tolerance policy of ``op_contract.py``.

Each (op, backend) batch runs in a child process (``worker.py``, one per backend for the session, whose
cases run in a forked executor), so a crash or a hang is a failing test that prints the seed, the signal
and the shrunk case, never a dead run. What the cases cover:
``specs.py``; how they are judged: ``build.py``.

Environment:
  SKIPLAYERS_FUZZ_EXAMPLES  total legal cases over all batches (default 1400, one to three minutes on two
                            cores; 10000 or more on demand), shared out as in ``SHARES``
  SKIPLAYERS_FUZZ_SEED      the Hypothesis seed (default: a new random one, printed, per run)
  SKIPLAYERS_FUZZ_REPORT    a path: every batch's JSON summary is appended to it, one per line
  SKIPLAYERS_FUZZ_TARGET=1  steer the search towards large error/bound ratios (``hypothesis.target``)

The counts and the worst error/bound ratio of each batch appear in the terminal summary
("skiplayers fuzz"), whatever the verbosity.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from skiplayers.ops import OP_NAMES

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(WORKER)))
# Legal cases per batch at the default total (1400); on cpu and triton, bad-input runs add a twelfth
# (at least 8) per bad-input kind. The Triton interpreter runs every program in Python: fewer, smaller cases.
SHARES = {"cpu": 200, "torch": 40, "triton": 40}
DEFAULT_TOTAL = len(OP_NAMES) * sum(SHARES.values())
SEED = int(os.environ.get("SKIPLAYERS_FUZZ_SEED") or random.SystemRandom().randrange(2**31))


def examples(backend: str) -> int:
    total = int(os.environ.get("SKIPLAYERS_FUZZ_EXAMPLES") or DEFAULT_TOTAL)
    return max(1, round(SHARES[backend] * total / DEFAULT_TOTAL))


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class Worker:
    """One ``worker.py --serve`` process per backend for the session (importing skiplayers costs seconds);
    a worker that dies or overruns is killed, and the next batch starts a new one."""

    def __init__(self, backend: str):
        self.backend = backend
        self.cmd = [sys.executable, WORKER, "--backend", backend, "--serve"]
        env = dict(os.environ, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output: the worker exited

    def run(self, request: dict, timeout: float) -> tuple[int | None, str]:
        """Sends one batch; returns (None, output) when it finished, else (return code, output)."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        output, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                return -signal.SIGKILL, "".join(output) + f"\n[worker killed after {timeout:.0f} s]"
            if line is None:
                return self.proc.wait(), "".join(output)
            if line.strip() == "FUZZ-DONE":
                return None, "".join(output)
            output.append(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def workers():
    pool: dict[str, Worker] = {}
    yield pool
    for w in pool.values():
        w.close()


def _run_batch(workers: dict, op: str, backend: str, tmp_path) -> tuple[int | None, str, str]:
    if backend not in workers or not workers[backend].alive():
        workers[backend] = Worker(backend)
    n = examples(backend)
    request = dict(op=op, seed=SEED, examples=n, summary=str(tmp_path / "summary.json"),
                   case_log=str(tmp_path / "case.json"), target=os.environ.get("SKIPLAYERS_FUZZ_TARGET") == "1")
    rc, output = workers[backend].run(request, timeout=600 + 3 * n)  # past this, the worker itself hangs
    return rc, output, " ".join(workers[backend].cmd) + " <<< " + json.dumps(request)


def _replay_command(backend: str, spec: dict) -> str:
    return f"PYTHONPATH=. python tests/fuzz/worker.py --backend {backend} --replay '{json.dumps(spec)}'"


def _describe_failures(summary: dict) -> str:
    lines = [f"{summary['op']} on {summary['backend']}: seed {summary['seed']} "
             f"(rerun with SKIPLAYERS_FUZZ_SEED={summary['seed']}), {summary['cases']} cases"]
    for f in summary["failures"]:
        lines += [f"- {f['key']} in the {f['run']} run: {f['message']}", f"  {'case' if f['run'] == 'edge' else 'shrunk case'}: {json.dumps(f['spec'])}",
                  f"  replay: {_replay_command(summary['backend'], f['spec'])}"]
    if summary.get("report"):
        lines += ["Hypothesis report:", summary["report"]]
    return "\n".join(lines)


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("op", OP_NAMES)
def test_fuzz(op, backend, tmp_path, workers, fuzz_results):
    if backend == "triton" and not _triton_importable():
        pytest.skip("triton is not installed")
    rc, output, cmd = _run_batch(workers, op, backend, tmp_path)
    summary_path, case_path = tmp_path / "summary.json", tmp_path / "case.json"
    if rc is not None or not summary_path.exists():
        rc = -1 if rc is None else rc
        last = case_path.read_text().strip() if case_path.exists() else "(none)"
        how = signal.Signals(-rc).name if rc < 0 and -rc in signal.Signals._value2member_map_ else f"exit code {rc}"
        fuzz_results.append(dict(op=op, backend=backend, seed=SEED, cases=None, failures=[{"kind": how}]))
        pytest.fail(f"the fuzz worker for {op} on {backend} died ({how}); seed {SEED}\nlast case: {last}\n"
                    f"replay: {_replay_command(backend, json.loads(last)) if last.startswith('{') else '-'}\n"
                    f"command: {cmd}\n--- worker output (tail) ---\n{output[-4000:]}", pytrace=False)
    summary = json.loads(summary_path.read_text())
    fuzz_results.append(summary)
    if os.environ.get("SKIPLAYERS_FUZZ_REPORT"):
        with open(os.environ["SKIPLAYERS_FUZZ_REPORT"], "a") as f:
            f.write(json.dumps(summary) + "\n")
    if summary["failures"] or summary.get("report"):
        pytest.fail(_describe_failures(summary), pytrace=False)
    assert summary["cases"] >= 1
