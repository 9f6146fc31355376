"""The jobs of `tunelab ui`: each one a `tunelab` command run as a subprocess, its state on disk.

    RUNS/.jobs/ID/job.json   the Job below: command, state, pid, times, exit code, one-line error
    RUNS/.jobs/ID/log.txt    the command's standard output and error, as a terminal would show them

A job runs `python -m tunelab.cli ARGV...` in the folder `tunelab ui` was started in, so a run
started in the page is the run the same command makes in a terminal, and the page shows that
command. State lives in these files, not in the server's memory: two tabs read the same files,
and a restarted server finds every job again. A job marked running whose process is gone (the
server was killed) becomes `interrupted`; one whose process still runs is followed until it ends.

Heavy jobs (training, a learning curve or sweep, evaluation, export) wait in one queue, in the
order they were asked for, and at most `slots` of them run at once: on a CPU two trainings side
by side each take twice as long and together need twice the memory. Light jobs (the data check,
a comparison of runs, asking a teacher, writing a review) start at once.

Cancelling sends SIGTERM to the job's process group, then SIGKILL after `GRACE_S`. Training
writes each checkpoint beside its folder and renames it into place, so a stopped run keeps its
last complete checkpoint and `tunelab train DATA --out RUN --resume` continues from it.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tunelab.errors import UserError

JobState = Literal["queued", "running", "done", "failed", "cancelled", "interrupted"]
JobKind = Literal["train", "curve", "sweep", "eval", "export", "check", "report", "teacher", "review"]
HEAVY: frozenset[str] = frozenset({"train", "curve", "sweep", "eval", "export"})
"""Kinds that wait for a slot; the others start at once."""
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled", "interrupted"})
GRACE_S = 10.0
"""Seconds between SIGTERM and SIGKILL when a job is cancelled."""
JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
"""The form of a job id: its creation time, then random hex (sorts in creation order)."""


class Job(BaseModel):
    """One job, as saved in its job.json."""

    id: str
    """Creation time and a random suffix: the name of the job's folder."""
    kind: JobKind
    """What the command does; train, curve, sweep, eval and export are heavy (they wait for a slot)."""
    argv: list[str]
    """The arguments after `tunelab`: the job runs `python -m tunelab.cli ARGV...`."""
    cwd: str
    """The folder the command runs in (where `tunelab ui` was started): relative paths in argv
    mean what they mean in a terminal there."""
    run: str | None = None
    """The run folder's name under the runs folder, for jobs about one run."""
    state: JobState = "queued"
    created: float
    """Unix times of creation, start and end."""
    started: float | None = None
    ended: float | None = None
    pid: int | None = None
    """The process id while it runs (also the id of its process group)."""
    exit_code: int | None = None
    error: str | None = None
    """One line saying why it failed or stopped: the command's `tunelab: error: ...` line, or
    the last line it printed."""
    cancel_sent: float | None = None
    """When SIGTERM was sent (cancelled by the user, or the server stopping)."""

    @property
    def command(self) -> str:
        """The command line a user would type for this job."""
        import shlex

        return shlex.join(["tunelab", *self.argv])

    @property
    def heavy(self) -> bool:
        return self.kind in HEAVY

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobStore:
    """The jobs folder, and the processes this server started.

    `tick()` does the work: it notices ended processes, sends SIGKILL to those past their
    grace, and starts queued jobs while slots are free. The server calls it twice a second from
    one thread; everything that writes a job.json holds `lock`."""

    def __init__(self, folder: Path, slots: int = 1):
        self.folder = Path(folder)
        self.slots = slots
        self.lock = threading.RLock()
        self.processes: dict[str, subprocess.Popen] = {}
        """The jobs this server started, by id; others marked running were found at start."""

    # ------------------------------------------------------------------ reading and writing

    def path(self, job_id: str) -> Path:
        if not JOB_ID.fullmatch(job_id):
            raise UserError(f"no job {job_id!r}")
        return self.folder / job_id

    def get(self, job_id: str) -> Job:
        file = self.path(job_id) / "job.json"
        try:
            return Job.model_validate_json(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"no job {job_id!r}: it may have been deleted") from None

    def all(self) -> list[Job]:
        """Every job, oldest first. A job.json that cannot be read (a half-copied folder) is left out."""
        jobs = []
        for file in sorted(self.folder.glob("*/job.json")) if self.folder.is_dir() else []:
            try:
                jobs.append(Job.model_validate_json(file.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return sorted(jobs, key=lambda job: (job.created, job.id))

    def save(self, job: Job) -> None:
        """Write job.json beside and rename it into place: a reader never sees half a file."""
        folder = self.path(job.id)
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / "job.json.tmp"
        temporary.write_text(job.model_dump_json(indent=2), encoding="utf-8")
        os.replace(temporary, folder / "job.json")

    def log(self, job_id: str, max_chars: int = 200_000) -> str:
        """The end of the job's log; progress bars' carriage returns become line ends."""
        file = self.path(job_id) / "log.txt"
        if not file.exists():
            return ""
        with file.open("rb") as f:
            f.seek(max(0, file.stat().st_size - max_chars))
            text = f.read().decode("utf-8", errors="replace")
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def queue(self) -> list[Job]:
        """Heavy jobs waiting for a slot, in the order they start."""
        return [job for job in self.all() if job.state == "queued" and job.heavy]

    # ------------------------------------------------------------------ changing state

    @staticmethod
    def new_id() -> str:
        return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)

    def create(self, kind: JobKind, argv: list[str], cwd: Path, run: str | None = None,
               job_id: str | None = None) -> Job:
        """Queue a job; `job_id` (from new_id()) when its arguments name its own folder."""
        job = Job(id=job_id or self.new_id(), kind=kind, argv=argv, cwd=str(cwd), run=run, created=time.time())
        with self.lock:
            self.save(job)
        return job

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one is sent SIGTERM (tick() finishes it)."""
        with self.lock:
            job = self.get(job_id)
            if job.state == "queued":
                job.state, job.ended = "cancelled", time.time()
            elif job.state == "running" and job.cancel_sent is None:
                job.cancel_sent = time.time()
                signal_group(job.pid, signal.SIGTERM)
            self.save(job)
            return job

    def recover(self) -> list[Job]:
        """At start: a job marked running whose process is gone becomes interrupted. Returns them."""
        interrupted = []
        with self.lock:
            for job in self.all():
                if job.state == "running" and not tunelab_process_alive(job.pid):
                    job.state, job.ended, job.pid = "interrupted", time.time(), None
                    job.error = job.error or "the process ended while `tunelab ui` was not watching it"
                    self.save(job)
                    interrupted.append(job)
        return interrupted

    def tick(self) -> None:
        with self.lock:
            jobs = self.all()
            for job in jobs:
                if job.state == "running":
                    self._follow(job)
            running_heavy = sum(1 for job in jobs if job.state == "running" and job.heavy)
            for job in jobs:
                if job.state != "queued":
                    continue
                if job.heavy:
                    if running_heavy >= self.slots:
                        continue
                    running_heavy += 1
                self._start(job)

    def stop_all(self, reason: str = "`tunelab ui` stopped while it ran") -> None:
        """On shutdown: stop the jobs this server started and mark them interrupted."""
        with self.lock:
            for process in list(self.processes.values()):
                signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + GRACE_S
            for job_id, process in list(self.processes.items()):
                try:
                    process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    signal_group(process.pid, signal.SIGKILL)
                    process.wait()
                job = self.get(job_id)
                job.state, job.ended, job.pid = "interrupted", time.time(), None
                job.exit_code, job.error = process.returncode, reason
                self.save(job)
            self.processes.clear()

    def _start(self, job: Job) -> None:
        folder = self.path(job.id)
        with (folder / "log.txt").open("ab") as log:
            log.write(f"$ {job.command}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tunelab.cli", *job.argv], cwd=job.cwd, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except OSError as e:
                job.state, job.ended, job.error = "failed", time.time(), f"could not start: {e}"
                self.save(job)
                return
        self.processes[job.id] = process
        job.state, job.started, job.pid = "running", time.time(), process.pid
        self.save(job)

    def _follow(self, job: Job) -> None:
        process = self.processes.get(job.id)
        if process is not None:  # noqa: SIM108 - two cases, each with its own reason, read better apart
            code = process.poll()
        else:  # found running at start (the server was killed, its job was not): no exit code to read
            code = None if tunelab_process_alive(job.pid) else -1
        if code is None:
            if job.cancel_sent is not None and time.time() - job.cancel_sent > GRACE_S:
                signal_group(job.pid, signal.SIGKILL)
            return
        self.processes.pop(job.id, None)
        job.ended, job.pid = time.time(), None
        job.exit_code = code if process is not None else None
        if job.cancel_sent is not None:
            job.state = "cancelled"
        elif process is None:
            job.state, job.error = "interrupted", "it ended while `tunelab ui` was restarted; its exit code is unknown"
        elif code == 0:
            job.state = "done"
        elif code < 0:  # killed from outside (the out-of-memory killer, `kill -9`)
            job.state, job.error = "failed", f"killed by {signal.Signals(-code).name} (not by tunelab ui)"
        else:
            job.state, job.error = "failed", error_line(self.log(job.id, 20_000)) or f"exit code {code}"
        self.save(job)


def error_line(log: str) -> str | None:
    """The command's first `tunelab: error:` line, else its last line (a traceback's last line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tunelab: error:")]
    if errors:
        return errors[0] + (f" (and {len(errors) - 1} more error lines in the log)" if len(errors) > 1 else "")
    return lines[-1][:500] if lines else None


def signal_group(pid: int | None, sig: int) -> None:
    """Signal the job's process group (start_new_session made its pid the group id), so the
    processes it started stop with it."""
    if pid is None:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tunelab_process_alive(pid: int | None) -> bool:
    """Whether `pid` is a live tunelab process; a pid reused by another program is not."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: the pid was reused
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        text = cmdline.read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid
    status = Path(f"/proc/{pid}/stat")
    try:
        if status.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # a zombie has ended; its parent has not read its exit code yet
    except (OSError, IndexError):
        pass
    return b"tunelab.cli" in text
