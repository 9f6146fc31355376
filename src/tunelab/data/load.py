"""Load examples from JSONL, CSV or Parquet, validate them, and split train/test.

Every accepted shape becomes a list of chat messages, so one template renders them all:
- messages:          {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
- prompt_completion: {"prompt": ..., "completion": ...}
- alpaca:            {"instruction": ..., "input": ... (optional), "output": ...}
- preference:        {"prompt": ..., "chosen": ..., "rejected": ...}, TRL's preference shape: the
                     prompt a text or messages, each answer a text or one assistant message in a
                     list (or, without "prompt", two conversations whose shared turns are the
                     prompt); or LLaMA-Factory's, the prompt as alpaca's "instruction" and "input"
A preference row is an Example of prompt + chosen (what SFT trains) with the rejected answer
beside it (`Example.rejected`, what DPO and ORPO push away from); a row holding "chosen" or
"rejected" is always a preference row, so "prompt" alone never makes it ambiguous.
and one shape stays plain text, for continued pretraining on a corpus of documents:
- text:              {"text": ...}   (Example.text; every token is trained)

Each bad row is a `Problem` with its line (JSONL) or row (CSV, Parquet) number and a short
code such as E_JSON or E_UNKNOWN_ROLE, so a long list of them can be scanned and counted.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string  # what json.dumps(ensure_ascii=False) writes a str as
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.errors import UserError, check_not_broken_link

SHAPES = ("messages", "prompt_completion", "alpaca", "text", "preference")
ROLES = ("system", "user", "assistant")
MAX_LISTED_PROBLEMS = 20
METADATA_KEYS = ("id", "metadata")
"""Keys any row may carry for the user's own bookkeeping; they are ignored."""
SHAPE_KEYS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "input", "output"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "instruction", "input"),
}
PAIR_KEYS = ("line",)
"""Keys a preference row may carry besides its shape's: RUN/corrections.jsonl (`tunelab data
review`) keeps the held-out line each pair corrects under "line"; it is ignored here."""
MESSAGE_KEYS = ("role", "content")
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
"""`json.dumps(..., sort_keys=True, ensure_ascii=False)`, made once: `dumps` with options builds an
encoder per call, a third of the content hash's time."""


def _messages_json(messages: list[dict[str, str]]) -> str | None:
    """`_CANONICAL.encode(messages)`, character for character, written out for the usual messages
    (each exactly a role and a content, both strings; None for any other): half the content
    hash's time, which the split is made from, so it must not change by a character."""
    parts = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if len(m) != 2 or type(role) is not str or type(content) is not str:
            return None
        parts.append(f'{{"content": {_json_string(content)}, "role": {_json_string(role)}}}')
    return f"[{', '.join(parts)}]"


@dataclass
class Example:
    messages: list[dict[str, str]]
    line: int
    """Line (JSONL) or row (CSV, Parquet) number in the source file, 1-based."""
    text: str | None = None
    """The document of a raw-text row (then `messages` is empty)."""
    group: str | None = None
    """The row's value of the --split-by field, as text (None: no --split-by, or the row lacks it)."""
    rejected: list[dict[str, str]] | None = None
    """A preference row's rejected answer, one assistant message: the alternative to the last
    turn of `messages` (the chosen answer). None for every other shape."""

    @property
    def key(self) -> str:
        """A content hash: identical examples share it wherever they appear in the file."""
        if self.text is not None:
            content = self.text
        elif self.rejected is None:
            content = _messages_json(self.messages) or _CANONICAL.encode(self.messages)
        else:
            content = _CANONICAL.encode([self.messages, self.rejected])
        return hashlib.sha256(content.encode()).hexdigest()

    def rejected_messages(self) -> list[dict[str, str]]:
        """The conversation with the rejected answer in place of the chosen one."""
        assert self.rejected is not None, "not a preference row"
        return self.prompt_messages() + self.rejected

    @property
    def is_raw(self) -> bool:
        return self.text is not None

    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to its last assistant turn: what a model is asked at inference."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def reference(self) -> str:
        return [m for m in self.messages if m["role"] == "assistant"][-1]["content"]


