"""Ahead-of-time compilation check of every Triton kernel, without a GPU.

    python -m skiplayers.aot [--arch 80 90] [--jobs 2]

Compiles every spec of ``skiplayers.triton_kernels.aot_specs`` (each kernel, each configuration,
each dtype and compile-time variant) for each architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, prints a table (kernel,
config, variant, arch, shared memory bytes, registers, spills) and exits non-zero if anything fails to
compile or needs more shared memory than one block may have on that architecture.

Registers and spills: without a GPU Triton does not fill ``n_regs``/``n_spills`` (it reads them from
the loaded module), so they come from the ``ptxas -v`` log of the very compile Triton runs
(``TRITON_DUMP_PTXAS_LOG``): registers per thread, stack frame bytes, and spill stores + loads in
bytes. A kernel that spills is reported (column ``spill B``) but does not fail the check; the
configurations in ``triton_kernels/configs.py`` are chosen so that none does.

The compiles run in a pool of worker processes started with ``TRITON_INTERPRET`` unset (the
interpreter replaces ``@triton.jit`` kernels by Python functions that cannot be compiled) and with a
fresh, temporary Triton cache, so every kernel is really compiled and its ptxas log is seen.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import multiprocessing
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass

# Shared memory one block may use (opt-in maximum), per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEFAULT_ARCHS = (80, 90)


@dataclass
class Row:
    kernel: str
    config: str
    variant: str
    arch: int
    shared: int = -1
    regs: int = -1
    stack: int = -1
    spill_bytes: int = -1  # spill stores + spill loads
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and 0 <= self.shared <= SHARED_LIMIT[self.arch]


_PTXAS = dict(
    regs=re.compile(r"Used (\d+) registers"),
    stack=re.compile(r"(\d+) bytes stack frame"),
    spills=re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
)


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers, stack frame bytes, spill store + load bytes) from a ``ptxas -v`` log."""
    regs, stack, spills = (_PTXAS[k].search(log) for k in ("regs", "stack", "spills"))
    if not (regs and stack and spills):
        raise RuntimeError(f"no resource usage in the ptxas log: {log!r}")
    return int(regs.group(1)), int(stack.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_one(spec, arch: int) -> Row:
    """Compiles one spec for one architecture (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(spec.kernel, spec.config, spec.variant, arch)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{spec.kernel} is a {type(fn).__name__}, not a JITFunction (TRITON_INTERPRET set?)")
        if set(spec.signature) != set(fn.arg_names):
            raise RuntimeError(f"spec/kernel parameters differ: {sorted(set(spec.signature) ^ set(fn.arg_names))}")
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.aligned}
        src = ASTSource(fn, spec.signature, spec.constexprs, attrs)
        options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log it captured
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row.shared = int(compiled.metadata.shared)
        row.regs, row.stack, row.spill_bytes = parse_ptxas_log(log.getvalue())
    except Exception as err:  # noqa: BLE001  (reported in the table, and the command fails)
        row.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


def _worker_init(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_all(archs=DEFAULT_ARCHS, jobs: int = 2, specs=None) -> list[Row]:
    """Compiles every spec for every arch in ``jobs`` fresh processes; rows in spec order."""
    for arch in archs:
        if arch not in SHARED_LIMIT:
            raise ValueError(f"unknown architecture sm_{arch}; known: {sorted(SHARED_LIMIT)}")
    if specs is None:
        from skiplayers.triton_kernels import aot_specs  # no kernels imported here

        specs = aot_specs.all_specs()
    tasks = [(spec, arch) for spec in specs for arch in archs if spec.archs is None or arch in spec.archs]
    # "spawn": fresh interpreters that import triton with TRITON_INTERPRET unset (the parent may have it).
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with tempfile.TemporaryDirectory(prefix="skiplayers-aot-") as cache_dir, \
                concurrent.futures.ProcessPoolExecutor(
                    max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(cache_dir,)) as pool:
            return list(pool.map(compile_one, *zip(*tasks)))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def format_table(rows: list[Row]) -> str:
    header = ("kernel", "config", "variant", "arch", "shared B", "limit B", "regs", "stack B", "spill B", "s", "status")
    lines = [header]
    for r in rows:
        status = "ok" if r.ok else (r.error or "SHARED MEMORY OVER LIMIT")
        lines.append((r.kernel, r.config, r.variant, f"sm_{r.arch}", str(r.shared), str(SHARED_LIMIT[r.arch]),
                      str(r.regs), str(r.stack), str(r.spill_bytes), f"{r.seconds:.1f}", status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skiplayers.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities, e.g. 80 90")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compile_all(tuple(args.arch), args.jobs)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows)} compilations in {time.perf_counter() - start:.0f} s: {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
