"""The Evaluate page's rating and repairing of a run's held-out answers, on data/corrections.py:
the same RUN/corrections.jsonl and RUN/fixes.jsonl (and the same decisions file) as
`tunelab data review --run RUN`, so a repair made in the page and one made in a terminal are one
kind of thing, and `tunelab train --data-extra RUN/corrections.jsonl` trains on both."""

from __future__ import annotations

from pathlib import Path

from tunelab.data import corrections
from tunelab.data.corrections import HeldOutAnswer, add_correction, add_fix

__all__ = ["CORRECTIONS", "add_correction", "add_fix", "count", "held_out"]

CORRECTIONS = "corrections.jsonl"


def held_out(run: Path) -> list[HeldOutAnswer]:
    """The tuned model's answers to the run's held-out rows, wrong ones first (held-out order
    within each). A run not evaluated yet has none; an eval of another file (`--data`) is the
    one-line error of data/corrections.py, shown in the page."""
    if not (Path(run) / "eval.json").exists():
        return []
    return sorted(corrections.held_out_answers(run), key=lambda a: a.right)


def count(run: Path) -> int:
    """How many corrections the run holds (for the Train page's offer)."""
    return corrections.count(run) if (Path(run) / "config.yaml").exists() else 0
