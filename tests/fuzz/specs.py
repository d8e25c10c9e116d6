"""Hypothesis strategies for the fuzz suite: each draws a *case spec*, a small JSON-able dict that
``build.py`` turns into tensors (the tensor contents come from the spec's ``seed``). Specs are plain
data so a failing case prints as one line that ``worker.py --replay`` runs again.

What the specs cover, per op (legal per the docstrings of ``skiplayers/ops.py``, except the
``bad_input`` specs):

* every op: batch 0..4 with empty sequences, lengths 0..70 and rarely up to 300 (``profile="small"``,
  for the Triton interpreter: up to 40, rarely 130, batch <= 3);
* attention: kv_heads 1..3, GQA group 1..4 and rarely 0 query heads, head dims 16/32/64/80/128
  (Triton: 64/128/96/32/256, the dims ``triton_kernels/configs.py`` supports), float32/float16/bfloat16,
  each rule, tags present on both, either or neither side ("model" tags as the patch makes them,
  "random" tags with unordered sentences, "large" sentence ids), dense, gapped, sparse, tied and
  unsorted positions from 0, a small offset or the top of int32, queries that are a suffix of the keys
  or free, row/head-strided views (unused parts of the wider buffers hold NaN), num_splits 0..4 (and
  7, 13), a few softmax scales;
* paged caches (the three cache ops; ``paging``): page sizes 1, a small odd size (3, 5, 7), 16, 64 and
  rarely one page that holds the longest sequence; pages shuffled through the pool (or in order);
  spare pages no sequence owns, whose K/V hold NaN and whose positions are visible garbage; block
  tables wider than the pages needed (entries past a sequence's pages -1, or rarely random int32
  words, which no op may read) or exactly as wide, caches that end inside a page or on its boundary;
  for ``cache_attention`` only (it only reads), a sequence whose first pages are another's (a shared
  prefix), slots past each length with NaN K/V and visible positions (``poison``), and K/V pools
  strided by head, by page or by slot (``cache_layout``; the writing ops take contiguous pools);
* row ops: element dtypes float and integer, trailing shapes of rank 0..2, keep densities from none to
  all, strided sources; ``cache_compact`` works in place (judged: new lengths, each sequence's kept
  slots, pages no sequence owns untouched);
* bad input (``bad_input``, a separate run per kind), where a backend must raise: cache lengths outside
  ``[0, max_pages * page_size]`` (``bad_length``), appends past the block table (``overflow``), a -1 or
  out-of-range page among the slots an op uses (``bad_page``), and one tensor input on the ``meta``
  device among CPU tensors. Only the dispatcher backends (cpu, triton) validate input, so the worker
  draws these only for them.
"""

from __future__ import annotations

from hypothesis import strategies as st

import constants

ATTENTION_DTYPES = ("float32", "float16", "bfloat16")
ROW_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "bool")
RULES = tuple(int(r) for r in constants.RULES)  # every combination of the Rule bits, as JSON-able ints
HEAD_DIMS = {"full": (64, 16, 32, 80, 128), "small": (64, 128, 96, 32, 256)}
LENGTHS = {"full": (8, 70, 300), "small": (8, 40, 130)}  # tiny, mid, large upper bounds
MAX_BATCH = {"full": 4, "small": 3}


def pick(draw, weighted):
    """One value of ``[(weight, value), ...]``; shrinks towards the first."""
    total = sum(w for w, _ in weighted)
    i = draw(st.integers(0, total - 1))
    for w, value in weighted:
        if i < w:
            return value
        i -= w
    raise AssertionError


def seq_length(draw, profile: str) -> int:
    """0, tiny, mid or (rarely; more rarely still for the slow Triton interpreter) large."""
    tiny, mid, large = LENGTHS[profile]
    rare = 1 if profile == "full" else 0
    lo, hi = pick(draw, [(3, (0, 0)), (12, (1, tiny)), (12, (tiny + 1, mid)), (2 + rare, (mid + 1, large))])
    return draw(st.integers(lo, hi))


