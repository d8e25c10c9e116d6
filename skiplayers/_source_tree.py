"""Makes ``skiplayers.triton_kernels`` importable from a source checkout.

setup.py installs the repository's top-level ``triton_kernels/`` directory as the subpackage
``skiplayers.triton_kernels`` (a ``package_dir`` mapping, so it never collides with other
distributions' ``triton_kernels``). In a source tree used through ``PYTHONPATH`` nothing performs that
mapping, so this finder does, for that one name only. It goes first on ``sys.meta_path``: the kernels
must come from the same checkout as this ``skiplayers`` package, even when an editable install of
another checkout (whose finder maps the name to *its* directory) is present in the environment.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_NAME = "skiplayers.triton_kernels"
_SOURCE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels")


class _TritonKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        init = os.path.join(_SOURCE_DIR, "__init__.py")
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[_SOURCE_DIR])


def install() -> None:
    """Puts the finder first, when this package is a source checkout (not an installed copy)."""
    installed_here = os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_kernels"))
    if installed_here or not os.path.isdir(_SOURCE_DIR):
        return
    if not any(isinstance(f, _TritonKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _TritonKernelsFinder())
