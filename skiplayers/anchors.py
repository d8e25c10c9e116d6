"""Anchor tokens (AnLLM, Pang et al. 2024): which tokens end a sentence, and their tag bits.

A sentence ends at an anchor token; a token's sentence id is the number of anchors strictly before
it in its sequence. With ``anchor_keep_first = n`` the first n real tokens of every sequence are
sinks: visible to every later token and never dropped from the cache.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .meta import TAG_ANCHOR, TAG_SENTENCE_SHIFT, TAG_SINK


def anchor_ids(tokenizer, endings: Iterable[str]) -> tuple[int, ...]:
    """Ids of every token of ``tokenizer`` whose text ends with one of ``endings`` (e.g. ".", "\\n")."""
    endings = tuple(endings)
    if not endings or not all(isinstance(e, str) and e for e in endings):
        raise ValueError(f"endings must be non-empty strings, got {endings!r}")
    special = set(tokenizer.all_special_ids)
    ids = [
        token_id
        for token_id in range(len(tokenizer))
        if token_id not in special and tokenizer.decode([token_id]).endswith(endings)
    ]
    if not ids:
        raise ValueError(f"no token of this tokenizer ends with any of {endings!r}")
    return tuple(ids)


def anchor_tags(
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    anchor_token_ids: tuple[int, ...],
    keep_first: int,
    prior_sentences: torch.Tensor,
    prior_tokens: torch.Tensor,
):
    """Tag bits (ANCHOR, SINK, sentence id) of new columns, continuing each sequence's history.

    Args:
        input_ids, valid: ``[B, T]`` (host) token ids and real-token flags of the new columns.
        prior_sentences, prior_tokens: int64 ``[B]``: anchors and real tokens already seen.

    Returns ``(tags int32 [B, T], sentences int64 [B], tokens int64 [B])``, the last two updated.
    """
    anchors = torch.tensor(anchor_token_ids, dtype=input_ids.dtype)
    is_anchor = torch.isin(input_ids, anchors) & valid
    sentence = prior_sentences[:, None] + is_anchor.long().cumsum(1) - is_anchor.long()
    real_index = prior_tokens[:, None] + valid.long().cumsum(1) - 1
    sink = valid & (real_index < keep_first)
    tags = (
        is_anchor.to(torch.int32) * TAG_ANCHOR
        | sink.to(torch.int32) * TAG_SINK
        | (sentence.to(torch.int32) << TAG_SENTENCE_SHIFT)
    )
    tags = torch.where(valid, tags, torch.zeros_like(tags))
    return tags, prior_sentences + is_anchor.sum(1), prior_tokens + valid.sum(1)
