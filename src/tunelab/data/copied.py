"""Which answer fields the training rows copy verbatim from their input.

An extraction task often copies some answer values verbatim from its input (a name, a city).
Where the training rows copy a JSON field's string value from the input (`text.input_text`, the
last user message) in nearly every row, decoding keeps that field a copy (decoding/copying.py).
This module finds those fields: the data check counts them over the training rows
(`CopyCounter`) and training saves their paths in run.json.

A value is copied when it occurs in the input as whole words (`whole_copy`: "Cy" is no copy of
"Cyrus"). Field paths join keys with dots, with `*` for a list position (`people.*.name`,
`text.field_path`), as the copy constraint's cursor names the value being written.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field

from tunelab.text import field_path, input_text, json_leaves, parse_json_answer

MIN_SHARE = 0.95
"""A field is copied when its value occurs verbatim in the input in at least this share of the
training rows whose answer has it."""
MIN_ROWS = 20
"""...and at least this many training rows have it: a handful of rows proves nothing."""


@dataclass
class CopiedField:
    """One answer field and how often training rows copy it from their input."""

    path: str
    """Keys joined by dots, `*` for a list position."""
    rows: int
    """Training rows whose JSON answer has a string value there."""
    copied: int
    """Of them, rows whose every value there is non-empty and occurs verbatim in the input."""

    @property
    def share(self) -> float:
        return self.copied / self.rows


@dataclass
class CopyCounter:
    """Counts, row by row, which answer fields are copied from the input. A row is kept as a few
    numbers, so the data check can count over its training rows once it knows the split."""

    paths: dict[str, int] = field(default_factory=dict)
    """Field path -> its number in `numbers`."""
    rows: array = field(default_factory=lambda: array("q"))
    numbers: array = field(default_factory=lambda: array("q"))
    copied: array = field(default_factory=lambda: array("b"))
    """Three columns, one entry for every field of every row with a JSON answer: the row, the
    field's number, whether the row copies it."""

    def add(self, row: int, messages: list[dict[str, str]]) -> None:
        """Count the fields of one row (its position in the file's valid rows, and its messages)."""
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        parsed = parse_json_answer(answers[-1]) if answers else None
        if parsed is None:
            return
        source = input_text(messages)
        copied: dict[str, bool] = {}
        for path, value in json_leaves(parsed).items():
            if isinstance(value, str):
                name = field_path(path)
                copied[name] = copied.get(name, True) and bool(value.strip()) and whole_copy(value, source)
        for name, is_copied in copied.items():
            self.rows.append(row)
            self.numbers.append(self.paths.setdefault(name, len(self.paths)))
            self.copied.append(is_copied)

    def fields(self, rows: set[int] | None = None) -> list[CopiedField]:
        """Every field seen in `rows` (all rows when None), most often copied first."""
        seen: Counter = Counter()
        copied: Counter = Counter()
        for row, number, is_copied in zip(self.rows, self.numbers, self.copied):
            if rows is None or row in rows:
                seen[number] += 1
                copied[number] += is_copied
        names = {number: path for path, number in self.paths.items()}
        counted = [CopiedField(names[n], seen[n], copied[n]) for n in seen]
        return sorted(counted, key=lambda f: (-f.share, -f.rows, f.path))

    def copied_fields(self, rows: set[int] | None = None) -> list[CopiedField]:
        """The fields the constraint applies to: copied in at least MIN_SHARE of at least
        MIN_ROWS rows."""
        return [f for f in self.fields(rows) if f.rows >= MIN_ROWS and f.share >= MIN_SHARE]


def describe(fields: list[CopiedField]) -> str:
    """One line for the data check: which fields are copied, how often, and the flag."""
    names = ", ".join(f.path for f in fields)
    shares = " / ".join(f"{f.share:.0%}" for f in fields)
    return (f"{names} {'is' if len(fields) == 1 else 'are'} copied from the input in {shares} of rows: decoding "
            "keeps them substrings of the input; --no-copy-constraint turns it off")


def whole_copy(value: str, source: str) -> bool:
    """Whether `value` occurs in `source` as whole words: not empty, and at one of its places
    neither its first nor its last character continues a word of the source ("Cy" is no copy of
    "Cyrus")."""
    if not value.strip():
        return False
    start = source.find(value)
    while start >= 0:
        end = start + len(value)
        before = source[start - 1] if start else " "
        after = source[end] if end < len(source) else " "
        if not (before.isalnum() and value[0].isalnum()) and not (after.isalnum() and value[-1].isalnum()):
            return True
        start = source.find(value, start + 1)
    return False
