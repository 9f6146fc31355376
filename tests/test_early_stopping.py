"""When to stop: the rule on held-out losses given by hand (stopping.Watch), the refusals, the
report's marks; then real runs of the tiny model on a planted data set whose held-out answers
contradict the trained ones, so that the held-out loss falls while the model learns the format and
rises once it learns the trained answer: early stopping stops there, --keep-best saves the best
step's weights (compared tensor for tensor with that step's checkpoint), W_OVERFITTING is printed,
and a run killed with SIGKILL after the patience counter has started resumes to the same end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.config import TrainConfig
from tunelab.data.load import group_rank
from tunelab.report.html import render_run
from tunelab.report.plots import Mark, line_chart
from tunelab.report.runs import read_run
from tunelab.train.stopping import EVALS_PER_RUN, Watch, eval_every

RUN = Path("runs/x")


def fed(watch: Watch, evaluations: list[tuple[float, float | None]]) -> list[str]:
    """Feed (held-out loss, training loss since the previous evaluation) pairs, one step apart;
    returns the warnings printed."""
    printed = []
    for step, (heldout, train) in enumerate(evaluations):
        if train is not None:
            watch.trained(step, train)
        _, warning = watch.observe(step, heldout, RUN)
        printed += [warning] if warning else []
    return printed


# ---- the rule, by hand ------------------------------------------------------------------------

def test_stops_after_patience_evaluations_without_a_new_lowest():
    watch = Watch(patience=2)
    fed(watch, [(3.0, None), (2.0, 2.5), (2.5, 2.0), (2.0, 1.8)])  # 2.0 again is no improvement
    assert watch.stopped_at == 3 and (watch.best_step, watch.best_loss) == (1, 2.0)
    assert "stopping early (--early-stopping 2)" in watch.stop_line()
    again = Watch(patience=2)
    fed(again, [(3.0, None), (2.0, 2.5), (2.5, 2.0), (1.9, 1.8), (2.5, 1.0)])  # a new lowest resets the count
    assert not again.stopped and again.since_best == 1 and again.best_step == 3
    assert not Watch().stopped  # without --early-stopping it only watches


def test_overfitting_needs_held_out_above_its_lowest_twice_while_training_loss_falls():
    rising_with_falling_training = [(3.0, None), (2.0, 2.0), (2.2, 1.5), (2.4, 1.0), (2.6, 0.5)]
    watch = Watch()
    printed = fed(watch, rising_with_falling_training)
    assert len(printed) == 1 and printed[0].startswith(f"{RUN}: W_OVERFITTING at step 3: held-out loss 2.4000")
    assert "lowest (2.0000 at step 1) for 2 evaluations" in printed[0] and "fell from 2.0000 to 1.0000" in printed[0]
    assert [w["step"] for w in watch.warnings] == [3]  # once a run, for run.json
    # Training loss rising too is divergence, not overfitting; one evaluation above the margin is noise;
    # a rise within the margin is noise too.
    assert not fed(Watch(), [(3.0, None), (2.0, 2.0), (2.2, 2.5), (2.4, 3.0), (2.6, 3.5)])
    assert not fed(Watch(), [(3.0, None), (2.0, 2.0), (2.2, 1.5), (2.0, 1.0), (2.2, 0.5)])
    assert not fed(Watch(), [(3.0, None), (2.0, 2.0), (2.03, 1.5), (2.03, 1.0), (2.03, 0.5)])


def test_lowest_before_training_takes_the_first_training_loss_as_reference():
    watch = Watch()
    assert not fed(watch, [(2.0, None), (2.5, 2.0), (2.6, 1.5)])  # the first is the reference, not a rise
    assert fed(watch, [(2.7, 1.0)])


def test_state_is_plain_values_that_resume_to_the_same_decisions():
    evaluations = [(3.0, None), (2.0, 2.0), (2.2, 1.5), (2.4, 1.0), (2.6, 0.5), (2.7, 0.4)]
    whole, halves = Watch(patience=4), Watch(patience=4)
    fed(whole, evaluations)
    fed(halves, evaluations[:3])
    saved = json.loads(json.dumps(halves.to_dict()))  # as checkpoint.json keeps it
    resumed = Watch.resumed(4, saved)
    for step, (heldout, train) in enumerate(evaluations[3:], 3):
        resumed.trained(step, train)
        resumed.observe(step, heldout, RUN)
    assert resumed == whole and whole.stopped_at == 5


def test_default_evaluations_are_denser_when_they_decide():
    assert eval_every(TrainConfig(), 100) == (25, None)
    every, note = eval_every(TrainConfig(early_stopping=3), 100)
    assert every == 100 // EVALS_PER_RUN and note.startswith("held-out loss every 10 steps")
    assert eval_every(TrainConfig(keep_best=True), 100)[0] == 10
    assert eval_every(TrainConfig(keep_best=True, eval_every=7), 100) == (7, None)
    every, note = eval_every(TrainConfig(early_stopping=11), 100)
    assert every == 10 and note.startswith("tunelab: note: --early-stopping 11 cannot stop this run: it measures")
    assert eval_every(TrainConfig(early_stopping=10), 100)[1].startswith("held-out loss every 10 steps")


@pytest.mark.parametrize("flags, asked", [(["--early-stopping", "3"], "--early-stopping 3: needs"),
                                          (["--keep-best"], "--keep-best: needs"),
                                          (["--early-stopping", "3", "--keep-best"], "--keep-best: need")])
def test_refused_in_one_line_without_held_out_data(tmp_path, pairs_file, tiny_model_dir, cli, flags, asked):
    result = cli("train", pairs_file, "--out", tmp_path / "run", "--base", tiny_model_dir, "--test-size", "0", *flags)
    assert result.returncode == 2
    assert result.stderr.startswith("tunelab: error: ") and asked in result.stderr
    assert "--test-size 0 holds none out; pass --test-size 0.1" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---- the report -------------------------------------------------------------------------------

def test_the_loss_plot_marks_the_saved_step_and_the_stop(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: full\nearly_stopping: 2\nkeep_best: true\n")
    warning = {"code": "W_OVERFITTING", "step": 3, "message": "at step 3: held-out loss <b>up</b>"}
    (run / "run.json").write_text(json.dumps({"method": "full", "training": {
        "steps": 4, "max_steps": 10, "stopped_early": True, "why": "early stopping: held-out loss did not improve",
        "best_step": 2, "best_eval_loss": 1.5, "saved_step": 2, "warnings": [warning]}}))
    rows = [{"step": s, "loss": 3.0 - s / 2} for s in range(1, 5)] + \
        [{"step": s, "eval_loss": v} for s, v in [(0, 3.0), (2, 1.5), (4, 1.8)]]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    html = render_run(read_run(run))
    assert "<circle cx=" in html and ">saved: step 2</text>" in html and ">stopped early at step 4</text>" in html
    assert "Trained 4 of 10 steps: early stopping" in html and "the saved weights are step 2&#39;s" in html
    assert "<b>W_OVERFITTING</b> at step 3: held-out loss &lt;b&gt;up&lt;/b&gt;" in html
    assert "<th>training: saved_step</th><td>2</td>" in html and "<th>training: warnings" not in html
    # A run from before run.json said where it stopped has no marks.
    (run / "run.json").write_text(json.dumps({"method": "full"}))
    assert "saved: step" not in render_run(read_run(run))


def test_mark_labels_are_escaped():
    chart = line_chart([("loss", [(0, 1.0), (2, 0.5)], "#000", False)], "step", "loss",
                       marks=[Mark(1, "<i>x</i>"), Mark(2, "best", 0.5)])
    assert "&lt;i&gt;x&lt;/i&gt;" in chart and "<i>x" not in chart


# ---- real runs on the tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """40 rows "Is order N ready?": 32 trained answering "yes", 8 held out answering "no" (a
    --split-by group, the one the split holds out)."""
    held, trained = sorted(["held", "train"], key=lambda value: group_rank(value, 0))
    rows = [{"prompt": f"Is order {i} ready?", "completion": "no" if i % 5 == 0 else "yes",
             "metadata": {"side": held if i % 5 == 0 else trained}} for i in range(40)]
    path = tmp_path_factory.mktemp("planted") / "planted.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def planted_flags(tiny_model_dir) -> list[str]:
    # Four steps an epoch, the held-out loss after every step; the best and the last step have checkpoints.
    return ["--split-by", "metadata.side", "--base", str(tiny_model_dir), "--method", "full", "--lr", "0.03",
            "--warmup-ratio", "0", "--max-steps", "16", "--batch-size", "8", "--test-size", "8", "--eval-every", "1",
            "--save-every", "1", "--keep", "1", "--early-stopping", "4", "--keep-best"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def training(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())["training"]


def heldout_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["eval_loss"] for row in rows if "eval_loss" in row}


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, planted, tiny_model_dir):
    """The planted data trained once, never interrupted: (run folder, what it printed)."""
    from clirun import run_cli

    out = tmp_path_factory.mktemp("planted-run") / "run"
    result = run_cli("train", planted, "--out", out, *planted_flags(tiny_model_dir))
    assert result.returncode == 0, result.stderr
    return out, result.stdout + result.stderr


@pytest.mark.slow
def test_early_stopping_stops_and_keep_best_saves_the_best_step(planted_run):
    run, printed = planted_run
    summary, losses = training(run), heldout_losses(run)
    best = min(losses, key=lambda step: (losses[step], step))
    assert summary["stopped_early"] and summary["steps"] < summary["max_steps"] == 16
    assert summary["steps"] == best + 4 == max(losses)  # four evaluations without a new lowest, then no more
    assert summary["why"] == "early stopping: held-out loss did not improve for 4 evaluations (--early-stopping 4)"
    assert (summary["best_step"], summary["best_eval_loss"], summary["saved_step"]) == (best, losses[best], best)
    assert 0 < best < summary["steps"]
    assert "stopping early (--early-stopping 4)" in printed
    assert f"Saved the weights of step {best}, the lowest held-out loss" in printed
    # The saved weights are the best step's checkpoint's (kept as the lowest held-out loss), not the last's.
    saved, at_best = weights(run / "model"), weights(run / "checkpoints" / f"step-{best:06d}" / "model")
    last = weights(run / "checkpoints" / f"step-{summary['steps']:06d}" / "model")
    assert saved.keys() == at_best.keys() and saved
    assert all(torch.equal(saved[name], at_best[name]) for name in saved)
    assert any(not torch.equal(saved[name], last[name]) for name in saved)
    assert not (run / "best").exists()


@pytest.mark.slow
def test_overfitting_is_named_in_the_output_and_run_json(planted_run):
    run, printed = planted_run
    lines = [line for line in printed.splitlines() if "W_OVERFITTING" in line]
    assert len(lines) == 1 and lines[0].strip().startswith(f"{run}: W_OVERFITTING at step ")
    warnings = training(run)["warnings"]
    assert [w["code"] for w in warnings] == ["W_OVERFITTING"] and warnings[0]["message"] in lines[0]


@pytest.mark.slow
def test_a_run_killed_after_the_patience_count_started_resumes_to_the_same_end(tmp_path, planted, planted_run,
                                                                                 tiny_model_dir, cli):
    from test_checkpoint import complete, kill_when, metrics, start

    reference, _ = planted_run
    best, flags, out = training(reference)["best_step"], planted_flags(tiny_model_dir), tmp_path / "run"
    # Killed once the checkpoint after the best step is complete (one evaluation counted), while
    # the next save stalls.
    kill_when(start(planted, out, flags, pause=f"{best + 2}:600"), complete(out, best + 1))
    saved = json.loads((out / "checkpoints" / f"step-{best + 1:06d}" / "checkpoint.json").read_text())
    assert saved["stopping"]["since_best"] == 1 and saved["stopping"]["best_step"] == best
    assert (out / "best" / f"step-{best:06d}").is_dir()
    result = cli("train", planted, "--out", out, *flags, "--resume")
    assert result.returncode == 0, result.stderr
    assert training(out) == training(reference)
    assert metrics(out) == metrics(reference)
    a, b = weights(out / "model"), weights(reference / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.slow
def test_a_normal_lora_run_keeps_its_best_adapter_without_a_warning(tmp_path, pairs_file, tiny_model_dir, cli):
    out = tmp_path / "run"
    result = cli("train", pairs_file, "--out", out, "--base", tiny_model_dir, "--lr", "0.01", "--max-steps", "6",
                 "--batch-size", "8", "--test-size", "8", "--eval-every", "2", "--save-every", "2", "--keep", "1",
                 "--keep-best")
    assert result.returncode == 0, result.stderr
    assert "W_OVERFITTING" not in result.stdout + result.stderr
    summary, losses = training(out), heldout_losses(out)
    assert summary["warnings"] == [] and not summary["stopped_early"] and summary["steps"] == 6
    assert summary["saved_step"] == summary["best_step"] == min(losses, key=lambda step: (losses[step], step))
    saved = weights(out / "adapter")
    at_best = weights(out / "checkpoints" / f"step-{summary['best_step']:06d}" / "adapter")
    assert saved.keys() == at_best.keys() and saved
    assert all(torch.equal(saved[name], at_best[name]) for name in saved)
