"""``patch(model, policy, backend="triton")`` against the masked model (``skiplayers.masked``), on the
tiny random LLaMA of ``model_helpers``: forward with and without a cache, generation, context stop and
the anchor cache (AnSAN attention and ``cache_compact``) through the Triton ops. Model-level tolerance
policy: ``model_helpers``. Without a GPU the kernels run under the Triton interpreter on CPU tensors.
"""

from __future__ import annotations

import pytest

import skiplayers as sk
from backends import triton_device
from model_helpers import assert_forward_matches_masked, assert_generate_matches_masked, tiny_llama

pytestmark = pytest.mark.triton

DEVICE = triton_device()


@pytest.mark.parametrize("stop", [None, 0, 2, 4])
@pytest.mark.parametrize("use_cache", [False, True])
def test_model_forward_matches_masked_model(model, batch, stop, use_cache):
    assert_forward_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), "triton", batch,
                                  use_cache=use_cache)


@pytest.mark.parametrize("stop", [None, 2])
def test_model_generate_matches_masked_model(model, batch, stop):
    assert_generate_matches_masked(model, sk.SkipPolicy(context_stop_layer=stop), "triton", batch,
                                   new_tokens=8)


def test_model_head_dim_96_matches_masked_model(batch):
    """A head dim that is not a power of two (padded to 128 inside the kernels): prefill, cache and
    generation with context stop, through the Triton ops."""
    model = tiny_llama(head_dim=96, layers=2, device=DEVICE)  # two layers: the interpreter's time
    policy = sk.SkipPolicy(context_stop_layer=1)
    assert_forward_matches_masked(model, policy, "triton", batch, use_cache=True)
    assert_generate_matches_masked(model, policy, "triton", batch, new_tokens=4)


ANCHORS = tuple(range(3, 15))  # as tests/test_anchors.py: sentences of ~8 tokens


@pytest.mark.parametrize("stop,keep_first", [(None, 0), (2, 2)])
def test_model_anchor_cache_matches_ansan_masked_model(model, batch, stop, keep_first):
    """AnSAN attention (Rule.ANCHORS) and the anchor-only cache (cache_compact) through the Triton ops."""
    policy = sk.SkipPolicy(context_stop_layer=stop, anchor_token_ids=ANCHORS, anchor_keep_first=keep_first)
    assert_forward_matches_masked(model, policy, "triton", batch, use_cache=True)
    assert_generate_matches_masked(model, policy, "triton", batch, new_tokens=8)


def test_model_forward_plans_prefill_blocks_once_per_metadata(model, batch):
    """The layers of a forward share their metadata tensors, so the prefill block plan
    (``launch_plan.block_plan``) is computed once per distinct metadata, then reused by the other
    layers (with context stop, the layers after the stop get new, compacted metadata: one more plan)."""
    from skiplayers.triton_kernels import launch_plan

    launch_plan.clear_plan_cache()
    before = dict(launch_plan.stats)
    assert_forward_matches_masked(model, sk.SkipPolicy(context_stop_layer=2), "triton", batch)
    computed = launch_plan.stats["computed"] - before["computed"]
    reused = launch_plan.stats["reused"] - before["reused"]
    layers = model.config.num_hidden_layers
    print(f"\nblock plans over {layers} layers: {computed} computed, {reused} reused")
    assert computed + reused == layers, "every layer's prefill attention goes through the Triton op"
    assert 1 <= computed <= 2, "a plan was recomputed for a layer whose metadata had not changed"
