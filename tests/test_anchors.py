"""Anchor-only KV caches (AnLLM): the reduced-cache model against the AnSAN-masked model, and the
cache invariant that a finished sentence keeps only its anchor."""

from __future__ import annotations

import pytest
import torch

import skiplayers as sk
from model_helpers import assert_forward_matches_masked, assert_generate_matches_masked
from skiplayers.meta import TAG_ANCHOR, TAG_SENTENCE_SHIFT, TAG_SINK

ANCHORS = tuple(range(3, 15))  # ~12% of the tiny vocabulary: sentences of ~8 tokens


def policies():
    for stop in (None, 2):
        for keep_first in (0, 2):
            yield sk.SkipPolicy(context_stop_layer=stop, anchor_token_ids=ANCHORS, anchor_keep_first=keep_first)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("policy", list(policies()), ids=lambda p: f"stop{p.context_stop_layer}-sink{p.anchor_keep_first}")
def test_reduced_cache_matches_ansan_masked_model(model, batch, backend, policy):
    assert_forward_matches_masked(model, policy, backend, batch)
    assert_forward_matches_masked(model, policy, backend, batch, use_cache=True)
    assert_generate_matches_masked(model, policy, backend, batch, new_tokens=8)


def assert_no_finished_sentence_tokens(cache: sk.SkipCache, keep_first: int):
    # The reduction a call requests runs before the cache is next used (SkipCache.request_reduction);
    # reading lengths or bytes, or the next forward, carries it out. Read the buffers after it.
    cache.settle()
    cache.check_lengths()
    current = cache.sentence_counts
    for layer in cache.layers:
        for b in range(layer.host_lengths.shape[0]):
            tag = layer.read("tag", b)
            finished = (tag >> TAG_SENTENCE_SHIFT) < current[b]
            kept_kinds = (tag & (TAG_ANCHOR | TAG_SINK)) != 0
            assert bool((~finished | kept_kinds).all()), "a finished sentence's non-anchor K/V is still cached"
            assert int((tag & TAG_SINK != 0).sum()) <= keep_first


@pytest.mark.parametrize("keep_first", [0, 3])
def test_cache_never_holds_finished_sentences(model, batch, keep_first):
    ids, attn, ctx, _ = batch
    policy = sk.SkipPolicy(anchor_token_ids=ANCHORS, anchor_keep_first=keep_first)
    sk.patch(model, policy)
    try:
        with torch.no_grad():
            out = model(ids, attention_mask=attn, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            assert_no_finished_sentence_tokens(cache, keep_first)
            mask = attn
            for step in range(12):
                # force an anchor every third step so sentences finish while decoding
                token = torch.full((3, 1), ANCHORS[0]) if step % 3 == 2 else out.logits[:, -1:].argmax(-1).clamp(min=20)
                mask = torch.cat([mask, mask.new_ones(3, 1)], dim=1)
                out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
                assert_no_finished_sentence_tokens(cache, keep_first)
    finally:
        sk.unpatch(model)


def test_reduction_releases_memory(model):
    ids = torch.randint(20, 101, (2, 300))
    ids[:, 10::10] = ANCHORS[0]  # 29 sentences of 10 tokens
    with torch.no_grad():
        sk.patch(model, sk.SkipPolicy())
        full = model(ids, use_cache=True).past_key_values
        sk.patch(model, sk.SkipPolicy(anchor_token_ids=ANCHORS))
        reduced = model(ids, use_cache=True).past_key_values
        sk.unpatch(model)
    assert torch.equal(reduced.layer_lengths(), torch.full((4, 2), 29 + 9))  # 29 anchors + the open sentence
    assert reduced.nbytes() < 0.25 * full.nbytes()


def test_anchor_policy_errors(model):
    with pytest.raises(ValueError, match="anchor_keep_first needs anchor_token_ids"):
        sk.SkipPolicy(anchor_keep_first=2)
    sk.patch(model, sk.SkipPolicy(anchor_token_ids=ANCHORS))
    try:
        with pytest.raises(NotImplementedError, match="inputs_embeds"):
            with torch.no_grad():
                model(inputs_embeds=torch.randn(1, 4, 128))
    finally:
        sk.unpatch(model)
