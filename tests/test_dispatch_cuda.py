"""Attention dispatch on a GPU: every kernel ``auto`` may pick there, on every standard pattern,
against the reference (the tolerance policy of skiplayers/tolerance.py), and ``backend="auto"`` at
the model level against the masked model. The decisions themselves are tested without a GPU in
test_dispatch.py; these tests run wherever CUDA exists (``scripts/gpu_check.sh dispatch``)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import skiplayers as sk
from model_helpers import (
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    assert_reduced_precision_matches,
    tiny_llama,
)
from skiplayers.dispatch import Pattern, Table, tune, use_table
from skiplayers.dispatch.dispatcher import standard_kernel
from skiplayers.dispatch.kernels import STANDARD_KERNELS, Ours
from skiplayers.dispatch.table import device_key

pytestmark = pytest.mark.cuda  # skipped without a GPU (conftest.py)

DEVICE = torch.device("cuda")
STANDARD = [p for p in Pattern if p != Pattern.PREDICATE]
POLICIES = {
    "stop2": sk.SkipPolicy(context_stop_layer=2),
    "anchors": sk.SkipPolicy(context_stop_layer=2, anchor_token_ids=tuple(range(3, 15)), anchor_keep_first=2),
}


@pytest.mark.parametrize("name", ["ours", *STANDARD_KERNELS])
@pytest.mark.parametrize("pattern", STANDARD, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_every_kernel_computes_each_standard_pattern(name, pattern, dtype, head_dim):
    kernel = Ours(sk.ops.get_ops(sk.ops.default_backend(DEVICE))) if name == "ours" else standard_kernel(name)
    why = kernel.unsupported(pattern, DEVICE, dtype, head_dim)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    heads, kv_heads = tune.HEADS[head_dim]
    gen = torch.Generator().manual_seed(2)
    for sizes in (tune.CHECK_VARLEN if pattern == Pattern.VARLEN_CAUSAL else tune.CHECK_CACHE, [19, 19], [300]):
        case = tune.make_case(pattern, sizes, heads, kv_heads, head_dim, dtype, DEVICE, gen)
        assert tune.check(kernel, case) is None, (name, sizes, tune.check(kernel, case))


@pytest.mark.parametrize("table", ["shipped", "sdpa", "varlen_attn"])
@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_auto_matches_masked_model(model, batch, policy, table):
    """float32: SDPA (flash needs half precision, so varlen_attn is refused and auto falls back)."""
    choice = Table.always(device_key(DEVICE), table) if table != "shipped" else None
    with use_table(choice) if choice is not None else contextlib.nullcontext():
        assert_forward_matches_masked(model, policy, "auto", batch, use_cache=True)
        assert_generate_matches_masked(model, policy, "auto", batch, new_tokens=8)


@pytest.mark.parametrize("dtype, floor", [(torch.bfloat16, 0.05), (torch.float16, 0.01)], ids=str)
@pytest.mark.parametrize("table", ["shipped", "sdpa", "varlen_attn"])
def test_auto_in_half_precision(model, batch, dtype, floor, table):
    low = tiny_llama(device=DEVICE, dtype=dtype)
    choice = Table.always(device_key(DEVICE), table) if table != "shipped" else None
    with use_table(choice) if choice is not None else contextlib.nullcontext():
        assert_reduced_precision_matches(low, model, POLICIES["stop2"], "auto", batch, floor)
        sk.patch(low, POLICIES["stop2"])
        try:
            ids, attn, ctx, _ = batch
            low.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=4, do_sample=False)
            ran = {kernel for _, kernel in sk.dispatch_report(low).calls}
        finally:
            sk.unpatch(low)
    if table != "shipped":
        assert table in ran, f"the table named {table}, but the calls ran on {ran}"
