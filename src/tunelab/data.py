"""Load examples from JSONL, CSV or Parquet, validate them, and split train/test.

Every accepted shape becomes a list of chat messages, so one template renders them all:
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
- prompt_completion: {"prompt": ..., "completion": ...}
- alpaca:            {"instruction": ..., "input": ... (optional), "output": ...}
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

SHAPES = ("messages", "prompt_completion", "alpaca")
ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20


@dataclass
class Example:
    messages: list[dict[str, str]]
    line: int
    """Line (JSONL) or row (CSV, Parquet) number in the source file, 1-based."""

    @property
    def key(self) -> str:
        """A content hash: identical examples share it wherever they appear in the file."""
        text = json.dumps(self.messages, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to its last assistant turn: what a model is asked at inference."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed row) from a JSONL, CSV or Parquet file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass a .jsonl, .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, _Invalid(f"not valid JSON ({e.msg} at column {e.colno})")
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            # Row 1 is the header, so data rows are numbered from 2 as a spreadsheet shows them.
            for number, row in enumerate(csv.DictReader(f), start=2):
                yield number, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: cannot read Parquet file ({e})") from None
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row
    else:
        raise UserError(f"{path}: unknown file type '{suffix}'; use .jsonl, .csv or .parquet")


@dataclass
class _Invalid:
    reason: str


def detect_shape(row: dict[str, Any]) -> str | None:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def to_messages(row: dict[str, Any], shape: str) -> list[dict[str, str]]:
    """Convert one row to chat messages; raise ValueError naming what is wrong."""
    if shape == "prompt_completion":
        return [_message("user", row.get("prompt"), "prompt"), _message("assistant", row.get("completion"), "completion")]
    if shape == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError("field 'input' must be a string")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return [{"role": "user", "content": user}, _message("assistant", row.get("output"), "output")]
    messages = row.get("messages")
    if isinstance(messages, str):  # CSV and some Parquet exports hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError("field 'messages' is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role {m['role']!r}; use system, user or assistant")
        out.append(_message(m["role"], m["content"], f"message {i} content"))
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("no assistant message to learn from")
    return out


def _text(value: Any, name: str) -> str:
    if value is None:
        raise ValueError(f"missing field '{name}'")
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{name}' is empty")
    return value


def _message(role: str, value: Any, name: str) -> dict[str, str]:
    return {"role": role, "content": _text(value, name)}


def load_examples(path: Path, shape: str = "auto", require_answer: bool = True) -> list[Example]:
    """Read and validate every row; raise one UserError listing each bad line.

    With `require_answer=False` (batch generation), rows may lack the reference answer.
    """
    path = Path(path)
    examples: list[Example] = []
    problems: list[str] = []
    for number, row in read_rows(path):
        where = f"{path}:{number}"
        if isinstance(row, _Invalid):
            problems.append(f"{where}: {row.reason}")
            continue
        if not isinstance(row, dict):
            problems.append(f"{where}: expected a JSON object, got {type(row).__name__}")
            continue
        row_shape = detect_shape(row) if shape == "auto" else shape
        if row_shape is None and not require_answer:
            row_shape = _prompt_only_shape(row)
        if row_shape is None:
            problems.append(
                f"{where}: unknown shape with keys {sorted(row)}; expected 'messages', "
                "'prompt'+'completion' or 'instruction'+'output' (or pass --format)"
            )
            continue
        if not require_answer:
            row = _with_placeholder_answer(row, row_shape)
        try:
            examples.append(Example(to_messages(row, row_shape), number))
        except ValueError as e:
            problems.append(f"{where}: {e}")
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        details = shown[1:] + ([f"... and {more} more"] if more else [])
        raise UserError(shown[0], details)
    if not examples:
        raise UserError(f"{path}: no examples found; the file is empty")
    return examples


def _prompt_only_shape(row: dict[str, Any]) -> str | None:
    if "prompt" in row:
        return "prompt_completion"
    if "instruction" in row:
        return "alpaca"
    return None


def _with_placeholder_answer(row: dict[str, Any], shape: str) -> dict[str, Any]:
    """Rows for generation need no answer; give them one so one converter serves both uses."""
    if shape == "prompt_completion":
        return {**row, "completion": "-"}
    if shape == "alpaca":
        return {**row, "output": "-"}
    messages = row.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        if messages[-1].get("role") != "assistant":
            return {**row, "messages": [*messages, {"role": "assistant", "content": "-"}]}
    return row


def split(examples: list[Example], test_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split by content hash: reproducible, independent of row order, and identical
    examples always land on the same side, so duplicates cannot leak into the test split."""
    n_test = round(len(examples) * test_size) if test_size < 1 else int(test_size)
    if n_test >= len(examples):
        raise UserError(f"--test-size {test_size} leaves no training examples out of {len(examples)}")

    def rank(example: Example) -> str:
        return hashlib.sha256(f"{seed}:{example.key}".encode()).hexdigest()

    ranked = sorted(examples, key=rank)
    test_keys = {e.key for e in ranked[:n_test]}
    train = [e for e in examples if e.key not in test_keys]
    test = [e for e in examples if e.key in test_keys]
    return train, test


def write_jsonl(path: Path, examples: list[Example]) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"messages": e.messages, "line": e.line}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    with Path(path).open(encoding="utf-8") as f:
        return [Example(row["messages"], row["line"]) for row in map(json.loads, f)]
