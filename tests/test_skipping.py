"""Attention-sublayer dropping, layer skipping (static and per sequence) and token early exit: the
patched model against the slow masked model (``skiplayers.masked``) on tiny random LLaMAs (GQA,
left-padded ragged batches), alone and combined with context stop and anchors; what the cache
stores; the work saved; and the errors for bad input.

Tolerances are the model-level policy of ``model_helpers`` (float32 logits within
``FP32_LOGIT_ATOL``, greedy tokens equal, and with early exit the same number of exits).
"""

from __future__ import annotations

import pytest
import torch

import skiplayers as sk
from model_helpers import (
    FP32_LOGIT_ATOL,
    assert_forward_matches_masked,
    assert_generate_matches_masked,
    prefill_and_decode_logits,
    ragged_batch,
    tiny_family,
    tiny_llama,
)

LAYERS = 6
BACKENDS = ["cpu", "torch"]
ANCHORS = tuple(range(3, 15))  # as tests/test_anchors.py: sentences of ~8 tokens
# The tiny random model's top probabilities sit near 1/vocab (~0.015-0.02): this threshold makes
# some generated tokens exit at each exit layer and others run on.
THRESHOLD = 0.0175
# Per sequence: sequence 0 skips layer 2, sequence 1 layers 1 and 3, sequence 2 layers 0 and 5.
LAYER_MASK = torch.tensor([[1, 1, 0, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)

POLICIES = {
    "drop_attention": dict(drop_attention_layers=[3, 4]),
    "skip_layers": dict(skip_layers=[1, 4]),
    "early_exit": dict(early_exit=sk.EarlyExit(layers=[1, 3], threshold=THRESHOLD)),
    "early_exit_kv_none": dict(early_exit=sk.EarlyExit(layers=[1, 3], threshold=THRESHOLD, kv="none")),
    "all_with_context_stop": dict(context_stop_layer=2, drop_attention_layers=[4], skip_layers=[1],
                                  early_exit=sk.EarlyExit(layers=[2], threshold=THRESHOLD)),
    "all_with_anchors": dict(context_stop_layer=3, anchor_token_ids=ANCHORS, drop_attention_layers=[2],
                             early_exit=sk.EarlyExit(layers=[0, 3], threshold=THRESHOLD)),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=LAYERS)


@pytest.fixture(scope="module")
def batch():
    return ragged_batch()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True], ids=["static", "layer_mask"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_forward_matches_masked_model(model, batch, backend, name, per_sequence):
    policy = sk.SkipPolicy(**POLICIES[name])
    assert_forward_matches_masked(model, policy, backend, batch, use_cache=True,
                                  layer_mask=LAYER_MASK if per_sequence else None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sequence", [False, True], ids=["static", "layer_mask"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_generate_matches_masked_model(model, batch, backend, name, per_sequence):
    policy = sk.SkipPolicy(**POLICIES[name])
    cache = assert_generate_matches_masked(model, policy, backend, batch, new_tokens=8,
                                           layer_mask=LAYER_MASK if per_sequence else None)
    if policy.early_exit is not None:
        work = cache.work
        assert 0 < work.exits < work.exit_rows, f"the threshold should make some tokens exit, not all: {work}"


@pytest.mark.triton
@pytest.mark.parametrize("name", ["all_with_context_stop", "all_with_anchors", "early_exit_kv_none"])
def test_triton_backend_matches_masked_model(model, batch, name):
    policy = sk.SkipPolicy(**POLICIES[name])
    assert_forward_matches_masked(model, policy, "triton", batch, use_cache=True, layer_mask=LAYER_MASK)
    assert_generate_matches_masked(model, policy, "triton", batch, new_tokens=6, layer_mask=LAYER_MASK)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "smollm3"])
def test_families_propagate_exited_kv_with_their_own_modules(batch, family):
    """KV propagation computes K/V by the family's modules (Qwen2's biases, Qwen3's k-norm,
    SmolLM3's layers without RoPE): a wrong propagation changes the later tokens' logits."""
    model = tiny_family(family, layers=LAYERS)
    policy = sk.SkipPolicy(context_stop_layer=2, skip_layers=[4],
                           early_exit=sk.EarlyExit(layers=[0, 2], threshold=THRESHOLD))
    cache = assert_generate_matches_masked(model, policy, "cpu", batch, new_tokens=8, layer_mask=LAYER_MASK)
    assert cache.work.exits > 0


@torch.no_grad()
def test_propagation_is_what_later_tokens_attend_to(model, batch):
    """With KV propagation and without it the generated logits differ (later tokens that run
    deeper layers attend to the exited ones' propagated K/V there), and each matches its own
    masked model. (Exits after layers 0 and 2 at this threshold leave a mix of exiting and
    non-exiting tokens in every sequence of this model; with other settings a sequence whose
    later tokens all exit too never reads a deeper layer, and the two modes agree.)"""
    ids, attn, ctx, _ = batch
    logits = {}
    for kv in ("propagate", "none"):
        policy = sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[0, 2], threshold=THRESHOLD, kv=kv))
        assert_generate_matches_masked(model, policy, "cpu", batch, new_tokens=8)
        with sk.patched(model, policy):
            out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=8, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)
            logits[kv] = torch.stack(out.logits, 1)
    assert (logits["propagate"] - logits["none"]).abs().max() > 100 * FP32_LOGIT_ATOL


