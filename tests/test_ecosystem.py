"""What users already do with transformers models, on a patched model: hidden states, forward
hooks and gradient checkpointing on decoder layers, accelerate device maps (disk offload), assisted
and prompt-lookup decoding (``SkipCache.crop``), the ``with sk.patched(...)`` form."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import skiplayers as sk
from model_helpers import (
    FP32_LOGIT_ATOL,
    checking_cache_lengths,
    computed_columns,
    decode_step_inputs,
    prefill_and_decode_logits,
    tiny_llama,
)

STOP = 2
POLICIES = {
    "stop": sk.SkipPolicy(context_stop_layer=STOP),
    "stop-anchors": sk.SkipPolicy(context_stop_layer=STOP, anchor_token_ids=(7, 11)),
}


def _repetitive_prompt(batch):
    """One sequence that repeats itself (so prompt lookup proposes candidates) with context marks."""
    ids = batch[0][:1]
    ids = torch.cat([ids, ids[:, 5:15], ids[:, 5:15]], dim=1)
    ctx = torch.zeros_like(ids, dtype=torch.bool)
    ctx[0, 1:12] = True
    return ids, ctx


# --- hidden states and the loss ---


@torch.no_grad()
def test_hidden_states_equal_the_unpatched_model_when_nothing_is_skipped(model, batch):
    ids, attn, _, pos = batch
    plain = model(ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states
    with sk.patched(model, sk.SkipPolicy(), backend="cpu"):
        ours = model(ids, attention_mask=attn, position_ids=pos, output_hidden_states=True).hidden_states
    assert len(ours) == len(plain) == model.config.num_hidden_layers + 1
    valid = attn.bool()
    for idx, (a, b) in enumerate(zip(plain, ours)):
        assert (a[valid] - b[valid]).abs().max().item() <= 1e-5, idx
        if idx > 0:  # the embeddings exist for every column; layer outputs only where computed
            assert torch.isnan(b[~valid]).all(), idx


@torch.no_grad()
def test_hidden_states_are_nan_where_a_layer_did_not_compute(model, batch):
    ids, attn, ctx, pos = batch
    with sk.patched(model, POLICIES["stop"], backend="cpu"):
        hidden = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx,
                       output_hidden_states=True).hidden_states
    valid, context = attn.bool(), ctx & attn.bool()
    for idx, h in enumerate(hidden):
        computed = valid if idx <= STOP else valid & ~context  # hidden[i] is layer i-1's output
        if idx > 0:
            assert torch.isnan(h[~computed]).all(), idx
        assert torch.isfinite(h[computed]).all(), idx


def test_output_attentions_and_hidden_state_indices_are_refused(model, batch):
    ids, attn, _, pos = batch
    with sk.patched(model, sk.SkipPolicy(), backend="cpu"):
        with pytest.raises(NotImplementedError, match="output_attentions"):
            model(ids, attention_mask=attn, output_attentions=True)
        with pytest.raises(NotImplementedError, match="output_hidden_states=\\[1\\]"):
            model(ids, attention_mask=attn, output_hidden_states=[1])


def test_labels_on_uncomputed_columns_are_ignored_not_nan(model, batch):
    """Labels everywhere: the predictions from padding and dropped context are left out, exactly as
    if their labels were -100."""
    ids, attn, ctx, pos = batch
    keep = computed_columns(attn, ctx, POLICIES["stop"], model.config.num_hidden_layers)
    manual = ids.clone()
    manual[:, 1:] = manual[:, 1:].masked_fill(~keep[:, :-1], -100)
    with torch.no_grad(), sk.patched(model, POLICIES["stop"], backend="cpu"):
        everywhere = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, labels=ids, use_cache=False)
        masked = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, labels=manual, use_cache=False)
    assert torch.isfinite(everywhere.loss)
    torch.testing.assert_close(everywhere.loss, masked.loss)


# --- the model's own modules run: hooks, gradient checkpointing, accelerate ---


@torch.no_grad()
def test_forward_hooks_on_decoder_layers_run_on_packed_rows(model, batch):
    ids, attn, ctx, pos = batch
    seen = []
    handles = [layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, tuple(out.shape))))
               for i, layer in enumerate(model.model.layers)]
    try:
        with sk.patched(model, POLICIES["stop"], backend="cpu"):
            model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx)
    finally:
        for handle in handles:
            handle.remove()
    real, context = int(attn.sum()), int((ctx & attn.bool()).sum())
    hidden = model.config.hidden_size
    assert seen == [(i, (1, real if i < STOP else real - context, hidden)) for i in range(4)]


def test_gradient_checkpointing_runs_and_gives_the_same_gradients(batch):
    ids, attn, ctx, pos = batch
    keep = computed_columns(attn, ctx, POLICIES["stop"], 4)
    labels = ids.clone()
    labels[:, 1:] = labels[:, 1:].masked_fill(~keep[:, :-1], -100)

    def gradients(checkpointing: bool):
        model = tiny_llama(layers=4)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runs = []
        model.model.layers[1].self_attn.register_forward_hook(lambda *a: runs.append(1))
        with sk.patched(model, POLICIES["stop"], backend="cpu"):
            loss = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, labels=labels,
                         use_cache=False).loss
            loss.backward()
        return {n: p.grad for n, p in model.named_parameters()}, len(runs)

    plain, plain_runs = gradients(False)
    checkpointed, checkpointed_runs = gradients(True)
    assert plain_runs == 1 and checkpointed_runs == 2  # the layer was recomputed in the backward pass
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_disk_offloaded_layers_generate_the_fully_loaded_tokens(tmp_path, batch):
    ids, attn, ctx, _ = batch
    model = tiny_llama()
    model.save_pretrained(tmp_path / "model")
    with sk.patched(model, POLICIES["stop"], backend="cpu"):
        want = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
    device_map = {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
        "model.layers.1": "disk", "model.layers.2": "disk", "model.layers.3": "cpu",
        "model.norm": "cpu", "lm_head": "cpu",
    }
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    with sk.patched(offloaded, POLICIES["stop"]):  # the default backend comes from the execution device
        assert offloaded._skiplayers.backend == "auto" and offloaded._skiplayers.ops.name == "cpu"
        got = offloaded.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


@torch.no_grad()
def test_a_layer_by_layer_device_map_generates_the_fully_loaded_tokens(batch):
    """A map that places every module separately, dispatched with a hook on each (as a multi-device
    map is; here every device is the CPU, the only one CI has): accelerate's hooks run around each
    layer and move its inputs."""
    from accelerate import dispatch_model

    ids, attn, ctx, _ = batch
    model = tiny_llama()
    with sk.patched(model, POLICIES["stop-anchors"], backend="cpu"):
        want = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" for i in range(4)}
    mapped = dispatch_model(tiny_llama(), device_map=device_map, force_hooks=True)
    assert hasattr(mapped.model.layers[2], "_hf_hook")
    with sk.patched(mapped, POLICIES["stop-anchors"], backend="cpu"):
        got = mapped.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


# --- assisted and prompt-lookup decoding: SkipCache.crop ---


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@torch.no_grad()
def test_prompt_lookup_and_assisted_decoding_equal_plain_greedy(model, batch, policy):
    ids, ctx = _repetitive_prompt(batch)
    assistant = tiny_llama(seed=3, layers=2)  # another model: many candidates are rejected and cropped
    # Each forward checks its cache's mirrors, so the crops between forwards are checked too.
    with sk.patched(model, policy, backend="cpu"), checking_cache_lengths(model), checking_cache_lengths(assistant):
        plain = model.generate(ids, context_mask=ctx, max_new_tokens=16, do_sample=False)
        lookup = model.generate(ids, context_mask=ctx, max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=3)
        with sk.patched(assistant, sk.SkipPolicy(context_stop_layer=1), backend="cpu"):
            assisted = model.generate(ids, context_mask=ctx, max_new_tokens=16, do_sample=False,
                                      assistant_model=assistant)
    assert torch.equal(lookup, plain) and torch.equal(assisted, plain)


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@torch.no_grad()
def test_crop_leaves_the_cache_as_if_the_columns_were_never_fed(model, batch, policy):
    ids, attn, ctx, _ = batch
    extra = torch.tensor([[7, 30, 11], [40, 7, 41], [50, 51, 52]])  # anchors among them
    with sk.patched(model, policy, backend="cpu"):
        once = sk.SkipCache(4)
        model(ids, attention_mask=attn, context_mask=ctx, past_key_values=once)
        twice = sk.SkipCache(4)
        model(ids, attention_mask=attn, context_mask=ctx, past_key_values=twice)
        model(extra, attention_mask=torch.cat([attn, torch.ones_like(extra)], 1), past_key_values=twice)
        twice.crop(-3)
        twice.check_lengths()
        assert twice.get_seq_length() == once.get_seq_length()
        assert torch.equal(twice.layer_lengths(), once.layer_lengths())
        step = torch.tensor([[60], [61], [62]])
        mask = torch.cat([attn, torch.ones_like(step)], 1)
        a = model(step, attention_mask=mask, context_mask=ctx, past_key_values=once).logits
        b = model(step, attention_mask=mask, context_mask=ctx, past_key_values=twice).logits
    assert (a - b).abs().max().item() <= FP32_LOGIT_ATOL
    assert torch.equal(twice.layer_lengths(), once.layer_lengths())


@torch.no_grad()
def test_crop_past_a_finished_reduction_is_refused(model, batch):
    ids, attn, ctx, _ = batch
    with sk.patched(model, POLICIES["stop-anchors"], backend="cpu"):
        cache = sk.SkipCache(4)
        model(ids, attention_mask=attn, context_mask=ctx, past_key_values=cache)
        cache.layer_lengths()  # reading the cache carries out the requested reduction
        with pytest.raises(NotImplementedError, match="already dropped"):
            cache.crop(-1)
        with pytest.raises(ValueError, match="cannot crop 99 columns"):
            sk.SkipCache(4).crop(-99)


# --- the with form ---


def test_patched_restores_the_model_on_exit_and_on_an_exception(model, batch):
    ids, attn, _, _ = batch
    attention = model.config._attn_implementation
    with sk.patched(model, POLICIES["stop"], backend="cpu") as inside:
        assert inside is model and sk.is_patched(model)
        assert model.config._attn_implementation == "skiplayers"
    assert not sk.is_patched(model) and model.config._attn_implementation == attention
    with pytest.raises(RuntimeError, match="boom"):
        with sk.patched(model, POLICIES["stop"], backend="cpu"):
            raise RuntimeError("boom")
    assert not sk.is_patched(model) and model.config._attn_implementation == attention
    sk.patch(model, POLICIES["stop-anchors"], backend="torch")
    with sk.patched(model, POLICIES["stop"], backend="cpu"):
        assert model._skiplayers.policy == POLICIES["stop"]
    assert model._skiplayers.policy == POLICIES["stop-anchors"] and model._skiplayers.backend == "torch"
    assert sk.patch(model, POLICIES["stop"], backend="cpu") is model  # patch keeps returning the model
    sk.unpatch(model)


def test_a_layer_called_outside_a_patched_forward_says_so(model, batch):
    with sk.patched(model, sk.SkipPolicy(), backend="cpu"):
        hidden = torch.zeros(1, 3, model.config.hidden_size)
        cos_sin = model.model.rotary_emb(hidden, position_ids=torch.arange(3)[None])
        with pytest.raises(RuntimeError, match="outside a skiplayers forward"):
            model.model.layers[0](hidden, position_embeddings=cos_sin)


# --- generate() options and torch.compile (patching/traced.py) ---


@torch.no_grad()
def test_beam_search_equals_the_unpatched_model_and_runs_with_context_stop(model, batch):
    ids, attn, ctx, _ = batch
    want = model.generate(ids, attention_mask=attn, max_new_tokens=5, num_beams=3, do_sample=False)
    with sk.patched(model, sk.SkipPolicy(context_stop_layer=4), backend="cpu"):
        assert torch.equal(model.generate(ids, attention_mask=attn, max_new_tokens=5, num_beams=3, do_sample=False),
                           want)
    with sk.patched(model, POLICIES["stop"], backend="cpu"):
        out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=5, num_beams=3,
                             do_sample=False, return_dict_in_generate=True)
    out.past_key_values.check_lengths()
    lengths = out.past_key_values.layer_lengths()  # [L, B * beams]: no context stored from layer ℓ on
    real = attn.sum(1).repeat_interleave(3)
    context = (ctx & attn.bool()).sum(1).repeat_interleave(3)
    assert torch.equal(lengths[STOP:].max(0).values, lengths[STOP:].min(0).values)
    assert bool((lengths[STOP] <= real - context + 5).all()) and bool((lengths[0] > lengths[STOP]).all())


def test_a_static_cache_is_refused(model, batch):
    ids, attn, _, _ = batch
    with sk.patched(model, sk.SkipPolicy(), backend="cpu"):
        with pytest.raises(NotImplementedError, match="cache_implementation='static'"):
            model.generate(ids, attention_mask=attn, max_new_tokens=2, cache_implementation="static")


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@torch.no_grad()
def test_torch_compile_traces_prefill_and_decode_without_graph_breaks(batch, policy):
    ids, attn, ctx, pos = batch
    model = tiny_llama(layers=3)
    step, step_mask, step_pos = decode_step_inputs(batch)
    with sk.patched(model, policy, backend="cpu"):
        cache = sk.SkipCache(3)
        prefill = torch._dynamo.explain(model)(ids, attention_mask=attn, position_ids=pos, context_mask=ctx,
                                               past_key_values=cache)
        decode = torch._dynamo.explain(model)(step, attention_mask=step_mask, position_ids=step_pos, context_mask=ctx,
                                              past_key_values=cache)
    assert prefill.graph_break_count == 0, [r.reason for r in prefill.break_reasons]
    assert decode.graph_break_count == 0, [r.reason for r in decode.break_reasons]
    assert prefill.graph_count == decode.graph_count == 1


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@torch.no_grad()
def test_torch_compile_fullgraph_equals_eager(batch, policy):
    """Prefill, a decode step, and greedy generate() with the patched forward compiled
    (``fullgraph=True``, inductor) give the eager results."""
    ids, attn, ctx, _ = batch
    model = tiny_llama(layers=3)
    with sk.patched(model, policy, backend="cpu"):
        compiled = torch.compile(model, fullgraph=True)
        logits = {name: prefill_and_decode_logits(run, batch, 3) for name, run in (("eager", model),
                                                                                    ("compiled", compiled))}
        for eager, compiled_out in zip(logits["eager"][:2], logits["compiled"][:2]):
            torch.testing.assert_close(compiled_out, eager, equal_nan=True, atol=1e-5, rtol=1e-5)
        assert torch.equal(logits["eager"][2], logits["compiled"][2])
        want = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
        model.forward = torch.compile(model.forward, fullgraph=True)  # how generate() runs a compiled forward
        got = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert not sk.is_patched(model)


@torch.no_grad()
def test_torch_compile_with_traced_compaction_keeps_the_compacted_lengths(batch):
    """With the torch backend, compaction is traced (not an opaque op) and inductor may write the
    compacted cu_seqlens into the plan's dead buffer: the host counts must follow the contents, not
    the address (traced.py; a stale count once stored the context rows at layers >= ℓ)."""
    model = tiny_llama(layers=3)
    with sk.patched(model, POLICIES["stop"], backend="torch"):
        eager = prefill_and_decode_logits(model, batch, 3)
        compiled = prefill_and_decode_logits(torch.compile(model, fullgraph=True), batch, 3)
    assert torch.equal(compiled[2], eager[2])
    for e, c in zip(eager[:2], compiled[:2]):
        torch.testing.assert_close(c, e, equal_nan=True, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_torch_compile_refusals_are_clear(batch):
    ids, attn, ctx, pos = batch
    model = tiny_llama(layers=2)
    with sk.patched(model, POLICIES["stop"], backend="cpu"):
        with pytest.raises(Exception, match="pass the cache"):
            torch.compile(model, fullgraph=True)(ids, attention_mask=attn, context_mask=ctx, use_cache=True)
        with torch.enable_grad(), pytest.raises(Exception, match="training .* under torch.compile"):
            torch.compile(model, fullgraph=True)(ids, attention_mask=attn, context_mask=ctx, use_cache=False)
