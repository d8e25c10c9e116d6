"""The tag / rule bit layout is written in C++ (``csrc/include/skiplayers/visibility.h``, the source
of truth), Python (``skiplayers/meta.py``) and Triton (``triton_kernels/checks.py``): this test
reads the header and fails when any of the others says something else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import skiplayers.meta as meta

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "skiplayers" / "visibility.h"
TRITON_CHECKS = ROOT / "triton_kernels" / "checks.py"


def _python_name(cpp_name: str) -> str:
    """``kTagSentenceShift`` -> ``TAG_SENTENCE_SHIFT``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cpp_name[1:]).upper()


def header_constants() -> dict[str, int]:
    """``constexpr <int type> k<Name> = <ints and earlier names joined by |>;`` of the header,
    evaluated, under their Python names."""
    values: dict[str, int] = {}
    for name, expr in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([^;]+);", HEADER.read_text()):
        value = 0
        for term in expr.split("|"):
            term = term.strip()
            value |= int(term, 0) if term[0].isdigit() else values[_python_name(term)]
        values[_python_name(name)] = value
    return values


def test_the_header_defines_the_layout():
    assert set(header_constants()) >= {"TAG_CONTEXT", "TAG_ANCHOR", "TAG_SINK", "TAG_SENTENCE_SHIFT",
                                       "RULE_HIDE_CONTEXT", "RULE_ANCHORS", "RULE_ALL_BITS"}


def test_meta_py_agrees_with_the_header():
    for name, value in header_constants().items():
        if name == "RULE_ALL_BITS":
            assert meta.RULE_HIDE_CONTEXT | meta.RULE_ANCHORS == value
            continue
        assert getattr(meta, name) == value, f"skiplayers/meta.py {name} = {getattr(meta, name)}, visibility.h: {value}"


def test_the_triton_checks_agree_with_the_header():
    """checks.py is read as text (importing it needs triton): its RULE_ALL_BITS must be the header's
    kRuleAllBits, built from meta's names."""
    tree = ast.parse(TRITON_CHECKS.read_text())
    assigned = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    expr = assigned["RULE_ALL_BITS"]
    names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
    value = eval(compile(ast.Expression(expr), str(TRITON_CHECKS), "eval"), {n: getattr(meta, n) for n in names})
    assert value == header_constants()["RULE_ALL_BITS"]
