"""Backward passes of the skiplayers ops, registered for every namespace that defines them.

The compiled and Triton kernels are forward-only. So that a patched model never returns logits
whose gradients silently miss parameters, every op gets an autograd rule here:

* ``varlen_attention`` / ``cache_attention``: gradients of q, k, v (the k_cache, v_cache pools) by
  **recomputation in PyTorch**: the backward reruns the op's pure-PyTorch semantics
  (``reference.py``, float32 per sequence, dense predicate mask) under autograd and differentiates
  it. It is exact (it is the reference's own gradient) but not a fused kernel: memory is
  O(heads * Nq * Nk) per sequence and speed is that of eager PyTorch. Metadata (lengths, positions,
  tags) gets no gradient. The recomputation is itself an opaque op (``skiplayers_grad::<op>``), so
  that torch.compile's AOT autograd can trace the backward of a compiled attention op.
* ``compact_rows``: the gradient of ``x[keep]`` scattered back to the kept rows (zeros elsewhere).
* ``cache_append`` and ``cache_compact`` write into cache pages in place, which autograd cannot
  follow: called with K/V that require grad while grad mode is on, they raise instead of dropping
  the gradient (``torch.no_grad()``, ``.detach()`` or ``use_cache=False`` are the ways out).
"""

from __future__ import annotations

import torch

from . import reference
from .schemas import schema_arguments, schema_parameters

_VARLEN_DIFF = ("q", "k", "v")
_CACHE_DIFF = ("q", "k_cache", "v_cache")


def _recompute_grads(fn, diff: dict, fixed: dict, grad_out: torch.Tensor) -> tuple:
    """Gradients of ``fn(**diff, **fixed)`` w.r.t. the tensors of ``diff``, given ``grad_out``."""
    leaves = {name: t.detach().requires_grad_() for name, t in diff.items()}
    with torch.enable_grad():
        out = fn(**leaves, **fixed)
        grads = torch.autograd.grad(out, tuple(leaves.values()), grad_out, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads))


def _save_inputs(names):
    def setup_context(ctx, inputs, output):
        ctx.inputs = dict(zip(names, inputs))

    return setup_context


# The recomputation runs as an opaque op, ``skiplayers_grad::<op>(grad_out, <the op's arguments>)``
# returning the gradients of the op's differentiable inputs: torch.compile's AOT autograd traces a
# registered backward, and the reference's per-sequence loop reads lengths on the host (data-dependent
# sizes it cannot trace). One op per attention op serves every namespace (their schemas are equal).
_GRAD_LIB = torch.library.Library("skiplayers_grad", "DEF")
_GRAD_OPS: set[str] = set()


def _define_recompute_op(namespace: str, op: str, reference_fn, diff_names) -> None:
    if op in _GRAD_OPS:
        return
    names = schema_arguments(op, namespace)
    _GRAD_LIB.define(f"{op}(Tensor grad_out, {schema_parameters(op)}) -> Tensor[]")

    def recompute(grad_out, *args):
        inputs = dict(zip(names, args))
        diff = {n: inputs.pop(n) for n in diff_names}
        return list(_recompute_grads(reference_fn, diff, inputs, grad_out))

    def fake(grad_out, *args):
        inputs = dict(zip(names, args))
        return [torch.empty_like(inputs[n]) for n in diff_names]

    _GRAD_LIB.impl(op, recompute, "CompositeExplicitAutograd")
    torch.library.register_fake(f"skiplayers_grad::{op}", fake, lib=_GRAD_LIB)
    _GRAD_OPS.add(op)


def _attention_backward(op: str, names, diff_names):
    def backward(ctx, grad_out):
        grad_op = getattr(torch.ops.skiplayers_grad, op)
        grads = dict(zip(diff_names, grad_op(grad_out, *(ctx.inputs[n] for n in names))))
        return tuple(grads.get(n) for n in names)

    return backward


def _compact_rows_setup(ctx, inputs, output):
    x, _, keep = inputs
    ctx.keep, ctx.x_shape = keep, x.shape


def _compact_rows_backward(ctx, grad_rows, grad_cu):
    grad_x = grad_rows.new_zeros(ctx.x_shape)
    grad_x[ctx.keep] = grad_rows
    return grad_x, None, None


# The in-place cache ops, and the inputs whose gradient each would drop.
_IN_PLACE = {
    "cache_append": ("k", "v", "k_cache", "v_cache"),
    "cache_compact": ("k_cache", "v_cache"),
}


def _in_place_guard(namespace: str, op_name: str):
    """An Autograd-key kernel for an in-place cache op: refuses inputs whose gradient it would drop,
    otherwise runs the backend kernel below autograd."""
    op = getattr(getattr(torch.ops, namespace), op_name).default
    names = schema_arguments(op_name, namespace)
    guarded = [names.index(n) for n in _IN_PLACE[op_name]]

    def run(*args):
        if torch.is_grad_enabled() and any(args[i].requires_grad for i in guarded):
            raise RuntimeError(
                f"{namespace}::{op_name} writes K/V into cache pages in place and cannot carry their "
                "gradient; call it under torch.no_grad() or on detached tensors (a patched model trains "
                "with use_cache=False)"
            )
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return run


def register_autograd(namespace: str, lib: torch.library.Library) -> None:
    """Registers the backward of every op of ``namespace`` (``skiplayers`` or ``skiplayers_triton``)."""
    varlen, cached = schema_arguments("varlen_attention", namespace), schema_arguments("cache_attention", namespace)
    _define_recompute_op(namespace, "varlen_attention", reference.varlen_attention, _VARLEN_DIFF)
    _define_recompute_op(namespace, "cache_attention", reference.cache_attention, _CACHE_DIFF)
    rules = {
        "varlen_attention": (_attention_backward("varlen_attention", varlen, _VARLEN_DIFF), _save_inputs(varlen)),
        "cache_attention": (_attention_backward("cache_attention", cached, _CACHE_DIFF), _save_inputs(cached)),
        "compact_rows": (_compact_rows_backward, _compact_rows_setup),
    }
    for op, (backward, setup_context) in rules.items():
        torch.library.register_autograd(f"{namespace}::{op}", backward, setup_context=setup_context, lib=lib)
    for op in _IN_PLACE:
        lib.impl(op, _in_place_guard(namespace, op), "Autograd")
