"""The run folder: what training writes and what every later command reads.

    RUN/data_check.json  the data check's report (see datacheck.py), with length_histogram.txt
    RUN/config.yaml      the TrainConfig used
    RUN/run.json         base model location, data file, sizes
    RUN/template.json    the prompt template (name and Jinja source)
    RUN/tokenizer/       the tokenizer
    RUN/split.json       which source lines went to train and test
    RUN/train.jsonl, RUN/test.jsonl   the examples of each split, as chat messages
    RUN/adapter/ or RUN/model/        LoRA adapter or full weights (safetensors)
    RUN/metrics.jsonl    training and held-out loss per step
    RUN/checkpoints/     step-000010/ ... with --save-every (see checkpoint.py)
    RUN/eval.json        results of `tunelab eval`
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab import data as data_mod
from tunelab.errors import UserError


class RunFiles:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.info = self.root / "run.json"
        self.template = self.root / "template.json"
        self.tokenizer = self.root / "tokenizer"
        self.split = self.root / "split.json"
        self.train = self.root / "train.jsonl"
        self.test = self.root / "test.jsonl"
        self.adapter = self.root / "adapter"
        self.model = self.root / "model"
        self.metrics = self.root / "metrics.jsonl"
        self.eval = self.root / "eval.json"

    def create(self, config, prepared) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config.save(self.config)
        prepared.template.save(self.template)
        prepared.tokenizer.save_pretrained(self.tokenizer)
        data_mod.write_jsonl(self.train, prepared.train)
        data_mod.write_jsonl(self.test, prepared.test)
        self.split.write_text(json.dumps({
            "test_size": config.test_size, "seed": config.seed,
            "train_lines": [e.line for e in prepared.train], "test_lines": [e.line for e in prepared.test],
        }))
        self.info.write_text(json.dumps({
            "base": config.base, "base_path": str(Path(prepared.base_path).resolve()),
            "method": config.method, "train_examples": len(prepared.train_encoded),
            "test_examples": len(prepared.test),
        }, indent=2))

    def metrics_writer(self) -> MetricsWriter:
        return MetricsWriter(self.metrics)

    def save_weights(self, model, method: str, state_dict: dict | None = None) -> None:
        target = self.adapter if method == "lora" else self.model
        model.save_pretrained(target, safe_serialization=True, state_dict=state_dict)

    def check(self) -> None:
        if not self.config.exists() or not self.template.exists():
            raise UserError(f"{self.root}: not a tunelab run folder (no config.yaml); train one with `tunelab train`")
        if not (self.adapter.exists() or self.model.exists()):
            resumable = (self.root / "checkpoints").exists()
            hint = "; continue it with `tunelab train DATA --out RUN --resume`" if resumable else ""
            raise UserError(f"{self.root}: the run has no trained weights yet (training did not finish{hint})")


class MetricsWriter:
    def __init__(self, path: Path):
        self.file = Path(path).open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Run:
    """A finished training run: its config, template and tokenizer, and the models on demand.

    >>> run = tunelab.load("runs/bookings")
    >>> run.generate("Extract the booking ...")
    """

    def __init__(self, path: Path | str):
        from tunelab.config import TrainConfig
        from tunelab.models import load_tokenizer
        from tunelab.template import Template

        self.files = RunFiles(Path(path))
        self.files.check()
        self.config = TrainConfig.from_yaml(self.files.config)
        self.info = json.loads(self.files.info.read_text())
        self.tokenizer = load_tokenizer(self.files.tokenizer)
        self.template = Template.load(self.files.template, self.tokenizer)
        self._tuned = None

    @property
    def path(self) -> Path:
        return self.files.root

    def base_path(self) -> Path:
        from tunelab.models import resolve_base

        saved = Path(self.info["base_path"])
        return saved if (saved / "config.json").exists() else resolve_base(self.info["base"])

    def base_model(self):
        from tunelab.models import load_model

        return load_model(self.base_path()).eval()

    def model(self):
        """The fine-tuned model, LoRA adapters merged for speed; loaded once."""
        if self._tuned is None:
            from tunelab.models import load_model

            if self.files.adapter.exists():
                from peft import PeftModel

                model = PeftModel.from_pretrained(load_model(self.base_path()), str(self.files.adapter))
                model = model.merge_and_unload()
            else:
                model = load_model(self.files.model)
            self._tuned = model.eval()
        return self._tuned

    def generate(self, prompt: str | list[dict[str, str]], max_new_tokens: int = 256) -> str:
        """Answer one prompt (a user message, or a whole conversation) with the tuned model."""
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens)[0]

    def generate_batch(self, prompts: list, max_new_tokens: int = 256) -> list[str]:
        from tunelab.generate import as_messages, generate_batch

        return generate_batch(self.model(), self.template, [as_messages(p) for p in prompts], max_new_tokens)

    def evaluate(self, limit: int | None = None, **kwargs) -> dict:
        from tunelab.evaluate import evaluate

        return evaluate(self, limit=limit, **kwargs)
