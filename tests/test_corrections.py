"""Learning from corrections: `tunelab data review --run RUN` turns a run's wrong answers into
RUN/corrections.jsonl and RUN/fixes.jsonl (data/corrections.py), and `tunelab train --data-extra`
trains extra rows, never held out, taking held-out rows with their prompt out of the split
(data/extra.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tunelab
from tunelab.data import corrections
from tunelab.errors import UserError


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def evaluated_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run, evaluated (the fine-tuned model alone): its 2 held-out rows answered wrong."""
    run = tmp_path_factory.mktemp("evaluated") / "run"
    shutil.copytree(tiny_run, run)
    tunelab.load(run).evaluate(include_base=False, forgetting=None, progress=False)
    return run


@pytest.fixture
def run(evaluated_run, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the evaluated run per test; answers are typed on standard input (no editor)."""
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.delenv("EDITOR", raising=False)
    shutil.copytree(evaluated_run, tmp_path / "run")
    return tmp_path / "run"


def held_out(run: Path) -> dict[int, list[dict]]:
    """The run's held-out rows as training wrote them: line -> messages."""
    return {row["metadata"]["line"]: row["messages"] for row in rows(run / "test.jsonl")}


def model_answers(run: Path) -> dict[int, str]:
    samples = json.loads((run / "eval.json").read_text())["samples"]
    return {s["line"]: s["answers"]["tuned"]["text"] for s in samples}


def test_the_tiny_model_gets_both_held_out_rows_wrong(evaluated_run):
    wrong = corrections.wrong_answers(evaluated_run)
    assert [w.line for w in wrong] == sorted(held_out(evaluated_run))
    assert all(w.decision is None and w.bucket != "correct" for w in wrong)


def test_review_writes_the_agreed_corrections_shape_and_resumes_without_asking_twice(cli, run):
    first, second = sorted(held_out(run))
    answers, messages = model_answers(run), held_out(run)

    stopped = cli("data", "review", "--run", run, stdin="a\nq\n")
    assert stopped.returncode == 0, stopped.stderr
    assert f"[1/2] held-out line {first}" in stopped.stdout and "[2/2]" in stopped.stdout
    assert "Stopped: 1 corrected, 0 fixed, 0 skipped so far" in stopped.stdout
    assert rows(run / "corrections.jsonl") == [{
        "prompt": messages[first][:-1], "chosen": [{"role": "assistant", "content": messages[first][-1]["content"]}],
        "rejected": [{"role": "assistant", "content": answers[first]}], "line": first}]

    resumed = cli("data", "review", "--run", run, stdin="t\nA better answer\n.\n")
    assert resumed.returncode == 0, resumed.stderr
    assert "[1/2]" not in resumed.stdout and f"[2/2] held-out line {second}" in resumed.stdout
    assert "Reviewed all 2 wrong answers: 2 corrected, 0 fixed, 0 skipped" in resumed.stdout
    assert f"--data-extra {run / 'corrections.jsonl'}" in resumed.stdout
    written = rows(run / "corrections.jsonl")
    assert [r["line"] for r in written] == [first, second]
    assert written[1] == {"prompt": messages[second][:-1],
                          "chosen": [{"role": "assistant", "content": "A better answer"}],
                          "rejected": [{"role": "assistant", "content": answers[second]}], "line": second}
    assert not (run / "fixes.jsonl").exists()

    again = cli("data", "review", "--run", run, stdin="")
    assert again.returncode == 0 and "held-out line" not in again.stdout
    assert "Reviewed all 2 wrong answers" in again.stdout


def test_a_wrong_reference_goes_to_fixes_and_the_data_file_stays_as_it_was(cli, run, tiny_run):
    data = tiny_run.parent / "pairs.jsonl"
    before, split_before = data.read_bytes(), (run / "test.jsonl").read_bytes()
    first, _ = sorted(held_out(run))
    result = cli("data", "review", "--run", run, stdin="f\nThe right reference\n.\ns\n")
    assert result.returncode == 0, result.stderr
    assert "1 fixed, 1 skipped" in result.stdout
    old = held_out(run)[first]
    assert rows(run / "fixes.jsonl") == [{"line": first, "messages": [*old[:-1], {"role": "assistant",
                                                                                  "content": "The right reference"}],
                                          "was": old[-1]["content"]}]
    assert not (run / "corrections.jsonl").exists()  # a fix is no preference pair, a skip nothing
    assert data.read_bytes() == before and (run / "test.jsonl").read_bytes() == split_before


def test_end_of_input_and_ctrl_c_keep_what_was_decided(cli, run, monkeypatch):
    assert cli("data", "review", "--run", run, stdin="s\n").returncode == 0  # then end of input
    assert [r["decision"] for r in corrections.decisions(run).values()] == ["skipped"]

    def interrupted(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    result = cli("data", "review", "--run", run)
    assert result.returncode == 130 and "Stopped: 0 corrected, 0 fixed, 1 skipped so far" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_decision_cut_short_by_a_kill_is_asked_again(cli, run):
    first, second = sorted(held_out(run))
    corrections.skip(run, first)
    with (run / "corrections.decisions.jsonl").open("a") as f:
        f.write(f'{{"key": "{second}", "decision": "corr')  # killed mid-write
    assert [w.decision for w in corrections.wrong_answers(run)] == ["skipped", None]
    result = cli("data", "review", "--run", run, stdin="a\n")
    assert result.returncode == 0 and "Reviewed all 2 wrong answers: 1 corrected, 0 fixed, 1 skipped" in result.stdout


def test_the_functions_the_browser_calls(run):
    first, second = sorted(held_out(run))
    results = json.loads((run / "eval.json").read_text())
    results["samples"][0]["answers"]["tuned"].update(text="Atlantis", bucket="wrong")  # the tiny model's is empty
    (run / "eval.json").write_text(json.dumps(results))
    with pytest.raises(UserError, match="the model's own answer"):
        corrections.add_correction(run, first, " Atlantis ")
    with pytest.raises(UserError, match="the correct answer is empty"):
        corrections.add_correction(run, first, "  ")
    with pytest.raises(UserError, match="not a held-out row"):
        corrections.add_correction(run, 99999, "x")
    with pytest.raises(UserError, match="the reference as it was"):
        corrections.add_fix(run, first, held_out(run)[first][-1]["content"])
    corrections.add_fix(run, first, "fixed")
    row = corrections.add_correction(run, first, "changed my mind")  # the last decision of a line wins
    corrections.skip(run, second)
    assert rows(run / "corrections.jsonl") == [row] and not (run / "fixes.jsonl").exists()
    assert [(w.line, w.decision) for w in corrections.wrong_answers(run)] == [(first, "corrected"), (second, "skipped")]


def test_only_an_eval_of_the_held_out_split_is_reviewed(cli, run):
    results = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**results, "data": "harder.jsonl"}))
    result = cli("data", "review", "--run", run)
    assert result.returncode == 2 and "not the run's held-out split" in result.stderr
    (run / "eval.json").unlink()
    result = cli("data", "review", "--run", run)
    assert result.returncode == 2 and f"run `tunelab eval {run}` first" in result.stderr
    both = cli("data", "review", "labels.jsonl", "--run", run)
    assert both.returncode == 2 and "drop FILE and --out" in both.stderr
    neither = cli("data", "review")
    assert neither.returncode == 2 and "--run RUN" in neither.stderr


