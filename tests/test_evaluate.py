"""`tunelab eval` end to end on a tiny trained run: contenders, assertions, endpoints, judge, bad input."""

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler

import pytest
import torch

from fakeapi import send_json, serve
from tunelab.cli import main
from tunelab.evaluate.core import WARM_UP_TOKENS
from tunelab.evaluate.metrics import BUCKETS
from tunelab.evaluate.results import EvalResults

COUNTRIES = {"Paris": "France", "Berlin": "Germany", "Madrid": "Spain", "Rome": "Italy"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir, write_jsonl):
    folder = tmp_path_factory.mktemp("eval")
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {c}? ({i})", "completion": k}
                                                 for i in range(10) for c, k in COUNTRIES.items()])
    out = folder / "run"
    assert main(["train", str(data), "--base", str(tiny_model_dir), "--out", str(out), "--method", "full",
                 "--lr", "0.003", "--batch-size", "4", "--max-steps", "40", "--template", "alpaca",
                 "--eval-every", "100", "--test-size", "8", "--seed", "1"]) == 0
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A copy of the run without results, for tests that check nothing gets written."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("eval.json"))
    return copy


class FakeModel(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that knows the countries, and grades every answer CORRECT.
    It answers the first request of each model 429 with Retry-After: 1, and logs the rest with
    their Authorization header."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            first = body["model"] not in self.server.throttled
            self.server.throttled.setdefault(body["model"], time.monotonic())
        if first:
            self.send_response(429)
            self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body["authorization"] = self.headers.get("Authorization")
        body["time"] = time.monotonic()
        self.server.requests.append(body)
        text = body["messages"][-1]["content"]
        if text.startswith("You grade an answer"):
            reply = "CORRECT"
        elif text == "Reply with the word OK.":
            reply = "OK"
        else:
            reply = COUNTRIES[re.search(r"Country of (\w+)", text).group(1)]
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 11, "completion_tokens": 2}})

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = serve(FakeModel)
    httpd.requests = []
    httpd.throttled = {}
    httpd.lock = threading.Lock()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_eval_with_shots_and_assertions_through_the_cli(trained_run, tmp_path):
    rules = tmp_path / "checks.yaml"
    rules.write_text("- name: one word\n  regex: '^\\w+$'\n- must_not_contain: [sorry]\n"
                     "- json_schema: {type: object}\n")
    # tunelab eval RUN --shots 2 --assertions checks.yaml
    result = subprocess.run([sys.executable, "-m", "tunelab.cli", "eval", str(trained_run), "--shots", "2",
                             "--assertions", str(rules)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    results = json.loads((trained_run / "eval.json").read_text())
    names = ["zero-shot", "few-shot", "retrieval", "tuned"]
    assert [c["name"] for c in results["contenders"]] == names
    assert results["schema"] == 2 and results["examples_evaluated"] == 8 and results["shots"] == 2
    for name in names:
        assert name in result.stdout.splitlines()[0]
    assert "exact match" in result.stdout and "cost per request" in result.stdout
    samples = results["samples"]
    for name in names:
        answers = [s["answers"][name] for s in samples]
        value = results["metrics"][name]["exact_match"]
        assert value["value"] == sum(a["exact_match"] for a in answers) / 8
        assert value["low"] <= value["value"] <= value["high"]
        assert sum(results["buckets"][name].values()) == 8
        assert results["buckets"][name] == {b: sum(a["bucket"] == b for a in answers) for b in BUCKETS}
        one_word = sum(bool(re.search(r"^\w+$", a["text"])) for a in answers)
        checked = results["assertions"]["results"][name]
        assert checked["rules"]["one word"] == one_word and checked["answers"] == 8
        assert checked["rules"]['json_schema: {"type": "object"}'] == 0  # no answer is a JSON object
        assert checked["all_passed"] == 0 and all(a["assertions_failed"] for a in answers)
    # the examples in the prompt make it longer: each few-shot request costs more prompt tokens
    cost = results["cost"]
    assert cost["few-shot"]["prompt_tokens"] > cost["zero-shot"]["prompt_tokens"] + 10
    assert cost["tuned"]["prompt_tokens"] == cost["zero-shot"]["prompt_tokens"]
    metrics = results["metrics"]
    assert metrics["tuned"]["heldout_loss"]["value"] < metrics["zero-shot"]["heldout_loss"]["value"]
    differences = {(d["contender"], d["metric"]): d for d in results["differences"]}
    assert set(differences) == {(n, m) for n in names[:3] for m in ("exact_match", "token_f1", "rouge_l")}
    zero = differences[("zero-shot", "exact_match")]
    tuned_right = {i for i, s in enumerate(samples) if s["answers"]["tuned"]["exact_match"]}
    zero_right = {i for i, s in enumerate(samples) if s["answers"]["zero-shot"]["exact_match"]}
    assert zero["tuned_only_right"] == sorted(tuned_right - zero_right)
    assert zero["low"] <= zero["difference"] <= zero["high"]
    forgetting = results["forgetting"]
    assert forgetting["questions"] == 42 and set(forgetting["results"]) == {"zero-shot", "tuned"}
    assert not (trained_run / ".eval.json.partial").exists()
    # What `tunelab eval` wrote is what the report and the Python API read, key for key.
    typed = EvalResults.read(trained_run / "eval.json")
    assert json.loads(typed.model_dump_json()) == results and typed.names == names
    assert typed.samples[0].answers["tuned"].bucket in BUCKETS and typed.forgetting.questions == 42
    report = (trained_run / "report.html").read_text()  # written by `tunelab eval` from the same file
    sections = set(re.findall(r"<h2>(.*?)</h2>", report))
    assert {"Metrics", "Assertions", "Forgetting check", "Answers side by side"} <= sections



def test_each_local_contender_answers_an_uncounted_warm_up_request_before_it_is_timed(monkeypatch):
    from tunelab.decoding.generate import Answer
    from tunelab.evaluate import core as evaluate

    calls = []

    def generate(model, template, prompts, max_new_tokens, batch_size, copying, precision):
        calls.append((len(prompts), max_new_tokens))
        for _ in prompts:
            yield Answer("France", 5, 1, "stop")

    monkeypatch.setattr(evaluate, "generate_detailed", generate)
    contender = evaluate.Contender("few-shot", "local", "base", "few-shot")
    prompts = [[{"role": "user", "content": f"Country of {city}?"}] for city in COUNTRIES]
    evaluate._generate(None, None, prompts, 32, 16, contender, progress=False, copying=None, precision="fp32")
    assert calls == [(1, WARM_UP_TOKENS), (4, 32)]  # the warm-up first, then every prompt once
    assert len(contender.answers) == 4


def test_score_builds_the_typed_results_without_a_model(tmp_path, write_jsonl):
    from tunelab.data.load import load_examples
    from tunelab.decoding.generate import Answer
    from tunelab.evaluate import core
    from tunelab.evaluate.assertions import load_rules

    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"Country of {city}?", "completion": country}
                                                 for city, country in COUNTRIES.items()])
    rules = tmp_path / "rules.yaml"
    rules.write_text("- must_not_contain: sorry\n")
    tuned = core.Contender("tuned", "local", "run", "fine-tuned",
                           [Answer(k, 5, 1, "stop") for k in COUNTRIES.values()], 1.0)
    base = core.Contender("zero-shot", "local", "base", "zero-shot", [Answer("sorry", 5, 1, "stop")] * 4, 2.0)
    results = core.score(load_examples(data), [base, tuned], rules=load_rules(rules), rules_file=rules)
    assert results.names == ["zero-shot", "tuned"] and results.examples_evaluated == 4
    metrics = results.metrics
    assert metrics["tuned"]["exact_match"].value == 1.0 and metrics["zero-shot"]["exact_match"].value == 0
    assert results.assertions.file == str(rules)
    assert {n: r.all_passed for n, r in results.assertions.results.items()} == {"zero-shot": 0, "tuned": 4}
    assert results.differences[0].tuned_only_right == [0, 1, 2, 3] and results.cost["zero-shot"].seconds == 2.0
    assert results.samples[2].answers["tuned"].text == "Spain" and results.judge is None
    assert EvalResults.model_validate_json(results.model_dump_json()) == results


