"""Few-shot tasks for calibration: a JSONL reader that names bad lines, and built-in tasks.

A task file has one item per line::

    {"instructions": str, "examples": [[src, tgt], ...], "query": str, "answer": str}

Prompts are built exactly as :func:`skiplayers.fewshot_batch` builds them: the instructions and the
examples are context, the query is not. Other keys (an ``"id"``, say) are allowed and ignored.

Built-in tasks (``builtin:NAME``) take their data from Python's standard library at run time
(``calendar``, ``keyword``, ``unicodedata``), so nothing is downloaded and nothing is typed in by
hand; each item gets ``EXAMPLES_PER_ITEM`` examples drawn (seeded) from the task's other items.
"""

from __future__ import annotations

import calendar
import json
import keyword
import random
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

EXAMPLES_PER_ITEM = 5
BUILTIN_PREFIX = "builtin:"


class TaskFileError(ValueError):
    """A task file (or item list) that cannot be used; the message names the line."""


@dataclass(frozen=True)
class TaskItem:
    instructions: str
    examples: tuple[tuple[str, str], ...]
    query: str
    answer: str
    line: int | None = None  # 1-based line of the task file, None for items made in code

    def where(self, index: int) -> str:
        return f"line {self.line}" if self.line is not None else f"item {index}"

    def to_json(self) -> dict:
        return {"instructions": self.instructions, "examples": [list(e) for e in self.examples],
                "query": self.query, "answer": self.answer}


def _item_from_obj(obj, where: str, line: int | None) -> TaskItem:
    if not isinstance(obj, dict):
        raise TaskFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("instructions", "examples", "query", "answer") if k not in obj]
    if missing:
        raise TaskFileError(f"{where}: missing key(s) {', '.join(missing)}")
    for key in ("instructions", "query", "answer"):
        if not isinstance(obj[key], str):
            raise TaskFileError(f"{where}: {key!r} must be a string, got {type(obj[key]).__name__}")
    examples = obj["examples"]
    if not isinstance(examples, list):
        raise TaskFileError(f"{where}: 'examples' must be a list of [source, target] pairs")
    for k, pair in enumerate(examples):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise TaskFileError(f"{where}: examples[{k}] must be a [source, target] pair of strings, got {pair!r}")
    if not obj["query"].strip():
        raise TaskFileError(f"{where}: the query is empty (a prompt must end with a query: context stop "
                            "cannot drop a context that the model still has to read the answer from)")
    return TaskItem(obj["instructions"], tuple((s, t) for s, t in examples), obj["query"], obj["answer"], line)


def parse_jsonl(lines: Iterable[str], source: str = "tasks") -> list[TaskItem]:
    """Items of a JSONL text (blank lines are skipped; line numbers count every line)."""
    items = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise TaskFileError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        items.append(_item_from_obj(obj, where, number))
    if not items:
        raise TaskFileError(f"{source}: no items (the file is empty)")
    return items


def load_tasks(spec: str | Path) -> tuple[str, list[TaskItem]]:
    """``(name, items)`` from a JSONL path or ``builtin:NAME``."""
    spec = str(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        return name, builtin_task(name)
    path = Path(spec)
    if not path.is_file():
        raise TaskFileError(f"{spec}: no such file (built-in tasks: "
                            f"{', '.join(BUILTIN_PREFIX + n for n in BUILTIN_TASKS)})")
    with open(path, encoding="utf-8") as f:
        return path.stem, parse_jsonl(f, source=str(path))


def coerce_items(items) -> list[TaskItem]:
    """TaskItems from TaskItems or dicts in the JSONL schema (checked like file lines)."""
    out = [it if isinstance(it, TaskItem) else _item_from_obj(it, f"item {i}", None) for i, it in enumerate(items)]
    if not out:
        raise TaskFileError("no items")
    return out


# --- built-in tasks ---------------------------------------------------------------------------


def _fewshot_items(pairs: list[tuple[str, str]], instructions: str, seed: int = 0,
                   k: int = EXAMPLES_PER_ITEM) -> list[TaskItem]:
    """One item per pair; its examples are k other pairs, drawn with a seeded generator."""
    rng = random.Random(seed)
    items = []
    for i, (src, tgt) in enumerate(pairs):
        others = [p for j, p in enumerate(pairs) if j != i]
        items.append(TaskItem(instructions, tuple(rng.sample(others, k)), src, tgt))
    return items


def _number_names() -> dict[int, str]:
    """1..50 in English words, from the Unicode names of the circled numbers
    (U+2460.., U+3251.., U+32B1..: 'CIRCLED NUMBER TWENTY ONE')."""
    names = {}
    for start, stop in ((0x2460, 0x2474), (0x3251, 0x3260), (0x32B1, 0x32C0)):
        for cp in range(start, stop):
            char = chr(cp)
            words = unicodedata.name(char).split()[2:]  # drop 'CIRCLED DIGIT|NUMBER'
            names[int(unicodedata.numeric(char))] = "-".join(words).lower()  # 'twenty-one'
    return names


def number_words() -> list[TaskItem]:
    """'17' -> 'seventeen', 1..40 (the words come from unicodedata)."""
    names = _number_names()
    pairs = [(str(n), names[n]) for n in range(1, 41)]
    return _fewshot_items(pairs, "Write each number in English words.")


def uppercase() -> list[TaskItem]:
    """A lowercase word -> the same word in capitals: Python's keywords, then month names."""
    words = [w for w in keyword.kwlist if w.isalpha() and w.islower()]
    words += [m.lower() for m in calendar.month_name[1:]]
    return _fewshot_items([(w, w.upper()) for w in words[:40]], "Write each word in capital letters.")


def next_month_or_day() -> list[TaskItem]:
    """'March' -> 'April', 'Friday' -> 'Saturday' (calendar's English names; wraps around)."""
    months, days = list(calendar.month_name[1:]), list(calendar.day_name)
    pairs = [(m, months[(i + 1) % 12]) for i, m in enumerate(months)]
    pairs += [(d, days[(i + 1) % 7]) for i, d in enumerate(days)]
    return _fewshot_items(pairs, "Name the month or day that comes after the given one.")


BUILTIN_TASKS: dict[str, Callable[[], list[TaskItem]]] = {
    "number_words": number_words,
    "uppercase": uppercase,
    "next_month_or_day": next_month_or_day,
}


def builtin_task(name: str) -> list[TaskItem]:
    if name not in BUILTIN_TASKS:
        raise TaskFileError(f"no built-in task {name!r}; built-in tasks: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]()
