"""The jobs of `tunelab ui` (ui/jobs.py): each a real `tunelab` command in a subprocess. A
long job is `tunelab ui --port 0` itself, which runs until stopped and needs no model."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tunelab.ui.jobs import Job, JobStore, error_line, tunelab_process_alive


def long_argv(tmp_path: Path) -> list[str]:
    return ["ui", "--port", "0", "--runs", str(tmp_path / "other-runs"), "--data", str(tmp_path / "other-data")]


def tick_until(store: JobStore, job_id: str, states: set[str], timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    while True:
        store.tick()
        job = store.get(job_id)
        if job.state in states or time.monotonic() > deadline:
            return job
        time.sleep(0.2)


def wait_alive(pid: int) -> None:
    """Until the child has started `python -m tunelab.cli` (before that it is a fork of this process)."""
    deadline = time.monotonic() + 30
    while not tunelab_process_alive(pid):
        assert time.monotonic() < deadline, "the job's process did not start"
        time.sleep(0.05)


@pytest.fixture
def store(tmp_path):
    store = JobStore(tmp_path / "runs" / ".jobs", slots=1)
    yield store
    store.stop_all()


def test_a_queued_job_runs_and_keeps_its_log_and_error(store, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    job = store.create("check", ["data", "check", str(data)], tmp_path)
    assert store.get(job.id).state == "queued" and job.command == f"tunelab data check {data}"
    job = tick_until(store, job.id, {"done", "failed"})
    assert job.state == "failed" and job.exit_code == 2 and job.pid is None
    assert job.error.startswith(f"tunelab: error: {data}:2: E_JSON")
    log = store.log(job.id)
    assert log.startswith(f"$ tunelab data check {data}\n") and "Data check of" in log
    fine = tmp_path / "fine.jsonl"
    fine.write_text('{"prompt": "a", "completion": "b"}\n')
    done = tick_until(store, store.create("check", ["data", "check", str(fine)], tmp_path).id, {"done", "failed"})
    assert done.state == "done" and done.exit_code == 0 and done.error is None


def test_heavy_jobs_wait_in_order_light_ones_do_not_and_a_cancelled_job_stops(store, tmp_path):
    first = store.create("train", long_argv(tmp_path), tmp_path, run="a")
    second = store.create("eval", long_argv(tmp_path), tmp_path, run="b")
    third = store.create("train", long_argv(tmp_path), tmp_path, run="c")
    store.tick()
    assert [store.get(j.id).state for j in (first, second, third)] == ["running", "queued", "queued"]
    assert [j.id for j in store.queue()] == [second.id, third.id]
    light = store.create("check", ["data", "check", str(tmp_path / "missing.jsonl")], tmp_path)
    store.tick()
    assert store.get(light.id).state != "queued"  # a data check does not wait for training

    store.cancel(third.id)  # cancelling a queued job is immediate
    assert store.get(third.id).state == "cancelled"
    pid = store.get(first.id).pid
    wait_alive(pid)
    stopped = tick_until(store, store.cancel(first.id).id, {"cancelled"})
    assert stopped.state == "cancelled" and not tunelab_process_alive(pid)
    store.tick()
    assert store.get(second.id).state == "running"  # the next in line took the slot
    assert store.get(third.id).state == "cancelled"


def test_two_slots_run_two_heavy_jobs(tmp_path):
    store = JobStore(tmp_path / ".jobs", slots=2)
    jobs = [store.create("train", long_argv(tmp_path), tmp_path) for _ in range(3)]
    store.tick()
    try:
        assert [store.get(j.id).state for j in jobs] == ["running", "running", "queued"]
    finally:
        store.stop_all()
    assert [store.get(j.id).state for j in jobs] == ["interrupted", "interrupted", "queued"]


def test_a_job_whose_process_died_shows_interrupted_to_the_next_server(tmp_path):
    """The server was killed with its job: a new store (a restarted `tunelab ui`) finds the job
    marked running, its pid dead, and marks it interrupted; finished jobs are as they were."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folder = tmp_path / ".jobs"
    old = JobStore(folder)
    running = old.create("train", ["train", "data.jsonl", "--out", "runs/x"], tmp_path, run="x")
    running.state, running.pid, running.started = "running", gone.pid, time.time()
    old.save(running)
    finished = old.create("eval", ["eval", "runs/x"], tmp_path, run="x")
    finished.state, finished.exit_code = "done", 0
    old.save(finished)

    new = JobStore(folder)
    assert [job.id for job in new.recover()] == [running.id]
    assert new.get(running.id).state == "interrupted" and new.get(running.id).pid is None
    assert new.get(finished.id).state == "done"
    assert [job.id for job in new.all()] == [running.id, finished.id]


def test_a_process_that_is_not_tunelab_does_not_count_as_the_job(tmp_path):
    """A pid reused by another program after the server died is not the job."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not tunelab_process_alive(other.pid)
    finally:
        other.kill()
        other.wait()
    assert not tunelab_process_alive(None)


def test_a_job_found_running_at_start_is_followed_until_it_ends(tmp_path):
    """The server died but its job did not: the next server follows it, and can cancel it."""
    folder = tmp_path / ".jobs"
    first = JobStore(folder)
    job = first.create("train", long_argv(tmp_path), tmp_path)
    first.tick()
    wait_alive(first.get(job.id).pid)
    first.processes.clear()  # as if this server were gone: its job runs on, unowned
    second = JobStore(folder)
    assert second.recover() == []
    assert second.get(job.id).state == "running"
    pid = second.get(job.id).pid
    second.cancel(job.id)
    assert tick_until(second, job.id, {"cancelled"}).state == "cancelled"
    assert not tunelab_process_alive(pid)  # ended (a zombie until this test process reaps it)


def test_job_ids_are_checked_before_they_name_a_folder(store):
    from tunelab.errors import UserError

    for bad in ("../x", "20260101-000000-abcdeg", ""):
        with pytest.raises(UserError):
            store.get(bad)


def test_the_error_line_is_the_commands_own():
    line = "tunelab: error: data.jsonl:3: E_JSON bad"
    assert error_line(f"loading\n{line}\n") == line
    assert error_line("Traceback (most recent call last):\n  ...\nValueError: boom\n") == "ValueError: boom"
    assert error_line("") is None


def test_a_job_killed_from_outside_fails_with_the_signal_named(store, tmp_path):
    import os
    import signal

    job = store.create("train", long_argv(tmp_path), tmp_path)
    store.tick()
    os.killpg(store.get(job.id).pid, signal.SIGKILL)
    job = tick_until(store, job.id, {"failed"})
    assert job.state == "failed" and job.exit_code == -9
    assert job.error == "killed by SIGKILL (not by tunelab ui)"
