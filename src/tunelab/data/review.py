"""`tunelab data review FILE --out FILE`: accept, edit or reject each pair in the terminal.
`tunelab data review --run RUN`: correct each wrong answer of a run's eval, or fix its reference.

A plain line-based loop on standard input and output, so it works over ssh and can be fed
from a script. Each decision is appended to a sidecar file as it is made, keyed by the pair's
content hash (beside --out) or by the held-out line (in RUN, corrections.py): quitting (`q`,
Ctrl-D or Ctrl-C) and running the same command again goes on where it stopped. When every pair
has a decision, the reviewed file is written (kept pairs in file order, each row's `metadata`
noting the decision) and the data check runs on it; a run's corrections and fixes are written
after each decision (corrections.py).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from tunelab.errors import UserError, check_not_kernel_folder, check_output_beside, check_output_file
from tunelab.files import read_appended

CHOICES = "[a]ccept  [e]dit  [r]eject  [q]uit > "
RUN_CHOICES = "[a]ccept the reference  [t]ype a better answer  [f]ix the reference  [s]kip  [q]uit > "


def decisions_path(out: Path) -> Path:
    return out.with_name(out.stem + ".decisions.jsonl")


def load_decisions(path: Path) -> dict[str, dict]:
    """The decisions saved in `path`. A line cut short by a kill is cut off the file (so the next
    decision does not glue onto it); a damaged line is skipped with a warning naming it, and its
    pair is asked again."""
    return {record["key"]: record for record in read_appended(path, _decision, "their pairs are asked again")}


def _decision(record: dict) -> bool:
    """Whether a decision record is whole: accepted, rejected, or edited with its answer."""
    return record.get("decision") in ("accepted", "rejected") or (
        record.get("decision") == "edited" and isinstance(record.get("answer"), str))


def ask_new_answer(answer: str) -> str | None:
    """The edited answer: from $VISUAL or $EDITOR on a temporary file, else typed on standard input
    (ended by a line holding only '.'); None when nothing usable came back."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR")
    if editor:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
            f.write(answer + "\n")
        try:
            try:
                returncode = subprocess.run([*shlex.split(editor), f.name]).returncode
            except (OSError, ValueError) as e:  # no such program, not executable, unbalanced quotes
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                print(f"tunelab: cannot start the editor {editor!r} ($VISUAL or $EDITOR: {reason}); "
                      "the pair stays undecided", file=sys.stderr)
                return None
            if returncode != 0:
                print("The editor failed; the answer is unchanged.")
                return None
            text = Path(f.name).read_text(encoding="utf-8", errors="replace").strip()
        finally:
            os.unlink(f.name)
    else:
        print("New answer; end it with a line holding only '.':")
        lines = []
        while (line := input()) != ".":
            lines.append(line)
        text = "\n".join(lines).strip()
    return text or None


def show(example, position: int, total: int) -> None:
    print(f"\n[{position}/{total}] line {example.line}")
    for m in example.messages:
        print(f"{m['role']}: {m['content']}")


def review(path: Path, out: Path) -> tuple[bool, dict[str, int]]:
    """Ask for a decision on every pair not yet decided; (finished, counts of decisions)."""
    from tunelab.data.load import load_examples

    examples = load_examples(path)
    if any(e.is_raw for e in examples):
        raise UserError(f"{path}: raw 'text' rows have no answer to review; review a file of pairs")
    sidecar = decisions_path(out)
    decisions = load_decisions(sidecar)
    pending = [e for e in examples if e.key not in decisions]
    with sidecar.open("a", encoding="utf-8") as log:
        for position, example in enumerate(pending, start=len(examples) - len(pending) + 1):
            if example.key in decisions:  # an exact copy of a pair already decided
                continue
            show(example, position, len(examples))
            record = None
            while record is None:
                try:
                    choice = input(CHOICES).strip().lower()
                    if choice == "e":
                        answer = ask_new_answer(example.reference)
                        record = {"key": example.key, "decision": "edited", "answer": answer} if answer else None
                        continue
                except EOFError:
                    choice = "q"
                if choice == "q":
                    return False, _counts(decisions)
                if choice in ("a", "r"):
                    record = {"key": example.key, "decision": "accepted" if choice == "a" else "rejected"}
            log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()
            decisions[example.key] = record
    return True, _counts(decisions)


def _counts(decisions: dict[str, dict]) -> dict[str, int]:
    counts = {"accepted": 0, "edited": 0, "rejected": 0}
    for record in decisions.values():
        counts[record["decision"]] += 1
    return counts


