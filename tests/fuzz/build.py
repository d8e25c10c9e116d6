"""Case specs (``specs.py``) to tensors, and the judgement of one backend's answer.

``run_case(spec, ops)`` builds the op's arguments from the spec (contents drawn from ``spec["seed"]``),
calls ``ops.<op>``, and returns the error/bound ratio of the attention ops (tolerance policy of
``tests/op_contract.py``, against a float64 reference) or 0.0 for the exact row ops. It raises
``AssertionError`` on a wrong answer, on a legal input the backend refuses, on bad input it accepts,
and when an op writes into an input it must only read (including the unused parts of strided views)
or into pages it must leave alone (the writing cache ops: pages no sequence owns, and for
``cache_append`` every slot but the new ones).

Paged caches (``page_table``): sequence b's slots lie in the pages its block table row names, drawn
from a shuffled (or in-order) pool with spare pages no sequence owns; spare pages hold NaN K/V (and,
for ``cache_attention``, positions that would be visible), table entries past a sequence's pages are -1
(or random words), and for ``cache_attention`` a sequence may share its first pages with an earlier one.
"""

from __future__ import annotations

import re

import torch

import op_contract
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import TAG_ANCHOR, TAG_CONTEXT, TAG_SENTENCE_SHIFT, TAG_SINK

INT32_MAX = 2**31 - 1


class BadInputAccepted(AssertionError):
    """Bad input (or a meta tensor among CPU inputs) that the backend did not refuse."""
DTYPES = {name: getattr(torch, name) for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "bool")}


# --- metadata ---------------------------------------------------------------------------------------


def positions(n: int, mode: dict, gen: torch.Generator) -> torch.Tensor:
    """int64 positions of one sequence (``specs.positions``): steps from 0, then a base offset."""
    steps = {
        "dense": lambda: torch.ones(n, dtype=torch.int64),
        "gapped": lambda: torch.randint(1, 4, (n,), generator=gen),
        "sparse": lambda: torch.randint(1, 200, (n,), generator=gen),
        "ties": lambda: torch.randint(0, 3, (n,), generator=gen),
        "unsorted": lambda: torch.randint(1, 4, (n,), generator=gen),
    }[mode["steps"]]()
    pos = steps.cumsum(0) - steps[:1]
    if mode["steps"] == "unsorted":
        pos = pos[torch.randperm(n, generator=gen)]
    span = int(pos.max()) if n else 0
    base = {"zero": 0, "small": int(torch.randint(0, 1000, (1,), generator=gen)),
            "extreme": INT32_MAX - span - int(torch.randint(0, 1000, (1,), generator=gen))}[mode["base"]]
    return pos + base


def tags(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """int32 tag words of one sequence: "model" as the patch makes them (sentence = anchors before),
    "random" flag bits with unordered sentence ids 0..5, "large" the same near sentence id 2**27."""
    if kind == "model":
        context = torch.rand(n, generator=gen) < 0.35
        context[:1] = False
        anchor = torch.rand(n, generator=gen) < 0.2
        sentence = anchor.to(torch.int64).cumsum(0) - anchor.to(torch.int64)
        sink = torch.arange(n) < int(torch.randint(0, 3, (1,), generator=gen))
        flags = context * TAG_CONTEXT + anchor * TAG_ANCHOR + sink * TAG_SINK
    else:
        flags = torch.randint(0, 8, (n,), generator=gen)
        sentence = torch.randint(0, 6, (n,), generator=gen) + (2**27 if kind == "large" else 0)
    return (flags.to(torch.int64) | (sentence << TAG_SENTENCE_SHIFT)).to(torch.int32)


def query_positions(k_pos: torch.Tensor, nq: int, mode: str, base_mode: dict, gen) -> torch.Tensor:
    """Positions of ``nq`` queries over keys at ``k_pos``: "suffix" (the keys' own last tokens),
    "after" (new tokens after every key) or "free" (sorted, anywhere near the keys)."""
    nk = k_pos.numel()
    if mode == "suffix" and nq <= nk:
        return k_pos[nk - nq:]
    if nk == 0:
        return positions(nq, dict(base_mode, steps="gapped"), gen).clamp(0, INT32_MAX)
    if mode == "after":
        return (int(k_pos.max()) + torch.randint(1, 4, (nq,), generator=gen).cumsum(0)).clamp(max=INT32_MAX)
    lo, hi = int(k_pos.min()) - 3, int(k_pos.max()) + 3
    return torch.randint(lo, hi + 1, (nq,), generator=gen).sort().values.clamp(0, INT32_MAX)


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def int32(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.to(torch.int64) for p in parts]).to(torch.int32) if parts else torch.zeros(0, dtype=torch.int32)


