"""Fixing a data file in the page: rows edited or dropped, saved as a new file beside it.

The original is never changed: the fixed rows go to DATA/NAME.fixed.jsonl, which must not exist
yet (a second round of fixes is made on the fixed file, giving NAME.fixed.fixed.jsonl), and the
page checks the new file at once. Only JSON lines files are fixed here, line by line, so every
line the user did not touch is kept byte for byte; a CSV or Parquet file is fixed in the
program that made it.

Also here: what the check page reads beside the data check's report, a `--split-by` field to
suggest when the rows carry a key whose values repeat (several rows of one customer, one
document, one conversation), so that no group is on both sides of the split.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

MAX_ROW_CHARS = 100_000


def fixed_name(path: Path) -> Path:
    return path.with_name(path.stem + ".fixed.jsonl")


def write_fixed(path: Path, edits: dict[int, str], drop: set[int]) -> tuple[Path, int, int]:
    """Write `path` with the lines in `edits` replaced and those in `drop` left out to
    NAME.fixed.jsonl beside it; returns (new file, lines edited, lines dropped). An edit that is
    JSON is written on one line; one that is not is kept as typed (the check shows it again)."""
    if path.suffix.lower() != ".jsonl":
        raise UserError(f"{path.name}: only JSON lines files are fixed in the page; fix a {path.suffix} file "
                        "in the program that made it and add it again")
    out = fixed_name(path)
    if out.exists():
        raise UserError(f"{out.name} exists already in {path.parent}: the page never overwrites a file; "
                        "rename or remove it, or fix that file instead")
    # Split at "\n" only, as the data check numbers lines (str.splitlines also splits at U+2028 ...).
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    if lines[-1] == "":
        lines.pop()
    unknown = sorted(n for n in {*edits, *drop} if not 1 <= n <= len(lines))
    if unknown:
        raise UserError(f"{path.name} has no line {unknown[0]}")
    kept = []
    for number, line in enumerate(lines, 1):
        if number in drop:
            continue
        kept.append(one_line(edits[number]) if number in edits else line)
    if not kept:
        raise UserError(f"every row of {path.name} would be dropped; nothing to save")
    from tunelab.files import write_text_atomic

    write_text_atomic(out, "".join(line + "\n" for line in kept))
    return out, len([n for n in edits if n not in drop]), len(drop)


def editable_lines(path: Path, wanted: set[int]) -> dict[int, str]:
    """The whole text of the given lines, for the page's edit boxes; a line over MAX_ROW_CHARS is
    left out (it is shown cut, and an edit of the cut text would lose the rest)."""
    from tunelab.ui.follow import source_lines

    found = source_lines(path, wanted, max_chars=MAX_ROW_CHARS + 1)
    return {line: text for line, text in found.items() if len(text) <= MAX_ROW_CHARS}


def one_line(text: str) -> str:
    if len(text) > MAX_ROW_CHARS:
        raise UserError(f"an edited row is over {MAX_ROW_CHARS} characters")
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return " ".join(text.splitlines())


def split_by_suggestion(path: Path, rows_read: int, max_rows: int = 50_000) -> dict[str, Any] | None:
    """A field to split by: `id` or a key of the rows' metadata that (almost) every row has and
    whose values repeat (fewer values than half the rows, at least two), the one with the most
    rows per value; None when no field looks like a group. The rows are read again (up to
    `max_rows`), as the data check reads them."""
    from tunelab.data.load import read_rows

    values: dict[str, Counter] = {}
    rows = 0
    try:
        for _, row in read_rows(path):
            if rows >= max_rows:
                break
            rows += 1
            if not isinstance(row, dict):
                continue
            fields = {"id": row.get("id")}
            metadata = row.get("metadata")
            if isinstance(metadata, str) and metadata.lstrip().startswith("{"):
                try:
                    metadata = json.loads(metadata)
                except ValueError:
                    metadata = None
            if isinstance(metadata, dict):
                fields |= {f"metadata.{key}": value for key, value in metadata.items()}
            for name, value in fields.items():
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    values.setdefault(name, Counter())[str(value)] += 1
    except (UserError, OSError, ValueError):
        return None
    candidates = []
    for name, counts in values.items():
        present = sum(counts.values())
        if present >= 0.9 * rows and 2 <= len(counts) <= present / 2:
            candidates.append((present / len(counts), name, len(counts), present))
    if not candidates:
        return None
    per_group, name, groups, present = max(candidates)
    return {"field": name, "groups": groups, "rows": present, "per_group": round(per_group, 1)}


def duplicate_pairs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The exact and near duplicate pairs the data check saved, for side by side display."""
    exact = [{"kind": "exact", "first": a, "later": b, "similarity": 1.0}
             for a, b in report["duplicates"]["exact"]["pairs"]]
    near = [{"kind": "near", "first": a, "later": b, "similarity": s}
            for a, b, s in report["duplicates"]["near"]["pairs"]]
    return exact + near
