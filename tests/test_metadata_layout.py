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


def meta_value(name: str) -> int:
    """The Python side of header constant ``name``: ``RULE_X`` is ``meta.Rule.X`` (``RULE_ALL_BITS``
    is ``Rule.ALL``), ``TAG_X`` is ``meta.TAG_X``."""
    if name.startswith("RULE_"):
        return int(meta.Rule[name.removeprefix("RULE_").removesuffix("_BITS")])
    return getattr(meta, name)


def test_meta_py_agrees_with_the_header():
    for name, value in header_constants().items():
        assert meta_value(name) == value, f"skiplayers/meta.py {name} = {meta_value(name)}, visibility.h: {value}"


def test_the_triton_checks_take_the_rule_bits_from_meta():
    """checks.py is read as text (importing it needs triton): it must refuse unknown rule bits with
    ``meta.Rule.ALL`` and define no rule numbers of its own."""
    source = TRITON_CHECKS.read_text()
    assert "Rule.ALL" in source
    tree = ast.parse(source)
    own = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
           if isinstance(t, ast.Name) and t.id.startswith("RULE")]
    assert not own, f"triton_kernels/checks.py defines {own}: take them from skiplayers.meta.Rule"


def test_the_header_rule_mask_is_the_union_of_the_rule_bits():
    header = header_constants()
    assert header["RULE_ALL_BITS"] == header["RULE_HIDE_CONTEXT"] | header["RULE_ANCHORS"]
