"""Our attention ops (Triton, CUDA C++; on the CPU run also the C++ CPU ops and the PyTorch
reference) side by side with the peers a user would pick (SDPA, ``varlen_attn``, FlexAttention,
flash-attn): one registry of cases and implementations, one table, one row per case.

    python -m benchmarks.bench_kernels [--dtype float16] [--quick] [--budget-s 600] [--out DIR]
    python -m benchmarks.bench_kernels --smoke          # CPU, tiny shapes, seconds (CI: tests/test_bench_kernels_smoke.py)

Without a CUDA GPU (and without ``--smoke``) it prints why it skips and exits 0.

**Cases** (``gpu_cases`` in ``benchmarks/kernel_cases.py``; SmolLM2 9/3 heads D=64 and Llama-3-8B
32/8 heads D=128): prefill dense causal B=1 (T = 1k, 4k, 16k); prefill ragged (8 packed sequences);
prefill context-stopped at a layer >= ℓ (75% of T=4096 is context), *masked* (every row, context
keys hidden by ``Rule.HIDE_CONTEXT``) and *compacted* (the query rows only, absolute positions);
decode (one new token per sequence over paged caches, pages of ``--page-size`` slots in order) at B
= 1 and 8 and 512 .. 32k keys, and a ragged B=8 decode. ``--smoke`` runs the same constructors at
tiny sizes (``smoke_cases``).

**Implementations** (``IMPLEMENTATIONS`` in ``benchmarks/kernel_impls.py``): a factory per column
that takes a ``Case`` and an ``Env`` and returns a ``Built`` (a zero-argument call, how to read its
output as packed ``[Nq, H, D]`` rows, notes), or raises ``Unsupported(reason)``: the reason goes in
the table.

* ours: ``triton`` (``skiplayers_triton::*``; on the CPU run under ``TRITON_INTERPRET=1``),
  ``cuda`` and ``cuda_next`` (``torch.ops.skiplayers``, when built with CUDA: its stable and its
  next kernel generation, ``SKIPLAYERS_CUDA_KERNELS`` set per call), ``cpu`` (the C++ CPU ops, CPU run
  only), ``ref`` (``skiplayers.reference``, the PyTorch truth, CPU run only);
* peers: ``sdpa`` (the backend torch picks, ``torch._fused_sdp_choice``, confirmed by forcing it
  with ``sdpa_kernel``; the first of cuDNN / flash / efficient / math that runs when that fails;
  named in ``sdpa_backend``); ``varlen_attn`` (``torch.nn.attention.varlen``, CUDA, when this torch
  has it); ``flex`` (FlexAttention with a block mask built per case from the case's metadata with
  our predicate, ``skiplayers.reference.visibility_mask``, and compiled per case after
  ``torch._dynamo.reset()``: ``flex_compiled`` says whether a graph was compiled for the case, as
  counted by dynamo, and ``flex_note`` why not); ``flash_attn`` (when it imports).

SDPA is the reference peer: ``<impl>_vs_sdpa`` is SDPA's ms / the implementation's ms (> 1: faster
than SDPA).

**Timing.** Prefill: ``triton.testing.do_bench`` median (synchronised, L2 flushed between runs).
Decode: the call captured once in a CUDA graph and its replays timed the same way (``<impl>_timing``
says which; an implementation that cannot be captured is timed eagerly and the reason given).
``<impl>_host_us``: the median wall-clock time of an eager call without synchronisation, i.e. what
the host spends issuing it (on the CPU run, where nothing is asynchronous, the whole call).

**Work is counted, not nominal** (closed forms per case, checked in CI against counts from the
reference mask): FLOPs = 4 * head_dim * heads * (visible (query, key) pairs); bytes = q read and the
output written once, plus K and V of every key that some query sees, read once (metadata excluded:
4 bytes a token against 2 * kv_heads * head_dim * 2). ``<impl>_flops_frac`` and ``<impl>_bw_frac``
are TFLOP/s and GB/s as fractions of the device's ceilings measured in the same run: a bf16 matmul
of 8192^3 and a 1 GiB device-to-device copy (read + write).

**Checks.** Before timing, each output (the replayed graph's, for decode) is compared with the
reference on ``checked_rows`` query rows (all of them on the CPU run; a sample of 128 otherwise)
under the project's tolerance (``skiplayers.tolerance``: twice the plain low-precision error of the
reference plus an absolute floor). A wrong output is not timed: its status says ``wrong``, and the
script exits 1.

Results: ``<out>/kernels.{json,csv,png}`` (``--out``, default ``benchmarks/results``; ``--smoke``
defaults to a temporary directory). Cases left when ``--budget-s`` is spent (checked between cases)
are listed in ``skipped_cases``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.attention_inputs import (
    PAGE_SIZE,
)
from benchmarks.common import RESULTS, arg_parser, error_summary, pyplot, save_figure, skip_without_cuda, write_results
from benchmarks.kernel_cases import Case, gpu_cases, smoke_cases
from benchmarks.kernel_impls import IMPLEMENTATIONS, Env, Unsupported
from benchmarks.timing import gpu_median_ms, gpu_timer_name, timed
from skiplayers import reference
from skiplayers.tolerance import attention_error

STEM = "kernels"
PEER = "sdpa"  # the reference peer of the ratio columns
CHECK_ROWS = 128  # query rows checked per case on the GPU (the reference is dense: [H, rows, keys])



CASE_COLUMNS = ("case", "kind", "model", "heads", "kv_heads", "head_dim", "dtype", "batch", "q_rows", "keys_read",
                "visible_pairs", "gflop", "bytes_moved", "checked_rows", "sdpa_backend", "flex_compiled", "flex_note")
METRICS = ("ms", "vs_sdpa", "tflops", "gbps", "flops_frac", "bw_frac", "host_us", "timing", "max_abs_diff",
           "tolerance", "status")


def columns(impls) -> list[str]:
    """The table's columns: the case's, then each metric for every implementation side by side."""
    return [*CASE_COLUMNS, *(f"{impl}_{metric}" for metric in METRICS for impl in impls)]


# --- checks and timing -------------------------------------------------------------------------------


def check_rows(case: Case, limit: int | None) -> torch.Tensor:
    """The query rows whose outputs are checked: all (``limit`` None or at least the rows), else
    ``limit`` rows spread evenly plus each sequence's first and last row."""
    n = case.q_rows
    if limit is None or n <= limit:
        return torch.arange(n)
    cu = case.args["cu_seqlens_q"].cpu().long()
    rows = torch.cat([torch.linspace(0, n - 1, limit).long(), cu[:-1], cu[1:] - 1])
    return torch.unique(rows.clamp(0, n - 1))


