"""How long things take: one host-timed call, interleaved medians of several variants (CPU or a
synchronised device), and the median of a GPU kernel (``triton.testing.do_bench`` or CUDA events)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    """``fn(*args, **kwargs)`` and the seconds it took by the host clock (``time.perf_counter``).
    Arguments are passed through rather than wrapped in a lambda, so that the timed region holds
    the call alone. On a GPU, only meaningful when ``fn`` synchronises."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


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
            times[name].append(timed(fn)[1])
    return {name: statistics.median(t) for name, t in times.items()}


# Without triton (a CUDA torch on Linux ships it), CUDA events time the calls instead.
_EVENT_WARMUP, _EVENT_RUNS = 5, 50


def gpu_timer_name() -> str:
    """Which timer ``gpu_median_ms`` uses on this machine (for the results' metadata)."""
    try:
        import triton.testing  # noqa: F401

        return "triton.testing.do_bench median (L2 cleared between runs)"
    except ImportError:
        return f"median of {_EVENT_RUNS} CUDA-event timings after {_EVENT_WARMUP} warm-up runs"


def gpu_median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device: ``triton.testing.do_bench``
    (warmup 25 ms, 100 ms of runs; it synchronises and flushes the L2 cache between runs), or the
    median of CUDA-event timings when triton is missing."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except ImportError:
        for _ in range(_EVENT_WARMUP):
            fn()
        times = []
        for _ in range(_EVENT_RUNS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