@pytest.mark.slow
def test_eval_on_another_labelled_file(trained_run, tmp_path, capsys, write_jsonl, monkeypatch):
    from tunelab.decoding import generate
    from tunelab.evaluate import core as evaluate

    harder = write_jsonl(tmp_path / "harder.jsonl", [
        {"messages": [{"role": "user", "content": "Country of Rome? (11)"}, {"role": "assistant", "content": "Italy"}]},
        {"instruction": "Country of Paris? (12)", "output": "France"},
        {"prompt": "Country of Madrid? (13)", "completion": "Spain"},
    ])
    from tunelab.evaluate import forgetting

    asked, forgetting_in_bf16 = [], []
    for module in (evaluate, generate):  # generation, and the held-out loss
        monkeypatch.setattr(module, "autocast", lambda precision, device, real=module.autocast: asked.append(
            precision) or real(precision, device))
    real_accuracy = forgetting.accuracy
    monkeypatch.setattr(forgetting, "accuracy", lambda *args: forgetting_in_bf16.append(
        torch.is_autocast_enabled("cpu")) or real_accuracy(*args))
    # tunelab eval RUN --data harder.jsonl --no-base --precision bf16
    assert main(["eval", str(trained_run), "--data", str(harder), "--no-base", "--precision", "bf16"]) == 0
    assert asked and set(asked) == {"bf16"}
    assert json.loads((trained_run / "eval.json").read_text())["precision"] == "bf16"
    assert "cost per request (bf16 on cpu)" in capsys.readouterr().out
    assert forgetting_in_bf16 == [False]  # close log-likelihoods: the forgetting check stays in fp32
    results = json.loads((trained_run / "eval.json").read_text())
    assert results["data"] == str(harder) and results["examples_evaluated"] == 3
    assert [c["name"] for c in results["contenders"]] == ["tuned"]
    assert [s["reference"] for s in results["samples"]] == ["Italy", "France", "Spain"]


