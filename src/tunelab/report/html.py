"""`tunelab report`: one self-contained HTML page per run, and a page that compares runs.

    RUN/report.html   written by `tunelab eval` (through `write_report`) and by `tunelab report RUN`
    comparison.html   `tunelab report RUN1 RUN2 ...`: the runs side by side, in the current folder
                      (or `--out FILE`); each run's own report.html is rebuilt too, and linked

A run's page shows what the run folder holds (runs.py), each section only when its file is
there: the training and held-out loss curves, the evaluation (metrics with their confidence
intervals, differences between contenders, novelty, answer buckets, cost per request,
assertions, the forgetting check, the copy constraint, and side-by-side answers with their
differences from the reference), the data check and the settings.

The pages are Jinja2 templates (templates/*.html) with autoescape on: every string from a run
folder is escaped by the template, and the only markup built in Python (the SVG plots in
plots.py, the word diff in sections.py) escapes its text itself. Everything is inline: CSS in a
<style> tag, plots as SVG, no script and nothing fetched from the network, so the file can be
mailed or opened offline. torch is not imported: the command starts at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import jinja2

from tunelab.errors import check_not_kernel_folder, check_output_file
from tunelab.files import write_text_atomic
from tunelab.report import plots, sections
from tunelab.report.runs import RunData, read_run
from tunelab.runfolder import REPORT_FILE

COMPARISON_FILE = "comparison.html"
SERIES_COLOURS = ["#1f6fb4", "#d9730d", "#2e8b57", "#b03a8c", "#7a5c2e", "#5b5ea6", "#c0392b", "#17817a"]

SHAPE_NAMES = {"chat": ("conversation", "conversations"), "text": ("raw-text document", "raw-text documents"),
               "pair": ("preference pair", "preference pairs")}
"""What data_check.json's `shapes` count: every row with an answer becomes a conversation (a
prompt and its answer, whatever its keys), raw text stays a document; as `tunelab data check`
says it."""

_environment = jinja2.Environment(loader=jinja2.PackageLoader("tunelab.report", "templates"), autoescape=True,
                                  undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
_environment.globals.update(sections=sections, number=sections.number, word_diff=sections.word_diff)


def write_report(run_folder: Path, out: Path | None = None) -> Path:
    """Write the run's page to RUN/report.html (or `out`) from what the run folder holds; returns
    the path written."""
    run = read_run(run_folder)
    if out:
        check_folder(Path(out))
    path = Path(out) if out else run.path / REPORT_FILE
    write_text_atomic(path, render_run(run))
    return path


def write_comparison(run_folders: list[Path], out: Path) -> Path:
    """Rebuild each run's own page (the comparison links to them), then write the comparison of
    all of them to `out`. Every run is read before anything is written."""
    check_folder(out)
    runs = [read_run(folder) for folder in run_folders]
    for run in runs:
        write_text_atomic(run.path / REPORT_FILE, render_run(run))
    write_text_atomic(out, render_comparison(runs, out))
    return out


def check_folder(path: Path) -> None:
    """Refuse an --out the page cannot be written to (a folder in its place, /proc, a missing or
    read-only folder around it) before anything is written."""
    check_not_kernel_folder(path, "--out")
    check_output_file(path, "--out")


# ---- a run's page -------------------------------------------------------------------------------

def render_run(run: RunData) -> str:
    train, heldout = run.curve("loss"), run.curve("eval_loss")
    series = [s for s in [("training loss", train, SERIES_COLOURS[0], False),
                          ("held-out loss", heldout, SERIES_COLOURS[1], True)] if s[1]]
    last = [f"{label} {points[-1][1]:.4f} at step {points[-1][0]}" for label, points, _, _ in series]
    best = min(heldout, key=lambda p: p[1]) if heldout else None
    loss_note = "; ".join(last) + (f"; lowest held-out loss {best[1]:.4f} at step {best[0]}" if best else "")
    stopping, marks = training_summary(run.info.get("training"), heldout)
    check = run.data_check
    lengths = (check or {}).get("lengths") or {}
    limit = ((check or {}).get("options") or {}).get("max_length") if (check or {}).get("template") else None
    bins = [b for b in lengths.get("histogram") or [] if isinstance(b, list) and len(b) == 3]
    return _environment.get_template("run.html").render(
        run=run, results=run.eval, base=run.info.get("base") or run.config.get("base", "?"),
        method=run.info.get("method") or run.config.get("method", "?"),
        loss_chart=plots.line_chart(series, "step", "loss", marks=marks), loss_note=loss_note, stopping=stopping,
        training_warnings=[w for w in (run.info.get("training") or {}).get("warnings") or [] if isinstance(w, dict)],
        data_check=data_check_rows(check) if check else None, problems=data_check_problems(check or {}),
        histogram=plots.histogram(bins, str(lengths.get("unit") or "length"),
                                  limit if isinstance(limit, int) else None),
        settings=[(str(k), yaml_value(v)) for k, v in run.settings.items()],
        info=info_rows(run.info))


def info_rows(info: dict) -> list[tuple[str, str]]:
    """run.json as (name, value) lines; its `training` record one line per value, its warnings
    left to the banners under the loss plot."""
    rows = []
    for key, value in info.items():
        if key == "training" and isinstance(value, dict):
            rows += [(f"training: {k}", yaml_value(v)) for k, v in value.items() if k != "warnings"]
        else:
            rows.append((str(key), yaml_value(value)))
    return rows


def training_summary(training, heldout: list[tuple[float, float]]) -> tuple[str, list[plots.Mark]]:
    """What run.json says about where training stopped (train/stopping.py), as a sentence, and
    the marks on the loss plot: the step whose weights were saved when it is not the last, and
    where early stopping stopped. Runs from before run.json said it have neither."""
    if not isinstance(training, dict) or not isinstance(training.get("steps"), int):
        return "", []
    steps, saved = training["steps"], training.get("saved_step")
    losses = dict(heldout)
    marks, parts = [], [f"Trained {steps} of {training.get('max_steps', '?')} steps: {training.get('why', '?')}"]
    if isinstance(saved, int) and saved != steps:
        parts.append(f"the saved weights are step {saved}'s, the lowest held-out loss (--keep-best)")
        marks.append(plots.Mark(saved, f"saved: step {saved}", losses.get(saved)))
    if training.get("stopped_early"):
        marks.append(plots.Mark(steps, f"stopped early at step {steps}"))
    return "; ".join(parts), marks


def data_check_rows(check: dict) -> list[tuple[str, str]]:
    """data_check.json as (name, value) lines; the file's sections are optional (older runs)."""
    rows = [("file", str(check.get("file", "?"))),
            ("rows", f"{check.get('rows', '?')} read, {check.get('valid', '?')} valid: {kinds_of_rows(check)}")]
    for kind in ("error", "warning"):
        counts = check.get(f"{kind}_counts") or {}
        listed = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        rows.append((f"{kind}s", f"{sum(counts.values())}" + (f" ({listed})" if listed else "")))
    duplicates = check.get("duplicates") or {}
    if duplicates:
        exact = (duplicates.get("exact") or {}).get("count", 0)
        rows.append(("exact duplicates", f"{exact} (dropped before the split)"))
        rows.append(("near duplicates", f"{(duplicates.get('near') or {}).get('count', 0)} pairs"))
    split = check.get("split") or {}
    if split:
        by = f", by {split['split_by']}" if split.get("split_by") else ""
        rows.append(("split", f"train {split.get('train', '?')} / test {split.get('test', '?')} "
                              f"(test size {split.get('test_size', '?')}, seed {split.get('seed', '?')}{by}), "
                              f"{split.get('leaked_count', 0)} near-duplicate pairs across it"))
    found = check.get("novelty") or {}
    if isinstance(found.get("values"), int) and found["values"] and isinstance(found.get("share"), (int, float)):
        rows.append(("novelty", f"{sections.number(found['share'], 'percent')} of {found['values']} held-out answer "
                                f"values never occur in a training answer; {found.get('novel_rows', '?')} held-out "
                                "rows hold one"))
    lengths = check.get("lengths") or {}
    if "min" in lengths:
        rows.append((f"length ({lengths.get('unit', '')})", f"min {lengths['min']}, median {lengths.get('median')}, "
                                                            f"p95 {lengths.get('p95')}, max {lengths.get('max')}"))
    trainable = check.get("trainable_tokens") or {}
    if "min" in trainable:
        rows.append(("trained tokens", f"min {trainable['min']}, median {trainable.get('median')}, "
                                       f"total {trainable.get('total')}"))
    truncation = check.get("truncation") or {}
    if len(truncation) > 1:
        rows.append(("truncation", ", ".join(f"{k} {v}" for k, v in truncation.items())))
    return rows


