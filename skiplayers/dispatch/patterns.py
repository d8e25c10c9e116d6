"""Which attention pattern a call of a patched model computes, decided from host-side facts.

After compaction most attention calls of a patched model are standard patterns that any attention
kernel computes; only some need skiplayers' visibility predicate (``meta.py``, ``visibility.h``).
The classifier reads facts the patch already holds on the host (no device sync):

=========================  =====================================================================
pattern                    when (every condition below the previous rows' failed ones)
=========================  =====================================================================
``PREDICATE``              positions do not increase along a sequence (user ``position_ids``), or
                           anchors are on and a new row is an anchor (the AnSAN rule)
``VARLEN_CAUSAL``          the keys are this call's own rows: causal attention per sequence
``CACHE_DECODE``           over the cache, at most one new row per sequence: every stored key
                           is visible
``CACHE_CAUSAL``           over the cache, several new rows: every key stored before them is
                           visible, and causal among them (bottom-right aligned causal)
=========================  =====================================================================

Why the standard patterns are exact: with positions strictly increasing along each sequence (and
past every position the cache holds), "key position <= query position" is "key row <= query row",
i.e. causal by row. With anchors on and no anchor among the new rows, every new row is a
non-anchor token of its sequence's current sentence; the cache (after the reduction that runs
before each call, ``SkipCache.settle``) holds only sinks, anchors of finished sentences and
tokens of the current sentence, all of which the AnSAN rule lets such a token see. Context rows
need no term: at layers >= ℓ they are dropped, not masked. :func:`check_standard` verifies these
claims against the predicate itself (``SKIPLAYERS_VERIFY_DISPATCH=1``; the test suite turns it on).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from .. import reference


class Pattern(enum.StrEnum):  # str() and format() give the value
    VARLEN_CAUSAL = "varlen_causal"
    CACHE_DECODE = "cache_decode"
    CACHE_CAUSAL = "cache_causal"
    PREDICATE = "predicate"


STANDARD = (Pattern.VARLEN_CAUSAL, Pattern.CACHE_DECODE, Pattern.CACHE_CAUSAL)


@dataclass(frozen=True)
class CallFacts:
    """Host-side facts of one forward call, fixed before its layers run (``plan.plan_call``).

    positions_ordered: every sequence's new positions strictly increase along its columns and
        exceed every position fed to it before.
    new_anchor: anchors are on and some new column is an anchor token.
    """

    positions_ordered: bool
    new_anchor: bool


UNKNOWN = CallFacts(positions_ordered=False, new_anchor=True)  # a call with no plan: the predicate decides


def classify(facts: CallFacts, reads_cache: bool, max_new_rows: int) -> tuple[Pattern, str]:
    """The pattern of one layer's attention in a call, and why. ``reads_cache``: the layer attends to
    its cache (it held keys before this call); ``max_new_rows``: the most new rows of one sequence."""
    if not facts.positions_ordered:
        return Pattern.PREDICATE, "positions do not increase along a sequence, so causality by position is not by row"
    if facts.new_anchor:
        return Pattern.PREDICATE, "an anchor token among the new rows: the AnSAN rule hides keys from it"
    if not reads_cache:
        return Pattern.VARLEN_CAUSAL, "keys are the call's own rows, causal by row"
    if max_new_rows <= 1:
        return Pattern.CACHE_DECODE, "one new row per sequence, every stored key visible"
    return Pattern.CACHE_CAUSAL, "several new rows, every earlier stored key visible, causal among them"


def positions_ordered(positions: torch.Tensor, valid: torch.Tensor, last_fed: torch.Tensor | None) -> bool:
    """Whether each sequence's positions (int64 ``[B, T]``, host) at its valid columns (bool
    ``[B, T]``) strictly increase and exceed ``last_fed`` (int64 ``[B]``, the largest position fed
    before; -1 for none)."""
    for b in range(positions.shape[0]):
        p = positions[b][valid[b]]
        if p.numel() == 0:
            continue
        if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
            return False
        if last_fed is not None and int(p[0]) <= int(last_fed[b]):
            return False
    return True


def standard_visibility(pattern: Pattern, queries: int, keys: int) -> torch.Tensor:
    """Bool ``[queries, keys]``: which keys a standard pattern shows to each query of one sequence
    (the new rows are the last ``queries`` of the ``keys``: bottom-right aligned causal)."""
    rows = torch.arange(queries)[:, None] + (keys - queries)
    return torch.arange(keys)[None, :] <= rows


def check_standard(pattern: Pattern, rule: int, q_pos, q_tag, k_pos, k_tag) -> None:
    """Raises if the predicate shows one sequence's queries other keys than ``pattern`` does (the
    claim the classifier made for this call). Tensors: int32 ``[Nq]`` / ``[Nk]`` of that sequence."""
    predicate = reference.visibility_mask(rule, q_pos.cpu(), q_tag.cpu(), k_pos.cpu(), k_tag.cpu())
    standard = standard_visibility(pattern, q_pos.shape[0], k_pos.shape[0])
    if not torch.equal(predicate, standard):
        q, k = (predicate != standard).nonzero()[0].tolist()
        raise RuntimeError(
            f"skiplayers dispatch: a call classified {pattern} is not that pattern: query {q} (position "
            f"{int(q_pos[q])}) and key {k} (position {int(k_pos[k])}) differ from the predicate (rule {rule}); "
            "this is a bug in skiplayers.dispatch.patterns.classify"
        )
