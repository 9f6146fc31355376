"""The same global batch gives the same training, however it is cut: into micro-batches
accumulated over --grad-accum, or across 2 CPU processes (gloo) under `accelerate launch`.
Every trained token weighs the same in the step's loss, whichever piece holds it. And a
2-process run killed after a checkpoint resumes to the weights of one never interrupted."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import tunelab
from tunelab.cli import main
from tunelab.train.checkpoint import PAUSE_ENV

pytestmark = pytest.mark.slow

ARGS = ["--method", "full", "--lr", "0.003", "--epochs", "2", "--test-size", "8", "--eval-every", "100",
        "--precision", "fp32", "--seed", "3"]


def varied_answers(path: Path) -> Path:
    """Answers from 1 to 34 numbers long, so micro-batches hold very different numbers of trained tokens."""
    rows = [{"prompt": f"Count to {n} ({i})", "completion": " ".join(map(str, range(1, n + 1)))}
            for i in range(4) for n in (1, 2, 3, 5, 8, 13, 21, 34)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def assert_same_trajectory(single: list[dict], other: list[dict]) -> None:
    assert [row["step"] for row in other] == [row["step"] for row in single]
    for a, b in zip(single, other):
        assert a.get("lr") == pytest.approx(b.get("lr"), abs=1e-12)
        assert a.get("tokens") == b.get("tokens")  # the same examples in each global batch
        for key in ("loss", "eval_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=5e-5), (a, b)


def test_accumulated_micro_batches_match_one_batch(tmp_path, tiny_model_dir):
    data = varied_answers(tmp_path / "counts.jsonl")
    one, accumulated = tmp_path / "one", tmp_path / "accumulated"
    # 26 training examples: each epoch ends on a short step (2 examples, 1 micro-batch of 4).
    common = [str(data), "--base", str(tiny_model_dir), *ARGS, "--test-size", "6"]
    assert main(["train", *common, "--out", str(one), "--batch-size", "8"]) == 0
    assert main(["train", *common, "--out", str(accumulated), "--batch-size", "2", "--grad-accum", "4"]) == 0
    single = losses(one)
    assert len([row for row in single if "loss" in row]) == 8  # 4 steps an epoch, 2 epochs
    assert_same_trajectory(single, losses(accumulated))


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`tunelab` in 2 CPU processes (gloo), through this Python's accelerate launcher, so it runs
    wherever the suite runs (no `accelerate` command on PATH needed). --multi_gpu is accelerate's
    torchrun-style launcher; without a GPU tunelab runs its processes on the CPU with gloo. The
    launcher and its processes form their own process group, so a test can kill them all."""
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1]), **(env or {})}
    # A file, since a pipe nobody reads while it runs could fill and stall it; it lives on as process.log.
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "tunelab.cli", *args],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    process.log = log
    return process


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in map(int, children.read_text().split()):
                found += [child, *descendants(child)]
    return found


def kill(process: subprocess.Popen) -> None:
    """The launcher and every process it started: torch's launcher starts each worker in a
    session of its own, out of reach of the launcher's process group, and a worker left alive
    would still hold the run folder's lock."""
    workers = descendants(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    for pid in workers:  # gone, so their locks are released
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            time.sleep(0.01)


def _state(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0].lower()
    return "zombie"


def output(process: subprocess.Popen) -> str:
    process.log.seek(0)
    return process.log.read()


def finish(process: subprocess.Popen) -> str:
    try:
        process.wait(timeout=600)
    finally:
        kill(process)
    assert process.returncode == 0, output(process)[-3000:]
    return output(process)


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, tiny_model_dir):
    data = varied_answers(tmp_path / "counts.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(one),
                 "--batch-size", "8", *ARGS]) == 0
    log = finish(launch("train", str(data), "--base", str(tiny_model_dir), "--out", str(two),
                        "--batch-size", "2", "--grad-accum", "2", *ARGS))
    # One process speaks for the run: the data check, held-out losses and the last line once each.
    assert log.count("Data check of") == 1, log[-3000:]
    assert log.count("step 0: held-out loss") == 1 and log.count("Run saved in") == 1, log[-3000:]

    # Each process accumulates 2 micro-batches of 2: 8 examples a step, as the single process.
    single = losses(one)
    steps = [row for row in single if "loss" in row]
    assert len(steps) == 6  # 24 training examples, 8 per step, 2 epochs
    assert_same_trajectory(single, losses(two))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (two / "model" / "model.safetensors").exists()


def test_two_processes_killed_after_a_checkpoint_resume_to_the_same_weights(tmp_path, tiny_model_dir):
    """LoRA dropout draws from each process's own RNG, which differ after the first micro-batches
    (their sizes differ): a checkpoint must hold every process's RNG state, and every process
    must take part in the save."""
    from safetensors.torch import load_file

    data = varied_answers(tmp_path / "counts.jsonl")
    # 26 training examples, 2 a micro-batch and 2 processes: 7 steps an epoch; step 8 is in the second.
    flags = ["--base", str(tiny_model_dir), "--method", "lora", "--lora-dropout", "0.1", "--lr", "0.01",
             "--max-steps", "8", "--batch-size", "2", "--test-size", "6", "--eval-examples", "2",
             "--save-every", "4", "--precision", "fp32", "--seed", "3"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    finish(launch("train", str(data), "--out", str(reference), *flags))

    # The save of step 8 stalls before its rename: kill every process once step 4's is complete.
    killed = launch("train", str(data), "--out", str(out), *flags, env={PAUSE_ENV: "8:600"})
    deadline = time.monotonic() + 600
    try:
        while not (out / "checkpoints" / "step-000004" / "checkpoint.json").exists():
            assert killed.poll() is None, output(killed)[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        kill(killed)
    assert not (out / "adapter").exists()

    log = finish(launch("train", str(data), "--out", str(out), "--resume"))
    assert "step-000004 (step 4)" in log
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a), [name for name in a if not torch.equal(a[name], b[name])]
    timing = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in row.items() if k not in timing} for row in losses(out)] == \
        [{k: v for k, v in row.items() if k not in timing} for row in losses(reference)]
