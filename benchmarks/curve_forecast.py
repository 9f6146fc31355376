"""Does `tunelab curve`'s forecast predict a size it has not seen? Fit the first sizes of a
finished curve, predict the last one, and compare with what the last one measured.

    PYTHONPATH=src python benchmarks/curve_forecast.py runs/bookings-curve
    PYTHONPATH=src python benchmarks/curve_forecast.py runs/bookings-curve --first 3 --metric exact_match

For each metric and each number of first sizes (`--first`, by default every one from 3 to all
but the last), it fits the model `tunelab curve` would fit to them (iterate/forecast.py: the
log curve to 3 sizes, the saturating curve to 4 or more) and prints the predicted mean score
at the last size with its 95% interval, the measured score with its own, and measured minus
predicted with a 95% interval that resamples the held-out rows of every size together (paired,
as the forecast does): an interval of the error that covers 0 means the prediction held.
Scores are read from each size's eval.json (the tuned model's answers, row by row); a curve
stopped before its end (no curve.json) is read from its evaluated DIR/nN folders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from tunelab.evaluate.results import EvalResults  # noqa: E402
from tunelab.iterate.curve import FORECAST_METRICS, CurveResults  # noqa: E402
from tunelab.iterate.forecast import METRIC_NAMES, check_prediction  # noqa: E402
from tunelab.iterate.runs import tuned_scores  # noqa: E402


def run_folder(curve_dir: Path, recorded: str) -> Path:
    """A point's run folder: as recorded (relative to where the curve ran), else by its name in the curve folder."""
    return Path(recorded) if (Path(recorded) / "eval.json").exists() else curve_dir / Path(recorded).name


def evaluated_sizes(curve_dir: Path) -> tuple[str, list[int], list[EvalResults]]:
    """The data file, the sizes and their eval.json: those curve.json lists, or, for a curve
    stopped before its end (no curve.json yet), every evaluated DIR/nN."""
    if (curve_dir / "curve.json").exists():
        curve = CurveResults.model_validate_json((curve_dir / "curve.json").read_text())
        return (curve.data, [p.examples for p in curve.points],
                [EvalResults.read(run_folder(curve_dir, p.run) / "eval.json") for p in curve.points])
    sizes = sorted(int(f.parent.name[1:]) for f in curve_dir.glob("n*/eval.json") if f.parent.name[1:].isdigit())
    return str(curve_dir), sizes, [EvalResults.read(curve_dir / f"n{n}" / "eval.json") for n in sizes]


def report(curve_dir: Path, firsts: list[int] | None, metrics: list[str]) -> str:
    data, sizes, results = evaluated_sizes(curve_dir)
    if len(sizes) < 3:
        raise SystemExit(f"{curve_dir}: {len(sizes)} sizes; a prediction needs 2 to fit and 1 to check")
    firsts = firsts or list(range(3, len(sizes))) or [2]
    if not all(2 <= first < len(sizes) for first in firsts):
        raise SystemExit(f"--first: between 2 and {len(sizes) - 1} (the sizes before the last)")
    lines = [f"{data}: sizes {', '.join(map(str, sizes))}; {len(results[0].samples)} held-out rows", "",
             f"{'metric':<12} {'fitted on':<16} {'model':<11} {'predicted at ' + str(sizes[-1]):<22} "
             f"{'measured':<22} measured - predicted"]

    def cell(value: float, low: float, high: float, sign: str = "") -> str:
        return f"{value * 100:{sign}.1f} ({low * 100:{sign}.1f} to {high * 100:{sign}.1f})"

    for metric in metrics:
        scores = np.array([tuned_scores(r, metric) for r in results])
        for first in firsts:
            p = check_prediction(sizes, scores, first)
            lines.append(f"{METRIC_NAMES.get(metric, metric):<12} {','.join(map(str, p.fitted_on)):<16} "
                         f"{p.model:<11} {cell(p.predicted, p.predicted_low, p.predicted_high):<22} "
                         f"{cell(p.measured, p.measured_low, p.measured_high):<22} "
                         f"{cell(p.error, p.error_low, p.error_high, '+')} points")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curve", type=Path, help="a finished `tunelab curve` folder (holding curve.json)")
    parser.add_argument("--first", type=int, action="append",
                        help="fit this many first sizes (repeatable; default: 3 up to all but the last)")
    parser.add_argument("--metric", action="append", choices=FORECAST_METRICS,
                        help="default: " + ", ".join(FORECAST_METRICS))
    args = parser.parse_args()
    print(report(args.curve, args.first, args.metric or list(FORECAST_METRICS)))


if __name__ == "__main__":
    main()
