"""What each backend supports, as one table, and the parametrisation of the op tests derived from it.

A test in ``tests/test_ops.py`` declares its cases and what it needs; ``over_backends`` crosses them
with every backend that has what it needs and drops the cases that backend cannot take or cannot
afford. No test branches on a backend's name.

Case sizes: the Triton interpreter runs every program in Python, and the CPU kernels (and the float64
reference the tolerance policy computes on the host) are far slower than a GPU. A case value may be
wrapped in ``sized(CPU, value)`` (too big for the interpreter) or ``sized(GPU, value)`` (too big for
the CPU suite as well); each backend runs the cases up to its ``max_size``.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import pytest
import torch

from skiplayers.triton_kernels import configs as triton_configs  # torch only: no triton import here

INTERPRETER, CPU, GPU = 0, 1, 2  # case sizes: run by the interpreter, by the CPU kernels, on a GPU only

HAS_GPU = torch.cuda.is_available()
# tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton when there is no GPU.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# SKIPLAYERS_CUDA_KERNELS=next: the CUDA backend runs its next kernel generation
# (csrc/cuda/kernel_generation.h), which also takes head dims 96 and 256.
CUDA_NEXT = os.environ.get("SKIPLAYERS_CUDA_KERNELS") == "next"


@dataclass(frozen=True)
class Backend:
    """One row of the table.

    ``features``:
      * ``compared``: its outputs are compared with ``skiplayers/reference.py`` (not the reference);
      * ``validates``: refuses bad shapes / dtypes / bits with the messages of ``op_checks.h``;
      * ``split_k``: ``cache_attention`` splits the keys by ``num_splits``;
      * ``skips_ruled_out_blocks``: key blocks no query can see are neither loaded nor computed;
      * ``registered``: its ops are registered torch ops (``opcheck`` applies), in ``namespace``;
      * ``refuses_host_tensors``: a CPU tensor among its CUDA inputs is refused with a message.
    ``host_value_checks``: the metadata *value* checks (``BAD_VALUES`` of test_ops.py) it makes on the
    host and raises for; CUDA makes the others on the device (tests/test_cuda_graphs_and_asserts.py).
    ``head_dims``: the attention head dims it takes (None: any); ``head_dim_refusal`` the message
    (``str.format`` with the head dim) for the others.
    """

    name: str
    device: str
    max_size: int
    features: frozenset
    marks: tuple = ()
    head_dims: tuple | None = None
    head_dim_refusal: str | None = None
    namespace: str | None = None
    host_value_checks: frozenset = frozenset()

    def param(self, *values):
        return pytest.param(self.name, *values, marks=self.marks)


_VALUE_CHECKS = frozenset({"cu_seqlens_q_decreasing", "cu_seqlens_k_short", "append_overflow", "length_past_capacity",
                           "unassigned_page", "rows_cu_seqlens"})

BACKENDS = {
    b.name: b
    for b in (
        # The reference itself: only tests that check a property directly, not against the reference.
        Backend("torch", "cpu", CPU, frozenset()),
        Backend("cpu", "cpu", CPU, frozenset({"compared", "validates", "split_k", "registered"}),
                namespace="skiplayers", host_value_checks=_VALUE_CHECKS),
        # The same tests run the compiled kernels on CUDA tensors where there is a GPU. Value checks
        # read the metadata on the host: always under the interpreter, with SKIPLAYERS_TRITON_CHECKS=1
        # on a GPU (the tests that check them set it).
        Backend("triton", "cpu" if TRITON_INTERPRETED else "cuda", INTERPRETER if TRITON_INTERPRETED else GPU,
                frozenset({"compared", "validates", "split_k", "skips_ruled_out_blocks", "registered"}),
                marks=(pytest.mark.triton,), head_dims=triton_configs.HEAD_DIMS,
                head_dim_refusal=triton_configs.HEAD_DIM_REFUSAL,
                namespace="skiplayers_triton", host_value_checks=_VALUE_CHECKS),
        Backend("cuda", "cuda", GPU,
                frozenset({"compared", "validates", "split_k", "registered", "refuses_host_tensors"}),
                marks=(pytest.mark.cuda,), head_dims=(64, 96, 128, 256) if CUDA_NEXT else (64, 128),
                head_dim_refusal=(r"head_dim must be 64, 96, 128 or 256, got {}" if CUDA_NEXT
                                  else r"head_dim must be 64 or 128, got {}"),
                namespace="skiplayers",
                # compact_rows reads its kept count back anyway (its output size); the paged cache
                # ops never sync: lengths and block table entries are checked on the device.
                host_value_checks=frozenset({"rows_cu_seqlens"})),
    )
}


@dataclass(frozen=True)
class Sized:
    """A case value that only backends with ``max_size >= size`` run."""

    size: int
    value: object


def sized(size: int, *values) -> list[Sized]:
    """``[*sized(CPU, v, w)]``: the values ``v`` and ``w``, too big for backends below ``size``."""
    return [Sized(size, v) for v in values]


class together(tuple):
    """Values of several consecutive argnames that vary together along one ``grid`` axis."""

    def __new__(cls, *values):
        return super().__new__(cls, values)


def _unwrap(value) -> tuple[int, object]:
    return (value.size, value.value) if isinstance(value, Sized) else (INTERPRETER, value)


def grid(*axes) -> list[tuple]:
    """The product of ``axes`` (each an iterable of values, some ``Sized``), as cases whose size is the
    largest of their values'."""
    cases = []
    for combo in itertools.product(*axes):
        sizes, values = zip(*map(_unwrap, combo), strict=True)
        flat = [x for v in values for x in (v if isinstance(v, together) else (v,))]
        cases.append(Sized(max(sizes), tuple(flat)))
    return cases


