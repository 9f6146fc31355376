"""`tunelab curve`: what would more data buy? Train on growing nested subsets and measure each.

    DIR/n100/, DIR/n200/, ...   one ordinary run folder per size (see iterate/runs.py)
    DIR/curve.json              the metrics per size and the forecast (`CurveResults`)
    DIR/curve.html              the curve as a plot, the table and the forecast in words
    DIR/comparison.html         the runs side by side (`tunelab report`'s comparison)

Every size is the same data split: the held-out rows are those `tunelab train` holds out of the
whole file, and a size of N trains on the first N training examples in an order drawn from
--seed (`--train-examples`, train/loop.py), so each size holds every smaller one. What changes
from one size to the next is only the amount of training data (and, with --epochs, the number
of steps; --max-steps trains every size for the same steps).

The forecast (iterate/forecast.py) fits a saturating curve, score = ceiling - b * n^-c, to
four sizes or more (score = a + b * ln n to two or three) and says what doubling the largest size
is likely to add, with a 95% interval from resampling the held-out rows, or that the curve has
flattened and the data, not its amount, is the problem, or that the score is at 99% or more and
the task is solved.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from tunelab.config import TrainConfig
from tunelab.errors import UserError, check_output_folder
from tunelab.evaluate.results import EvalResults, Interval
from tunelab.files import write_text_atomic
from tunelab.iterate.forecast import Forecast, forecast
from tunelab.iterate.runs import check_data, heldout_lines, train_and_evaluate, tuned_scores

MIN_SIZE = 8
"""Fewer training examples than this are refused: one micro-batch at the default --batch-size,
and too few for a fine-tune to say anything about the next size."""
FORECAST_METRICS = ("exact_match", "token_f1")
"""The metrics forecast: those scored per held-out row."""
TABLE = [("exact match", "exact_match"), ("token F1", "token_f1"), ("field accuracy", "field_accuracy"),
         ("valid JSON", "valid_json"), ("assertions passed", "assertions_passed"), ("held-out loss", "heldout_loss")]
"""The columns of the table, each shown when some size has it."""


class Point(BaseModel):
    """One size of the curve."""

    examples: int
    """Training examples (the first N of the training split in the seeded order)."""
    run: str
    """The run folder."""
    metrics: dict[str, Interval]
    """The tuned model's metrics, as in the run's eval.json."""


class CurveResults(BaseModel):
    """DIR/curve.json."""

    data: str
    heldout_examples: int
    training_split: int
    """Examples in the training split, the most a size can take."""
    points: list[Point]
    forecasts: list[Forecast]


def parse_sizes(text: str) -> list[int]:
    """"100,200,400" as ascending distinct sizes; anything else is one line."""
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--sizes {text}: give whole numbers separated by commas, e.g. 100,200,400") from None
    if not sizes:
        raise UserError("--sizes: give at least one size, e.g. 100,200,400")
    return sizes


def run_curve(data: Path, sizes: list[int], out: Path, config: TrainConfig,
              assertions: Path | None = None) -> CurveResults:
    """Train and evaluate every size not yet done in `out` (see runs.py), then write curve.json,
    curve.html and comparison.html there."""
    from tunelab.train.loop import prepare

    check_output_folder(out, "--out")
    if config.train_examples is not None:
        raise UserError("--train-examples: `tunelab curve` sets it for each size; give the sizes with --sizes")
    small = [n for n in sizes if n < MIN_SIZE]
    if small:
        raise UserError(f"--sizes: {small[0]} is too few examples to train on; the smallest size is {MIN_SIZE}")
    check_data(data, [config])
    # The split, as training makes it, before any training: a size it cannot hold fails now.
    available = len(prepare(config, data, show=False).train)
    large = [n for n in sizes if n > available]
    if large:
        raise UserError(f"--sizes: {large[0]} is more than the {available} examples of {data}'s training split "
                        f"(the rest is held out, --test-size {config.test_size:g}); the largest size is {available}")
    points, scores, lines = [], {}, None
    for n in sizes:
        folder = out / f"n{n}"
        sized = TrainConfig.build(**{**config.to_dict(), "train_examples": n})
        train_and_evaluate(sized, data, folder, assertions)
        results = EvalResults.read(folder / "eval.json")
        if lines is None:
            lines = heldout_lines(results)
        elif heldout_lines(results) != lines:  # the same split by construction; an edited eval.json is not
            raise UserError(f"{folder / 'eval.json'}: measured on other held-out rows than {out / f'n{sizes[0]}'}; "
                            "delete it and run the command again")
        points.append(Point(examples=n, run=str(folder), metrics=results.tuned_metrics()))
        scores[n] = {m: tuned_scores(results, m) for m in FORECAST_METRICS}
    forecasts = [forecast(sizes, np.array([scores[n][m] for n in sizes]), m, points[-1].run) for m in FORECAST_METRICS]
    curve = CurveResults(data=str(data), heldout_examples=len(lines or []), training_split=available, points=points,
                         forecasts=[f for f in forecasts if f])
    write_text_atomic(out / "curve.json", curve.model_dump_json(indent=2))
    write_pages(curve, out)
    return curve


def format_table(curve: CurveResults) -> str:
    """The sizes as rows, each metric with its 95% interval."""
    columns = [(label, key) for label, key in TABLE if any(key in p.metrics for p in curve.points)]
    header = ["examples", *(label for label, _ in columns)]
    rows = [[str(p.examples), *(cell(p.metrics.get(key), key) for _, key in columns)] for p in curve.points]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def cell(entry: Interval | None, key: str) -> str:
    if entry is None:
        return "-"
    if key == "heldout_loss":
        return f"{entry.value:.3f}"
    if entry.low is None or entry.high is None or math.isnan(entry.low):
        return f"{entry.value:.0%}"
    return f"{entry.value:.0%} ({entry.low:.0%}-{entry.high:.0%})"


def format_curve(curve: CurveResults) -> str:
    """What `tunelab curve` prints."""
    lines = [f"{curve.heldout_examples} held-out examples, the same for every size; the training split has "
             f"{curve.training_split}", "", format_table(curve)]
    if curve.forecasts:
        lines += ["", *(f"- {f.words}" for f in curve.forecasts)]
    return "\n".join(lines)


def write_pages(curve: CurveResults, out: Path) -> None:
    """curve.html (the plot, the table, the forecast) and comparison.html (the runs side by side)."""
    import jinja2

    from tunelab.report import plots
    from tunelab.report.html import COMPARISON_FILE, REPORT_FILE, SERIES_COLOURS, relative_link, write_comparison

    write_comparison([Path(p.run) for p in curve.points], out / COMPARISON_FILE)
    series: list[plots.Series] = []
    for i, (label, key) in enumerate(TABLE[:2]):
        measured = [(float(p.examples), p.metrics[key]) for p in curve.points if key in p.metrics]
        if not measured:
            continue
        series.append((label, [(x, 100 * m.value) for x, m in measured], SERIES_COLOURS[i], True))
        ends = [(x, m.low, m.high) for x, m in measured if m.low is not None and m.high is not None]
        if ends:  # the interval as one outline: along the low ends, back along the high ones
            band = [(x, 100 * low) for x, low, _ in ends] + [(x, 100 * high) for x, _, high in reversed(ends)]
            series.append((f"{label}, 95% interval", band + band[:1], SERIES_COLOURS[i] + "66", False))
    chart = plots.line_chart(series, "training examples", "% of held-out rows")
    environment = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.PackageLoader("tunelab.iterate", "templates"),
                                    jinja2.PackageLoader("tunelab.report", "templates")]),
        autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    columns = [(label, key) for label, key in TABLE if any(key in p.metrics for p in curve.points)]
    rows = [(p.examples, relative_link(Path(p.run) / REPORT_FILE, out / "curve.html"),
             [cell(p.metrics.get(key), key) for _, key in columns]) for p in curve.points]
    page = environment.get_template("curve.html").render(
        curve=curve, chart=chart, columns=[label for label, _ in columns], rows=rows, comparison=COMPARISON_FILE)
    write_text_atomic(out / "curve.html", page)
