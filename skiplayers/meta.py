"""Per-token metadata: the bits of the `tag` word and of the `rule` word.

These mirror ``csrc/include/skiplayers/visibility.h`` (the source of truth; a test parses the header
and checks that the numbers agree). Every token carries

* ``pos``: int32, its absolute position (the RoPE index). Causality compares positions.
* ``tag``: int32, ``CONTEXT | ANCHOR | SINK`` flag bits and, from bit 3 up, the sentence id (the
  number of anchors strictly before the token).

The ``rule`` word passed to the attention ops is a :class:`Rule`: its bits switch optional terms of
the visibility predicate on.
"""

from __future__ import annotations

import enum

import torch

TAG_CONTEXT = 1
TAG_ANCHOR = 2
TAG_SINK = 4
TAG_SENTENCE_SHIFT = 3



class Rule(enum.IntFlag):
    """The ``rule`` argument of ``varlen_attention`` / ``cache_attention``: which optional terms of
    the visibility predicate apply (an ``int`` to the ops; bits may be combined with ``|``)."""

    CAUSAL = 0  # no optional term: key j is visible to query i iff pos[j] <= pos[i]
    HIDE_CONTEXT = 1  # context keys are invisible (the masked form of context stop)
    ANCHORS = 2  # the AnSAN rule: own sentence, earlier anchors, sinks
    ALL = HIDE_CONTEXT | ANCHORS  # every bit the kernels know; any other bit is refused


def make_tags(
    context: torch.Tensor | None = None,
    anchor: torch.Tensor | None = None,
    sink: torch.Tensor | None = None,
    sentence: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack boolean flags and sentence ids (all the same shape) into int32 tag words."""
    parts = [t for t in (context, anchor, sink, sentence) if t is not None]
    if not parts:
        raise ValueError("make_tags needs at least one of context, anchor, sink, sentence")
    tag = torch.zeros(parts[0].shape, dtype=torch.int32, device=parts[0].device)
    if context is not None:
        tag |= context.to(torch.int32) * TAG_CONTEXT
    if anchor is not None:
        tag |= anchor.to(torch.int32) * TAG_ANCHOR
    if sink is not None:
        tag |= sink.to(torch.int32) * TAG_SINK
    if sentence is not None:
        tag |= sentence.to(torch.int32) << TAG_SENTENCE_SHIFT
    return tag


def tag_sentence(tag: torch.Tensor) -> torch.Tensor:
    return tag >> TAG_SENTENCE_SHIFT


def tag_has(tag: torch.Tensor, bit: int) -> torch.Tensor:
    return (tag & bit) != 0
