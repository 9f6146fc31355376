"""What a user can get wrong around a run folder, through the real CLI: two trainings into one
folder, --resume on a finished run, a judge that fails late, Ctrl-C in eval, damaged files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch

from fakeapi import api_url, send_json, serve
from tunelab.cli import main
from tunelab.runlock import LOCK_FILE, RunLock
from tunelab.train.checkpoint import PAUSE_ENV

COUNTRIES = {"Paris": "France", "Berlin": "Germany", "Madrid": "Spain", "Rome": "Italy"}


@pytest.fixture(scope="module")
def data(tmp_path_factory, write_jsonl) -> Path:
    folder = tmp_path_factory.mktemp("data")
    return write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {c}? ({i})", "completion": k}
                                                for i in range(4) for c, k in COUNTRIES.items()])


def flags(tiny_model_dir, method: str) -> list[str]:
    return ["--base", str(tiny_model_dir), "--method", method, "--max-steps", "2", "--batch-size", "4",
            "--test-size", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, data) -> dict[str, Path]:
    """A finished LoRA run and a finished full run, no checkpoints: copied by the tests that change them."""
    folder = tmp_path_factory.mktemp("runs")
    for method in ("lora", "full"):
        assert main(["train", str(data), "--out", str(folder / method), *flags(tiny_model_dir, method)]) == 0
    return {"lora": folder / "lora", "full": folder / "full"}


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys, *args: str, code: int = 2) -> str:
    """Run `tunelab ARGS`, expect `code` and one `tunelab: error:` line on standard error."""
    assert main(list(args)) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tunelab:")]
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: "), err
    return lines[0]


# 1. The run-folder lock


def test_a_training_holds_its_folder_against_a_second_training_and_readers(tmp_path, tiny_model_dir, data, capsys):
    """A real training, paused in its first checkpoint save, against a second one started meanwhile."""
    out = tmp_path / "x"
    env = {**os.environ, PAUSE_ENV: "1:120"}
    with open(tmp_path / "first.log", "w+") as log:
        first = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(data), "--out", str(out),
                                  *flags(tiny_model_dir, "full"), "--save-every", "1"], stdout=log,
                                 stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while not any((out / "checkpoints").glob(".step-000001-*/checkpoint.json")):
                assert first.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()
                time.sleep(0.05)
            before = snapshot(out)
            assert (out / LOCK_FILE).read_text().split()[0] == str(first.pid)

            line = one_error(capsys, "train", str(data), "--out", str(out), *flags(tiny_model_dir, "full"),
                             "--overwrite")
            assert line == (f"tunelab: error: {out}: process {first.pid} on {os.uname().nodename} is training "
                            "into this run folder; wait for it to finish, or choose another --out")
            assert one_error(capsys, "train", str(data), "--out", str(out), "--resume").endswith("choose another --out")
            assert snapshot(out) == before  # the first training's folder is as it was
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    # Killed, it leaves its lock file; the next training takes it over.
    assert (out / LOCK_FILE).exists()
    assert main(["train", str(data), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"tunelab: note: {out / LOCK_FILE}: left by process {first.pid}" in err and "taking it over" in err
    assert (out / "model").is_dir() and not (out / LOCK_FILE).exists()


def test_eval_generate_export_report_refuse_a_run_being_trained(runs, tmp_path, capsys):
    run = copy(runs["lora"], tmp_path)
    with RunLock(run):  # this process, as a training holds it
        for args in (["eval", str(run)], ["generate", str(run), "--prompt", "Country of Rome?"],
                     ["export", str(run), "--format", "merged", "--out", str(tmp_path / "export")],
                     ["report", str(run)], ["train", "any.jsonl", "--out", str(run), "--resume"]):
            line = one_error(capsys, *args)
            assert line.startswith(f"tunelab: error: {run}: process {os.getpid()} on "), line
    assert not (tmp_path / "export").exists() and not (run / "report.html").exists()
    assert main(["report", str(run)]) == 0  # released


def test_a_stale_lock_file_does_not_block(runs, tmp_path, data, tiny_model_dir, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{gone.pid} somehost\n")
    assert main(["train", str(data), "--out", str(out), *flags(tiny_model_dir, "lora")]) == 0
    captured = capsys.readouterr()
    note = f"tunelab: note: {out / LOCK_FILE}: left by process {gone.pid} on somehost, which has stopped"
    assert note in captured.err
    assert captured.out.strip().splitlines()[-1].startswith(f"Run saved in {out}")
    assert not (out / LOCK_FILE).exists()

    run = copy(runs["lora"], tmp_path)
    (run / LOCK_FILE).write_text(f"{gone.pid} somehost\n")
    assert main(["report", str(run)]) == 0


def test_a_refused_training_into_a_new_folder_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    one_error(capsys, "train", str(tmp_path / "missing.jsonl"), "--out", str(out), "--base", "smollm2-135m")
    assert not out.exists()


# 2. --resume on a finished run


def test_resume_of_a_finished_run_says_so_and_changes_nothing(runs, tmp_path, data, capsys, write_jsonl):
    run = copy(runs["lora"], tmp_path)
    (run / "eval.json").write_text("{}")  # kept as it is: the run it describes is unchanged
    before = snapshot(run)
    assert main(["train", str(data), "--out", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"{run}: the run is finished, trained on the same data and options; "
                                         f"nothing to resume. Next: tunelab eval {run}"]
    assert snapshot(run) == before

    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Country of Oslo?", "completion": "Norway"}] * 8)
    for args, change in (([str(other)], f"{other}: its content differs"), ([str(data), "--lr", "0.5"], "--lr: "),
                         ([str(other), "--force"], f"{other}: its content differs")):
        assert main(["train", *args, "--out", str(run), "--resume"]) == 2
        first, detail = capsys.readouterr().err.splitlines()  # as a resume from a checkpoint lists changes
        assert first == (f"tunelab: error: {run}: the run finished with other data or options and has no "
                         "checkpoint to continue from; pass --overwrite instead of --resume to train it again")
        assert detail.startswith(f"tunelab: error: {change}"), detail
    assert snapshot(run) == before


def test_resume_of_a_run_that_ended_on_a_checkpoint_says_so_and_changes_nothing(tmp_path, data, tiny_model_dir,
                                                                                 capsys):
    run = tmp_path / "run"
    options = [*flags(tiny_model_dir, "lora"), "--save-every", "2"]
    assert main(["train", str(data), "--out", str(run), *options]) == 0
    assert (run / "checkpoints" / "step-000002").is_dir()  # its last step
    (run / "eval.json").write_text("{}")
    (run / "report.html").write_text("<p>the run's report</p>")
    capsys.readouterr()
    before = snapshot(run)
    assert main(["train", str(data), "--out", str(run), *options, "--resume"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{run}: the run is finished, trained on the same data and "
                                                    f"options; nothing to resume. Next: tunelab eval {run}"]
    assert snapshot(run) == before


def test_a_resume_that_trains_removes_the_eval_of_the_weights_it_replaces(tmp_path, data, tiny_model_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *flags(tiny_model_dir, "lora"), "--save-every", "1"]) == 0
    assert main(["eval", str(run), "--limit", "2", "--max-new-tokens", "2", "--no-base"]) == 0
    assert (run / "eval.json").exists() and (run / "report.html").exists()
    capsys.readouterr()
    longer = [arg if arg != "2" else "3" for arg in flags(tiny_model_dir, "lora")]  # --max-steps 3
    assert main(["train", str(data), "--out", str(run), *longer, "--save-every", "1", "--resume", "--force"]) == 0
    err = capsys.readouterr().err
    assert (f"tunelab: note: eval.json and report.html removed from {run}: they were of the weights before this "
            f"resume; run `tunelab eval {run}` once it ends") in err
    assert not (run / "eval.json").exists() and not (run / "report.html").exists()
    assert json.loads((run / "run.json").read_text())["training"]["steps"] == 3


def test_resume_of_a_finished_run_through_the_python_api(runs, tmp_path, data, tiny_model_dir, capsys):
    import tunelab

    run = copy(runs["full"], tmp_path)
    before = snapshot(run)
    options = dict(base=str(tiny_model_dir), method="full", max_steps=2, batch_size=4, test_size=4)
    assert tunelab.finetune(data, out=run, resume=True, **options).path == run
    assert capsys.readouterr().out.startswith(f"{run}: the run is finished")
    assert snapshot(run) == before


# 3. A judge that fails after the answers are made


class FailingJudge(BaseHTTPRequestHandler):
    """Answers the reach check ("Reply with the word OK.") and nothing after it: 500, or closes."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["messages"][-1]["content"] != "Reply with the word OK.":
            if self.server.mode == "close":
                self.close_connection = True
                return
            self.send_response(500)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"broken")
            return
        send_json(self, {"choices": [{"message": {"role": "assistant", "content": "OK"}, "finish_reason": "stop"}]})

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode,reason", [("500", "http_500"), ("close", "connection")])
def test_a_judge_failing_after_generation_keeps_the_answers(runs, tmp_path, capsys, monkeypatch, mode, reason):
    import tunelab.client

    monkeypatch.setattr(tunelab.client, "BACKOFF_BASE", 0.001)
    httpd = serve(FailingJudge)
    httpd.mode = mode
    run = copy(runs["lora"], tmp_path)
    try:
        url = api_url(httpd) + "#judge"
        assert main(["eval", str(run), "--no-forgetting", "--shots", "0", "--judge", url]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("tunelab:")]
    assert len(lines) == 1 and lines[0].startswith("tunelab: warning: the judge failed after every answer was made ("
                                                   f"--judge {url}: {reason}"), captured.err
    assert lines[0].endswith(f"{run / 'eval.json'} keeps the answers and metrics without the judge's grades")
    results = json.loads((run / "eval.json").read_text())
    assert results["judge"]["failed"].startswith(f"--judge {url}: {reason}")
    assert [c["name"] for c in results["contenders"]] == ["zero-shot", "tuned"]
    assert all(s["answers"]["tuned"]["text"] is not None and s["answers"]["tuned"]["judge"] is None
               for s in results["samples"])
    assert not any("judge" in table for table in results["metrics"].values())
    assert "failed: --judge" in (run / "report.html").read_text()


