"""Where a model answers: the device rule (CUDA, then Apple's MPS, then the CPU; --device
overrides), tested on the CPU with the hardware's presence faked, and said in eval.json and the
report. The real CUDA path runs in the test marked `gpu`, skipped where no GPU is present."""

import json
import shutil

import pytest
import torch

from tunelab.cli import main
from tunelab.device import computes_bf16, inference_device, native_bf16
from tunelab.errors import UserError


def fake_hardware(monkeypatch, cuda: bool, mps: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize(("cuda", "mps", "chosen"), [
    (True, True, "cuda"), (True, False, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_takes_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, chosen):
    fake_hardware(monkeypatch, cuda, mps)
    assert inference_device() == inference_device("auto") == torch.device(chosen)


def test_an_asked_device_wins_when_present(monkeypatch):
    fake_hardware(monkeypatch, cuda=True, mps=True)
    assert [inference_device(d).type for d in ("cuda", "mps", "cpu")] == ["cuda", "mps", "cpu"]


@pytest.mark.parametrize("asked", ["cuda", "mps"])
def test_an_asked_device_that_is_missing_is_a_user_error(monkeypatch, asked):
    fake_hardware(monkeypatch, cuda=False, mps=False)
    with pytest.raises(UserError, match=f"--device {asked}: not available on this machine"):
        inference_device(asked)
    with pytest.raises(UserError, match="choose one of auto, cuda, mps, cpu"):
        inference_device("tpu")


def test_mps_computes_fp32_unless_bf16_is_asked():
    mps = torch.device("mps")
    assert not native_bf16(mps)
    assert not computes_bf16("auto", mps) and computes_bf16("bf16", mps) and not computes_bf16("fp32", mps)


def test_generate_on_a_missing_device_is_one_line_before_any_model_loads(tiny_run, monkeypatch, capsys):
    fake_hardware(monkeypatch, cuda=False, mps=False)
    from tunelab import models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", str(tiny_run), "--prompt", "Country of Rome?", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tunelab: error: --device cuda: not available") and "\n" not in err


def evaluated_on(run_folder, tmp_path, device: str) -> dict:
    run = tmp_path / "run"
    shutil.copytree(run_folder, run, ignore=shutil.ignore_patterns("eval.json"))
    assert main(["eval", str(run), "--no-base", "--no-forgetting", "--max-new-tokens", "4", "--device", device]) == 0
    return json.loads((run / "eval.json").read_text())


def test_eval_json_and_the_report_say_where_the_answers_came_from(tiny_run, tmp_path, capsys):
    results = evaluated_on(tiny_run, tmp_path, "cpu")
    assert results["device"] == "cpu" and results["precision"] in ("bf16", "fp32")
    assert f"cost per request ({results['precision']} on cpu)" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert f"The local contenders computed in {results['precision']} on the CPU" in page


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_and_generate_run_on_the_gpu(tiny_run, tmp_path, capsys):
    import tunelab

    results = evaluated_on(tiny_run, tmp_path, "auto")
    assert results["device"] == "cuda"
    run = tunelab.load(tmp_path / "run")
    assert run.model().device.type == "cuda"
    assert isinstance(run.generate("Country of Rome?", max_new_tokens=4), str)
    assert main(["generate", str(tiny_run), "--prompt", "Country of Rome?", "--max-new-tokens", "4",
                 "--device", "cuda", "--precision", "bf16"]) == 0
