"""A run's held-out answers, to rate and repair in the page; repairs kept in the run folder.

    RUN/corrections.jsonl  one row per repaired answer: {"prompt": [messages up to and including
                           the last user turn, system included], "chosen": [{"role": "assistant",
                           "content": CORRECT}], "rejected": [{"role": "assistant", "content":
                           MODEL_ANSWER}], "line": HELD_OUT_LINE}
    RUN/fixes.jsonl        one row per reference the user marked wrong: {"line": HELD_OUT_LINE,
                           "messages": [the row, its reference corrected], "was": OLD_REFERENCE}

These are the shapes every part of tunelab agrees on: `tunelab train --data-extra
RUN/corrections.jsonl` trains on prompt + chosen, and preference tuning reads the same rows as
pairs. The data file itself is never changed. HELD_OUT_LINE is the row's line in the data file
the run was trained on (eval.json's `line` of the sample).

This module is the page's small adapter, written to those shapes: at merge the lead points it at
data/corrections.py (`wrong_answers`, `add_correction`, `add_fix`), which implements the same
files for the command line, so that one implementation remains.

Saving a row replaces the run's earlier row for the same line (the answer is repaired again, not
twice) and writes the whole file beside and renames it (files.write_jsonl_atomic).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

CORRECTIONS = "corrections.jsonl"
FIXES = "fixes.jsonl"


@dataclass
class Answered:
    """One held-out example as the evaluate page shows it."""

    line: int
    messages: list[dict[str, str]]
    """The example's conversation, its reference last."""
    answer: str
    """The tuned model's answer."""
    right: bool | None
    """Exact match with the reference (None when eval.json has no score for it)."""
    correction: str | None = None
    """The repaired answer already saved for this line, if any."""
    fix: str | None = None
    """The corrected reference already saved for this line, if any."""

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to and including its last user turn."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "user")
        return self.messages[: last + 1]

    @property
    def reference(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def tuned_name(names: list[str]) -> str | None:
    return "tuned" if "tuned" in names else (names[-1] if names else None)


def held_out(run: Path) -> list[Answered]:
    """The tuned model's answers to the held-out rows of `run`'s last evaluation, wrong ones
    first (file order within each), with the repairs already saved. A run not evaluated yet has
    none; a damaged eval.json is the one-line error of `EvalResults.read`."""
    from tunelab.data.load import read_jsonl
    from tunelab.evaluate.baselines import user_text
    from tunelab.evaluate.results import EvalResults

    run = Path(run)
    if not (run / "eval.json").exists():
        return []
    results = EvalResults.read(run / "eval.json")
    if not results.samples:
        return []
    name = tuned_name(results.names or list(results.samples[0].answers))
    try:
        examples = {e.line: e for e in read_jsonl(run / "test.jsonl")}
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{run / 'test.jsonl'}: missing or damaged; the held-out rows cannot be shown") from None
    corrections = {row["line"]: row["chosen"][-1]["content"] for row in read_rows(run / CORRECTIONS)}
    fixes = {row["line"]: row["messages"][-1]["content"] for row in read_rows(run / FIXES)}
    found = []
    for sample in results.samples:
        example = examples.get(sample.line) if sample.line is not None else None
        answer = sample.answers.get(name) if name else None
        if example is None or example.is_raw or answer is None or user_text(example.prompt_messages()) != sample.prompt:
            continue  # evaluated with --data on another file: its rows are not the run's held-out ones
        right = None if answer.exact_match is None else answer.exact_match == 1.0
        found.append(Answered(example.line, example.messages, answer.text, right,
                              corrections.get(example.line), fixes.get(example.line)))
    return sorted(found, key=lambda a: a.right is not False)


def find(run: Path, line: int) -> Answered:
    for answered in held_out(run):
        if answered.line == line:
            return answered
    raise UserError(f"{run}: no evaluated held-out answer for line {line}")


def add_correction(run: Path, line: int, chosen: str) -> dict:
    """Save `chosen` as the right answer to held-out line `line`, against the model's answer."""
    answered = find(run, line)
    row = {"prompt": answered.prompt, "chosen": [{"role": "assistant", "content": checked(chosen)}],
           "rejected": [{"role": "assistant", "content": answered.answer}], "line": line}
    replace_row(Path(run) / CORRECTIONS, row)
    return row


def add_fix(run: Path, line: int, reference: str) -> dict:
    """Save that the reference of held-out line `line` is wrong and `reference` is right."""
    answered = find(run, line)
    messages = [dict(m) for m in answered.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[last]["content"] = checked(reference)
    row = {"line": line, "messages": messages, "was": answered.reference}
    replace_row(Path(run) / FIXES, row)
    return row


def checked(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise UserError("type the right answer first: an empty answer teaches nothing")
    return text.strip()


def read_rows(path: Path) -> list[dict]:
    """The rows of a corrections or fixes file; a line that is not such a row is skipped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("line"), int):
            rows.append(row)
    return rows


def replace_row(path: Path, row: dict) -> None:
    from tunelab.files import write_jsonl_atomic

    rows = [old for old in read_rows(path) if old["line"] != row["line"]]
    write_jsonl_atomic(path, sorted([*rows, row], key=lambda r: r["line"]))


def count(run: Path) -> int:
    """How many corrections the run holds (for the Train page's offer)."""
    return len(read_rows(Path(run) / CORRECTIONS))
