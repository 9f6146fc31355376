"""`tunelab curve`: nested sizes on one held-out split, resuming a stopped curve, the refusals,
and the forecast's words."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clirun import refuses_bad_data_as_train

TRAIN = ["--test-size", "8", "--batch-size", "4", "--method", "full", "--template", "alpaca"]


def lines_of(path: Path) -> list[int]:
    return [json.loads(row)["metadata"]["line"] for row in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def curve(tmp_path_factory, cli, tiny_model_dir, pairs_file):
    """A curve of three sizes on the 40-row country task (32 training rows, 8 held out)."""
    out = tmp_path_factory.mktemp("curve") / "curve"
    result = cli("curve", pairs_file, "--sizes", "24,8,16", "--out", out, "--base", tiny_model_dir, *TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


@pytest.mark.slow
def test_sizes_nest_and_share_the_heldout_rows(curve):
    out, result = curve
    trained = {n: lines_of(out / f"n{n}" / "train.jsonl") for n in (8, 16, 24)}
    assert {n: len(lines) for n, lines in trained.items()} == {8: 8, 16: 16, 24: 24}
    assert set(trained[8]) < set(trained[16]) < set(trained[24])
    held_out = {n: (out / f"n{n}" / "test.jsonl").read_text() for n in (8, 16, 24)}
    assert held_out[8] == held_out[16] == held_out[24] and len(lines_of(out / "n8" / "test.jsonl")) == 8
    assert not set(trained[24]) & set(lines_of(out / "n8" / "test.jsonl"))
    evaluated = [[s["line"] for s in json.loads((out / f"n{n}" / "eval.json").read_text())["samples"]]
                 for n in (8, 16, 24)]
    assert evaluated[0] == evaluated[1] == evaluated[2] == lines_of(out / "n8" / "test.jsonl")
    saved = json.loads((out / "curve.json").read_text())
    assert [p["examples"] for p in saved["points"]] == [8, 16, 24]
    assert saved["heldout_examples"] == 8 and saved["training_split"] == 32
    assert {"exact_match", "token_f1", "heldout_loss"} <= set(saved["points"][0]["metrics"])
    assert [f["metric"] for f in saved["forecasts"]] == ["exact_match", "token_f1"]
    assert saved["forecasts"][0]["to_examples"] == 48
    page = (out / "curve.html").read_text()
    assert "<svg" in page and "n8/report.html" in page and (out / "comparison.html").exists()
    table = result.stdout.splitlines()
    assert any(line.split()[:1] == ["16"] for line in table) and "exact match" in result.stdout


@pytest.mark.slow
def test_a_stopped_curve_continues_with_the_sizes_it_has_not_finished(curve, cli, tiny_model_dir, pairs_file,
                                                                        tmp_path, monkeypatch):
    """A curve interrupted while training its second size (Ctrl-C, after that run's first
    checkpoint) reuses the first size as it is, resumes the second from its checkpoint, and
    trains the third."""
    import shutil

    from tunelab.train import loop

    out = tmp_path / "curve"
    shutil.copytree(curve[0] / "n8", out / "n8")  # finished and evaluated, with these very options
    kept = ["eval.json", "metrics.jsonl", "model/model.safetensors"]  # report.html is rebuilt: not these
    before = {name: (out / "n8" / name).stat().st_mtime_ns for name in kept}
    save_final = loop.save_final

    def stopped_at_16(training, files, *args):
        if files.root.name == "n16":
            raise KeyboardInterrupt
        save_final(training, files, *args)

    flags = ["--sizes", "8,16,24", "--out", out, "--base", tiny_model_dir, *TRAIN]
    with monkeypatch.context() as patched:
        patched.setattr(loop, "save_final", stopped_at_16)
        stopped = cli("curve", pairs_file, *flags, "--save-every", "1")
    assert stopped.returncode == 130
    assert f"interrupted in {out / 'n16'}: the runs finished before it are kept; run the same command" \
        in stopped.stderr and "Traceback" not in stopped.stderr
    assert (out / "n16" / "checkpoints").exists() and not (out / "n16" / "model").exists()
    assert not (out / "n24").exists()
    resumed = cli("curve", pairs_file, *flags, "--save-every", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stderr and "Training " + str(out / "n8") not in resumed.stderr
    assert {name: (out / "n8" / name).stat().st_mtime_ns for name in kept} == before
    assert all((out / f"n{n}" / "eval.json").exists() for n in (16, 24))
    assert [p["examples"] for p in json.loads((out / "curve.json").read_text())["points"]] == [8, 16, 24]


def test_sizes_it_cannot_train_are_refused(cli, pairs_file, tmp_path):
    """Refused before the base model or the data is read."""
    too_few = cli("curve", pairs_file, "--sizes", "4,16", "--out", tmp_path / "c")
    assert too_few.returncode == 2 and too_few.stderr.count("\n") == 1 and "4 is too few" in too_few.stderr
    not_numbers = cli("curve", pairs_file, "--sizes", "8,lots", "--out", tmp_path / "c")
    assert not_numbers.returncode == 2 and "whole numbers" in not_numbers.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_size_larger_than_the_training_split_is_refused_before_training(cli, tiny_model_dir, pairs_file,
                                                                           tmp_path):
    too_many = cli("curve", pairs_file, "--sizes", "8,40", "--out", tmp_path / "c", "--base", tiny_model_dir, *TRAIN)
    assert too_many.returncode == 2 and too_many.stderr.count("\n") == 1
    assert "40 is more than the 32 examples" in too_many.stderr
    assert not (tmp_path / "c").exists()


def test_the_first_n_training_examples_nest_whatever_the_file_order(conversations):
    from tunelab.errors import UserError
    from tunelab.train.loop import first_examples

    examples = conversations(50)
    chosen = [[e.line for e in first_examples(examples, n, 0, Path("data.jsonl"))] for n in (10, 20, 40)]
    assert [len(lines) for lines in chosen] == [10, 20, 40]
    assert set(chosen[0]) < set(chosen[1]) < set(chosen[2])
    assert chosen[0] == sorted(chosen[0]) and chosen[0] != list(range(1, 11))  # file order; not the file's first
    assert [e.line for e in first_examples(examples[::-1], 10, 0, Path("data.jsonl"))] == chosen[0][::-1]
    assert {e.line for e in first_examples(examples, 10, 1, Path("data.jsonl"))} != set(chosen[0])
    with pytest.raises(UserError, match="--train-examples 51: the training split of data.jsonl has 50 examples"):
        first_examples(examples, 51, 0, Path("data.jsonl"))


def start_curve(args: list) -> tuple[subprocess.Popen, Path]:
    """`tunelab curve` in its own process, its output in a log file beside --out."""
    out = Path(args[args.index("--out") + 1])
    log = out.parent / f"{out.name}-{time.monotonic_ns()}.log"
    with open(log, "w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", *map(str, args)], stdout=sink,
                                   stderr=subprocess.STDOUT)
    return process, log


def kill_when(process: subprocess.Popen, log: Path, condition, timeout: float = 300) -> None:
    """SIGKILL `process` as soon as `condition()` holds (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert process.poll() is None, f"finished before the kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def checkpointed(folder: Path) -> bool:
    return any((folder / "checkpoints").glob("step-*"))


@pytest.mark.slow
def test_a_curve_killed_mid_size_continues_with_the_same_command(cli, tiny_model_dir, pairs_file, tmp_path):
    """SIGKILL while the second size trains (after its first checkpoint): the same command reuses
    the first size as it is, resumes the second from its checkpoint and trains the third. The
    training options come from --config, a flag overriding one of them."""
    config = tmp_path / "curve.yaml"
    config.write_text("method: full\nbatch-size: 4\ntest_size: 8\ntemplate: alpaca\nmax_steps: 30\nlr: 0.5\n"
                      "save_every: 1\n")
    out = tmp_path / "curve"
    args = ["curve", pairs_file, "--sizes", "8,16,24", "--out", out, "--base", tiny_model_dir,
            "--config", config, "--lr", "1e-3"]
    process, log = start_curve(args)
    kill_when(process, log, lambda: checkpointed(out / "n16"))
    assert (out / "n8" / "eval.json").exists() and not (out / "n16" / "model").exists()
    assert not (out / "n24").exists() and not (out / "curve.json").exists()
    kept = {name: (out / "n8" / name).stat().st_mtime_ns for name in ("eval.json", "model/model.safetensors")}

    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Training {out / 'n8'}" not in again.stderr and "Resuming from" in again.stderr
    assert f"Training {out / 'n24'}" in again.stderr
    assert {name: (out / "n8" / name).stat().st_mtime_ns for name in kept} == kept
    saved = json.loads((out / "curve.json").read_text())
    assert [p["examples"] for p in saved["points"]] == [8, 16, 24]
    for n in (8, 16, 24):
        run = json.loads((out / f"n{n}" / "run.json").read_text())
        assert run["fingerprint"]["config"]["max_steps"] == 30 and run["fingerprint"]["config"]["lr"] == 1e-3
        assert run["training"]["steps"] == 30 and run["train_examples"] == n


def test_a_bad_value_in_the_config_file_is_one_line_naming_it(cli, pairs_file, tmp_path):
    config = tmp_path / "curve.yaml"
    config.write_text("lr: fast\n")
    result = cli("curve", pairs_file, "--sizes", "8,16", "--config", config, "--out", tmp_path / "c")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"{config}: lr: 'fast' must be a number" in result.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_the_benchmark_checks_a_prediction_of_the_last_size_against_it(curve, tmp_path):
    """benchmarks/curve_forecast.py on a finished curve: the first two sizes fitted, the third predicted."""
    import importlib.util
    import shutil

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "curve_forecast.py"
    spec = importlib.util.spec_from_file_location("curve_forecast", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, _ = curve
    printed = script.report(out, None, ["exact_match", "token_f1"]).splitlines()
    assert "sizes 8, 16, 24; 8 held-out rows" in printed[0] and "predicted at 24" in printed[2]
    assert len(printed) == 5 and printed[3].startswith("exact match") and printed[4].startswith("token F1")
    assert all(" 8,16 " in line and " log " in line and line.endswith(" points") for line in printed[3:])
    saved = json.loads((out / "curve.json").read_text())
    measured = saved["points"][-1]["metrics"]["token_f1"]["value"] * 100
    assert f"{measured:.1f} (" in printed[4]
    stopped = tmp_path / "stopped"  # a curve stopped before its end has no curve.json: its nN folders are read
    for n in (8, 16, 24):
        (stopped / f"n{n}").mkdir(parents=True)
        shutil.copy(out / f"n{n}" / "eval.json", stopped / f"n{n}" / "eval.json")
    assert script.report(stopped, None, ["exact_match", "token_f1"]).splitlines()[1:] == printed[1:]


@pytest.mark.slow
def test_a_finished_size_trained_with_other_options_is_refused(curve, cli, tiny_model_dir, pairs_file, tmp_path):
    """A size trained to its end is reused only with the same data and options, checkpoints or not."""
    import shutil

    out = tmp_path / "curve"
    shutil.copytree(curve[0] / "n8", out / "n8")
    result = cli("curve", pairs_file, "--sizes", "8", "--out", out, "--base", tiny_model_dir, *TRAIN, "--lr", "0.5")
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{out / 'n8'}: trained on other data or options than these" in result.stderr
    assert "--lr: " in result.stderr and " 0.5 now" in result.stderr


@pytest.mark.slow
def test_a_missing_data_file_is_one_line_when_a_size_has_finished(cli, tiny_model_dir, pairs_file, tmp_path,
                                                                  write_jsonl):
    """As for a sweep: a typo'd or moved data file, a folder, or a deleted --data-extra file is the
    line `tunelab train` gives for it, whatever the curve folder holds."""
    import shutil

    data = Path(shutil.copy(pairs_file, tmp_path / "pairs.jsonl"))
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"prompt": "Country of Bern?", "completion": "Switzerland"}])
    out = tmp_path / "curve"
    flags = ["--sizes", "8", "--out", out, "--base", tiny_model_dir, *TRAIN, "--max-steps", "2"]
    assert cli("curve", data, *flags, "--data-extra", extra).returncode == 0
    finished = (out / "n8" / "eval.json").stat().st_mtime_ns
    refuses_bad_data_as_train(cli, "curve", data, extra, flags, tmp_path)
    assert (out / "n8" / "eval.json").stat().st_mtime_ns == finished


@pytest.mark.slow
def test_a_size_stopped_while_its_weights_were_saved_is_trained_again(cli, tiny_model_dir, pairs_file, tmp_path,
                                                                      monkeypatch):
    """Killed in save_final (the CLI saves no checkpoints by default): the weights are there, cut
    short, and run.json has no "training". The same command trains the size again instead of
    evaluating what was cut."""
    from tunelab.train import loop

    out = tmp_path / "curve"
    flags = ["--sizes", "8", "--out", out, "--base", tiny_model_dir, *TRAIN, "--max-steps", "2"]
    save_final = loop.save_final

    def killed_while_saving(training, files, *args):
        save_final(training, files, *args)
        weights = files.model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(loop, "save_final", killed_while_saving)
        assert cli("curve", pairs_file, *flags).returncode == 130
    assert (out / "n8" / "model").exists() and "training" not in json.loads((out / "n8" / "run.json").read_text())
    again = cli("curve", pairs_file, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Training {out / 'n8'}" in again.stderr
    assert json.loads((out / "n8" / "run.json").read_text())["training"]["steps"] == 2
