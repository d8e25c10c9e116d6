"""SmolLM2-135M-Instruct with real weights: patched (compacted) vs the slow masked model.

Tolerance (flash-attention's rule, at the model level): the truth is the masked model run in
float64; the patched float32 model may be at most twice as far from it as the masked model run in
float32 is, plus 1e-4, at every computed column. On this model float32 itself strays up to ~1e-3
from float64 at some columns, so a plain 1e-4 between two float32 computations that sum in a
different order cannot be promised; each test prints |patched - masked float32| as well.
Greedy tokens must be identical.
"""

from __future__ import annotations

import copy

import pytest
import torch

import skiplayers as sk
from model_helpers import FP32_LOGIT_ATOL, computed_columns

pytestmark = pytest.mark.slow

INSTRUCTIONS = "Translate English to French."
EXAMPLES = [("cheese", "fromage"), ("house", "maison"), ("dog", "chien"), ("water", "eau")]


def assert_close_to_masked_truth(model, model64, policy, batch, logits, label):
    ids, attn, ctx, pos = batch
    truth32 = sk.masked_forward(model, ids, attn, ctx, policy, pos)
    truth64 = sk.masked_forward(model64, ids, attn, ctx, policy, pos)
    keep = computed_columns(attn, ctx, policy, model.config.num_hidden_layers)
    err = (logits.double() - truth64)[keep].abs().max().item()
    naive = (truth32.double() - truth64)[keep].abs().max().item()
    vs32 = (logits - truth32)[keep].abs().max().item()
    print(f"\n{label}: |patched - masked64| = {err:.3g}, |masked32 - masked64| = {naive:.3g}, "
          f"|patched - masked32| = {vs32:.3g}")
    assert err <= 2 * naive + FP32_LOGIT_ATOL


@pytest.fixture(scope="module")
def model():
    return sk.load_default_model()


