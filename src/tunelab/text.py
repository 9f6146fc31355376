"""Text helpers every stage shares: one name per meaning, defined once.

- `input_text`: what an answer replies to, the last user message of its conversation (the text
  the copy constraint, copy augmentation and the copied-field detection copy from);
- `normalise_answer`: SQuAD's answer normalisation, for comparing an answer with its reference
  (exact match, novelty of values, whether a value is written in the prompt);
- `normalise_for_dedup`: the words of a text, case-folded, for finding near-duplicate rows;
- `parse_json_answer`: an answer's JSON value when it is an object or a list, or None;
- `json_leaves`, `dotted`, `field_path`: the leaves of a JSON value by path, and the path
  written with list positions (`items.0.name`, a leaf's own place) or without (`items.*.name`,
  the field it belongs to);
- `quoted_spans`, `answer_values`: the values an answer states.

Two normalisations stay apart on purpose: answers are compared up to articles and ASCII
punctuation (SQuAD's rules, which report numbers can be checked against), while duplicate rows
are found on all their words, articles included, with Unicode case folding ("Straße" and
"STRASSE" are the same row).

The standard library only: every layer may import this module.
"""

from __future__ import annotations

import functools
import json
import re
import string

JsonPath = tuple[str | int, ...]
"""Where a leaf sits in a JSON value, outermost first: object keys as str, list positions as int."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WORDS = re.compile(r"\w+")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", flags=re.S)
_QUOTED = re.compile(r"\"([^\"]{2,})\"|'([^']{2,})'|“([^”]{2,})”")


def input_text(messages: list[dict[str, str]]) -> str:
    """The last user message ("" when there is none): of a training row, the one its answer replies
    to; of a prompt, the question. System text and earlier turns (few-shot examples among them)
    are not part of it."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no ASCII punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def normalise_for_dedup(text: str) -> str:
    """The text's words (letters, digits and underscores, any script), case-folded, one space
    apart: rows that differ only in case, punctuation or spacing normalise alike."""
    return " ".join(_WORDS.findall(text.casefold()))


def parse_json_answer(text: str):
    """The JSON value of an answer when it is an object or a list, or None (a bare string or
    number answer is text, not JSON). A ```json fence around it is allowed."""
    text = text.strip()
    fenced = _FENCE.fullmatch(text)
    if fenced:
        text = fenced.group(1)
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def json_leaves(value, path: JsonPath = ()) -> dict[JsonPath, object]:
    """Every leaf (string, number, true, false, null) of a JSON value by its path, in document
    order. Empty objects and lists have no leaves."""
    if isinstance(value, dict):
        found = {}
        for key, item in value.items():
            found.update(json_leaves(item, (*path, str(key))))
        return found
    if isinstance(value, list):
        found = {}
        for position, item in enumerate(value):
            found.update(json_leaves(item, (*path, position)))
        return found
    return {path: value}


def dotted(path: JsonPath) -> str:
    """A leaf's own place, list positions kept: `items.0.name`."""
    return ".".join(map(str, path))


@functools.lru_cache(maxsize=4096)  # a file has few fields, met in row after row
def field_path(path: JsonPath) -> str:
    """The field a leaf belongs to, every position of a list as one: `items.*.name`."""
    return ".".join("*" if isinstance(part, int) else part for part in path)


def quoted_spans(text: str) -> list[str]:
    """The spans of a text in double, single or curly quotes (two characters or more), in order."""
    return [next(group for group in match.groups() if group) for match in _QUOTED.finditer(text)]


def answer_values(text: str) -> dict[JsonPath, str]:
    """The values an answer states: the string leaves of a JSON answer that are not blank, by path;
    or else the quoted spans of a plain-text answer, as ("quoted", 0), ("quoted", 1), ..."""
    parsed = parse_json_answer(text)
    if parsed is not None:
        return {path: leaf for path, leaf in json_leaves(parsed).items() if isinstance(leaf, str) and leaf.strip()}
    return {("quoted", i): span for i, span in enumerate(quoted_spans(text))}
