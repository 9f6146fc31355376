"""Which answer fields, and whether the names of plain-text answers, the training rows copy from their input.

An extraction task often copies some answer values verbatim from its input (a name, a city).
Where the training rows copy a JSON field's string value from the input (`text.input_text`, the
last user message) in nearly every row, decoding keeps that field a copy (decoding/copying.py).
This module finds those fields: the data check counts them over the training rows
(`CopyCounter`) and training saves their paths in run.json.

A value is copied when it occurs in the input as whole words (`whole_copy`: "Cy" is no copy of
"Cyrus"). Field paths join keys with dots, with `*` for a list position (`people.*.name`,
`text.field_path`), as the copy constraint's cursor names the value being written.

Plain-text answers have no fields; what they copy is their names and numbers (`name_words`:
words that start with a capital letter or a digit), re-cased at will ("kwame oyelaran" ->
"Kwame Oyelaran"). A row copies when each of its answer's name words is a word of its input,
compared case-folded and word by word (so punctuation around or inside a name is free), or one
of the house style's own words (`HouseWords`: a sentence's first "The", a "Summary:" label, a
number every answer writes). Where nearly every training row with such words copies them, the
pseudo-field TEXT_ANSWER joins the copied fields, and decoding keeps those words copies too.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tunelab.text import input_text, parse_json_answer

MIN_SHARE = 0.95
"""A field is copied when its value occurs verbatim in the input in at least this share of the
training rows whose answer has it."""
MIN_ROWS = 20
"""...and at least this many training rows have it: a handful of rows proves nothing."""
TEXT_ANSWER = "(text)"
"""The copied field that stands for the name words of plain-text answers (run.json lists it among
the copied fields when the training rows copy them); no JSON path is written so."""
HOUSE_SHARE = 0.05
"""A name word that answers write without their input holding it, in at least this share of the
rows with plain-text answers (and two rows at least), is the house style's own, not a name."""

WORD = re.compile(r"[^\W\d_]+|\d+")
"""A word, as names are compared: a run of letters or of digits ("4pm" is "4" and "pm", so the
"4" an answer writes copies it)."""


def is_name_word(word: str) -> bool:
    """Whether a word may be a name or a number: it starts with a digit, or with a capital letter
    and has more (a lone "I", "A" or initial is no name to check)."""
    return word[:1].isdigit() or (word[:1].isupper() and len(word) > 1)


def name_words(text: str) -> list[str]:
    """The words of `text` (`WORD`) that may be names or numbers."""
    return [w for w in WORD.findall(text) if is_name_word(w)]


def folded_words(text: str) -> set[str]:
    """The words of `text`, case-folded: what a name word of an answer is looked up in."""
    return {w.casefold() for w in WORD.findall(text)}


@dataclass
class HouseWords:
    """Counts, over plain-text answers, the words that a house style writes by itself: every word
    an answer writes in lower case (so a sentence's first "The" is no name), and each name word
    that answers write though their input lacks it, with the rows that do (a greeting's "Hello",
    a "Summary" label, a year every answer states) and the ways they write it."""

    lower: set[str] = field(default_factory=set)
    unsourced: Counter = field(default_factory=Counter)
    written: dict[str, set[str]] = field(default_factory=dict)
    """Of each word of `unsourced` (case-folded), the forms the answers write it in."""
    rows: int = 0
    """Rows with a plain-text answer."""

    def add(self, answer: str, source: set[str]) -> None:
        """Count one answer, `source` being its input's `folded_words`."""
        self.rows += 1
        words = WORD.findall(answer)
        self.lower.update(w.casefold() for w in words if w.islower())
        unsourced = [w for w in words if is_name_word(w) and w.casefold() not in source]
        self.unsourced.update({w.casefold() for w in unsourced})
        for word in unsourced:
            self.written.setdefault(word.casefold(), set()).add(word)

    def join(self, other: HouseWords) -> None:
        """Add the counts of `other` (of other rows)."""
        self.lower |= other.lower
        self.unsourced += other.unsourced
        for word, forms in other.written.items():
            self.written.setdefault(word, set()).update(forms)
        self.rows += other.rows

    def _frequent(self) -> set[str]:
        least = max(2, HOUSE_SHARE * self.rows)
        return {w for w, rows in self.unsourced.items() if rows >= least}

    def words(self) -> frozenset[str]:
        """The house words, case-folded."""
        return frozenset(self.lower | self._frequent())

    def forms(self) -> frozenset[str]:
        """The house words as the answers write them: the lower-case ones, and the forms of the
        others ("The", "Summary", "USD")."""
        return frozenset(self.lower | {form for word in self._frequent() for form in self.written[word]})


