"""The package version, in one place: ``skiplayers.__version__``, ``skiplayers --version`` and
setup.py all read it (setup.py reads this file without importing the package, which needs torch
and the compiled extension)."""

__version__ = "0.1.0"
