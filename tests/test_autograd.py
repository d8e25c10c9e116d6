"""Gradients are real or refused, never silently missing (issue 14).

The backward of every attention op and of ``compact_rows`` (``skiplayers/autograd.py``) is checked, for
every backend that runs here, against the float64 gradient of the op's pure-PyTorch semantics; that
float64 gradient is itself checked by ``torch.autograd.gradcheck``. The in-place cache ops
(``cache_append``, ``cache_compact``) have no backward: they refuse inputs that require grad under grad
mode, and run under ``torch.no_grad()``. At the model level, a patched tiny LLaMA gives every
parameter the gradient of the same model patched with the pure-PyTorch backend.

Tolerance for gradients (the op_contract rule applied to gradients): a backend's gradient may be
at most twice as far from the float64 gradient as the float32 reference's gradient is, plus
``ATOL[dtype]`` scaled by the gradient's magnitude.
"""

from __future__ import annotations

import pytest
import torch

import cases
import op_contract
import skiplayers as sk
from constants import RULES
from model_helpers import ragged_batch, tiny_llama
from skiplayers import ops as sk_ops
from skiplayers import reference
from skiplayers.meta import Rule

BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.triton)]
_VARLEN_DIFF = ("q", "k", "v")
_CACHE_DIFF = ("q", "k_cache", "v_cache")


def _grads(fn, case: dict, names, diff, compute_dtype=None, grad_seed=0):
    """Gradients of ``sum(fn(...) * w)`` (fixed random ``w``) w.r.t. ``diff``; inputs cast to
    ``compute_dtype`` when given (the float64 truth)."""
    leaves = {}
    args = []
    for name in names:
        value = case[name]
        if name in diff:
            value = value.detach().to(compute_dtype or value.dtype).requires_grad_()
            leaves[name] = value
        args.append(value)
    out = fn(*args)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    (out * weight).sum().backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def _assert_grads_close(got: dict, truth: dict, naive: dict, dtype) -> None:
    for name, g in got.items():
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == dtype and g.shape == truth[name].shape, f"{name}: {g.dtype} {tuple(g.shape)}"
        scale = max(1.0, truth[name].abs().max().item()) if truth[name].numel() else 1.0
        baseline = (naive[name].double() - truth[name]).abs().max().item() if g.numel() else 0.0
        err = (g.double() - truth[name]).abs().max().item() if g.numel() else 0.0
        bound = 2 * baseline + op_contract.ATOL[dtype] * scale
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (naive float32 error {baseline:.3g})"


def _reference_fn(reference_op, compute_dtype):
    return lambda *args: reference_op(*args, compute_dtype=compute_dtype)


def _check_attention_grads(backend: str, op_name: str, case: dict, names, diff, reference_op) -> dict:
    """Asserts the backend's gradients meet the tolerance above, and returns them."""
    ops = sk_ops.get_ops(backend)
    dtype = case["q"].dtype
    got = _grads(getattr(ops, op_name), case, names, diff)
    truth = _grads(_reference_fn(reference_op, torch.float64), case, names, diff, compute_dtype=torch.float64)
    naive = _grads(_reference_fn(reference_op, torch.float32), case, names, diff, compute_dtype=torch.float32)
    _assert_grads_close(got, truth, naive, dtype)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_gradients(backend, rule, dtype):
    case = cases.make_varlen_attention([5, 0, 33], heads=6, kv_heads=2, dtype=dtype, rule=rule, gapped=True, seed=rule)
    _check_attention_grads(backend, "varlen_attention", case, op_contract._VARLEN_ARGS, _VARLEN_DIFF,
                           reference.varlen_attention)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_gradients_with_queries_that_see_nothing(backend):
    """Rows with no visible key output zeros; their gradient is zero, not NaN."""
    case = cases.make_varlen_attention([6], rule=Rule.HIDE_CONTEXT, seed=1)
    case["k_tag"] = torch.ones_like(case["k_tag"])  # every key is context
    got = _grads(sk_ops.get_ops(backend).varlen_attention, case, op_contract._VARLEN_ARGS, _VARLEN_DIFF)
    for name, g in got.items():
        assert torch.equal(g, torch.zeros_like(g)), f"{name} gradient is not zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", [0, Rule.ANCHORS])