def house_words(rows: Iterable[list[dict[str, str]]]) -> frozenset[str]:
    """The house words (`HouseWords`) of the plain-text answers of these rows' messages, as the
    answers write them (`HouseWords.forms`; the decode-time rule keeps their case, eval's count
    folds it)."""
    house = HouseWords()
    for messages in rows:
        answer = _text_answer(messages)
        if answer is not None:
            house.add(answer, folded_words(input_text(messages)))
    return house.forms()


def _text_answer(messages: list[dict[str, str]]) -> str | None:
    """The last answer of a row when it is plain text (not JSON), else None."""
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    return answers[-1] if answers and parse_json_answer(answers[-1]) is None else None


def _string_leaves(value: dict | list, path: str | None, found: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(field path, value) of each string leaf of a JSON object or list, in document order: the
    string leaves of `text.json_leaves` named by `text.field_path`, without the tuple paths those
    build for every row of the data check (`path`: the field path so far, None at the top)."""
    items = value.items() if isinstance(value, dict) else (("*", item) for item in value)
    for key, item in items:
        name = key if path is None else f"{path}.{key}"
        if isinstance(item, str):
            found.append((name, item))
        elif isinstance(item, (dict, list)):
            _string_leaves(item, name, found)
    return found


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
    house: HouseWords = field(default_factory=HouseWords)
    words: dict[str, int] = field(default_factory=dict)
    """Name word (case-folded) -> its number in `name_numbers`."""
    name_rows: array = field(default_factory=lambda: array("q"))
    name_numbers: array = field(default_factory=lambda: array("q"))
    name_copied: array = field(default_factory=lambda: array("b"))
    """Three columns, one entry for every name word of every plain-text answer: the row, the
    word's number, whether the row's input holds the word."""

    def add(self, row: int, messages: list[dict[str, str]]) -> None:
        """Count the fields of one row (its position in the file's valid rows, and its messages)."""
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if answers:
            self.add_answer(row, answers[-1], parse_json_answer(answers[-1]), input_text(messages))

    def add_answer(self, row: int, answer: str, parsed, source: str) -> None:
        """`add` of a row given its last answer, that answer's `parse_json_answer` and its
        `input_text`: the data check parses each answer once, for this and for novelty.py."""
        if parsed is None:
            self._add_text(row, answer, folded_words(source))
            return
        copied: dict[str, bool] = {}
        for name, value in _string_leaves(parsed, None, []):
            copied[name] = copied.get(name, True) and bool(value.strip()) and whole_copy(value, source)
        for name, is_copied in copied.items():
            self.rows.append(row)
            self.numbers.append(self.paths.setdefault(name, len(self.paths)))
            self.copied.append(is_copied)

    def extend(self, part: CopyCounter, offset: int) -> None:
        """Append the counts of `part`, a counter of the rows that follow this one's (`offset` of
        them): the data check counts a large file in parts and joins them in file order."""
        import numpy as np

        self.house.join(part.house)
        for names, mine, rows, numbers, copied, theirs in (
                (part.paths, self.paths, part.rows, part.numbers, part.copied, (self.rows, self.numbers, self.copied)),
                (part.words, self.words, part.name_rows, part.name_numbers, part.name_copied,
                 (self.name_rows, self.name_numbers, self.name_copied))):
            # The numbers of `part` follow the order it met the fields (or words) in, as this counter's do.
            renumber = np.array([mine.setdefault(name, len(mine)) for name in names], np.int64)
            theirs[0].frombytes((np.frombuffer(rows, np.int64) + offset).tobytes())
            theirs[1].frombytes(renumber[np.frombuffer(numbers, np.int64)].tobytes() if len(numbers) else b"")
            theirs[2].extend(copied)

    def _add_text(self, row: int, answer: str, source: set[str]) -> None:
        self.house.add(answer, source)
        for word in dict.fromkeys(w.casefold() for w in name_words(answer)):
            self.name_rows.append(row)
            self.name_numbers.append(self.words.setdefault(word, len(self.words)))
            self.name_copied.append(word in source)

    def fields(self, rows=None) -> list[CopiedField]:
        """Every field seen in `rows` (all rows when None; else a set of row numbers, or a boolean
        numpy array over them), most often copied first; TEXT_ANSWER among them when plain-text
        answers there write name words that are not house words. Counted in numpy: a million rows'
        fields in a Python loop took a second."""
        import numpy as np

        numbers, copied = np.frombuffer(self.numbers, np.int64), np.frombuffer(self.copied, np.int8).astype(bool)
        chosen = _chosen(rows, self.rows)
        if chosen is not None:
            numbers, copied = numbers[chosen], copied[chosen]
        seen = np.bincount(numbers, minlength=len(self.paths))
        copies = np.bincount(numbers[copied], minlength=len(self.paths))
        counted = [CopiedField(path, int(seen[n]), int(copies[n])) for path, n in self.paths.items() if seen[n]]
        text = self._text_field(rows)
        return sorted(counted + ([text] if text else []), key=lambda f: (-f.share, -f.rows, f.path))

    def _text_field(self, rows) -> CopiedField | None:
        """The plain-text answers as one field: the rows whose answer writes a name word that is no
        house word, and of them those whose input holds every such word. House words are counted
        over all rows (the streaming pass does not know the split yet)."""
        import numpy as np

        house = self.house.words()
        named_word = np.array([word not in house for word in self.words], bool)  # by number: the dict's order
        row_of, numbers = np.frombuffer(self.name_rows, np.int64), np.frombuffer(self.name_numbers, np.int64)
        counted = named_word[numbers]
        chosen = _chosen(rows, self.name_rows)
        if chosen is not None:
            counted &= chosen
        named = np.unique(row_of[counted])
        invented = np.unique(row_of[counted & ~np.frombuffer(self.name_copied, np.int8).astype(bool)])
        return CopiedField(TEXT_ANSWER, len(named), len(named) - len(invented)) if len(named) else None

    def copied_fields(self, rows=None) -> list[CopiedField]:
        """The fields the constraint applies to (`constrained`) among `fields(rows)`."""
        return constrained(self.fields(rows))


def constrained(fields: list[CopiedField]) -> list[CopiedField]:
    """Of `fields`, those the copy constraint applies to: copied in at least MIN_SHARE of at least
    MIN_ROWS rows."""
    return [f for f in fields if f.rows >= MIN_ROWS and f.share >= MIN_SHARE]


def _chosen(rows, row_of: array):
    """Which entries of a row column (`row_of`) belong to `rows` (see `CopyCounter.fields`); None: all."""
    import numpy as np

    if rows is None:
        return None
    row_of = np.frombuffer(row_of, np.int64)
    if isinstance(rows, np.ndarray):
        return rows[row_of]
    return np.isin(row_of, np.fromiter(rows, np.int64, len(rows)))


def describe(fields: list[CopiedField]) -> str:
    """One line for the data check: which fields are copied, how often, and the flag."""
    parts = []
    json_fields = [f for f in fields if f.path != TEXT_ANSWER]
    if json_fields:
        names = ", ".join(f.path for f in json_fields)
        shares = " / ".join(f"{f.share:.0%}" for f in json_fields)
        parts.append(f"{names} {'is' if len(json_fields) == 1 else 'are'} copied from the input in {shares} of rows: "
                     "decoding keeps them substrings of the input")
    for text in (f for f in fields if f.path == TEXT_ANSWER):
        parts.append(f"names and numbers in answers are copied from the input in {text.share:.0%} of rows: decoding "
                     "keeps them words of the input")
    return "; ".join(parts) + "; --no-copy-constraint turns it off"


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
