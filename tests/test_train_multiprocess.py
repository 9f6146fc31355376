"""The same training loop under `accelerate launch` with 2 CPU processes (gloo) follows the same
loss trajectory as one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main

ARGS = ["--method", "full", "--lr", "0.003", "--epochs", "2", "--test-size", "8", "--eval-every", "100", "--precision", "fp32",
        "--seed", "3"]


def losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate command")
def test_two_processes_match_one_at_the_same_global_batch(tmp_path, pairs_file, tiny_model_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(one),
                 "--batch-size", "8", *ARGS]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1])}
    # --multi_gpu is accelerate's torchrun-style launcher; without a GPU tunelab runs its
    # processes on the CPU with gloo.
    launched = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "tunelab.cli", "train", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(two),
         "--batch-size", "4", *ARGS],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]

    single, double = losses(one), losses(two)
    steps = [row for row in single if "loss" in row]
    assert len(steps) == 8  # 32 training examples, 8 per step, 2 epochs
    assert [row["step"] for row in double] == [row["step"] for row in single]
    for a, b in zip(single, double):
        assert a.get("lr") == pytest.approx(b.get("lr"), abs=1e-12)
        assert a.get("tokens") == b.get("tokens")  # the same examples in each global batch
        for key in ("loss", "eval_loss"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=5e-5), (a, b)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (two / "model" / "model.safetensors").exists()
