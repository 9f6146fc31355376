"""Structured answers: the `--json-schema` a teacher's answers must match.

The schema is asked for as structured output (`response_format` `json_schema`, see ask.py) and
every answer is validated here with `jsonschema`, whatever the endpoint claims to enforce: many
servers ignore `response_format`, and some wrap the JSON in a Markdown code fence.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from tunelab.errors import UserError


def read_schema(path: Path) -> dict:
    """The JSON schema in `path`, checked against its own meta-schema."""
    path = Path(path)
    where = f"--json-schema {path}"
    if path.is_dir():
        raise UserError(f"{where}: is a folder; name the JSON schema file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not a text file (not UTF-8); --json-schema takes a JSON schema file") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror or type(e).__name__})") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); --json-schema takes a JSON schema") from None
    if not isinstance(schema, dict):
        raise UserError(f"{path}: a JSON schema is an object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"{path}: not a valid JSON schema ({e.message})") from None
    return schema


def answer_problem(answer: str, schema: dict) -> tuple[str, str] | None:
    """(reason, detail) when the answer is not JSON matching the schema, else None.

    A Markdown code fence around the JSON is accepted (and removed by `strip_fence`).
    """
    try:
        value = json.loads(strip_fence(answer))
    except json.JSONDecodeError as e:
        return "invalid_json", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path))
    return "schema", (f"at {where}: " if where else "") + error.message


def strip_fence(answer: str) -> str:
    """The answer without a Markdown code fence around it (```json ... ```), if it has one."""
    text = answer.strip()
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        return text[text.index("\n") + 1 : -3].strip()
    return text