# Argnames whose values a backend may not take, and how the table decides.
_FILTERS = {
    "head_dim": lambda b, v: b.head_dims is None or v in b.head_dims,  # an attention head dim it takes
    "refused_head_dim": lambda b, v: b.head_dims is not None and v not in b.head_dims,  # one it refuses
    "check": lambda b, v: v in b.host_value_checks,  # a metadata value check it makes on the host
}


def _takes(backend: Backend, names: tuple[str, ...], values: tuple) -> bool:
    return all(_FILTERS[n](backend, v) for n, v in zip(names, values, strict=True) if n in _FILTERS)


def over_backends(argnames: str = "", cases=((),), needs: tuple[str, ...] = ("compared",)):
    """``pytest.mark.parametrize("ops," + argnames, ...)``: every case (a value, a tuple of values, or
    a ``Sized`` one, e.g. from ``grid``) on every backend that has the ``needs`` features, takes it
    (``_FILTERS``) and affords it (``max_size``). ``ops`` is the fixture of tests/conftest.py (the
    backend's OpSet); the ``backend`` fixture gives the table row. Without arguments: one case."""
    names = tuple(n.strip() for n in argnames.split(",")) if argnames else ()
    params = []
    for backend in BACKENDS.values():
        if not set(needs) <= backend.features:
            continue
        for case in cases:
            size, values = _unwrap(case)
            values = values if len(names) != 1 else (values,)
            values = tuple(_unwrap(v)[1] for v in values)
            if size <= backend.max_size and _takes(backend, names, values):
                params.append(backend.param(*values))
    return pytest.mark.parametrize(("ops", *names), params, indirect=["ops"])


def triton_device() -> str:
    """The device the Triton ops run on here ("cpu" under the interpreter); raises when triton was
    imported in a way these tests cannot run (imports triton: call it from Triton test files only)."""
    import triton
    import triton.language as tl

    from skiplayers.triton_kernels import registration

    if registration.INTERPRETED != TRITON_INTERPRETED:
        raise RuntimeError(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} but triton runs "
                           f"{'interpreted' if registration.INTERPRETED else 'compiled'}")
    if not registration.INTERPRETED and not HAS_GPU:
        raise RuntimeError("the Triton kernels were imported without TRITON_INTERPRET=1 on a machine without a GPU")
    if registration.INTERPRETED and isinstance(tl.standard.max, triton.runtime.JITFunction):
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set, so the interpreter cannot run "
                           "triton.language's own helpers; set it in the environment (tests/conftest.py does so)")
    return "cpu" if registration.INTERPRETED else "cuda"
