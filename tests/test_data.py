import json

import pytest

from tunelab.data import load as data
from tunelab.errors import UserError


def test_three_shapes_become_messages(tmp_path, write_jsonl):
    rows = [
        {"prompt": "p", "completion": "c"},
        {"instruction": "do", "input": "this", "output": "done"},
        {"instruction": "do", "output": "done"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
    ]
    examples = data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.line for e in examples] == [1, 2, 3, 4]
    assert examples[0].messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert examples[1].messages[0]["content"] == "do\n\nthis"
    assert examples[2].messages[0]["content"] == "do"
    assert examples[3].reference == "a2"
    assert examples[3].prompt_messages()[-1] == {"role": "user", "content": "u2"}


def test_csv_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    csv_path = tmp_path / "d.csv"
    csv_path.write_text('prompt,completion\nhello,world\n"a, b","c\nd"\n')
    examples = data.load_examples(csv_path)
    assert [e.line for e in examples] == [2, 3]
    assert examples[1].messages[1]["content"] == "c\nd"

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.table({"messages": [messages, messages[:1] + [{"role": "assistant", "content": "b"}]]}),
                   tmp_path / "d.parquet")
    examples = data.load_examples(tmp_path / "d.parquet")
    assert [e.reference for e in examples] == ["a", "b"]


def test_forced_format_and_unknown_shape(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"d.jsonl:1: E_SHAPE unknown shape .*--format"):
        data.load_examples(path)
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(UserError, match=r"e.jsonl:1: E_MISSING_FIELD missing field 'instruction'"):
        data.load_examples(path, "alpaca")


def test_every_bad_line_is_listed(tmp_path, write_jsonl):
    rows = [
        {"prompt": "ok", "completion": "ok"},
        "{not json",
        "[1, 2]",
        {"prompt": "p"},
        {"prompt": "p", "completion": "  "},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        {"prompt": 3, "completion": "c"},
    ]
    with pytest.raises(UserError) as caught:
        data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    lines = caught.value.lines()
    assert len(lines) == 7
    assert lines[0].endswith("d.jsonl:2: E_JSON not valid JSON "
                             "(Expecting property name enclosed in double quotes at column 2)")
    assert "d.jsonl:3: E_NOT_OBJECT expected a JSON object, got list" in lines[1]
    assert "d.jsonl:4: E_SHAPE unknown shape" in lines[2]
    assert "d.jsonl:5: E_EMPTY_CONTENT field 'completion' is empty" in lines[3]
    assert "d.jsonl:6: E_NO_ASSISTANT no assistant message" in lines[4]
    assert "d.jsonl:7: E_UNKNOWN_ROLE message 0 has unknown role 'robot'" in lines[5]
    assert "d.jsonl:8: E_TYPE field 'prompt' must be a string, got int" in lines[6]


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl: no examples found"):
        data.load_examples(tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match="nope.jsonl: file not found"):
        data.load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(UserError, match="unknown file type '.txt'"):
        data.load_examples(tmp_path / "d.txt")


def test_rows_without_answers_for_generation(tmp_path, write_jsonl):
    rows = [{"prompt": "a"}, {"instruction": "b"}, {"messages": [{"role": "user", "content": "c"}]},
            {"prompt": "d", "completion": "ignored"}]
    examples = data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows), require_answer=False)
    assert [e.prompt_messages() for e in examples] == [[{"role": "user", "content": x}] for x in "abcd"]


def _examples(n):
    return [data.Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], i + 1)
            for i in range(n)]


def test_split_is_reproducible_and_order_independent():
    examples = _examples(200)
    train, test = data.split(examples, 0.1, seed=0)
    assert len(test) == 20 and len(train) == 180
    again_train, again_test = data.split(list(reversed(examples)), 0.1, seed=0)
    assert {e.line for e in again_test} == {e.line for e in test}
    assert {e.line for e in data.split(examples, 0.1, seed=1)[1]} != {e.line for e in test}
    assert len(data.split(examples, 5, seed=0)[1]) == 5


def test_duplicates_never_straddle_the_split():
    examples = _examples(50)
    duplicated = examples + [data.Example(e.messages, 100 + e.line) for e in examples]
    train, test = data.split(duplicated, 0.2, seed=0)
    assert not {e.key for e in train} & {e.key for e in test}
    with pytest.raises(UserError, match="leaves no training examples"):
        data.split(examples, 50, seed=0)


def test_jsonl_round_trip(tmp_path):
    examples = _examples(3)
    examples[1].group = "acme"
    data.write_jsonl(tmp_path / "s.jsonl", examples)
    assert data.read_jsonl(tmp_path / "s.jsonl") == examples
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0]["metadata"] == {"line": 1} and rows[1]["metadata"] == {"line": 2, "group": "acme"}
    # A run's split is a data file like any other: the data reader accepts it as it stands.
    assert [e.messages for e in data.load_examples(tmp_path / "s.jsonl")] == [e.messages for e in examples]


def test_a_split_written_before_metadata_still_reads(tmp_path):
    old = tmp_path / "test.jsonl"
    old.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                               "line": 7, "group": "acme"}) + "\n" + json.dumps({"text": "doc", "line": 9}) + "\n")
    assert [(e.line, e.group, e.text) for e in data.read_jsonl(old)] == [(7, "acme", None), (9, None, "doc")]


def test_raw_text_shape_and_metadata_keys(tmp_path, write_jsonl):
    rows = [{"text": "A document.", "id": 7}, {"prompt": "p", "completion": "c", "metadata": {"source": "x"}},
            {"text": "Forced.", "title": "not a key of this shape"}]
    with pytest.raises(UserError) as caught:
        data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows))
    assert caught.value.lines() == [f"{tmp_path / 'd.jsonl'}:3: E_UNKNOWN_KEY unknown field(s) 'title' for shape "
                                    "text; allowed: 'text', 'id', 'metadata'"]
    examples = data.load_examples(write_jsonl(tmp_path / "e.jsonl", rows[:2]))
    assert examples[0].is_raw and examples[0].text == "A document." and examples[0].messages == []
    assert not examples[1].is_raw and examples[1].reference == "c"
    data.write_jsonl(tmp_path / "s.jsonl", examples)
    assert data.read_jsonl(tmp_path / "s.jsonl") == examples
    assert data.load_examples(write_jsonl(tmp_path / "f.jsonl", [{"text": "t"}]), "text")[0].text == "t"


def test_split_keeps_groups_on_one_side():
    examples = _examples(60)
    groups = {line: 1 for line in range(2, 11)}  # lines 1-10 are one group of near duplicates
    for seed in range(5):
        train, test = data.split(examples, 0.5, seed, groups=groups)
        sides = {e.line in {t.line for t in test} for e in examples[:10]}
        assert len(sides) == 1 and len(train) + len(test) == 60
    assert data.split(examples, 0.1, 0, groups={})[1] == data.split(examples, 0.1, 0)[1]