@torch.no_grad()
def test_cache_stores_nothing_where_attention_is_dropped_or_layers_skipped(model, batch):
    ids, attn, _, pos = batch
    real = attn.sum(1)
    with sk.patched(model, sk.SkipPolicy(drop_attention_layers=[3, 4], skip_layers=[0])):
        cache = model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK).past_key_values
        cache.check_lengths()
        lengths = cache.layer_lengths()
        expected = LAYER_MASK.T.long() * real[None, :]
        expected[[0, 3, 4]] = 0
        assert torch.equal(lengths, expected)
        assert all(cache.layers[i].nbytes() == 0 for i in (0, 3, 4))
    with sk.patched(model, sk.SkipPolicy()):
        full = model(ids, attention_mask=attn, position_ids=pos).past_key_values
    assert cache.nbytes() < full.nbytes()


@torch.no_grad()
def test_work_report_counts_the_layers_computed(model, batch):
    ids, attn, _, pos = batch
    rows = int(attn.sum())
    with sk.patched(model, sk.SkipPolicy(skip_layers=[1, 4])):
        model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK)
        report = sk.work_report(model, reset=True)
        assert sk.work_report(model).calls == 0
    runs = LAYER_MASK.clone()
    runs[:, [1, 4]] = False
    assert report.row_layers == int((runs.long() * attn.sum(1)[:, None]).sum())
    assert report.full_row_layers == rows * LAYERS
    assert report.fraction_saved == pytest.approx(1 - report.row_layers / (rows * LAYERS))
    assert [c.row_layers for c in report.per_call] == [report.row_layers]


@torch.no_grad()
def test_work_report_per_call_gives_each_decode_steps_exits(model, batch):
    ids, attn, _, _ = batch
    with sk.patched(model, sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[1, 3], threshold=THRESHOLD))):
        model.generate(ids, attention_mask=attn, max_new_tokens=5, do_sample=False)
        report = sk.work_report(model)
    prefill, *steps = report.per_call
    assert prefill.exit_rows == 0 and prefill.fraction_saved == 0.0  # a prompt runs every layer
    assert len(steps) == 4 and all(c.exit_rows == 3 for c in steps)
    for call in steps:  # an exit after layer e leaves LAYERS - 1 - e layers undone for its row
        assert call.row_layers == 3 * LAYERS - (3 * (LAYERS - 1) - call.exit_layer_sum)
    assert report.exits == sum(c.exits for c in steps) > 0
    assert report.mean_exit_layer == pytest.approx(sum(c.exit_layer_sum for c in steps) / 12)


