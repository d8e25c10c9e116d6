"""``sk.StaticDecoder``: decode steps whose host work (page assignment, bookkeeping) happens before
the step, so that the step itself is device work only.

* each step equals the eager patched decode step (which the model-level tests prove equal to the
  masked model): logits, greedy tokens, the cache's lengths and both mirrors;
* the step traces whole: ``torch._dynamo.explain`` finds 0 graph breaks, no opaque host op of the
  patch (``skiplayers_host``) runs in it, and the compiled step equals the eager one;
* with a reserved pool the step takes no page (the pool's free list does not move during it), and
  its tensors are never replaced (a CUDA graph holds their addresses);
* what needs data-dependent host decisions is refused with a reason.

The CUDA-graph capture itself runs where there is a GPU (``test_capture_replays_the_eager_steps``).
"""

from __future__ import annotations

import pytest
import torch

import skiplayers as sk
from model_helpers import ragged_batch, tiny_llama
from skiplayers.pages import PagePool

STEPS = 5
POLICIES = {
    "context stop at 2": sk.SkipPolicy(context_stop_layer=2),
    "nothing skipped": sk.SkipPolicy(),
    "drop attention 3, skip 1": sk.SkipPolicy(drop_attention_layers=[3], skip_layers=[1]),
}


def _prefill(model, batch, cache=None):
    ids, attn, ctx, pos = batch
    out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=True,
                past_key_values=cache, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def _eager_steps(model, batch, steps: int):
    """Greedy logits of ``steps`` decode steps through the usual patched forward, positions as
    generate() gives them (the attention mask's cumsum - 1)."""
    ids, attn, ctx, _ = batch
    cache, token = _prefill(model, batch)
    logits = []
    for _ in range(steps):
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
        out = model(token, attention_mask=attn, position_ids=attn.cumsum(-1)[:, -1:] - 1, context_mask=ctx,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits.append(out.logits)
        token = out.logits.argmax(-1)
    return logits, cache


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("policy", list(POLICIES))
@torch.no_grad()
def test_static_steps_equal_the_eager_patched_steps(model, batch, backend, policy):
    with sk.patched(model, POLICIES[policy], backend=backend):
        expected, eager_cache = _eager_steps(model, batch, STEPS)
        cache, token = _prefill(model, batch)
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=STEPS)
        for want in expected:
            got = decoder(token)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert torch.equal(got.argmax(-1), want.argmax(-1))
            cache.check_lengths()
            token = got.argmax(-1)
        assert torch.equal(cache.layer_lengths(), eager_cache.layer_lengths())
        assert cache.get_seq_length() == eager_cache.get_seq_length()
        with pytest.raises(RuntimeError, match="max_new_tokens steps have run"):
            decoder(token)


@torch.no_grad()
def test_the_step_traces_whole_and_compiled_equals_eager(model, batch):
    with sk.patched(model, POLICIES["context stop at 2"], backend="cpu"):
        cache, token = _prefill(model, batch)
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=3)
        decoder.prepare()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(decoder.step)(token)
        assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
        assert explained.graph_count == 1
        traced = "\n".join(str(g.graph) for g in explained.graphs)
        assert "skiplayers_host" not in traced  # no opaque host op of the patch: the step is device work
        assert "skiplayers.cache_append" in traced and "skiplayers.cache_attention" in traced

    # Compiled against eager, step by step, on two copies of the same prefill.
    with sk.patched(model, POLICIES["context stop at 2"], backend="cpu"):
        eager_cache, token = _prefill(model, batch)
        compiled_cache, _ = _prefill(model, batch)
        eager = sk.StaticDecoder(model, eager_cache, max_new_tokens=3)
        compiled = sk.StaticDecoder(model, compiled_cache, max_new_tokens=3)
        torch._dynamo.reset()
        compiled.step = torch.compile(compiled.step, fullgraph=True, backend="aot_eager")
        for _ in range(3):
            want, got = eager(token), compiled(token)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            token = want.argmax(-1)
        assert torch.equal(compiled_cache.layer_lengths(), eager_cache.layer_lengths())
        compiled_cache.check_lengths()


