"""How new the held-out answers are to training, and how each contender does on the new ones.

A random split of rows that share names, cities or products holds out answers whose values
training already showed, so the held-out loss and accuracy measure recall, not copying what is
new. This module says how novel the held-out set is:

- an answer's *values* are the leaves of a JSON answer (strings and numbers; true, false and
  null say nothing about copying), or the quoted spans ("...", '...', “...”) of a plain-text
  answer; a plain-text answer without quotes has no values, since its words are no fixed set
  of entities (it counts under `without_values`);
- values compare as `text.normalise_answer` leaves them (case, punctuation and extra spaces
  aside), whatever field holds them;
- a held-out value is *novel* when no training answer holds it; a held-out row is "novel" when
  it holds at least one novel value, "seen" when all its values occur in training, "none"
  without values.

The data check keeps only 64-bit hashes of the values (`value_hashes`), so it stays bounded in
memory; evaluation uses the same hashes, and scores the two kinds of rows apart
(`evaluate.metrics.accuracy_by_kind`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from tunelab.text import normalise_answer, parse_json_answer, quoted_spans

KINDS = ("novel", "seen", "none")
FAMILIAR_ROWS = 0.8
"""Share of held-out rows holding only seen values from which the data check warns..."""
MANY_VALUES = 50
"""...when training answers hold at least this many distinct values (fewer is a label set, such
as a classification's classes, where every held-out value is rightly a seen one)."""


def compared_values(answer: str) -> list[str]:
    """The values of one answer as novelty compares them (see the module's docstring): normalised,
    none empty, in order. Unlike `text.answer_values`, a JSON answer's numbers count too: a
    held-out price or room number that training already showed is as familiar as a name."""
    values = [normalise_answer(v) for v in _raw_values(answer, parse_json_answer(answer))]
    return [v for v in values if v]


def value_hashes(answer: str) -> list[int]:
    """64-bit hashes of `compared_values`, distinct, for sets that stay small in memory."""
    return parsed_value_hashes(answer, parse_json_answer(answer))


def parsed_value_hashes(answer: str, parsed) -> list[int]:
    """`value_hashes` of an answer whose `text.parse_json_answer` the caller has already made (the
    data check, which parses each answer once for this and for its copied fields)."""
    hashes = dict.fromkeys(map(_value_hash, _raw_values(answer, parsed)))
    hashes.pop(None, None)
    return list(hashes)


def _raw_values(answer: str, parsed) -> list[str]:
    if parsed is None:
        return quoted_spans(answer)
    return _leaf_values(parsed, [])


def _leaf_values(container: dict | list, found: list[str]) -> list[str]:
    """The string and number leaves of a JSON object or list as text, in document order: the
    values of `text.json_leaves` without the paths it would build for every row of the check."""
    for item in container.values() if isinstance(container, dict) else container:
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, (dict, list)):
            _leaf_values(item, found)
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            found.append(str(item))
    return found


@functools.lru_cache(maxsize=1 << 16)
def _value_hash(value: str) -> int | None:
    """The hash of a value as `compared_values` leaves it (None: nothing left), remembered: the
    data check meets the same days, times and names in row after row (~2x faster on a million)."""
    normalised = normalise_answer(value)
    return int.from_bytes(hashlib.blake2b(normalised.encode(), digest_size=8).digest(), "big") if normalised else None


@dataclass
class Novelty:
    """How many held-out answer values (and rows) training never showed."""

    values: int = 0
    """Distinct values per held-out answer, summed over the held-out rows."""
    novel_values: int = 0
    """Of those, the values no training answer holds."""
    novel_rows: int = 0
    """Held-out rows with at least one novel value."""
    seen_rows: int = 0
    """Held-out rows whose every value occurs in a training answer."""
    without_values: int = 0
    """Held-out rows whose answer has no values (plain text without quoted spans, raw text)."""
    training_values: int = 0
    """Distinct values in the training answers."""
    kinds: list[str] = field(default_factory=list)
    """Per held-out row, in order: "novel", "seen" or "none"."""

    @property
    def share(self) -> float | None:
        """Novel values over values; None when the held-out answers have none."""
        return self.novel_values / self.values if self.values else None

    def to_dict(self) -> dict:
        return {"values": self.values, "novel_values": self.novel_values, "share": self.share,
                "novel_rows": self.novel_rows, "seen_rows": self.seen_rows, "rows_without_values": self.without_values,
                "training_values": self.training_values}

    def describe(self) -> str:
        """One line for the data check and `tunelab eval`."""
        if not self.values:
            return "no answer values to compare (answers are plain text without quoted spans)"
        rows = self.novel_rows + self.seen_rows
        return (f"{self.share:.0%} of {self.values} held-out answer values never occur in a training answer; "
                f"{self.novel_rows} of {rows} held-out rows hold one")

    def looks_familiar(self) -> bool:
        """The held-out answers mostly repeat training values drawn from many: the held-out loss
        and accuracy will say little about values the model has not seen."""
        rows = self.novel_rows + self.seen_rows
        return bool(rows) and self.seen_rows >= FAMILIAR_ROWS * rows and self.training_values >= MANY_VALUES


def measure(training: Iterable[Iterable[int]], held_out: Iterable[Iterable[int]]) -> Novelty:
    """Novelty of the held-out rows' value hashes against the training rows' value hashes."""
    known: set[int] = set()
    for hashes in training:
        known.update(hashes)
    result = Novelty(training_values=len(known))
    for hashes in held_out:
        hashes = list(hashes)
        novel = sum(h not in known for h in hashes)
        result.values += len(hashes)
        result.novel_values += novel
        kind = "none" if not hashes else "novel" if novel else "seen"
        result.novel_rows += kind == "novel"
        result.seen_rows += kind == "seen"
        result.without_values += kind == "none"
        result.kinds.append(kind)
    return result


def measure_packed(values, ends, training, held_out) -> Novelty:
    """`measure` of rows whose value hashes lie back to back in one array (row i's distinct
    hashes are `values[ends[i - 1]:ends[i]]`), `training` and `held_out` boolean arrays of the
    rows: the data check's million rows in numpy, not a Python loop per row (~1 s less)."""
    import numpy as np

    from tunelab.data.dedup import HASHED_FROM

    counts = np.diff(ends, prepend=0)  # values per row
    trained, held = values[np.repeat(training, counts)], values[np.repeat(held_out, counts)]
    if len(values) < HASHED_FROM:
        known = np.unique(trained)
        novel_value = ~np.isin(held, known)
    else:  # hash tables (pyarrow), ~10x faster than sorts: the distinct training values, each held-out value among them
        import pyarrow as pa
        import pyarrow.compute as pc

        known = pc.unique(pa.array(trained))
        novel_value = ~pc.is_in(pa.array(held), value_set=known).to_numpy(zero_copy_only=False)
    counts = counts[held_out]
    ends = np.cumsum(counts)  # of the held-out rows' values, back to back
    novel_up_to = np.concatenate([[0], np.cumsum(novel_value)])
    novel = novel_up_to[ends] - novel_up_to[ends - counts]  # novel values per held-out row
    kinds = np.where(counts == 0, "none", np.where(novel > 0, "novel", "seen"))
    return Novelty(values=int(counts.sum()), novel_values=int(novel.sum()), novel_rows=int((kinds == "novel").sum()),
                   seen_rows=int((kinds == "seen").sum()), without_values=int((kinds == "none").sum()),
                   training_values=len(known), kinds=kinds.tolist())
