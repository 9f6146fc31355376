"""Checkpoints: real training processes killed with SIGKILL at chosen moments, resumed, and
compared bit for bit with runs that were never interrupted (those, and the resumes that run to the
end, train in the test's own process)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tunelab.cli import main
from tunelab.train.checkpoint import PAUSE_ENV, Checkpoint, kept, trim_metrics

TIMING = ("tokens_per_s", "elapsed_s")


def full_flags(tiny_model_dir) -> list[str]:
    # 32 training examples in micro-batches of 8: 4 steps an epoch, so 6 steps cross an epoch.
    return ["--base", str(tiny_model_dir), "--method", "full", "--lr", "0.003", "--max-steps", "6",
            "--batch-size", "8", "--test-size", "8", "--save-every", "2"]


def lora_flags(tiny_model_dir) -> list[str]:
    # Micro-batches of 4, 3 per step: 3 steps an epoch, the last one short; dropout draws from the
    # global RNG during training.
    return ["--base", str(tiny_model_dir), "--method", "lora", "--lr", "0.01", "--max-steps", "7",
            "--batch-size", "4", "--grad-accum", "3", "--lora-dropout", "0.1", "--test-size", "8",
            "--save-every", "2", "--keep", "1"]


def start(data: Path, out: Path, flags: list[str], *extra: str, pause: str | None = None) -> subprocess.Popen:
    """`tunelab train` in its own process; `pause` ("STEP:SECONDS") stalls that step's save just
    before the rename."""
    env = {k: v for k, v in os.environ.items() if k != PAUSE_ENV}
    if pause:
        env[PAUSE_ENV] = pause
    log = open(out.parent / f"{out.name}-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 (the process's, read after)
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(data), "--out", str(out),
                                *flags, *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    return process


def output(process: subprocess.Popen) -> str:
    process.log.seek(0)
    return process.log.read()


def kill_when(process: subprocess.Popen, condition, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            assert process.poll() is None, f"finished before the kill:\n{output(process)}"
            assert time.monotonic() < deadline, output(process)
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def complete(out: Path, step: int):
    return lambda: (out / "checkpoints" / f"step-{step:06d}" / "checkpoint.json").exists()


def half_saved(out: Path, step: int):
    """Every file of the checkpoint written, not yet renamed into place."""
    return lambda: any((out / "checkpoints").glob(f".step-{step:06d}-*/checkpoint.json"))


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    folder = run / "model" if (run / "model").exists() else run / "adapter"
    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(run: Path, reference: Path) -> None:
    a, b = weights(run), weights(reference)
    assert a.keys() == b.keys() and a
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different
    assert metrics(run) == metrics(reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == \
        sorted(p.name for p in (reference / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def data(pairs_file) -> Path:
    """The shared example data set (40 rows: 32 trained, 8 held out)."""
    return pairs_file


def reference(folder: Path, data: Path, flags: list[str]) -> Path:
    """A run never interrupted, trained in this process: the killed ones run in others."""
    assert main(["train", str(data), "--out", str(folder / "run"), *flags]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory, tiny_model_dir, data) -> Path:
    return reference(tmp_path_factory.mktemp("full"), data, full_flags(tiny_model_dir))


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_model_dir, data) -> Path:
    return reference(tmp_path_factory.mktemp("lora"), data, lora_flags(tiny_model_dir))


def resume(cli, data: Path, out: Path, flags: list[str]) -> str:
    """The last resume, run to its end in this process (the kills were the point): what it printed."""
    result = cli("train", data, "--out", out, *flags, "--resume")
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow
def test_killed_between_and_during_saves_resumes_to_identical_weights(tmp_path, tiny_model_dir, data,
                                                                      full_reference, cli):
    out, flags = tmp_path / "run", full_flags(tiny_model_dir)
    # Right after the first checkpoint appeared, in the middle of the next interval.
    kill_when(start(data, out, flags, pause="6:600"), complete(out, 2))
    # During a later save, every file written but not yet renamed into place.
    kill_when(start(data, out, flags, "--resume", pause="4:600"), half_saved(out, 4))
    log = resume(cli, data, out, flags)
    assert "left by an interrupted save; ignored and removed" in log
    assert "step-000002 (step 2)" in log
    assert not list((out / "checkpoints").glob(".*"))
    assert_same_run(out, full_reference)
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000004", "step-000006"]


@pytest.mark.slow
def test_lora_with_dropout_and_accumulation_resumes_mid_epoch(tmp_path, tiny_model_dir, data, lora_reference, cli):
    out, flags = tmp_path / "run", lora_flags(tiny_model_dir)
    # During the very first save: nothing to resume from, so the resumed run starts again.
    kill_when(start(data, out, flags, pause="2:600"), half_saved(out, 2))
    assert not complete(out, 2)()
    resumed = start(data, out, flags, "--resume", pause="6:600")
    kill_when(resumed, complete(out, 4))  # step 4 is 3 micro-batches into the second epoch
    assert "no complete checkpoint to resume from" in output(resumed)
    log = resume(cli, data, out, flags)
    assert "step-000004 (step 4)" in log
    saved = json.loads((out / "checkpoints" / "step-000006" / "checkpoint.json").read_text())
    assert saved["position"]["epoch"] == 1 and saved["position"]["batch"] == 8  # the short last step
    assert_same_run(out, lora_reference)


@pytest.mark.slow
def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny_model_dir, data, lora_reference):
    flags = lora_flags(tiny_model_dir)
    same = reference(tmp_path / "same", data, flags)
    other = reference(tmp_path / "other", data, [*flags, "--seed", "1"])
    a, b, c = weights(lora_reference), weights(same), weights(other)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)


def copy_run(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


@pytest.mark.slow
def test_changed_data_or_options_are_refused_unless_forced(tmp_path, tiny_model_dir, data, full_reference, capsys,
                                                           write_jsonl):
    out, flags = copy_run(full_reference, tmp_path), full_flags(tiny_model_dir)
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", str(data), "--out", str(out), *flags, "--resume", "--lr", "0.01", "--max-steps", "8"]) == 2
    error = capsys.readouterr().err
    assert "step-000006: saved with other data or options" in error and "--force" in error
    assert "--lr: 0.003 in the checkpoint, 0.01 now" in error and "--max-steps: 6 in the checkpoint, 8 now" in error

    changed = write_jsonl(tmp_path / "pairs.jsonl", [*map(json.loads, data.read_text().splitlines()),
                                                     {"prompt": "Country of Bern?", "completion": "Switzerland"}])
    assert main(["train", str(changed), "--out", str(out), *flags, "--resume"]) == 2
    assert f"{changed}: its content differs from the data the checkpoint was trained on" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched

    # Options that only decide what is saved may change; the rest comes from the run's config.
    assert main(["train", str(data), "--out", str(out), "--resume", "--keep", "1", "--save-every", "3"]) == 0
    assert_same_run(out, full_reference)

    assert main(["train", str(data), "--out", str(out), "--resume", "--max-steps", "8", "--force"]) == 0
    assert "continuing despite a change: --max-steps" in capsys.readouterr().err
    assert metrics(out)[-1]["step"] == 8


@pytest.mark.slow
def test_resume_needs_a_run_and_excludes_overwrite(tmp_path, data, full_reference, capsys):
    assert main(["train", str(data), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(["train", str(data), "--out", str(full_reference), "--resume", "--overwrite"]) == 2
    assert main(["train", str(data), "--out", str(full_reference)]) == 2
    assert "--resume to continue it" in capsys.readouterr().err


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_a_crafted_pickle_is_refused(tmp_path, data, full_reference, capsys):
    out = copy_run(full_reference, tmp_path)
    info = json.loads((out / "run.json").read_text())
    del info["training"]  # killed after its last checkpoint: --resume loads it (a finished run needs nothing)
    (out / "run.json").write_text(json.dumps(info))
    state, marker = out / "checkpoints" / "step-000006" / "state.pt", tmp_path / "code-ran"
    torch.save({"optimizer": Payload(marker)}, state)
    assert main(["train", str(data), "--out", str(out), "--resume"]) == 2
    error = capsys.readouterr().err
    assert f"{state}: refused" in error and "system" in error
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(state, weights_only=True)
    torch.load(state, weights_only=False)  # what a careless loader would have done
    assert marker.exists()


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model_dir, data, full_reference,
                                                               monkeypatch, capsys):
    out, flags, real_save, calls = tmp_path / "run", full_flags(tiny_model_dir), torch.save, []

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert main(["train", str(data), "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err
    assert "step-000004: cannot write the checkpoint (No space left on device;" in error
    assert "step-000002 is intact" in error and "--resume" in error and "Traceback" not in error
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]

    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", str(data), "--out", str(out), "--resume"]) == 0
    assert_same_run(out, full_reference)


def test_kept_are_the_last_k_and_the_best():
    losses = [3.0, 1.0, 2.0, 1.0, 2.5, None]
    checkpoints = [Checkpoint(Path(f"step-{i}"), {"position": {"step": i}, "eval_loss": loss})
                   for i, loss in enumerate(losses, 1)]
    assert [c.step for c in kept(checkpoints, 2)] == [2, 5, 6]  # the earliest of equal bests
    assert [c.step for c in kept(checkpoints, 5)] == [2, 3, 4, 5, 6]
    assert [c.step for c in kept(checkpoints[3:], 1)] == [4, 6]
    assert kept([], 2) == []


def test_trim_metrics_drops_rows_past_the_checkpoint_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 2}\n{"step": 1, "loss": 1}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    trim_metrics(path, 1)
    assert path.read_text() == '{"step": 0, "eval_loss": 2}\n{"step": 1, "loss": 1}\n'


@pytest.mark.slow
def test_weights_saved_without_the_end_of_training_are_trained_again(tmp_path, tiny_run, tiny_model_dir, cli,
                                                                    assert_trained):
    """Killed while save_final wrote the weights, with no checkpoint: run.json has its fingerprint
    but not "training" (recorded after the weights), and the weights may be cut short. --resume
    trains the run again instead of calling it finished."""
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    data = tiny_run.parent / "pairs.jsonl"
    info = json.loads((run / "run.json").read_text())
    assert "fingerprint" in info and not (run / "checkpoints").exists()
    del info["training"]
    (run / "run.json").write_text(json.dumps(info))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli("train", data, "--out", run, "--resume", "--base", tiny_model_dir, "--method", "lora",
                 "--max-steps", "2", "--batch-size", "4", "--test-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the run is finished" not in result.stdout and "training from the start" in result.stderr
    assert json.loads((run / "run.json").read_text())["training"]["steps"] == 2
    assert_trained(run)