# --data-extra

CITIES = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
          ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Oslo", "Norway"), ("Warsaw", "Poland")]


@pytest.fixture
def data(tmp_path, write_jsonl) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Country of {city}? ({i})", "completion": country}
                                                 for i in range(3) for city, country in CITIES])


def held_out_lines(data: Path) -> list[int]:
    from tunelab.config import DataOptions
    from tunelab.data.check import check

    return [int(line) for line in check(data, DataOptions(test_size=4)).test_lines]


def extra_rows(data: Path, line: int) -> list[dict]:
    """A messages-shaped extra file: the prompt of held-out `line` with another answer, then two new rows."""
    prompt = json.loads(data.read_text().splitlines()[line - 1])["prompt"]
    return [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "Corrected"}]},
            {"messages": [{"role": "user", "content": "Country of Bern?"}, {"role": "assistant", "content": "CH"}]},
            {"messages": [{"role": "user", "content": "Country of Kyiv?"}, {"role": "assistant", "content": "UA"}]}]


def test_the_data_check_takes_a_held_out_row_an_extra_row_shares_out_of_the_split(cli, data, tmp_path, write_jsonl):
    test_lines = held_out_lines(data)
    moved = test_lines[0]
    extra = write_jsonl(tmp_path / "extra.jsonl", extra_rows(data, moved))
    result = cli("data", "check", data, "--test-size", "4", "--data-extra", extra, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert "train 20 / test 3" in result.stdout
    assert f"3 from {extra}, trained, never held out; 1 held-out row(s)" in result.stdout
    assert f"{data}:{moved}: W_EXTRA_HELD_OUT held out, and {extra}:1 has the same prompt" in result.stdout
    report = json.loads((tmp_path / "report" / "data_check.json").read_text())
    assert report["extra"] == {"file": str(extra), "rows": 3, "replaced_held_out": [[moved, 1]]}
    assert report["options"]["data_extra"] == str(extra) and report["split"]["test"] == 3


def test_a_bad_extra_file_is_one_line_naming_it(cli, data, tmp_path, write_jsonl):
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "no answer"}])
    result = cli("data", "check", data, "--data-extra", extra)
    assert result.returncode == 2 and f"tunelab: error: --data-extra {extra}:2: E_SHAPE" in result.stderr
    missing = cli("data", "check", data, "--data-extra", tmp_path / "missing.jsonl")
    assert missing.returncode == 2 and "missing.jsonl: file not found" in missing.stderr


