"""Few-shot prompts in the format of Sia et al. (2024), with the context marked.

A prompt is ``<bos> instructions \\n`` then ``Q: <src> A: <tgt>\\n`` per example, then
``Q: <query> A:``. Instructions and examples are context; the first token (``<bos>`` when the
tokenizer has one) and the query are not. Each piece is tokenised on its own and the ids are
concatenated, so the context boundary is exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _instructions_per_query(instructions, batch: int) -> list[str]:
    if isinstance(instructions, str):
        return [instructions] * batch
    if len(instructions) != batch:
        raise ValueError(f"instructions: one string, or one per query ({batch}); got {len(instructions)}")
    return list(instructions)


def _examples_per_query(examples, batch: int) -> list:
    if not examples or isinstance(examples[0], tuple):  # one list of (src, tgt) pairs for all
        return [list(examples)] * batch
    if len(examples) != batch:
        raise ValueError(f"examples: one list of (src, tgt) pairs, or one per query ({batch}); got {len(examples)}")
    return [list(e) for e in examples]


def fewshot_prompt_ids(tokenizer, instructions: str, examples: Sequence[tuple[str, str]], query: str):
    """Token ids of one prompt and its context flags (lists of equal length)."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids: list[int] = []
    context: list[bool] = []
    if tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
        context.append(False)
    pieces = [(instructions.strip() + "\n", True)] if instructions else []
    pieces += [(f"Q: {src} A: {tgt}\n", True) for src, tgt in examples]
    pieces.append((f"Q: {query} A:", False))
    for text, is_context in pieces:
        piece = encode(text)
        ids += piece
        context += [is_context] * len(piece)
    context[0] = False  # the paper never masks the first token
    return ids, context


def fewshot_batch(tokenizer, instructions, examples, queries: Sequence[str]):
    """Left-padded batch of few-shot prompts, one per query.

    Args:
        instructions: a string shared by all prompts, or one string per query.
        examples: ``[(src, tgt), ...]`` shared by all prompts, or one such list per query (so
            sequences may have different context lengths).
        queries: the query of each prompt.

    Returns ``(input_ids [B, T] long, attention_mask [B, T] long, context_mask [B, T] bool)``.
    """
    if not queries:
        raise ValueError("fewshot_batch needs at least one query")
    batch = len(queries)
    instructions = _instructions_per_query(instructions, batch)
    examples = _examples_per_query(examples, batch)
    prompts = [fewshot_prompt_ids(tokenizer, i, e, q) for i, e, q in zip(instructions, examples, queries)]
    return left_padded(prompts, pad_token_id(tokenizer))


def pad_token_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_padded(prompts: Sequence[tuple[list[int], list[bool]]], pad: int):
    """``(ids, context flags)`` per prompt -> left-padded ``(input_ids, attention_mask, context_mask)``
    ``[B, T]`` (long, long, bool), as :func:`fewshot_batch` returns them."""
    batch, width = len(prompts), max(len(ids) for ids, _ in prompts)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    context_mask = torch.zeros((batch, width), dtype=torch.bool)
    for b, (ids, ctx) in enumerate(prompts):
        n = len(ids)
        input_ids[b, width - n :] = torch.tensor(ids)
        attention_mask[b, width - n :] = 1
        context_mask[b, width - n :] = torch.tensor(ctx)
    return input_ids, attention_mask, context_mask
