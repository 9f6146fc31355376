"""End to end: the real `tunelab` CLI on a tiny model."""

import json
import math
import subprocess
import sys

import pytest
import torch

import tunelab
from clirun import run_cli
from tunelab.cli import main
from tunelab.run import Run
from tunelab.template import NAMED


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, write_jsonl):
    """One full-fine-tuning run with the alpaca template, shared by the tests below."""
    folder = tmp_path_factory.mktemp("e2e")
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {c}? ({i})", "completion": k}
                                                 for i in range(10) for c, k in cities])
    out = folder / "run"
    config = folder / "train.yaml"
    config.write_text("method: full\nlr: 0.003\nbatch_size: 4\nmax_steps: 5\ntemplate: alpaca\neval_every: 100\n")
    code = main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(out), "--config", str(config),
                 "--max-steps", "300", "--test-size", "8", "--seed", "1"])
    assert code == 0
    return out, data


@pytest.mark.slow
def test_run_folder_is_complete_and_loss_goes_down(trained_run):
    out, _ = trained_run
    for name in ("config.yaml", "run.json", "template.json", "split.json", "train.jsonl", "test.jsonl",
                 "metrics.jsonl", "tokenizer/tokenizer.json", "model/model.safetensors", "model/config.json"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 300  # the flag --max-steps 300 overrode the YAML's 5
    assert evals[-1] < evals[0] * 0.5
    assert sum(r["loss"] for r in steps[-5:]) < sum(r["loss"] for r in steps[:5]) * 0.5
    split = json.loads((out / "split.json").read_text())
    assert len(split["test_lines"]) == 8 and not set(split["test_lines"]) & set(split["train_lines"])
    assert Run(out).config.lr == 0.003  # the YAML filled the rest


@pytest.mark.slow
def test_generation_uses_the_saved_template(trained_run, capsys):
    out, _ = trained_run
    run = Run(out)
    assert run.template.name == "alpaca" and run.template.source == NAMED["alpaca"]
    # The tokenizer's own chat template (ChatML) must not be what generation renders.
    prompt = "Country of Rome? (3)"
    text = run.template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    assert text.endswith("### Instruction:\nCountry of Rome? (3)\n\n### Response:\n")
    ids = run.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = run.model().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                        eos_token_id=run.template.stop_token_ids,
                                        pad_token_id=run.tokenizer.pad_token_id)
    expected_text = run.tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert main(["generate", str(out), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected_text == "Italy"


@pytest.mark.slow
def test_batch_generation_keeps_order_and_ignores_references(trained_run, tmp_path, capsys, write_jsonl):
    out, _ = trained_run
    rows = [{"prompt": "Country of Paris? (1)", "completion": "WRONG"},
            {"instruction": "Country of Berlin? (2)"},
            {"messages": [{"role": "user", "content": "Country of Madrid? (4)"}]}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    assert main(["generate", str(out), "--input", str(inputs), "--max-new-tokens", "8",
                 "--output", str(tmp_path / "out.jsonl")]) == 0
    answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [a["line"] for a in answers] == [1, 2, 3]
    assert [a["answer"] for a in answers] == ["France", "Germany", "Spain"]


@pytest.mark.slow
def test_eval_compares_base_and_tuned(trained_run, capsys):
    out, _ = trained_run
    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "zero-shot" in printed and "few-shot" in printed and "tuned" in printed
    results = json.loads((out / "eval.json").read_text())
    assert results["examples_evaluated"] == 8
    metrics = results["metrics"]
    assert metrics["tuned"]["exact_match"]["value"] > metrics["zero-shot"]["exact_match"]["value"]
    assert metrics["tuned"]["heldout_loss"]["value"] < metrics["zero-shot"]["heldout_loss"]["value"]
    assert {"line", "prompt", "reference", "answers"} <= set(results["samples"][0])
    assert set(results["samples"][0]["answers"]) == {"zero-shot", "few-shot", "retrieval", "tuned"}


@pytest.mark.slow
def test_a_runs_own_test_split_is_a_data_file_eval_accepts(trained_run, capsys):
    out, _ = trained_run
    assert main(["eval", str(out), "--data", str(out / "test.jsonl"), "--no-base", "--no-forgetting"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert results["examples_evaluated"] == 8 and [c["name"] for c in results["contenders"]] == ["tuned"]
    assert "tunelab: error" not in capsys.readouterr().err


@pytest.mark.slow
def test_chat_streams_with_the_saved_template(trained_run):
    out, _ = trained_run
    result = subprocess.run([sys.executable, "-m", "tunelab.cli", "chat", str(out), "--max-new-tokens", "8"],
                            input="Country of Oslo? (5)\nCountry of Rome? (3)\n\n", capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.splitlines() if "model> " in line]
    assert len(replies) == 2 and replies[1].endswith("Italy")


@pytest.mark.slow
def test_python_api_lora(tiny_model_dir, pairs_file, tmp_path, assert_trained):
    run = tunelab.finetune(pairs_file, out=tmp_path / "api", base=str(tiny_model_dir), method="lora",
                           max_steps=3, batch_size=4, test_size=4)
    assert (tmp_path / "api" / "adapter" / "adapter_model.safetensors").exists()
    assert_trained(tmp_path / "api")
    assert isinstance(run.generate("Country of Paris? (0)", max_new_tokens=4), str)
    results = run.evaluate(include_base=False)
    assert results.examples_evaluated == 4 and results.names == ["tuned"]  # an EvalResults
    assert results.model_dump()["contenders"][0]["name"] == "tuned"
    assert tunelab.load(tmp_path / "api").config.method == "lora"


BAD_INPUTS = [
    ("empty", [], [], "empty.jsonl: E_EMPTY no examples found"),
    ("shape", [{"question": "q", "answer": "a"}], [], "shape.jsonl:1: E_SHAPE unknown shape"),
    ("missing", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}], [], "missing.jsonl:2: E_SHAPE unknown shape"),
    ("fields", [{"messages": [{"role": "user"}]}], [],
     "fields.jsonl:1: E_CONTENT_MISSING message 0 needs 'role' and 'content'"),
    ("model", [{"prompt": "p", "completion": "c"}] * 3, ["--base", "/no/such/model"],
     "base model '/no/such/model' not found"),
    ("flag", [{"prompt": "p", "completion": "c"}] * 3, ["--method", "magic"],
     "--method magic: must be 'lora' or 'full'"),
    ("value", [{"prompt": "p", "completion": "c"}] * 3, ["--batch-size", "0"],
     "--batch-size 0: must be greater than 0"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,rows,flags,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, name, rows, flags, message, write_jsonl):
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    result = cli("train", str(data), "--out", str(tmp_path / "run"), *flags)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    if name in ("empty", "shape", "missing", "fields"):  # bad data: nothing written but the data check's report
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data_check.json", "length_histogram.txt"]
        assert json.loads((tmp_path / "run" / "data_check.json").read_text())["error_counts"]
    else:
        assert not (tmp_path / "run").exists()


def test_missing_run_folder_and_help(tmp_path):
    result = cli("eval", str(tmp_path))
    assert result.returncode == 2 and "not a tunelab run folder" in result.stderr
    result = cli("--help")
    for command in ("demo", "data", "train", "eval", "generate", "chat", "serve", "export"):
        assert command in result.stdout


@pytest.mark.slow
def test_raw_text_trains_end_to_end_after_the_data_check(tiny_model_dir, tmp_path, capsys, write_jsonl):
    documents = [{"text": f"Document {i}. " + "The cat sat on the mat and looked around. " * (1 + i % 5)}
                 for i in range(12)]
    data = write_jsonl(tmp_path / "raw.jsonl", documents + documents[:1])
    out = tmp_path / "raw-run"
    assert main(["train", str(data), "--base", str(tiny_model_dir), "--max-steps", "2", "--max-length", "32",
                 "--test-size", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Data check of" in printed and "W_DUPLICATE" in printed
    report = json.loads((out / "data_check.json").read_text())
    assert report["shapes"] == {"text": 13} and report["truncation"]["chunked"] > 0
    assert report["split"]["train"] == 10 and report["split"]["test"] == 2
    assert all("text" in json.loads(line) for line in (out / "train.jsonl").read_text().splitlines())
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == [1, 2]
    assert all(math.isfinite(r.get("loss", r.get("eval_loss"))) for r in losses)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert main(["eval", str(out)]) == 2
    assert "a raw-text run has no answers to compare" in capsys.readouterr().err