@pytest.mark.slow
def test_extra_rows_train_never_held_out_and_resume_checks_them(cli, data, tmp_path, write_jsonl, tiny_model_dir):
    from tunelab.config import TrainConfig
    from tunelab.train.loop import prepare

    test_lines = held_out_lines(data)
    moved = test_lines[0]
    extra = write_jsonl(tmp_path / "extra.jsonl", extra_rows(data, moved))
    out = tmp_path / "run"
    args = ["train", data, "--data-extra", extra, "--out", out, "--base", tiny_model_dir, "--test-size", "4",
            "--max-steps", "1", "--batch-size", "4"]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "W_EXTRA_HELD_OUT" in result.stdout

    assert [r["messages"] for r in rows(out / "extra.jsonl")] == [r["messages"] for r in extra_rows(data, moved)]
    assert [r["metadata"]["line"] for r in rows(out / "extra.jsonl")] == [1, 2, 3]
    test_rows = rows(out / "test.jsonl")
    assert [r["metadata"]["line"] for r in test_rows] == test_lines[1:]
    trained = {r["metadata"]["line"] for r in rows(out / "train.jsonl")}
    assert moved not in trained and len(trained) == 20  # the replaced row trains as its extra row only
    extra_prompts = {r["messages"][0]["content"] for r in extra_rows(data, moved)}
    assert not extra_prompts & {r["messages"][0]["content"] for r in test_rows}
    split = json.loads((out / "split.json").read_text())
    assert split["replaced_by_extra"] == [[moved, 1]] and moved not in split["test_lines"]
    info = json.loads((out / "run.json").read_text())
    assert (info["train_examples"], info["extra_examples"], info["test_examples"]) == (20, 3, 3)
    assert info["data_extra"] == str(extra)
    assert TrainConfig.from_yaml(out / "config.yaml").data_extra == str(extra)

    config = TrainConfig(base=str(tiny_model_dir), test_size=4, data_extra=str(extra))
    prepared = prepare(config, data, show=False)
    assert len(prepared.train_encoded) == 20 + 3 and len(prepared.test_encoded) == 3 and prepared.extra_pieces == 3

    resumed = cli(*args, "--resume")  # config.yaml keeps --data-extra; same file: nothing to do
    assert resumed.returncode == 0 and "nothing to resume" in resumed.stdout, resumed.stderr
    extra.write_text(extra.read_text().replace("CH", "Switzerland"))
    changed = cli(*args, "--resume")
    assert changed.returncode == 2 and "--data-extra" in changed.stderr and "differs" in changed.stderr

    inside = cli("train", data, "--data-extra", out / "extra.jsonl", "--out", out, "--overwrite",
                 "--base", tiny_model_dir)
    assert inside.returncode == 2 and "which --overwrite empties" in inside.stderr


@pytest.mark.slow
def test_a_runs_corrections_train_on_the_same_data_without_leaking(cli, run, tiny_run, tiny_model_dir):
    lines = sorted(held_out(run))
    corrections.add_correction(run, lines[0], "the reference, corrected")
    corrections.add_correction(run, lines[1], "another answer")
    out = run.parent / "corrected"
    result = cli("train", tiny_run.parent / "pairs.jsonl", "--data-extra", run / "corrections.jsonl", "--out", out,
                 "--base", tiny_model_dir, "--method", "lora", "--max-steps", "1", "--batch-size", "4",
                 "--test-size", "2")
    assert result.returncode == 0, result.stderr
    split = json.loads((out / "split.json").read_text())
    assert split["replaced_by_extra"] == [[lines[0], 1], [lines[1], 2]]
    assert not (out / "test.jsonl").read_text().strip()  # both held-out rows were corrected: none is tested
    assert [r["chosen"][0]["content"] for r in rows(out / "extra.jsonl")] == ["the reference, corrected",
                                                                                 "another answer"]
