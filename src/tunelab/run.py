"""`Run`: a finished training run as the Python API, evaluation and generation use it. Its
folder's layout is in runfolder.py."""

from __future__ import annotations

import json
import typing
from pathlib import Path

from tunelab.errors import known_warnings_hidden
from tunelab.runfolder import RunFiles

if typing.TYPE_CHECKING:
    from tunelab.evaluate.results import EvalResults


class Run:
    """A finished training run: its config, template and tokenizer, and the models on demand.

    >>> run = tunelab.load("runs/bookings")
    >>> run.generate("Extract the booking ...")
    """

    def __init__(self, path: Path | str, precision: str | None = None, device: str = "auto",
                 threads: int | None = None):
        """`precision` is the arithmetic of generation and evaluation ("auto", "bf16" or "fp32",
        as `device.autocast` reads it); by default the run's own --precision setting. `device`
        ("auto", "cuda", "mps" or "cpu") is where the models answer (`device.inference_device`).
        `threads`: torch's CPU threads in this process (`device.configure_threads`; by default
        the cores other programs leave free)."""
        from tunelab.config import Precision, TrainConfig
        from tunelab.device import configure_threads, inference_device
        from tunelab.errors import UserError
        from tunelab.models import load_tokenizer
        from tunelab.template import Template

        if precision is not None and precision not in typing.get_args(Precision):
            raise UserError(f"precision {precision!r}: choose one of {', '.join(typing.get_args(Precision))}")
        self.files = RunFiles(Path(path))
        self.files.check()
        self.check_weights()
        self.config = TrainConfig.from_yaml(self.files.config)
        try:
            self.info = json.loads(self.files.info.read_text(encoding="utf-8"))
        except ValueError as e:
            raise self.files.damaged(self.files.info, f"not valid JSON ({_first_line(e)})") from None
        self.tokenizer = load_tokenizer(self.files.tokenizer)
        self.template = Template.load(self.files.template, self.tokenizer)
        self.precision = precision or self.config.precision
        self.device = inference_device(device)
        self.threads = configure_threads(threads)
        self._tuned = None
        self._house_words: frozenset[str] | None = None

    @property
    def path(self) -> Path:
        return self.files.root

    def base_path(self) -> Path:
        from tunelab.models import resolve_base

        saved = Path(self.info["base_path"])
        return saved if (saved / "config.json").exists() else resolve_base(self.info["base"])

    def base_model(self):
        from tunelab.models import for_inference, load_model

        return for_inference(load_model(self.base_path())).to(self.device)

    def model(self):
        """The fine-tuned model, LoRA adapters merged for speed, on `self.device`; loaded once."""
        if self._tuned is None:
            from tunelab.models import check_weight_files, for_inference, load_model

            if self.files.adapter.exists():
                from peft import PeftModel
                from safetensors import SafetensorError

                base = load_model(self.base_path())
                try:
                    with known_warnings_hidden():
                        model = PeftModel.from_pretrained(base, str(self.files.adapter))
                except SafetensorError:
                    check_weight_files(self.files.adapter, self.retrain)  # names the file
                    raise
                model = model.merge_and_unload()
            else:
                model = load_model(self.files.model, fix=self.retrain)
            self._tuned = for_inference(model).to(self.device)
        return self._tuned

    @property
    def retrain(self) -> str:
        """What to do about damaged weights of this run."""
        return f"train the run again with `tunelab train DATA --out {self.path} --overwrite`"

    def check_weights(self) -> None:
        """Refuse weights cut short or damaged before any long work (models.check_weight_files)."""
        from tunelab.models import check_weight_files

        check_weight_files(self.files.adapter if self.files.adapter.exists() else self.files.model, self.retrain)

    @property
    def copied_fields(self) -> list[str]:
        """Answer fields the training data copies from the input (copying.py); older runs have none."""
        return self.info.get("copied_fields", [])

    def copy_rule(self, enabled: bool = True):
        """The copy constraint for this run's answers, or None when it has no copied fields or
        `enabled` is False (`--no-copy-constraint`)."""
        if not enabled or not self.copied_fields:
            return None
        from tunelab.data.copied import TEXT_ANSWER, house_words
        from tunelab.data.load import read_jsonl
        from tunelab.decoding.copying import CopyRule

        fields = frozenset(self.copied_fields)
        if TEXT_ANSWER in fields and self._house_words is None:
            # Plain-text answers may also write the house style's own words: found again in the
            # training rows (once a Run), as the data check found them.
            self._house_words = house_words(e.messages for e in read_jsonl(self.files.train))
        return CopyRule(self.tokenizer, fields, frozenset(self.template.stop_token_ids),
                        self._house_words or frozenset())

    def generate(self, prompt: str | list[dict[str, str]], max_new_tokens: int = 256,
                 copy_constraint: bool = True) -> str:
        """Answer one prompt (a user message, or a whole conversation) with the tuned model;
        `copy_constraint=False` lets copied fields be anything the model writes."""
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens, copy_constraint=copy_constraint)[0]

    def generate_batch(self, prompts: list, max_new_tokens: int = 256, copy_constraint: bool = True) -> list[str]:
        from tunelab.decoding.generate import as_messages, generate_batch

        return generate_batch(self.model(), self.template, [as_messages(p) for p in prompts], max_new_tokens,
                              copying=self.copy_rule(copy_constraint), precision=self.precision)

    def evaluate(self, limit: int | None = None, **kwargs) -> EvalResults:
        """Every contender on the run's held-out split (keywords as `evaluate.core.evaluate` takes
        them); saved in RUN/eval.json and returned typed (`.model_dump()` gives the dict)."""
        from tunelab.evaluate.core import evaluate

        return evaluate(self, limit=limit, **kwargs)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
