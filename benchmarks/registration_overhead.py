"""Per-call host overhead of the decode op's registration, measured on the CPU (no GPU needed).

    python -m benchmarks.registration_overhead [--calls 20000] [--page-size 16] [--out DIR]

What is timed: one ``cache_attention`` call for a decode step (B=8, 32 query / 8 KV heads, head dim
128, 1 new token per sequence over paged caches of 4096 keys, pages of ``--page-size`` slots in order,
metadata on the host), with the Triton kernel launches replaced by
no-ops and the metadata *value* checks off (as on CUDA tensors by default, ``triton_kernels/checks.py``),
so every variant does exactly the same host work as a CUDA call minus the launch (input checks,
tile and split choice, output allocation) and differs only in how it is reached:

* ``launcher``: ``skiplayers.triton_kernels.launchers.cache_attention`` called directly;
* ``library_impl``: ``torch.ops.skiplayers_triton.cache_attention``, the registration we ship
  (``torch.library.Library.impl`` of the launcher; C++ dispatcher -> Python kernel);
* ``custom_op``: the launcher wrapped by ``torch.library.custom_op`` (in a scratch namespace);
* ``triton_op``: the launcher wrapped by ``torch.library.triton_op`` (in a scratch namespace).

The differences to ``launcher`` are the per-call overheads of each registration. The kernels' own
launch cost (Triton's Python launcher, the driver) is the same in every variant and is not measured
here. Median of ``--repeats`` rounds of ``--calls`` calls each; results go to
``registration_overhead.{json,csv}`` in ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # registers the ops for CPU tensors (kernels are stubbed)

import torch

from benchmarks.attention_inputs import PAGE_SIZE, decode_metadata, paged_kv
from benchmarks.common import RESULTS, arg_parser, write_results
from skiplayers.triton_kernels import checks, launch_attention, launchers, registration


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def decode_args(batch=8, heads=32, kv_heads=8, dim=128, cache_len=4096, dtype=torch.float16,
                page_size: int = PAGE_SIZE):
    """The op's arguments in schema order: paged caches (contents never read: the kernels are stubbed)."""
    cap = cache_len + 64
    k_cache, v_cache = paged_kv(batch, cap, kv_heads, dim, dtype, page_size=page_size, fill=torch.empty)
    cu, lens, q_pos, block_table, pos_cache = decode_metadata([cache_len] * batch, cap, page_size=page_size)
    q = torch.randn(batch, heads, dim, dtype=dtype)
    return (q, k_cache, v_cache, block_table, cu, lens, q_pos, pos_cache, None, None, 0, dim**-0.5, 0)


def scratch_registrations():
    """custom_op and triton_op wrappers of the launcher, with the schema's argument types."""

    def body(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
             cu_seqlens_q: torch.Tensor, cache_seqlens: torch.Tensor, q_pos: torch.Tensor, pos_cache: torch.Tensor,
             q_tag: torch.Tensor | None, tag_cache: torch.Tensor | None, rule: int, scale: float,
             num_splits: int = 0) -> torch.Tensor:
        return launchers.cache_attention(q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos,
                                         pos_cache, q_tag, tag_cache, rule, scale, num_splits)

    custom = torch.library.custom_op("skiplayers_overhead::cache_attention_custom_op", body, mutates_args=())
    triton_op = torch.library.triton_op("skiplayers_overhead::cache_attention_triton_op", body, mutates_args=())
    return custom, triton_op


def time_calls(fn, args, calls: int, repeats: int) -> float:
    """Median over ``repeats`` rounds of the mean seconds per call."""
    for _ in range(200):
        fn(*args)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(*args)
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def main(argv=None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=PAGE_SIZE, help="slots per page of the decode caches")
    parser.add_argument("--out", default=str(RESULTS), help="directory of the result files")
    args = parser.parse_args(argv)
    if not registration.INTERPRETED:
        print("run with TRITON_INTERPRET=1 (or unset): the comparison uses CPU tensors")
        return 1
    launch_attention.decode_attention_kernel = _NoLaunch()
    launch_attention.combine_splits_kernel = _NoLaunch()
    checks.value_checks_enabled = lambda t: False  # as for CUDA tensors (they would need a sync)
    custom, triton_op = scratch_registrations()
    variants = {
        "launcher": launchers.cache_attention,
        "library_impl": torch.ops.skiplayers_triton.cache_attention.default,
        "custom_op": custom,
        "triton_op": triton_op,
    }
    inputs = decode_args(page_size=args.page_size)
    rows = []
    base = None
    for name, fn in variants.items():
        seconds = time_calls(fn, inputs, args.calls, args.repeats)
        base = seconds if base is None else base
        rows.append(dict(variant=name, us_per_call=seconds * 1e6, overhead_us=(seconds - base) * 1e6))
        print(f"{name:14s} {seconds * 1e6:7.2f} us/call   overhead vs launcher {(seconds - base) * 1e6:+6.2f} us")
    write_results("registration_overhead", rows,
                  dict(calls=args.calls, repeats=args.repeats, page_size=args.page_size,
                       case="decode B=8 H=32/8 D=128 fp16, paged caches, kernels stubbed"), directory=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
