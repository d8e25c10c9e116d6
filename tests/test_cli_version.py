"""``skiplayers.__version__``, ``python -m skiplayers`` and ``--version`` (issue 15, item 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import skiplayers
from skiplayers import cli

ROOT = Path(__file__).resolve().parent.parent  # the checkout whose package the subprocess must import


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "skiplayers", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_version_is_the_one_in_version_file():
    namespace: dict = {}
    exec((ROOT / "skiplayers" / "_version.py").read_text(), namespace)
    assert skiplayers.__version__ == namespace["__version__"]
    assert "__version__" in skiplayers.__all__


def test_python_m_version():
    out = run_module("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"skiplayers {skiplayers.__version__}"


def test_python_m_help_lists_subcommands():
    out = run_module("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: skiplayers")
    for command in ("demo", "calibrate", "prepare-model"):
        assert command in out.stdout


def test_console_script_version(capsys):
    """The ``skiplayers`` script is ``skiplayers.cli:main`` (setup.py's entry point)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"skiplayers {skiplayers.__version__}"
