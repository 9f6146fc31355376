"""The Train page's Learning curve button: it queues the real `tunelab curve` with the form's
training flags, refuses bad sizes before queuing anything, and its finished job links the
curve's pages, which the UI serves."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("starlette")

from tunelab.iterate.curve import MIN_SIZE  # noqa: E402
from tunelab.ui.app import MIN_CURVE_SIZE  # noqa: E402
from uiclient import refused_across_sites, wait_for  # noqa: E402


def test_the_curve_button_queues_the_command_a_user_would_type(ui, folders):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    page = client.get("/train").text
    assert 'id="sizes" value="100,200,400"' in page and 'id="curve-command"' in page
    form = {"data": "pairs.jsonl", "name": "c", "method": "full", "max_steps": "3", "sizes": "100, 200,400"}
    assert refused_across_sites(client, "/api/curve", form) and state.store.all() == []
    answer = client.post("/api/curve", json=form)
    assert answer.status_code == 200, answer.text
    runs, data = folders / "runs", folders / "data"
    assert answer.json()["command"] == (f"tunelab curve {data}/pairs.jsonl --sizes 100,200,400 --out {runs}/c-curve "
                                        "--method full --max-steps 3")
    job = state.store.get(answer.json()["job"])
    assert job.kind == "curve" and job.heavy and answer.json()["url"] == f"/jobs/{job.id}"
    again = client.post("/api/curve", json=form)
    assert again.status_code == 400 and "queued or running already" in again.json()["error"]
    state.store.cancel(job.id)  # no need to train smollm2 here
    assert "c-curve" not in client.get("/runs").text  # a curve folder is not a run
    assert client.post("/api/curve", json=form).status_code == 200  # the same name again: the command continues it


@pytest.mark.parametrize("sizes, why", [("100", "at least 2 different sizes"), ("4,16", "at least 2 different sizes"),
                                        ("16,16", "at least 2 different sizes"), ("8,lots", "whole numbers"),
                                        ("", "at least 2 different sizes")])
def test_bad_sizes_are_a_message_and_queue_nothing(ui, folders, sizes, why):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    refused = client.post("/api/curve", json={"data": "pairs.jsonl", "name": "c", "sizes": sizes})
    assert refused.status_code == 400 and why in refused.json()["error"]
    swept = client.post("/api/curve", json={"data": "pairs.jsonl", "name": "c", "sizes": "8,16",
                                            "sweep_lr": "1e-4,1e-3"})
    assert swept.status_code == 400 and "one learning rate" in swept.json()["error"]
    assert state.store.all() == []


def test_the_smallest_size_is_the_commands():
    assert MIN_CURVE_SIZE == MIN_SIZE


@pytest.mark.slow
def test_a_curve_job_finishes_and_its_page_links_the_curve(ui, folders, tiny_model_dir):
    client, state = ui
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(10) for city, country in cities]
    (folders / "data" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answer = client.post("/api/curve", json={"data": "pairs.jsonl", "name": "tiny", "base": str(tiny_model_dir),
                                             "method": "full", "max_steps": "2", "sizes": "8,16"}).json()
    page = wait_for(client, answer["url"], "state-done", timeout=600)
    job = state.store.get(answer["job"])
    assert job.state == "done", state.store.log(job.id)[-3000:]
    assert 'href="/files/runs/tiny-curve/curve.html"' in page
    assert 'href="/files/runs/tiny-curve/comparison.html"' in page
    curve = client.get("/files/runs/tiny-curve/curve.html")
    assert curve.status_code == 200 and "<table" in curve.text
    assert client.get("/files/runs/tiny-curve/comparison.html").status_code == 200


def test_the_sweep_button_queues_tunelab_sweep_with_one_grid_flag_a_line(ui, folders):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    assert 'id="grid"' in client.get("/train").text and 'id="sweep-command"' in client.get("/train").text
    form = {"data": "pairs.jsonl", "name": "s", "method": "lora", "max_steps": "3",
            "grid": "lr = 1e-4, 3e-4\nlora-rank=8,16\n"}
    assert refused_across_sites(client, "/api/sweep", form) and state.store.all() == []
    answer = client.post("/api/sweep", json=form)
    assert answer.status_code == 200, answer.text
    runs, data = folders / "runs", folders / "data"
    assert answer.json()["command"] == (f"tunelab sweep {data}/pairs.jsonl --grid lr=1e-4,3e-4 --grid lora-rank=8,16 "
                                        f"--out {runs}/s-sweep --max-steps 3")
    job = state.store.get(answer.json()["job"])
    assert job.kind == "sweep" and job.heavy
    assert "queued or running already" in client.post("/api/sweep", json=form).json()["error"]
    state.store.cancel(job.id)
    method = client.post("/api/sweep", json={**form, "name": "m", "method": "lora", "grid": "method=lora,full"})
    assert method.json()["command"].startswith(f"tunelab sweep {data}/pairs.jsonl --grid method=lora,full --out")
    state.store.cancel(method.json()["job"])  # the form's select at its default is no flag, so no clash


@pytest.mark.parametrize("grid, why", [("", "no settings"), ("lr=1e-4", "2 or more different values"),
                                       ("speed=1,2", "training option"), ("max-steps=2,4", "also set in the form"),
                                       ("lr=1,2,3\nepochs=1,2", "at most 4"),
                                       ("--lr=1e-4,3e-4", "without dashes"),
                                       ("data_extra=/etc/passwd,/etc/hosts", "extra data is not swept"),
                                       ("data-extra=a.jsonl,b.jsonl", "extra data is not swept")])
def test_a_bad_grid_is_a_message_and_queues_nothing(ui, folders, grid, why):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    refused = client.post("/api/sweep", json={"data": "pairs.jsonl", "name": "s", "max_steps": "3", "grid": grid})
    assert refused.status_code == 400 and why in refused.json()["error"], refused.text
    assert state.store.all() == []


@pytest.mark.slow
def test_a_stopped_curve_job_started_again_keeps_the_sizes_it_finished(ui, folders, tiny_model_dir):
    """Stop, as the job page's button does (SIGTERM to the command), once the first size is
    evaluated; the same name again trains only the size left and reuses the first."""
    client, state = ui
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(10) for city, country in [("Paris", "France"), ("Rome", "Italy")]]
    (folders / "data" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    form = {"data": "pairs.jsonl", "name": "stop", "base": str(tiny_model_dir), "method": "full",
            "max_steps": "40", "sizes": "8,16"}
    first = client.post("/api/curve", json=form).json()
    evaluated = folders / "runs" / "stop-curve" / "n8" / "eval.json"
    deadline = time.monotonic() + 600
    while not evaluated.exists():
        assert time.monotonic() < deadline and not state.store.get(first["job"]).finished, \
            state.store.log(first["job"])[-3000:]
        time.sleep(0.2)
    made = evaluated.stat().st_mtime_ns
    assert client.post(f"/api/jobs/{first['job']}/cancel").status_code == 200
    wait_for(client, first["url"], "state-cancelled", timeout=120)
    assert state.store.get(first["job"]).state == "cancelled"
    assert not (folders / "runs" / "stop-curve" / "curve.json").exists()
    again = client.post("/api/curve", json=form).json()
    wait_for(client, again["url"], "state-done", timeout=600)
    job = state.store.get(again["job"])
    assert job.state == "done", state.store.log(job.id)[-3000:]
    assert evaluated.stat().st_mtime_ns == made  # size 8 was reused, not trained again
    curve = json.loads((folders / "runs" / "stop-curve" / "curve.json").read_text())
    assert [point["examples"] for point in curve["points"]] == [8, 16]


@pytest.mark.slow
def test_a_sweep_job_finishes_and_its_page_links_the_comparison(ui, folders, tiny_model_dir):
    client, state = ui
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(5) for city, country in [("Paris", "France"), ("Rome", "Italy")]]
    (folders / "data" / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    answer = client.post("/api/sweep", json={"data": "pairs.jsonl", "name": "tiny", "base": str(tiny_model_dir),
                                             "method": "full", "max_steps": "2", "grid": "lr=1e-3,1e-2"}).json()
    page = wait_for(client, answer["url"], "state-done", timeout=600)
    job = state.store.get(answer["job"])
    assert job.state == "done", state.store.log(job.id)[-3000:]
    assert 'href="/files/runs/tiny-sweep/comparison.html"' in page and "curve.html" not in page
    comparison = client.get("/files/runs/tiny-sweep/comparison.html")
    assert comparison.status_code == 200 and "lr=1e-3" in comparison.text and "lr=1e-2" in comparison.text


def test_a_curve_or_sweep_and_a_run_never_share_a_folder(ui, folders):
    client, state = ui
    (folders / "data" / "pairs.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    form = {"data": "pairs.jsonl", "name": "c", "max_steps": "3", "sizes": "8,16", "grid": "lr=1e-4,3e-4"}
    assert client.post("/api/curve", json=form).status_code == 200  # its folder c-curve is not made yet
    assert client.post("/api/sweep", json=form).status_code == 200
    for name in ("c-curve", "c-sweep"):
        refused = client.post("/api/train", json={**form, "name": name})
        assert refused.status_code == 400 and "exists already" in refused.json()["error"]
    run = folders / "runs" / "r-curve"
    run.mkdir()
    (run / "config.yaml").write_text("base: smollm2-135m\n")  # a run folder
    (folders / "runs" / "r-sweep").mkdir()
    (folders / "runs" / "r-sweep" / "config.yaml").write_text("base: smollm2-135m\n")
    for url in ("/api/curve", "/api/sweep"):
        refused = client.post(url, json={**form, "name": "r"})
        assert refused.status_code == 400 and "is a run in" in refused.json()["error"]
    assert [job.kind for job in state.store.all()] == ["curve", "sweep"]
    for job in state.store.all():
        state.store.cancel(job.id)
