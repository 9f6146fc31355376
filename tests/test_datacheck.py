import hashlib
import json
import random
from pathlib import Path

import pytest

from tunelab.cli import main
from tunelab.config import DataOptions
from tunelab.data import load as data
from tunelab.data.check import check
from tunelab.template import NAMED, Template

TEMPLATES = Path(__file__).parent / "data" / "templates"


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


BAD_ROWS = [
    ("{not json", "E_JSON"),
    ("[1, 2]", "E_NOT_OBJECT"),
    ({"question": "q"}, "E_SHAPE"),
    ({"messages": []}, "E_MESSAGES"),
    ({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}, "E_ROLE_MISSING"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}, "E_CONTENT_MISSING"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "E_UNKNOWN_ROLE"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " \n"}]}, "E_EMPTY_CONTENT"),
    ({"messages": [{"role": "user", "content": "x"}]}, "E_NO_ASSISTANT"),
    ({"prompt": "p", "completion": "c", "completoin": "typo"}, "E_UNKNOWN_KEY"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y"}]},
     "E_UNKNOWN_KEY"),
    ({"prompt": ["a list"], "completion": "c"}, "E_TYPE"),
    ({"instruction": "do", "output": "ok", "input": 3}, "E_TYPE"),
    ({"text": ""}, "E_EMPTY_CONTENT"),
]