@dataclass
class Problem:
    """One bad row: where it is, a short code to count and grep, and what to fix."""

    line: int
    code: str
    message: str

    def format(self, path: Path | str) -> str:
        where = f"{path}:{self.line}" if self.line else str(path)  # line 0: the file as a whole
        return f"{where}: {self.code} {self.message}"


class RowError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Span(NamedTuple):
    """Whole lines of a JSONL file, from byte `start` up to byte `end`, the first of them line
    number `line`: a part of a large file that the data check reads in another process."""

    start: int
    end: int
    line: int


def is_tabular(path: Path) -> bool:
    """CSV and Parquet rows have columns where JSON lines have fields."""
    return Path(path).suffix.lower() in (".csv", ".parquet")


def check_data_file(path: Path) -> None:
    """The checks of `read_rows` that need no reading: run before a model loads."""
    path = Path(path)
    if not path.exists():
        check_not_broken_link(path)
        raise UserError(f"{path}: file not found")
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass a .jsonl, .csv or .parquet file")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson", ".csv", ".parquet"):
        raise UserError(f"{path}: unknown file type '{path.suffix}'; use .jsonl, .csv or .parquet")


def read_rows(path: Path, span: Span | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed row) from a JSONL, CSV or Parquet file (or only the
    lines of `span`, of a JSONL file).

    Text files must be UTF-8; a leading byte-order mark (as Excel and Notepad write it) is
    skipped. Problems with the file as a whole (not UTF-8, a JSON array, a CSV header that fits
    no shape) are one UserError, not one problem per row."""
    path = Path(path)
    check_data_file(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        yield from _read_jsonl_rows(path, span)
    elif suffix == ".csv":
        yield from _read_csv_rows(path)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: cannot read Parquet file ({e})") from None
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):  # streamed: a large file never sits in memory
            for row in batch.to_pylist():
                number += 1
                yield number, row


def text_lines(path: Path, span: Span | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line (of `span`, if given), decoded one line at a time so
    that a byte that is not UTF-8 is reported with its line, not as a position in some buffer."""
    span = span or Span(0, -1, 1)
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read the file ({e.strerror or e}); check its permissions") from None
    with f:
        f.seek(span.start)
        left = span.end - span.start
        for number, raw in enumerate(f, start=span.line):
            if span.end >= 0:
                if left <= 0:
                    break
                left -= len(raw)
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                how = " (in Excel: Save As > CSV UTF-8)" if path.suffix.lower() == ".csv" else ""
                raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"save the file as UTF-8{how}") from None
            yield number, line


def _read_jsonl_rows(path: Path, span: Span | None = None) -> Iterator[tuple[int, Any]]:
    first = span is None or span.start == 0
    for number, line in text_lines(path, span):
        if not line.strip():
            continue
        if first and line.lstrip().startswith("[") and not _is_json(line):
            raise UserError(f"{path}:{number}: looks like one JSON array over several lines; tunelab reads JSON Lines, "
                            f"one object per line (convert it with: jq -c '.[]' {path} > {path.stem}-lines.jsonl)")
        first = False
        try:
            row = _json_line(line)
        except json.JSONDecodeError as e:
            yield number, _Invalid(f"not valid JSON ({e.msg} at column {e.colno})")
        except ValueError:  # Python reads no integer of more than 4,300 digits (a guard against slow parsing)
            yield number, _Invalid("a number too long to read (over 4,300 digits); write it as a string")
        except RecursionError:
            yield number, _Invalid("nested too deeply to read (lists or objects inside each other thousands deep)")
        else:
            if "\\u" in line and _has_lone_surrogate(row):
                yield number, _Invalid("a \\u escape between \\ud800 and \\udfff stands alone, so it is no character; "
                                       "fix or remove that escape")
            else:
                yield number, row