@pytest.mark.slow
def test_endpoint_contender_and_judge_on_a_loopback_server(trained_run, server, capsys, monkeypatch):
    """The contender and the judge ask through the shared client: the API key from the
    environment in every request, a 429 retried after its Retry-After, and the key in no file."""
    url = f"http://127.0.0.1:{server.server_port}/v1"
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    monkeypatch.setenv("EVAL_KEY", "sk-test-eval-key-123")
    # tunelab eval RUN --no-base --contender big=URL#big-model --judge URL#judge-model
    assert main(["eval", str(trained_run), "--no-base", "--contender", f"big={url}#big-model",
                 "--judge", f"{url}#judge-model", "--api-key-env", "EVAL_KEY"]) == 0
    results = json.loads((trained_run / "eval.json").read_text())
    assert [c["name"] for c in results["contenders"]] == ["tuned", "big"]
    assert results["contenders"][1] == {"name": "big", "kind": "endpoint", "model": "big-model", "prompt": "endpoint"}
    assert results["metrics"]["big"]["exact_match"]["value"] == 1.0
    assert results["buckets"]["big"]["correct"] == 8
    assert results["cost"]["big"]["prompt_tokens"] == 11 and results["cost"]["big"]["generated_tokens"] == 2
    asked = [r for r in server.requests if r["model"] == "big-model"]
    judged = [r for r in server.requests if r["model"] == "judge-model"]
    # one short warm-up request, not counted in the cost, then one per example
    assert len(asked) == 1 + 8 and all(r["temperature"] == 0 for r in asked)
    assert asked[0]["max_tokens"] == WARM_UP_TOKENS and all(r["max_tokens"] > WARM_UP_TOKENS for r in asked[1:])
    assert len(judged) == 1 + 16  # reached once before the models run, then every answer of both contenders
    assert all("Reference answer:" in r["messages"][0]["content"] for r in judged[1:])
    assert results["metrics"]["big"]["judge"]["value"] == 1.0 and results["metrics"]["tuned"]["judge"]["value"] == 1.0
    assert results["judge"]["model"] == "judge-model"
    assert "big" in capsys.readouterr().out
    assert {r["authorization"] for r in server.requests} == {"Bearer sk-test-eval-key-123"}
    for model, refused_at in server.throttled.items():  # both waited out Retry-After: 1
        retried_at = min(r["time"] for r in server.requests if r["model"] == model)
        assert retried_at - refused_at >= 1.0, model
    assert set(server.throttled) == {"big-model", "judge-model"}
    for path in trained_run.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".html", ".jsonl", ".yaml"):
            assert "sk-test-eval-key" not in path.read_text(errors="replace"), path