@torch.no_grad()
def test_layer_hooks_run_on_the_layers_that_run(model, batch):
    ids, attn, _, pos = batch
    seen = []
    handles = [layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, args[0].shape[1])))
               for i, layer in enumerate(model.model.layers)]
    try:
        with sk.patched(model, sk.SkipPolicy(skip_layers=[1], drop_attention_layers=[3])):
            model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK)
    finally:
        for handle in handles:
            handle.remove()
    counts = attn.sum(1)
    expected = [(i, int((LAYER_MASK[:, i].long() * counts).sum())) for i in range(LAYERS) if i != 1]
    assert seen == expected  # layer 3 runs (its MLP), layer 1 does not; each sees only its sequences' rows


@torch.no_grad()
def test_hidden_states_are_carried_through_skipped_layers(model, batch):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy()):
        out = model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK, output_hidden_states=True)
    hs = out.hidden_states
    real = attn.bool()
    for layer in range(LAYERS - 1):  # hidden_states[l + 1] is layer l's output
        for b in range(3):
            same = torch.equal(hs[layer + 1][b][real[b]], hs[layer][b][real[b]])
            assert same == (not bool(LAYER_MASK[b, layer])), (layer, b)


def test_layer_mask_must_stay_the_same_on_one_cache(model, batch):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy()), torch.no_grad():
        cache = model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK).past_key_values
        step = torch.tensor([[5], [6], [7]])
        mask = torch.cat([attn, torch.ones_like(step)], 1)
        with pytest.raises(ValueError, match="differs from the one this SkipCache was filled with"):
            model(step, attention_mask=mask, past_key_values=cache, layer_mask=~LAYER_MASK)
        with pytest.raises(ValueError, match="differs"):
            model(step, attention_mask=mask, past_key_values=cache)


@torch.no_grad()
def test_crop_undoes_columns_of_sequences_that_skip_layers(model, batch):
    """crop (assisted decoding) removes, per layer, only the slots a sequence stored there."""
    ids, attn, _, pos = batch
    step = torch.tensor([[5], [6], [7]])
    with sk.patched(model, sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[1], threshold=THRESHOLD))):
        cache = model(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK).past_key_values
        before = cache.layer_lengths()
        mask = attn
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            model(step, attention_mask=mask, past_key_values=cache, layer_mask=LAYER_MASK)
        cache.crop(-3)
        cache.check_lengths()
        assert torch.equal(cache.layer_lengths(), before)


@torch.no_grad()
def test_crop_after_exits_without_propagation_is_refused(model, batch):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[0, 1, 2], threshold=0.01, kv="none"))):
        out = model.generate(ids, attention_mask=attn, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        assert sk.work_report(model).exits > 0
    out.past_key_values.check_lengths()  # uneven exits: deeper layers hold fewer slots, still mirrored
    with pytest.raises(NotImplementedError, match="kv='none'"):
        out.past_key_values.crop(-1)


def test_beam_search_expands_the_layer_mask(model, batch):
    ids, attn, ctx, _ = batch
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=2)), torch.no_grad():
        out = model.generate(ids, attention_mask=attn, context_mask=ctx, layer_mask=LAYER_MASK, max_new_tokens=4,
                             num_beams=2, do_sample=False, return_dict_in_generate=True)
    out.past_key_values.check_lengths()
    lengths = out.past_key_values.layer_lengths()
    assert lengths.shape == (LAYERS, 6)
    skipped = ~LAYER_MASK.repeat_interleave(2, dim=0).T  # [L, B * beams]
    assert (lengths[skipped] == 0).all() and (lengths[~skipped] > 0).all()


def test_static_skips_and_dropped_attention_compile(model, batch):
    policy = sk.SkipPolicy(context_stop_layer=2, skip_layers=[1], drop_attention_layers=[4])
    with sk.patched(model, policy), torch.no_grad():
        eager = prefill_and_decode_logits(model, batch, LAYERS)
        torch._dynamo.reset()
        compiled = prefill_and_decode_logits(torch.compile(model, backend="eager", fullgraph=False), batch, LAYERS)
    for e, c in zip(eager[:2], compiled[:2]):
        assert torch.allclose(e, c, atol=FP32_LOGIT_ATOL, equal_nan=True)
    assert torch.equal(eager[2], compiled[2])


