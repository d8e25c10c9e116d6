"""skiplayers: make LLaMA-family models skip work they do not need.

    import skiplayers as sk
    model = sk.load_default_model(); tok = sk.load_default_tokenizer()
    ids, attn, ctx = sk.fewshot_batch(tok, instructions, examples, queries)
    sk.patch(model, sk.SkipPolicy(context_stop_layer=10))
    out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=32,
                         do_sample=False, return_dict_in_generate=True)
    out.past_key_values.layer_lengths()   # [L, B] tokens stored per layer and sequence
    sk.unpatch(model)
"""

from .anchors import anchor_ids
from .cache import SkipCache
from .masked import masked_forward, masked_generate
from .models import load_default_model, load_default_tokenizer
from .patching import is_patched, patch, unpatch
from .policy import SkipPolicy
from .prompts import fewshot_batch

__all__ = [
    "anchor_ids",
    "SkipCache",
    "SkipPolicy",
    "fewshot_batch",
    "is_patched",
    "load_default_model",
    "load_default_tokenizer",
    "masked_forward",
    "masked_generate",
    "patch",
    "unpatch",
]