@pytest.mark.slow
def test_python_assertions_and_own_forgetting_questions(trained_run, tmp_path, write_jsonl):
    check = tmp_path / "check.py"
    check.write_text("def check(prompt, answer):\n    return True if answer in ('France', 'Italy') else "
                     "f'{answer!r} is not France or Italy'\n")
    questions = write_jsonl(tmp_path / "questions.jsonl", [
        {"question": "What colour is the sky on a clear day?", "choices": ["Blue", "Green"], "answer": "A"},
        {"question": "How many wheels has a bicycle?", "choices": ["Three", "Two", "Four"], "answer": 1},
    ])
    # tunelab eval RUN --no-base --assertions check.py --forgetting questions.jsonl
    assert main(["eval", str(trained_run), "--no-base", "--assertions", str(check), "--forgetting",
                 str(questions)]) == 0
    results = json.loads((trained_run / "eval.json").read_text())
    answers = [s["answers"]["tuned"] for s in results["samples"]]
    passing = sum(a["text"] in ("France", "Italy") for a in answers)
    assert results["assertions"]["results"]["tuned"]["rules"] == {"check.py:check": passing}
    failed = [a for a in answers if a["assertions_failed"]]
    assert len(failed) == 8 - passing
    assert all(a["assertions_failed"][0].startswith(f"check.py:check: {a['text']!r} is not") for a in failed)
    assert results["forgetting"]["questions"] == 2 and set(results["forgetting"]["results"]) == {"tuned"}


def run_bad(capsys, *args) -> str:
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tunelab: error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.slow
def test_data_without_references(run_copy, tmp_path, capsys, write_jsonl):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Country of Rome?"}, {"prompt": "Country of Oslo?"}])
    err = run_bad(capsys, str(run_copy), "--data", str(prompts))
    assert f"--data {prompts}:1: no reference answer" in err
    assert not (run_copy / "eval.json").exists()


@pytest.mark.slow
def test_unreachable_contender(run_copy, capsys):
    err = run_bad(capsys, str(run_copy), "--contender", "down=http://127.0.0.1:9/v1")
    assert "--contender down=http://127.0.0.1:9/v1: cannot reach 127.0.0.1:9" in err
    assert not (run_copy / "eval.json").exists()
    err = run_bad(capsys, str(run_copy), "--contender", "no-url")
    assert "expected NAME=URL" in err
    err = run_bad(capsys, str(run_copy), "--judge", "http://127.0.0.1:9/v1")
    assert "--judge http://127.0.0.1:9/v1: cannot reach" in err
    err = run_bad(capsys, str(run_copy), "--contender", "gpt=http://93.184.216.34:8000/v1#gpt")
    assert "outside this machine" in err and "--allow-remote" in err
    err = run_bad(capsys, str(run_copy), "--judge", "http://127.0.0.1:9/v1", "--api-key-file", "no-such-key.txt")
    assert "--api-key-file no-such-key.txt: file not found" in err
    assert not (run_copy / "eval.json").exists()


@pytest.mark.parametrize("name,text,message", [
    ("syntax.yaml", "- regex: [unclosed\n", "syntax.yaml:2: not valid YAML"),
    ("keys.yaml", "- must_contian: x\n", "keys.yaml: rule 1: unknown key(s) must_contian"),
    ("regex.yaml", "- regex: '(('\n", "regex.yaml: rule 1: bad regex"),
    ("nocheck.py", "def test(prompt, answer):\n    return True\n", "nocheck.py: define a function `def check"),
    ("broken.py", "def check(prompt, answer)\n    return True\n", "broken.py:1: Python syntax error"),
])
@pytest.mark.slow
def test_malformed_assertions(run_copy, tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    err = run_bad(capsys, str(run_copy), "--assertions", str(path))
    assert message in err
    assert not (run_copy / "eval.json").exists()


@pytest.mark.slow
def test_run_without_heldout_examples(run_copy, capsys):
    (run_copy / "test.jsonl").write_text("")
    err = run_bad(capsys, str(run_copy))
    assert "the run has no held-out examples" in err
    assert not (run_copy / "eval.json").exists()