def test_unpatch_restores_dropped_attention(model, batch):
    ids, attn, _, pos = batch
    with torch.no_grad():
        before = model(ids, attention_mask=attn, position_ids=pos).logits
        with sk.patched(model, sk.SkipPolicy(drop_attention_layers=[0, 5])):
            assert "forward" in model.model.layers[0].self_attn.__dict__
        assert "forward" not in model.model.layers[0].self_attn.__dict__
        after = model(ids, attention_mask=attn, position_ids=pos).logits
    assert torch.equal(before, after)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(skip_layers=[1, 2], drop_attention_layers=[2]), ValueError, "in both skip_layers"),
    (dict(skip_layers=3), TypeError, "collection of layer indices"),
    (dict(drop_attention_layers=[1.0]), TypeError, "must hold ints"),
    (dict(early_exit=0.9), TypeError, "EarlyExit"),
])
def test_bad_policies(kwargs, error, match):
    with pytest.raises(error, match=match):
        sk.SkipPolicy(**kwargs)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(layers=[1], threshold=0.0), ValueError, r"\(0, 1\]"),
    (dict(layers=[1], threshold=1.5), ValueError, r"\(0, 1\]"),
    (dict(layers=[1], threshold=True), TypeError, "number"),
    (dict(layers=[], threshold=0.5), ValueError, "at least one"),
    (dict(layers=[1], threshold=0.5, kv="copy"), ValueError, "kv"),
])
def test_bad_early_exit(kwargs, error, match):
    with pytest.raises(error, match=match):
        sk.EarlyExit(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(skip_layers=[6]), r"outside \[0, 5\]"),
    (dict(drop_attention_layers=[-1]), r"outside \[0, 5\]"),
    (dict(skip_layers=range(6)), "all 6 layers"),
    (dict(early_exit=sk.EarlyExit(layers=[5], threshold=0.5)), r"outside \[0, 4\]"),
])
def test_policies_that_do_not_fit_the_model(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.patch(model, sk.SkipPolicy(**kwargs))
    assert not sk.is_patched(model)


@pytest.mark.parametrize("layer_mask,error,match", [
    (LAYER_MASK.long(), TypeError, "dtype torch.bool"),
    (LAYER_MASK[:, :5], ValueError, r"shape \[batch=3, layers=6\]"),
    (LAYER_MASK[:2], ValueError, r"shape \[batch=3, layers=6\]"),
    ([[True] * 6] * 3, TypeError, "torch.Tensor"),
    (torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0], [1] * 6], dtype=torch.bool), ValueError,
     r"sequences \[1\] without any layer"),
])
def test_bad_layer_masks(model, batch, layer_mask, error, match):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy(skip_layers=[1])), torch.no_grad():
        with pytest.raises(error, match=match):
            model(ids, attention_mask=attn, position_ids=pos, layer_mask=layer_mask)


def test_early_exit_is_refused_while_training(batch):
    model = tiny_llama(layers=LAYERS)
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[1], threshold=0.5))):
        with pytest.raises(NotImplementedError, match="torch.no_grad"):
            model(ids, attention_mask=attn, position_ids=pos, use_cache=False)


def test_layer_mask_is_refused_under_compile(model, batch):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy()), torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        with pytest.raises(Exception, match="torch.compile cannot trace"):
            compiled(ids, attention_mask=attn, position_ids=pos, layer_mask=LAYER_MASK,
                     past_key_values=sk.SkipCache(LAYERS))



# --- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
@pytest.mark.parametrize("name", ["all_with_context_stop", "all_with_anchors", "early_exit_kv_none"])
def test_gpu_backends_match_masked_model(name, backend):
    model, batch = tiny_llama(layers=LAYERS, device="cuda"), ragged_batch(device="cuda")
    policy = sk.SkipPolicy(**POLICIES[name])
    assert_forward_matches_masked(model, policy, backend, batch, use_cache=True, layer_mask=LAYER_MASK)
    assert_generate_matches_masked(model, policy, backend, batch, new_tokens=6, layer_mask=LAYER_MASK)
