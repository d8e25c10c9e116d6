"""pytest plugin for scripts/sanitize.sh (loaded with ``-p _sanitize_plugin``).

Refuses to run the tests unless the process really is sanitized: the ASan runtime is mapped (it
was preloaded) and ``skiplayers._C`` is the sanitized build named by ``SKIPLAYERS_SANITIZED_SO``,
not the checkout's normal extension. Prints both in the test header.
"""

from __future__ import annotations

import os

import pytest


def _mapped_runtimes() -> list[str]:
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "san.so" in line}
    return sorted(p for p in paths if os.path.basename(p).startswith(("libasan", "libubsan")))


def pytest_configure(config):
    import skiplayers._C as ext

    want = os.environ.get("SKIPLAYERS_SANITIZED_SO")
    got = os.path.realpath(ext.__file__)
    runtimes = _mapped_runtimes()
    if not want or got != os.path.realpath(want):
        raise pytest.UsageError(f"sanitize: skiplayers._C is {got}, not the sanitized build {want}")
    if not any("libasan" in p for p in runtimes):
        raise pytest.UsageError("sanitize: the ASan runtime is not loaded (LD_PRELOAD missing?)")
    config._sanitize_header = [f"sanitized skiplayers._C: {got}", f"sanitizer runtimes: {', '.join(runtimes)}"]


def pytest_report_header(config):
    return getattr(config, "_sanitize_header", None)
