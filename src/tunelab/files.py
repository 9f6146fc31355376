"""Reading and writing the files tunelab keeps. Every file a later command reads back (eval.json,
the report, config.yaml, metrics.jsonl after a resume, a labelled or reviewed training file) is
written beside its place under a hidden name and renamed over it, which POSIX and Windows make
atomic on one file system: a crash, Ctrl-C or a full disk never leaves half of one. A file
appended one record at a time (the teacher's answer cache, review's decisions) is read back by
`read_appended`, which survives a line cut short or damaged."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from tunelab.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` (UTF-8), or what it held before; never a part of either."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    """Rows as JSON lines, written as `write_text_atomic` writes."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_appended(path: Path, whole: Callable[[dict], bool], then: str) -> list[dict]:
    """The records of a file that is appended one JSON line at a time (the answer cache, the
    decisions of `data review`), each a JSON object with a string "key"; `whole` says whether such a
    record has the rest of what its file's records hold. Any other line is damaged.

    A last line cut short by a kill is cut off the file, so the next append starts a line of its
    own. Damaged lines are skipped with one warning naming the file, the lines and what `then`
    happens to them: a damaged file costs a few answers asked again, never the run.
    """
    if not path.exists():
        return []
    try:
        data = path.read_bytes()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{path}: cannot read it ({reason}); move it away to start afresh") from None
    complete = data[: data.rfind(b"\n") + 1]
    records, damaged = [], []
    for number, line in enumerate(complete.splitlines(), start=1):
        record = _keyed_record(line)
        if record is None or not whole(record):
            damaged.append(number)
        else:
            records.append(record)
    if len(complete) != len(data):
        damaged.append(complete.count(b"\n") + 1)
        os.truncate(path, len(complete))
    if damaged:
        lines = ", ".join(map(str, damaged[:5])) + (f" and {len(damaged) - 5} more" if len(damaged) > 5 else "")
        print(f"tunelab: warning: {path}:{damaged[0]}: {len(damaged)} damaged line(s) skipped (line {lines}); {then}",
              file=sys.stderr)
    return records


def _keyed_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return record if isinstance(record, dict) and isinstance(record.get("key"), str) else None