@pytest.mark.parametrize("page_size", [16, 3])
def test_cache_attention_gradients(backend, rule, page_size):
    """The gradients of the k_cache / v_cache pools land in the pages the block table names (shuffled
    through the pool); pages no sequence reads, and slots past each length, get zero."""
    case = cases.make_cache_attention([20, 0, 9], [3, 0, 1], page_size=page_size, heads=6, kv_heads=3, rule=rule,
                                      seed=4)
    got = _check_attention_grads(backend, "cache_attention", case, op_contract._CACHE_ARGS, _CACHE_DIFF,
                                 reference.cache_attention)
    read = torch.zeros(case["k_cache"].shape[:2], dtype=torch.bool)
    for b, n in enumerate(case["cache_seqlens"].tolist()):
        read[reference.page_slots(read, case["block_table"], b, 0, n)] = True
    assert (~read).any() and read.any()
    for name in ("k_cache", "v_cache"):
        assert torch.equal(got[name][~read], torch.zeros_like(got[name][~read])), f"{name}: gradient in an unread slot"
        assert got[name][read].abs().sum() > 0, f"{name}: no gradient in the slots read"


def test_reference_attention_gradients_pass_gradcheck_in_float64():
    """The backward differentiates these very functions; gradcheck proves their gradients."""
    case = cases.make_varlen_attention([3, 0, 4], heads=4, kv_heads=2, head_dim=8, rule=Rule.ANCHORS, seed=2)
    fixed = {k: case[k] for k in op_contract._VARLEN_ARGS if k not in _VARLEN_DIFF}

    def varlen(q, k, v):
        return reference.varlen_attention(q, k, v, **fixed, compute_dtype=torch.float64)

    inputs = tuple(case[k].double().requires_grad_() for k in _VARLEN_DIFF)
    assert torch.autograd.gradcheck(varlen, inputs)

    cache = cases.make_cache_attention([5, 3], [2, 1], page_size=2, heads=4, kv_heads=2, head_dim=8,
                                       rule=Rule.HIDE_CONTEXT, seed=3)
    fixed_c = {k: cache[k] for k in op_contract._CACHE_ARGS if k not in _CACHE_DIFF}

    def cached(q, k_cache, v_cache):
        return reference.cache_attention(q, k_cache, v_cache, **fixed_c, compute_dtype=torch.float64)

    inputs = tuple(cache[k].double().requires_grad_() for k in _CACHE_DIFF)
    assert torch.autograd.gradcheck(cached, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_rows_gradient(backend):
    case = cases.make_compact_rows([4, 0, 9], seed=3)
    x = case["x"].clone().requires_grad_()
    out, _ = sk_ops.get_ops(backend).compact_rows(x, case["cu_seqlens"], case["keep"])
    weight = torch.randn(out.shape)
    (out * weight).sum().backward()
    expected = torch.zeros_like(x)
    expected[case["keep"]] = weight
    assert torch.equal(x.grad, expected)


_POOLS = ("k_cache", "v_cache", "pos_cache", "tag_cache")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("grad_input", ["k_cache", "v_cache"])
def test_cache_compact_refuses_caches_that_require_grad(backend, grad_input):
    """cache_compact moves slots inside the pages in place: autograd cannot follow, so a K/V pool that
    requires grad is refused under grad mode (nothing written), and compacted under torch.no_grad()."""
    case = cases.make_cache_compact([5, 0, 7], page_size=2, seed=6)
    case[grad_input] = case[grad_input].clone().requires_grad_()
    before = {name: case[name].detach().clone() for name in _POOLS}
    ops = sk_ops.get_ops(backend)
    args = [case[k] for k in op_contract._COMPACT_ARGS]
    with pytest.raises(RuntimeError, match="cannot carry their gradient"):
        ops.cache_compact(*args)
    for name in _POOLS:
        assert torch.equal(case[name].detach(), before[name]), f"the refused call wrote into {name}"
    ref = dict(case, **{name: before[name].clone() for name in _POOLS})
    want = op_contract.call(reference, "cache_compact", ref)
    with torch.no_grad():  # no graph to lose: allowed
        lengths = ops.cache_compact(*args)
    assert torch.equal(lengths, want) and lengths.tolist() != case["cache_seqlens"].tolist()
    for name in _POOLS:
        for b, n in enumerate(want.tolist()):
            got = reference.gather_slots(case[name].detach(), case["block_table"], b, n)
            assert torch.equal(got, reference.gather_slots(ref[name], case["block_table"], b, n)), f"{name}, {b}"


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("grad_input", ["k", "v", "k_cache", "v_cache"])
def test_cache_append_refuses_inputs_that_require_grad(backend, grad_input):
    """The compiled and Triton kernels write in place where autograd cannot follow. (The ``torch``
    backend is plain indexing, which autograd does follow, so it needs no guard.)"""
    case = cases.make_cache_append([2, 1], [3, 2], page_size=2)
    case[grad_input] = case[grad_input].clone().requires_grad_()
    before = case["k_cache"].detach().clone()
    ops = sk_ops.get_ops(backend)
    args = [case[k] for k in op_contract._APPEND_ARGS]
    with pytest.raises(RuntimeError, match="cannot carry their gradient"):
        ops.cache_append(*args)
    assert torch.equal(case["k_cache"].detach(), before), "the refused call wrote into k_cache"
    with torch.no_grad():
        ops.cache_append(*args)  # no graph to lose: allowed
    written = reference.gather_slots(case["k_cache"].detach(), case["block_table"], 0, 5)[2:5]
    assert torch.equal(written, case["k"][:3].detach())


# --- model level -----------------------------------------------------------------------------------


def _parameter_grads(model, batch, backend: str | None, stop) -> dict:
    ids, attn, ctx, pos = batch
    model.zero_grad(set_to_none=True)
    if backend is None:
        logits = model(ids, attention_mask=attn, position_ids=pos, use_cache=False).logits
    else:
        sk.patch(model, sk.SkipPolicy(context_stop_layer=stop), backend=backend)
        try:
            logits = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=False).logits
        finally:
            sk.unpatch(model)
    last = logits[:, -1]  # always computed (the query's last token)
    weight = torch.randn(last.shape, generator=torch.Generator().manual_seed(0))
    (last * weight).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("stop", [None, 2])