_DECODER = json.JSONDecoder()


def _json_line(line: str) -> Any:
    """`json.loads(line)`, ~1 µs less on the usual line (a million in the data check): the
    decoder's `raw_decode` and a look at what follows it, without `loads`' two whitespace
    matches. A line it does not take as it is goes through `json.loads`, which raises its error."""
    try:
        row, end = _DECODER.raw_decode(line)
    except ValueError:
        return json.loads(line)
    if end < len(line) and line[end:].strip(" \t\n\r"):  # JSON's whitespace only, as `loads` allows
        return json.loads(line)
    return row


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return False
    return True


def _has_lone_surrogate(row: Any) -> bool:
    """Whether a string in `row` holds half of a UTF-16 pair (JSON allows the escape; no text
    encoding can write it, so hashing or tokenizing the row would fail)."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    lines = (line for _, line in text_lines(path))
    reader = csv.DictReader(lines)
    try:
        header = reader.fieldnames
        if header is None:
            return  # an empty file: the caller reports that there are no examples
        _check_csv_header(path, header)
        # Row 1 is the header, so data rows are numbered from 2 as a spreadsheet shows them.
        yield from enumerate(reader, start=2)
    except csv.Error as e:  # a cell over the csv module's limit (131,072 characters), a stray NUL byte
        hint = "; an unclosed quote makes one cell of the rest of the file" if "field larger" in str(e) else ""
        raise UserError(f"{path}:{reader.reader.line_num}: cannot read this CSV row ({e}){hint}; "
                        "fix the row, or give very long texts as JSONL") from None


def _check_csv_header(path: Path, header: list[str]) -> None:
    """A header that fits no shape makes every row wrong: say so once, naming the column.
    (A header that fits a shape but has an extra column is reported row by row, as in JSONL.)"""
    expected = "expected the columns prompt,completion or instruction,input,output or messages or text"
    blank = [i + 1 for i, name in enumerate(header) if not name.strip()]
    if blank:
        raise UserError(f"{path}:1: column {blank[0]} of the header has no name; {expected}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(f"{path}:1: column '{repeated[0]}' appears twice in the header; {expected}")
    columns = dict.fromkeys(header, "")
    if detect_shape(columns) or _prompt_only_shape(columns):
        return
    separator = next((s for s in (";", "\t") if len(header) == 1 and s in header[0]), None)
    if separator:  # Excel saves "CSV" with semicolons where the comma is the decimal mark
        raise UserError(f"{path}:1: the columns are separated by {separator!r}, not commas; save the file as "
                        "comma-separated CSV (in Excel: Save As > CSV UTF-8) or as JSONL")
    known = [k for keys in SHAPE_KEYS.values() for k in keys]
    for name in header:
        close = difflib.get_close_matches(name.strip().lower(), known, n=1)
        if close and name not in known:
            raise UserError(f"{path}:1: unknown column '{name}' in the header; did you mean '{close[0]}'? "
                            f"({expected})")
    raise UserError(f"{path}:1: the header ({','.join(header)}) fits no shape; {expected}, "
                    "with the header on the first line")


@dataclass
class _Invalid:
    reason: str


def detect_shape(row: dict[str, Any]) -> str | None:
    if "chosen" in row or "rejected" in row:  # a pair lacking one side is a malformed pair, not another shape
        return "preference"
    if "text" in row and not {"messages", "prompt", "instruction"} & set(row):
        return "text"
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def unknown_keys(row: dict[str, Any], shape: str) -> list[str]:
    allowed = _ALLOWED_KEYS[shape]
    if row.keys() <= allowed:  # nearly every row: no list to build
        return []
    return sorted(str(k) for k in row if k not in allowed)


_ALLOWED_KEYS = {shape: frozenset((*keys, *METADATA_KEYS, *(PAIR_KEYS if shape == "preference" else ())))
                 for shape, keys in SHAPE_KEYS.items()}


def to_messages(row: dict[str, Any], shape: str) -> list[dict[str, str]]:
    """Convert one row to chat messages; raise RowError naming what is wrong."""
    return convert(row, shape)[0]


def convert(row: dict[str, Any], shape: str) -> tuple[list[dict[str, str]], list[dict[str, str]] | None]:
    """One row as (chat messages, the rejected answer of a preference row, else None); raise
    RowError naming what is wrong."""
    if shape == "preference":
        messages, rejected = _convert_pair(row)
    else:
        messages, rejected = _convert(row, shape), None
    extra = unknown_keys(row, shape)
    if extra:  # a typo ('completoin') or a field the template would silently never see ('system')
        if "None" in extra and None in row:  # csv.DictReader files surplus cells under None
            raise RowError("E_UNKNOWN_KEY", "more cells than header columns")
        pair_keys = PAIR_KEYS if shape == "preference" else ()
        known = ", ".join(f"'{k}'" for k in (*SHAPE_KEYS[shape], *METADATA_KEYS, *pair_keys))
        raise RowError("E_UNKNOWN_KEY", f"unknown field(s) {', '.join(map(repr, extra))} for shape {shape}; "
                       f"allowed: {known}")
    return messages, rejected


def _convert_pair(row: dict[str, Any]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A preference row as (prompt + chosen answer, [rejected answer])."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not {"prompt", "instruction", "input"} & set(row) and isinstance(chosen, list) and isinstance(rejected, list):
        # TRL's implicit prompt: two whole conversations, the turns they share being the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if not shared:
            raise RowError("E_PAIR_PROMPT", "no prompt: give 'prompt', or 'chosen' and 'rejected' as conversations "
                           "that share the turns before their answers")
        row = {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}
    if "instruction" in row or "input" in row:  # LLaMA-Factory's keys
        if "prompt" in row:
            raise RowError("E_PAIR_PROMPT", "give the prompt as 'prompt', or as 'instruction' and 'input', not both")
        prompt = _convert({**row, "output": "-"}, "alpaca")[:-1]
    elif isinstance(row.get("prompt"), list):
        prompt = _convert({"messages": row["prompt"]}, "messages", answered=False)
        if prompt[-1]["role"] == "assistant":
            raise RowError("E_PAIR_PROMPT", "the prompt ends with an assistant message; end it with the user turn "
                           "that 'chosen' and 'rejected' answer")
    else:
        prompt = [_message("user", row.get("prompt"), "prompt")]
    chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
    if chosen["content"].strip() == rejected["content"].strip():
        raise RowError("E_PAIR_IDENTICAL", "'chosen' and 'rejected' are the same answer, so the pair prefers "
                       "nothing; fix the rejected answer or drop the row")
    return [*prompt, chosen], [rejected]


def _answer(row: dict[str, Any], side: str) -> dict[str, str]:
    """One side of a pair: a text, or a list of one assistant message (TRL's conversational shape)."""
    value = row.get(side)
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], dict):
            raise RowError("E_PAIR_ANSWER", f"'{side}' must be a text or a list of one assistant message, "
                           f"got a list of {len(value)}")
        message = value[0]
        if message.get("role") != "assistant":
            raise RowError("E_PAIR_ROLE", f"'{side}' holds a message of role {message.get('role')!r}; an answer "
                           "is the assistant's (put the user turn in 'prompt')")
        value = message.get("content")
    # An empty rejected answer is a real one: a model that stopped at once (a run's corrections
    # hold such answers). An empty chosen answer would teach nothing.
    if value is None or (side == "chosen" and isinstance(value, str) and not value.strip()):
        other = "rejected" if side == "chosen" else "chosen"
        raise RowError("E_PAIR_MISSING", f"no '{side}' answer, so there is no pair; give both '{other}' "
                       f"and '{side}', or write the row as prompt + completion to train on it alone")
    if not isinstance(value, str):
        raise RowError("E_TYPE", f"field '{side}' must be a string, got {type(value).__name__}")
    return {"role": "assistant", "content": value}