def batch_size(draw, profile: str) -> int:
    return pick(draw, [(1, 1), (1, 0), (3, 2), (2, 3), (1, MAX_BATCH[profile])])


def heads(draw, profile: str) -> tuple[int, int]:
    kv_heads = draw(st.integers(1, 3))
    group = pick(draw, [(5, 1), (5, 2), (4, 3), (4, 4), (2, 0)])  # group 0: zero query heads
    return kv_heads * group, kv_heads


def positions(draw) -> dict:
    return dict(
        steps=pick(draw, [(3, "dense"), (3, "gapped"), (2, "sparse"), (1, "ties"), (1, "unsorted")]),
        base=pick(draw, [(3, "zero"), (2, "small"), (2, "extreme")]),
    )


def tags(draw) -> dict:
    # presence as one choice: Hypothesis tends to give two booleans drawn together the same value
    q, k = draw(st.sampled_from([(True, True), (False, True), (True, False), (False, False)]))
    return dict(q=q, k=k, kind=pick(draw, [(3, "model"), (2, "random"), (1, "large")]))


ROW_LAYOUTS = [(4, "contig"), (2, "wide_heads"), (1, "row_step"), (1, "head_major")]
# K/V pools of cache_attention: contiguous, heads of a wider buffer, every other page of a pool, or the
# first page_size slots of longer pages (the rest NaN); head_dim stays dense (op_checks.h).
CACHE_LAYOUTS = [(4, "contig"), (1, "wide_heads"), (1, "page_step"), (1, "wide_page")]


def page_size(draw, lengths: list[int]) -> int:
    """16, 1, a small odd size, 64, or (rarely) one page per sequence: a page holding the longest."""
    kind = pick(draw, [(4, 16), (2, 1), (2, "odd"), (2, 64), (1, "whole")])
    if kind == "odd":
        return draw(st.sampled_from((3, 5, 7)))
    if kind == "whole":
        return max([1, *lengths]) + draw(st.integers(0, 3))
    return kind


def paging(draw, lengths: list[int], shared: bool = False) -> dict:
    """How sequences of ``lengths`` slots lie in a pool of pages (``build.page_table``): the page size,
    shuffled or in-order pages, spare pages no sequence owns, table entries past the pages needed
    (``extra``, their contents ``tail``), and (``shared``, read-only ops) whether a sequence shares
    its first pages with an earlier one."""
    return dict(
        page_size=page_size(draw, lengths), shuffled=pick(draw, [(4, True), (1, False)]),
        spare=pick(draw, [(2, 0), (3, 1), (2, (2, 6))]), extra=pick(draw, [(2, 0), (3, 1), (1, (2, 4))]),
        tail=pick(draw, [(4, "-1"), (1, "garbage")]), share=shared and pick(draw, [(4, False), (1, True)]),
    )


def _draw_range(draw, v):
    return draw(st.integers(*v)) if isinstance(v, tuple) else v


def _drawn(draw, d: dict) -> dict:
    return {k: _draw_range(draw, v) for k, v in d.items()}


def scale(draw, head_dim: int) -> float:
    return pick(draw, [(6, head_dim**-0.5), (1, 1.0), (1, 0.02)])