def write_reviewed(path: Path, out: Path) -> int:
    """The kept pairs, edited where edited, in file order, their metadata kept; returns their number."""
    from tunelab.data.load import iter_examples, read_rows

    decisions = load_decisions(decisions_path(out))
    raw = dict(read_rows(path))
    rows = []
    for example in iter_examples(path):
        record = decisions[example.key]
        if record["decision"] == "rejected":
            continue
        messages = [dict(m) for m in example.messages]
        if record["decision"] == "edited":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            messages[last]["content"] = record["answer"]
        source = raw[example.line]
        metadata = source.get("metadata") if isinstance(source.get("metadata"), dict) else {}
        row = {"id": source["id"]} if "id" in source else {}
        rows.append({**row, "messages": messages, "metadata": {**metadata, "review": record["decision"]}})
    from tunelab.files import write_jsonl_atomic

    write_jsonl_atomic(out, rows)
    return len(rows)


def cli_review(path: Path, out: Path) -> None:
    """`tunelab data review FILE --out FILE`"""
    from tunelab.config import DataOptions
    from tunelab.data.check import run_check

    check_not_kernel_folder(out, "--out")
    check_output_file(out, "--out")
    if out.exists():
        raise UserError(f"--out {out}: already exists; remove it or choose another name")
    check_output_beside(decisions_path(out), "--out", out, "the decisions file")
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: the reviewed file is JSON lines; name it e.g. {out.with_suffix('.jsonl')}")
    finished, counts = review(path, out)
    summary = ", ".join(f"{count} {decision}" for decision, count in counts.items())
    if not finished:
        print(f"\nStopped: {summary} so far, kept in {decisions_path(out)}. Run the same command to go on.")
        return
    kept = write_reviewed(path, out)
    if not kept:
        out.unlink()
        raise UserError(f"{path}: every pair was rejected; nothing to write to {out}")
    print(f"\nReviewed: {summary}. {kept} pairs written to {out}.")
    run_check(out, DataOptions())


# A run's wrong answers (corrections.py keeps the decisions and writes the files).

def show_wrong(item, position: int, total: int) -> None:
    print(f"\n[{position}/{total}] held-out line {item.line} ({item.bucket})")
    for m in item.prompt:
        print(f"{m['role']}: {m['content']}")
    print(f"reference: {item.reference}")
    print(f"model:     {item.answer}")


def review_run(run: Path) -> tuple[bool, int]:
    """Ask for a decision on every wrong answer not yet decided; (finished, wrong answers)."""
    from tunelab.data import corrections

    wrong = corrections.wrong_answers(run)
    decided = len([w for w in wrong if w.decision])
    for item in wrong:
        if item.decision:
            continue
        decided += 1
        show_wrong(item, decided, len(wrong))
        while True:
            try:
                choice = input(RUN_CHOICES).strip().lower()
                if choice == "a":
                    corrections.add_correction(run, item.line, item.reference)
                elif choice == "t":
                    answer = ask_new_answer(item.reference)
                    if not answer:
                        continue
                    corrections.add_correction(run, item.line, answer)
                elif choice == "f":
                    reference = ask_new_answer(item.reference)
                    if not reference:
                        continue
                    corrections.add_fix(run, item.line, reference)
                elif choice == "s":
                    corrections.skip(run, item.line)
                elif choice == "q":
                    return False, len(wrong)
                else:
                    continue
            except EOFError:
                return False, len(wrong)
            except UserError as e:  # the model's own answer typed as the correction, an unchanged reference
                print(f"{e}; choose again")
                continue
            break
    return True, len(wrong)


def _run_counts(run: Path) -> dict[str, int]:
    from tunelab.data import corrections

    counts = dict.fromkeys(corrections.DECISIONS, 0)
    for record in corrections.decisions(run).values():
        counts[record["decision"]] += 1
    return counts


def cli_review_run(run: Path) -> None:
    """`tunelab data review --run RUN`"""
    from tunelab.runfolder import RunFiles

    files = RunFiles(run)
    stopped = "\nStopped: {} so far, kept in {}. Run the same command to go on."
    try:
        finished, wrong = review_run(run)
    except KeyboardInterrupt:
        print(stopped.format(_summary(_run_counts(run)), files.review_decisions))
        raise
    if not finished:
        print(stopped.format(_summary(_run_counts(run)), files.review_decisions))
        return
    if not wrong:
        print(f"{files.eval}: the fine-tuned model answered every held-out row right; no wrong answers to review")
        return
    print(f"\nReviewed all {wrong} wrong answers: {_summary(_run_counts(run))}.")
    if files.corrections.exists():
        print(f"Corrections in {files.corrections}: train on them with "
              f"`tunelab train DATA --data-extra {files.corrections} --out NEW_RUN`")
    if files.fixes.exists():
        print(f"Fixed references in {files.fixes}: correct those lines of your data file (tunelab never changes it)")


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{count} {decision}" for decision, count in counts.items())