def _convert(row: dict[str, Any], shape: str, answered: bool = True) -> list[dict[str, str]]:
    if shape == "text":
        _text(row.get("text"), "text")
        return []
    if shape == "prompt_completion":
        return [_message("user", row.get("prompt"), "prompt"),
                _message("assistant", row.get("completion"), "completion")]
    if shape == "alpaca":
        instruction = _text(row.get("instruction"), "instruction")
        extra_input = row.get("input")
        if extra_input is not None and not isinstance(extra_input, str):
            raise RowError("E_TYPE", f"field 'input' must be a string, got {type(extra_input).__name__}")
        user = f"{instruction}\n\n{extra_input}" if extra_input and extra_input.strip() else instruction
        return [{"role": "user", "content": user}, _message("assistant", row.get("output"), "output")]
    messages = row.get("messages")
    if isinstance(messages, str):  # CSV and some Parquet exports hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError("E_MESSAGES", "field 'messages' is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise RowError("E_MESSAGES", "field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RowError("E_TYPE", f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m or "content" not in m:
            code = "E_ROLE_MISSING" if "role" not in m else "E_CONTENT_MISSING"
            raise RowError(code, f"message {i} needs 'role' and 'content'")
        extra = sorted(str(k) for k in m if k not in MESSAGE_KEYS)
        if extra:
            raise RowError("E_UNKNOWN_KEY", f"message {i} has unknown field(s) {', '.join(map(repr, extra))}; "
                           "allowed: 'role', 'content'")
        if m["role"] not in ROLES:
            raise RowError("E_UNKNOWN_ROLE",
                           f"message {i} has unknown role {m['role']!r}; use system, user or assistant")
        out.append(_message(m["role"], m["content"], f"message {i} content"))
    if answered and not any(m["role"] == "assistant" for m in out):
        raise RowError("E_NO_ASSISTANT", "no assistant message to learn from")
    if out[0]["role"] == "assistant":
        # Nothing comes before it to prompt for it: a chat template renders no empty
        # conversation, and chat and serving never ask for a turn before the first message.
        raise RowError("E_ASSISTANT_FIRST", "message 0 is the assistant's, with nothing before it to answer; "
                       "start with a system message (a greeting after it is trained) or a user message")
    return out


