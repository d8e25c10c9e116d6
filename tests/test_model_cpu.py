"""The patched model against the slow masked model on tiny random LLaMAs (CPU and torch backends),
the patch's contract (unpatch, instance-only, errors) and SkipCache's bookkeeping."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import skiplayers as sk
from model_helpers import (
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    assert_reduced_precision_matches,
    tiny_llama,
)

BACKENDS = ["cpu", "torch"]
STOPS = [None, 0, 2, 4]  # 4 = L: nothing stops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", STOPS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_forward_matches_masked_model(model, batch, backend, stop, use_cache):
    assert_forward_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), backend, batch, use_cache=use_cache)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop", STOPS)
def test_generate_matches_masked_model(model, batch, backend, stop):
    assert_generate_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), backend, batch, new_tokens=8)


@pytest.mark.parametrize(
    "config",
    [
        dict(heads=8, kv_heads=1, tie_word_embeddings=False),  # TinyLlama-style: GQA 8, untied head
        dict(heads=2, kv_heads=2, head_dim=128, attention_bias=True, mlp_bias=True),
        dict(heads=8, kv_heads=2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
    ],
)
def test_llama_config_variants(batch, config):
    variant = tiny_llama(seed=1, **config)
    policy = sk.SkipPolicy(context_stop_layer=1)
    assert_forward_matches_masked(variant, policy, "cpu", batch)
    assert_generate_matches_masked(variant, policy, "cpu", batch, new_tokens=4)


@pytest.mark.parametrize("dtype,floor", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
def test_reduced_precision_forward(model, batch, dtype, floor):
    low = tiny_llama(dtype=dtype)
    assert_reduced_precision_matches(low, model, sk.SkipPolicy(context_stop_layer=2), "cpu", batch, floor)


def test_unpatched_outputs_are_identical_after_unpatch(model, batch):
    ids, attn, _, pos = batch
    with torch.no_grad():
        before = model(ids, attention_mask=attn, position_ids=pos).logits
        sk.patch(model, sk.SkipPolicy(context_stop_layer=2))
        assert sk.is_patched(model)
        sk.unpatch(model)
        after = model(ids, attention_mask=attn, position_ids=pos).logits
    assert not sk.is_patched(model)
    assert torch.equal(before, after)
    assert "forward" not in model.__dict__ and "forward" not in model.model.__dict__


def test_patch_without_context_equals_unpatched(model, batch):
    ids, attn, _, pos = batch
    with torch.no_grad():
        plain = model(ids, attention_mask=attn, position_ids=pos).logits
        sk.patch(model, sk.SkipPolicy(context_stop_layer=None))
        patched = model(ids, attention_mask=attn, position_ids=pos).logits
        sk.unpatch(model)
    real = attn.bool()
    assert (patched - plain)[real].abs().max() < 1e-5


def test_patch_affects_only_that_instance(batch):
    a, b = tiny_llama(seed=3), tiny_llama(seed=3)
    ids, attn, ctx, pos = batch
    sk.patch(a, sk.SkipPolicy(context_stop_layer=1))
    with torch.no_grad():
        with pytest.raises(ValueError, match="not used by the model"):
            b.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=2)
        assert not sk.is_patched(b)
    sk.unpatch(a)


def test_sampling_matches_unpatched_when_nothing_is_skipped(model, batch):
    ids, attn, _, _ = batch
    kwargs = dict(attention_mask=attn, max_new_tokens=6, do_sample=True, top_k=20)
    with torch.no_grad():
        torch.manual_seed(7)
        plain = model.generate(ids, **kwargs)
        sk.patch(model, sk.SkipPolicy())
        torch.manual_seed(7)
        patched = model.generate(ids, **kwargs)
        sk.unpatch(model)
    assert torch.equal(plain, patched)


def test_sampling_with_context_stop_runs_and_stores_no_context(model, batch):
    ids, attn, ctx, _ = batch
    sk.patch(model, sk.SkipPolicy(context_stop_layer=1))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=5, do_sample=True,
                             return_dict_in_generate=True, num_return_sequences=2)
    sk.unpatch(model)
    lengths = out.past_key_values.layer_lengths()
    real, context = attn.sum(1).repeat_interleave(2), ctx.sum(1).repeat_interleave(2)
    assert torch.equal(lengths[0], real + 4) and torch.equal(lengths[1], real - context + 4)


# --- SkipCache bookkeeping ---

def test_cache_lengths_and_bytes_exclude_context(model, batch):
    ids, attn, ctx, pos = batch
    stop = 2
    sk.patch(model, sk.SkipPolicy(context_stop_layer=stop))
    with torch.no_grad():
        out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=True)
    sk.unpatch(model)
    cache = out.past_key_values
    assert isinstance(cache, sk.SkipCache)
    lengths = cache.layer_lengths()
    assert lengths.shape == (4, 3) and lengths.dtype == torch.int64
    assert torch.equal(lengths[:stop], attn.sum(1).expand(stop, 3))
    assert torch.equal(lengths[stop:], (attn.sum(1) - ctx.sum(1)).expand(4 - stop, 3))
    assert cache.get_seq_length() == ids.shape[1]  # logical: columns seen, padding included
    # Each (layer, sequence) holds the pages its stored tokens fill: at layers >= ℓ the non-context ones.
    pages = (lengths + cache.page_size - 1) // cache.page_size
    assert torch.equal(torch.stack([layer.held_pages for layer in cache.layers]), pages)
    kv_slot = 2 * model.config.num_key_value_heads * model.config.head_dim * 4
    assert cache.nbytes() == int(pages.sum()) * cache.page_size * kv_slot
    assert cache.stored_nbytes() == int(lengths.sum()) * kv_slot


def test_cache_bytes_at_late_layers_do_not_depend_on_context_length(model):
    sizes = []
    for context in (10, 200):
        ids = torch.randint(3, 101, (1, context + 6))
        ctx = torch.zeros_like(ids, dtype=torch.bool)
        ctx[0, 1 : context + 1] = True
        sk.patch(model, sk.SkipPolicy(context_stop_layer=1))
        with torch.no_grad():
            cache = model(ids, context_mask=ctx, use_cache=True).past_key_values
        sk.unpatch(model)
        sizes.append([layer.nbytes() for layer in cache.layers[1:]])
    assert sizes[0] == sizes[1]


def test_cache_from_unpatched_model_is_refused(model, batch):
    ids, attn, _, _ = batch
    with pytest.raises(TypeError, match="patched with skiplayers.patch"):
        with torch.no_grad():
            model(ids, attention_mask=attn, past_key_values=sk.SkipCache(4), use_cache=True)


def test_context_marked_late_is_refused(model, batch):
    ids, attn, ctx, _ = batch
    sk.patch(model, sk.SkipPolicy(context_stop_layer=1))
    try:
        with torch.no_grad():
            first = model(ids[:, :15], attention_mask=attn[:, :15], use_cache=True)  # no context marked
            with pytest.raises(ValueError, match="first fed"):
                model(ids[:, 15:], attention_mask=attn, context_mask=ctx, past_key_values=first.past_key_values)
    finally:
        sk.unpatch(model)


# --- clear errors for bad input ---

def _patched_forward(model, batch, **changes):
    ids, attn, ctx, pos = batch
    kwargs = dict(attention_mask=attn, position_ids=pos, context_mask=ctx)
    kwargs.update(changes)
    sk.patch(model, sk.SkipPolicy(context_stop_layer=2))
    try:
        with torch.no_grad():
            return model(ids, **kwargs)
    finally:
        sk.unpatch(model)


def test_context_mask_of_wrong_shape(model, batch):
    with pytest.raises(ValueError, match=r"context_mask must have shape \[batch=3"):
        _patched_forward(model, batch, context_mask=torch.zeros(2, 21, dtype=torch.bool))
    with pytest.raises(ValueError, match="covers 30 columns"):
        _patched_forward(model, batch, context_mask=torch.zeros(3, 30, dtype=torch.bool))


def test_context_mask_of_wrong_dtype(model, batch):
    with pytest.raises(TypeError, match="torch.bool"):
        _patched_forward(model, batch, context_mask=batch[2].long())


def test_context_covering_a_whole_sequence(model, batch):
    ctx = batch[1].bool().clone()  # every real token of every sequence
    with pytest.raises(ValueError, match="covers every token of sequence 0"):
        _patched_forward(model, batch, context_mask=ctx)


def test_generate_refuses_a_prompt_ending_in_context(model, batch):
    ids, attn, ctx, _ = batch
    ctx = ctx.clone()
    ctx[1, -1] = True
    sk.patch(model, sk.SkipPolicy(context_stop_layer=2))
    try:
        with pytest.raises(ValueError, match="must end with a non-context token"):
            model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=2)
    finally:
        sk.unpatch(model)


@pytest.mark.parametrize("stop", [-1, 5, 100])
def test_stop_layer_outside_range(model, stop):
    with pytest.raises(ValueError, match=r"outside \[0, 4\]"):
        sk.patch(model, sk.SkipPolicy(context_stop_layer=stop))
    assert not sk.is_patched(model)


def test_non_llama_models_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="supported: llama"):
        sk.patch(gpt2, sk.SkipPolicy(context_stop_layer=0))


def test_backend_errors(model):
    with pytest.raises(ValueError, match="unknown backend"):
        sk.patch(model, sk.SkipPolicy(), backend="metal")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        sk.patch(model, sk.SkipPolicy(), backend="cuda")
    with pytest.raises(TypeError, match="SkipPolicy"):
        sk.patch(model, {"context_stop_layer": 1})
    assert not sk.is_patched(model)


def test_unsupported_flags(model, batch):
    with pytest.raises(NotImplementedError, match="output_attentions"):
        _patched_forward(model, batch, output_attentions=True)
    with pytest.raises(NotImplementedError, match="2-D attention_mask"):
        _patched_forward(model, batch, attention_mask=torch.ones(3, 1, 21, 21))
