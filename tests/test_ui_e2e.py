"""`tunelab ui` end to end on a real server at 127.0.0.1: a few-step training of the tiny model
started through the HTTP API, its metrics arriving over server-sent events; a run stopped and
resumed from its checkpoint; and, where Debian's chromium is installed, the pages in a real
headless browser (upload a file with a bad line, see its error row) with screenshots of each
page at desktop and phone widths (into $TUNELAB_UI_SCREENSHOTS, e.g. docs/ui, when set)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from tunelab.ui.app import UIOptions, build_app  # noqa: E402

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, url: str, state):
        self.url, self.state = url, state

    def request(self, path: str, body: dict | bytes | None = None) -> dict:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="GET" if body is None else "POST",
                                         headers={"X-Tunelab-Token": self.state.token})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path}: {e.code} {e.read().decode()}") from None
        return json.loads(text) if body is not None else {"text": text}

    def events(self, path: str, timeout: float = 600) -> Iterator[tuple[str, object]]:
        """The server-sent events of `path`, as (event, data), until the stream ends."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            kind = None
            for raw in response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    yield kind, json.loads(line[6:])

    def wait(self, check, timeout: float = 300, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)


@contextmanager
def serving(root: Path) -> Iterator[Server]:
    import uvicorn

    from tunelab.serve.app import bind

    options = UIOptions(runs=root / "runs", data=root / "data", cwd=root)
    for folder in (options.runs, options.data):
        folder.mkdir(parents=True, exist_ok=True)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    app, state = build_app(options, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield Server(f"http://127.0.0.1:{port}", state)
    finally:
        server.should_exit = True
        thread.join(60)


def upload(server: Server, path: Path, name: str | None = None) -> str:
    return server.request(f"/api/data?name={name or path.name}", path.read_bytes())["name"]


def test_a_training_started_in_the_page_streams_its_metrics(tmp_path, pairs_file, tiny_model_dir):
    with serving(tmp_path) as server:
        name = upload(server, pairs_file)
        started = server.request("/api/train", {"data": name, "name": "first", "base": str(tiny_model_dir),
                                                 "method": "lora", "max_steps": "4", "save_every": "2"})
        assert started["url"] == "/runs/first"
        assert started["command"] == (f"tunelab train {tmp_path}/data/pairs.jsonl --out {tmp_path}/runs/first "
                                      f"--base {tiny_model_dir} --max-steps 4 --save-every 2")
        metrics, states = [], []
        for kind, data in server.events("/runs/first/events"):
            if kind == "metrics":
                metrics += data
            elif kind == "state":
                states.append(data)
        assert [row["step"] for row in metrics if "loss" in row] == [1, 2, 3, 4]
        assert any("eval_loss" in row for row in metrics)
        assert all(row["tokens_per_s"] > 0 for row in metrics if "loss" in row)
        assert "training" in [s["status"] for s in states] and states[-1]["status"] == "trained"
        assert states[-1]["total_steps"] == 4
        job = server.state.store.get(started["job"])
        assert job.state == "done" and server.state.store.log(job.id).startswith(f"$ {started['command']}\n")
        page = server.request("/runs/first")["text"]
        assert "trained" in page and "Evaluate" in page and started["command"] in page
        evaluation = server.request("/api/runs/first/eval", {})
        assert evaluation["command"] == f"tunelab eval {tmp_path}/runs/first"
        server.state.store.cancel(evaluation["job"])  # the command is the CLI's; its run is tested there


def test_a_stopped_run_resumes_from_its_checkpoint(tmp_path, pairs_file, tiny_model_dir):
    with serving(tmp_path) as server:
        name = upload(server, pairs_file)
        run = tmp_path / "runs" / "long"
        started = server.request("/api/train", {"data": name, "name": "long", "base": str(tiny_model_dir),
                                                 "max_steps": "16", "save_every": "4"})
        server.wait(lambda: any((run / "checkpoints").glob("step-*/checkpoint.json")), what="a checkpoint")
        server.request(f"/api/jobs/{started['job']}/cancel", {})
        server.wait(lambda: server.state.store.get(started["job"]).state == "cancelled", 60, "the stop")
        page = server.request("/runs/long")["text"]
        assert "stopped (resumable)" in page and "Resume training" in page
        resumed = server.request("/api/runs/long/resume", {})
        assert resumed["command"] == f"tunelab train {tmp_path}/data/pairs.jsonl --out {run} --resume"
        states = [data["status"] for kind, data in server.events("/runs/long/events") if kind == "state"]
        assert states[-1] == "trained", states
        assert server.state.store.get(resumed["job"]).state == "done"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows if "loss" in row] == list(range(1, 17))  # one curve, no step twice
        # A new run measures the held-out loss before its first step; a resumed one goes on from its checkpoint.
        assert "step 0: held-out loss" in server.state.store.log(started["job"])
        assert "step 0: held-out loss" not in server.state.store.log(resumed["job"])


