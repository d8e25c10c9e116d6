"""The ops' schemas, read back from the registration: ``csrc/skiplayers.cpp`` declares every op's
arguments once (one ``TORCH_LIBRARY(skiplayers)`` block), and everything in Python that needs names,
order or text takes them from here: the wrappers and tests (``ops.schema_arguments``), the autograd
rules, and the namespaces that re-register the same schemas (``skiplayers_triton``,
``skiplayers_grad``). The compiled extension must be loaded before these are called."""

from __future__ import annotations

import torch


def _schema(op: str, namespace: str):
    return getattr(getattr(torch.ops, namespace), op).default._schema


def schema_arguments(op: str, namespace: str = "skiplayers") -> tuple[str, ...]:
    """The argument names of ``<namespace>::<op>``, in order."""
    return tuple(a.name for a in _schema(op, namespace).arguments)


def schema_text(op: str) -> str:
    """The schema of ``skiplayers::<op>`` without its namespace: ``"<op>(<arguments>) -> <returns>"``."""
    schema = str(_schema(op, "skiplayers"))
    prefix = "skiplayers::"
    if not schema.startswith(prefix):
        raise RuntimeError(f"unexpected schema for skiplayers::{op}: {schema}")
    return schema[len(prefix):]


def schema_parameters(op: str) -> str:
    """The argument list of ``skiplayers::<op>`` as schema text (what stands between the parentheses)."""
    return schema_text(op).split("(", 1)[1].rsplit(") ->", 1)[0]
