"""`tunelab sweep`: the grid checked before anything runs, the budget, resuming, and a planted
winner whose lead is real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clirun import refuses_bad_data_as_train
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


def test_the_config_file_is_under_the_flags_and_the_grid(tmp_path):
    """--config's options, then the flags, then the grid's values, each overriding the one before;
    a bad value in the file is named with the file."""
    from tunelab.errors import UserError
    from tunelab.iterate.sweep import plan

    config = tmp_path / "sweep.yaml"
    config.write_text("lr: 0.5\nmax-steps: 7\nlora_rank: 4\nmethod: full\n")
    combinations = plan({"lr": ["1e-3", "1e-2"]}, {"max_steps": 3}, config)
    assert [(s, c.lr, c.max_steps, c.lora_rank, c.method) for s, c in combinations] == [
        ({"lr": "1e-3"}, 1e-3, 3, 4, "full"), ({"lr": "1e-2"}, 1e-2, 3, 4, "full")]
    config.write_text("lora_rank: many\n")
    with pytest.raises(UserError, match=f"{config}: lora_rank: 'many' must be a whole number"):
        plan({"lr": ["1e-3"]}, {}, config)


def test_a_bad_config_file_is_one_line_before_anything_runs(cli, tmp_path, write_jsonl):
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    result = cli("sweep", data, "--grid", "lr=1e-3,1e-2", "--config", tmp_path / "missing.yaml",
                 "--out", tmp_path / "sweep")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "missing.yaml: config file not found" in result.stderr and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_killed_mid_run_continues_with_the_same_command(cli, tiny_model_dir, pairs_file, tmp_path):
    """SIGKILL while the second combination trains (after its first checkpoint): the same command
    reuses the first as it is, resumes the second and runs the third."""
    from test_curve import checkpointed, kill_when, start_curve

    config = tmp_path / "sweep.yaml"
    config.write_text("method: full\nbatch_size: 4\ntest_size: 8\ntemplate: alpaca\nmax_steps: 30\n")
    out = tmp_path / "sweep"
    args = ["sweep", pairs_file, "--grid", "lr=1e-9,1e-3,1e-2", "--metric", "token_f1", "--out", out,
            "--base", tiny_model_dir, "--config", config, "--save-every", "1"]
    process, log = start_curve(args)
    kill_when(process, log, lambda: checkpointed(out / "lr=1e-3"))
    assert (out / "lr=1e-9" / "eval.json").exists() and not (out / "lr=1e-3" / "model").exists()
    assert not (out / "lr=1e-2").exists() and not (out / "sweep.json").exists()
    first = (out / "lr=1e-9" / "eval.json").stat().st_mtime_ns

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming from" in again.stderr and f"Training {out / 'lr=1e-9'}" not in again.stderr
    assert (out / "lr=1e-9" / "eval.json").stat().st_mtime_ns == first
    saved = json.loads((out / "sweep.json").read_text())
    assert [(r["name"], r["status"]) for r in saved["runs"]] == [
        ("lr=1e-9", "reused"), ("lr=1e-3", "trained"), ("lr=1e-2", "trained")]
    for name in ("lr=1e-3", "lr=1e-2"):
        assert json.loads((out / name / "run.json").read_text())["training"]["steps"] == 30


@pytest.mark.parametrize(
    ("winner_rows", "runner_rows", "says"),
    [
        # the same answers right on every row: no interval to give
        ([1, 0, 1, 0], [1, 0, 1, 0], "tied on exact match with the runner-up b, 50%: ahead on held-out loss only "
                                     "(0.100 vs 0.200)"),
        # the same mean from different rows: the paired interval is wide, held-out loss still decides
        ([1, 1, 0, 0], [0, 0, 1, 1], "runner-up b, 50%; tied on exact match (95% paired bootstrap interval of the "
                                     "difference -100 to +100 points over 4 held-out rows): ahead on held-out "
                                     "loss only (0.100 vs 0.200)"),
    ],
)
def test_a_tie_on_the_metric_says_that_held_out_loss_chose_the_winner(winner_rows, runner_rows, says):
    from tunelab.evaluate.results import Interval
    from tunelab.iterate.sweep import Lead, SweepResults, verdict

    scores = {"a": (winner_rows, {"heldout_loss": Interval(value=0.1)}),
              "b": (runner_rows, {"heldout_loss": Interval(value=0.2)})}
    low, high = (0.0, 0.0) if winner_rows == runner_rows else (-1.0, 1.0)
    sweep = SweepResults(data="d.jsonl", grid={"lr": ["1", "2"]}, metric="exact_match", runs=[], winner="a",
                         runner_up="b", lead=Lead(difference=0.0, low=low, high=high, distinguishable=False),
                         verdict="")
    line = verdict(sweep, scores, 4)
    assert line.startswith("winner: a, exact match 50%") and says in line and "not distinguishable" in line


@pytest.mark.slow
def test_a_missing_data_file_is_one_line_when_a_combination_has_finished(cli, tiny_model_dir, pairs_file, tmp_path,
                                                                         write_jsonl):
    """A finished combination's fingerprint reads the data: a typo'd or moved data file, a folder,
    or a deleted --data-extra file is the line `tunelab train` gives for it, not a traceback, and
    not 'trained on other data or options'."""
    import shutil

    data = Path(shutil.copy(pairs_file, tmp_path / "pairs.jsonl"))
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "Country of Bern?", "completion": "Switzerland"}])
    out = tmp_path / "sweep"
    flags = ["--grid", "lr=1e-3", "--out", out, "--base", tiny_model_dir, "--method", "full", "--batch-size", "4",
             "--max-steps", "2", "--test-size", "8", "--template", "alpaca"]
    assert cli("sweep", data, *flags, "--data-extra", extra).returncode == 0
    finished = (out / "lr=1e-3" / "eval.json").stat().st_mtime_ns
    refuses_bad_data_as_train(cli, "sweep", data, extra, flags, tmp_path)
    assert (out / "lr=1e-3" / "eval.json").stat().st_mtime_ns == finished


def test_a_tie_on_the_metric_within_rounding_is_broken_by_held_out_loss():
    """Token F1 means that differ only in the last bits of a float (the same scores summed in
    another order) are a tie: the lower held-out loss wins, as the verdict says."""
    from tunelab.evaluate.results import Interval
    from tunelab.iterate.sweep import SweepResults, rank, verdict

    noisy, exact = [0.1, 0.2, 0.3], [0.3, 0.2, 0.1]
    assert sum(noisy) / 3 > sum(exact) / 3  # by rounding alone
    scores = {"a": (noisy, {"heldout_loss": Interval(value=0.2)}),
              "b": (exact, {"heldout_loss": Interval(value=0.1)})}
    winner, runner_up, lead = rank(scores)
    assert (winner, runner_up) == ("b", "a")
    sweep = SweepResults(data="d.jsonl", grid={"lr": ["1", "2"]}, metric="token_f1", runs=[], winner=winner,
                         runner_up=runner_up, lead=lead, verdict="")
    assert "ahead on held-out loss only (0.100 vs 0.200)" in verdict(sweep, scores, 3)
    scores["c"] = ([0.3, 0.3, 0.3], {"heldout_loss": Interval(value=0.9)})  # a real lead beats any loss
    assert rank(scores)[:2] == ("c", "b")
