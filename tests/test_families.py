"""The LLaMA family beyond Llama: Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms before RoPE) and
SmolLM3 (layers without RoPE), patched, against the masked model and the unpatched model; sliding
windows; models that are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

import skiplayers as sk
from model_helpers import (
    FP32_LOGIT_ATOL,
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    tiny_family,
    tiny_llama,
)

FAMILIES = ["mistral", "qwen2", "qwen3", "smollm3"]
POLICIES = {
    "full": sk.SkipPolicy(),
    "stop1": sk.SkipPolicy(context_stop_layer=1),
    "stop3-anchors": sk.SkipPolicy(context_stop_layer=3, anchor_token_ids=(7, 11)),
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return tiny_family(request.param)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("use_cache", [False, True], ids=["nocache", "cache"])
def test_forward_matches_masked_model(family_model, batch, policy, use_cache):
    assert_forward_matches_masked(family_model, policy, "cpu", batch, use_cache=use_cache)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
def test_greedy_tokens_match_masked_model(family_model, batch, policy):
    assert_generate_matches_masked(family_model, policy, "cpu", batch, new_tokens=6)


@torch.no_grad()
def test_nothing_skipped_equals_the_unpatched_model(family_model, batch):
    """The independent truth: the family's own attention implementation, unpatched."""
    ids, attn, _, pos = batch
    plain = family_model(ids, attention_mask=attn, position_ids=pos).logits
    with sk.patched(family_model, sk.SkipPolicy(), backend="cpu"):
        ours = family_model(ids, attention_mask=attn, position_ids=pos).logits
    valid = attn.bool()
    assert (ours[valid] - plain[valid]).abs().max().item() <= FP32_LOGIT_ATOL
    expected = family_model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    with sk.patched(family_model, sk.SkipPolicy(context_stop_layer=4), backend="cpu"):
        got = family_model.generate(ids, attention_mask=attn, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)


def test_qwen3_norms_are_applied(batch):
    """Qwen3's q/k norms change the result: with them replaced by identity the patched model
    differs, so the match above is not an accident of norms that do nothing."""
    model = tiny_family("qwen3")
    for layer in model.model.layers:
        torch.nn.init.normal_(layer.self_attn.q_norm.weight, 1.0, 0.5)
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy(), backend="cpu"):
        with torch.no_grad():
            normed = model(ids, attention_mask=attn, position_ids=pos).logits
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.fill_(1.0)
            plain = model(ids, attention_mask=attn, position_ids=pos).logits
    valid = attn.bool()
    assert (normed[valid] - plain[valid]).abs().max().item() > 1e-3


@torch.no_grad()
def test_sliding_window_is_exact_below_the_window_and_refused_beyond(batch):
    model = tiny_family("mistral", sliding_window=24)
    ids, attn, ctx, pos = batch  # 21 columns: every position is below the window
    assert_forward_matches_masked(model, sk.SkipPolicy(context_stop_layer=2), "cpu", batch)
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=2), backend="cpu"):
        with pytest.raises(NotImplementedError, match="sliding window of 24 tokens"):
            model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=8, do_sample=False)


def test_qwen2_without_sliding_layers_has_no_window():
    model = tiny_family("qwen2", use_sliding_window=False, sliding_window=8)
    from skiplayers.patching.families import sliding_window

    assert sliding_window(model.config) is None
    assert sliding_window(tiny_family("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0).config) == 8


def test_other_models_are_refused_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match=r"supported: llama \(LlamaForCausalLM\), mistral .*qwen3"):
        sk.patch(gpt2, sk.SkipPolicy(context_stop_layer=0))
    gemma = GemmaForCausalLM(GemmaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=64, head_dim=32,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=50))
    with pytest.raises(TypeError, match="model_type='gemma'"):  # scales its embeddings: not the LLaMA loop
        sk.patch(gemma, sk.SkipPolicy())
    assert not sk.is_patched(gpt2) and not sk.is_patched(gemma)


def test_a_llama_without_the_llama_layer_shape_is_refused():
    model = tiny_llama(layers=2)
    del model.model.layers[1].post_attention_layernorm
    with pytest.raises(TypeError, match="layer 1 lacks post_attention_layernorm"):
        sk.patch(model, sk.SkipPolicy())
