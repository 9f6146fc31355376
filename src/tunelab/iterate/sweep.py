"""`tunelab sweep`: which training settings win, and is the lead real?

    DIR/lr=0.001,lora_rank=8/, ...   one ordinary run folder per combination (see iterate/runs.py),
                                     named from its settings as the grid gives them
    DIR/sweep.json                   every combination's metrics, the winner and its lead (`SweepResults`)
    DIR/comparison.html              the runs side by side (`tunelab report`'s comparison)

Every combination of the --grid values runs one after the other, each with the other flags as
given, and is evaluated on the same held-out rows (the split depends on the data, --seed,
--test-size and --split-by, which a grid may not sweep). Every key and value is checked through
TrainConfig before anything runs. The winner has the best mean --metric on the
held-out rows, held-out loss breaking a tie; its lead over the runner-up gets a paired bootstrap
interval over those rows' scores (metrics.bootstrap_interval on the per-row differences): a lead
whose interval covers 0 is "not distinguishable". With --budget-minutes, no run starts once the
budget is spent; those not run are listed.
"""

from __future__ import annotations

import difflib
import itertools
import re
import time
from pathlib import Path

from pydantic import BaseModel

from tunelab.config import TrainConfig, read_yaml
from tunelab.errors import UserError, check_output_folder
from tunelab.evaluate import metrics
from tunelab.evaluate.results import EvalResults, Interval
from tunelab.files import write_text_atomic
from tunelab.iterate.runs import check_data, heldout_lines, train_and_evaluate, tuned_scores

SPLIT_KEYS = ("seed", "test_size", "split_by")
"""Options that decide the held-out split: a sweep over them would compare runs on different rows."""
METRICS = ("exact_match", "token_f1", "rouge_l")
"""What a sweep can rank by: the metrics scored per held-out row."""
TIE = 1e-9
"""Mean scores closer than this are a tie (the ranking and the verdict alike): far below what one
held-out row changes, far above a float's rounding in a sum of scores."""


class Combination(BaseModel):
    """One run of the sweep."""

    name: str
    """Its folder's name."""
    settings: dict[str, str]
    """The grid's values, as given."""
    run: str
    status: str
    """"trained", "evaluated" (trained before), "reused" (trained and evaluated before) or "skipped"
    (not started: the budget was spent)."""
    metrics: dict[str, Interval] = {}
    """The tuned model's metrics, as in the run's eval.json."""


class Lead(BaseModel):
    """The winner minus the runner-up on the metric, paired per held-out row."""

    difference: float
    low: float
    high: float
    distinguishable: bool
    """False when the 95% interval covers 0."""


class SweepResults(BaseModel):
    """DIR/sweep.json."""

    data: str
    grid: dict[str, list[str]]
    metric: str
    runs: list[Combination]
    winner: str | None
    runner_up: str | None
    lead: Lead | None
    verdict: str


