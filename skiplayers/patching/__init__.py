"""One-call patching of loaded models: ``patch(model, policy, backend=None)`` and ``unpatch(model)``.

Patching works on the model *instance* (other instances of the class are untouched). It steers the
model's own modules rather than replacing them:

* the decoder's forward (``model.model.forward``) becomes the packed, compacting loop of
  ``decoder.py``, which calls every decoder layer through its own ``__call__``;
* the config names ``"skiplayers"`` as the attention implementation, a function registered with
  transformers' ``AttentionInterface`` (``attention.py``), so each attention module runs its own
  projections, norms and RoPE and then our ops;
* the attention modules of ``drop_attention_layers`` get a forward that adds nothing;
* the causal-LM forward gains ``context_mask``, ``layer_mask`` and the handling of uncomputed columns
  (``causal_lm.py``), and ``generate()`` creates a :class:`SkipCache`.

``unpatch`` removes exactly these instance attributes and restores the attention implementation, so
the model computes as before. ``patch`` returns the model; ``with sk.patched(model, policy): ...``
patches for the duration of a block and unpatches on exit, also on an exception.

Which models: ``families.py`` (the LLaMA family by ``model_type`` and layer structure). The host-side
work of a call (checks, cache counts, tags, packing): ``plan.py``; under ``torch.compile`` it runs
inside opaque ops (``traced.py``).
"""

from __future__ import annotations

import contextlib
import types

import torch

from .. import ops as sk_ops
from ..cache import SkipCache
from ..dispatch.dispatcher import Dispatcher
from ..handles import new_handle
from ..policy import SkipPolicy
from .attention import ATTENTION_NAME
from .causal_lm import causal_lm_forward
from .decoder import packed_model_forward
from .families import check_supported
from .state import PatchState

_INSTANCE_ATTRS = ("forward", "_prepare_cache_for_generation")


def is_patched(model) -> bool:
    return getattr(model, "_skiplayers", None) is not None


def execution_device(model) -> torch.device:
    """Where the model computes. For a model dispatched by accelerate (``device_map``; weights may
    be offloaded to the CPU or disk and sit on ``meta``) this is the execution device of its input
    embedding's hook; otherwise the device of its parameters."""
    hook = getattr(model.get_input_embeddings(), "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    devices = [p.device for p in model.parameters() if p.device.type != "meta"]
    return devices[0] if devices else next(model.parameters()).device


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


@contextlib.contextmanager
def patched(model, policy: SkipPolicy, backend: str | None = None):
    """``with sk.patched(model, policy) as model: ...``: the model is patched inside the block and
    unpatched on exit, also on an exception. If it was patched before the block, its previous
    policy and backend are restored instead."""
    before = model._skiplayers if is_patched(model) else None
    patch(model, policy, backend)
    try:
        yield model
    finally:
        if before is not None:
            patch(model, before.policy, before.backend)
        elif is_patched(model):
            unpatch(model)


def patch(model, policy: SkipPolicy, backend: str | None = None):
    """Makes ``model`` (a loaded causal LM of the LLaMA family: ``families.SUPPORTED``) skip the
    work ``policy`` names.

    ``backend``: "auto" (the default): each attention call goes to the fastest kernel that can
    compute its pattern (``skiplayers/dispatch``: standard patterns may run on torch's kernels,
    the ones only skiplayers' visibility predicate computes on ours; ``sk.dispatch_report(model)``
    says which and why); the other work on our ops of the device (cpu, else cuda or triton).
    "torch" (pure PyTorch, reference.py), "cpu" (C++ kernels), "triton" or "cuda" force our
    kernels of that backend for every call. Patching an already patched model replaces its policy
    and backend. Returns the model (see also :func:`patched`).
    """
    check_supported(model)
    if not isinstance(policy, SkipPolicy):
        raise TypeError(f"policy must be a SkipPolicy, got {type(policy).__name__}")
    policy.validate_for(model.config.num_hidden_layers)
    device = execution_device(model)
    backend = backend or "auto"
    if backend != "auto" and backend not in sk_ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of {sk_ops.BACKENDS}")
    ours = sk_ops.default_backend(device) if backend == "auto" else backend
    sk_ops.check_backend_device(ours, device)

    if is_patched(model):
        unpatch(model)
    ops = sk_ops.get_ops(ours)
    decoder = model.model
    dropped = tuple(decoder.layers[idx].self_attn for idx in policy.drop_attention_layers)
    state = PatchState(policy=policy, backend=backend, ops=ops, dispatcher=Dispatcher(ops, backend),
                       attention_before=model.config._attn_implementation, lm_head=model.lm_head,
                       dropped_attention=dropped)
    for attention in dropped:
        attention.forward = types.MethodType(dropped_attention_forward, attention)
    decoder._skiplayers = state
    decoder._skiplayers_handle = new_handle(decoder)  # names the decoder inside compiled graphs (traced.py)
    decoder.forward = types.MethodType(packed_model_forward, decoder)
    model._skiplayers = state
    model.forward = causal_lm_forward(model, model.forward)
    model._prepare_cache_for_generation = _cache_factory(model, model._prepare_cache_for_generation)
    model.config._attn_implementation = ATTENTION_NAME
    # Under torch.compile the packed rows have data-dependent sizes (traced.py): let dynamo capture
    # such ops as unbacked sizes instead of breaking the graph. Only ops whose output size depends
    # on data are affected, and only when something is compiled.
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return model


def unpatch(model):
    """Undoes :func:`patch`: the model computes exactly as before patching. Returns the model."""
    if not is_patched(model):
        raise ValueError("this model is not patched by skiplayers")
    state: PatchState = model._skiplayers
    for obj in (model, model.model):
        for name in _INSTANCE_ATTRS:
            obj.__dict__.pop(name, None)
        for name in ("_skiplayers", "_skiplayers_handle", "_skiplayers_running"):
            obj.__dict__.pop(name, None)
    for attention in state.dropped_attention:
        attention.__dict__.pop("forward", None)
    model.config._attn_implementation = state.attention_before
    return model


def dropped_attention_forward(self, hidden_states, *args, **kwargs):
    """The forward of an attention module in ``drop_attention_layers`` (Tyukin et al. 2024): the
    sublayer adds nothing to the residual stream, so it returns zeros ``[1, n, hidden]`` without
    computing projections or attention, and stores nothing. The decoder layer around it still runs
    through its own ``__call__`` (its input norm, the residual, the MLP; its hooks)."""
    return torch.zeros_like(hidden_states), None
