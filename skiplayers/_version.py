"""The package version, in one place: ``skiplayers.__version__``, ``skiplayers --version`` and the
build (pyproject.toml's dynamic version) all read it. Keep it a literal: setuptools reads it from this
file's syntax tree, without importing the package (which needs torch and the compiled extension)."""

__version__ = "0.1.0"
