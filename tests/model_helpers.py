"""Model-level checks shared by every backend's tests: the patched model against the slow masked
model (``skiplayers.masked``), on tiny random LLaMAs and on SmolLM2.

Tolerance policy at the model level: float32 logits must match within ``FP32_LOGIT_ATOL`` on tiny
models; for reduced precision, the patched model may be at most twice as far from the float32
masked model as the masked model computed in the same reduced precision is, plus an absolute floor.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import skiplayers as sk

FP32_LOGIT_ATOL = 1e-4

# SKIPLAYERS_TEST_COMPILE=1 (inductor) or =<a torch.compile backend> (eager, aot_eager): the helpers
# below run the patched model's forward compiled (fullgraph=True); their assertions are unchanged.
_SWITCH = os.environ.get("SKIPLAYERS_TEST_COMPILE", "")
COMPILE_BACKEND = None if _SWITCH in ("", "0") else "inductor" if _SWITCH == "1" else _SWITCH


@contextlib.contextmanager
def maybe_compiled(model, policy: sk.SkipPolicy, layer_mask=None):
    """Under ``SKIPLAYERS_TEST_COMPILE``, the patched ``model.forward`` (which ``model(...)`` and
    ``generate()`` call) is ``torch.compile(..., fullgraph=True)`` inside the block, and the block
    must have compiled a graph; what compile refuses by design is skipped. Otherwise: nothing."""
    if COMPILE_BACKEND is None:
        yield
        return
    if layer_mask is not None or policy.early_exit is not None:
        pytest.skip("SKIPLAYERS_TEST_COMPILE: layer_mask and early exit are refused under torch.compile by design "
                    "(patching/decoder.py); they run eagerly only")
    from torch._dynamo.testing import CompileCounterWithBackend  # only under the switch

    torch._dynamo.reset()  # the test's own compiles, never the recompile limit's silent eager fallback
    counter = CompileCounterWithBackend(COMPILE_BACKEND)
    patched = model.forward
    model.forward = torch.compile(patched, backend=counter, fullgraph=True)
    try:
        yield
    finally:
        model.forward = patched
    assert counter.frame_count > 0, "SKIPLAYERS_TEST_COMPILE: nothing was compiled"


def tiny_llama(
    seed: int = 0,
    dtype=torch.float32,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    hidden_size: int = 128,
    device="cpu",
    **config,
) -> LlamaForCausalLM:
    """A random LlamaForCausalLM small enough for interpreters, with GQA by default."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=101,
        hidden_size=hidden_size,
        intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **config,
    )
    return LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()


