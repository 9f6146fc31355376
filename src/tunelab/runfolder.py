"""The run folder: what training writes and what every later command reads.

    RUN/data_check.json  the data check's report (see datacheck.py), with length_histogram.txt
    RUN/config.yaml      the TrainConfig used
    RUN/run.json         base model location, data file, sizes, the copied fields (copying.py)
    RUN/template.json    the prompt template (name and Jinja source)
    RUN/tokenizer/       the tokenizer
    RUN/split.json       which source lines went to train and test, and which held-out lines
                         --data-extra rows replaced (data/extra.py)
    RUN/train.jsonl, RUN/test.jsonl   the examples of each split, as chat messages with their source
                         line under `metadata` (data files tunelab reads back: eval --data, data check)
    RUN/augmented.jsonl  with --copy-augment: the variants trained besides train.jsonl (augment.py)
    RUN/extra.jsonl      with --data-extra: its rows, trained besides train.jsonl, the extra file's
                         line under `metadata`
    RUN/adapter/ or RUN/model/        LoRA adapter or full weights (safetensors)
    RUN/metrics.jsonl    training and held-out loss per step
    RUN/checkpoints/     step-000010/ ... with --save-every (see checkpoint.py)
    RUN/eval.json        results of `tunelab eval`
    RUN/corrections.jsonl, RUN/fixes.jsonl   the reviewed wrong answers of the held-out split
                         (`tunelab data review --run RUN`, data/corrections.py), and the decisions
                         file they are rebuilt from, RUN/corrections.decisions.jsonl
    RUN/training.lock    while a training writes the folder (runlock.py)

This module knows the layout only; training (train.py), checkpoints (checkpoint.py) and the
`Run` facade (run.py) build on it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tunelab.config import TrainConfig
from tunelab.data import load as data_mod
from tunelab.data.load import Example
from tunelab.errors import UserError, check_not_broken_link
from tunelab.runlock import check_not_training
from tunelab.template import Template

REPORT_FILE = "report.html"
"""The report `tunelab eval` and `tunelab report` write of a run (report/html.py)."""


@dataclass
class RunFiles:
    """The paths of one run folder, and the writes that lay it out."""

    root: Path
    """The run folder itself (`--out`)."""

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info(self) -> Path:
        return self.root / "run.json"

    @property
    def template(self) -> Path:
        return self.root / "template.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def split(self) -> Path:
        return self.root / "split.json"

    @property
    def train(self) -> Path:
        return self.root / "train.jsonl"

    @property
    def test(self) -> Path:
        return self.root / "test.jsonl"

    @property
    def augmented(self) -> Path:
        return self.root / "augmented.jsonl"

    @property
    def extra(self) -> Path:
        return self.root / "extra.jsonl"

    @property
    def corrections(self) -> Path:
        return self.root / "corrections.jsonl"

    @property
    def fixes(self) -> Path:
        return self.root / "fixes.jsonl"

    @property
    def review_decisions(self) -> Path:
        return self.root / "corrections.decisions.jsonl"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    def create(self, config: TrainConfig, template: Template, base_path: Path, train: list[Example],
               test: list[Example], dropped: list[int], trained_pieces: int, augmented: Sequence[Example] = (),
               copied_fields: Sequence[str] = (), fingerprint: dict | None = None, extra: Sequence[Example] = (),
               replaced: Sequence[tuple[int, int]] = (), compute: dict | None = None) -> None:
        """Write what a run starts with: config, template, tokenizer, the split and its examples.
        `train` and `test` are the two sides of the split; train.jsonl leaves out the `dropped`
        lines (over --max-length), which are not trained; `trained_pieces` counts what the trained
        examples became after encoding (a raw document may be cut into several); `augmented`, the
        variants copy augmentation added, each with its original's line; `copied_fields`, the
        answer fields that decoding keeps copies of the input (the data check found them);
        `fingerprint`, the hashes of the data and options trained on (checkpoint.fingerprint), by
        which `--resume` tells a finished run from one to continue; `extra`, the --data-extra rows
        trained besides the split, and `replaced`, the (held-out line, extra line) pairs whose
        held-out row left the split for an extra row with its prompt (data/extra.py); `compute`,
        what trained it ({"device": ..., "threads": ...})."""
        self.root.mkdir(parents=True, exist_ok=True)
        config.save(self.config)
        template.save(self.template)
        template.tokenizer.save_pretrained(self.tokenizer)
        left_out = set(dropped)
        data_mod.write_jsonl(self.train, [e for e in train if e.line not in left_out])
        data_mod.write_jsonl(self.test, test)
        if augmented:
            data_mod.write_jsonl(self.augmented, augmented)
        if config.data_extra:
            data_mod.write_jsonl(self.extra, extra)
        self.split.write_text(json.dumps({
            "test_size": config.test_size, "seed": config.seed, "split_by": config.split_by,
            "train_lines": [e.line for e in train], "test_lines": [e.line for e in test],
            "replaced_by_extra": [list(pair) for pair in replaced],
        }))
        self.info.write_text(json.dumps({
            "base": config.base, "base_path": str(Path(base_path).resolve()),
            "method": config.method, "train_examples": trained_pieces, "test_examples": len(test),
            "objective": config.objective, **({"beta": config.beta} if config.objective != "sft" else {}),
            "augmented_examples": len(augmented), "extra_examples": len(extra), "data_extra": config.data_extra,
            "copied_fields": list(copied_fields),
            **({"fingerprint": fingerprint} if fingerprint else {}), **(compute or {}),
        }, indent=2))

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self.metrics)

    def save_weights(self, model, method: str, state_dict: dict | None = None) -> None:
        target = self.adapter if method == "lora" else self.model
        model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)

    def damaged(self, path: Path, problem: str) -> UserError:
        """The error for a file of this run that is cut short or damaged: train the run again."""
        return UserError(f"{path}: {problem}; the file is cut short or damaged: train the run again with "
                         f"`tunelab train DATA --out {self.root} --overwrite`")

    def check(self) -> None:
        """Refuse (UserError) what is not a finished run folder, or one a training is writing now."""
        if self.root.is_file():
            raise UserError(f"{self.root}: is a file, not a run folder; pass the folder given to `tunelab train --out`")
        if not self.root.is_dir():
            check_not_broken_link(self.root)
            raise UserError(f"{self.root}: no such run folder; train one with `tunelab train DATA --out {self.root}`")
        if not self.config.exists() or not self.template.exists():
            raise UserError(f"{self.root}: not a tunelab run folder (no config.yaml); train one with `tunelab train`")
        missing = [p.name for p in (self.info, self.tokenizer) if not p.exists()]
        if missing:
            raise UserError(f"{self.root}: incomplete run folder (no {', '.join(missing)}); train it again with "
                            "`tunelab train DATA --out RUN --overwrite`")
        check_not_training(self.root)
        if not (self.adapter.exists() or self.model.exists()):
            resumable = self.checkpoints.exists()
            hint = (f"; once it has stopped, `tunelab train DATA --out {self.root} --resume` continues it"
                    if resumable else "")
            raise UserError(f"{self.root}: the run has no trained weights yet (training is still going or stopped "
                            f"before the end{hint})")


@dataclass
class MetricsWriter:
    """Appends one JSON row per line to metrics.jsonl, flushed at once so a killed run keeps them."""

    path: Path
    file: TextIO = field(init=False)
    """The open metrics file, appended to."""

    def __post_init__(self) -> None:
        self.file = Path(self.path).open("a", encoding="utf-8")  # noqa: SIM115 - open until close()

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
