"""One run of a curve or a sweep: trained in its own folder (or continued, or reused), then
evaluated once, by the same `train` and `evaluate` as `tunelab train` and `tunelab eval`.

A curve or sweep folder holds ordinary run folders, so every command reads them (`tunelab eval`,
`report`, `chat`), and running the command again continues where it stopped:
- a run whose weights are saved, trained to its end on the same data and options, is reused as
  it is, even when it kept checkpoints (`--save-every`): `train --resume` would continue from the
  newest one and train again the steps after it, new weights that would need evaluating again;
- a run stopped before its end continues from its newest checkpoint (`--save-every N`), or
  starts again when it has none;
- a run's eval.json is reused when the run was not trained again (delete it to evaluate again).
Only the tuned model answers (no baselines, no forgetting check): a curve or sweep compares
runs with each other, not with the base model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.config import TrainConfig
from tunelab.errors import UserError
from tunelab.evaluate.results import EvalResults
from tunelab.runfolder import RunFiles


def train_and_evaluate(config: TrainConfig, data: Path, folder: Path, assertions: Path | None) -> str:
    """Make `folder` a finished, evaluated run of `config` on `data`; returns what it took:
    "reused" (trained and evaluated before), "evaluated" (trained before) or "trained"."""
    from tunelab.run import Run
    from tunelab.train.loop import finished, train

    files = RunFiles(folder)
    done = files.config.exists() and (ran_to_its_end(config, data, files)
                                      or finished(config, data, folder) is not None)
    try:
        if not done:
            print(f"Training {folder}", file=sys.stderr)
            train(config, data, folder, resume=files.config.exists())
            files.eval.unlink(missing_ok=True)  # measured on weights that are no more
        if files.eval.exists():
            return "reused"
        Run(folder).evaluate(include_base=False, forgetting=None, assertions=assertions)
    except KeyboardInterrupt:
        # train's own line names a `tunelab train --resume`; the user ran a curve or a sweep.
        print(f"tunelab: interrupted in {folder}: the runs finished before it are kept; run the same command "
              "again to go on (this run from its newest checkpoint, if it has one)", file=sys.stderr)
        raise
    return "evaluated" if done else "trained"


def check_data(data: Path, configs: list[TrainConfig]) -> None:
    """The data file and every --data-extra file exist and are files, checked before the first
    run: a finished run's fingerprint reads them, and a missing one would be a traceback there
    (or, caught, a run "trained on other data"). One line, as `tunelab train` says it."""
    from tunelab.data.load import check_data_file

    check_data_file(data)
    for extra in dict.fromkeys(config.data_extra for config in configs if config.data_extra):
        check_data_file(Path(extra))


def ran_to_its_end(config: TrainConfig, data: Path, files: RunFiles) -> bool:
    """Whether the run's weights are saved and its run.json records the end of its training (written
    after the weights), trained on `data` with `config`; other data or options are refused, with
    the command's advice (not train's --overwrite: here the folder is the curve's or the sweep's).
    A run without that record was stopped, in training or while its weights were being saved; it
    is trained again, or resumed from its checkpoints (train --resume, checkpoint.finished_run)."""
    from tunelab.train.checkpoint import Checkpoints

    if not (files.adapter.exists() or files.model.exists()):
        return False
    try:
        info = json.loads(files.info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or "training" not in info or "fingerprint" not in info:
        return False
    changes = Checkpoints(files.root, config, data).changes(info)
    if changes:
        raise UserError(f"{files.root}: trained on other data or options than these; run the command again with "
                        "the same data and flags, or choose another --out", changes)
    return True


def tuned_scores(results: EvalResults, metric: str) -> list[float]:
    """The tuned model's score on each evaluated row (exact_match, token_f1 or rouge_l), in order."""
    return [float(getattr(sample.answers["tuned"], metric) or 0.0) for sample in results.samples]


def heldout_lines(results: EvalResults) -> list[int | None]:
    return [sample.line for sample in results.samples]