def test_every_format_error_is_listed_with_its_line_and_code(tmp_path, capsys, write_jsonl):
    rows = [chat("fine", "fine")] + [row for row, _ in BAD_ROWS] + ["{broken"] * 25
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check(path, DataOptions())
    expected = [(i + 2, code) for i, (_, code) in enumerate(BAD_ROWS)] + [(len(BAD_ROWS) + 2 + i, "E_JSON")
                                                                          for i in range(25)]
    assert [(p.line, p.code) for p in report.errors] == expected
    assert report.valid == 1 and report.rows == len(rows)
    # The command lists the first 20, saves them all, exits with 2 and trains nothing.
    assert main(["data", "check", str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("d.jsonl:2: E_JSON not valid JSON "
                           "(Expecting property name enclosed in double quotes at column 2)")
    assert err[-1].endswith(f"... and {len(expected) - 20} more; "
                            f"all are listed in {tmp_path / 'report' / 'data_check.json'}")
    saved = json.loads((tmp_path / "report" / "data_check.json").read_text())
    assert [(e["line"], e["code"]) for e in saved["errors"]] == expected
    assert saved["error_counts"]["E_JSON"] == 26


def test_generation_inputs_still_need_no_answer(tmp_path, write_jsonl):
    rows = [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}, {"text": "c"}]
    with pytest.raises(Exception, match=r"d.jsonl:3: E_SHAPE a raw 'text' row asks nothing"):
        data.load_examples(write_jsonl(tmp_path / "d.jsonl", rows), require_answer=False)
    examples = data.load_examples(write_jsonl(tmp_path / "e.jsonl", rows[:2]), require_answer=False)
    assert [e.prompt_messages()[-1]["content"] for e in examples] == ["a", "b"]


def test_csv_and_parquet_problems_name_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.csv").write_text("prompt,completion\nhello,world\nq,\n")
    (tmp_path / "e.csv").write_text("prompt,completion,notes\nhello,world,mine\n")
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", None]}), tmp_path / "d.parquet")
    problems = [p.format(f) for f in ("d.csv", "e.csv", "d.parquet") for p in check(tmp_path / f, DataOptions()).errors]
    assert problems == [
        "d.csv:3: E_EMPTY_CONTENT column 'completion' is empty",
        "e.csv:2: E_UNKNOWN_KEY unknown column(s) 'notes' for shape prompt_completion; "
        "allowed: 'prompt', 'completion', 'id', 'metadata'",
        "d.parquet:2: E_MISSING_FIELD missing column 'completion'",
    ]


def test_token_checks_and_truncation_policy_counts(tmp_path, tokenizer, write_jsonl):
    template = Template.for_model(tokenizer)
    rows = [chat(f"Short question {i}?", f"Short answer {i}.") for i in range(6)]
    rows.append(chat("Short question?", "A very long answer. " * 30))  # line 7: longer than the limit
    rows.append(chat("A very long question. " * 30, "Short answer."))  # line 8: the prompt alone is too long
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    limit = 60
    assert len(template.encode(rows[6]["messages"]).input_ids) > limit
    assert len(template.encode_prompt(rows[7]["messages"][:1])) > limit

    def run(policy):
        return check(path, DataOptions(max_length=limit, truncation=policy), template)

    drop = run("drop")
    assert dict(drop.outcomes) == {"kept": 6, "dropped": 2, "prompt_over_max_length": 1}
    assert [(p.line, p.code) for p in drop.warnings if p.code == "W_DROPPED"] == [(7, "W_DROPPED"), (8, "W_DROPPED")]
    assert "the prompt alone is" in drop.warnings[1].message and not drop.errors
    truncate = run("truncate")
    assert dict(truncate.outcomes) == {"kept": 6, "truncated": 1, "no_trainable": 1, "prompt_over_max_length": 1}
    assert [(p.line, p.code) for p in truncate.errors] == [(8, "E_NO_TRAINABLE")]
    assert [p.line for p in truncate.warnings if p.code == "W_TRUNCATED"] == [7]
    error = run("error")
    assert [(p.line, p.code) for p in error.errors] == [(7, "E_TOO_LONG"), (8, "E_TOO_LONG")]
    assert truncate.trainable["min"] == 0 and drop.trainable["min"] > 0
    assert drop.lengths["max"] == max(len(template.encode(r["messages"]).input_ids) for r in rows)


def test_a_template_that_drops_the_end_of_turn_is_an_error(tmp_path, tokenizer, write_jsonl):
    # Closes an assistant turn only when the answer is short: long answers never learn to stop.
    source = ("{% for m in messages %}{% if m.role == 'assistant' %}{{ m.content }}"
              "{% if m.content | length < 20 %}<|im_end|>{% endif %}\n{% else %}{{ m.content + '\n' }}{% endif %}"
              "{% endfor %}")
    template = Template(tokenizer, "custom", source)
    path = write_jsonl(tmp_path / "d.jsonl", [chat("q", "short"), chat("q2", "a much longer answer than that")])
    report = check(path, DataOptions(), template)
    assert [(p.line, p.code) for p in report.errors] == [(2, "E_NO_EOS")]


def test_double_bos_control_text_and_template_rejections_are_reported(tmp_path, tokenizer, write_jsonl):
    rows = [chat("What does <|im_end|> do?", "It ends a turn."), chat("hi", "hello"),
            {"messages": [{"role": "system", "content": "s"}, *chat("q", "a")["messages"]]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    doubled = Template(tokenizer, "doubled", "{{ bos_token }}" + NAMED["chatml"])  # <|im_start|> is this BOS
    report = check(path, DataOptions(), doubled)
    assert report.warning_counts["W_DOUBLE_BOS"] == 3
    assert [(p.line, p.code) for p in report.warnings if p.code == "W_CONTROL_TEXT"] == [(1, "W_CONTROL_TEXT")]
    mistral = Template(tokenizer, "mistral", (TEMPLATES / "mistral.jinja").read_text())
    report = check(path, DataOptions(), mistral)
    assert [(p.line, p.code) for p in report.errors] == [(3, "E_TEMPLATE")]
    assert "cannot render this conversation: Conversation roles must alternate" in report.errors[0].message


def sentence(i: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    return " ".join(f"{words[(i * 7 + k * 3) % 20]}{(i * 31 + k) % 97}" for k in range(25))


def test_duplicates_are_dropped_near_duplicates_kept_together(tmp_path, write_jsonl):
    rows = [chat(f"Question {sentence(i)}", f"Answer {i}") for i in range(40)]
    rows += [rows[3], rows[5], rows[3]]  # lines 41-43: exact copies
    near = [chat(f"Question {sentence(i)} please", f"Answer {i}") for i in range(10, 20)]  # lines 44-53
    rows += near
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    options = DataOptions(test_size=0.5, seed=3)
    report = check(path, options)
    assert report.exact_pairs == [(4, 41), (6, 42), (4, 43)] and report.duplicate_lines == {41, 42, 43}
    assert [(a, b) for a, b, _ in report.near_pairs] == [(11 + i, 44 + i) for i in range(10)]
    assert all(similarity >= 0.8 for _, _, similarity in report.near_pairs)
    assert report.leaked_count == 0
    # The split train makes from the same groups agrees with the report and keeps each pair together.
    examples = [e for e in data.load_examples(path) if e.line not in report.duplicate_lines]
    train, test = data.split(examples, options.test_size, options.seed, groups=report.groups)
    assert [e.line for e in train] == report.train_lines.tolist()
    assert [e.line for e in test] == report.test_lines.tolist()
    assert (len(train), len(test)) == (report.train_count, report.test_count)
    test_lines = {e.line for e in test}
    assert all((a in test_lines) == (b in test_lines) for a, b, _ in report.near_pairs)
    # Without the groups, a plain hash split puts some near duplicates on both sides.
    _, naive_test = data.split(examples, options.test_size, options.seed)
    naive_lines = {e.line for e in naive_test}
    assert any((a in naive_lines) != (b in naive_lines) for a, b, _ in report.near_pairs)


def test_a_group_too_large_for_one_side_is_split_and_the_leaks_listed(tmp_path, write_jsonl):
    rows = [chat(f"Question {sentence(i)}", f"Answer {i}") for i in range(40)]
    rows += [chat(f"Question {sentence(7)} version {i}", "Answer 7") for i in range(20)]  # lines 41-60 + line 8
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    report = check(path, DataOptions(test_size=0.2))
    assert report.warning_counts["W_LARGE_GROUP"] == 1
    assert report.leaked_count > 0 and report.warning_counts["W_LEAK"] == report.leaked_count
    assert all(b > 40 or b == 8 for _, b in report.leaked_pairs)
    assert report.test_count == 12


def test_raw_text_rows_are_chunked(tmp_path, tokenizer, write_jsonl):
    template = Template.for_model(tokenizer)
    rows = [{"text": "Tiny document."}, {"text": "A longer document with many words. " * 20}]
    report = check(write_jsonl(tmp_path / "raw.jsonl", rows), DataOptions(max_length=32), template)
    assert dict(report.shapes) == {"text": 2} and not report.errors
    assert "2 read, 2 valid, 2 raw-text documents\n" in report.table()
    assert dict(report.outcomes) == {"kept": 1, "chunked": 1}
    assert report.trainable["max"] == report.lengths["max"]  # every token of a document is trained


def test_the_command_prints_a_summary_and_saves_the_report(tmp_path, tiny_model_dir, capsys, write_jsonl):
    rows = [chat(f"Question {i}", f"Answer {i}") for i in range(10)] + [chat("Question", "word " * 200)]
    path = write_jsonl(tmp_path / "d.jsonl", rows + rows[:1])
    out = tmp_path / "report"
    assert main(["data", "check", str(path), "--base", str(tiny_model_dir), "--max-length", "64",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact duplicates     1" in printed and "W_DROPPED" in printed and "--truncation drop" in printed
    assert "12 read, 12 valid, 12 conversations\n" in printed
    saved = json.loads((out / "data_check.json").read_text())
    assert saved["duplicates"]["exact"]["pairs"] == [[1, 12]]
    assert saved["truncation"] == {"policy": "drop", "kept": 11, "dropped": 1}  # the copy is counted here too
    assert saved["lengths"]["unit"] == "tokens" and sum(c for _, _, c in saved["lengths"]["histogram"]) == 11
    assert main(["data", "check", str(path), "--base", str(tiny_model_dir), "--max-length", "8"]) != 0
    assert "E_ALL_DROPPED every example is longer than --max-length 8" in capsys.readouterr().err
    histogram = (out / "length_histogram.txt").read_text()
    assert histogram.startswith("Example length in tokens (--max-length 64)") and "<- --max-length" in histogram


@pytest.mark.slow
def test_training_splits_exactly_as_the_report_says(tmp_path, tiny_model_dir, write_jsonl):
    """RUN/split.json holds the lines of the report's split, and every W_LEAK pair straddles it."""
    rows = [chat(f"Question {sentence(i)}", f"Answer {i}") for i in range(40)]
    rows += [rows[3], rows[5]]  # lines 41-42: exact copies, in neither split
    rows += [chat(f"Question {sentence(i)} please", f"Answer {i}") for i in range(10, 20)]  # lines 43-52: pairs
    rows += [chat(f"Question {sentence(7)} version {i}", "Answer 7") for i in range(20)]  # lines 53-72: a large group
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", str(path), "--base", str(tiny_model_dir), "--out", str(out), "--max-steps", "1",
                 "--test-size", "0.2", "--seed", "3"]) == 0
    split = json.loads((out / "split.json").read_text())
    report = check(path, DataOptions(test_size=0.2, seed=3))
    assert split["train_lines"] == report.train_lines.tolist()
    assert split["test_lines"] == report.test_lines.tolist()
    for name in ("train", "test"):
        written = [json.loads(line)["metadata"]["line"] for line in (out / f"{name}.jsonl").read_text().splitlines()]
        assert written == split[f"{name}_lines"]
    saved = json.loads((out / "data_check.json").read_text())
    assert (saved["split"]["train"], saved["split"]["test"]) == (len(split["train_lines"]), len(split["test_lines"]))
    train, test = set(split["train_lines"]), set(split["test_lines"])
    assert not train & test and not {41, 42} & (train | test) and len(train | test) == len(rows) - 2
    leaked = [tuple(pair) for pair in saved["split"]["leaked_pairs"]]
    assert leaked and saved["warning_counts"]["W_LEAK"] == len(leaked) == saved["split"]["leaked_count"]
    assert all((a in train and b in test) or (a in test and b in train) for a, b in leaked)
    near = [(a, b) for a, b, _ in saved["duplicates"]["near"]["pairs"]]
    assert set(leaked) < set(near)
    assert all((a in test) == (b in test) for a, b in near if (a, b) not in leaked)  # the rest: one side


def test_the_content_hash_is_the_sha256_of_the_canonical_json():
    # The split is made from it: written out for speed, it must stay json.dumps' text to the character.
    rng = random.Random(0)
    alphabet = 'ab "\\/\n\t\x00\x1f\x7f\u00e9\u2028\U0001f600{}[]:,'
    odd = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) for _ in range(300)]
    conversations = [[{"role": "user", "content": a}, {"role": "assistant", "content": b}]
                     for a, b in zip(odd, reversed(odd))]
    conversations += [[{"content": "c", "role": "user"}],  # keys in the other order
                      [{"role": "user", "content": "c", "name": "x"}],  # a key more (a hand-made Example)
                      [{"role": "user", "content": 5}], []]
    for messages in conversations:
        expected = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        assert data.Example(messages, 1).key == hashlib.sha256(expected.encode()).hexdigest()
    pair = data.Example(conversations[0], 1, rejected=[{"role": "assistant", "content": "no"}])
    expected = json.dumps([pair.messages, pair.rejected], sort_keys=True, ensure_ascii=False)
    assert pair.key == hashlib.sha256(expected.encode()).hexdigest()
    assert data.Example([], 1, text="raw \u00e9").key == hashlib.sha256("raw \u00e9".encode()).hexdigest()