@pytest.fixture(scope="module")
def model64(model):
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def tokenizer():
    return sk.load_default_tokenizer()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Three prompts with different context lengths, left padded."""
    ids, attn, ctx = sk.fewshot_batch(
        tokenizer,
        [INSTRUCTIONS, "Translate.", INSTRUCTIONS + " Be brief."],
        [EXAMPLES, EXAMPLES[:1], EXAMPLES[:3]],
        ["cat", "the red car", "bread"],
    )
    assert len(set(ctx.sum(1).tolist())) == 3 and (attn == 0).any()
    return ids, attn, ctx, (attn.cumsum(-1) - 1).clamp(min=0)


def test_fewshot_batch_format(tokenizer, batch):
    ids, attn, ctx, _ = batch
    for b in range(3):
        real = attn[b].bool()
        assert ids[b, real][0] == tokenizer.bos_token_id and not ctx[b, real][0]
        assert not ctx[b, ~real].any()
        text_ctx = tokenizer.decode(ids[b][ctx[b]])
        text_query = tokenizer.decode(ids[b][real & ~ctx[b]][1:])
        assert text_ctx.startswith("Translate") and "Q: cheese A: fromage" in text_ctx
        assert text_query.startswith("Q: ") and text_query.endswith(" A:")


@pytest.mark.parametrize("stop", [0, 5, 10, 29])
def test_forward_matches_masked_model(model, model64, batch, stop):
    ids, attn, ctx, pos = batch
    policy = sk.SkipPolicy(context_stop_layer=stop)
    with torch.no_grad():
        sk.patch(model, policy)
        out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=False).logits
        sk.unpatch(model)
    assert_close_to_masked_truth(model, model64, policy, batch, out, f"stop={stop}")


@pytest.mark.parametrize("stop", [0, 5, 10, 29])
def test_greedy_tokens_match_masked_model(model, batch, stop):
    ids, attn, ctx, _ = batch
    policy = sk.SkipPolicy(context_stop_layer=stop)
    sk.patch(model, policy)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=32, do_sample=False,
                             return_dict_in_generate=True)
    sk.unpatch(model)
    assert torch.equal(out.sequences, sk.masked_generate(model, ids, attn, ctx, policy, 32))


def test_patched_without_context_stop_matches_unpatched(model, batch):
    ids, attn, ctx, pos = batch
    with torch.no_grad():
        plain = model(ids, attention_mask=attn, position_ids=pos).logits
        sk.patch(model, sk.SkipPolicy())
        patched = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx).logits
        sk.unpatch(model)
    err = (patched - plain)[attn.bool()].abs().max().item()
    print(f"\n|patched (no stop) - unpatched| = {err:.3g}")
    assert err <= FP32_LOGIT_ATOL * 3  # HF's SDPA path vs our kernels: float32 summation order only


def test_long_context_stores_no_context_at_late_layers(model):
    context, query, stop = 500, 50, 10
    ids = torch.randint(100, 20000, (1, context + query))
    ctx = torch.zeros_like(ids, dtype=torch.bool)
    ctx[0, 1 : context + 1] = True
    sk.patch(model, sk.SkipPolicy(context_stop_layer=stop))
    with torch.no_grad():
        cache = model(ids, context_mask=ctx, use_cache=True, logits_to_keep=1).past_key_values
    sk.unpatch(model)
    lengths = cache.layer_lengths()[:, 0]
    assert (lengths[:stop] == context + query).all() and (lengths[stop:] == query).all()


@pytest.fixture(scope="module")
def anchors(tokenizer):
    return sk.anchor_ids(tokenizer, [".", "\n"])


def test_anchor_ids_end_with_the_given_strings(tokenizer, anchors):
    assert len(anchors) > 50
    assert all(tokenizer.decode([t]).endswith((".", "\n")) for t in anchors)
    assert tokenizer.convert_tokens_to_ids(".") in anchors


@pytest.mark.parametrize("stop", [None, 10])
def test_anchor_cache_matches_ansan_masked_model(model, model64, batch, anchors, stop):
    ids, attn, ctx, pos = batch
    policy = sk.SkipPolicy(context_stop_layer=stop, anchor_token_ids=anchors)
    with torch.no_grad():
        sk.patch(model, policy)
        out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=True)
        generated = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=32, do_sample=False,
                                   return_dict_in_generate=True)
        sk.unpatch(model)
    assert_close_to_masked_truth(model, model64, policy, batch, out.logits, f"anchors, stop={stop}")
    assert torch.equal(generated.sequences, sk.masked_generate(model, ids, attn, ctx, policy, 32))
    # the prompts hold several finished sentences (newline-terminated examples): the cache shrank
    assert (out.past_key_values.layer_lengths()[0] < attn.sum(1)).all()


# Per sequence of the batch: the middle layers each run (True) or skip, so the three sequences run
# 30, 26 and 24 of the 30 layers.
SMOLLM2_LAYER_MASK = torch.ones(3, 30, dtype=torch.bool)
SMOLLM2_LAYER_MASK[1, 12:16] = False
SMOLLM2_LAYER_MASK[2, [11, 13, 15, 17, 19, 21]] = False


@pytest.mark.parametrize("name,policy", [
    ("drop attention 24-29 + skip 20 + context stop 10",
     sk.SkipPolicy(context_stop_layer=10, drop_attention_layers=range(24, 30), skip_layers=[20])),
    ("early exit at 16/22",
     sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[16, 22], threshold=0.5))),
], ids=["drop_skip_stop", "early_exit"])  # a SkipPolicy has no short printed form
def test_skipping_family_matches_masked_model(model, batch, name, policy):
    """The skipping policies with real weights, per-sequence layer masks included: greedy tokens,
    exits and each generated step's logits as the masked model computes them (float32; the file's
    float32-vs-float32 gap of ~1e-3, see the module docstring, sets the logit tolerance)."""
    from model_helpers import assert_generate_matches_masked

    cache = assert_generate_matches_masked(model, policy, "cpu", batch, new_tokens=8, layer_mask=SMOLLM2_LAYER_MASK,
                                           atol=5e-3)
    print(f"\n{name}: {cache.work}")
    lengths = cache.layer_lengths()
    assert (lengths[:, 1][12:16] == 0).all() and (lengths[:, 2][[11, 13, 15]] == 0).all()
    if policy.drop_attention_layers:
        assert (lengths[24:] == 0).all()
