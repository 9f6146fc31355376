"""`tunelab ui` at the HTTP level: the localhost rules of guard.py (Host, cross-site requests,
the session token, paths out of the folders, escaping, no traceback pages), the pages, and the
command's own errors (port in use, a key off loopback)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest

pytest.importorskip("starlette")

from starlette.testclient import TestClient  # noqa: E402

from tunelab.ui.app import UIOptions, build_app  # noqa: E402
from uiclient import BASE, SCRIPT, wait_for  # noqa: E402

# ---------------------------------------------------------------------- the guard


def test_a_request_for_another_host_is_refused(ui):
    client, _ = ui
    assert client.get("/data").status_code == 200
    assert client.get("/data", headers={"Host": "localhost:7860"}).status_code == 200
    refused = client.get("/data", headers={"Host": "evil.example:7860"})
    assert refused.status_code == 403 and "host" in refused.text
    assert client.post("/api/check", json={}, headers={"Host": "evil.example"}).status_code == 403


def test_a_state_changing_request_needs_the_token_and_the_same_origin(ui, folders):
    client, state = ui
    (folders / "data" / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    body = {"file": "ok.jsonl"}
    assert client.post("/api/check", json=body, headers={"X-Tunelab-Token": ""}).status_code == 403
    assert client.post("/api/check", json=body, headers={"X-Tunelab-Token": "guess"}).status_code == 403
    assert client.post("/api/check", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    assert client.post("/api/check", json=body, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert state.store.all() == []  # nothing was started by the refused requests
    answer = client.post("/api/check", json=body, headers={"Origin": BASE, "Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 200 and len(state.store.all()) == 1


def test_every_page_carries_the_token_and_a_content_security_policy(ui):
    client, state = ui
    for url in ("/data", "/train", "/runs", "/jobs", "/chat", "/arena"):
        page = client.get(url)
        assert page.status_code == 200, url
        assert f'<meta name="tunelab-token" content="{state.token}">' in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text and "cdn" not in page.text.lower()  # the one script is a file of ours
    assert client.get("/static/ui.js").status_code == 200


def test_no_file_outside_the_runs_and_data_folders_is_served(ui, folders):
    client, _ = ui
    run = folders / "runs" / "mine"
    run.mkdir()
    (run / "report.html").write_text("<p>report</p>")
    (folders / "runs" / "escape").symlink_to(folders)
    report = client.get("/files/runs/mine/report.html")
    assert report.status_code == 200 and report.text == "<p>report</p>"
    assert report.headers["content-security-policy"].startswith("sandbox")  # a report's scripts get no origin
    for url in ("/files/runs/..%2Fsecret.txt", "/files/data/%2e%2e/secret.txt", "/files/runs/escape/secret.txt",
                "/files/runs/mine/..%2F..%2Fsecret.txt", "/files/data/%2Fetc%2Fpasswd", "/runs/..%2F..",
                "/files/runs/.jobs/x/job.json"):
        answer = client.get(url)
        assert answer.status_code in (400, 404), url
        assert "secret" not in answer.text.replace("secret.txt", "") and "root:" not in answer.text, url
    upload = client.post("/api/data?name=..%2F..%2Fplanted.jsonl", content=b'{"text": "x"}\n')
    assert upload.status_code == 200 and upload.json()["name"] == "planted.jsonl"
    assert (folders / "data" / "planted.jsonl").exists() and not (folders / "planted.jsonl").exists()
    assert client.post("/api/data?name=.hidden.jsonl", content=b"x").status_code == 400
    assert client.post("/api/data?name=notes.sh", content=b"x").status_code == 400
    assert client.post("/api/check", json={"file": "../secret.txt"}).status_code == 400


def test_an_upload_never_replaces_a_file(ui, folders):
    client, _ = ui
    (folders / "data" / "rows.jsonl").write_text("original\n")
    answer = client.post("/api/data?name=rows.jsonl", content=b'{"text": "new"}\n')
    assert answer.json()["name"] == "rows-2.jsonl"
    assert (folders / "data" / "rows.jsonl").read_text() == "original\n"


def test_user_data_shows_as_text(ui, folders):
    """A row holding <script> and a bad line holding markup are shown escaped on the check page."""
    client, _ = ui
    rows = [json.dumps({"prompt": SCRIPT, "completion": "fine"}), f'{{"prompt": "{SCRIPT}" broken']
    name = client.post("/api/data?name=evil.jsonl", content=("\n".join(rows) + "\n").encode()).json()["name"]
    url = client.post("/api/check", json={"file": name}).json()["url"]
    page = wait_for(client, url, "E_JSON")
    assert "E_JSON" in page and "<td>2</td>" in page
    assert SCRIPT not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    data_page = client.get("/data").text
    assert "1 error" in data_page and "evil.jsonl" in data_page


def test_the_check_page_says_how_novel_the_held_out_answers_are(ui):
    client, _ = ui
    rows = [json.dumps({"prompt": f"Who booked table {i}? Guest {i} did.",
                        "completion": json.dumps({"name": f"Guest {i}"})}) for i in range(40)]
    name = client.post("/api/data?name=guests.jsonl", content=("\n".join(rows) + "\n").encode()).json()["name"]
    page = wait_for(client, client.post("/api/check", json={"file": name}).json()["url"], "Novelty")
    assert "100% of 4 held-out answer values never occur in a training answer; 4 of 4 held-out rows hold one" in page


def test_a_bug_is_a_message_not_a_traceback(ui, monkeypatch):
    client, state = ui

    def broken():
        raise RuntimeError("internal detail /home/user/secret")

    monkeypatch.setattr(state, "data_files", broken)
    page = client.get("/data")
    assert page.status_code == 500 and "unexpected error (RuntimeError)" in page.text
    assert "Traceback" not in page.text and "secret" not in page.text
    api = client.post("/api/check", json={"file": "missing.jsonl"})
    assert api.status_code == 400 and "no data file" in api.json()["error"]
    assert client.post("/api/check", content=b"not json").json()["error"] == "the request is not JSON"
    missing = client.get("/runs/deleted")
    assert missing.status_code == 400 and "no run &#39;deleted&#39;" in missing.text and "<html" in missing.text
    assert client.get("/no/such/page").status_code == 404


def test_off_loopback_each_browser_logs_in_with_the_key(folders):
    app, state = build_app(UIOptions(runs=folders / "runs", data=folders / "data", host="0.0.0.0"), login_key="k3y")
    with TestClient(app, base_url="http://192.168.1.5:7860", follow_redirects=False) as client:
        assert client.get("/data").status_code == 401
        login = client.get("/data?key=wrong")
        assert login.status_code == 401
        login = client.get("/data?key=k3y")
        assert login.status_code == 303 and login.headers["location"] == "/data"
        assert "HttpOnly" in login.headers["set-cookie"]
        assert client.get("/data").status_code == 200  # the cookie logs it in
        assert client.get("/data", headers={"Authorization": "Bearer k3y"}, cookies={}).status_code == 200


# ---------------------------------------------------------------------- pages


def test_the_train_page_offers_the_config_defaults_and_queues_the_cli_command(ui, folders):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    page = client.get("/train?data=pairs.jsonl").text
    assert 'value="smollm2-135m"' in page and "Fine-tune LoRA adapters or all weights." in page
    assert 'data-flag="--max-steps"' in page and "Stop and Resume work" in page
    answer = client.post("/api/train", json={"data": "pairs.jsonl", "name": "first", "base": "smollm2-135m",
                                              "method": "full", "epochs": "1", "lr": "", "max_steps": "3",
                                              "save_every": "10"})
    assert answer.status_code == 200, answer.text
    runs, data = folders / "runs", folders / "data"
    assert answer.json()["command"] == (f"tunelab train {data}/pairs.jsonl --out {runs}/first --method full "
                                        "--max-steps 3 --save-every 10")
    refused = client.post("/api/train", json={"data": "pairs.jsonl", "name": "first"})
    assert refused.status_code == 400 and "exists already" in refused.json()["error"]
    cancelled = client.post(f"/api/jobs/{answer.json()['job']}/cancel")  # no need to train smollm2 here
    assert cancelled.status_code == 200 and cancelled.json()["state"] in ("cancelled", "running")
    bad = client.post("/api/train", json={"data": "pairs.jsonl", "name": "second", "lr": "fast"})
    assert bad.status_code == 400 and "lr" in bad.json()["error"]
    assert client.post("/api/train", json={"data": "pairs.jsonl", "name": "../up"}).status_code == 400
    assert 'data-flag="--early-stopping"' in page and 'data-flag="--objective"' in page
    stopping = client.post("/api/train", json={"data": "pairs.jsonl", "name": "third", "early_stopping": "3",
                                                "objective": "orpo"})
    assert stopping.status_code == 200 and stopping.json()["command"].endswith("--objective orpo --early-stopping 3")
    client.post(f"/api/jobs/{stopping.json()['job']}/cancel")
    wrong = client.post("/api/train", json={"data": "pairs.jsonl", "name": "fourth", "objective": "best"})
    assert wrong.status_code == 400 and "objective" in wrong.json()["error"]
    run_page = client.get("/runs/first").text
    assert "tunelab train" in run_page and "--max-steps 3" in run_page


def test_chat_answers_with_the_run_as_generate_does(ui, folders, tiny_run):
    from tunelab.run import Run

    client, _ = ui
    shutil.copytree(tiny_run, folders / "runs" / "tiny")
    assert "tiny" in client.get("/chat").text and "tunelab chat" in client.get("/chat?run=tiny").text
    messages = [{"role": "user", "content": "Country of Paris? (0)"}]
    answer = client.post("/api/chat", json={"run": "tiny", "messages": messages, "max_new_tokens": 8})
    assert answer.status_code == 200, answer.text
    assert answer.json()["reply"] == Run(folders / "runs" / "tiny").generate(messages, max_new_tokens=8)
    assert client.post("/api/chat", json={"run": "tiny", "messages": []}).status_code == 400
    assert client.post("/api/chat", json={"run": "nothere", "messages": messages}).status_code == 400
    run_page = client.get("/runs/tiny").text
    assert "trained" in run_page and "Evaluate" in run_page and "Resume" not in run_page


# ---------------------------------------------------------------------- the command


def test_a_port_in_use_is_one_line_and_exit_code_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "tunelab.cli", "ui", "--port", str(port)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"tunelab: error: --host 127.0.0.1 --port {port}: the address is in use; pick another with --port"]


def test_off_loopback_without_a_key_a_login_link_is_printed(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "ui", "--host", "0.0.0.0", "--port", "0"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
    finally:
        process.terminate()
        process.wait(30)
    assert line.startswith("tunelab ui on http://0.0.0.0:") and "/?key=" in line
    assert (tmp_path / "runs").is_dir() and (tmp_path / "data").is_dir()


def test_jobs_survive_the_server(folders):
    """Stop the app while a job runs and start a new one: the finished job is there as it was,
    and the running one shows as interrupted."""
    options = UIOptions(runs=folders / "runs", data=folders / "data", cwd=folders)
    (folders / "data" / "ok.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    app, state = build_app(options)
    with TestClient(app, base_url=BASE) as client:
        client.headers["X-Tunelab-Token"] = state.token
        check = client.post("/api/check", json={"file": "ok.jsonl"}).json()["job"]
        long = state.store.create("train", ["ui", "--port", "0", "--runs", str(folders / "r2"), "--data",
                                            str(folders / "d2")], folders, run="long")
        assert "state-done" in wait_for(client, f"/jobs/{check}", "state-done")
        assert "Rows" in client.get(f"/checks/{check}").text
        assert "running" in wait_for(client, f"/jobs/{long.id}", "state-running")
    app, state = build_app(options)  # a new server: a new token, the same folders
    with TestClient(app, base_url=BASE) as client:
        jobs = client.get("/jobs").text
        assert check in jobs and long.id in jobs
        assert state.store.get(check).state == "done"
        job = state.store.get(long.id)
        assert job.state == "interrupted" and job.error == "`tunelab ui` stopped while it ran"
        assert "state-interrupted" in client.get(f"/jobs/{long.id}").text


def test_a_run_streams_its_metrics_and_status(ui, folders):
    """The events of a run nobody trains now: the complete rows of metrics.jsonl (not a line
    still being written), the status with the run's step count, and the end of the stream."""
    client, _ = ui
    run = folders / "runs" / "r"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 4\n")
    rows = [{"step": 0, "eval_loss": 2.5}, {"step": 1, "loss": 2.4, "tokens_per_s": 90.0, "elapsed_s": 1.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "lo')
    stream = client.get("/runs/r/events")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [(block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
              for block in stream.text.strip().split("\n\n")]
    assert events == [("metrics", rows), ("state", {"status": "incomplete", "total_steps": 4}), ("end", {})]
    page = client.get("/runs/r").text
    assert 'data-events="/runs/r/events"' in page and "incomplete" in page
    assert "r" in client.get("/runs").text


def test_runs_are_compared_side_by_side(ui, folders, tiny_run):
    client, state = ui
    for name in ("one", "two"):
        shutil.copytree(tiny_run, folders / "runs" / name)
    (folders / "runs" / "untrained").mkdir()
    (folders / "runs" / "untrained" / "config.yaml").write_text("max_steps: 2\n")
    runs_page = client.get("/runs").text
    assert 'value="one"' in runs_page and "Compare the ticked runs" in runs_page
    assert client.post("/api/compare", json={"runs": ["one"]}).status_code == 400
    refused = client.post("/api/compare", json={"runs": ["one", "untrained"]})
    assert refused.status_code == 400 and "untrained has no trained weights" in refused.json()["error"]
    answer = client.post("/api/compare", json={"runs": ["one", "two"]}).json()
    runs = folders / "runs"
    assert answer["command"] == f"tunelab report {runs}/one {runs}/two --out {runs}/comparison.html"
    page = wait_for(client, answer["url"], "iframe")
    assert '<iframe class="report" src="/files/runs/comparison.html"' in page
    comparison = client.get("/files/runs/comparison.html")
    assert comparison.status_code == 200 and "one" in comparison.text and "two" in comparison.text
    assert state.store.get(answer["job"]).state == "done"


def test_a_sweep_queues_one_run_per_learning_rate(ui, folders):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    form = {"data": "pairs.jsonl", "name": "sweep", "base": "smollm2-135m", "max_steps": "3"}
    for bad, why in (("1e-3", "2 to 4 different"), ("1e-3, 1e-3", "2 to 4 different"), ("1e-3, fast", "lr"),
                     ("1,2,3,4,5", "2 to 4 different")):
        refused = client.post("/api/train", json={**form, "sweep_lr": bad})
        assert refused.status_code == 400 and why in refused.json()["error"], bad
    both = client.post("/api/train", json={**form, "lr": "1e-3", "sweep_lr": "1e-4, 1e-3"})
    assert both.status_code == 400 and "not both" in both.json()["error"]
    assert state.store.all() == []  # nothing queued by a refused sweep
    answer = client.post("/api/train", json={**form, "sweep_lr": "1e-4, 3e-4"}).json()
    for job in state.store.all():
        state.store.cancel(job.id)  # no need to train smollm2 here
    runs, data = folders / "runs", folders / "data"
    assert answer["url"] == "/jobs" and answer["commands"] == [
        f"tunelab train {data}/pairs.jsonl --out {runs}/sweep-lr-{lr} --lr {lr} --max-steps 3"
        for lr in ("1e-4", "3e-4")]
    assert [job.run for job in state.store.all()] == ["sweep-lr-1e-4", "sweep-lr-3e-4"]
