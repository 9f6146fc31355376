"""The same global batch gives the same training, however it is cut: into micro-batches
accumulated over --grad-accum, or across 2 CPU processes (gloo) under `accelerate launch`.
Every trained token weighs the same in the step's loss, whichever piece holds it."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main

ARGS = ["--method", "full", "--lr", "0.003", "--epochs", "2", "--test-size", "8", "--eval-every", "100", "--precision", "fp32",
        "--seed", "3"]


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


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, tiny_model_dir):
    data = varied_answers(tmp_path / "counts.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(one),
                 "--batch-size", "8", *ARGS]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1])}
    # --multi_gpu is accelerate's torchrun-style launcher; without a GPU tunelab runs its
    # processes on the CPU with gloo. `accelerate launch` through this Python: the console
    # script is not on PATH in an unactivated virtual environment.
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "tunelab.cli", "train", str(data), "--base", str(tiny_model_dir), "--out", str(two),
         "--batch-size", "2", "--grad-accum", "2", *ARGS],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    # Each process accumulates 2 micro-batches of 2: 8 examples a step, as the single process.
    single = losses(one)
    steps = [row for row in single if "loss" in row]
    assert len(steps) == 6  # 24 training examples, 8 per step, 2 epochs
    assert_same_trajectory(single, losses(two))
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (two / "model" / "model.safetensors").exists()