@torch.no_grad()
def test_with_a_reserved_pool_the_step_takes_no_page_and_keeps_its_tensors(model, batch, monkeypatch):
    layers = model.config.num_hidden_layers
    with sk.patched(model, POLICIES["context stop at 2"], backend="cpu"):
        cache, token = _prefill(model, batch, sk.SkipCache(layers, page_size=4, max_tokens=4 * 4 * 3 * 12))
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=2 * 4)
        pool = cache.layers[0].pool
        for _ in range(2 * 4):  # crosses page boundaries
            decoder.prepare()
            tensors = [(layer.block_table, layer.lengths) for layer in cache.layers]
            free = pool.free_pages

            def no_page(self, count):
                raise AssertionError("a page was taken inside the step")

            with monkeypatch.context() as m:
                m.setattr(PagePool, "take", no_page)
                token = decoder.step(token).argmax(-1)
            assert pool.free_pages == free
            assert all(a is c and b is d for (a, b), (c, d) in
                       zip(tensors, [(layer.block_table, layer.lengths) for layer in cache.layers]))
            cache.check_lengths()


@torch.no_grad()
def test_what_needs_data_dependent_decisions_is_refused(model, batch):
    cache_free = sk.SkipCache(model.config.num_hidden_layers)
    with pytest.raises(ValueError, match="patched by skiplayers.patch"):
        sk.StaticDecoder(model, cache_free, 1)
    for policy, message in ((sk.SkipPolicy(anchor_token_ids=[5]), "anchors decide per token"),
                            (sk.SkipPolicy(early_exit=sk.EarlyExit(layers=[1], threshold=0.5)), "early exit")):
        with sk.patched(model, policy, backend="cpu"):
            cache, _ = _prefill(model, batch)
            with pytest.raises(NotImplementedError, match=message):
                sk.StaticDecoder(model, cache, 1)
    with sk.patched(model, POLICIES["nothing skipped"], backend="cpu"):
        with pytest.raises(ValueError, match="SkipCache of a prefill"):
            sk.StaticDecoder(model, cache_free, 1)
        cache, token = _prefill(model, batch)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            sk.StaticDecoder(model, cache, 0)
        if not torch.cuda.is_available():
            with pytest.raises(NotImplementedError, match="CUDA graph"):
                sk.StaticDecoder(model, cache, 1).capture()


@pytest.mark.cuda
@torch.no_grad()
def test_capture_replays_the_eager_steps():
    """On a GPU: a decode step recorded in a CUDA graph and replayed equals the eager steps."""
    model = tiny_llama(device="cuda")
    batch = ragged_batch(device="cuda")
    layers = model.config.num_hidden_layers
    with sk.patched(model, POLICIES["context stop at 2"]):  # auto: the paged decode kernel of ours
        expected, _ = _eager_steps(model, batch, 6)
        cache, token = _prefill(model, batch, sk.SkipCache(layers, max_tokens=layers * 3 * 64))
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=6)
        decoder.capture(warmup=1)
        for want in expected:
            got = decoder(token)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            token = want.argmax(-1)
        cache.check_lengths()


@pytest.mark.cuda
@torch.no_grad()
def test_prepare_never_waits_on_the_device():
    """On a GPU: ``prepare`` takes pages (every page_size steps) and uploads the block tables with
    no synchronising call (torch's sync debug mode turns one into an error)."""
    model = tiny_llama(device="cuda")
    batch = ragged_batch(device="cuda")
    layers = model.config.num_hidden_layers
    with sk.patched(model, POLICIES["context stop at 2"]):
        cache, token = _prefill(model, batch, sk.SkipCache(layers, page_size=2, max_tokens=layers * 3 * 64))
        decoder = sk.StaticDecoder(model, cache, max_new_tokens=6)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(6):  # pages of 2 slots: a new page every other step
                decoder.prepare()
                token = decoder.step(token).argmax(-1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cache.check_lengths()
