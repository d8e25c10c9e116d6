"""The patched forward under ``torch.compile``: its host-side work as opaque custom ops.

Everything the patched forward decides on the host (checks, the cache's per-sequence counts and
capacities, anchor tags, packing, whether a layer reads its cache, the bookkeeping after the layers)
would break a dynamo graph at every data-dependent read. Under compilation the decoder therefore
calls three custom ops of the ``skiplayers_host`` namespace instead, which run exactly the eager code
(``plan.plan_call``, :class:`~skiplayers.patching.attention.PackedStep`, ``plan.finish_call``)
when the compiled graph executes, while the dense work around them (embeddings, norms,
projections, RoPE, MLP, lm_head) is traced and compiled:

* ``plan``: the call's plan; returns the packed rows (``index [N]``, ``cu_seqlens [B + 1]``,
  ``pos [N]``, ``tag [N]``; N is data-dependent, an unbacked size to the compiler);
* ``attend``: one layer's ``SkipCache.update`` (append, growing buffers as needed; deferred from the
  update call, which under tracing only records that it came) and its attention over the packed
  rows or the cache;
* ``finish``: the cache's bookkeeping after the layers.

The ops find the decoder (and through it the running call) by its handle (``handles.py``).
``attend`` and ``finish`` declare that they mutate that handle, which is what keeps them
in program order and out of dead-code elimination (none really writes to it); ``plan`` comes first
because every other op consumes its rows (declared as a mutation too, its data-dependent outputs
trip inductor's scheduler in torch 2.14).
"""

from __future__ import annotations

import torch

from ..handles import lookup
from ..packing import PackedRows
from .attention import PackedStep
from .plan import plan_call


def _running(decoder_handle: torch.Tensor) -> PackedStep:
    step = getattr(lookup(decoder_handle), "_skiplayers_running", None)
    if step is None:
        raise RuntimeError("skiplayers: a compiled layer ran outside a compiled patched forward")
    return step


def _rows(cu_seqlens, pos, tag) -> PackedRows:
    """The rows a compiled layer works on, their host counts read from ``cu_seqlens`` at every call:
    not cached by buffer address, because inductor writes a new tensor into a dead one's buffer
    (the compacted ``cu_seqlens`` into the plan's, with the torch backend) and stale counts follow."""
    counts = cu_seqlens.diff().cpu().to(torch.int64)
    return PackedRows(index=None, cu_seqlens=cu_seqlens, counts=counts, pos=pos, tag=tag)