def _text(value: Any, name: str) -> str:
    if value is None:
        raise RowError("E_MISSING_FIELD", f"missing field '{name}'")
    if not isinstance(value, str):
        raise RowError("E_TYPE", f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError("E_EMPTY_CONTENT", f"field '{name}' is empty")
    return value


def _message(role: str, value: Any, name: str) -> dict[str, str]:
    return {"role": role, "content": _text(value, name)}


def iter_examples(path: Path, shape: str = "auto", require_answer: bool = True,
                  split_by: str | None = None, span: Span | None = None) -> Iterator[Example | Problem]:
    """Stream the file (or the lines of `span`, of a JSONL file): one Example per good row, one
    Problem per bad row, in file order; with `split_by`, each Example carries its row's value of
    that field (`group_value`)."""
    path = Path(path)
    tabular = is_tabular(path)
    for number, row in read_rows(path, span):
        if isinstance(row, _Invalid):
            yield Problem(number, "E_JSON", row.reason)
            continue
        if not isinstance(row, dict):
            yield Problem(number, "E_NOT_OBJECT", f"expected a JSON object, got {type(row).__name__}")
            continue
        row_shape = detect_shape(row) if shape == "auto" else shape
        if row_shape is None and not require_answer:
            row_shape = _prompt_only_shape(row)
        if row_shape is None:
            yield Problem(number, "E_SHAPE",
                          f"unknown shape with keys {sorted(map(str, row))}; expected 'messages', "
                          "'prompt'+'completion', 'instruction'+'output', 'text' or 'prompt'+'chosen'+'rejected' "
                          "(or pass --format)")
            continue
        if not require_answer:
            if row_shape == "text":
                yield Problem(number, "E_SHAPE",
                              "a raw 'text' row asks nothing; give prompts as 'prompt' or 'messages'")
                continue
            row = _with_placeholder_answer(row, row_shape)
        try:
            messages, rejected = convert(row, row_shape)
        except RowError as e:
            message = str(e)
            if tabular:  # a spreadsheet user looks for a column, not a field
                message = message.replace("field '", "column '").replace("field(s) '", "column(s) '")
            yield Problem(number, e.code, message)
            continue
        group = group_value(row, split_by) if split_by else None
        yield Example(messages, number, row["text"] if row_shape == "text" else None, group, rejected)


def load_examples(path: Path, shape: str = "auto", require_answer: bool = True,
                  split_by: str | None = None) -> list[Example]:
    """Read and validate every row; raise one UserError listing each bad line.

    With `require_answer=False` (batch generation), rows may lack the reference answer.
    """
    path = Path(path)
    examples: list[Example] = []
    problems: list[str] = []
    for item in iter_examples(path, shape, require_answer, split_by):
        if isinstance(item, Problem):
            problems.append(item.format(path))
        else:
            examples.append(item)
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
    if (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
            and messages[-1].get("role") != "assistant"):
        return {**row, "messages": [*messages, {"role": "assistant", "content": "-"}]}
    return row


def split(
    examples: list[Example], test_size: float, seed: int, groups: dict[int, int] | None = None,
    split_by: str | None = None,
) -> tuple[list[Example], list[Example]]:
    """`split_rows` on a list of examples (in file order, exact copies already dropped), or with
    `split_by`, `split_groups` on their `group` values.

    `groups` maps a line to the first line of its near-duplicate group (`Report.groups` from the
    data check), so the split is the one the check reported.
    """
    import numpy as np

    if split_by:
        lacking = [e.line for e in examples if e.group is None]
        if lacking:
            raise UserError(f"line {lacking[0]}: {missing_group_message(split_by, len(lacking))}")
        ranks = np.array([group_rank(e.group, seed) for e in examples], np.uint64)
        in_test = split_groups(ranks, test_size, split_by)
    else:
        groups = groups or {}
        row_of_line = {e.line: i for i, e in enumerate(examples)}
        ranks = np.array([split_rank(e.key, seed) for e in examples], np.uint64)
        leaders = np.array([row_of_line.get(groups.get(e.line, e.line), i) for i, e in enumerate(examples)], np.int64)
        in_test = split_rows(ranks, leaders, test_size)
    train = [e for e, held_out in zip(examples, in_test) if not held_out]
    test = [e for e, held_out in zip(examples, in_test) if held_out]
    return train, test


def split_rows(ranks, leaders, test_size: float):
    """The train/test split, used by the data check and by training alike: a boolean array,
    true for the rows that go to the test split.

    `ranks[i]` is row i's `split_rank`, `leaders[i]` the row whose rank its whole near-duplicate
    group takes (i itself when alone). The rows of the lowest ranks go to test: reproducible,
    independent of row order, and rows sharing a rank (identical content, one group) land on
    one side together, so the test split may hold a few more rows than asked.
    """
    import numpy as np

    n_test = held_out_count(len(ranks), test_size)
    if n_test >= len(ranks):
        raise UserError(f"--test-size {test_size} leaves no training examples out of {len(ranks)}")
    in_test = np.zeros(len(ranks), bool)
    if n_test > 0:
        group_ranks = np.asarray(ranks)[np.asarray(leaders)]
        cutoff = np.partition(group_ranks, n_test - 1)[n_test - 1]
        in_test = group_ranks <= cutoff
    return in_test


def split_groups(group_ranks, test_size: float, split_by: str):
    """The train/test split by groups (`--split-by`): a boolean array, true for the rows that go
    to the test split. `group_ranks[i]` is the `group_rank` of row i's group, so rows of a group
    share it and no group is on both sides.

    Whole groups go to test in rank order, each while it brings the held-out rows closer to the
    `held_out_count` asked (and at least one group): the share applies to rows, met as nearly as
    whole groups allow, so a few large groups make it coarse (the data check prints the counts).
    """
    import numpy as np

    group_ranks = np.asarray(group_ranks, np.uint64)
    n_test = held_out_count(len(group_ranks), test_size)
    if n_test == 0:
        return np.zeros(len(group_ranks), bool)
    ranks, sizes = np.unique(group_ranks, return_counts=True)  # ascending: the split order
    if len(ranks) < 2:
        raise UserError(f"--split-by {split_by}: every row has the same value, so there is one group and nothing "
                        "to hold out; split by a field with several values, or leave out --split-by")
    taken = held = 0
    for size in sizes:
        if taken and held + size / 2 > n_test:
            break
        held += int(size)
        taken += 1
    if taken == len(ranks):
        raise UserError(f"--test-size {test_size} with --split-by {split_by} leaves no training group out of "
                        f"{len(ranks)}; lower --test-size")
    return group_ranks <= ranks[taken - 1]


def group_value(row: dict[str, Any], split_by: str) -> str | None:
    """The row's value of the field `split_by` as text: a key of the row (`id`, `instruction`), or
    of its `metadata` object written `metadata.customer` (more dots reach into nested objects);
    None when it is missing or null. A spreadsheet's `metadata` column holds its object as JSON text."""
    value: Any = row
    for key in split_by.split("."):
        if isinstance(value, str) and value.lstrip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                return None
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def missing_group_message(split_by: str, count: int) -> str:
    """What to say about `count` rows without the --split-by field (after the first one's line)."""
    more = f", and {count - 1} more {'row lacks' if count == 2 else 'rows lack'} it" if count > 1 else ""
    return (f"no {split_by} to split by (--split-by {split_by}){more}; "
            "give every row that field, or leave out --split-by")


def group_rank(value: str, seed: int) -> int:
    """Where a --split-by group falls in the split order (lowest go to test)."""
    return split_rank(hashlib.sha256(value.encode()).hexdigest(), seed)


def held_out_count(rows: int, test_size: float) -> int:
    """Rows held out of `rows`: `test_size` is a fraction below 1, a count from 1 up."""
    return round(rows * test_size) if test_size < 1 else int(test_size)


def split_rank(key: str, seed: int) -> int:
    """Where an example with content hash `key` falls in the split order (lowest go to test)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")  # the first 16 hex digits


def write_jsonl(path: Path, examples: Iterable[Example]) -> None:
    """Write a run's split (train.jsonl, test.jsonl) as data rows that tunelab itself reads: the
    source line and --split-by group go under `metadata`, so `tunelab eval RUN --data RUN/test.jsonl`
    and `tunelab data check RUN/train.jsonl` accept the file."""
    with Path(path).open("w", encoding="utf-8") as f:
        for e in examples:
            row = {"text": e.text} if e.is_raw else {"messages": e.messages}
            if e.rejected is not None:  # TRL's conversational preference shape
                row = {"prompt": e.prompt_messages(), "chosen": e.messages[-1:], "rejected": e.rejected}
            group = {"group": e.group} if e.group is not None else {}
            f.write(json.dumps({**row, "metadata": {"line": e.line, **group}}, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Example]:
    """Read back a split written by `write_jsonl`; run folders written before the source line
    moved under `metadata` keep it at the top level, and still open."""
    with Path(path).open(encoding="utf-8") as f:
        return [split_example(json.loads(line)) for line in f]


def split_example(row: dict[str, Any]) -> Example:
    """One row of a split file as an Example; KeyError or TypeError when it is not one."""
    where = row.get("metadata") if isinstance(row.get("metadata"), dict) and "line" in row["metadata"] else row
    if "chosen" in row:
        return Example(row["prompt"] + row["chosen"], where["line"], None, where.get("group"), row["rejected"])
    return Example(row.get("messages", []), where["line"], row.get("text"), where.get("group"))
