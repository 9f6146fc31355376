"""The fit check (tunelab/fit.py): the memory floor counted from config.json, the memory available
read from /proc/meminfo and a cgroup's limit, and the one-line refusal before the weights load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab import device, fit
from tunelab.config import TrainConfig

CITIES = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]


@pytest.fixture
def data(tmp_path, write_jsonl) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Country of {city}? ({i})", "completion": country}
                                                  for i in range(3) for city, country in CITIES])


def test_the_floor_is_counted_from_the_config_as_the_loaded_model_holds_it(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model

    model = load_model(tiny_model_dir)
    parameters = sum(p.numel() for p in model.parameters())  # the tied output layer once
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name != "lm_head")
    for targets in ("all-linear", "q_proj,v_proj"):
        names = targets if targets == "all-linear" else targets.split(",")
        peft_model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=8, target_modules=names,
                                                                           task_type="CAUSAL_LM"))
        adapters = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        needed = fit.needed_bytes(TrainConfig(lora_rank=8, lora_targets=targets, precision="fp32"), tiny_model_dir)
        assert needed == {"full": 16 * parameters, "lora": 4 * parameters + 16 * adapters}
        # Under bf16 autocast the frozen linear layers are held in bf16, as training holds them,
        # with or without gradient checkpointing.
        bf16 = fit.needed_bytes(TrainConfig(lora_rank=8, lora_targets=targets, precision="bf16"), tiny_model_dir)
        assert bf16 == {"full": 16 * parameters, "lora": 4 * parameters - 2 * linear + 16 * adapters}
        device.frozen_base_in_bf16(peft_model)
        held = sum(p.numel() * p.element_size() for p in peft_model.parameters() if not p.requires_grad)
        assert bf16["lora"] == held + 16 * adapters
        checkpointed = TrainConfig(lora_rank=8, lora_targets=targets, precision="bf16", gradient_checkpointing=True)
        assert fit.needed_bytes(checkpointed, tiny_model_dir) == bf16


def test_on_a_gpu_the_machine_holds_the_weights_as_they_load(tiny_model_dir, monkeypatch):
    import torch

    parameters = sum(p.numel() for p in fit.model_on_meta(tiny_model_dir).parameters())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fit.needed_bytes(TrainConfig(method="full"), tiny_model_dir) == {"full": 4 * parameters,
                                                                           "lora": 4 * parameters}


def test_full_fine_tuning_too_big_is_refused_before_the_weights_load(tiny_model_dir, data, tmp_path, cli,
                                                                     monkeypatch):
    needed = fit.needed_bytes(TrainConfig(), tiny_model_dir)
    monkeypatch.setattr(fit, "available_bytes", lambda: needed["full"] // 2)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("tunelab.train.loop.load_model", no_loading)
    result = cli("train", data, "--base", tiny_model_dir, "--method", "full", "--out", tmp_path / "run")
    assert result.returncode == 2, result.stderr
    gib = 1024**3
    assert result.stderr.strip().splitlines() == [
        f"tunelab: error: {tiny_model_dir} needs at least {needed['full'] / gib:.1f} GiB for full fine-tuning "
        f"(weights, gradients and AdamW's states) and {needed['full'] // 2 / gib:.1f} GiB is available; "
        f"use --method lora (~{needed['lora'] / gib:.0f} GiB) or a smaller model"]
    assert not (tmp_path / "run" / "model").exists()


def test_lora_too_big_is_refused_without_suggesting_lora(tiny_model_dir, data, tmp_path, cli, monkeypatch):
    monkeypatch.setattr(fit, "available_bytes", lambda: 1024)
    result = cli("train", data, "--base", tiny_model_dir, "--out", tmp_path / "run")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line.startswith(f"tunelab: error: {tiny_model_dir} needs at least ") and "for LoRA" in line
    assert "--method lora" not in line and "--precision bf16 (" not in line and "\n" not in line


def test_lora_that_fits_in_bf16_is_told_so(tiny_model_dir, data, tmp_path, cli, monkeypatch):
    fp32 = fit.needed_bytes(TrainConfig(precision="fp32"), tiny_model_dir)["lora"]
    bf16 = fit.needed_bytes(TrainConfig(precision="bf16"), tiny_model_dir)["lora"]
    monkeypatch.setattr(fit, "available_bytes", lambda: (fp32 + bf16) // 2)
    result = cli("train", data, "--base", tiny_model_dir, "--precision", "fp32", "--out", tmp_path / "run")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert f"needs at least {fp32 / 1024**3:.1f} GiB for LoRA (its weights in fp32 and" in line
    assert f"use --precision bf16 (~{bf16 / 1024**3:.0f} GiB) or a smaller model" in line


def test_a_run_that_fits_trains(tiny_model_dir, data, tmp_path, cli, monkeypatch):
    needed = fit.needed_bytes(TrainConfig(method="full"), tiny_model_dir)
    monkeypatch.setattr(fit, "available_bytes", lambda: needed["full"])  # the floor exactly: it fits
    result = cli("train", data, "--base", tiny_model_dir, "--method", "full", "--max-steps", "1",
                 "--batch-size", "4", "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "model").is_dir()


def test_unknown_memory_checks_nothing(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(fit, "available_bytes", lambda: None)
    monkeypatch.setattr(fit, "needed_bytes", lambda *args: pytest.fail("counted without memory to compare"))
    fit.check_fits(TrainConfig(method="full"), tiny_model_dir)


def test_meminfo_gives_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   15000000 kB\n")
    assert fit._meminfo_available(meminfo) == 15000000 * 1024
    assert fit._meminfo_available(tmp_path / "missing") is None


def write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_v2_room_is_the_least_under_a_limit_here_or_above(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("0::/pod/job\n")
    write(tmp_path / "root", {"memory.max": "max\n"})
    write(tmp_path / "root" / "pod", {"memory.max": str(8 * 2**30), "memory.current": str(6 * 2**30),
                                      "memory.stat": f"anon 1\ninactive_file {2**30}\n"})
    write(tmp_path / "root" / "pod" / "job", {"memory.max": "max", "memory.current": "0"})
    assert fit._cgroup_room(tmp_path / "root", membership) == 3 * 2**30  # 8 - (6 - 1 reclaimable)


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    membership = tmp_path / "cgroup"
    membership.write_text("5:cpu,cpuacct:/\n4:memory:/job\n")
    write(tmp_path / "root" / "memory" / "job", {
        "memory.limit_in_bytes": str(4 * 2**30), "memory.usage_in_bytes": str(3 * 2**30),
        "memory.stat": "cache 5\ntotal_inactive_file 0\n"})
    assert fit._cgroup_room(tmp_path / "root", membership) == 2**30
    (tmp_path / "root" / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert fit._cgroup_room(tmp_path / "root", membership) is None


def test_a_config_transformers_cannot_read_is_left_to_loading_to_report(tmp_path, monkeypatch):
    write(tmp_path / "model", {"config.json": '{"model_type": "no-such-architecture"}'})
    monkeypatch.setattr(fit, "available_bytes", lambda: 1)
    fit.check_fits(TrainConfig(), tmp_path / "model")  # no refusal on a count it could not make
