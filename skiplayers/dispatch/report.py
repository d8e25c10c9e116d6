"""``sk.dispatch_report(model)``: which kernel each attention pattern of a patched model runs, and why."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import DEFAULT_PAGE_SIZE
from .patterns import Pattern
from .table import BAND_EDGES, BANDS, device_key, dtype_name, table_for


def _tokens_label(first: str, last: str) -> str:
    """The token range of the size bands ``first`` .. ``last``, e.g. ``"512-4095"``, ``"4096+"``."""
    i, j = BANDS.index(first), BANDS.index(last)
    low = 0 if i == 0 else BAND_EDGES[i - 1]
    return f"{low}+" if j == len(BAND_EDGES) else f"{low}-{BAND_EDGES[j] - 1}"


def _runs(choices: list[dict]) -> list[list[dict]]:
    """Consecutive choices of one pattern with the same kernel and reason, grouped."""
    groups: list[list[dict]] = []
    for c in choices:
        last = groups[-1][-1] if groups else None
        if last is not None and (last["pattern"], last["kernel"], last["reason"]) == (c["pattern"], c["kernel"], c["reason"]):
            groups[-1].append(c)
        else:
            groups.append([c])
    return groups


@dataclass
class DispatchReport:
    """``choices``: one dict per (pattern, size band) with ``kernel`` and ``reason``; ``calls``: how
    many attention calls ran per ``(pattern, kernel)`` since the model was patched."""

    device: str
    dtype: str
    head_dim: int
    backend: str
    ours: str
    table: str
    choices: list[dict]
    calls: dict

    def kernel_for(self, pattern: Pattern | str, size_band: str = "m") -> str:
        return next(c["kernel"] for c in self.choices if c["pattern"] == str(pattern) and c["band"] in (size_band, "any"))

    def __str__(self) -> str:
        """A table, one row per pattern and run of size bands with the same kernel and reason."""
        lines = [
            f"skiplayers attention dispatch: {self.device}, {self.dtype}, head_dim {self.head_dim}, "
            f"backend={self.backend!r} (ours: {self.ours}), table: {self.table}",
            f"{'pattern':<14} {'tokens':<12} {'kernel':<12} why",
        ]
        for group in _runs(self.choices):
            first, last = group[0]["band"], group[-1]["band"]
            any_size = first == "any" or (first == BANDS[0] and last == BANDS[-1])
            tokens = "any" if any_size else _tokens_label(first, last)
            c = group[0]
            lines.append(f"{c['pattern']:<14} {tokens:<12} {c['kernel']:<12} {c['reason']}")
        if self.calls:
            ran = ", ".join(f"{p} -> {k}: {n}" for (p, k), n in sorted(self.calls.items()))
            lines.append(f"calls so far: {ran}")
        else:
            lines.append("calls so far: none")
        lines.append("(tokens: the call's rows for varlen_causal, the stored keys read for the cache patterns; caches "
                     f"with SkipCache's default page size, {DEFAULT_PAGE_SIZE})")
        return "\n".join(lines)


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def dispatch_report(model) -> DispatchReport:
    """What :func:`skiplayers.patch`'s dispatcher does for ``model`` (its device, dtype, head dim):
    the kernel and the reason per pattern and size band, and the calls made so far."""
    from ..patching import execution_device, is_patched  # patching imports this package

    if not is_patched(model):
        raise ValueError("dispatch_report needs a model patched by skiplayers.patch()")
    state = model._skiplayers
    dispatcher = state.dispatcher
    device, dtype = execution_device(model), _model_dtype(model)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    choices = []
    for pattern in Pattern:
        for size_band in ("any",) if pattern == Pattern.PREDICATE or dispatcher.forced else BANDS:
            page_size = None if pattern == Pattern.VARLEN_CAUSAL else DEFAULT_PAGE_SIZE
            kernel, reason = dispatcher.choose(pattern, device, dtype, head_dim, "m" if size_band == "any" else size_band,
                                               page_size)
            choices.append(dict(pattern=str(pattern), band=size_band, kernel=kernel.name, reason=reason))
    table = table_for(device) if not dispatcher.forced else None
    return DispatchReport(
        device=f"{device} ({device_key(device)})", dtype=dtype_name(dtype), head_dim=head_dim, backend=state.backend,
        ours=state.ops.name, table=table.source if table is not None else "none",
        choices=choices, calls={(str(p), k): n for (p, k), n in dispatcher.calls.items()},
    )