def reference_rows(case: Case, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(truth, low)`` ``[len(rows), H, D]`` on the CPU: the reference's output for those query rows
    computed in float64 and in the case's dtype (the tolerance's two terms), from our predicate on
    each sequence's keys."""
    a, rule, scale = case.args, case.args["rule"], case.args["scale"]
    q_pos = a["q_pos"]
    q_tag = a["q_tag"] if a["q_tag"] is not None else torch.zeros_like(q_pos)
    cu = a["cu_seqlens_q"].tolist()
    rows_dev = rows.to(case.device)
    truth, low = [], []
    for b in range(case.batch):
        sel = rows_dev[(rows_dev >= cu[b]) & (rows_dev < cu[b + 1])]
        if sel.numel() == 0:
            continue
        if case.kind == "prefill":
            keys = slice(cu[b], cu[b + 1])
            k, v, k_pos = a["k"][keys], a["v"][keys], a["k_pos"][keys]
            k_tag = a["k_tag"][keys] if a["k_tag"] is not None else torch.zeros_like(k_pos)
        else:
            n, table = case.lengths[b], a["block_table"]
            k, v = (reference.gather_slots(a[x], table, b, n) for x in ("k_cache", "v_cache"))
            k_pos = reference.gather_slots(a["pos_cache"], table, b, n)
            k_tag = (reference.gather_slots(a["tag_cache"], table, b, n) if a["tag_cache"] is not None
                     else torch.zeros_like(k_pos))
        visible = reference.visibility_mask(rule, q_pos[sel], q_tag[sel], k_pos, k_tag)
        truth.append(reference.masked_attention(a["q"][sel], k, v, visible, scale, torch.float64).cpu())
        low.append(reference.masked_attention(a["q"][sel], k, v, visible, scale, case.dtype).cpu())
    return torch.cat(truth), torch.cat(low)