# --- tensors in strided layouts -----------------------------------------------------------------------


def _poison(full: torch.Tensor, dtype) -> torch.Tensor:
    return torch.full_like(full, float("nan")) if dtype.is_floating_point else torch.full_like(full, -99)


def rows(n: int, heads: int, dim: int, dtype, layout: str, gen) -> torch.Tensor:
    """``[n, heads, dim]``: contiguous, a head slice of a wider buffer, every other row, or head-major.
    The parts of the underlying buffer outside the view hold NaN."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    if layout == "wide_heads":
        full = randn(n, heads + 2, dim)
        full[:, 0], full[:, heads + 1] = _poison(full[:, 0], dtype), _poison(full[:, 0], dtype)
        return full[:, 1:heads + 1]
    if layout == "row_step":
        full = randn(2 * n, heads, dim)
        full[1::2] = _poison(full[1::2], dtype)
        return full[::2]
    if layout == "head_major":
        return randn(heads, n, dim).transpose(0, 1)
    return randn(n, heads, dim)


def pool(num_pages: int, page_size: int, kv_heads: int, dim: int, dtype, layout: str, gen) -> torch.Tensor:
    """K or V pages ``[num_pages, page_size, kv_heads, dim]``: contiguous, a head slice of a wider
    buffer, every other page of a pool, or the first ``page_size`` slots of longer pages (the rest of
    a wider buffer NaN)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    if layout == "wide_heads":
        full = randn(num_pages, page_size, kv_heads + 1, dim)
        full[:, :, kv_heads] = float("nan")
        return full[:, :, :kv_heads]
    if layout == "page_step":
        full = randn(2 * num_pages, page_size, kv_heads, dim)
        full[1::2] = float("nan")
        return full[::2]
    if layout == "wide_page":
        full = randn(num_pages, page_size + 2, kv_heads, dim)
        full[:, page_size:] = float("nan")
        return full[:, :page_size]
    return randn(num_pages, page_size, kv_heads, dim)


# --- paged caches ------------------------------------------------------------------------------------