# 4. Ctrl-C in eval


def test_ctrl_c_in_eval_says_nothing_was_saved(runs, tmp_path, capsys, monkeypatch):
    import tunelab.evaluate.core

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tunelab.evaluate.core, "_generate", interrupted)
    run = copy(runs["lora"], tmp_path)
    assert main(["eval", str(run), "--no-forgetting"]) == 130
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("tunelab:")] == [
        "tunelab: interrupted: nothing was saved (eval.json is written only at the end; there is no eval.json); "
        f"run `tunelab eval {run}` again, with --limit N to evaluate fewer examples"]
    assert not (run / "eval.json").exists()
    (run / "eval.json").write_text("{}")
    assert main(["eval", str(run), "--no-forgetting"]) == 130
    assert "the eval.json from before is unchanged" in capsys.readouterr().err
    assert (run / "eval.json").read_text() == "{}"


# 5. Damaged files


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


READERS = {
    "eval": lambda run, tmp: ["eval", str(run), "--no-forgetting"],
    "generate": lambda run, tmp: ["generate", str(run), "--prompt", "Country of Rome?"],
    "export": lambda run, tmp: ["export", str(run), "--format", "merged", "--out", str(tmp / "export")],
    "report": lambda run, tmp: ["report", str(run)],
}


@pytest.mark.parametrize("command", READERS)
def test_a_cut_run_json(runs, tmp_path, capsys, command):
    run = copy(runs["lora"], tmp_path)
    cut(run / "run.json")
    line = one_error(capsys, *READERS[command](run, tmp_path))
    assert line.startswith(f"tunelab: error: {run / 'run.json'}") and "not valid JSON" in line, line
    assert "cut short or damaged" in line and f"--out {'RUN' if command == 'report' else run} --overwrite" in line