def graph_call(fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], torch.Tensor], Callable[[], object]]:
    """``fn`` captured in a CUDA graph: ``(output, replay)``-style pair ``(result, replay)`` where
    ``result()`` returns the graph's output tensor (valid after a replay). Warm-up runs on a side
    stream first, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return (lambda: out), graph.replay


def host_us(fn: Callable[[], object], calls: int, sync: Callable[[], None] | None = None) -> float:
    """Median wall-clock microseconds of ``calls`` eager calls of ``fn``, each timed without
    synchronising (what the host spends issuing it). With ``sync`` (a device), one call and a
    synchronisation first, and a synchronisation after (untimed)."""
    if sync is not None:
        fn()
        sync()
    times = [timed(fn)[1] for _ in range(calls)]
    if sync is not None:
        sync()
    return statistics.median(times) * 1e6


def device_ceilings() -> dict:
    """The device's measured ceilings: a bf16 matmul of 8192^3 (TFLOP/s = 2 n^3 / time) and a copy
    of 1 GiB between two device buffers (GB/s = 2 * bytes / time: read and write), timed as the
    kernels are (``gpu_median_ms``)."""
    n, nbytes = 8192, 2**30

    def matmul_ms() -> float:
        x, y = (torch.randn(n, n, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        return gpu_median_ms(lambda: x @ y)

    def copy_ms() -> float:
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        return gpu_median_ms(lambda: dst.copy_(src))

    ceilings = {"matmul_tflops": 2 * n**3 / matmul_ms() / 1e9, "copy_gbps": 2 * nbytes / copy_ms() / 1e6,
                "how": f"bf16 matmul {n}x{n}x{n}; device-to-device copy of 1 GiB (read + write); {gpu_timer_name()}"}
    torch.cuda.empty_cache()
    return ceilings


@dataclass
class Settings:
    check: bool = True
    check_limit: int | None = CHECK_ROWS
    repeats: int = 5  # host-clock repeats on the CPU run
    host_calls: int = 50


def run_impl(name: str, case: Case, env: Env, settings: Settings, truth, rows) -> dict:
    """One implementation on one case: ``{metric: value}`` (``status`` always) plus notes."""
    result: dict = {}
    try:
        built = IMPLEMENTATIONS[name](case, env)
    except Unsupported as why:
        return {"status": f"skipped: {why}"}
    except Exception as err:  # noqa: BLE001 - one failing implementation must not end the run
        return {"status": f"error: {error_summary(err, 160)}"}
    result.update(built.notes)
    on_gpu = case.device.type == "cuda"
    try:
        fn, timing = built.fn, "host clock (CPU run: ms and host_us are one measurement)"
        if on_gpu and case.kind == "decode":
            try:
                result_fn, replay = graph_call(built.fn)
                replay()

                def fn():  # replays the graph; the output tensor is the graph's
                    replay()
                    return result_fn()

                timing = "cuda graph replay"
            except Exception as err:  # noqa: BLE001 - an uncapturable call is timed eagerly, with the reason
                timing = f"eager (graph capture failed: {error_summary(err, 100)})"
                torch.cuda.synchronize()
        elif on_gpu:
            timing = "do_bench"
        first, first_s = timed(fn)
        out = built.packed(first)
        if settings.check:
            got = out[rows.to(out.device)]
            diff, bound = attention_error(got, *truth)
            result.update(max_abs_diff=diff, tolerance=bound)
            if not (diff <= bound):  # NaN fails too
                result["status"] = f"wrong: max |diff| {diff:.3g} > tolerance {bound:.3g}"
                if built.after:
                    built.after()
                result.update(built.notes)
                return result
        if on_gpu:
            ms = gpu_median_ms(fn)
            result["host_us"] = host_us(built.fn, settings.host_calls, torch.cuda.synchronize)
        else:  # the CPU run: the checked call above was the warm-up. Nothing runs asynchronously
            # there, so the host's time per call is the call's time: one measurement, both columns.
            # Slow calls (Triton's interpreter, eager FlexAttention) are not repeated: ~50 ms each at most.
            ms = host_us(built.fn, max(1, min(settings.repeats, int(0.05 / max(first_s, 1e-6))))) / 1e3
            result["host_us"] = ms * 1e3
        if built.after:
            built.after()
        result.update(built.notes)
    except Exception as err:  # noqa: BLE001 - e.g. out of memory: the row says so, the run goes on
        result["status"] = f"error: {error_summary(err, 160)}"
        return result
    result.update(ms=ms, timing=timing, tflops=case.flops() / ms / 1e9, gbps=case.bytes_moved() / ms / 1e6,
                  status="ok")
    return result


def run_case(case: Case, env: Env, impls: list[str], settings: Settings, ceilings: dict) -> dict:
    """The table row of one case (``columns``)."""
    rows = check_rows(case, settings.check_limit)
    truth = reference_rows(case, rows) if settings.check else None
    row: dict = dict.fromkeys(columns(impls))
    row.update(case=case.name, kind=case.kind, model=case.model, heads=case.heads, kv_heads=case.kv_heads,
               head_dim=case.dim, dtype=str(case.dtype).removeprefix("torch."), batch=case.batch, q_rows=case.q_rows,
               keys_read=case.keys_read(), visible_pairs=case.visible_pairs(), gflop=case.flops() / 1e9,
               bytes_moved=case.bytes_moved(), checked_rows=len(rows) if settings.check else 0)
    results = {}
    for name in impls:
        res = run_impl(name, case, env, settings, truth, rows)
        for note in ("sdpa_backend", "flex_compiled", "flex_note"):
            if note in res:
                row[note] = res.pop(note)
        if "varlen_note" in res:
            res["timing"] = f"{res.get('timing', '')}; {res.pop('varlen_note')}"
        results[name] = res
        if case.device.type == "cuda":
            torch.cuda.empty_cache()
    peer_ms = results.get(PEER, {}).get("ms")
    for name, res in results.items():
        if "ms" in res:
            if peer_ms:
                res["vs_sdpa"] = peer_ms / res["ms"]
            if "matmul_tflops" in ceilings:
                res["flops_frac"] = res["tflops"] / ceilings["matmul_tflops"]
                res["bw_frac"] = res["gbps"] / ceilings["copy_gbps"]
        for metric, value in res.items():
            row[f"{name}_{metric}"] = value
    return row


# --- output ------------------------------------------------------------------------------------------


def _cell(row: dict, impl: str) -> str:
    status = row[f"{impl}_status"] or ""
    if status == "ok":
        ratio = row[f"{impl}_vs_sdpa"]
        return f"{row[f'{impl}_ms']:9.4f}" + (f" x{ratio:5.2f}" if ratio is not None else "       ")
    return f"{status.split(':')[0]:>16}"


def print_table(rows: list[dict], impls: list[str]) -> None:
    """One line a case: each implementation's median ms and its speed relative to SDPA; then the
    reasons of the cells that did not run."""
    print(f"{'case':44} " + " ".join(f"{impl:>16}" for impl in impls))
    for row in rows:
        print(f"{row['case'][:44]:44} " + " ".join(_cell(row, impl) for impl in impls))
    reasons: dict[str, set[str]] = {}
    for row in rows:
        for impl in impls:
            status = row[f"{impl}_status"] or ""
            if status != "ok":
                reasons.setdefault(impl, set()).add(status if status.startswith("skipped") else f"{row['case']}: {status}")
    for impl, why in reasons.items():
        for line in sorted(why):
            print(f"  {impl}: {line}")
    for row in rows:
        notes = [f"sdpa={row['sdpa_backend']}"] if row["sdpa_backend"] else []
        if row["flex_compiled"] is not None:
            notes.append(f"flex compiled={row['flex_compiled']} ({row['flex_note']})")
        if notes:
            print(f"  {row['case']}: {', '.join(notes)}")


def plot(rows: list[dict], impls: list[str], path: Path) -> bool:
    """Horizontal bars: each implementation's speed relative to SDPA, per case (log scale).
    Returns False where matplotlib is missing."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    shown = [impl for impl in impls if impl != PEER and any(r[f"{impl}_vs_sdpa"] for r in rows)]
    fig, ax = plt.subplots(figsize=(10, 0.35 * max(1, len(rows)) * max(1, len(shown)) / 2 + 1.5))
    height = 0.8 / max(1, len(shown))
    for i, impl in enumerate(shown):
        values = [r[f"{impl}_vs_sdpa"] or float("nan") for r in rows]
        ax.barh([y + i * height for y in range(len(rows))], values, height=height, label=impl)
    ax.set_yticks([y + 0.4 - height / 2 for y in range(len(rows))], [r["case"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("SDPA ms / implementation ms (> 1: faster than SDPA)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


# --- driver ------------------------------------------------------------------------------------------


def main(argv=None, reexec: bool = False) -> int:
    """Runs the benchmark; returns the exit status. ``reexec`` (the command line): a ``--smoke`` run
    whose process imported triton without ``TRITON_INTERPRET=1`` starts itself again with it."""
    parser = arg_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, float32: the plumbing (CI)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                        help="default float16 (float32 with --smoke)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    parser.add_argument("--budget-s", type=float, default=600.0, help="no case starts after this many seconds")
    parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS), help="comma-separated columns to run")
    parser.add_argument("--cases", default="", help="only the cases whose name contains this")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the output comparison")
    parser.add_argument("--page-size", type=int, default=None, help="slots per page (default 16; 8 with --smoke)")
    parser.add_argument("--flex-block", type=int, default=None, help="FlexAttention block size (128; 16 with --smoke)")
    parser.add_argument("--flex-compile", dest="flex_compile", action="store_true", default=None,
                        help="compile FlexAttention per case (the default on a GPU)")
    parser.add_argument("--flex-eager", dest="flex_compile", action="store_false", help="run FlexAttention eagerly")
    parser.add_argument("--out", type=Path, default=None, help="directory of kernels.{json,csv,png}")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    impls = [name for name in args.impls.split(",") if name]
    unknown = set(impls) - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementations {sorted(unknown)}; choose from {list(IMPLEMENTATIONS)}")

    if args.smoke:
        # The Triton kernels run on CPU tensors under the interpreter, which must be chosen before
        # triton.language is first imported (importing skiplayers does): the same command again.
        if reexec and "TRITON_INTERPRET" not in os.environ:
            os.environ["TRITON_INTERPRET"] = "1"
            os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
        dtype = getattr(torch, args.dtype or "float32")
        device = torch.device("cpu")
        page_size = args.page_size or 8
        env = Env(device, smoke=True, flex_block=args.flex_block or 16, flex_compile=bool(args.flex_compile))
        constructors = smoke_cases(dtype, device, page_size)
        settings = Settings(args.check, check_limit=None, repeats=5, host_calls=1)
        out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_kernels_smoke_"))
        ceilings = {"skipped": "CPU smoke run: the ceilings (bf16 matmul, device-to-device copy) are measured on a GPU"}
        graphs = "skipped: CPU smoke run (CUDA graphs need a GPU); every call is timed eagerly by the host clock"
    else:
        if skip_without_cuda("bench_kernels"):
            return 0
        dtype = getattr(torch, args.dtype or "float16")
        device = torch.device("cuda")
        page_size = args.page_size or PAGE_SIZE
        env = Env(device, smoke=False, flex_block=args.flex_block or 128,
                  flex_compile=args.flex_compile is not False)
        constructors = gpu_cases(dtype, device, args.quick, page_size)
        settings = Settings(args.check)
        out_dir = args.out or RESULTS
        ceilings = device_ceilings()
        print(f"ceilings: {ceilings['matmul_tflops']:.0f} TFLOP/s, {ceilings['copy_gbps']:.0f} GB/s ({ceilings['how']})")
        graphs = "decode: CUDA graph replays; prefill: do_bench of eager calls"

    torch.manual_seed(0)
    rows: list[dict] = []
    skipped_cases: list[str] = []
    threads = torch.get_num_threads()
    if args.smoke:  # tiny calls: a second OpenMP thread only adds waits for it (a time slice, on a busy machine)
        torch.set_num_threads(1)
    try:
        for name, make in constructors:
            if args.cases not in name:
                continue
            if time.perf_counter() - began > args.budget_s:
                skipped_cases.append(name)
                continue
            case = make()
            with torch.no_grad():
                row = run_case(case, env, impls, settings, ceilings)
            rows.append(row)
            print(f"{row['case']:44} " + " ".join(_cell(row, impl) for impl in impls), flush=True)
            del case
    finally:
        torch.set_num_threads(threads)
    print()
    print_table(rows, impls)
    meta = {"dtype": str(dtype).removeprefix("torch."), "smoke": args.smoke, "quick": args.quick, "page_size": page_size,
            "flex_block": env.flex_block, "flex_compile": env.flex_compile, "timing": graphs,
            "gpu_timer": gpu_timer_name() if not args.smoke else None, "ceilings": ceilings,
            "reference_peer": PEER, "columns": columns(impls), "skipped_cases": skipped_cases,
            "elapsed_s": round(time.perf_counter() - began, 1)}
    json_path, csv_path = write_results(STEM, rows, meta, out_dir)
    png = out_dir / f"{STEM}.png"
    wrote = [json_path, csv_path] + ([png] if plot(rows, impls, png) else [])
    print(f"wrote {', '.join(map(str, wrote))}; {meta['elapsed_s']} s; skipped cases: {len(skipped_cases)}")
    wrong = [(r["case"], impl) for r in rows for impl in impls if (r[f"{impl}_status"] or "").startswith("wrong")]
    if wrong:
        print(f"WRONG outputs: {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(reexec=True))
