"""Scoring one answer against its reference, the bucket it falls in, and bootstrap intervals.

Plain Python (and numpy for the bootstrap), so every number can be checked by hand:
- `exact_match`: equal after `text.normalise_answer` (lower case, punctuation, articles and
  extra spaces dropped), or equal as parsed JSON when the reference is JSON;
- `token_f1`: overlap of word tokens (SQuAD's F1), partial credit for partly right answers;
- `rouge_l`: F-measure of the longest common subsequence of word tokens;
- `json_fields`: for a JSON reference, whether the answer parses and which leaf fields match;
- `extractive_paths` / `hallucinated_values`: the fields an extraction answer should copy from
  its prompt, and which of the answer's values there (`text.answer_values`) appear nowhere in
  the prompt even up to case, punctuation and the writing of numbers, and differ from the
  reference (hallucinated values);
- `bucket`: each answer in exactly one of BUCKETS;
- `bootstrap_interval`, `accuracy_by_kind`: 95% intervals, overall and on the held-out rows
  whose values training never showed (data/novelty.py's kinds).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from tunelab.text import JsonPath, answer_values, dotted, field_path, json_leaves, normalise_answer, parse_json_answer

BUCKETS = ("correct", "wrong", "hallucinated value", "invalid format", "empty", "no stop", "repetition loop")
"""Where each answer lands, checked in this order: empty, correct, repetition loop, no stop,
invalid format, hallucinated value, wrong."""


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def exact_match(answer: str, reference: str) -> float:
    expected = parse_json_answer(reference)
    if expected is not None:
        return float(parse_json_answer(answer) == expected)
    return float(normalise_answer(answer) == normalise_answer(reference))


def token_f1(answer: str, reference: str) -> float:
    predicted, expected = words(answer), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    predicted, expected = words(answer), words(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    # Longest common subsequence, one row of the dynamic programme at a time.
    previous = [0] * (len(expected) + 1)
    for p in predicted:
        current = [0]
        for j, e in enumerate(expected):
            current.append(previous[j] + 1 if p == e else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(predicted), lcs / len(expected)
    return 2 * precision * recall / (precision + recall)


def _same_leaf(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalise_answer(a) == normalise_answer(b)
    return a == b


def json_fields(answer: str, reference: str) -> dict[str, bool] | None:
    """For a JSON reference: each of its leaf fields -> whether the answer has the same value
    there. None when the reference is not JSON; every field False when the answer is not."""
    expected = parse_json_answer(reference)
    if expected is None:
        return None
    parsed = parse_json_answer(answer)
    got = json_leaves(parsed) if parsed is not None else {}
    return {dotted(path): path in got and _same_leaf(got[path], value)
            for path, value in json_leaves(expected).items()}


_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|\d+(?:\.\d+)?")


def _number(text: str) -> str:
    """A number written the plainest way: no thousands commas, leading or trailing zeros."""
    value = text.replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value.lstrip("0") or "0"


def value_words(text: str) -> list[str]:
    """Lower-case words and numbers, punctuation and spaces as separators and each number
    written the plainest way: "09:45am" -> ["9", "45", "am"], "1,200.50" -> ["1200.5"]."""
    return [_number(m.group()) if m.group()[0].isdigit() else m.group().lower()
            for m in re.finditer(rf"{_NUMBER.pattern}|[^\W\d_]+", text)]


def in_prompt(value: str, prompt: str) -> bool:
    """Whether `value` is written in `prompt`, up to what exact match ignores (case, punctuation,
    articles, spaces) and trivial rewriting of numbers ("09:45" in "9:45 pm", "1200" in "1,200")."""
    if normalise_answer(value) in normalise_answer(prompt):
        return True
    wanted, written = value_words(value), value_words(prompt)
    return bool(wanted) and any(written[i : i + len(wanted)] == wanted
                                for i in range(len(written) - len(wanted) + 1))


def extractive_paths(prompts: list[str], references: list[str], share: float = 0.8) -> set[str]:
    """The answer fields meant to be copied from the input: those whose reference value is found
    in the prompt in at least `share` of the examples that have the field (list positions count
    as one field). Empty when the task is not extraction."""
    seen: Counter = Counter()
    copied: Counter = Counter()
    for prompt, reference in zip(prompts, references):
        for path, value in answer_values(reference).items():
            general = field_path(path)
            seen[general] += 1
            copied[general] += in_prompt(value, prompt)
    return {path for path, n in seen.items() if copied[path] >= share * n}


def hallucinated_values(answer: str, prompt: str, paths: set[str], reference: str | None = None) -> tuple[int, int]:
    """(values of the answer in extractive fields, how many of them appear nowhere in the prompt).
    A value equal to the reference's at the same place (after `normalise_answer`) is never counted:
    the task rewrites it ("Wed" to "wednesday"), and the answer rewrote it the same way."""
    expected: dict[JsonPath, str] = ({p: normalise_answer(v) for p, v in answer_values(reference).items()}
                                     if reference else {})
    values = [(p, v) for p, v in answer_values(answer).items() if field_path(p) in paths]
    made_up = [v for p, v in values if expected.get(p) != normalise_answer(v) and not in_prompt(v, prompt)]
    return len(values), len(made_up)


def repetition_loop(text: str, min_repeats: int = 4, min_tokens: int = 12) -> bool:
    """True when some n-gram of words (n up to 10) repeats back to back at least `min_repeats`
    times, covering at least `min_tokens` tokens: the loop a model falls into when it cannot stop."""
    tokens = re.findall(r"\w+|[^\w\s]", text.lower())
    for n in range(1, 11):
        needed = max(min_repeats, -(-min_tokens // n))
        for start in range(len(tokens) - needed * n + 1):
            gram = tokens[start : start + n]
            copies = 1
            while tokens[start + copies * n : start + (copies + 1) * n] == gram:
                copies += 1
            if copies >= needed:
                return True
    return False


def bucket(answer: str, reference: str, stopped: bool, hallucinated: int) -> str:
    """The one bucket of BUCKETS this answer falls in."""
    if not answer.strip():
        return "empty"
    if exact_match(answer, reference):
        return "correct"
    if repetition_loop(answer):
        return "repetition loop"
    if not stopped:
        return "no stop"
    if parse_json_answer(reference) is not None and parse_json_answer(answer) is None:
        return "invalid format"
    if hallucinated:
        return "hallucinated value"
    return "wrong"


def bootstrap_interval(values, totals=None, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `values` (pass per-example differences
    for a paired interval), or of sum(values) / sum(totals) when `totals` is given (a rate over
    examples of different sizes). A fixed seed, so results are reproducible."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    if totals is None:
        estimates = values[picks].mean(axis=1)
    else:
        totals = np.asarray(totals, dtype=float)
        estimates = values[picks].sum(axis=1) / np.maximum(totals[picks].sum(axis=1), 1)
    low, high = np.percentile(estimates, [2.5, 97.5])
    return float(low), float(high)


def accuracy_by_kind(kinds: list[str], correct: list[float]) -> dict[str, dict | None]:
    """Exact match on the "novel" rows and on the "seen" rows (`novelty.Novelty.kinds`): {"value",
    "low", "high" (95% bootstrap interval), "rows"}, or None for a kind without rows."""
    out: dict[str, dict | None] = {}
    for kind in ("novel", "seen"):
        picked = [float(c) for k, c in zip(kinds, correct) if k == kind]
        if not picked:
            out[kind] = None
            continue
        low, high = bootstrap_interval(picked)
        out[kind] = {"value": sum(picked) / len(picked), "low": low, "high": high, "rows": len(picked)}
    return out