def test_a_cut_test_jsonl(runs, tmp_path, capsys):
    run = copy(runs["lora"], tmp_path)
    lines = (run / "test.jsonl").read_text().splitlines()
    (run / "test.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:20]]) + "\n")
    line = one_error(capsys, *READERS["eval"](run, tmp_path))
    assert line.startswith(f"tunelab: error: {run / 'test.jsonl'}:{len(lines)}: not an example as training "
                           "writes them"), line
    assert f"train the run again with `tunelab train DATA --out {run} --overwrite`" in line
    for command in ("generate", "report"):  # they do not read the held-out examples
        assert main(READERS[command](run, tmp_path)) == 0


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
@pytest.mark.parametrize("method,file", [("lora", "adapter/adapter_model.safetensors"),
                                         ("full", "model/model.safetensors")])
def test_cut_weights(runs, tmp_path, capsys, command, method, file):
    run = copy(runs[method], tmp_path)
    cut(run / file)
    line = one_error(capsys, *READERS[command](run, tmp_path))
    assert line.startswith(f"tunelab: error: {run / file}: cannot read the weights ("), line
    assert line.endswith(f"the file is cut short or damaged: train the run again with `tunelab train DATA --out "
                         f"{run} --overwrite`")
    assert not (tmp_path / "export").exists()


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_a_pickle_bin_in_the_model_folder_is_refused(runs, tmp_path, capsys, command):
    run = copy(runs["full"], tmp_path)
    marker = tmp_path / "code-ran"
    (run / "model" / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, run / "model" / "pytorch_model.bin")
    line = one_error(capsys, *READERS[command](run, tmp_path))
    assert line.startswith(f"tunelab: error: {run / 'model' / 'pytorch_model.bin'}: refused, a pickle file"), line
    assert "system" in line and "convert it to safetensors" in line and "or remove it" in line
    assert not marker.exists()
