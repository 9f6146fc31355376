"""Training as a whole: the data read and encoded once, what the run folder keeps, Ctrl-C, and
the refusal of checkpoints under sharding."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunelab
from tunelab.cli import main
from tunelab.config import TrainConfig
from tunelab.errors import UserError
from tunelab.template import Template
from tunelab.train import loop as train_mod
from tunelab.train.checkpoint import PAUSE_ENV

QUICK = ["--method", "full", "--max-steps", "2", "--batch-size", "8", "--test-size", "4", "--eval-every", "100",
         "--precision", "fp32"]


def count_encodings(monkeypatch) -> list[str]:
    """The first message of every conversation the template encodes, one entry per call."""
    calls: list[str] = []
    original = Template.encode

    def counting(self, messages, *args, **kwargs):
        calls.append(messages[0]["content"])
        return original(self, messages, *args, **kwargs)

    monkeypatch.setattr(Template, "encode", counting)
    return calls


def test_each_example_is_tokenised_once(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    calls = count_encodings(monkeypatch)
    assert main(["train", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                 *QUICK]) == 0
    prompts = [json.loads(line)["prompt"] for line in pairs_file.read_text().splitlines()]
    assert sorted(calls) == sorted(prompts)


@pytest.mark.slow
def test_a_file_too_large_for_memory_is_streamed_twice(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    calls = count_encodings(monkeypatch)
    monkeypatch.setattr(train_mod, "IN_MEMORY_BYTES", pairs_file.stat().st_size - 1)
    assert main(["train", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(tmp_path / "run"),
                 *QUICK]) == 0
    prompts = [json.loads(line)["prompt"] for line in pairs_file.read_text().splitlines()]
    assert sorted(calls) == sorted(prompts * 2)  # the check's pass, then training's
    # Both ways give the same run.
    monkeypatch.undo()
    assert main(["train", str(pairs_file), "--base", str(tiny_model_dir), "--out", str(tmp_path / "once"),
                 *QUICK]) == 0
    def untimed(name: str, text: str):
        if name != "metrics.jsonl":
            return text
        return [{k: v for k, v in json.loads(row).items() if k not in ("tokens_per_s", "elapsed_s")}
                for row in text.splitlines()]

    for name in ("train.jsonl", "test.jsonl", "split.json", "run.json", "metrics.jsonl"):
        assert untimed(name, (tmp_path / "run" / name).read_text()) == \
            untimed(name, (tmp_path / "once" / name).read_text()), name


def test_an_example_dropped_for_length_is_not_in_train_jsonl(tmp_path, tiny_model_dir, capsys, write_jsonl):
    rows = [{"prompt": f"Country of city {i}?", "completion": "France"} for i in range(12)]
    rows[3] = {"prompt": "Describe the history of Paris. " * 40, "completion": "It is long."}
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "run"
    assert main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(out), *QUICK,
                 "--test-size", "2", "--seed", "0", "--max-length", "64", "--truncation", "drop"]) == 0
    split = json.loads((out / "split.json").read_text())
    assert 4 in split["train_lines"]  # the split chose it for training (seed 0) ...
    assert "dropped (lines 4)" in capsys.readouterr().out
    trained = [json.loads(line)["metadata"]["line"] for line in (out / "train.jsonl").read_text().splitlines()]
    assert 4 not in trained  # ... and training dropped it, so train.jsonl leaves it out
    assert sorted(trained) == sorted(set(split["train_lines"]) - {4})
    assert json.loads((out / "run.json").read_text())["train_examples"] == len(trained)


def start_training(data: Path, out: Path, *flags: str, pause: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(tunelab.__file__).parents[1])}
    env.pop(PAUSE_ENV, None)
    if pause:
        env[PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(data), "--out", str(out), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(process: subprocess.Popen, condition, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def interrupt(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=120)  # far less than the run (or the stalled save) would take
    finally:
        process.kill()
    return process.returncode, err


@pytest.mark.slow
def test_ctrl_c_names_the_last_checkpoint_and_how_to_resume(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    # The save of step 3 stalls before its rename: Ctrl-C lands in the middle of writing it.
    process = start_training(pairs_file, out, "--base", str(tiny_model_dir), "--method", "full",
                             "--max-steps", "50", "--batch-size", "4", "--test-size", "4", "--save-every", "1",
                             pause="3:600")
    wait_for(process, lambda: any((out / "checkpoints").glob(".step-000003-*/checkpoint.json")))
    code, err = interrupt(process)
    assert code == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tunelab:")]
    assert lines == [f"tunelab: interrupted; the last complete checkpoint is {out}/checkpoints/step-000002 "
                     f"(step 2); continue with: tunelab train {pairs_file} --out {out} --resume"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]


@pytest.mark.slow
def test_ctrl_c_without_checkpoints_suggests_save_every(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    process = start_training(pairs_file, out, "--base", str(tiny_model_dir), "--method", "full",
                             "--max-steps", "100000", "--batch-size", "4", "--test-size", "4")
    metrics = out / "metrics.jsonl"
    wait_for(process, lambda: metrics.exists() and '"loss"' in metrics.read_text())
    code, err = interrupt(process)
    assert code == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("tunelab:")]
    assert len(lines) == 1 and "no checkpoint" in lines[0] and "--save-every" in lines[0], err


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_checkpoints_are_refused_under_sharding(kind):
    from accelerate.utils import DistributedType

    with pytest.raises(UserError, match=f"--save-every: checkpoints are not supported under {kind}"):
        train_mod.refuse_sharded_checkpoints(DistributedType[kind], TrainConfig(save_every=10), resuming=False)
    with pytest.raises(UserError, match="--resume"):
        train_mod.refuse_sharded_checkpoints(DistributedType[kind], TrainConfig(), resuming=True)
    train_mod.refuse_sharded_checkpoints(DistributedType[kind], TrainConfig(), resuming=False)
    for allowed in ("NO", "MULTI_CPU", "MULTI_GPU"):
        train_mod.refuse_sharded_checkpoints(DistributedType[allowed], TrainConfig(save_every=10), resuming=True)


def test_python_api_hides_the_known_library_warning_and_no_other(tiny_model_dir, pairs_file, tmp_path, recwarn):
    """peft's FutureWarning about a property transformers 5 renamed is nothing a user can act on;
    the Python API drops it where it arises, and leaves every warning filter as it found it."""
    import warnings

    warnings.simplefilter("always")
    before = list(warnings.filters)
    run = tunelab.finetune(pairs_file, out=tmp_path / "api", base=str(tiny_model_dir), method="lora", max_steps=1,
                           batch_size=4, test_size=4, gradient_checkpointing=True, precision="fp32")
    run.generate("Country of Paris? (0)", max_new_tokens=1)  # the adapter loaded by peft again
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in recwarn]
    assert warnings.filters == before
    with pytest.warns(FutureWarning, match="the user's own"):
        warnings.warn("the user's own", FutureWarning, stacklevel=1)


def test_lora_under_bf16_holds_the_frozen_base_in_bf16_and_trains_bit_for_bit_the_same(
        tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    """Under bf16 autocast a LoRA run holds its frozen linear layers in bf16 (half their memory,
    no per-step casts): the losses and the adapter are exactly those of the fp32 base."""
    import torch
    from safetensors.torch import load_file

    from tunelab import device

    held = []
    real = device.frozen_base_in_bf16

    def watched(model):
        cast = real(model)
        held.append((cast, {p.dtype for name, p in model.named_parameters() if "base_layer" in name},
                     {p.dtype for p in model.parameters() if p.requires_grad},
                     model.get_input_embeddings().weight.dtype))
        return cast

    def train(out: Path):
        tunelab.finetune(pairs_file, out=out, base=str(tiny_model_dir), method="lora", max_steps=3, batch_size=4,
                         test_size=4, eval_every=2, precision="bf16")
        losses = [(row.get("loss"), row.get("eval_loss")) for row in map(json.loads, (out / "metrics.jsonl").open())]
        return losses, load_file(out / "adapter" / "adapter_model.safetensors")

    monkeypatch.setattr(device, "frozen_base_in_bf16", watched)
    losses, adapter = train(tmp_path / "bf16-base")
    monkeypatch.setattr(device, "frozen_base_in_bf16", lambda model: 0)
    fp32_losses, fp32_adapter = train(tmp_path / "fp32-base")

    [(cast, base_dtypes, trained_dtypes, embeddings_dtype)] = held
    assert cast > 0 and base_dtypes == {torch.bfloat16}
    assert trained_dtypes == {torch.float32} and embeddings_dtype == torch.float32
    assert losses == fp32_losses and any(loss is not None for loss, _ in losses)
    assert adapter.keys() == fp32_adapter.keys()
    assert all(torch.equal(adapter[name], fp32_adapter[name]) for name in adapter)
    assert all(tensor.dtype == torch.float32 for tensor in adapter.values())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_lora_under_bf16_lets_the_mapped_weights_file_go(tiny_model_dir):
    """transformers loads safetensors as pages of the mapped file; once the frozen base is held in
    bf16 and its other weights copied, nothing keeps the file's mapping (the whole file) resident."""
    import gc

    from peft import LoraConfig, get_peft_model

    from tunelab import device
    from tunelab.models import load_model

    weights = str((tiny_model_dir / "model.safetensors").resolve())

    def mapped() -> bool:
        return any(line.rstrip().endswith(weights) for line in open("/proc/self/maps"))

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear",
                                                                  task_type="CAUSAL_LM"))
    assert mapped()
    device.frozen_base_in_bf16(model)
    gc.collect()
    assert not mapped()


def test_metrics_log_the_learning_rate_each_step_trained_with(tmp_path, tiny_model_dir, pairs_file):
    """The first step of a warmup trains at a rate of 0 and the last at a small positive one; each
    row of metrics.jsonl says the rate of its own step, not of the next."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    tunelab.finetune(pairs_file, out=tmp_path / "run", base=str(tiny_model_dir), method="lora", max_steps=4,
                     batch_size=2, test_size=4, eval_every=100, lr=1e-2, warmup_ratio=0.25, precision="fp32")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = [row["lr"] for row in rows if "loss" in row]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 4)
    used = []
    for _ in range(4):
        used.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert logged == pytest.approx(used) and used[0] == 0 and used[-1] > 0