def page_table(slots: list[int], paging: dict, gen) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """A block table for sequences of ``slots[b]`` slots (``specs.paging``), the pool's page count, and
    ``(b, n)``: sequence b's first n slots are an earlier sequence's (``(-1, 0)``: no sharing).

    Sequence b needs ``ceil(slots[b] / page_size)`` pages, taken from the pool in shuffled (or pool)
    order; ``spare`` pages stay unassigned; the table is ``extra`` entries wider than the most pages a
    sequence needs, and entries past a sequence's pages are -1 (``tail="garbage"``: random int32
    words). With ``share``, sequence b's first j pages are an earlier sequence a's, where every slot b
    reads from them is one of a's (``min(slots[b], j * page_size) <= slots[a]``)."""
    ps, batch = paging["page_size"], len(slots)
    needed = [-(-n // ps) for n in slots]
    sharer, source, share_pages = -1, -1, 0
    if paging.get("share") and batch >= 2:
        b = int(torch.randint(1, batch, (1,), generator=gen))
        a = int(torch.randint(0, b, (1,), generator=gen))
        most = needed[b] if slots[b] <= slots[a] else slots[a] // ps
        if most >= 1:
            sharer, source, share_pages = b, a, int(torch.randint(1, most + 1, (1,), generator=gen))
    own = [n - (share_pages if b == sharer else 0) for b, n in enumerate(needed)]
    num_pages = sum(own) + paging["spare"]
    order = torch.randperm(num_pages, generator=gen) if paging["shuffled"] else torch.arange(num_pages)
    width = max([0, *needed]) + paging["extra"]
    if paging["tail"] == "garbage":
        small = torch.randint(-3, num_pages + 3, (batch, width), generator=gen)
        words = torch.randint(-(2**31), INT32_MAX, (batch, width), generator=gen)
        table = torch.where(torch.rand(batch, width, generator=gen) < 0.5, small, words).to(torch.int32)
    else:
        table = torch.full((batch, width), -1, dtype=torch.int32)
    first = 0
    for b in range(batch):
        pages = order[first : first + own[b]].to(torch.int32)
        first += own[b]
        if b == sharer:
            pages = torch.cat([table[source, :share_pages], pages])
        table[b, : needed[b]] = pages
    return table, num_pages, (sharer, min(slots[sharer], share_pages * ps) if sharer >= 0 else 0)


def shares_pages(spec: dict) -> bool:
    """Whether the case of ``spec`` has a sequence sharing pages with another (its paging asked for it
    and ``page_table`` found a pair that can): for the coverage counts. ``cache_attention_case`` draws
    its block table first, so the same generator state gives the same table here."""
    if spec["op"] != "cache_attention" or not spec["paging"]["share"]:
        return False
    _, _, (sharer, _) = page_table(spec["cache_lengths"], spec["paging"], torch.Generator().manual_seed(spec["seed"]))
    return sharer >= 0


def owned_pages(table: torch.Tensor, slots: list[int], page_size: int) -> torch.Tensor:
    """int64 indices of the pages that hold some sequence's slots ``0 .. slots[b] - 1``."""
    used = [table[b, : -(-n // page_size)] for b, n in enumerate(slots)]
    return torch.cat([u.long() for u in used]).unique() if used else torch.zeros(0, dtype=torch.long)


def slot_mask(table: torch.Tensor, slots: list[int], num_pages: int, page_size: int) -> torch.Tensor:
    """bool ``[num_pages, page_size]``: the slots some sequence holds."""
    held = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for b, n in enumerate(slots):
        held[reference.page_slots(held, table, b, 0, n)] = True
    return held


def break_table(table: torch.Tensor, slots: list[tuple[int, int]], num_pages: int, page_size: int, gen) -> bool:
    """Makes one page among the slots ``[first, end)`` of some sequence (``slots[b] = (first, end)``) -1
    or outside the pool; False if no sequence uses a slot there."""
    candidates = [b for b, (first, end) in enumerate(slots) if end > first]
    if not candidates:
        return False
    b = candidates[int(torch.randint(0, len(candidates), (1,), generator=gen))]
    first, end = slots[b]
    slot = int(torch.randint(first, end, (1,), generator=gen))
    bad = [-1, num_pages, num_pages + int(torch.randint(1, 1000, (1,), generator=gen)), -(2**31)]
    table[b, slot // page_size] = bad[int(torch.randint(0, len(bad), (1,), generator=gen))]
    return True


def bad_length(lengths: list[int], capacity: int, gen) -> None:
    """One length outside ``[0, capacity]``: past it by 1..3, or -1."""
    b = int(torch.randint(0, len(lengths), (1,), generator=gen))
    lengths[b] = capacity + 1 + int(torch.randint(0, 3, (1,), generator=gen)) if b % 2 == 0 else -1


# --- cases ------------------------------------------------------------------------------------------------


def varlen_attention_case(s: dict, gen) -> dict:
    dtype = DTYPES[s["dtype"]]
    q_pos, k_pos, q_tag, k_tag = [], [], [], []
    for nq, nk in s["lengths"]:
        kp, kt = positions(nk, s["pos"], gen), tags(nk, s["tags"]["kind"], gen)
        qp = query_positions(kp, nq, s["queries"], s["pos"], gen)
        suffix = s["queries"] == "suffix"
        k_pos.append(kp), k_tag.append(kt), q_pos.append(qp)
        q_tag.append(kt[nk - nq:] if suffix else tags(nq, s["tags"]["kind"], gen))
    nq, nk = (sum(n[i] for n in s["lengths"]) for i in (0, 1))
    lq, lk, lv = s["layout"]
    return dict(
        q=rows(nq, s["heads"], s["head_dim"], dtype, lq, gen),
        k=rows(nk, s["kv_heads"], s["head_dim"], dtype, lk, gen),
        v=rows(nk, s["kv_heads"], s["head_dim"], dtype, lv, gen),
        cu_seqlens_q=cu_seqlens([n[0] for n in s["lengths"]]), cu_seqlens_k=cu_seqlens([n[1] for n in s["lengths"]]),
        q_pos=int32(q_pos), k_pos=int32(k_pos),
        q_tag=int32(q_tag) if s["tags"]["q"] else None, k_tag=int32(k_tag) if s["tags"]["k"] else None,
        rule=s["rule"], scale=s["scale"],
    )


def cache_attention_case(s: dict, gen) -> dict:
    dtype, batch, paging = DTYPES[s["dtype"]], len(s["cache_lengths"]), s["paging"]
    ps, lengths = paging["page_size"], list(s["cache_lengths"])
    table, num_pages, (sharer, shared_slots) = page_table(lengths, paging, gen)
    k_cache = pool(num_pages, ps, s["kv_heads"], s["head_dim"], dtype, s["cache_layout"], gen)
    v_cache = pool(num_pages, ps, s["kv_heads"], s["head_dim"], dtype, s["cache_layout"], gen)
    # slots no sequence holds: positions that would be visible, any tag bits; NaN K/V in spare pages
    # always, in the other free slots if poisoned
    pos_cache = torch.randint(0, 50, (num_pages, ps), generator=gen, dtype=torch.int32)
    tag_cache = torch.randint(0, 64, (num_pages, ps), generator=gen, dtype=torch.int32)
    held = slot_mask(table, lengths, num_pages, ps)
    spare = torch.ones(num_pages, dtype=torch.bool).index_fill_(0, owned_pages(table, lengths, ps), False)
    free = ~held if s["poison"] else spare[:, None].expand(num_pages, ps)
    k_cache[free], v_cache[free] = float("nan"), float("nan")
    q_pos, q_tag = [], []
    for b, (n, nq) in enumerate(zip(lengths, s["q_lengths"])):
        kp, kt = positions(n, s["pos"], gen).to(torch.int32), tags(n, s["tags"]["kind"], gen)
        first = shared_slots if b == sharer else 0  # a shared prefix holds the earlier sequence's tokens
        pos_cache[reference.page_slots(pos_cache, table, b, first, n - first)] = kp[first:]
        tag_cache[reference.page_slots(tag_cache, table, b, first, n - first)] = kt[first:]
        kp, kt = reference.gather_slots(pos_cache, table, b, n), reference.gather_slots(tag_cache, table, b, n)
        q_pos.append(query_positions(kp.long(), nq, s["queries"], s["pos"], gen))
        suffix = s["queries"] == "suffix" and nq <= n
        q_tag.append(kt[n - nq:] if suffix else tags(nq, s["tags"]["kind"], gen))
    error = None
    if s.get("expect") == "bad_length" and batch:
        bad_length(lengths, table.shape[1] * ps, gen)
        error = "outside"
    if s.get("expect") == "bad_page" and break_table(table, [(0, n) for n in lengths], num_pages, ps, gen):
        error = "is not a page of the pool"
    return dict(
        _error=error,
        q=rows(sum(s["q_lengths"]), s["heads"], s["head_dim"], dtype, s["q_layout"], gen),
        k_cache=k_cache, v_cache=v_cache, block_table=table, cu_seqlens_q=cu_seqlens(s["q_lengths"]),
        cache_seqlens=torch.tensor(lengths, dtype=torch.int32), q_pos=int32(q_pos), pos_cache=pos_cache,
        q_tag=int32(q_tag) if s["tags"]["q"] else None, tag_cache=tag_cache if s["tags"]["k"] else None,
        rule=s["rule"], scale=s["scale"], num_splits=s["num_splits"],
    )


def _keep(n: int, mode: str, gen) -> torch.Tensor:
    p = {"random": float(torch.rand(1, generator=gen)), "none": 0.0, "all": 1.0, "sparse": 0.05}[mode]
    return torch.rand(n, generator=gen) < p


def compact_rows_case(s: dict, gen) -> dict:
    dtype, n = DTYPES[s["dtype"]], sum(s["lengths"])
    shape = (n, *s["trailing"])
    if dtype.is_floating_point:
        values = torch.randn(*shape, generator=gen).to(dtype)
    elif dtype == torch.bool:
        values = torch.rand(*shape, generator=gen) < 0.5
    else:
        values = torch.randint(-100, 100, shape, generator=gen).to(dtype)
    if s["layout"] == "row_step":
        full = torch.cat([values, values], 0) if n else values
        full = full.view(2, *shape).transpose(0, 1).reshape(2 * n, *s["trailing"]) if n else full
        x = full[::2]
    elif s["layout"] == "wide" and s["trailing"]:
        full = torch.cat([values, values[..., :1]], -1)
        x = full[..., :-1]
    else:
        x = values
    return dict(x=x, cu_seqlens=cu_seqlens(s["lengths"]), keep=_keep(n, s["keep"], gen))


def _cache_pools(slots: list[int], s: dict, dtype, gen) -> tuple[dict, int]:
    """The paged cache of the writing ops (``specs.paging``, no shared pages): contiguous K/V pools of
    random values, NaN in the spare pages, and pos/tag pools of random int32 words; and its page count."""
    table, num_pages, _ = page_table(slots, s["paging"], gen)
    ps, kv_heads, dim = s["paging"]["page_size"], s["kv_heads"], s["head_dim"]
    spare = torch.ones(num_pages, dtype=torch.bool).index_fill_(0, owned_pages(table, slots, ps), False)
    pools = dict(
        k_cache=torch.randn(num_pages, ps, kv_heads, dim, generator=gen).to(dtype),
        v_cache=torch.randn(num_pages, ps, kv_heads, dim, generator=gen).to(dtype),
        pos_cache=torch.randint(-(2**31), INT32_MAX, (num_pages, ps), generator=gen, dtype=torch.int32),
        tag_cache=torch.randint(-(2**31), INT32_MAX, (num_pages, ps), generator=gen, dtype=torch.int32),
        block_table=table,
    )
    pools["k_cache"][spare], pools["v_cache"][spare] = float("nan"), float("nan")
    return pools, num_pages


def cache_append_case(s: dict, gen) -> dict:
    dtype, batch, n = DTYPES[s["dtype"]], len(s["cache_lengths"]), sum(s["new_lengths"])
    lengths, new, ps = list(s["cache_lengths"]), s["new_lengths"], s["paging"]["page_size"]
    pools, num_pages = _cache_pools([a + b for a, b in zip(lengths, new)], s, dtype, gen)
    capacity, expect, error = pools["block_table"].shape[1] * ps, s.get("expect", "ok"), None
    if batch and expect in ("overflow", "bad_length"):
        b = int(torch.randint(0, batch, (1,), generator=gen))
        lengths[b] = -1 if expect == "bad_length" else capacity - new[b] + 1
        error = "block table holds"
    if expect == "bad_page" and break_table(pools["block_table"], [(a, a + b) for a, b in zip(lengths, new)],
                                            num_pages, ps, gen):
        error = "is not a page of the pool"
    lk, lv = s["layout"]
    return dict(
        _error=error, **pools,
        k=rows(n, s["kv_heads"], s["head_dim"], dtype, lk, gen), v=rows(n, s["kv_heads"], s["head_dim"], dtype, lv, gen),
        pos=torch.randint(-(2**31), INT32_MAX, (n,), generator=gen, dtype=torch.int32),
        tag=torch.randint(-(2**31), INT32_MAX, (n,), generator=gen, dtype=torch.int32),
        cu_seqlens=cu_seqlens(new), cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
    )


def cache_compact_case(s: dict, gen) -> dict:
    dtype, batch, ps = DTYPES[s["dtype"]], len(s["cache_lengths"]), s["paging"]["page_size"]
    lengths = list(s["cache_lengths"])
    pools, num_pages = _cache_pools(lengths, s, dtype, gen)
    capacity = pools["block_table"].shape[1] * ps
    # keep is random past each length too: only the slots below it count
    keep = torch.stack([_keep(capacity, s["keep"], gen) for _ in range(batch)]) if batch else torch.zeros(0, capacity, dtype=torch.bool)
    error = None
    if batch and s.get("expect") == "bad_length":
        bad_length(lengths, capacity, gen)
        error = "outside"
    if s.get("expect") == "bad_page" and break_table(pools["block_table"], [(0, n) for n in lengths], num_pages, ps, gen):
        error = "is not a page of the pool"
    return dict(_error=error, **pools, cache_seqlens=torch.tensor(lengths, dtype=torch.int32), keep=keep)


BUILDERS = dict(
    varlen_attention=varlen_attention_case, cache_attention=cache_attention_case, compact_rows=compact_rows_case,
    cache_append=cache_append_case, cache_compact=cache_compact_case,
)
ARGS = {op: sk_ops.schema_arguments(op) for op in sk_ops.OP_NAMES}


def build(spec: dict) -> dict:
    return BUILDERS[spec["op"]](spec, torch.Generator().manual_seed(spec["seed"]))


def expected_error(spec: dict, case: dict) -> str | None:
    """A regular expression the backend's error must match, or None when the input is legal."""
    error = case.pop("_error", None)
    return "device|meta" if spec.get("meta") else error


# --- judgement -----------------------------------------------------------------------------------------------


def _buffers(case: dict) -> dict:
    """The storage behind every tensor input (a view's base), to check that read-only inputs stay unchanged."""
    out = {}
    for name, t in case.items():
        if isinstance(t, torch.Tensor):
            out[name] = t if t._base is None else t._base
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        return torch.equal(a.nan_to_num(1e4, 2e4, -2e4), b.nan_to_num(1e4, 2e4, -2e4)) and torch.equal(a.isnan(), b.isnan())
    return torch.equal(a, b)


def _check_unchanged(before: dict, case: dict, skip=()) -> None:
    for name, buf in _buffers(case).items():
        if name not in skip:
            assert _same(buf, before[name]), f"the op changed its input {name} (or memory around its view)"


def run_case(spec: dict, ops) -> float:
    """Runs one case on ``ops``; returns err/bound for attention ops, 0.0 for row ops (see module doc)."""
    op = spec["op"]
    case = build(spec)
    want_error = expected_error(spec, case)
    if spec.get("meta"):
        case[spec["meta"]] = case[spec["meta"]].to("meta")
    args = [case[k] for k in ARGS[op]]
    if want_error:
        try:
            result = getattr(ops, op)(*args)
        except (RuntimeError, ValueError) as err:
            assert re.search(want_error, str(err), re.IGNORECASE), f"error message {str(err)!r} does not match {want_error!r}"
            return 0.0
        shape = [tuple(r.shape) for r in result] if isinstance(result, (tuple, list)) else getattr(result, "shape", None)
        raise BadInputAccepted(f"bad input accepted (expected an error matching {want_error!r}); returned {shape}")
    before = {k: v.clone() for k, v in _buffers(case).items()}
    if op == "cache_append":
        return _judge_append(case, args, ops, before)
    if op == "cache_compact":
        return _judge_compact(case, args, ops, before)
    result = getattr(ops, op)(*args)
    _check_unchanged(before, case)
    if op == "compact_rows":
        ref_x, ref_cu = reference.compact_rows(*args)
        out, cu = result
        assert out.dtype == ref_x.dtype and out.shape == ref_x.shape, f"x: {out.dtype} {tuple(out.shape)} != {ref_x.dtype} {tuple(ref_x.shape)}"
        assert torch.equal(out, ref_x), "compacted rows differ"
        assert torch.equal(cu, ref_cu), f"new cu_seqlens {cu.tolist()} != {ref_cu.tolist()}"
        return 0.0
    fn = reference.varlen_attention if op == "varlen_attention" else reference.cache_attention
    err, bound = op_contract.attention_error(result, case, fn)
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"
    return err / bound


POOLS = ("k_cache", "v_cache", "pos_cache", "tag_cache")


def _judge_append(case: dict, args: list, ops, before: dict) -> float:
    """Every page of every pool equals the reference's afterwards: the new slots written, nothing else."""
    ref = {k: before[k].clone() for k in POOLS}
    ops.cache_append(*args)
    _check_unchanged(before, case, skip=POOLS)
    reference.cache_append(*[ref.get(k, case[k]) for k in ARGS["cache_append"]])
    for name in ref:
        assert _same(case[name], ref[name]), f"{name} differs from the reference"
    return 0.0


def _judge_compact(case: dict, args: list, ops, before: dict) -> float:
    """In place: the new lengths and each sequence's kept slots (through its block table row) equal the
    reference's, and the pages no sequence owns are not written (op_contract.check_cache_compact; slots
    past a new length are unspecified)."""
    ref = {k: before[k].clone() for k in POOLS}
    lengths = ops.cache_compact(*args)
    _check_unchanged(before, case, skip=POOLS)
    want = reference.cache_compact(*[ref.get(k, case[k]) for k in ARGS["cache_compact"]])
    assert isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int32 and lengths.shape == want.shape, \
        f"new cache_seqlens: {getattr(lengths, 'dtype', type(lengths))} {tuple(getattr(lengths, 'shape', ()))}"
    assert torch.equal(lengths, want), f"new cache_seqlens {lengths.tolist()} != {want.tolist()}"
    table, page_size = case["block_table"], case["k_cache"].shape[1]
    spare = torch.ones(case["k_cache"].shape[0], dtype=torch.bool)
    spare[owned_pages(table, case["cache_seqlens"].tolist(), page_size)] = False
    for name in POOLS:
        for b, n in enumerate(want.tolist()):
            got, expected = (reference.gather_slots(t, table, b, n) for t in (case[name], ref[name]))
            assert _same(got, expected), f"{name} of sequence {b} differs"
        assert _same(case[name][spare], before[name][spare]), f"{name}: a page no sequence owns was written"
    return 0.0
