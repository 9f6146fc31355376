"""`tunelab ui`: the loop (data, training, evaluation, chat) as pages in a local web app.

    GET  /data                the data folder: upload a file, check one
    GET  /checks/ID           a data check's report (errors with their rows, split, lengths)
    GET  /train               the training form, defaults and help from TrainConfig
    GET  /runs, /runs/NAME    runs; one run's live loss curve, tokens/s and ETA, its report
    GET  /compare?job=ID      runs side by side: the comparison report of `tunelab report RUN RUN...`
    GET  /jobs, /jobs/ID      the queue and every job's command, state and log
    GET  /runs/NAME/answers   the tuned run's held-out answers, wrong first: rate and repair them
    GET  /teacher, /review?file=NAME   label or grow data with a teacher; review its pairs
    GET  /chat?run=NAME       talk to a run
    GET  /arena               one prompt, answered by the base model and tuned runs side by side
    GET  .../events           server-sent events: a run's metrics.jsonl, a job's state and log
    GET  /files/runs/PATH, /files/data/PATH   files of the two folders (reports)
    POST /api/...             what the pages' buttons do (each needs the session token)

Pages are Jinja2 templates with autoescape; the one script (static/ui.js) is served from the
package, nothing from the network. Everything that takes more than a moment is a job
(jobs.py): the same `tunelab` command a terminal runs, and each page shows that command. Only
chat and the arena run in this process, in a worker thread, through the same `Run.generate` as
`tunelab generate` (arena.py). The security rules are in guard.py; runs.py reads a run's status
from its folder and jobs, follow.py the files that grow; repair.py lists the answers to repair (through
data/corrections.py, as `tunelab data review --run`), datafix.py the rows fixed in the page.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from tunelab.config import TrainConfig
from tunelab.data.novelty import Novelty
from tunelab.errors import UserError, check_output_folder
from tunelab.ui import arena, datafix, repair, teacher
from tunelab.ui.arena import Models
from tunelab.ui.follow import event, event_stream, free_name, histogram_bars, read_new_rows, read_new_text, source_lines
from tunelab.ui.guard import Guard, allowed_hosts, inside
from tunelab.ui.jobs import JobStore
from tunelab.ui.options import UIOptions
from tunelab.ui.runs import NAME, RunsFolder

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_UPLOAD_BYTES = 1 << 30
MAX_JSON_BYTES = 1 << 20
TRAIN_FIELDS = ("base", "method", "objective", "epochs", "lr", "max_steps", "save_every", "early_stopping",
                "split_by")
"""The TrainConfig fields the Train page offers; the rest keep their defaults (see the CLI)."""
TITLES = {"base": "Base model", "lr": "Learning rate"}
PAGE_DEFAULTS = {"save_every": 10}
"""Where the page pre-fills something other than TrainConfig's default, and why: checkpoints
are what Stop and Resume rely on."""
TICK_S = 0.5
MAX_SWEEP = 4
"""Most runs one sweep queues: on a CPU each takes as long as a run of its own."""
MIN_CURVE_SIZE = 8
"""The smallest size `tunelab curve` trains (iterate/curve.py MIN_SIZE; ui sits below iterate in
the layers, so the number is repeated here and a test keeps the two equal)."""
CURVE_SUFFIX, SWEEP_SUFFIX = "-curve", "-sweep"
"""A curve or sweep from the Train page goes to RUNS/NAME-curve or RUNS/NAME-sweep: its own folder
of runs (one per size or combination), beside the runs."""
COMPARISON = "comparison.html"
"""The comparison report, in the runs folder (its links to each run's report are relative)."""
EXPORTS = {"merged": ("merged", None), "merged-f16": ("merged", "f16"), "gguf": ("gguf", None),
           "gguf-q8_0": ("gguf", "q8_0"), "ollama": ("ollama", None)}
"""The export buttons: name -> (--format, --dtype or the format's default); export checks them."""


class TrainRequest(BaseModel):
    """The Train page's form."""

    data: str
    name: str
    base: str = ""
    method: str = ""
    objective: str = ""
    epochs: str = ""
    lr: str = ""
    max_steps: str = ""
    save_every: str = ""
    early_stopping: str = ""
    split_by: str = ""
    sweep_lr: str = ""
    """Comma-separated learning rates: one run each (a small sweep), instead of `lr`."""
    sizes: str = ""
    """Comma-separated training-set sizes of a learning curve (`tunelab curve --sizes`)."""
    grid: str = ""
    """A sweep's settings, one `KEY=V1,V2` a line (`tunelab sweep --grid`, once per line)."""
    data_extra: str = ""
    """A run whose corrections.jsonl is added to the data (`--data-extra RUN/corrections.jsonl`)."""


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class ChatRequest(BaseModel):
    run: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    max_new_tokens: int = Field(256, gt=0, le=1024)


class RepairRequest(BaseModel):
    line: int
    text: str = Field(max_length=100_000)


class ArenaRequest(BaseModel):
    run: str
    column: Literal["zero-shot", "few-shot", "tuned"]
    prompt: str = Field(min_length=1, max_length=20_000)
    max_new_tokens: int = Field(256, gt=0, le=1024)


class FixRequest(BaseModel):
    check: str
    """The data check whose file is fixed."""
    edits: dict[int, str] = {}
    """Line -> its new text."""
    drop: list[int] = []


class UI:
    """The app's state: the options, the jobs folder, the session token and the models chat and the arena use."""

    def __init__(self, options: UIOptions, token: str | None = None):
        import jinja2

        self.options = options
        self.token = token or secrets.token_urlsafe(24)
        self.store = JobStore(options.runs / ".jobs", options.jobs)
        self.runs = RunsFolder(options.runs, self.store)
        self.templates = jinja2.Environment(loader=jinja2.PackageLoader("tunelab.ui", "templates"), autoescape=True,
                                            undefined=jinja2.StrictUndefined)
        self.templates.filters["when"] = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else ""
        self.models = Models()

    # ------------------------------------------------------------------ the app

    def app(self, hosts: set[str] | None, login_key: str | None = None):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        @asynccontextmanager
        async def lifespan(app):
            self.store.recover()
            stop = threading.Event()
            ticker = threading.Thread(target=self.tick_until, args=(stop,), daemon=True, name="tunelab-ui-jobs")
            ticker.start()
            yield
            stop.set()
            ticker.join()
            self.store.stop_all()

        routes = [
            Route("/", lambda request: redirect("/data")),
            Route("/data", self.data_page),
            Route("/checks/{job_id}", self.check_page),
            Route("/train", self.train_page),
            Route("/runs", self.runs_page),
            Route("/runs/{name}", self.run_page),
            Route("/runs/{name}/events", self.run_events),
            Route("/compare", self.compare_page),
            Route("/jobs", self.jobs_page),
            Route("/jobs/{job_id}", self.job_page),
            Route("/jobs/{job_id}/events", self.job_events),
            Route("/runs/{name}/answers", self.answers_page),
            Route("/teacher", self.teacher_page),
            Route("/review", self.review_page),
            Route("/chat", self.chat_page),
            Route("/arena", self.arena_page),
            Route("/files/runs/{path:path}", self.run_file),
            Route("/files/data/{path:path}", self.data_file),
            Route("/api/data", self.upload, methods=["POST"]),
            Route("/api/check", self.start_check, methods=["POST"]),
            Route("/api/train", self.start_train, methods=["POST"]),
            Route("/api/curve", self.start_curve, methods=["POST"]),
            Route("/api/sweep", self.start_grid_sweep, methods=["POST"]),
            Route("/api/runs/{name}/eval", self.start_eval, methods=["POST"]),
            Route("/api/runs/{name}/resume", self.start_resume, methods=["POST"]),
            Route("/api/runs/{name}/export", self.start_export, methods=["POST"]),
            Route("/api/runs/{name}/corrections", self.save_correction, methods=["POST"]),
            Route("/api/runs/{name}/fixes", self.save_fix, methods=["POST"]),
            Route("/api/compare", self.start_compare, methods=["POST"]),
            Route("/api/data/fix", self.fix_data, methods=["POST"]),
            Route("/api/teacher", self.start_teacher, methods=["POST"]),
            Route("/api/review", self.save_review, methods=["POST"]),
            Route("/api/review/write", self.write_review, methods=["POST"]),
            Route("/api/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
            Route("/api/chat", self.chat, methods=["POST"]),
            Route("/api/arena", self.arena_answer, methods=["POST"]),
            Mount("/static", StaticFiles(packages=[("tunelab.ui", "static")]), name="static"),
        ]
        handlers = {Exception: self.on_error, HTTPException: self.on_error, UserError: self.on_error}
        app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
        return Guard(app, hosts, self.token, login_key)

    def tick_until(self, stop: threading.Event) -> None:
        while not stop.wait(TICK_S):
            try:
                self.store.tick()
            except Exception:  # a bug here must not stop the queue; the terminal shows it
                traceback.print_exc()

    async def on_error(self, request, exc: Exception):
        """Every error as a message: JSON for the API and event streams, a page otherwise; a
        traceback only on the terminal, for bugs."""
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if isinstance(exc, UserError):
            status, message = 400, str(exc)
        elif isinstance(exc, HTTPException):
            status, message = exc.status_code, ("no such page" if exc.status_code == 404 else str(exc.detail))
        else:  # a bug: Starlette raises it again after this page, and uvicorn prints its traceback
            status, message = 500, (f"unexpected error ({type(exc).__name__}); the terminal running `tunelab ui` "
                                    "shows the details")
        if request.url.path.startswith("/api/") or request.url.path.endswith("/events"):
            return JSONResponse({"error": message}, status_code=status)
        return self.page("error.html", "Error", status=status, message=message)

    def page(self, template: str, title: str, status: int = 200, **values):
        from starlette.responses import HTMLResponse

        html = self.templates.get_template(template).render(title=title, token=self.token, **values)
        return HTMLResponse(html, status_code=status)

    # ------------------------------------------------------------------ data

    def data_files(self) -> list[dict[str, Any]]:
        folder = self.options.data
        if not folder.is_dir():
            return []
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES
                       and not p.name.endswith(".decisions.jsonl"))  # a review's bookkeeping, not data
        checks = [job for job in self.store.all() if job.kind == "check"]
        found = []
        for p in files:
            check = next((job for job in reversed(checks) if Path(job.argv[2]).name == p.name), None)
            report = self.store.path(check.id) / "check" / "data_check.json" if check else None
            errors = len(json.loads(report.read_text())["errors"]) if report and report.exists() else None
            found.append({"name": p.name, "size": p.stat().st_size, "check": check, "errors": errors})
        return found

    async def data_page(self, request):
        return self.page("data.html", "Data", files=self.data_files(), data=self.options.data,
                         suffixes=", ".join(DATA_SUFFIXES))

    async def upload(self, request):
        """The body is the file itself; `?name=` its name. An existing file is never replaced:
        the upload gets a free name beside it."""
        from starlette.responses import JSONResponse

        name = Path(request.query_params.get("name", "")).name
        if not NAME.fullmatch(name) or Path(name).suffix.lower() not in DATA_SUFFIXES:
            raise UserError(f"file name {name!r}: give a data file ({', '.join(DATA_SUFFIXES)}) a plain name "
                            "of letters, digits, '.', '-' and '_'")
        folder = self.options.data
        check_output_folder(folder, "--data")
        folder.mkdir(parents=True, exist_ok=True)
        target = free_name(folder / name)
        partial = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        size = 0
        try:
            with partial.open("wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise UserError(f"{name}: larger than {MAX_UPLOAD_BYTES >> 20} MB; "
                                        f"copy it into {folder} instead")
                    out.write(chunk)
            partial.rename(target)
        finally:
            partial.unlink(missing_ok=True)
        return JSONResponse({"name": target.name})

    async def start_check(self, request):
        from starlette.responses import JSONResponse

        body = await read_json(request)
        name = str(body.get("file", ""))
        job = self.check_job(self.data_path(name))
        return JSONResponse({"job": job.id, "url": f"/checks/{job.id}"})

    def check_job(self, path: Path):
        """`tunelab data check FILE --out RUNS/.jobs/ID/check`: the report is the job's own."""
        job_id = self.store.new_id()
        argv = ["data", "check", self.data_arg(path), "--out", str(self.options.runs / ".jobs" / job_id / "check")]
        return self.store.create("check", argv, self.options.cwd, job_id=job_id)

    async def check_page(self, request):
        job = self.store.get(request.path_params["job_id"])
        if job.kind != "check":
            raise UserError(f"job {job.id} is not a data check")
        report_file = self.store.path(job.id) / "check" / "data_check.json"
        report = json.loads(report_file.read_text(encoding="utf-8")) if report_file.exists() else None
        data = Path(job.cwd) / job.argv[2]
        rows, editable, pairs, suggestion, novelty = {}, {}, [], None, None
        fixable = data.suffix.lower() == ".jsonl" and data.is_file()
        if report:
            if report.get("novelty"):  # the line `tunelab data check` prints
                found = report["novelty"]
                novelty = Novelty(**{k: found[k] for k in ("values", "novel_values", "novel_rows", "seen_rows",
                                                           "training_values")},
                                  without_values=found["rows_without_values"]).describe()
            pairs = datafix.duplicate_pairs(report)
            wanted = {e["line"] for e in report["errors"] + report["warnings"] if e.get("line")}
            rows = source_lines(data, wanted | {p[side] for p in pairs for side in ("first", "later")})
            if fixable:
                editable = datafix.editable_lines(data, {e["line"] for e in report["errors"] if e.get("line")})
            if not report["split"].get("split_by"):
                suggestion = await asyncio.to_thread(datafix.split_by_suggestion, data, report["rows"])
        return self.page("check.html", f"Data check of {data.name}", job=job, report=report, rows=rows,
                         histogram=histogram_bars(report["lengths"]["histogram"]) if report else None,
                         pairs=pairs, suggestion=suggestion, fixable=fixable, editable=editable, file=data.name,
                         fixed=datafix.fixed_name(data).name, novelty=novelty)

    async def fix_data(self, request):
        """The checked file with rows edited and dropped, saved as NAME.fixed.jsonl (never over a
        file) and checked at once."""
        from starlette.responses import JSONResponse

        body = await read_model(request, FixRequest)
        job = self.store.get(body.check)
        if job.kind != "check":
            raise UserError(f"job {job.id} is not a data check")
        if not body.edits and not body.drop:
            raise UserError("nothing to save: edit a row or tick one to drop first")
        path = self.data_path(Path(job.argv[2]).name)
        out, edited, dropped = await asyncio.to_thread(datafix.write_fixed, path, body.edits, set(body.drop))
        check = self.check_job(out)
        return JSONResponse({"name": out.name, "edited": edited, "dropped": dropped, "job": check.id,
                             "url": f"/checks/{check.id}"})

    def data_arg(self, path: Path) -> str:
        """A data file as the command line names it: under the --data folder as given."""
        return str(self.options.data / path.relative_to(self.options.data.resolve()))

    def data_path(self, name: str) -> Path:
        path = inside(self.options.data, name, "data file")
        if not path.is_file():
            raise UserError(f"no data file {name!r} in {self.options.data}")
        return path

    # ------------------------------------------------------------------ teacher

    async def teacher_page(self, request):
        return self.page("teacher.html", "Data from a teacher", files=self.data_files(), data=self.options.data,
                         jobs=[job for job in reversed(self.store.all()) if job.kind == "teacher"][:10])

    async def start_teacher(self, request):
        """`tunelab data label|synth ... --out DATA/OUT`, the endpoint checked (and consent) first."""
        from starlette.responses import JSONResponse

        form = await read_model(request, teacher.TeacherRequest)
        if not NAME.fullmatch(form.out) or not form.out.endswith(".jsonl"):
            raise UserError(f"--out {form.out!r}: name the new file NAME.jsonl (letters, digits, '.', '-', '_')")
        out = inside(self.options.data, form.out, "data file")
        if out.exists():
            raise UserError(f"{form.out} exists already in {self.options.data}; choose another name")
        inputs = self.data_path(form.inputs) if form.inputs else None
        examples = self.data_path(form.examples) if form.examples else None
        argv = teacher.teacher_argv(form, inputs and Path(self.data_arg(inputs)),
                                    examples and Path(self.data_arg(examples)), self.options.data / form.out)
        job = self.store.create("teacher", argv, self.options.cwd)
        return JSONResponse({"job": job.id, "url": f"/jobs/{job.id}", "command": job.command})

    async def review_page(self, request):
        path = self.data_path(request.query_params.get("file", ""))
        state = await asyncio.to_thread(teacher.review_state, path)
        command = shlex.join(["tunelab", "data", "review", self.data_arg(path), "--out",
                              str(self.options.data / state["out"].name)])
        return self.page("review.html", f"Review {path.name}", file=path.name, state=state, command=command,
                         written=state["out"].exists())

    async def save_review(self, request):
        from starlette.responses import JSONResponse

        body = await read_model(request, teacher.ReviewRequest)
        record = await asyncio.to_thread(teacher.decide, self.data_path(body.file), body)
        return JSONResponse({"saved": record})

    async def write_review(self, request):
        """`tunelab data review FILE --out FILE.reviewed.jsonl` once every pair is decided: it asks
        nothing then, writes the kept pairs and checks them."""
        from starlette.responses import JSONResponse

        path = self.data_path(str((await read_json(request)).get("file", "")))
        state = await asyncio.to_thread(teacher.review_state, path)
        if state["pending"]:
            raise UserError(f"{state['pending']} pairs have no decision yet")
        out = self.options.data / state["out"].name
        job = self.store.create("review", ["data", "review", self.data_arg(path), "--out", str(out)], self.options.cwd)
        return JSONResponse({"job": job.id, "url": f"/jobs/{job.id}", "command": job.command})

    # ------------------------------------------------------------------ training

    async def train_page(self, request):
        fields = []
        for name in TRAIN_FIELDS:
            info = TrainConfig.model_fields[name]
            default = request.query_params.get(name) or PAGE_DEFAULTS.get(name, info.default)
            help_text = " ".join((info.description or "").split())
            if name in PAGE_DEFAULTS and name not in request.query_params:
                help_text += (f" This page fills in {default} (the command's default is none) so that Stop "
                              "and Resume work.")
            fields.append({"name": name, "title": TITLES.get(name, name.replace("_", " ").capitalize()),
                           "flag": "--" + name.replace("_", "-"), "value": "" if default is None else default,
                           "default": "" if info.default is None else info.default, "help": help_text,
                           "choices": choices_of(info.annotation)})
        corrected = [{"name": name, "count": count, "file": f"{self.options.runs}/{name}/{repair.CORRECTIONS}"}
                     for name in self.runs.names() if (count := repair.count(self.options.runs / name))]
        return self.page("train.html", "Train", fields=fields, files=self.data_files(), runs=self.options.runs,
                         data=self.options.data, name=time.strftime("run-%Y%m%d-%H%M%S"),
                         picked=request.query_params.get("data", ""), corrected=corrected,
                         extra=request.query_params.get("extra", ""))

    def train_argv(self, form: TrainRequest) -> tuple[list[str], str]:
        """The `tunelab train` arguments of the form, values checked by TrainConfig as the CLI
        checks them; a flag only where the value differs from the default."""
        data = self.data_path(form.data)
        folder = inside(self.options.runs, self.checked_name(form.name), "run")
        taken = [job for job in self.store.all() if not job.finished
                 and (job.run == form.name or job.kind in ("curve", "sweep") and out_folder(job) == form.name)]
        if folder.exists() or taken:
            raise UserError(f"run {form.name!r} exists already in {self.options.runs}; choose another name")
        argv = ["train", self.data_arg(data), "--out", str(self.options.runs / form.name)]
        return argv + self.training_flags(form), form.name

    def curve_argv(self, form: TrainRequest) -> tuple[list[str], str]:
        """`tunelab curve DATA --sizes N,N --out RUNS/NAME-curve` and the form's training flags.
        An existing curve folder is not refused: the command continues it (the sizes it has
        not finished), so queuing the same name again resumes a stopped curve."""
        data = self.data_path(form.data)
        name = self.checked_name(form.name) + CURVE_SUFFIX
        inside(self.options.runs, name, "curve")
        if form.sweep_lr.strip():
            raise UserError("a learning curve trains one learning rate at every size; clear the learning rates "
                            "to sweep, or start them as runs")
        try:
            sizes = [int(part) for part in form.sizes.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"sizes {form.sizes!r}: give whole numbers separated by commas, e.g. 100,200,400") from None
        if len(set(sizes)) < 2 or min(sizes) < MIN_CURVE_SIZE:
            raise UserError(f"sizes {form.sizes!r}: give at least 2 different sizes of {MIN_CURVE_SIZE} examples "
                            "or more, separated by commas, e.g. 100,200,400")
        self.check_not_queued("curve", name)
        argv = ["curve", self.data_arg(data), "--sizes", ",".join(str(n) for n in sizes),
                "--out", str(self.options.runs / name)]
        return argv + self.training_flags(form), name

    def grid_sweep_argv(self, form: TrainRequest) -> tuple[list[str], str]:
        """`tunelab sweep DATA --grid KEY=V1,V2 ... --out RUNS/NAME-sweep` and the form's training
        flags. The keys are checked here (a training option, not also set in the form); the
        command checks the values and the rest, its one-line error on the job page. Like a curve,
        the same name again continues a stopped sweep."""
        data = self.data_path(form.data)
        name = self.checked_name(form.name) + SWEEP_SUFFIX
        inside(self.options.runs, name, "sweep")
        if form.sweep_lr.strip():
            raise UserError("give the learning rates to sweep in the grid (lr=1e-4,3e-4), not in both")
        lines = [re.sub(r"\s+", "", line) for line in form.grid.splitlines() if line.strip()]
        if not lines:
            raise UserError("the sweep has no settings: give one KEY=V1,V2 a line, e.g. lr=1e-4,3e-4")
        flags, runs = self.training_flags(form), 1
        for line in lines:
            key, _, values = line.partition("=")
            if key.startswith("-"):  # the line goes to --grid as written, where a flag's dashes are refused
                raise UserError(f"sweep {line!r}: write the option without dashes, e.g. lr=1e-4,3e-4")
            key = key.replace("-", "_")
            if key == "data_extra":
                raise UserError(f"sweep {line!r}: extra data is not swept; add a run's repaired answers in the "
                                "form above")
            listed = [v for v in values.split(",") if v]
            if key not in TrainConfig.model_fields or len(set(listed)) < 2 or len(set(listed)) < len(listed):
                raise UserError(f"sweep {line!r}: write a training option and 2 or more different values, "
                                "e.g. lr=1e-4,3e-4 (`tunelab train --help` lists the options)")
            if "--" + key.replace("_", "-") in flags:  # a select at its default is no flag: no clash
                raise UserError(f"sweep {line!r}: {key} is also set in the form; clear it there or leave it "
                                "out of the grid")
            runs *= len(listed)
        if runs > MAX_SWEEP:
            raise UserError(f"the sweep makes {runs} runs; a sweep from this page makes at most {MAX_SWEEP} "
                            "(run bigger ones with `tunelab sweep`)")
        self.check_not_queued("sweep", name)
        grid = [word for line in lines for word in ("--grid", line)]
        argv = ["sweep", self.data_arg(data), *grid, "--out", str(self.options.runs / name)]
        return argv + flags, name

    def check_not_queued(self, kind: str, name: str) -> None:
        """A curve's or sweep's folder is neither one it is writing already nor a run's."""
        if any(job.kind == kind and out_folder(job) == name and not job.finished for job in self.store.all()):
            raise UserError(f"the {kind} {name} is queued or running already; see the Jobs page")
        if name in self.runs.names():
            raise UserError(f"{name} is a run in {self.options.runs}, not a {kind}; choose another name")

    def checked_name(self, name: str) -> str:
        if not NAME.fullmatch(name):
            raise UserError(f"run name {name!r}: use letters, digits, '.', '-' and '_'")
        return name

    def training_flags(self, form: TrainRequest) -> list[str]:
        """The form's training options as flags, shared by `tunelab train`, `curve` and `sweep`
        (all read them into TrainConfig, checked here first so a bad value is a message now)."""
        given = {name: value.strip() for name in TRAIN_FIELDS if (value := getattr(form, name)).strip()}
        config = TrainConfig.build(flags=given, **given)
        argv = []
        for name in TRAIN_FIELDS:
            value = getattr(config, name)
            if name in given and value != TrainConfig.model_fields[name].default:
                argv += ["--" + name.replace("_", "-"), given[name]]
        if form.data_extra:
            extra = self.runs.folder(form.data_extra) / repair.CORRECTIONS
            if not extra.is_file():
                raise UserError(f"run {form.data_extra} has no corrections yet; repair answers on its Answers page")
            argv += ["--data-extra", str(self.options.runs / form.data_extra / repair.CORRECTIONS)]
        return argv

    def sweep(self, form: TrainRequest) -> list[TrainRequest]:
        """The form's runs: itself, or with `sweep_lr` one run per learning rate, each named
        NAME-lr-VALUE. Every one is checked before any is queued."""
        values = [v.strip() for v in form.sweep_lr.split(",") if v.strip()]
        if not values:
            return [form]
        if form.lr.strip():
            raise UserError("give either a learning rate or learning rates to sweep, not both")
        if not 2 <= len(values) <= MAX_SWEEP or len(set(values)) < len(values):
            raise UserError(f"sweep {form.sweep_lr!r}: give 2 to {MAX_SWEEP} different learning rates, "
                            "separated by commas")
        return [form.model_copy(update={"name": f"{form.name}-lr-{value}", "lr": value, "sweep_lr": ""})
                for value in values]

    async def train_form(self, request) -> TrainRequest:
        try:
            return TrainRequest.model_validate(await read_json(request))
        except ValidationError as e:
            raise UserError(f"the training form is incomplete: {e.errors()[0]['loc'][0]} is missing") from None

    async def start_train(self, request):
        from starlette.responses import JSONResponse

        form = await self.train_form(request)
        planned = [self.train_argv(run) for run in self.sweep(form)]
        jobs = [self.store.create("train", argv, self.options.cwd, run=name) for argv, name in planned]
        url = f"/runs/{planned[0][1]}" if len(jobs) == 1 else "/jobs"
        return JSONResponse({"job": jobs[0].id, "url": url, "command": jobs[0].command,
                             "commands": [job.command for job in jobs]})

    async def start_curve(self, request):
        """The Train page's Learning curve button: one heavy job, its job page links the curve."""
        from starlette.responses import JSONResponse

        argv, name = self.curve_argv(await self.train_form(request))
        job = self.store.create("curve", argv, self.options.cwd)  # not a run: the Runs page lists runs
        return JSONResponse({"job": job.id, "url": f"/jobs/{job.id}", "command": job.command})

    async def start_grid_sweep(self, request):
        """The Train page's Sweep button: one heavy `tunelab sweep` job, its page links the comparison."""
        from starlette.responses import JSONResponse

        argv, name = self.grid_sweep_argv(await self.train_form(request))
        job = self.store.create("sweep", argv, self.options.cwd)
        return JSONResponse({"job": job.id, "url": f"/jobs/{job.id}", "command": job.command})

    # ------------------------------------------------------------------ runs

    async def runs_page(self, request):
        jobs = self.store.all()
        return self.page("runs.html", "Runs", runs=[self.runs.view(name, jobs) for name in self.runs.names()])

    async def run_page(self, request):
        view = self.runs.view(request.path_params["name"])
        return self.page("run.html", view.name, run=view, runs=self.options.runs, exports=self.exports(view),
                         choices=EXPORTS, corrections=repair.count(view.path))

    async def run_events(self, request):
        """The run's metrics.jsonl as it grows, and its status whenever it changes; the
        stream ends when no job of the run is left to change either."""
        name = request.path_params["name"]
        self.runs.view(name)

        async def stream():
            offset, last = 0, None
            while True:
                rows, offset, reset = await asyncio.to_thread(read_new_rows,
                                                              self.runs.folder(name) / "metrics.jsonl", offset)
                if reset:
                    yield event("reset", {})
                if rows:
                    yield event("metrics", rows)
                view = await asyncio.to_thread(self.runs.view, name)
                state = {"status": view.status, "total_steps": self.runs.total_steps(view)}
                if state != last:
                    yield event("state", state)
                    last = state
                if view.active is None:
                    yield event("end", {})
                    return
                await asyncio.sleep(TICK_S)

        return event_stream(stream())

    async def start_eval(self, request):
        from starlette.responses import JSONResponse

        view = self.runs.view(request.path_params["name"])
        if not view.trained or view.active:
            raise UserError(f"run {view.name} is {view.status}: it can be evaluated once training has finished")
        job = self.store.create("eval", ["eval", str(self.options.runs / view.name)], self.options.cwd, run=view.name)
        return JSONResponse({"job": job.id, "url": f"/runs/{view.name}", "command": job.command})

    async def start_resume(self, request):
        from starlette.responses import JSONResponse

        view = self.runs.view(request.path_params["name"])
        if not view.resumable:
            raise UserError(f"run {view.name} is {view.status}: only a stopped run with a checkpoint can be resumed")
        trained_with = [job for job in view.jobs if job.kind == "train"][-1]
        argv = ["train", trained_with.argv[1], "--out", str(self.options.runs / view.name), "--resume"]
        job = self.store.create("train", argv, self.options.cwd, run=view.name)
        return JSONResponse({"job": job.id, "url": f"/runs/{view.name}", "command": job.command})

    async def start_compare(self, request):
        """`tunelab report RUN RUN... --out RUNS/comparison.html`: the latest comparison, one file."""
        from starlette.responses import JSONResponse

        names = (await read_json(request)).get("runs")
        if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
            raise UserError("pick two runs or more to compare")
        views = [self.runs.view(name) for name in names]
        unfinished = [view.name for view in views if not view.trained]
        if unfinished:
            raise UserError(f"run {unfinished[0]} has no trained weights yet; compare finished runs")
        argv = ["report", *(str(self.options.runs / view.name) for view in views),
                "--out", str(self.options.runs / COMPARISON)]
        job = self.store.create("report", argv, self.options.cwd)
        return JSONResponse({"job": job.id, "url": f"/compare?job={job.id}", "command": job.command})

    async def compare_page(self, request):
        job = self.store.get(request.query_params.get("job", ""))
        if job.kind != "report":
            raise UserError(f"job {job.id} is not a comparison")
        return self.page("compare.html", "Runs side by side", job=job, file=f"/files/runs/{COMPARISON}")

    # ------------------------------------------------------------------ answers: rate and repair

    async def answers_page(self, request):
        view = self.runs.view(request.path_params["name"])
        answers = repair.held_out(view.path)
        data = Path(str(view.config.get("data", "")))
        source = data.name if data.name and (self.options.data / data.name).is_file() else ""
        return self.page("answers.html", f"Answers of {view.name}", run=view, answers=answers,
                         wrong=sum(a.right is False for a in answers), runs=self.options.runs,
                         corrections=repair.count(view.path), source=source)

    async def save_correction(self, request):
        """The right answer to a held-out row the tuned model got wrong: a row of RUN/corrections.jsonl."""
        from starlette.responses import JSONResponse

        view, body = self.runs.view(request.path_params["name"]), await read_model(request, RepairRequest)
        row = await asyncio.to_thread(repair.add_correction, view.path, body.line, body.text)
        return JSONResponse({"saved": row, "count": repair.count(view.path)})

    async def save_fix(self, request):
        """A held-out row whose reference is wrong: a row of RUN/fixes.jsonl (the data file stays as it is)."""
        from starlette.responses import JSONResponse

        view, body = self.runs.view(request.path_params["name"]), await read_model(request, RepairRequest)
        row = await asyncio.to_thread(repair.add_fix, view.path, body.line, body.text)
        return JSONResponse({"saved": row})

    # ------------------------------------------------------------------ export

    async def start_export(self, request):
        """`tunelab export RUN --format F --out RUN/exports/F`: a heavy job, its progress in its log."""
        from starlette.responses import JSONResponse

        view = self.runs.view(request.path_params["name"])
        choice = str((await read_json(request)).get("format", ""))
        if choice not in EXPORTS:
            raise UserError(f"export {choice!r}: choose one of {', '.join(EXPORTS)}")
        if not view.trained or (view.active and view.active.kind == "train"):
            raise UserError(f"run {view.name} is {view.status}: it can be exported once training has finished")
        fmt, dtype = EXPORTS[choice]
        out = free_name(view.path / "exports" / choice)
        argv = ["export", str(self.options.runs / view.name), "--format", fmt,
                "--out", str(self.options.runs / view.name / "exports" / out.name)]
        job = self.store.create("export", argv + (["--dtype", dtype] if dtype else []), self.options.cwd,
                                run=view.name)
        return JSONResponse({"job": job.id, "url": f"/runs/{view.name}", "command": job.command})

    def exports(self, view) -> list[dict[str, Any]]:
        """The run's export jobs, newest first, with the folder and the import line each printed."""
        found = []
        for job in reversed([job for job in view.jobs if job.kind == "export"]):
            out = Path(job.argv[job.argv.index("--out") + 1])
            log = self.store.log(job.id, 20_000) if job.state == "done" else ""
            lines = [line.removeprefix("Import it: ") for line in log.splitlines() if line.startswith("Import it: ")]
            card = view.path / "exports" / out.name / "README.md"
            found.append({"job": job, "out": str(out), "import": lines[-1] if lines else None,
                          "card": f"/files/runs/{view.name}/exports/{out.name}/README.md" if card.is_file() else None})
        return found

    async def run_file(self, request):
        return self.file(self.options.runs, request.path_params["path"])

    async def data_file(self, request):
        return self.file(self.options.data, request.path_params["path"])

    def file(self, folder: Path, relative: str):
        """A file of the runs or data folder, in a sandbox (guard.FILE_POLICY); never the jobs'
        logs and state by this route (the job pages show those)."""
        from starlette.responses import FileResponse

        from tunelab.ui.guard import FILE_POLICY

        path = inside(folder, relative)
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(folder.resolve()).parts):
            raise UserError(f"no such file: {relative}")
        return FileResponse(path, headers={"content-security-policy": FILE_POLICY, "cache-control": "no-store"})

    # ------------------------------------------------------------------ jobs

    async def jobs_page(self, request):
        jobs = self.store.all()
        queue = [job.id for job in self.store.queue()]
        return self.page("jobs.html", "Jobs", jobs=list(reversed(jobs)), queue=queue, slots=self.options.jobs)

    async def job_page(self, request):
        job = self.store.get(request.path_params["job_id"])
        queue = [j.id for j in self.store.queue()]
        folder = out_folder(job) if job.kind in ("curve", "sweep") and job.state == "done" else None
        return self.page("job.html", f"Job {job.id}", job=job, log=self.store.log(job.id),
                         place=queue.index(job.id) + 1 if job.id in queue else None, folder=folder)

    async def job_events(self, request):
        """The job's state when it changes and its log as it grows; ends with the job."""
        job_id = request.path_params["job_id"]
        self.store.get(job_id)
        log_file = self.store.path(job_id) / "log.txt"

        async def stream():
            offset, last = log_file.stat().st_size if log_file.exists() else 0, None
            while True:
                job = await asyncio.to_thread(self.store.get, job_id)
                text, offset = await asyncio.to_thread(read_new_text, log_file, offset)
                if text:
                    yield event("log", text)
                if job.state != last:
                    yield event("state", {"state": job.state, "error": job.error})
                    last = job.state
                if job.finished:
                    yield event("end", {})
                    return
                await asyncio.sleep(TICK_S)

        return event_stream(stream())

    async def cancel_job(self, request):
        from starlette.responses import JSONResponse

        job = self.store.cancel(request.path_params["job_id"])
        return JSONResponse({"job": job.id, "state": job.state})

    # ------------------------------------------------------------------ chat

    async def chat_page(self, request):
        jobs = self.store.all()
        runs = [view for view in (self.runs.view(name, jobs) for name in self.runs.names()) if view.trained]
        picked = request.query_params.get("run") or (runs[0].name if runs else "")
        return self.page("chat.html", "Chat", runs=runs, picked=picked, runs_folder=self.options.runs)

    async def chat(self, request):
        from starlette.responses import JSONResponse

        try:
            body = ChatRequest.model_validate(await read_json(request))
        except ValidationError as e:
            raise UserError(f"chat request: {e.errors()[0]['msg']}") from None
        if body.messages[-1].role != "user":
            raise UserError("chat request: the last message must be the user's")
        folder = self.runs.folder(body.run)
        messages = [m.model_dump() for m in body.messages]
        reply = await asyncio.to_thread(self.models.reply, folder, messages, body.max_new_tokens)
        return JSONResponse({"reply": reply})

    # ------------------------------------------------------------------ arena

    async def arena_page(self, request):
        jobs = self.store.all()
        runs = [view for view in (self.runs.view(name, jobs) for name in self.runs.names()) if view.trained]
        picked = set(request.query_params.getlist("run")) or {view.name for view in runs[:2]}
        return self.page("arena.html", "Arena", runs=runs, picked=picked, runs_folder=self.options.runs,
                         shots=arena.SHOTS)

    async def arena_answer(self, request):
        """One column of the arena: the base model (zero-shot or few-shot, as eval prompts it) of
        `run`, or the tuned `run` itself."""
        from starlette.responses import JSONResponse

        body = await read_model(request, ArenaRequest)
        folder = self.runs.folder(body.run)
        answer, shots = await asyncio.to_thread(self.models.answer, folder, body.column, body.prompt,
                                                body.max_new_tokens)
        return JSONResponse({"answer": answer, "shots": shots})


