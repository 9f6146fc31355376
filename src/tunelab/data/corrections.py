"""A run's wrong answers, and what the user makes of each: RUN/corrections.jsonl and RUN/fixes.jsonl.

`tunelab data review --run RUN` (review.py) and the browser (ui/) both work through this module:
- `held_out_answers(run)`: every held-out row of RUN/eval.json with the fine-tuned model's answer
  and the user's decision so far (the browser shows them all, wrong ones first);
  `wrong_answers(run)`: those it answered wrong (any bucket but "correct"), in held-out order;
- `add_correction(run, line, chosen)`: the model was wrong and `chosen` is right (the reference,
  or a better answer the user typed); one row of RUN/corrections.jsonl, in TRL's conversational
  preference shape plus the held-out line:
  {"prompt": [messages before the answer, system included], "chosen": [{"role": "assistant",
  "content": CHOSEN}], "rejected": [{"role": "assistant", "content": MODEL_ANSWER}], "line": LINE}.
  Training reads it with --data-extra (prompt + chosen), preference tuning as pairs;
- `add_fix(run, line, reference)`: the reference itself was wrong; one row of RUN/fixes.jsonl,
  {"line": LINE, "messages": [the row, its last answer `reference`], "was": OLD_REFERENCE}. The
  data file is never changed in place: the user applies the fixes to it;
- `skip(run, line)`: neither; not asked again.

A line is a row of the data file trained on (the run's test.jsonl keeps it), so only an
evaluation of the run's own held-out split is reviewed: `eval --data FILE` numbers another file's
rows. Each decision is appended to RUN/corrections.decisions.jsonl as it is made (files.read_appended
survives a line cut short by Ctrl-C or a kill), keyed by the line, the last decision of a line
winning; corrections.jsonl and fixes.jsonl are rebuilt from it after each one, written beside and
renamed, so they are whole at every moment. A decision keeps the rows it wrote, so a later eval
with other answers does not change what was corrected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.data.load import Example, read_jsonl
from tunelab.errors import UserError
from tunelab.evaluate.results import EvalResults, Sample
from tunelab.files import read_appended, write_jsonl_atomic
from tunelab.runfolder import RunFiles

DECISIONS = ("corrected", "fixed", "skipped")
MODEL = "tuned"
"""The contender whose answers are reviewed: the fine-tuned model."""


@dataclass
class HeldOutAnswer:
    """One held-out row, the fine-tuned model's answer to it, and what the user decided."""

    line: int
    """The row's line in the data file the run was trained on."""
    prompt: list[dict[str, str]]
    """The messages before the answer, system included: what the model was asked."""
    reference: str
    """The row's answer in the data."""
    answer: str
    """The fine-tuned model's answer."""
    bucket: str
    """Where eval put the answer (evaluate/metrics.py BUCKETS): wrong, empty, no stop, ..."""
    decision: str | None = None
    """corrected, fixed or skipped; None while undecided."""
    row: dict | None = None
    """The corrections.jsonl or fixes.jsonl row the decision wrote."""

    @property
    def right(self) -> bool:
        return self.bucket == "correct"

    @property
    def correction(self) -> str | None:
        """The answer the user gave as right, if the decision was a correction."""
        return self.row["chosen"][0]["content"] if self.decision == "corrected" and self.row else None

    @property
    def fix(self) -> str | None:
        """The corrected reference, if the decision was a fix."""
        return self.row["messages"][-1]["content"] if self.decision == "fixed" and self.row else None


def held_out_answers(run: Path | str) -> list[HeldOutAnswer]:
    """Every held-out row of RUN/eval.json with the fine-tuned model's answer, in held-out order."""
    files = RunFiles(Path(run))
    decided = decisions(run)
    return [_answer(example, sample, decided.get(example.line, {})) for example, sample in _evaluated(files)]


def wrong_answers(run: Path | str) -> list[HeldOutAnswer]:
    """The held-out rows the fine-tuned model got wrong in RUN/eval.json, in held-out order."""
    return [item for item in held_out_answers(run) if not item.right]


def count(run: Path | str) -> int:
    """How many corrections RUN/corrections.jsonl holds."""
    return sum(record["decision"] == "corrected" for record in decisions(run).values())


def decisions(run: Path | str) -> dict[int, dict]:
    """Line -> the last decision on it: {"key", "decision", "row"} ("row": the correction or fix written)."""
    path = RunFiles(Path(run)).review_decisions
    found = {}
    for record in read_appended(path, _whole, "their answers are asked again"):
        found[int(record["key"])] = record
    return found