@torch.library.custom_op("skiplayers_host::plan", mutates_args=())
def _plan(
    decoder_handle: torch.Tensor,
    cache_handle: torch.Tensor | None,
    like: torch.Tensor,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    logits_to_keep: int,
    builds_graph: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    decoder = lookup(decoder_handle)
    cache = lookup(cache_handle) if cache_handle is not None else None
    plan = plan_call(decoder, cache, input_ids, like, attention_mask, position_ids, context_mask, logits_to_keep,
                     builds_graph)
    step = PackedStep(plan.rows, decoder._skiplayers, cache, plan=plan)
    decoder._skiplayers_running = step
    rows = plan.rows
    return rows.index, rows.cu_seqlens, rows.pos, rows.tag


@_plan.register_fake
def _(decoder_handle, cache_handle, like, input_ids, attention_mask, position_ids, context_mask, logits_to_keep,
      builds_graph):
    n = torch.library.get_ctx().new_dynamic_size()
    device = like.device
    return (
        torch.empty(n, dtype=torch.int64, device=device),
        torch.empty(like.shape[0] + 1, dtype=torch.int32, device=device),
        torch.empty(n, dtype=torch.int32, device=device),
        torch.empty(n, dtype=torch.int32, device=device),
    )


@torch.library.custom_op("skiplayers_host::attend", mutates_args=("decoder_handle",))
def _attend(decoder_handle: torch.Tensor, layer_idx: int, store: bool, query: torch.Tensor, key: torch.Tensor,
            value: torch.Tensor, cu_seqlens: torch.Tensor, pos: torch.Tensor, tag: torch.Tensor,
            scaling: float) -> torch.Tensor:
    running = _running(decoder_handle)
    step = running.with_rows(_rows(cu_seqlens, pos, tag))
    if store:  # SkipCache.update of this layer, deferred to here (one op per layer instead of two)
        step.store(step.cache, layer_idx, key, value)
    return step.attend(layer_idx, query, key, value, scaling)


@_attend.register_fake
def _(decoder_handle, layer_idx, store, query, key, value, cu_seqlens, pos, tag, scaling):
    _, heads, n, dim = query.shape
    return query.new_empty(1, n, heads, dim)


@torch.library.custom_op("skiplayers_host::finish", mutates_args=("decoder_handle",))
def _finish(decoder_handle: torch.Tensor) -> None:
    decoder = lookup(decoder_handle)
    step = _running(decoder_handle)
    decoder._skiplayers_running = None
    step.finish(decoder)


@_finish.register_fake
def _(decoder_handle):
    return None


class TracedStep:
    """What the layers see while dynamo traces a patched forward: :class:`PackedStep`'s interface,
    each method a call of the matching op on traced tensors."""

    def __init__(self, decoder_handle: torch.Tensor, rows: PackedRows, state, cache, stores: set[int] | None = None):
        self.handle = decoder_handle
        self.rows = rows
        self.state = state  # PatchState: its ops (compaction) are traced as they are
        self.cache = cache
        self._stores = set() if stores is None else stores  # layers whose update() came (trace time)

    def with_rows(self, rows: PackedRows) -> TracedStep:
        return TracedStep(self.handle, rows, self.state, self.cache, self._stores)

    def rows_on(self, device: torch.device) -> PackedRows:
        return self.rows if self.rows.cu_seqlens.device == device else self.rows.to(device)

    def has_context(self, context_mask) -> bool:
        # Whether any column is context is data; compact whenever a context mask was passed.
        return context_mask is not None

    def store(self, cache, layer_idx: int, key_states, value_states):
        # SkipCache.update hands back the K/V it got, which the attention function then passes to
        # attend: the attend op stores them first (one host op per layer).
        self._stores.add(layer_idx)
        return key_states, value_states

    def attend(self, layer_idx: int, query, key, value, scaling) -> torch.Tensor:
        rows = self.rows_on(query.device)
        return torch.ops.skiplayers_host.attend(self.handle, layer_idx, layer_idx in self._stores, query, key, value,
                                                rows.cu_seqlens, rows.pos, rows.tag, float(scaling))

    def finish(self, decoder) -> None:
        torch.ops.skiplayers_host.finish(self.handle)


def begin_call(decoder, cache, input_ids, inputs_embeds, attention_mask, position_ids, context_mask, logits_to_keep,
               builds_graph: bool) -> TracedStep:
    """The traced counterpart of ``plan_call`` + ``PackedStep``: one ``plan`` op."""
    if builds_graph:
        raise NotImplementedError(
            "training a skiplayers-patched model under torch.compile is not supported (its host-side ops have no "
            "backward); compile for inference (torch.no_grad()) or train eagerly"
        )
    if not isinstance(logits_to_keep, int):
        raise NotImplementedError("under torch.compile, logits_to_keep must be an int")
    handle = decoder._skiplayers_handle
    index, cu, pos, tag = torch.ops.skiplayers_host.plan(
        handle, cache.handle if cache is not None else None, inputs_embeds, input_ids, attention_mask, position_ids,
        context_mask, logits_to_keep, builds_graph,
    )
    rows = PackedRows(index=index, cu_seqlens=cu, counts=None, pos=pos, tag=tag)
    return TracedStep(handle, rows, decoder._skiplayers, cache)
