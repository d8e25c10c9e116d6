"""The patched model with ``backend="cuda"`` (the CUDA C++ kernels) against the slow masked model:
the tiny random LLaMAs of test_model_cpu.py and SmolLM2-135M with real weights, on a GPU.
Helpers and tolerance policy are those of the CPU model tests (tests/model_helpers.py)."""

from __future__ import annotations

import copy

import pytest
import torch

import skiplayers as sk
from model_helpers import (
    FP32_LOGIT_ATOL,
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    assert_reduced_precision_matches,
    computed_columns,
    tiny_llama,
)

pytestmark = pytest.mark.cuda  # skipped without a GPU (conftest.py)

DEVICE = "cuda"
STOPS = [None, 0, 2, 4]  # 4 = L: nothing stops


@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_forward_matches_masked_model(model, batch, stop, use_cache):
    assert_forward_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), "cuda", batch, use_cache=use_cache)


@pytest.mark.parametrize("stop", STOPS)
def test_generate_matches_masked_model(model, batch, stop):
    cache = assert_generate_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), "cuda", batch, new_tokens=8)
    assert cache.layers[0].pool.keys.is_cuda and cache.layers[0].block_table.is_cuda


@pytest.mark.parametrize(
    "config",
    [
        dict(heads=8, kv_heads=1, tie_word_embeddings=False),  # GQA 8
        dict(heads=2, kv_heads=2, head_dim=128, attention_bias=True, mlp_bias=True),  # head dim 128, MHA
        dict(heads=9, kv_heads=3, hidden_size=144),  # SmolLM2's GQA 3 (hidden size a multiple of 9)
    ],
)
def test_llama_config_variants(batch, config):
    variant = tiny_llama(seed=1, device=DEVICE, **config)
    policy = sk.SkipPolicy(context_stop_layer=1)
    assert_forward_matches_masked(variant, policy, "cuda", batch)
    assert_generate_matches_masked(variant, policy, "cuda", batch, new_tokens=4)


@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_reduced_precision_forward(model, batch, dtype, floor):
    low = tiny_llama(dtype=dtype, device=DEVICE)
    assert_reduced_precision_matches(low, model, sk.SkipPolicy(context_stop_layer=2), "cuda", batch, floor)


ANCHORS = tuple(range(3, 13))  # ~10% of the tiny vocabulary ends a sentence


@pytest.mark.parametrize("stop", [None, 2])
@pytest.mark.parametrize("keep_first", [0, 1])
def test_anchors_match_masked_model(model, batch, stop, keep_first):
    """AnSAN attention (prefill and decode) and the anchor-only cache (cache_compact) on the GPU."""
    policy = sk.SkipPolicy(context_stop_layer=stop, anchor_token_ids=ANCHORS, anchor_keep_first=keep_first)
    for use_cache in (False, True):
        assert_forward_matches_masked(model, policy, "cuda", batch, use_cache=use_cache)
    new_tokens = 12
    cache = assert_generate_matches_masked(model, policy, "cuda", batch, new_tokens=new_tokens)
    seen = batch[1].sum(1).cpu() + new_tokens
    assert (cache.layer_lengths().cpu() < seen).any(), "finished sentences were not dropped from the cache"


def test_default_backend_on_cuda_is_cuda():
    assert sk.ops.default_backend(torch.device(DEVICE)) == "cuda"


# --- SmolLM2-135M, real weights -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return sk.load_default_model(device=DEVICE)


@pytest.fixture(scope="module")
def fewshot(smollm2):
    tokenizer = sk.load_default_tokenizer()
    examples = [("cheese", "fromage"), ("house", "maison"), ("dog", "chien"), ("water", "eau")]
    ids, attn, ctx = sk.fewshot_batch(
        tokenizer, "Translate English to French.", [examples, examples[:1], examples[:3]], ["cat", "the red car", "bread"]
    )
    return ids.to(DEVICE), attn.to(DEVICE), ctx.to(DEVICE), (attn.cumsum(-1) - 1).clamp(min=0).to(DEVICE)


@pytest.fixture(scope="module")
def smollm2_64(smollm2):
    return copy.deepcopy(smollm2).double()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [0, 10, 29])
def test_smollm2_forward_matches_masked_model(smollm2, smollm2_64, fewshot, stop):
    """Tolerance of tests/test_smollm2.py: 1e-4, or twice the masked model's own float32 noise."""
    ids, attn, ctx, pos = fewshot
    policy = sk.SkipPolicy(context_stop_layer=stop)
    with torch.no_grad():
        sk.patch(smollm2, policy, backend="cuda")
        try:
            out = smollm2(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=False).logits
        finally:
            sk.unpatch(smollm2)
        truth = sk.masked_forward(smollm2, ids, attn, ctx, policy, pos)
        truth64 = sk.masked_forward(smollm2_64, ids, attn, ctx, policy, pos)
    keep = computed_columns(attn, ctx, policy, smollm2.config.num_hidden_layers)
    err = (out - truth)[keep].abs().max().item()
    noise = (truth.double() - truth64)[keep].abs().max().item()
    print(f"\nstop={stop}: |patched (cuda) - masked| = {err:.3g}; float32 noise of the masked model = {noise:.3g}")
    assert err <= max(FP32_LOGIT_ATOL, 2 * noise)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [0, 10, 29])
def test_smollm2_greedy_tokens_match_masked_model(smollm2, fewshot, stop):
    ids, attn, ctx, _ = fewshot
    policy = sk.SkipPolicy(context_stop_layer=stop)
    sk.patch(smollm2, policy, backend="cuda")
    try:
        with torch.no_grad():
            out = smollm2.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=32, do_sample=False)
    finally:
        sk.unpatch(smollm2)
    assert torch.equal(out, sk.masked_generate(smollm2, ids, attn, ctx, policy, 32))
