"""Data from a teacher in the page: `tunelab data label` / `data synth` as jobs, and reviewing
the pairs as `tunelab data review` does.

The teacher's endpoint is checked before the job is queued, by the command line's own rule
(client.check_private): an address outside this machine and its private network is refused
unless the user ticked the same consent `--allow-remote` gives, and the command shows the flag.
The API key never passes through the page: the job reads it from the environment `tunelab ui`
was started in (TUNELAB_API_KEY or OPENAI_API_KEY), as the command would.

Reviewing writes the decisions file of `tunelab data review FILE --out OUT`
(data/review.py: OUT.decisions.jsonl beside OUT, one record a line, keyed by the pair's content
hash), so a review started in the page can be finished in a terminal and the other way round.
When every pair has a decision, the page runs `tunelab data review FILE --out OUT` as a job: it
asks nothing, writes OUT from the decisions and checks it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tunelab.errors import UserError

Decision = Literal["accepted", "edited", "rejected"]
SHOWN = 10
"""Undecided pairs shown at a time."""


class TeacherRequest(BaseModel):
    """The Teacher page's form."""

    mode: Literal["label", "synth"]
    inputs: str = ""
    """label: the data file of inputs (in the data folder)."""
    examples: str = ""
    """Few-shot examples (label, optional) or example inputs (synth, required)."""
    teacher: str = Field(min_length=1)
    model: str = Field(min_length=1)
    system: str = ""
    n: str = ""
    """synth: how many new inputs."""
    out: str
    """The file to write, in the data folder."""
    allow_remote: bool = False


class ReviewRequest(BaseModel):
    file: str
    key: str = Field(pattern=r"^[0-9a-f]{64}$")
    decision: Decision
    answer: str = Field("", max_length=100_000)


def teacher_argv(form: TeacherRequest, inputs: Path | None, examples: Path | None, out: Path) -> list[str]:
    """The `tunelab data label|synth` arguments of the form, the endpoint checked first."""
    from tunelab.client import check_private

    check_private(form.teacher, form.allow_remote, "--teacher")
    argv = ["data", form.mode]
    if form.mode == "label":
        if inputs is None:
            raise UserError("label: pick the file of inputs to label")
        argv.append(str(inputs))
    argv += ["--teacher", form.teacher, "--model", form.model, "--out", str(out)]
    if form.system.strip():
        argv += ["--system", form.system.strip()]
    if examples is not None:
        argv += ["--examples", str(examples)]
    if form.mode == "synth":
        if examples is None:
            raise UserError("synth: pick a file of example inputs (--examples)")
        if not form.n.strip().isdigit() or int(form.n) < 1:
            raise UserError(f"synth: how many new inputs? {form.n!r} is not a whole number above 0 (--n)")
        argv += ["--n", form.n.strip()]
    if form.allow_remote:
        argv.append("--allow-remote")
    return argv


def reviewed_name(path: Path) -> Path:
    """Where the page's review of `path` writes: NAME.reviewed.jsonl beside it."""
    return path.with_name(path.stem + ".reviewed.jsonl")


def review_state(path: Path) -> dict:
    """The pairs of `path` and their decisions: counts, and the first SHOWN undecided pairs."""
    from tunelab.data.load import load_examples
    from tunelab.data.review import decisions_path, load_decisions

    examples = load_examples(path)
    if any(e.is_raw for e in examples):
        raise UserError(f"{path.name}: raw 'text' rows have no answer to review; review a file of pairs")
    out = reviewed_name(path)
    decisions = load_decisions(decisions_path(out))
    pending = [e for e in examples if e.key not in decisions]
    counts = {"accepted": 0, "edited": 0, "rejected": 0}
    for record in decisions.values():
        counts[record["decision"]] += 1
    unique_pending = list({e.key: e for e in pending}.values())
    return {"total": len(examples), "counts": counts, "pending": len(unique_pending),
            "shown": unique_pending[:SHOWN], "out": out, "decisions": decisions_path(out)}


def decide(path: Path, request: ReviewRequest) -> dict:
    """Append one decision to the review's decisions file, in `tunelab data review`'s format."""
    from tunelab.data.load import load_examples
    from tunelab.data.review import decisions_path

    if request.key not in {e.key for e in load_examples(path)}:
        raise UserError(f"{path.name}: no such pair (the file changed?); reload the page")
    record: dict = {"key": request.key, "decision": request.decision}
    if request.decision == "edited":
        if not request.answer.strip():
            raise UserError("type the edited answer first")
        record["answer"] = request.answer.strip()
    with decisions_path(reviewed_name(path)).open("a", encoding="utf-8") as log:
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
    return record
