"""pytest-benchmark suite of the C++ CPU ops (run on purpose, not by CI):

    python -m pytest benchmarks/test_bench_cpu_ops.py --benchmark-only \
        --benchmark-json benchmarks/results/pytest_benchmark_cpu_ops.json

Groups compare our op with SDPA on the same inputs; benchmarks/cpu_attention.py gives the
interleaved side-by-side ratios. The decode op reads a paged cache (pages of
``attention_inputs.PAGE_SIZE`` slots, in order); SDPA reads a rectangular one of the same size.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import skiplayers.ops as sk_ops
from benchmarks.attention_inputs import SMOLLM2, decode_metadata, packed_problem, paged_kv, sdpa_layout

H, HKV, D = SMOLLM2


def _problem(T):
    torch.manual_seed(0)
    return packed_problem([T], *SMOLLM2)


@pytest.mark.parametrize("T", [512, 2048])
def test_prefill_skiplayers(benchmark, T):
    q, k, v, cu, pos = _problem(T)
    benchmark.group = f"prefill dense causal T={T}"
    benchmark(sk_ops.varlen_attention, q, k, v, cu, cu, pos, pos)


@pytest.mark.parametrize("T", [512, 2048])
def test_prefill_sdpa(benchmark, T):
    q, k, v, _, _ = _problem(T)
    qs, ks, vs = sdpa_layout(q, k, v)
    benchmark.group = f"prefill dense causal T={T}"
    benchmark(F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, enable_gqa=True)


@pytest.mark.parametrize("S", [512, 4096])
def test_decode_skiplayers(benchmark, S):
    torch.manual_seed(0)
    kc, vc = paged_kv(1, S, HKV, D)
    q = torch.randn(1, H, D)
    cu, lens, q_pos, table, pos = decode_metadata([S], S)
    benchmark.group = f"decode B=1 S={S}"
    benchmark(sk_ops.cache_attention, q, kc, vc, table, cu, lens, q_pos, pos)


@pytest.mark.parametrize("S", [512, 4096])
def test_decode_sdpa(benchmark, S):
    torch.manual_seed(0)
    ks, vs = torch.randn(1, HKV, S, D), torch.randn(1, HKV, S, D)
    q = torch.randn(1, H, 1, D)
    benchmark.group = f"decode B=1 S={S}"
    benchmark(F.scaled_dot_product_attention, q, ks, vs, enable_gqa=True)