# ---------------------------------------------------------------------- helpers


def redirect(url: str):
    from starlette.responses import RedirectResponse

    return RedirectResponse(url, status_code=303)


async def read_model(request, model: type[BaseModel]):
    """The request's JSON as `model`; a missing or wrong field is one line naming it."""
    try:
        return model.model_validate(await read_json(request))
    except ValidationError as e:
        error = e.errors()[0]
        where = ".".join(map(str, error["loc"])) or "the request"
        raise UserError(f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}") from None


async def read_json(request) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_JSON_BYTES:
        raise UserError("request too large")
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise UserError("the request is not JSON") from None
    if not isinstance(value, dict):
        raise UserError("the request is not a JSON object")
    return value


def out_folder(job) -> str:
    """The folder name under RUNS that a curve or sweep job writes (its --out)."""
    return Path(job.argv[job.argv.index("--out") + 1]).name


def choices_of(annotation) -> list[str]:
    import typing

    return [str(c) for c in typing.get_args(annotation)] if typing.get_origin(annotation) is Literal else []


def build_app(options: UIOptions, port: int | None = None, login_key: str | None = None,
              token: str | None = None) -> tuple[Any, UI]:
    """The ASGI app for `options` (bound to `port`, by default options.port) and its state."""
    ui = UI(options, token)
    return ui.app(allowed_hosts(options.host, options.port if port is None else port), login_key), ui


def run_ui(options: UIOptions) -> None:
    """`tunelab ui`: bind, print the address (and the login link off loopback), serve until Ctrl-C."""
    try:
        import starlette  # noqa: F401  (checked here for the one-line error)
        import uvicorn
    except ImportError:
        raise UserError("tunelab ui needs starlette and uvicorn: pip install 'tunelab[ui]'") from None
    from tunelab.serve.app import bind, is_loopback

    for folder, flag in ((options.runs, "--runs"), (options.data, "--data")):
        check_output_folder(folder, flag)
        folder.mkdir(parents=True, exist_ok=True)
    login_key = None if is_loopback(options.host) else (options.api_key or secrets.token_urlsafe(16))
    sock = bind(options.host, options.port)
    port = sock.getsockname()[1]
    app, _ = build_app(options, port, login_key)
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"http://{host}:{port}/"
    if login_key and not options.api_key:
        print(f"tunelab ui on {address}; log in at {address}?key={login_key}", flush=True)
    else:
        print(f"tunelab ui on {address}", flush=True)
    print(f"runs in {options.runs}, data in {options.data}, {options.jobs} heavy job(s) at a time; Ctrl-C stops",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