def tiny_family(model_type: str, seed: int = 0, layers: int = 4, **config):
    """A random causal LM of a LLaMA-family ``model_type`` (``skiplayers.patching.families``), with
    the same tiny shape as :func:`tiny_llama` (GQA 4/2, head dim 64) and the family's own
    features: Qwen2's q/k/v biases, Qwen3's q/k norms, SmolLM3's layers without RoPE."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    base = dict(
        vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if model_type == "smollm3":
        base["no_rope_layers"] = [1 if i % 2 == 0 else 0 for i in range(layers)]  # odd layers skip RoPE
    if model_type == "mistral":
        base["sliding_window"] = None
    cfg = AutoConfig.for_model(model_type, **{**base, **config})
    return AutoModelForCausalLM.from_config(cfg).eval()


def ragged_batch(vocab: int = 101, device="cpu", seed: int = 0):
    """Three left-padded sequences with different context lengths (first token never context).

    Returns ``input_ids, attention_mask, context_mask, position_ids`` (positions as generate()
    makes them: cumsum of the mask - 1)."""
    gen = torch.Generator().manual_seed(seed)
    batch, width = 3, 21
    ids = torch.randint(3, vocab, (batch, width), generator=gen)
    attn = torch.ones(batch, width, dtype=torch.long)
    attn[1, :4] = 0
    attn[2, :9] = 0
    ctx = torch.zeros(batch, width, dtype=torch.bool)
    ctx[0, 1:12] = True  # 11 context tokens
    ctx[1, 5:9] = True  # 4
    ctx[2, 10:17] = True  # 7
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), ctx.to(device), pos.to(device)


def computed_columns(attn: torch.Tensor, ctx: torch.Tensor, policy: sk.SkipPolicy, layers: int) -> torch.Tensor:
    """Columns whose logits exist: real tokens, minus the context when it stops before the end."""
    stop = policy.context_stop_layer
    dropped = ctx if stop is not None and stop < layers else torch.zeros_like(ctx)
    return attn.bool() & ~dropped


@torch.no_grad()
def patched_logits(model, policy, backend, ids, attn, ctx, pos, use_cache: bool, layer_mask=None) -> torch.Tensor:
    sk.patch(model, policy, backend=backend)
    # Compiled, a cache must be passed (decoder.py refuses to create one while tracing).
    cache = sk.SkipCache(model.config.num_hidden_layers) if use_cache and COMPILE_BACKEND else None
    try:
        with maybe_compiled(model, policy, layer_mask):
            return model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=use_cache,
                         past_key_values=cache, layer_mask=layer_mask).logits
    finally:
        sk.unpatch(model)


def assert_forward_matches_masked(model, policy, backend, batch, use_cache=False, atol=FP32_LOGIT_ATOL,
                                  layer_mask=None):
    ids, attn, ctx, pos = batch
    out = patched_logits(model, policy, backend, ids, attn, ctx, pos, use_cache, layer_mask)
    truth = sk.masked_forward(model, ids, attn, ctx, policy, pos, layer_mask=layer_mask)
    keep = computed_columns(attn, ctx, policy, model.config.num_hidden_layers)
    assert torch.isnan(out[~keep]).all(), "columns that are not computed must be NaN"
    err = (out.float() - truth.float())[keep].abs().max().item()
    assert err <= atol, f"patched vs masked logits differ by {err:.3g} (> {atol})"
    return err


def assert_reduced_precision_matches(model_lp, model_fp32, policy, backend, batch, floor: float):
    """Reduced-precision patched model vs the float32 masked model, relative to how far the masked
    model itself strays in the same precision."""
    ids, attn, ctx, pos = batch
    out = patched_logits(model_lp, policy, backend, ids, attn, ctx, pos, use_cache=False).float()
    truth = sk.masked_forward(model_fp32, ids, attn, ctx, policy, pos).float()
    naive = sk.masked_forward(model_lp, ids, attn, ctx, policy, pos).float()
    keep = computed_columns(attn, ctx, policy, model_fp32.config.num_hidden_layers)
    err = (out - truth)[keep].abs().max().item()
    baseline = (naive - truth)[keep].abs().max().item()
    assert err <= 2 * baseline + floor, f"error {err:.3g} > 2 x {baseline:.3g} + {floor}"


@contextlib.contextmanager
def checking_cache_lengths(model):
    """Within the block, every forward of ``model`` that returns a SkipCache is followed by
    ``SkipCache.check_lengths()`` (host and device lengths agree in every layer), so that a step
    that lets them drift fails where it happens."""

    @torch.compiler.disable  # a device sync on purpose: run eagerly, outside any traced graph
    def check(module, args, kwargs, output):
        cache = getattr(output, "past_key_values", None)
        if isinstance(cache, sk.SkipCache):
            cache.check_lengths()

    handle = model.register_forward_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def assert_generate_matches_masked(model, policy, backend, batch, new_tokens: int, layer_mask=None,
                                   atol=FP32_LOGIT_ATOL):
    """Greedy generation, patched vs :func:`skiplayers.masked_generate`: the same tokens, and each
    step's logits within ``atol`` of the masked model's (with early exit: the same exit layers).
    Returns the patched run's cache, and sets ``.work`` on it to its ``sk.work_report``."""
    ids, attn, ctx, _ = batch
    sk.patch(model, policy, backend=backend)
    try:
        with maybe_compiled(model, policy, layer_mask), checking_cache_lengths(model):
            out = model.generate(
                ids, attention_mask=attn, context_mask=ctx, max_new_tokens=new_tokens, do_sample=False,
                return_dict_in_generate=True, output_logits=True, layer_mask=layer_mask,
            )
        work = sk.work_report(model)
    finally:
        sk.unpatch(model)
    truth, exit_layers = sk.masked_generate(model, ids, attn, ctx, policy, new_tokens, layer_mask=layer_mask,
                                            return_exit_layers=True)
    assert torch.equal(out.sequences, truth), f"greedy tokens differ:\n{out.sequences}\n{truth}"
    if policy.early_exit is not None:
        assert work.exits == int((exit_layers >= 0).sum()), "exits differ from the masked model's"
    full = truth.new_ones(truth.shape)
    mask = torch.cat([attn, full[:, attn.shape[1]:]], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = sk.masked_forward(model, truth, mask, ctx, policy, pos, layer_mask=layer_mask,
                              exit_from=ids.shape[1])[:, ids.shape[1] - 1 : -1]
    got = torch.stack(out.logits, 1).float()
    err = (got - steps.float()).abs().max().item()
    assert err <= atol, f"generated logits differ from the masked model's by {err:.3g} (> {atol})"
    out.past_key_values.work = work
    return out.past_key_values


def decode_step_inputs(batch):
    """One decode step after the :func:`ragged_batch` prompt: ``(input_ids [3, 1], attention_mask,
    position_ids)``, the new tokens 5, 6, 7."""
    ids, attn, _, pos = batch
    step = torch.tensor([[5], [6], [7]], device=ids.device)
    return step, torch.cat([attn, torch.ones_like(step)], 1), pos[:, -1:] + 1


def prefill_and_decode_logits(run, batch, layers: int):
    """Logits of a prefill of ``batch`` and of one decode step after it (:func:`decode_step_inputs`),
    through ``run`` (a patched model, or the same compiled), on a fresh ``SkipCache``; and its
    ``layer_lengths()``."""
    ids, attn, ctx, pos = batch
    step, step_mask, step_pos = decode_step_inputs(batch)
    cache = sk.SkipCache(layers)
    first = run(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, past_key_values=cache).logits
    cache.check_lengths()
    second = run(step, attention_mask=step_mask, position_ids=step_pos, context_mask=ctx,
                 past_key_values=cache).logits
    cache.check_lengths()
    return first, second, cache.layer_lengths()


def char_tokenizer():
    """Character-level tokenizer: <pad>=0, <s>=1, </s>=2, newline=3, printable ASCII (99 ids)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "</s>", "\n"] + [chr(c) for c in range(32, 127)]
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    raw.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left")
