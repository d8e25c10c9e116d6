"""Which models the patch can steer: the LLaMA family, recognised by structure.

The patched forward (``decoder.py``) replaces only the model-level loop (embed, rotary embedding,
layers, final norm) and calls every decoder layer through its own ``__call__``; everything inside a
layer (projections, biases, q/k norms, RoPE or its absence, MLP) is the model's own code. So a model
can be patched when

* its model-level forward is exactly that loop (checked by ``config.model_type``: the families in
  ``SUPPORTED`` were read and are tested on tiny random configs against the masked model; e.g.
  Gemma scales its embeddings and Granite multiplies them, which this loop would not do), and
* its layers have the LLaMA shape: input norm, attention with q/k/v/o projections that dispatches
  through transformers' ``AttentionInterface``, post-attention norm, gated MLP (checked on the
  modules, so a family member with another layer layout is refused rather than computed wrong).
"""

from __future__ import annotations

# config.model_type -> the causal-LM class name (for messages and the README table)
SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}

_DECODER_PARTS = ("embed_tokens", "layers", "norm", "rotary_emb")
_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj")


def supported_list() -> str:
    return ", ".join(f"{kind} ({name})" for kind, name in SUPPORTED.items())


def _missing(obj, names) -> list[str]:
    return [name for name in names if not hasattr(obj, name)]


def check_supported(model) -> None:
    """Raises ``TypeError`` saying why ``model`` cannot be patched, with the supported list."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    where = f"skiplayers cannot patch {type(model).__name__} (model_type={model_type!r})"
    if model_type not in SUPPORTED:
        raise TypeError(f"{where}; supported: {supported_list()}")
    decoder = getattr(model, "model", None)
    if decoder is None or not hasattr(model, "lm_head"):
        raise TypeError(f"{where}: expected a causal LM with .model (the decoder) and .lm_head; supported: {supported_list()}")
    problems = [f"decoder lacks {name}" for name in _missing(decoder, _DECODER_PARTS)]
    for idx, layer in enumerate(getattr(decoder, "layers", [])):
        problems += [f"layer {idx} lacks {name}" for name in _missing(layer, _LAYER_PARTS)]
        if hasattr(layer, "self_attn"):
            problems += [f"layer {idx} attention lacks {name}" for name in _missing(layer.self_attn, _ATTENTION_PARTS)]
        if hasattr(layer, "mlp"):
            problems += [f"layer {idx} MLP lacks {name}" for name in _missing(layer.mlp, _MLP_PARTS)]
        if problems:
            break
    if problems:
        raise TypeError(f"{where}: its layers do not have the LLaMA shape ({'; '.join(problems)})")


def sliding_window(config) -> int | None:
    """The attention window (in tokens) some layers apply, or None when every layer is full attention.

    Mistral applies ``config.sliding_window`` to every layer; Qwen2/Qwen3/SmolLM3 only to the layers
    ``config.layer_types`` marks ``"sliding_attention"`` (their config sets ``sliding_window`` to None
    unless ``use_sliding_window``)."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)
