"""When to stop: early stopping on the held-out loss, the best weights kept, overfitting named.

Training measures the held-out loss every --eval-every steps and at the last step (loop.py);
`Watch` follows those evaluations (the extra ones a checkpoint save takes are not counted, so
--save-every, which may change on resume, never changes where a run stops):
- the lowest held-out loss so far and its step. Step 0, the model before training, counts: a run
  whose held-out loss only rises keeps the untrained weights under --keep-best.
- with --early-stopping N, the evaluations since the loss last went below that lowest; at N,
  training stops. The learning-rate schedule stays the one planned for the whole run.
- W_OVERFITTING, once a run: the held-out loss more than OVERFIT_MARGIN above its lowest for
  OVERFIT_EVALS evaluations in a row, while the training loss (its mean over the steps since the
  previous evaluation) is below its mean when the held-out loss was lowest. Both conditions: a
  held-out loss that rises with the training loss is divergence (too high a learning rate), not
  overfitting; one evaluation above the margin is noise.
Its state is plain values saved in each checkpoint's checkpoint.json, so a resumed run continues
with the same counter and the same best so far, and ends as an uninterrupted one.

--keep-best writes the weights to RUN/best/step-N/ whenever the held-out loss improves, on disk
rather than as a second copy in memory (a full fine-tune would hold the model twice), and the
final save moves them to RUN/adapter or RUN/model. Besides the newest, the best of the newest
checkpoint stays on disk, so a resume from that checkpoint finds its best weights whatever the
resumed steps measure.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.data.load import Problem
from tunelab.errors import UserError
from tunelab.files import write_text_atomic
from tunelab.runfolder import RunFiles

EVALS_PER_RUN = 10
"""Held-out evaluations in a run with --early-stopping or --keep-best and no --eval-every: four
(the default otherwise) leave a patience of 3 nothing to act on, and ten cost about a tenth of the
run's time with the default 64 held-out examples."""
OVERFIT_MARGIN = 0.02
"""How far (relative) the held-out loss must rise above its lowest to count as rising."""
OVERFIT_EVALS = 2
"""Evaluations in a row that must show it before W_OVERFITTING is printed."""
BEST = "best"


def refuse_without_heldout(config, heldout: int | None = None) -> None:
    """--early-stopping and --keep-best judge by the held-out loss: refuse them (one line) when
    there is none to measure, `heldout` being the count of held-out examples once encoded."""
    asked = [f"--early-stopping {config.early_stopping}"] if config.early_stopping else []
    asked += ["--keep-best"] if config.keep_best else []
    if not asked:
        return
    if config.test_size == 0:
        why = "--test-size 0 holds none out"
    elif heldout == 0:
        why = f"every held-out example is longer than --max-length {config.max_length}"
    else:
        return
    raise UserError(f"{' and '.join(asked)}: {'needs' if len(asked) == 1 else 'need'} held-out data to measure, "
                    f"and {why}; pass --test-size 0.1 (or a count of examples), or drop "
                    f"{' and '.join(a.split()[0] for a in asked)}")


