"""The runs folder as the pages see it: each run's status from its files and its jobs.

A run is a folder under RUNS with a config.yaml (what `tunelab train` writes first), or the
name of a queued training that has not made its folder yet. Its status comes from what is on
disk (weights, eval.json, checkpoints) and from its jobs, never from the server's memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.ui.follow import read_rows
from tunelab.ui.guard import inside
from tunelab.ui.jobs import Job, JobStore

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
"""A run's or an uploaded file's name: one path component, no leading dot."""


@dataclass
class RunView:
    """What the pages show of one run folder."""

    name: str
    path: Path
    status: str
    """queued, training, evaluating, exporting, trained, evaluated, stopped (resumable) or incomplete."""
    last: dict[str, Any]
    """The last training row of metrics.jsonl (step, loss, tokens/s, ...), or {}."""
    trained: bool
    evaluated: bool
    report: bool
    resumable: bool
    active: Job | None
    """The run's queued or running job."""
    jobs: list[Job]
    config: dict[str, Any]


class RunsFolder:
    """The run folders under `root` and the jobs that concern them."""

    def __init__(self, root: Path, store: JobStore):
        self.root = root
        self.store = store

    def folder(self, name: str) -> Path:
        path = inside(self.root, name, "run")
        if not NAME.fullmatch(name) or path.parent != self.root.resolve():
            raise UserError(f"no run {name!r}")
        return path

    def view(self, name: str, jobs: list[Job] | None = None) -> RunView:
        import yaml

        folder = self.folder(name)
        jobs = [job for job in (self.store.all() if jobs is None else jobs) if job.run == name]
        active = next((job for job in jobs if not job.finished), None)
        if not folder.exists() and not active and not jobs:
            raise UserError(f"no run {name!r} in {self.root}: it may have been deleted")
        trained = (folder / "adapter").exists() or (folder / "model").exists()
        evaluated = (folder / "eval.json").exists()
        resumable = (not trained and not active and any(job.kind == "train" for job in jobs)
                     and any((folder / "checkpoints").glob("step-*/checkpoint.json")))
        if active:
            verb = {"train": "training", "eval": "evaluating", "export": "exporting"}.get(active.kind, active.kind)
            status = "queued" if active.state == "queued" else verb
        elif trained:
            status = "evaluated" if evaluated else "trained"
        else:
            status = "stopped (resumable)" if resumable else "incomplete"
        rows = [row for row in read_rows(folder / "metrics.jsonl") if "loss" in row]
        try:
            config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        return RunView(name, folder, status, rows[-1] if rows else {}, trained, evaluated,
                       (folder / "report.html").exists(), resumable, active, jobs, config)

    def names(self) -> list[str]:
        folder = self.root
        names = {p.name for p in folder.iterdir() if (p / "config.yaml").exists()} if folder.is_dir() else set()
        names |= {job.run for job in self.store.all() if job.run and not job.finished}
        return sorted(n for n in names if NAME.fullmatch(n))

    def total_steps(self, view: RunView) -> int | None:
        """The run's optimizer steps: --max-steps, else what the training progress bar shows."""
        if view.config.get("max_steps"):
            return int(view.config["max_steps"])
        train = [job for job in view.jobs if job.kind == "train"]
        if train:
            found = re.findall(r"training:.*?\|\s*\d+/(\d+)", self.store.log(train[-1].id, 4000))
            if found:
                return int(found[-1])
        return None