def test_a_server_killed_while_it_trains_comes_back_with_the_job_interrupted_and_resumable(
        tmp_path, pairs_file, tiny_model_dir, cli):
    """`tunelab ui` and its training both killed with SIGKILL (a crash, the out-of-memory killer;
    the server alone killed leaves its job running in its own session, and the next server
    follows it). The next server shows the job interrupted and the run resumable, and the resumed
    run ends with the very weights of a run never interrupted."""
    import re
    import signal
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    def start() -> tuple[subprocess.Popen, str, str]:
        process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "ui", "--port", "0"], cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   start_new_session=True)
        url = re.match(r"tunelab ui on (http://\S+)/", process.stdout.readline())[1]
        with urllib.request.urlopen(url + "/data", timeout=60) as response:
            token = re.search(r'name="tunelab-token" content="([^"]+)"', response.read().decode())[1]
        return process, url, token

    def post(url: str, token: str, path: str, body) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(url + path, data=data, method="POST", headers={"X-Tunelab-Token": token})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def job(job_id: str) -> dict:
        return json.loads((tmp_path / "runs" / ".jobs" / job_id / "job.json").read_text())

    def wait(check, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    run = tmp_path / "runs" / "long"
    steps = ["--base", str(tiny_model_dir), "--max-steps", "24", "--save-every", "4"]
    server, url, token = start()
    try:
        post(url, token, "/api/data?name=pairs.jsonl", pairs_file.read_bytes())
        started = post(url, token, "/api/train", {"data": "pairs.jsonl", "name": "long", "base": str(tiny_model_dir),
                                                  "max_steps": "24", "save_every": "4"})
        # Killed at its first checkpoint: 20 steps before its end (a few seconds on an idle machine).
        wait(lambda: any((run / "checkpoints").glob("step-*/checkpoint.json")), "a checkpoint")
        training = job(started["job"])
        assert training["state"] == "running"
        os.kill(server.pid, signal.SIGKILL)
        os.killpg(training["pid"], signal.SIGKILL)
    finally:
        server.kill()
        server.wait(30)
    assert not (run / "adapter").exists()  # killed before the end

    server, url, token = start()
    try:
        assert job(started["job"])["state"] == "interrupted"
        with urllib.request.urlopen(url + "/runs/long", timeout=60) as response:
            page = response.read().decode()
        assert "stopped (resumable)" in page and "Resume training" in page and "state-interrupted" in page
        resumed = post(url, token, "/api/runs/long/resume", {})
        assert resumed["command"] == "tunelab train data/pairs.jsonl --out runs/long --resume"
        wait(lambda: job(resumed["job"])["state"] in ("done", "failed"), "the resumed training", 600)
        assert job(resumed["job"])["state"] == "done"
    finally:
        server.terminate()
        server.wait(30)
    done = cli("train", str(tmp_path / "data" / "pairs.jsonl"), "--out", str(tmp_path / "whole"), *steps)
    assert done.returncode == 0, done.stderr
    resumed_weights = load_file(run / "adapter" / "adapter_model.safetensors")
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    assert resumed_weights.keys() == whole.keys()
    assert all(torch.equal(resumed_weights[name], whole[name]) for name in whole)


# ---------------------------------------------------------------------- in a real browser

CHROMIUM = shutil.which("chromium")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


SIZES = {"desktop": (1280, 800), "phone": (390, 844)}


def test_the_pages_in_a_browser(tmp_path, browser, tiny_run, tiny_model_dir, pairs_file, monkeypatch):
    """Upload a file with a bad line and see its error row; train a run through the form and see
    its curve; evaluate a run and see its report; chat; a screenshot of each page at both widths.
    The server runs in the test's folder with relative paths, as a user starts it."""
    shots = Path(os.environ.get("TUNELAB_UI_SCREENSHOTS") or tmp_path / "shots").resolve()
    shots.mkdir(parents=True, exist_ok=True)
    bad = tmp_path / "orders.jsonl"
    bad.write_text(pairs_file.read_text() + '{"prompt": "<script>alert(1)</script>", "completion": \n')
    monkeypatch.chdir(tmp_path)
    with serving(Path(".")) as server:
        shutil.copytree(tiny_run, tmp_path / "runs" / "cities")
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server.url + "/data")
        page.set_input_files("#upload", str(bad))
        page.wait_for_selector("table.problems", timeout=120_000)
        row = page.locator("table.problems tbody tr").first
        assert row.locator("td").nth(0).inner_text() == "41"
        assert row.locator("td").nth(1).inner_text() == "E_JSON"
        assert "<script>alert(1)</script>" in row.locator("code.row").inner_text()  # shown as text
        check_url = page.url

        # Fix the bad row in the page: saved as a new file (the original stays) and checked at once.
        page.fill("textarea.edit-row[data-line='41']", '{"prompt": "<script>alert(1)</script>", "completion": "x"}')
        page.click("#fix-form button[type=submit]")
        page.wait_for_url("**/checks/**")
        page.wait_for_selector("text=Length of each example", timeout=120_000)
        assert page.url != check_url and "orders.fixed.jsonl" in page.locator("h1").inner_text()
        assert page.locator("dd.good").first.inner_text() == "0"  # no errors left
        assert (tmp_path / "data" / "orders.jsonl").read_text() == bad.read_text()
        fixed_url = page.url
        page.goto(server.url + "/train?data=pairs.jsonl")  # no such file: the first is picked
        assert "tunelab train" in page.locator("#train-command").inner_text()
        page.fill("input[name=max_steps]", "7")
        assert "--max-steps 7" in page.locator("#train-command").inner_text()

        # Train through the form: the page follows the run over server-sent events until it is trained.
        upload(server, pairs_file)
        page.goto(server.url + "/train?data=pairs.jsonl")
        page.fill("input[name=name]", "from-the-form")
        page.fill("input[name=base]", str(tiny_model_dir))
        page.fill("input[name=max_steps]", "3")
        assert page.locator("#train-command").inner_text() == (
            f"tunelab train data/pairs.jsonl --out runs/from-the-form --base {tiny_model_dir} --max-steps 3 "
            "--save-every 10")
        page.fill("#sweep", "1e-4, 1e-3")  # a sweep: one command per learning rate
        assert page.locator("#train-command").inner_text().splitlines() == [
            f"tunelab train data/pairs.jsonl --out runs/from-the-form-lr-{lr} --base {tiny_model_dir} --lr {lr} "
            "--max-steps 3 --save-every 10" for lr in ("1e-4", "1e-3")]
        page.fill("#sweep", "")
        page.fill("#sizes", "8, 16")  # the learning curve's command, with the same training flags
        assert page.locator("#curve-command").inner_text() == (
            f"tunelab curve data/pairs.jsonl --sizes 8,16 --out runs/from-the-form-curve --base {tiny_model_dir} "
            "--max-steps 3 --save-every 10")
        page.fill("#grid", "lr=1e-4, 1e-3\nepochs=1,2")  # a sweep: one --grid a line
        assert page.locator("#sweep-command").inner_text() == (
            f"tunelab sweep data/pairs.jsonl --grid lr=1e-4,1e-3 --grid epochs=1,2 --out runs/from-the-form-sweep "
            f"--base {tiny_model_dir} --max-steps 3 --save-every 10")
        page.fill("#grid", "")
        page.fill("#sizes", "4, 16")
        page.press("#sizes", "Enter")  # Enter in the sizes is the curve's: too small a size, a message
        page.wait_for_selector("#message:not([hidden])")
        assert "at least 2 different sizes" in page.locator("#message").inner_text()
        page.evaluate("document.getElementById('message').hidden = true")
        page.click("#start-curve")  # and so is its button
        page.wait_for_selector("#message:not([hidden])")
        assert "at least 2 different sizes" in page.locator("#message").inner_text()
        jobs = list((tmp_path / "runs" / ".jobs").glob("*/job.json"))
        assert [json.loads(job.read_text())["kind"] for job in jobs].count("train") == 0  # nothing queued
        assert all(json.loads(job.read_text())["kind"] != "curve" for job in jobs)
        refused = [e for e in errors if "status of 400" in e]  # the browser logs the refused requests
        assert len(refused) == 2, errors
        for error in refused:
            errors.remove(error)
        page.click("#train-form button[type=submit]")
        page.wait_for_url("**/runs/from-the-form")
        page.wait_for_selector("#status:text-is('trained')", timeout=300_000)
        page.wait_for_selector("#curve polyline.train-line")
        assert page.locator("#step").inner_text() == "3 of 3"

        # Evaluate a run: the report appears in the page.
        page.goto(server.url + "/runs/cities")
        page.click("button:text-is('Evaluate')")
        page.wait_for_selector("iframe.report", timeout=300_000)
        assert page.locator("#status").inner_text() == "evaluated"
        report = page.frame_locator("iframe.report")
        assert "cities" in report.locator("body").inner_text()

        # Two finished runs side by side.
        page.goto(server.url + "/runs")
        page.check("input[value=cities]")
        page.check("input[value=from-the-form]")
        page.click("#compare-form button[type=submit]")
        page.wait_for_selector("iframe.report", timeout=120_000)
        compare_url = page.url
        assert "from-the-form" in page.frame_locator("iframe.report").locator("body").inner_text()

        # Rate and repair: the evaluated run's wrong answers first; one repaired, shown as text.
        page.goto(server.url + "/runs/cities")
        page.click("text=Rate and repair its answers")
        page.wait_for_selector("#answers")
        first = page.locator("section.answer").first
        assert "wrong" in first.get_attribute("class")
        line = int(first.get_attribute("data-line"))
        first.locator("form[data-kind=corrections] textarea").fill("<script>alert(1)</script>")
        first.locator("form[data-kind=corrections] button").click()
        page.wait_for_selector("#train-again:not([hidden])")
        rows = [json.loads(x) for x in (tmp_path / "runs" / "cities" / "corrections.jsonl").read_text().splitlines()]
        assert [(r["line"], r["chosen"]) for r in rows] == [
            (line, [{"role": "assistant", "content": "<script>alert(1)</script>"}])]
        page.reload()
        assert page.locator("dd.saved-correction").first.inner_text() == "<script>alert(1)</script>"
        page.click("#train-again")  # the next run's command adds the corrections
        page.wait_for_url("**/train?**")
        assert "--data-extra runs/cities/corrections.jsonl" in page.locator("#train-command").inner_text()

        # The arena: the base model zero-shot and few-shot, and the tuned run, side by side.
        page.goto(server.url + "/arena?run=cities")
        page.fill("#arena-prompt", "Country of Paris? (0)")
        page.click("#arena-form button[type=submit]")
        page.locator("#arena .reply:not(.pending)").nth(2).wait_for(timeout=120_000)  # three columns answered
        assert page.locator("#arena h2").all_inner_texts() == [
            "base model, zero-shot", "base model, few-shot (3 examples)", "cities"]

        # Export as a job; its import command to copy.
        page.goto(server.url + "/runs/cities")
        page.click("#export button:text-is('Ollama')")
        page.wait_for_selector("#export code.copy", timeout=300_000)
        assert page.locator("#export code.copy").inner_text().startswith("ollama create ollama -f ")

        # A teacher on the internet needs the consent box; reviewing pairs saves each decision.
        page.goto(server.url + "/teacher")
        page.fill("input[name=teacher]", "http://93.184.216.34/v1")
        page.fill("input[name=model]", "big")
        page.select_option("select[name=inputs]", "pairs.jsonl")
        page.click("#teacher-form button[type=submit]")
        page.wait_for_selector("#message:not([hidden])")
        assert "Pass --allow-remote" in page.locator("#message").inner_text()
        refusals = [e for e in errors if "status of 400" in e]  # the browser logs the refused request
        assert len(refusals) == 1, errors
        errors.remove(refusals[0])
        page.check("#allow-remote")
        assert page.locator("#teacher-command").inner_text().endswith("--allow-remote")
        page.goto(server.url + "/review?file=pairs.jsonl")
        assert "40 to decide" in page.locator("#review").inner_text()
        page.locator("section.pair").first.locator("button[data-decision=accepted]").click()
        page.wait_for_selector("#review:has-text('39 to decide')")

        page.goto(server.url + "/chat?run=cities")
        page.fill("#chat-text", "Country of Paris? (0)")
        page.click("#chat-form button[type=submit]")
        page.wait_for_selector("#conversation li.assistant:not(.pending)", timeout=120_000)
        assert page.locator("#conversation li.user").inner_text() == "Country of Paris? (0)"

        for width_name, (width, height) in SIZES.items():
            page.set_viewport_size({"width": width, "height": height})
            for name, url in [("data", "/data"), ("check", check_url), ("train", "/train"), ("runs", "/runs"),
                              ("curve", "/train"), ("run", "/runs/cities"), ("compare", compare_url), ("jobs", "/jobs"),
                              ("job", "/jobs/" + check_url.rsplit("/", 1)[1]),
                              ("chat", "/chat?run=cities"), ("fixed", fixed_url),
                              ("answers", "/runs/cities/answers"), ("arena", "/arena?run=cities"),
                              ("teacher", "/teacher"), ("review", "/review?file=pairs.jsonl")]:
                page.goto(url if url.startswith("http") else server.url + url)
                page.wait_for_load_state("networkidle")
                if name == "run":
                    page.wait_for_selector("#curve polyline")
                if name == "curve":  # the learning curve and the sweep under the training form, filled in
                    page.fill("#grid", "lr=1e-4, 1e-3\nepochs=1,2")
                    page.locator("h2:text-is('Learning curve')").evaluate("h => h.scrollIntoView({block: 'start'})")
                if name == "arena":
                    page.fill("#arena-prompt", "Country of Rome? (1)")
                    page.click("#arena-form button[type=submit]")
                    page.locator("#arena .reply:not(.pending)").nth(2).wait_for(timeout=120_000)
                if name == "chat":
                    page.fill("#chat-text", "Country of Rome? (1)")
                    page.click("#chat-form button[type=submit]")
                    page.wait_for_selector("#conversation li.assistant:not(.pending)", timeout=120_000)
                page.screenshot(path=str(shots / f"{name}-{width_name}.png"), full_page=width_name == "phone")
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 1, f"{name} at {width_name} width scrolls sideways by {overflow}px"
        assert errors == [], errors
