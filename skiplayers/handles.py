"""Handles: small tensors that name a Python object (a patched decoder, a SkipCache) so that an
opaque custom op can find it at run time (``patching/traced.py``).

A compiled graph cannot carry Python objects, but it can carry tensors, and a tensor input does not
specialise the graph on its value: one compiled graph serves every cache. A handle is an int64
``[1]`` CPU tensor holding a key into a weak registry (the object is not kept alive by it).
"""

from __future__ import annotations

import itertools
import weakref

import torch

_LIVE: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def new_handle(obj) -> torch.Tensor:
    key = next(_KEYS)
    _LIVE[key] = obj
    return torch.tensor([key], dtype=torch.int64)


def lookup(handle: torch.Tensor):
    obj = _LIVE.get(int(handle[0]))
    if obj is None:
        raise RuntimeError("a skiplayers handle names an object that no longer exists")
    return obj