def add_correction(run: Path | str, line: int, chosen: str) -> dict:
    """The model's answer to held-out `line` was wrong and `chosen` is right: the corrections.jsonl
    row written (a later decision on the line replaces it). A UserError for a line that is not a
    wrong answer, an empty answer, or the model's own answer (then the reference is what is wrong)."""
    files = RunFiles(Path(run))
    item = _find(files, line)
    if item.right:
        raise UserError(f"line {line}: the fine-tuned model answered it as the reference does; if that answer is "
                        "wrong, the reference is: fix the reference instead")
    chosen = chosen.strip()
    if not chosen:
        raise UserError(f"line {line}: the correct answer is empty")
    if chosen == item.answer.strip():
        raise UserError(f"line {line}: that is the model's own answer; if it is right, the reference is what is "
                        "wrong: fix the reference instead")
    row = {"prompt": item.prompt, "chosen": [{"role": "assistant", "content": chosen}],
           "rejected": [{"role": "assistant", "content": item.answer}], "line": line}
    _decide(files, {"key": str(line), "decision": "corrected", "row": row})
    return row


def add_fix(run: Path | str, line: int, reference: str) -> dict:
    """The reference of held-out `line` was wrong and `reference` is right: the fixes.jsonl row
    written. The data file is not touched."""
    files = RunFiles(Path(run))
    item = _find(files, line)
    reference = reference.strip()
    if not reference:
        raise UserError(f"line {line}: the corrected reference is empty")
    if reference == item.reference.strip():
        raise UserError(f"line {line}: the corrected reference is the reference as it was")
    row = {"line": line, "messages": [*item.prompt, {"role": "assistant", "content": reference}],
           "was": item.reference}
    _decide(files, {"key": str(line), "decision": "fixed", "row": row})
    return row


def skip(run: Path | str, line: int) -> None:
    """Neither a correction nor a fix for held-out `line`; it is not asked again."""
    files = RunFiles(Path(run))
    _find(files, line)
    _decide(files, {"key": str(line), "decision": "skipped"})


def _whole(record: dict) -> bool:
    """Whether a decision record is whole: its key a line, and a row where the decision wrote one."""
    return record["key"].isdigit() and (record.get("decision") == "skipped" or (
        record.get("decision") in ("corrected", "fixed") and isinstance(record.get("row"), dict)))


def _evaluated(files: RunFiles) -> list[tuple[Example, Sample]]:
    """(held-out example, its eval.json sample) for each evaluated row, in order."""
    root = files.root
    files.check()  # a run folder, finished, not training now: as eval, generate and export refuse it
    if not files.eval.exists():
        raise UserError(f"{root}: no eval.json yet; run `tunelab eval {root}` first, then review its wrong answers")
    results = EvalResults.read(files.eval)
    if results.data and results.run and Path(results.data) != Path(results.run) / "test.jsonl":
        raise UserError(f"{files.eval}: evaluates {results.data}, not the run's held-out split; corrections are "
                        f"of held-out rows: run `tunelab eval {root}` (without --data) first")
    if MODEL not in results.names:
        raise UserError(f"{files.eval}: holds no answers of the fine-tuned model; run `tunelab eval {root}` again")
    try:
        held_out = {e.line: e for e in read_jsonl(files.test)}
    except FileNotFoundError:
        raise files.damaged(files.test, "missing") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise files.damaged(files.test, "not the held-out examples as training writes them") from None
    pairs = []
    for sample in results.samples:
        example = held_out.get(sample.line) if sample.line is not None else None
        if example is None or example.is_raw or example.reference != sample.reference:
            raise UserError(f"{files.eval}: its answers are not those of the run's held-out rows now (line "
                            f"{sample.line}); run `tunelab eval {root}` again")
        pairs.append((example, sample))
    return pairs


def _answer(example: Example, sample: Sample, decided: dict) -> HeldOutAnswer:
    answer = sample.answers[MODEL]
    return HeldOutAnswer(example.line, example.prompt_messages(), example.reference, answer.text,
                         answer.bucket or "wrong", decided.get("decision"), decided.get("row"))


def _find(files: RunFiles, line: int) -> HeldOutAnswer:
    for example, sample in _evaluated(files):
        if example.line == line:
            return _answer(example, sample, {})
    raise UserError(f"line {line}: not a held-out row of {files.eval}")


def _decide(files: RunFiles, record: dict) -> None:
    """Append the decision, then rebuild corrections.jsonl and fixes.jsonl from every decision."""
    with files.review_decisions.open("a", encoding="utf-8") as log:
        log.write(json.dumps(record, ensure_ascii=False) + "\n")
    rebuild(files.root)


def rebuild(run: Path | str) -> None:
    """corrections.jsonl and fixes.jsonl as the decisions say, rows in line order; a file with no
    row is removed (a decision changed in the browser may empty it)."""
    files = RunFiles(Path(run))
    decided = decisions(run)
    for path, kind in ((files.corrections, "corrected"), (files.fixes, "fixed")):
        rows = [decided[line]["row"] for line in sorted(decided) if decided[line]["decision"] == kind]
        if rows:
            write_jsonl_atomic(path, rows)
        else:
            path.unlink(missing_ok=True)