def parse_grid(items: list[str], given: dict) -> dict[str, list[str]]:
    """`["lr=3e-4,1e-3", "lora-rank=8,32"]` as {"lr": ["3e-4", "1e-3"], "lora_rank": ["8", "32"]};
    a key TrainConfig does not have is refused with the closest one it does."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        listed = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key or not listed:
            raise UserError(f"--grid {item}: write KEY=VALUE,VALUE,..., e.g. --grid lr=3e-4,1e-3")
        if key not in TrainConfig.model_fields:
            close = difflib.get_close_matches(key, list(TrainConfig.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"--grid {item}: '{key}' is not a training option{hint}; the options are listed by "
                            "`tunelab train --help`")
        if key in grid:
            raise UserError(f"--grid {item}: '{key}' is already in the grid; give all its values in one --grid")
        if key in given:
            raise UserError(f"--grid {item}: --{key.replace('_', '-')} is also given as a flag; keep one of them")
        if key in SPLIT_KEYS:
            raise UserError(f"--grid {item}: --{key.replace('_', '-')} changes the held-out split, so the runs would "
                            "not be measured on the same rows; run one sweep per value")
        if key == "train_examples":
            raise UserError(f"--grid {item}: to vary the amount of data, use `tunelab curve DATA --sizes ...`")
        if len(set(listed)) != len(listed):
            raise UserError(f"--grid {item}: a value is repeated")
        grid[key] = listed
    return grid


def folder_name(settings: dict[str, str]) -> str:
    """`lr=0.001,lora_rank=8`: the settings, with any character a path would misread replaced."""
    return ",".join(f"{key}={re.sub(r'[^A-Za-z0-9.+-]', '-', value)}" for key, value in settings.items())


def plan(grid: dict[str, list[str]], given: dict, config_file: Path | None = None
         ) -> list[tuple[dict[str, str], TrainConfig]]:
    """Every combination with its validated TrainConfig: the YAML `config_file`'s options, then
    the flags `given`, then the grid's values, each overriding the one before (as flags override
    `tunelab train --config`); a bad value is one line naming it and where it came from."""
    from_file = read_yaml(config_file) if config_file else {}
    source = str(config_file) if config_file else None
    combinations = []
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values))
        # The grid's values are named as flags are: "--lr abc: must be a number".
        combinations.append((settings, TrainConfig.build(source=source, flags=[*given, *settings],
                                                         **{**from_file, **given, **settings})))
    return combinations


def run_sweep(data: Path, grid: dict[str, list[str]], given: dict, out: Path, metric: str = "exact_match",
              budget_minutes: float | None = None, assertions: Path | None = None,
              config_file: Path | None = None) -> SweepResults:
    """Run (or reuse) every combination in `out`, then write sweep.json and comparison.html.
    `config_file` is a YAML file of training options under the flags `given` (see `plan`)."""
    from tunelab.report.html import COMPARISON_FILE, write_comparison

    check_output_folder(out, "--out")
    combinations = plan(grid, given, config_file)
    check_data(data, [config for _, config in combinations])
    started = time.monotonic()
    runs, scores, lines = [], {}, None
    for settings, config in combinations:
        name = folder_name(settings)
        folder = out / name
        spent = (time.monotonic() - started) / 60
        if budget_minutes is not None and spent >= budget_minutes and not (folder / "eval.json").exists():
            runs.append(Combination(name=name, settings=settings, run=str(folder), status="skipped"))
            continue
        status = train_and_evaluate(config, data, folder, assertions)
        results = EvalResults.read(folder / "eval.json")
        if lines is not None and heldout_lines(results) != lines:
            raise UserError(f"{folder}: evaluated on other held-out rows than the runs before it; delete its "
                            "eval.json and run the command again")
        lines = heldout_lines(results)
        scores[name] = (tuned_scores(results, metric), results.tuned_metrics())
        runs.append(Combination(name=name, settings=settings, run=str(folder), status=status,
                                metrics=results.tuned_metrics()))
    winner, runner_up, lead = rank(scores)
    sweep = SweepResults(data=str(data), grid=grid, metric=metric, runs=runs, winner=winner, runner_up=runner_up,
                         lead=lead, verdict="")
    sweep.verdict = verdict(sweep, scores, len(lines or []))
    write_text_atomic(out / "sweep.json", sweep.model_dump_json(indent=2))
    evaluated = [Path(c.run) for c in runs if c.status != "skipped"]
    if evaluated:
        write_comparison(evaluated, out / COMPARISON_FILE)
    return sweep


def rank(scores: dict) -> tuple[str | None, str | None, Lead | None]:
    """The winner, the runner-up and the winner's lead, from each run's (per-row scores, metrics).
    Means within TIE of the best of their group are a tie, ordered by held-out loss: an exact sort
    would let the last bits of a float (the same scores summed in another order) choose."""
    ranked: list[str] = []
    group: list[str] = []
    for name in sorted(scores, key=lambda n: -mean(scores[n][0])):
        if group and mean(scores[group[0]][0]) - mean(scores[name][0]) >= TIE:
            ranked += sorted(group, key=lambda n: loss(scores[n][1]))
            group = []
        group.append(name)
    ranked += sorted(group, key=lambda n: loss(scores[n][1]))
    winner, runner_up = (ranked + [None, None])[:2]
    lead = None
    if winner and runner_up:
        diffs = [w - r for w, r in zip(scores[winner][0], scores[runner_up][0])]
        low, high = metrics.bootstrap_interval(diffs)
        lead = Lead(difference=mean(diffs), low=low, high=high, distinguishable=low > 0 or high < 0)
    return winner, runner_up, lead


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def loss(found: dict[str, Interval]) -> float:
    return found["heldout_loss"].value if "heldout_loss" in found else float("inf")


def verdict(sweep: SweepResults, scores: dict, rows: int) -> str:
    """The winner and whether its lead is real, in words."""
    name = sweep.metric.replace("_", " ").replace("token f1", "token F1")
    if not sweep.winner:
        return "no run finished within the budget"
    won = f"winner: {sweep.winner}, {name} {mean(scores[sweep.winner][0]):.0%}"
    if not sweep.runner_up or not sweep.lead:
        return won + " (the only run evaluated)"
    second = f"runner-up {sweep.runner_up}, {mean(scores[sweep.runner_up][0]):.0%}"
    lead = sweep.lead
    interval = (f"{lead.difference * 100:+.0f} points (95% paired bootstrap interval {lead.low * 100:+.0f} to "
                f"{lead.high * 100:+.0f} over {rows} held-out rows)")
    if abs(lead.difference) < TIE:
        first, other = loss(scores[sweep.winner][1]), loss(scores[sweep.runner_up][1])
        tie = f"ahead on held-out loss only ({first:.3f} vs {other:.3f}), which has no per-row interval"
        if lead.low == lead.high == 0:  # the same answer right and wrong on every row
            return f"{won}; tied on {name} with the {second}: {tie}: not distinguishable on {name}"
        return (f"{won}; {second}; tied on {name} (95% paired bootstrap interval of the difference "
                f"{lead.low * 100:+.0f} to {lead.high * 100:+.0f} points over {rows} held-out rows): {tie}: "
                f"not distinguishable on {name}")
    if lead.distinguishable:
        return f"{won}; {second}; the lead is {interval}: a real lead"
    return f"{won}; {second}; the lead is {interval}: not distinguishable, the interval covers 0"


def format_sweep(sweep: SweepResults) -> str:
    """What `tunelab sweep` prints: one line per run, then the verdict and what was skipped."""
    keys = ["exact_match", "token_f1", "heldout_loss"]
    header = ["run", "exact match", "token F1", "held-out loss", "status"]
    rows = []
    for c in sweep.runs:
        cells = []
        for key in keys:
            found = c.metrics.get(key)
            cells.append("-" if found is None else f"{found.value:.3f}" if key == "heldout_loss" else
                         f"{found.value:.0%}" + (f" ({found.low:.0%}-{found.high:.0%})" if found.low is not None
                                                 else ""))
        rows.append([c.name, *cells, c.status])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                      for r in [header, *rows])
    skipped = [c.name for c in sweep.runs if c.status == "skipped"]
    lines = [table, "", sweep.verdict]
    if skipped:
        lines.append(f"skipped (--budget-minutes spent; run the command again with a larger budget to run them): "
                     f"{', '.join(skipped)}")
    return "\n".join(lines)
