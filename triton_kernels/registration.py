"""Registers the Triton launchers as torch ops in their own namespace, ``skiplayers_triton::<op>``.

Why a second namespace: the CUDA C++ backend registers its kernels for the CUDA dispatch key of
``skiplayers::<op>``; one key of one op holds one kernel, so the Triton kernels live beside them.

Schemas stay in one place: each schema here is read from the C++ definition
(``skiplayers.schemas.schema_text``) with the namespace swapped, and the fake
implementations are ``skiplayers.ops.FAKES``, shared with ``skiplayers::``.

Registration choice: a plain ``Library.impl`` of the launcher for the CUDA key. torch.compile treats
the op as one opaque node (the fake gives it shapes), which is all a fused attention kernel needs,
and the dispatcher adds only a few microseconds per call. ``torch.library.triton_op`` +
``wrap_triton`` would let Inductor see inside the kernels but route every call through the
``custom_op`` machinery; ``benchmarks/README.md`` gives the measured per-call overheads.

Under ``TRITON_INTERPRET=1`` (no GPU) the same launchers are also registered for the CPU key, so
``get_ops("triton")`` runs on CPU tensors through the very same ops; without the interpreter, CPU
tensors get the dispatcher's usual "no kernel for CPU" error rather than a silent fallback.
"""

from __future__ import annotations

import torch

from skiplayers import ops as sk_ops
from skiplayers.autograd import register_autograd
from skiplayers.schemas import schema_text

from .host import INTERPRETED
from .launchers import LAUNCHERS

NAMESPACE = "skiplayers_triton"


_lib = torch.library.Library(NAMESPACE, "DEF")
for _op in sk_ops.OP_NAMES:
    _lib.define(schema_text(_op))
    _lib.impl(_op, LAUNCHERS[_op], "CUDA")
    if INTERPRETED:
        _lib.impl(_op, LAUNCHERS[_op], "CPU")
sk_ops.register_fakes(NAMESPACE, lib=_lib)
register_autograd(NAMESPACE, _lib)
