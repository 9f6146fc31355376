"""The data check of a large JSONL file in parts, one process each: the same report as one pass
over the file, whatever the parts (their size is made tiny here, so that a small file has many)."""

import json
import random

import pytest

from tunelab.config import DataOptions
from tunelab.data import check as check_mod
from tunelab.errors import UserError


def rows(n: int) -> list[str]:
    """Rows of every shape, with exact and near duplicates, bad lines, copied fields, unicode."""
    rng = random.Random(0)
    names = ["Zoë Åberg", "José Núñez", "李小龙", "Anna O'Neil", "Cy", "Cyrus"]
    lines = []
    for i in range(n):
        name = rng.choice(names)
        kind = i % 6
        if kind == 0:
            row = {"messages": [{"role": "system", "content": "Extract."},
                                {"role": "user", "content": f"Book {name} for {i % 7} on day {i % 5}"},
                                {"role": "assistant", "content": json.dumps({"name": name, "guests": i % 7,
                                                                             "people": [{"n": name}]})}],
                   "metadata": {"customer": i % 13}}
        elif kind == 1:
            row = {"instruction": f"Translate 'hello {i % 50}'", "output": f"\"bonjour {i % 50}\" she said"}
        elif kind == 2:
            row = {"text": f"Document number {i % 40}, with PUNCTUATION!!! and ÉTÉ. " * (1 + i % 3)}
        elif kind == 3:
            row = {"prompt": f"Extract: {name} at {i % 24}:00",
                   "completion": "```json\n" + json.dumps({"name": name, "time": f"{i % 24}:00"}) + "\n```",
                   "metadata": {"customer": "walk-in"}}
        elif kind == 4 and i % 12 == 4:
            row = {"prompt": "Same question", "completion": "Same answer"}
        elif kind == 4:  # a preference pair, its chosen answer re-casing a name of the input
            row = {"prompt": f"note: call {name.lower()} back", "chosen": f"Call {name} back.",
                   "rejected": f"Call {name[::-1]} back."}
        else:
            row = {"prompt": f"Question {i}: which name, {name}?", "completion": f"The name is '{name}'"}
        lines.append(json.dumps(row, ensure_ascii=i % 2 == 0))
    for at, bad in [(7, '{"prompt": "x", "completion": }'), (n // 2, "[1, 2]"), (n - 3, '{"question": "q"}'),
                    (n // 3, '{"prompt": "\\ud800", "completion": "y"}'), (n // 4, "")]:
        lines[at] = bad
    return lines


def in_parts(monkeypatch, part_bytes: int) -> None:
    monkeypatch.setattr(check_mod, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(check_mod, "PART_BYTES", part_bytes)
    monkeypatch.setattr(check_mod, "_workers", lambda path: 2)


def report(path, options) -> dict:
    found = check_mod.check(path, options)
    return {**found.to_dict(), "table": found.table(), "groups": found.groups,
            "copies": [found.copies.fields(), found.copies.paths, found.copies.words, found.copies.house.words()]}


def check_in_parts(tmp_path, monkeypatch, options, part_sizes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\ufeff" + "\n".join(rows(600)) + "\n", encoding="utf-8")
    whole = report(path, options)
    assert whole["rows"] == 599 and whole["duplicates"]["exact"]["count"] and whole["duplicates"]["near"]["count"]
    assert whole["shapes"]["pair"] and "(text)" in [f.path for f in whole["copies"][0]]
    for part_bytes in part_sizes:
        in_parts(monkeypatch, part_bytes)
        assert report(path, options) == whole


def test_parts_give_the_report_of_one_pass(tmp_path, monkeypatch):
    check_in_parts(tmp_path, monkeypatch, DataOptions(), [5000])


@pytest.mark.slow
@pytest.mark.parametrize("options", [DataOptions(), DataOptions(seed=3, test_size=0.25),
                                     DataOptions(split_by="metadata.customer")])
def test_parts_of_any_size_give_the_report_of_one_pass(tmp_path, monkeypatch, options):
    check_in_parts(tmp_path, monkeypatch, options, [1, 1 << 20])


def test_spans_cover_the_file_in_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"a\nbb\n\nccc\ndddd")  # no newline at the end
    monkeypatch.setattr(check_mod, "PART_BYTES", 3)
    spans = list(check_mod._spans(path))
    assert [(s.start, s.end, s.line) for s in spans] == [(0, 5, 1), (5, 10, 3), (10, 14, 5)]


@pytest.mark.slow
def test_a_line_that_is_not_utf8_in_a_later_part_is_the_same_error(tmp_path, monkeypatch):
    path = tmp_path / "data.jsonl"
    lines = [line.encode() for line in rows(300)]
    lines[250] = b'{"prompt": "caf\xe9", "completion": "x"}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(UserError) as one_pass:
        check_mod.check(path, DataOptions())
    in_parts(monkeypatch, 2000)
    with pytest.raises(UserError) as parts:
        check_mod.check(path, DataOptions())
    assert str(parts.value) == str(one_pass.value) and f"{path}:251: not UTF-8" in str(one_pass.value)