@st.composite
def varlen_attention(draw, profile="full"):
    batch = batch_size(draw, profile)
    lengths = []
    for _ in range(batch):
        nk = seq_length(draw, profile)
        nq = pick(draw, [(3, nk), (1, min(nk, 1)), (1, None)])
        lengths.append([draw(st.integers(0, nk)) if nq is None else nq, nk])
    h, kvh = heads(draw, profile)
    head_dim = draw(st.sampled_from(HEAD_DIMS[profile]))
    tag = tags(draw)
    return dict(
        op="varlen_attention", lengths=lengths, heads=h, kv_heads=kvh, head_dim=head_dim,
        dtype=draw(st.sampled_from(ATTENTION_DTYPES)), rule=draw(st.sampled_from(RULES)), tags=tag,
        pos=positions(draw), queries=pick(draw, [(4, "suffix"), (1, "free")]),
        layout=[pick(draw, ROW_LAYOUTS) for _ in "qkv"], scale=scale(draw, head_dim),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def cache_attention(draw, profile="full"):
    batch = batch_size(draw, profile)
    cache_lengths = [seq_length(draw, profile) for _ in range(batch)]
    q_lengths = [_draw_range(draw, pick(draw, [(4, min(n, 1)), (2, 1), (2, (0, 8)), (1, (9, 40))])) for n in cache_lengths]
    h, kvh = heads(draw, profile)
    head_dim = draw(st.sampled_from(HEAD_DIMS[profile]))
    tag = tags(draw)
    return dict(
        op="cache_attention", cache_lengths=cache_lengths, q_lengths=q_lengths, heads=h, kv_heads=kvh,
        paging=_drawn(draw, paging(draw, cache_lengths, shared=True)), head_dim=head_dim,
        dtype=draw(st.sampled_from(ATTENTION_DTYPES)), rule=draw(st.sampled_from(RULES)), tags=tag,
        pos=positions(draw), queries=pick(draw, [(3, "suffix"), (1, "after"), (1, "free")]),
        q_layout=pick(draw, ROW_LAYOUTS), cache_layout=pick(draw, CACHE_LAYOUTS), poison=draw(st.booleans()),
        num_splits=pick(draw, [(3, 0), (2, 1), (2, 2), (1, 3), (1, 4), (1, 7), (1, 13)]), scale=scale(draw, head_dim),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def compact_rows(draw, profile="full"):
    batch = batch_size(draw, profile)
    rank = pick(draw, [(2, 1), (2, 2), (1, 0)])
    return dict(
        op="compact_rows", lengths=[seq_length(draw, profile) for _ in range(batch)],
        trailing=[draw(st.integers(1, 9)) for _ in range(rank)], dtype=draw(st.sampled_from(ROW_DTYPES)),
        keep=pick(draw, [(3, "random"), (1, "none"), (1, "all"), (1, "sparse")]),
        layout=pick(draw, [(3, "contig"), (1, "row_step"), (1, "wide")]),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def cache_append(draw, profile="full"):
    batch = batch_size(draw, profile)
    cache_lengths = [seq_length(draw, profile) for _ in range(batch)]
    new_lengths = [pick(draw, [(3, 1), (2, 0), (3, (2, 8)), (1, (9, 40))]) for _ in range(batch)]
    new_lengths = [_draw_range(draw, n) for n in new_lengths]
    return dict(
        op="cache_append", cache_lengths=cache_lengths, new_lengths=new_lengths,
        paging=_drawn(draw, paging(draw, [a + b for a, b in zip(cache_lengths, new_lengths)])),
        kv_heads=draw(st.integers(1, 3)), head_dim=draw(st.sampled_from(HEAD_DIMS["full"])),
        dtype=draw(st.sampled_from(ATTENTION_DTYPES)), layout=[pick(draw, ROW_LAYOUTS) for _ in "kv"],
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def cache_compact(draw, profile="full"):
    batch = batch_size(draw, profile)
    cache_lengths = [seq_length(draw, profile) for _ in range(batch)]
    return dict(
        op="cache_compact", cache_lengths=cache_lengths, paging=_drawn(draw, paging(draw, cache_lengths)),
        kv_heads=draw(st.integers(1, 3)), head_dim=draw(st.sampled_from(HEAD_DIMS["full"])),
        dtype=draw(st.sampled_from(ATTENTION_DTYPES)),
        keep=pick(draw, [(3, "random"), (1, "none"), (1, "all"), (1, "sparse")]),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


STRATEGIES = dict(
    varlen_attention=varlen_attention, cache_attention=cache_attention, compact_rows=compact_rows,
    cache_append=cache_append, cache_compact=cache_compact,
)
# The bad-input kinds of each op besides "meta" (build.py makes the case bad and names the error).
BAD_KINDS = dict(
    varlen_attention=[], cache_attention=["bad_length", "bad_page"], compact_rows=[],
    cache_append=["overflow", "bad_length", "bad_page"], cache_compact=["bad_length", "bad_page"],
)


def tensor_inputs(spec: dict) -> list[str]:
    """The names of the op's tensor arguments in ``spec`` (optional tags only when present)."""
    names = dict(
        varlen_attention=["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "q_pos", "k_pos", "q_tag", "k_tag"],
        cache_attention=["q", "k_cache", "v_cache", "block_table", "cu_seqlens_q", "cache_seqlens", "q_pos",
                         "pos_cache", "q_tag", "tag_cache"],
        compact_rows=["x", "cu_seqlens", "keep"],
        cache_append=["k_cache", "v_cache", "pos_cache", "tag_cache", "block_table", "k", "v", "pos", "tag",
                      "cu_seqlens", "cache_seqlens"],
        cache_compact=["k_cache", "v_cache", "pos_cache", "tag_cache", "block_table", "cache_seqlens", "keep"],
    )[spec["op"]]
    tags = spec.get("tags", {})
    return [n for n in names if not (n == "q_tag" and not tags.get("q")) and not (n in ("k_tag", "tag_cache") and not tags.get("k"))]


@st.composite
def bad_input(draw, legal, kind: str):
    """A legal spec made bad: one tensor input on the meta device (``kind="meta"``), or one of the
    op's ``BAD_KINDS`` (build.py makes the values bad and names the error wanted)."""
    spec = draw(legal)
    if kind == "meta":
        return dict(spec, meta=draw(st.sampled_from(tensor_inputs(spec))))
    return dict(spec, expect=kind)


def bad_kinds(op: str) -> list[str]:
    return ["meta", *BAD_KINDS[op]]


def spec_strategy(op: str, backend: str, bad: str | None = None):
    """Legal specs for ``op`` on ``backend`` (small shapes for the Triton interpreter), or bad-input
    specs of kind ``bad`` (one of ``bad_kinds(op)``; drawn only for the backends that validate input)."""
    legal = STRATEGIES[op](profile="small" if backend == "triton" else "full")
    return legal if bad is None else bad_input(legal, bad)


# The paging of the fixed specs, and its variants each cache op runs: pages of one slot (table exactly
# full), one page per sequence, pages in the pool's order without spare pages, garbage past the used
# table entries.
PAGED = dict(page_size=16, shuffled=True, spare=2, extra=1, tail="-1", share=False)
_PAGED_EDGES = [dict(PAGED, page_size=1, extra=0), dict(PAGED, page_size=64), dict(PAGED, page_size=41, extra=0),
                dict(PAGED, shuffled=False, spare=0), dict(PAGED, page_size=7, tail="garbage", extra=3)]


def edge_specs(op: str, backend: str) -> list[dict]:
    """Fixed specs run before the random search, so every run covers the cross product of the rules and
    of the tag presence (q, k, both, neither) on ragged gapped batches, and the degenerate shapes (an empty
    batch, empty sequences, zero query heads, block tables exactly full) and the paging cases (page sizes
    1, odd, 16, 64, one page per sequence, pages in order, shared pages, garbage past the table's used
    entries, strided pools) whatever Hypothesis happens to draw."""
    presence = [(True, True), (False, True), (True, False), (False, False)]
    combos = [(rule, q, k) for rule in RULES for q, k in presence]
    dtype = lambda i: ATTENTION_DTYPES[i % 3]  # noqa: E731
    head_dim = HEAD_DIMS["small"][0]
    if op == "varlen_attention":
        base = dict(op=op, lengths=[[5, 9], [0, 3], [17, 17]], heads=4, kv_heads=2, head_dim=head_dim, dtype="float32",
                    rule=0, tags=dict(q=True, k=True, kind="model"), pos=dict(steps="gapped", base="small"),
                    queries="suffix", layout=["contig"] * 3, scale=head_dim**-0.5, seed=0)
        degenerate = [dict(lengths=[]), dict(lengths=[[0, 0], [0, 4]]), dict(heads=0, kv_heads=1)]
    elif op == "cache_attention":
        base = dict(op=op, cache_lengths=[9, 0, 33], q_lengths=[1, 0, 3], heads=6, kv_heads=2, paging=PAGED,
                    head_dim=head_dim, dtype="float32", rule=0, tags=dict(q=True, k=True, kind="model"),
                    pos=dict(steps="gapped", base="small"), queries="suffix", q_layout="contig", cache_layout="contig",
                    poison=True, num_splits=0, scale=head_dim**-0.5, seed=0)
        degenerate = [dict(cache_lengths=[], q_lengths=[]), dict(cache_lengths=[0, 0], q_lengths=[0, 2]),
                      dict(heads=0, kv_heads=1), dict(paging=dict(PAGED, page_size=3, extra=0), num_splits=4),
                      *(dict(paging=p) for p in _PAGED_EDGES),
                      dict(paging=dict(PAGED, share=True), cache_lengths=[40, 33, 7], q_lengths=[1, 2, 1]),
                      dict(paging=dict(PAGED, page_size=5, share=True), cache_lengths=[9, 12], q_lengths=[1, 1]),
                      *(dict(cache_layout=layout) for _, layout in CACHE_LAYOUTS[1:])]
        specs = [dict(base, rule=rule, tags=dict(q=q, k=k, kind="model"), dtype=dtype(i),
                      paging=dict(PAGED, page_size=(16, 1, 5, 64)[i % 4]), seed=i)
                 for i, (rule, q, k) in enumerate(combos)]
        return specs + [dict(base, **d, seed=100 + i) for i, d in enumerate(degenerate)]
    else:
        base = dict(
            compact_rows=dict(op=op, lengths=[5, 0, 7], trailing=[3], dtype="float32", keep="random", layout="contig", seed=0),
            cache_append=dict(op=op, cache_lengths=[3, 0, 6], new_lengths=[2, 1, 0], paging=dict(PAGED, page_size=3),
                              kv_heads=2, head_dim=head_dim, dtype="float32", layout=["contig", "contig"], seed=0),
            cache_compact=dict(op=op, cache_lengths=[5, 0, 12], paging=dict(PAGED, page_size=3), kv_heads=2,
                               head_dim=head_dim, dtype="float32", keep="random", seed=0),
        )[op]
        lengths = "lengths" if op == "compact_rows" else "cache_lengths"
        degenerate = [{lengths: []}, {lengths: [0, 0]}]
        degenerate += [dict(keep="none"), dict(keep="all")] if op != "cache_append" else [dict(new_lengths=[0, 0, 0])]
        if op == "cache_append":
            degenerate[:2] = [dict(cache_lengths=[], new_lengths=[]), dict(cache_lengths=[0, 0], new_lengths=[0, 2])]
        if op != "compact_rows":
            degenerate += [dict(paging=p) for p in _PAGED_EDGES]
            degenerate += [dict(cache_lengths=[40, 0, 17], new_lengths=[1, 30, 0])] if op == "cache_append" else []
        return [dict(base, **d, seed=i) for i, d in enumerate([{}, *degenerate, dict(dtype="bfloat16")])]
    specs = [dict(base, rule=rule, tags=dict(q=q, k=k, kind="model"), dtype=dtype(i), seed=i)
             for i, (rule, q, k) in enumerate(combos)]
    return specs + [dict(base, **d, seed=100 + i) for i, d in enumerate(degenerate)]
