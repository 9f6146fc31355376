"""A run folder read for the report: each file once, typed where tunelab has a model for it.

    config.yaml       the settings, shown as written (a run made by an older tunelab still shows)
    run.json          base model, method, sizes
    metrics.jsonl     training loss per step, held-out loss at intervals
    data_check.json   the data check
    eval.json         `EvalResults` (evaluate/results.py), either shape of the file

A missing file leaves its part empty; a damaged one is a one-line error naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tunelab.errors import UserError, check_not_broken_link
from tunelab.evaluate.results import EvalResults
from tunelab.runlock import check_not_training


@dataclass
class RunData:
    """What a run folder holds; each part is None or empty when its file is missing."""

    path: Path
    """The run folder."""
    config: dict
    """config.yaml as written."""
    info: dict
    """run.json."""
    steps: list[dict]
    """The rows of metrics.jsonl."""
    data_check: dict | None
    """data_check.json."""
    eval: EvalResults | None
    """eval.json."""

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def settings(self) -> dict:
        """config.yaml with `lr: null` replaced by the learning rate training used (the default
        for the method), so the page shows the number rather than null."""
        if "lr" not in self.config or self.config["lr"] is not None:
            return self.config
        from tunelab.config import TrainConfig

        method = self.config.get("method")
        default = TrainConfig.model_construct(**({"method": method} if method in ("lora", "full") else {}))
        return {**self.config, "lr": f"{default.learning_rate:g} (default for {default.method})"}

    def curve(self, key: str) -> list[tuple[float, float]]:
        """(step, value) of one metrics.jsonl column; a resumed run may repeat steps, and the
        last row written for a step wins."""
        points = {row["step"]: row[key] for row in self.steps
                  if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool)}
        return sorted(points.items())

    def evaluated_file(self) -> str:
        """The file eval.json was measured on: "held-out split" for the run's own test.jsonl, ""
        when not evaluated."""
        if not self.eval:
            return ""
        data = self.eval.data or ""
        # eval.json names the run folder as it was given then, and its split inside it.
        own = [str(Path(self.eval.run or self.path) / "test.jsonl"), str((self.path / "test.jsonl").resolve())]
        return "held-out split" if not data or data in own else data


def read_run(folder: Path) -> RunData:
    folder = Path(folder)
    config_file = folder / "config.yaml"
    if not folder.is_dir() or not config_file.exists():
        check_not_broken_link(folder)
        raise UserError(f"{folder}: not a tunelab run folder (no config.yaml); train one with `tunelab train`")
    check_not_training(folder)
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    results = folder / "eval.json"
    return RunData(path=folder, config=config if isinstance(config, dict) else {},
                   info=read_json(folder / "run.json", RETRAIN) or {}, steps=read_jsonl(folder / "metrics.jsonl"),
                   data_check=read_json(folder / "data_check.json", "run `tunelab data check DATA --out RUN` to "
                                                                    "rewrite it"),
                   eval=EvalResults.read(results) if results.exists() else None)


RETRAIN = "the run is damaged: train it again with `tunelab train DATA --out RUN --overwrite`"


def read_json(path: Path, fix: str) -> dict | None:
    """A JSON file of the run, or None if it has none; a damaged one is refused with `fix`."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so the file is damaged; rewrite it with the command that made it") \
            from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}; the file is cut short or damaged); "
                        f"{fix}") from None
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    if not path.exists():
        return rows
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text, so the file is damaged; train the run again") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything else is damage.
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not valid JSON; the file is damaged") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows
