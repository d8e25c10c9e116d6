"""The values the op tests sweep, declared once: attention dtypes, visibility rules, GQA head counts,
head dims and the ragged length sets. ``tests/backends.py`` says which backend runs which of them;
``tests/conftest.py`` gives them readable test ids (``float16``, ``HIDE_CONTEXT|ANCHORS``, ``9q3kv``,
``3-0-7``).

Plain values only (no pytest marks, no backend knowledge), so that any test file, the fuzz specs
and the gradient tests can import them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from skiplayers.meta import Rule

# The dtypes of q/k/v every attention backend takes (the tolerance policy has an ATOL for each).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Every combination of the rule bits, derived from Rule (a new bit adds its combinations here).
RULES = tuple(Rule(bits) for bits in range(int(Rule.ALL) + 1))


class Heads(NamedTuple):
    """Query and KV head counts of one GQA layout (query head h reads KV head h // (q // kv))."""

    q: int
    kv: int


# GQA ratios 3, 3, 8, 1, 8, 16, 40 (more query heads per KV head than a decode tile has rows); odd
# head counts. The union of the sets the per-backend files had drifted to: CPU had the first five,
# Triton added (40, 1), CUDA (16, 1).
HEADS = (Heads(6, 2), Heads(9, 3), Heads(8, 1), Heads(7, 7), Heads(16, 2), Heads(16, 1), Heads(40, 1))

# Head dims of the attention tests: the LLaMA family's (64 and 128 every backend has; 32, 96 and 256
# only some: 96 is not a power of two), then one that only backends taking any head dim run and the
# others refuse (80).
HEAD_DIMS = (64, 128, 32, 96, 256, 80)

# Ragged batches of the prefill tests (tokens per sequence; 0 = an empty sequence): one token, one
# sequence, empty sequences between and around, and sequences longer than a key block. The last two
# are the larger variants the compiled backends ran before; the interpreter runs the others.
RAGGED = ([1], [0, 5, 0, 37], [3, 70, 0, 77, 2])
RAGGED_LARGE = ([111], [3, 130, 0, 77, 2])

# Cache lengths of the decode tests (one new query per non-empty sequence): a one-slot cache, an
# empty one, and caches of several key blocks; the larger variant has a longer last cache.
DECODE = [1, 0, 150, 260]
DECODE_LARGE = [1, 0, 150, 700]

# Ragged batches of the row ops (compact_rows): empty, one sequence, empty sequences around.
ROWS = ([0], [5], [0, 7, 0, 130, 1])
ROWS_LARGE = ([3000, 1, 2500],)

# Split-K factors of the decode op (0: the backend chooses; 64: more splits than most caches have
# key blocks).
NUM_SPLITS = (0, 1, 3, 7)
NUM_SPLITS_LARGE = (64,)

# Page sizes of the paged-cache tests: one slot a page, SkipCache's default, and pages longer than a
# key block of most kernels.
PAGE_SIZES = (1, 16, 64)