def test_patched_model_gives_every_parameter_its_gradient(backend, stop):
    model = tiny_llama(layers=4)
    batch = ragged_batch()
    got = _parameter_grads(model, batch, backend, stop)
    truth = _parameter_grads(model, batch, "torch", stop)
    missing = [name for name, g in got.items() if g is None]
    assert not missing, f"{len(missing)} of {len(got)} parameters got no gradient: {missing[:5]}"
    for name, g in got.items():
        assert truth[name] is not None
        torch.testing.assert_close(g, truth[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_patched_model_without_context_stop_matches_unpatched_gradients():
    model = tiny_llama(layers=3)
    batch = ragged_batch()
    got = _parameter_grads(model, batch, "cpu", None)
    truth = _parameter_grads(model, batch, None, None)
    for name, g in got.items():
        torch.testing.assert_close(g, truth[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_training_forward_with_a_cache_then_backprop_through_it_is_refused():
    model = tiny_llama(layers=2)
    ids, attn, ctx, pos = ragged_batch()
    sk.patch(model, sk.SkipPolicy(context_stop_layer=1), backend="cpu")
    out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, use_cache=True)  # first call: gradients flow
    out.logits[:, -1].sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    step = torch.ones(ids.shape[0], 1, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="backpropagation through a SkipCache"):
        model(step, attention_mask=torch.cat([attn, step], 1), past_key_values=out.past_key_values, use_cache=True)
    with torch.no_grad():  # inference over the same cache is fine
        model(step, attention_mask=torch.cat([attn, step], 1), past_key_values=out.past_key_values, use_cache=True)
    sk.unpatch(model)


def test_training_loss_over_computed_columns_gives_finite_gradients():
    """Uncomputed columns have NaN logits under autograd too, yet a loss that skips them (labels
    -100) gives finite gradients: the NaN is put in after the lm_head, not into its input."""
    model = tiny_llama(layers=3)
    ids, attn, ctx, pos = ragged_batch()
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(ctx[:, :-1] | (attn[:, :-1] == 0), -100)
    sk.patch(model, sk.SkipPolicy(context_stop_layer=1), backend="cpu")
    try:
        out = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, labels=labels, use_cache=False)
        uncomputed = (attn == 0) | ctx
        assert torch.isnan(out.logits[uncomputed]).all() and torch.isfinite(out.logits[~uncomputed]).all()
        out.loss.backward()
        assert torch.isfinite(out.loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # Labels everywhere (padding and context included): the loss ignores the predictions of
        # uncomputed columns, as if those labels were -100, so it equals the loss above.
        everywhere = model(ids, attention_mask=attn, position_ids=pos, context_mask=ctx, labels=ids.clone(),
                           use_cache=False)
        assert torch.isfinite(everywhere.loss)
        torch.testing.assert_close(everywhere.loss, out.loss)
    finally:
        sk.unpatch(model)
