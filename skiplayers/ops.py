"""The skiplayers ops: typed, documented wrappers, their fake implementations, and backend choice.

The schemas live in ``csrc/skiplayers.cpp`` (one ``TORCH_LIBRARY`` block); the compiled backends
register kernels for them (``cpu`` always, ``cuda`` when built with CUDA). ``torch`` runs the
pure-PyTorch semantics of ``skiplayers/reference.py``; ``triton`` runs ``skiplayers.triton_kernels``.

Conventions shared by every op:

* packed activations ``[total_tokens, heads, head_dim]``; sequence ``b`` owns rows
  ``cu_seqlens[b] .. cu_seqlens[b + 1] - 1`` (``cu_seqlens`` int32 ``[B + 1]``, flash-attn's layout);
* paged caches: pools of pages ``[num_pages, page_size, kv_heads, head_dim]`` (K, V) and
  ``[num_pages, page_size]`` (int32 pos, tag); sequence ``b`` holds slots ``0 .. cache_seqlens[b] - 1``,
  slot ``s`` in page ``block_table[b, s // page_size]`` (int32 ``[B, max_pages]``) at offset
  ``s % page_size`` (the layout of vLLM, FlashInfer and ``varlen_attn(block_table=...)``);
* ``pos`` int32 absolute positions, ``tag`` int32 flag/sentence words (``skiplayers/meta.py``);
* query head ``h`` reads KV head ``h // (heads // kv_heads)`` (GQA, no ``repeat_kv``);
* a query that sees no key outputs zeros.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from . import reference
from .autograd import register_autograd
from .meta import Rule
from .schemas import schema_arguments as schema_arguments  # re-exported: ops.schema_arguments(op)

BACKENDS = ("torch", "cpu", "triton", "cuda")


@dataclass(frozen=True)
class OpSet:
    """The five ops of one backend: the one list of the ops (``OP_NAMES`` is derived from it). Each
    takes the arguments of its schema (``schema_arguments``), by position or by name."""

    name: str
    varlen_attention: Callable
    cache_attention: Callable
    compact_rows: Callable
    cache_append: Callable
    cache_compact: Callable


OP_NAMES = tuple(f.name for f in fields(OpSet) if f.name != "name")


def _load_extension() -> None:
    try:
        importlib.import_module("skiplayers._C")
    except ImportError as err:  # never fall back silently: the compiled ops are the point
        raise ImportError(
            "skiplayers' compiled extension (skiplayers._C) failed to load: "
            f"{err}. Build it with `pip install --no-build-isolation -e .` in the repository "
            "(see README.md); the torch it was built against must be the torch installed now."
        ) from err


_load_extension()
_ops = torch.ops.skiplayers


# ----------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes only, for torch.compile and FakeTensor tracing. Shared by every
# namespace that defines these schemas (``skiplayers`` here, ``skiplayers_triton`` in triton_kernels).


def _check_one_device(op: str, **tensors) -> None:
    """The kernels refuse inputs on mixed devices; so must the fakes. (A ``meta`` tensor among CPU
    inputs sends the whole call to the fake: without this check it would return garbage silently.)"""
    first_name, first = next((n, t) for n, t in tensors.items() if t is not None)
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            raise RuntimeError(f"skiplayers::{op}: {name} is on {t.device} but {first_name} is on {first.device}")


def _varlen_attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, q_pos, k_pos, q_tag, k_tag, rule, scale):
    _check_one_device("varlen_attention", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      q_pos=q_pos, k_pos=k_pos, q_tag=q_tag, k_tag=k_tag)
    return q.new_empty(q.shape)


def _cache_attention_fake(
    q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, q_pos, pos_cache, q_tag, tag_cache, rule, scale,
    num_splits=0,
):
    _check_one_device("cache_attention", q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table,
                      cu_seqlens_q=cu_seqlens_q, cache_seqlens=cache_seqlens, q_pos=q_pos, pos_cache=pos_cache,
                      q_tag=q_tag, tag_cache=tag_cache)
    return q.new_empty(q.shape)


def _compact_rows_fake(x, cu_seqlens, keep):
    _check_one_device("compact_rows", x=x, cu_seqlens=cu_seqlens, keep=keep)
    kept = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((kept, *x.shape[1:])), cu_seqlens.new_empty(cu_seqlens.shape)


def _cache_append_fake(k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag, cu_seqlens,
                       cache_seqlens):
    _check_one_device("cache_append", k_cache=k_cache, v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache,
                      block_table=block_table, k=k, v=v, pos=pos, tag=tag, cu_seqlens=cu_seqlens,
                      cache_seqlens=cache_seqlens)
    return None


def _cache_compact_fake(k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep):
    _check_one_device("cache_compact", k_cache=k_cache, v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache,
                      block_table=block_table, cache_seqlens=cache_seqlens, keep=keep)
    return cache_seqlens.new_empty(cache_seqlens.shape)


FAKES: dict[str, Callable[..., object]] = dict(
    varlen_attention=_varlen_attention_fake,
    cache_attention=_cache_attention_fake,
    compact_rows=_compact_rows_fake,
    cache_append=_cache_append_fake,
    cache_compact=_cache_compact_fake,
)


def register_fakes(namespace: str, lib: torch.library.Library | None = None) -> None:
    """Registers the fake implementation of every op of ``OP_NAMES`` under ``namespace::<op>``."""
    for op in OP_NAMES:
        torch.library.register_fake(f"{namespace}::{op}", FAKES[op], lib=lib)


register_fakes("skiplayers")
_autograd_lib = torch.library.Library("skiplayers", "IMPL")  # kept alive: it owns the registrations
register_autograd("skiplayers", _autograd_lib)


# ----------------------------------------------------------------------------------------------
# Backends


def _compiled_op_set(name: str) -> OpSet:
    return OpSet(name, *(getattr(_ops, op) for op in OP_NAMES))


def _reference_op_set() -> OpSet:
    return OpSet("torch", *(getattr(reference, op) for op in OP_NAMES))


def has_compiled_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``skiplayers::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"skiplayers::{op}", dispatch_key)


def cuda_kernels_built() -> bool:
    return all(has_compiled_kernel(op, "CUDA") for op in OP_NAMES)


def get_ops(backend: str) -> OpSet:
    """The ops of ``backend`` (one of ``BACKENDS``); raises if that backend cannot run here."""
    if backend == "torch":
        return _reference_op_set()
    if backend == "cpu":
        return _compiled_op_set("cpu")
    if backend == "cuda":
        if not cuda_kernels_built():
            raise NotImplementedError(
                "backend='cuda': skiplayers._C was built without CUDA kernels (it needs a CUDA build of torch "
                "and nvcc at install time, and the kernels of csrc/cuda). Use backend='triton' or 'torch'."
            )
        return _compiled_op_set("cuda")
    if backend == "triton":
        from . import triton_kernels  # imports triton: only when asked for

        return triton_kernels.op_set()
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def default_backend(device: torch.device) -> str:
    """The fastest backend available for tensors on ``device``."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return "cuda" if cuda_kernels_built() else "triton"
    raise NotImplementedError(f"skiplayers has no backend for device type {device.type!r} (cpu and cuda only)")