def data_check_problems(check: dict) -> list[tuple[str, str, str]]:
    """(line, code, message) of the first ten errors and the first ten warnings."""
    problems = (check.get("errors") or [])[:10] + (check.get("warnings") or [])[:10]
    return [(str(p.get("line")), str(p.get("code")), str(p.get("message", "")))
            for p in problems if isinstance(p, dict)]


def kinds_of_rows(check: dict) -> str:
    shapes = {k: v for k, v in (check.get("shapes") or {}).items() if isinstance(v, int)}
    if not shapes:
        return "none"
    return ", ".join(f"{n} {SHAPE_NAMES[k][n != 1]}" if k in SHAPE_NAMES else f"{n} in the {k} shape"
                     for k, n in sorted(shapes.items()))


def yaml_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ---- several runs side by side ------------------------------------------------------------------

def render_comparison(runs: list[RunData], out: Path) -> str:
    # Runs named alike (a/run, b/run) are shown by the path given.
    labels = [run.name if [r.name for r in runs].count(run.name) == 1 else str(run.path) for run in runs]
    keys = sections.ordered_keys([run.settings for run in runs])
    differing = [k for k in keys if len({yaml_value(run.settings.get(k)) for run in runs}) > 1]
    settings = [sections.Row(k, [sections.Cell(yaml_value(run.settings.get(k))) for run in runs]) for k in differing]
    evaluated_on = [run.evaluated_file() for run in runs]
    if len(set(evaluated_on) - {""}) > 1:  # metrics on different files do not compare
        settings.append(sections.Row("evaluated on", [sections.Cell(data or "–") for data in evaluated_on]))
    numeric = [("held-out loss (end of training)", "number", False,
                [run.curve("eval_loss")[-1][1] if run.curve("eval_loss") else None for run in runs])]
    tuned = [run.eval.tuned_metrics() if run.eval else {} for run in runs]
    for key in sections.ordered_keys(tuned):
        label, kind, higher = sections.metric_label(key)
        numeric.append((f"tuned: {label}", kind, higher, [t[key].value if key in t else None for t in tuned]))
    numeric.append(("examples evaluated", "count", True, [run.eval.examples_evaluated if run.eval else None
                                                           for run in runs]))
    rows = []
    for label, kind, higher, values in numeric:
        winners = sections.best_of(dict(enumerate(values)), higher) if kind != "count" else set()
        rows.append(sections.Row(label, [sections.NA if v is None else
                                         sections.Cell(sections.number(v, kind), style="best" if i in winners else "")
                                         for i, v in enumerate(values)]))
    curves = [(label, run.curve("eval_loss"), SERIES_COLOURS[i % len(SERIES_COLOURS)], False)
              for i, (run, label) in enumerate(zip(runs, labels))]
    return _environment.get_template("comparison.html").render(
        runs=[(label, relative_link(run.path / REPORT_FILE, out)) for run, label in zip(runs, labels)],
        settings=settings, rows=rows,
        shared=[(k, yaml_value(runs[0].settings.get(k))) for k in keys if k not in differing],
        unevaluated=[label for run, label in zip(runs, labels) if not run.eval],
        chart=plots.line_chart([c for c in curves if c[1]], "step", "held-out loss"))


def relative_link(target: Path, page_path: Path) -> str:
    """`target` as a URL relative to the page: percent-encoded, so a folder name can only ever be
    a path (a folder named `javascript:alert(1)` is not a scheme once its colon is encoded)."""
    return quote(Path(os.path.relpath(target.resolve(), page_path.resolve().parent)).as_posix())
