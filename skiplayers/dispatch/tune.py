"""Measures the attention kernels on this machine's device and writes its dispatch table.

For every standard pattern (``patterns.py``), dtype, head dim and size band, each kernel that can
run the case here (``kernels.py``: ours, sdpa, varlen_attn) is first checked against the
reference on a small ragged instance of the same pattern (empty sequences included; the tolerance
policy of ``skiplayers/tolerance.py``), then the correct ones are timed on a representative call
of the band, interleaved (round-robin, medians, synchronised). The fastest correct kernel is the
entry's choice. ::

    python -m skiplayers.dispatch.tune --out skiplayers/dispatch/tables/sm_90.json      # on a GPU
    python -m skiplayers.dispatch.tune --device cpu --out skiplayers/dispatch/tables/cpu.json

Heads: 9 query / 3 KV heads at head dim 64 (SmolLM2), 32 / 8 at 128 (Llama-3-8B). Caches are paged
with SkipCache's default page size (a table measured at one page size is read for any: the kernels
that cannot read a page size say so when dispatch asks them).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .. import ops as sk_ops
from .. import reference
from ..cache import DEFAULT_PAGE_SIZE
from ..tolerance import attention_error
from .dispatcher import standard_kernel
from .kernels import STANDARD_KERNELS, CacheCall, Ours, PackedCall
from .patterns import STANDARD, Pattern
from .table import BANDS, Table, band, device_key, dtype_name

HEADS = {64: (9, 3), 128: (32, 8)}
NEW_ROWS = 32  # rows per sequence of the cache_causal cases (a later turn's prompt, a draft)

# Representative calls per band: rows per sequence (varlen_causal) or stored keys per sequence.
VARLEN_SIZES = {"s": [180, 60], "m": [2200], "l": [8000, 4000, 2200], "xl": [40000]}
CACHE_SIZES = {"s": [300], "m": [2000, 1200], "l": [2600, 2400, 2800, 2200, 2500, 2700, 2300, 2600],
               "xl": [12000, 13000, 11000, 12500, 12000, 11500, 13500, 12000]}
# The small ragged instances every kernel must compute correctly before it is timed (an empty sequence included).
CHECK_VARLEN = [37, 0, 100, 1]
CHECK_CACHE = [1, 50, 130, 33]


def _cu(counts: list[int], device) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32, device=device)


def packed_case(counts: list[int], heads, kv_heads, dim, dtype, device, gen) -> PackedCall:
    n = sum(counts)
    q, k, v = (torch.randn(n, h, dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    pos = torch.cat([torch.arange(c, dtype=torch.int32) for c in counts]) if n else torch.zeros(0, dtype=torch.int32)
    return PackedCall(q=q, k=k, v=v, cu_seqlens=_cu(counts, device), counts=torch.tensor(counts, dtype=torch.int64),
                      pos=pos.to(device), tag=torch.zeros(n, dtype=torch.int32, device=device), rule=0,
                      scale=dim ** -0.5)


def cache_case(lengths: list[int], new_rows: int, heads, kv_heads, dim, dtype, device, gen,
               page_size: int = DEFAULT_PAGE_SIZE) -> CacheCall:
    """Sequence b's paged cache holds ``lengths[b]`` keys (positions 0..), its last ``new_rows`` (at
    most its length) are the new rows' own keys. Its pages are taken from a shuffled pool in which
    every slot no sequence holds is NaN, as unused slots of a real cache may be: a kernel must not
    read them."""
    batch, held = len(lengths), [-(-n // page_size) for n in lengths]
    num_pages, width = sum(held) + 2, max(held) + 1
    counts = [min(new_rows, n) for n in lengths]
    keys, values = (torch.full((num_pages, page_size, kv_heads, dim), float("nan")) for _ in range(2))
    pos_cache = torch.zeros(num_pages, page_size, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=gen)
    table = torch.full((batch, width), -1, dtype=torch.int32)
    first = 0
    for b, (n, pages) in enumerate(zip(lengths, held)):
        table[b, :pages] = order[first:first + pages].to(torch.int32)
        first += pages
        page, offset = reference.page_slots(keys, table, b, 0, n)
        keys[page, offset], values[page, offset] = (torch.randn(n, kv_heads, dim, generator=gen) for _ in range(2))
        pos_cache[page, offset] = torch.arange(n, dtype=torch.int32)
    q_pos = torch.cat([torch.arange(n - c, n, dtype=torch.int32) for n, c in zip(lengths, counts)])
    q = torch.randn(sum(counts), heads, dim, generator=gen).to(device, dtype)
    return CacheCall(
        q=q, keys=keys.to(device, dtype), values=values.to(device, dtype), block_table=table.to(device),
        cu_seqlens=_cu(counts, device), counts=torch.tensor(counts, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device), host_lengths=torch.tensor(lengths),
        q_pos=q_pos.to(device), q_tag=torch.zeros(q.shape[0], dtype=torch.int32, device=device),
        pos_cache=pos_cache.to(device), tag_cache=torch.zeros(num_pages, page_size, dtype=torch.int32, device=device),
        rule=0, scale=dim ** -0.5,
    )


def make_case(pattern: Pattern, sizes: list[int], heads, kv_heads, dim, dtype, device, gen):
    if pattern == Pattern.VARLEN_CAUSAL:
        return packed_case(sizes, heads, kv_heads, dim, dtype, device, gen)
    rows = 1 if pattern == Pattern.CACHE_DECODE else NEW_ROWS
    return cache_case(sizes, rows, heads, kv_heads, dim, dtype, device, gen)


def run(kernel, call):
    return kernel.packed(call) if isinstance(call, PackedCall) else kernel.cache(call)


def reference_of(call, compute_dtype):
    c = call
    if isinstance(c, PackedCall):
        args = (c.q, c.k, c.v, c.cu_seqlens, c.cu_seqlens, c.pos, c.pos, c.tag, c.tag)
        return reference.varlen_attention(*(a.cpu() for a in args), c.rule, c.scale, compute_dtype=compute_dtype)
    args = (c.q, c.keys, c.values, c.block_table, c.cu_seqlens, c.lengths, c.q_pos, c.pos_cache, c.q_tag,
            c.tag_cache)
    return reference.cache_attention(*(a.cpu() for a in args), c.rule, c.scale, compute_dtype=compute_dtype)


def check(kernel, call) -> str | None:
    """None if ``kernel`` computes ``call`` within the tolerance policy, else what went wrong."""
    try:
        out = run(kernel, call)
    except Exception as err:  # noqa: BLE001  (any failure disqualifies the kernel for this case)
        return f"{type(err).__name__}: {str(err)[:200]}"
    if out.shape != call.q.shape or out.dtype != call.q.dtype:
        return f"returned {tuple(out.shape)} {out.dtype} for q {tuple(call.q.shape)} {call.q.dtype}"
    error, bound = attention_error(out, reference_of(call, torch.float64), reference_of(call, call.q.dtype))
    return None if error <= bound else f"max error {error:.3g} > bound {bound:.3g}"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_kernels(kernels: dict, call, device, repeats: int) -> dict[str, float]:
    """Median µs per kernel over ``repeats`` round-robin rounds (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for round_ in range(repeats + 1):
        for name, kernel in kernels.items():
            _sync(device)
            start = time.perf_counter()
            run(kernel, call)
            _sync(device)
            if round_:
                times[name].append((time.perf_counter() - start) * 1e6)
    return {name: round(statistics.median(t), 2) for name, t in times.items()}


def measured_on(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def tune(device: torch.device, dtypes, head_dims, bands, repeats: int, progress: bool = True) -> Table:
    ours = Ours(sk_ops.get_ops(sk_ops.default_backend(device)))
    candidates = {"ours": ours, **{name: standard_kernel(name) for name in STANDARD_KERNELS}}
    table = Table(device=device_key(device), measured_on=measured_on(device))
    cases = [(p, dt, hd, b) for p in STANDARD for dt in dtypes for hd in head_dims for b in bands]
    gen = torch.Generator().manual_seed(0)
    for pattern, dtype, dim, size_band in tqdm(cases, desc=f"tuning dispatch on {table.device}", disable=not progress):
        heads, kv_heads = HEADS[dim]
        entry = dict(pattern=str(pattern), dtype=dtype_name(dtype), head_dim=dim, band=size_band,
                     ours_backend=ours.ops.name, unsupported={}, wrong={})
        small = make_case(pattern, CHECK_VARLEN if pattern == Pattern.VARLEN_CAUSAL else CHECK_CACHE,
                          heads, kv_heads, dim, dtype, device, gen)
        usable = {}
        for name, kernel in candidates.items():
            page_size = None if pattern == Pattern.VARLEN_CAUSAL else DEFAULT_PAGE_SIZE
            why = kernel.unsupported(pattern, device, dtype, dim, page_size)
            if why is None:
                why = check(kernel, small)
                if why is not None:
                    entry["wrong"][name] = why
                    continue
                usable[name] = kernel
            else:
                entry["unsupported"][name] = why
        sizes = (VARLEN_SIZES if pattern == Pattern.VARLEN_CAUSAL else CACHE_SIZES)[size_band]
        call = make_case(pattern, sizes, heads, kv_heads, dim, dtype, device, gen)
        assert band(call.q.shape[0] if pattern == Pattern.VARLEN_CAUSAL else sum(sizes)) == size_band
        entry["shape"] = dict(sizes=sizes, heads=heads, kv_heads=kv_heads)
        entry["median_us"] = time_kernels(usable, call, device, repeats) if usable else {}
        entry["kernel"] = min(entry["median_us"], key=entry["median_us"].get) if usable else None
        table.entries[Table.key(pattern, entry["dtype"], dim, size_band)] = entry
    return table


def summary(table: Table) -> str:
    lines = [f"dispatch table for {table.device} ({table.measured_on})"]
    for e in table.entries.values():
        times = ", ".join(f"{k} {v:.0f}" for k, v in sorted(e["median_us"].items(), key=lambda kv: kv[1]))
        extra = "".join(f"; {k} WRONG ({v})" for k, v in e["wrong"].items())
        lines.append(f"  {e['pattern']:<14} {e['dtype']:<9} d={e['head_dim']:<4} {e['band']:<3} -> {e['kernel']}"
                     f"  [µs: {times}]{extra}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="table JSON (default: print only)")
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: bfloat16 float16 (cuda), float32 bfloat16 (cpu)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], choices=sorted(HEADS))
    parser.add_argument("--bands", nargs="+", default=None, choices=BANDS, help="default: all (cuda), s m (cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 cuda, 5 cpu)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["bfloat16", "float16"] if gpu else ["float32", "bfloat16"]))]
    bands = args.bands or (list(BANDS) if gpu else ["s", "m"])
    with torch.no_grad():
        table = tune(device, dtypes, args.head_dims, bands, args.repeats or (20 if gpu else 5))
    print(summary(table))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table.to_json(), indent=1) + "\n")
        print(f"wrote {args.out}")
    wrong = [(e["pattern"], e["dtype"], e["head_dim"], k) for e in table.entries.values() for k in e["wrong"]]
    return 1 if any(k == "ours" for *_, k in wrong) else 0  # our kernels computing a case wrongly is a failure


if __name__ == "__main__":
    raise SystemExit(main())