def eval_every(config, total_steps: int) -> tuple[int, str | None]:
    """Steps between held-out evaluations, and a note when the default was chosen for
    --early-stopping or --keep-best (the user did not set it, and it decides when they act), or
    when --early-stopping can never act, its patience over the run's evaluations."""
    watching = config.early_stopping or config.keep_best
    every = config.eval_every or max(1, total_steps // (EVALS_PER_RUN if watching else 4))
    evaluations = total_steps // every
    if config.early_stopping and config.early_stopping > evaluations:
        return every, (f"tunelab: note: --early-stopping {config.early_stopping} cannot stop this run: it measures the "
                       f"held-out loss {evaluations} times after the start (every {every} of {total_steps} steps); "
                       "lower the patience or --eval-every")
    if watching and not config.eval_every:
        return every, f"held-out loss every {every} steps ({evaluations} times in {total_steps}; --eval-every sets it)"
    return every, None


@dataclass
class Watch:
    """The held-out evaluations of a run so far, as plain values (saved in checkpoints)."""

    patience: int | None = None
    """--early-stopping: evaluations without improvement that stop training."""
    step: int = 0
    """The last optimizer step trained."""
    best_step: int | None = None
    best_loss: float | None = None
    since_best: int = 0
    """Evaluations since the lowest held-out loss."""
    stopped_at: int | None = None
    """The step where early stopping stopped training."""
    train_sum: float = 0.0
    train_count: int = 0
    """Training losses since the previous evaluation (their mean is the training loss there)."""
    train_at_best: float | None = None
    """The training loss at the evaluation of the lowest held-out loss (at the first one after it
    when the lowest is step 0's, before any training)."""
    rising: int = 0
    """Evaluations in a row above the lowest by the margin while the training loss is below."""
    warnings: list[dict] = field(default_factory=list)
    """{"code", "step", "message"} of each warning, for run.json."""

    @classmethod
    def resumed(cls, patience: int | None, saved: dict | None) -> Watch:
        return cls(**{**(saved or {}), "patience": patience})

    def to_dict(self) -> dict:
        return asdict(self)

    def trained(self, step: int, loss: float) -> None:
        self.step = step
        self.train_sum += loss
        self.train_count += 1

    def observe(self, step: int, loss: float, where: Path) -> tuple[bool, str | None]:
        """Take the held-out loss at `step`: (whether it is the lowest so far, the W_OVERFITTING
        line when it is first seen, as the data check prints a warning about `where`)."""
        train = self.train_sum / self.train_count if self.train_count else None
        self.train_sum, self.train_count = 0.0, 0
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best, self.train_at_best, self.rising = step, loss, 0, train, 0
            return True, None
        self.since_best += 1
        if self.train_at_best is None:
            self.train_at_best = train
        elif loss > self.best_loss * (1 + OVERFIT_MARGIN) and train is not None and train < self.train_at_best:
            self.rising += 1
        else:
            self.rising = 0
        if self.patience and self.since_best >= self.patience:
            self.stopped_at = step
        if self.rising < OVERFIT_EVALS or any(w["code"] == "W_OVERFITTING" for w in self.warnings):
            return False, None
        message = (f"at step {step}: held-out loss {loss:.4f} has stayed more than {OVERFIT_MARGIN:.0%} above its "
                   f"lowest ({self.best_loss:.4f} at step {self.best_step}) for {self.rising} evaluations while the "
                   f"training loss fell from {self.train_at_best:.4f} to {train:.4f}: the model learns its training "
                   f"examples rather than the task; --keep-best saves step {self.best_step}'s weights, "
                   "--early-stopping N stops sooner, a lower --lr or fewer --epochs train less, more data helps")
        self.warnings.append({"code": "W_OVERFITTING", "step": step, "message": message})
        return False, Problem(0, "W_OVERFITTING", message).format(where)

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def stop_line(self) -> str:
        return (f"step {self.stopped_at}: held-out loss has not gone below {self.best_loss:.4f} (step "
                f"{self.best_step}) for {self.since_best} evaluations; stopping early "
                f"(--early-stopping {self.patience})")

    def summary(self, max_steps: int, saved_step: int) -> dict:
        """What run.json says about where training stopped and why."""
        if self.stopped:
            why = (f"early stopping: held-out loss did not improve for {self.since_best} evaluations "
                   f"(--early-stopping {self.patience})")
        else:
            why = f"reached the last step ({max_steps})"
        return {"steps": self.step, "max_steps": max_steps, "stopped_early": self.stopped, "why": why,
                "best_step": self.best_step,
                "best_eval_loss": None if self.best_loss is None else round(self.best_loss, 5),
                "saved_step": saved_step, "warnings": self.warnings}


class BestWeights:
    """RUN/best/step-N/: the weights of the lowest held-out loss, written beside and renamed."""

    def __init__(self, run: Path):
        self.root = Path(run) / BEST
        self.pinned: int | None = None
        """The best step of the newest checkpoint: kept until a newer checkpoint is saved."""

    def folder(self, step: int) -> Path:
        return self.root / f"step-{step:06d}"

    def start(self, resumed_best: int | None) -> None:
        """A new run keeps none; a resumed one only its checkpoint's best (a later one is from the
        steps being trained again, and is written again if they reach it)."""
        self.pinned = resumed_best
        self.prune(set() if resumed_best is None else {resumed_best})

    def save(self, step: int, model, method: str, state_dict: dict | None) -> None:
        staging, target = self.root / f".step-{step:06d}-{os.getpid()}", self.folder(step)
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            RunFiles(staging).save_weights(model, method, state_dict)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except OSError as e:  # a full disk, a quota: the user's to fix, as for a checkpoint
            shutil.rmtree(staging, ignore_errors=True)
            free = shutil.disk_usage(self.root.parent).free / 2**20
            raise UserError(f"{target}: cannot write the best weights ({e.strerror or e}; {free:.0f} MiB free); "
                            "free some space and continue with --resume, or train without --keep-best") from None
        self.prune({step} | ({self.pinned} if self.pinned is not None else set()))

    def prune(self, keep: set[int]) -> None:
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name.startswith(".") or path not in {self.folder(step) for step in keep}:
                shutil.rmtree(path, ignore_errors=True)

    def publish(self, step: int, files: RunFiles, method: str) -> None:
        """Make step `step`'s weights the run's own (RUN/adapter or RUN/model), by renaming."""
        name = "adapter" if method == "lora" else "model"
        source, target = self.folder(step) / name, files.adapter if method == "lora" else files.model
        if not source.is_dir():
            raise RuntimeError(f"{source}: the best weights are missing")
        if target.exists():
            shutil.rmtree(target)
        os.replace(source, target)
        shutil.rmtree(self.root)


def record(files: RunFiles, summary: dict) -> None:
    """Add where training stopped to run.json (written at the start, read by the report)."""
    info = json.loads(files.info.read_text(encoding="utf-8"))
    write_text_atomic(files.info, json.dumps({**info, "training": summary}, indent=2))
