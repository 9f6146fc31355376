"""Atomic writes: the file holds the old text or the new, never a part, and no partial is left."""

import json

import pytest

from tunelab.files import write_jsonl_atomic, write_text_atomic


def test_write_replaces_and_leaves_no_partial(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text("old")
    write_text_atomic(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(path), "write_text", full_disk)
    with pytest.raises(OSError):
        write_text_atomic(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_jsonl_rows_one_a_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl_atomic(path, iter([{"a": "é"}, {"b": 2}]))
    assert [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] == [{"a": "é"}, {"b": 2}]
    assert "é" in path.read_text(encoding="utf-8")
