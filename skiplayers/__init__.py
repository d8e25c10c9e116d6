"""skiplayers: make LLaMA-family models skip work they do not need.

    import skiplayers as sk
    model = sk.load_default_model(); tok = sk.load_default_tokenizer()
    ids, attn, ctx = sk.fewshot_batch(tok, instructions, examples, queries)
    sk.patch(model, sk.SkipPolicy(context_stop_layer=10))
    out = model.generate(ids, attention_mask=attn, context_mask=ctx, max_new_tokens=32,
                         do_sample=False, return_dict_in_generate=True)
    out.past_key_values.layer_lengths()   # [L, B] tokens stored per layer and sequence
    print(sk.dispatch_report(model))      # which attention kernel runs each pattern, and why
    sk.unpatch(model)
"""

from . import _source_tree

_source_tree.install()  # source checkouts: `skiplayers.triton_kernels` is the top-level triton_kernels/

from ._version import __version__  # noqa: E402
from .anchors import anchor_ids  # noqa: E402
from .cache import SkipCache  # noqa: E402
from .calibration import calibrate  # noqa: E402
from .dispatch import dispatch_report  # noqa: E402
from .masked import masked_forward, masked_generate  # noqa: E402
from .meta import Rule  # noqa: E402
from .models import load_default_model, load_default_tokenizer  # noqa: E402
from .oracle import oracle_routes, run_routes  # noqa: E402
from .patching import is_patched, patch, patched, unpatch  # noqa: E402
from .patching.static_decode import StaticDecoder  # noqa: E402
from .policy import EarlyExit, SkipPolicy  # noqa: E402
from .prompts import fewshot_batch  # noqa: E402
from .work import work_report  # noqa: E402

__all__ = [
    "__version__",
    "anchor_ids",
    "EarlyExit",
    "SkipCache",
    "Rule",
    "SkipPolicy",
    "StaticDecoder",
    "calibrate",
    "dispatch_report",
    "fewshot_batch",
    "is_patched",
    "load_default_model",
    "load_default_tokenizer",
    "masked_forward",
    "masked_generate",
    "oracle_routes",
    "patch",
    "patched",
    "run_routes",
    "unpatch",
    "work_report",
]
