"""`tunelab sweep`: the grid checked before anything runs, the budget, resuming, and a planted
winner whose lead is real."""

from __future__ import annotations

import json

import pytest

from tunelab.iterate.sweep import folder_name


def test_an_unknown_grid_key_is_refused_with_the_closest_option(cli, tmp_path):
    result = cli("sweep", tmp_path / "data.jsonl", "--grid", "lr=1e-3,3e-3", "--grid", "lora_rnk=8,32",
                 "--out", tmp_path / "sweep")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "'lora_rnk' is not a training option (did you mean 'lora_rank'?)" in result.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(("grid", "flags", "message"), [
    ("lr=1e-3,fast", [], "--lr fast: must be a number"),
    ("lora-rank=8,0", [], "--lora-rank 0: must be greater than 0"),
    ("lr", [], "write KEY=VALUE,VALUE,..."),
    ("lr=1e-3,1e-3", [], "a value is repeated"),
    ("lr=1e-3,3e-3", ["--lr", "1e-3"], "--lr is also given as a flag"),
    ("train_examples=8,16", [], "tunelab curve"),
    ("seed=0,1", [], "--seed changes the held-out split"),
])
def test_a_bad_grid_is_one_line_before_anything_runs(cli, tmp_path, write_jsonl, grid, flags, message):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    result = cli("sweep", data, "--grid", grid, *flags, "--out", tmp_path / "sweep")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "sweep").exists()


def test_run_folders_are_named_from_their_settings():
    assert folder_name({"lr": "3e-4", "lora_rank": "8"}) == "lr=3e-4,lora_rank=8"
    assert folder_name({"base": "models/my model"}) == "base=models-my-model"


@pytest.mark.slow
def test_a_sweep_names_the_planted_winner_within_its_budget_and_continues(cli, tiny_model_dir, tmp_path,
                                                                          write_jsonl):
    """A task the tiny model learns in a few steps, to say 'the answer is yes' (it never learns
    to stop, so no answer is an exact match: the sweep ranks by token F1), against a learning rate
    too small to move a weight. The first call's budget lets one run start; the second call
    reuses it and runs the other."""
    data = write_jsonl(tmp_path / "yes.jsonl", [{"prompt": f"Is {i} a number?", "completion": "the answer is yes"}
                                                for i in range(40)])
    out = tmp_path / "sweep"
    flags = ["--grid", "lr=1e-9,1e-2", "--metric", "token_f1", "--out", out, "--base", tiny_model_dir,
             "--method", "full", "--batch-size", "4", "--max-steps", "16", "--test-size", "8", "--template", "alpaca"]
    first = cli("sweep", data, *flags, "--budget-minutes", "0.01")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "skipped (--budget-minutes spent" in first.stdout and "lr=1e-2" in first.stdout.splitlines()[-3]
    saved = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in saved["runs"]] == [("lr=1e-9", "trained"), ("lr=1e-2", "skipped")]
    assert not (out / "lr=1e-2").exists()

    second = cli("sweep", data, *flags)
    assert second.returncode == 0, second.stderr[-3000:]
    saved = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in saved["runs"]] == [("lr=1e-9", "reused"), ("lr=1e-2", "trained")]
    assert saved["winner"] == "lr=1e-2" and saved["runner_up"] == "lr=1e-9"
    assert saved["lead"]["low"] > 0 and saved["lead"]["distinguishable"]
    assert "winner: lr=1e-2" in second.stdout and "a real lead" in second.stdout
    samples = json.loads((out / "lr=1e-2" / "eval.json").read_text())["samples"]
    assert all("yes" in s["answers"]["tuned"]["text"] for s in samples)
    page = (out / "comparison.html").read_text()
    assert "lr=1e-9" in page and "lr=1e-2" in page