def check_backend_device(backend: str, device: torch.device) -> None:
    """Raises a clear error when ``backend`` cannot run on tensors of ``device``."""
    wanted = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}.get(backend)
    if backend == "triton" and device.type == "cpu":
        from . import triton_kernels  # imports triton: only when asked for

        if triton_kernels.interpreted():  # TRITON_INTERPRET=1: the Triton ops also run on CPU tensors
            return
    if wanted is not None and device.type != wanted:
        raise ValueError(f"backend={backend!r} runs on {wanted} tensors, but the model is on {device}")


# ----------------------------------------------------------------------------------------------
# Documented wrappers (the compiled ops by default; pass ops=get_ops(...) for another backend)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    q_tag: torch.Tensor | None = None,
    k_tag: torch.Tensor | None = None,
    rule: Rule | int = Rule.CAUSAL,
    scale: float | None = None,
    ops: OpSet | None = None,
) -> torch.Tensor:
    """Attention of packed ragged queries over packed ragged keys (the prefill op).

    Args:
        q: ``[Nq, H, D]`` float32/float16/bfloat16 (rows and heads may be strided; ``D`` dense).
        k, v: ``[Nk, H_kv, D]``, same dtype; ``H % H_kv == 0``.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]``; sequence b's queries and keys.
        q_pos, k_pos: int32 ``[Nq]``, ``[Nk]`` absolute positions.
        q_tag, k_tag: int32 tags or None (all zero).
        rule: :class:`skiplayers.Rule` bits; ``Rule.CAUSAL`` (0) is plain causal attention by position.
        scale: softmax scale, default ``D ** -0.5``.

    Returns ``[Nq, H, D]`` in q's dtype. Query i of sequence b attends to key j of sequence b iff
    ``visible(rule, q_pos[i], q_tag[i], k_pos[j], k_tag[j])``; for ``Rule.CAUSAL`` that is
    ``k_pos[j] <= q_pos[i]``, e.g. for positions 0..3 (x = visible)::

        q\\k 0 1 2 3
         0   x . . .
         1   x x . .
         2   x x x .
         3   x x x x
    """
    ops = ops or _compiled_op_set("compiled")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.varlen_attention(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, q_pos=q_pos, k_pos=k_pos, q_tag=q_tag,
        k_tag=k_tag, rule=rule, scale=scale,
    )


def cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cache_seqlens: torch.Tensor,
    q_pos: torch.Tensor,
    pos_cache: torch.Tensor,
    q_tag: torch.Tensor | None = None,
    tag_cache: torch.Tensor | None = None,
    rule: Rule | int = Rule.CAUSAL,
    scale: float | None = None,
    num_splits: int = 0,
    ops: OpSet | None = None,
) -> torch.Tensor:
    """Attention of a few new queries per sequence over per-sequence paged KV caches (the decode op).

    Args:
        q: ``[Nq, H, D]`` packed by ``cu_seqlens_q`` int32 ``[B + 1]``.
        k_cache, v_cache: page pools ``[num_pages, page_size, H_kv, D]`` (head dim dense).
        block_table: int32 ``[B, max_pages]``: sequence b's slot s is page
            ``block_table[b, s // page_size]``, offset ``s % page_size``. Entries past the pages a
            sequence uses are never read. Pages may be in any order and shared between sequences.
        cache_seqlens: int32 ``[B]``: sequence b's keys are its first ``cache_seqlens[b]`` slots
            (each may differ; at most ``max_pages * page_size``). The new tokens' own K/V must
            already be in the cache (``cache_append``) for them to see themselves.
        q_pos: int32 ``[Nq]``; pos_cache, tag_cache: int32 ``[num_pages, page_size]`` per slot.
        num_splits: split-K factor over the keys (0: the backend chooses); the result does not
            depend on it.

    Returns ``[Nq, H, D]`` in q's dtype, with the visibility rule of :func:`varlen_attention`.
    """
    ops = ops or _compiled_op_set("compiled")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ops.cache_attention(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
        cache_seqlens=cache_seqlens, q_pos=q_pos, pos_cache=pos_cache, q_tag=q_tag, tag_cache=tag_cache, rule=rule,
        scale=scale, num_splits=num_splits,
    )


def compact_rows(
    x: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor, ops: OpSet | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the packed batch ``x`` ``[N, ...]`` where ``keep`` (bool ``[N]``), order preserved.

    Returns ``(x[keep], new_cu_seqlens)``: e.g. the hidden states at the context-stop layer with
    the context rows dropped, every sequence shrinking by its own amount.
    """
    ops = ops or _compiled_op_set("compiled")
    return ops.compact_rows(x=x, cu_seqlens=cu_seqlens, keep=keep)


def cache_append(
    k_cache, v_cache, pos_cache, tag_cache, block_table, k, v, pos, tag, cu_seqlens, cache_seqlens,
    ops: OpSet | None = None,
) -> None:
    """Writes the packed new rows of sequence b (``k, v [N, H_kv, D]``, ``pos, tag [N]``) into its
    paged slots ``cache_seqlens[b] ..`` in place, through ``block_table[b]``. ``cache_seqlens`` is not
    changed (the caller adds the counts); the caller has assigned the pages the new slots fall in,
    and no page written here belongs to another sequence."""
    ops = ops or _compiled_op_set("compiled")
    ops.cache_append(
        k_cache=k_cache, v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, block_table=block_table, k=k,
        v=v, pos=pos, tag=tag, cu_seqlens=cu_seqlens, cache_seqlens=cache_seqlens,
    )


def cache_compact(
    k_cache, v_cache, pos_cache, tag_cache, block_table, cache_seqlens, keep, ops: OpSet | None = None
) -> torch.Tensor:
    """Keeps, per sequence, the slots ``s < cache_seqlens[b]`` with ``keep[b, s]`` (bool
    ``[B, max_pages * page_size]``), moved in place to the front of the sequence's own pages in their
    order. Returns the new ``cache_seqlens`` (int32 ``[B]``); slots past each new length are
    unspecified, and the pages past it are the caller's to free. No page may belong to two sequences."""
    ops = ops or _compiled_op_set("compiled")
    return ops.cache_compact(
        k_cache=k_cache, v_cache=v_cache, pos_cache=pos_cache, tag_cache=tag_cache, block_table=block_table,
        cache_seqlens=cache_seqlens, keep=keep,
    )
