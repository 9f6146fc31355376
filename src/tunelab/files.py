"""Writing files so that a crash, Ctrl-C or a full disk never leaves half of one: every file a
later command reads back (eval.json, the report, config.yaml, metrics.jsonl after a resume, a
labelled or reviewed training file) is written beside its place under a hidden name and renamed
over it, which POSIX and Windows make atomic on one file system."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


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
