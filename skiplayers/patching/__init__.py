"""One-call patching of loaded models: ``patch(model, policy, backend=None)`` and ``unpatch(model)``.

Patching works on the model *instance* (other instances of the class are untouched): it binds a
packed forward to the decoder (``model.model.forward``), a forward with a ``context_mask`` argument
to the causal-LM wrapper, and a cache factory so ``generate()`` creates a :class:`SkipCache`.
``unpatch`` removes exactly these instance attributes, so the model computes as before.

Model families are looked up by ``config.model_type`` in ``PATCHERS``.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch

from .. import ops as sk_ops
from ..cache import SkipCache
from ..policy import SkipPolicy
from . import llama
from .inputs import resolve_inputs, uncomputed_columns
from .state import PatchState

# config.model_type -> module with supports(model) and packed_model_forward
PATCHERS = {"llama": llama}

_INSTANCE_ATTRS = ("forward", "_prepare_cache_for_generation")


def _patcher_for(model):
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    patcher = PATCHERS.get(model_type)
    if patcher is None or not patcher.supports(model):
        supported = ", ".join(f"{k} (LlamaForCausalLM)" for k in PATCHERS)
        raise TypeError(
            f"skiplayers cannot patch {type(model).__name__} (model_type={model_type!r}); supported: {supported}"
        )
    return patcher


def is_patched(model) -> bool:
    return getattr(model, "_skiplayers", None) is not None


def _check_last_columns_computed(state: PatchState, context_mask, past: int, columns: int, logits_to_keep, layers: int):
    """generate() reads the logits of the last column: it must not be a dropped context column."""
    stop = state.policy.context_stop_layer
    if context_mask is None or stop is None or stop >= layers or not isinstance(logits_to_keep, int):
        return
    if logits_to_keep <= 0:
        return
    first = past + columns - logits_to_keep
    kept = context_mask[:, first : past + columns]
    if kept.numel() and bool(kept.any()):
        raise ValueError(
            "logits were requested for context columns, which stop at the context-stop layer and have no "
            "logits; the prompt of every sequence must end with a non-context token (e.g. the query)"
        )


def _logit_columns(uncomputed: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The rows of ``uncomputed`` ``[B, T]`` that the returned logits cover (transformers' rule)."""
    if isinstance(logits_to_keep, int):
        return uncomputed[:, -logits_to_keep:] if logits_to_keep > 0 else uncomputed
    return uncomputed[:, logits_to_keep.cpu()]


def _check_labels_computed(uncomputed: torch.Tensor, labels: torch.Tensor) -> None:
    """The loss reads the logits of column c for the label of column c + 1: it must be computed."""
    asked = labels[:, 1:].cpu() != -100
    if bool((asked & uncomputed[:, :-1]).any()):
        raise ValueError(
            "labels ask for predictions from columns the patched model does not compute (padding, or context "
            "columns when context stops before the last layer); set the labels that follow them to -100"
        )


def _mark_uncomputed_logits(model, out, batch: int, columns: int, past: int, kwargs, context_mask):
    """Under autograd the decoder leaves 0 in columns it did not compute (NaN would poison parameter
    gradients); their logits become NaN here, after the lm_head, where masking is gradient-safe.
    Inference without labels (every decode step) has nothing to mark or check and returns at once."""
    labels = kwargs.get("labels")
    marks_logits = out.logits is not None and out.logits.requires_grad
    if labels is None and not marks_logits:
        return out
    call = resolve_inputs(batch, columns, past, kwargs.get("attention_mask"), None, context_mask, torch.device("cpu"))
    uncomputed = uncomputed_columns(call, model._skiplayers.policy.context_stop_layer, model.config.num_hidden_layers)
    if labels is not None:
        _check_labels_computed(uncomputed, labels)
    if marks_logits:
        mask = _logit_columns(uncomputed, kwargs.get("logits_to_keep", 0)).to(out.logits.device)
        out.logits = out.logits.masked_fill(mask[..., None], float("nan"))
    return out


def _causal_lm_forward(model, original_forward):
    @functools.wraps(original_forward)
    def forward(*args, context_mask: torch.Tensor | None = None, **kwargs):
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        ids = kwargs.get("input_ids", args[0] if args else None)
        batch, columns = (ids if ids is not None else kwargs["inputs_embeds"]).shape[:2]
        _check_last_columns_computed(
            model._skiplayers, context_mask, past, columns, kwargs.get("logits_to_keep", 0), model.config.num_hidden_layers
        )
        out = original_forward(*args, context_mask=context_mask, **kwargs)
        return _mark_uncomputed_logits(model, out, batch, columns, past, kwargs, context_mask)

    # generate() validates model kwargs against the signature: expose context_mask in it.
    params = list(inspect.signature(original_forward).parameters.values())
    extra = inspect.Parameter("context_mask", inspect.Parameter.KEYWORD_ONLY, default=None)
    params.insert(len(params) - 1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else len(params), extra)
    forward.__signature__ = inspect.Signature(params)
    return forward


def _cache_factory(model, original):
    def _prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        if model_kwargs.get("past_key_values") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise NotImplementedError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by a "
                    "skiplayers-patched model (it uses its own SkipCache)"
                )
            model_kwargs["past_key_values"] = SkipCache(model.config.num_hidden_layers)
        return original(generation_config, model_kwargs, *args, **kwargs)

    return _prepare_cache_for_generation


def patch(model, policy: SkipPolicy, backend: str | None = None):
    """Makes ``model`` (a loaded ``LlamaForCausalLM``) skip the work ``policy`` names.

    ``backend``: "torch" (pure PyTorch, reference.py), "cpu" (C++ kernels), "triton" or "cuda";
    default: the fastest available for the model's device. Patching an already patched model
    replaces its policy and backend. Returns the model.
    """
    patcher = _patcher_for(model)
    if not isinstance(policy, SkipPolicy):
        raise TypeError(f"policy must be a SkipPolicy, got {type(policy).__name__}")
    policy.validate_for(model.config.num_hidden_layers)
    device = next(model.parameters()).device
    backend = backend or sk_ops.default_backend(device)
    if backend not in sk_ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {sk_ops.BACKENDS}")
    sk_ops.check_backend_device(backend, device)
    state = PatchState(policy=policy, backend=backend, ops=sk_ops.get_ops(backend))

    if is_patched(model):
        unpatch(model)
    decoder = model.model
    decoder._skiplayers = state
    decoder.forward = types.MethodType(patcher.packed_model_forward, decoder)
    model._skiplayers = state
    model.forward = _causal_lm_forward(model, model.forward)
    model._prepare_cache_for_generation = _cache_factory(model, model._prepare_cache_for_generation)
    return model


def unpatch(model):
    """Undoes :func:`patch`: the model computes exactly as before patching. Returns the model."""
    if not is_patched(model):
        raise ValueError("this model is not patched by skiplayers")
    for obj in (model, model.model):
        for name in _INSTANCE_ATTRS:
            obj.__dict__.pop(name, None)
        obj.__dict__.pop("_skiplayers", None)
    return model
