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

        page.goto(server.url + "/chat?run=cities")
        page.fill("#chat-text", "Country of Paris? (0)")
        page.click("#chat-form button[type=submit]")
        page.wait_for_selector("#conversation li.assistant:not(.pending)", timeout=120_000)
        assert page.locator("#conversation li.user").inner_text() == "Country of Paris? (0)"

        for width_name, (width, height) in SIZES.items():
            page.set_viewport_size({"width": width, "height": height})
            for name, url in [("data", "/data"), ("check", check_url), ("train", "/train"), ("runs", "/runs"),
                              ("run", "/runs/cities"), ("compare", compare_url), ("jobs", "/jobs"),
                              ("job", "/jobs/" + check_url.rsplit("/", 1)[1]),
                              ("chat", "/chat?run=cities")]:
                page.goto(url if url.startswith("http") else server.url + url)
                page.wait_for_load_state("networkidle")
                if name == "run":
                    page.wait_for_selector("#curve polyline")
                if name == "chat":
                    page.fill("#chat-text", "Country of Rome? (1)")
                    page.click("#chat-form button[type=submit]")
                    page.wait_for_selector("#conversation li.assistant:not(.pending)", timeout=120_000)
                page.screenshot(path=str(shots / f"{name}-{width_name}.png"), full_page=width_name == "phone")
                overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
                assert overflow <= 1, f"{name} at {width_name} width scrolls sideways by {overflow}px"
        assert errors == [], errors
