"""The typed configuration of a fine-tuning run.

YAML files (`--config`) and command-line flags fill the same `TrainConfig`; flags win.
Each field's `help` is what `tunelab train --help` prints.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.errors import UserError


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class TrainConfig:
    base: str = _opt("smollm2-135m", "Base model: 'smollm2-135m', a local Hugging Face folder or a .gguf file.")
    method: Literal["lora", "full"] = _opt("lora", "Fine-tune LoRA adapters or all weights.")
    format: Literal["auto", "messages", "prompt_completion", "alpaca", "text"] = _opt(
        "auto", "Shape of the data rows; 'auto' detects it from the keys ('text': raw documents)."
    )
    template: str = _opt("auto", "Prompt template: 'auto' (the model's own chat template), 'chatml', 'alpaca' or 'plain'.")
    epochs: float = _opt(1.0, "Passes over the training split (ignored when --max-steps is set).")
    max_steps: int | None = _opt(None, "Stop after this many optimizer steps.")
    batch_size: int = _opt(8, "Examples per micro-batch (packed into one padding-free row).")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step.")
    lr: float | None = _opt(None, "Peak learning rate (default 1e-3 for LoRA, 1e-4 for full fine-tuning).")
    warmup_ratio: float = _opt(0.05, "Fraction of steps spent warming the learning rate up from zero.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip gradients to this global norm (0 turns clipping off).")
    seed: int = _opt(0, "Seed for the split, data order and initialisation.")
    max_length: int = _opt(1024, "Longest example in tokens; longer ones are handled by --truncation.")
    truncation: Literal["drop", "truncate", "error"] = _opt(
        "drop", "What to do with examples longer than --max-length: drop them, cut them, or stop."
    )
    test_size: float = _opt(0.1, "Held-out fraction (0-1) or count (>=1) of examples.")
    lora_rank: int = _opt(16, "LoRA rank r.")
    lora_alpha: int = _opt(32, "LoRA scaling alpha.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA path.")
    lora_targets: str = _opt("all-linear", "Comma-separated module names to adapt, or 'all-linear'.")
    eval_every: int | None = _opt(None, "Held-out loss every N optimizer steps (default: 4 times a run).")
    eval_examples: int = _opt(64, "Held-out examples used for the loss during training.")
    train_on_prompt: bool = _opt(False, "Also train on prompt tokens (default: response tokens only).")
    save_every: int | None = _opt(None, "Save a checkpoint (RUN/checkpoints) every N optimizer steps; see --resume.")
    keep: int = _opt(2, "Checkpoints kept: the last N, plus the one with the lowest held-out loss.")
    gradient_checkpointing: bool = _opt(
        False, "Recompute activations in the backward pass: less memory for long examples, about 1/3 more compute."
    )
    precision: Literal["auto", "fp32", "bf16"] = _opt(
        "auto", "Matmul precision: bf16 autocast (weights and optimizer stay fp32) or fp32; 'auto' picks bf16 "
        "where the hardware computes it natively (recent NVIDIA GPUs, CPUs with AVX512-BF16 or AMX), else fp32."
    )
    compile: bool = _opt(False, "torch.compile the model: slow first steps, then faster on GPUs (not on CPU).")

    def __post_init__(self) -> None:
        checks = [
            (self.epochs > 0, "--epochs must be positive"),
            (self.max_steps is None or self.max_steps > 0, "--max-steps must be positive"),
            (self.batch_size > 0, "--batch-size must be positive"),
            (self.grad_accum > 0, "--grad-accum must be positive"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (self.max_length >= 8, "--max-length must be at least 8"),
            (self.test_size >= 0, "--test-size must be a fraction in [0, 1) or a count"),
            (self.lora_rank > 0, "--lora-rank must be positive"),
            (self.save_every is None or self.save_every > 0, "--save-every must be positive"),
            (self.keep > 0, "--keep must be at least 1"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.method in ("lora", "full"), "--method must be 'lora' or 'full'"),
            (self.precision in ("auto", "fp32", "bf16"), "--precision must be auto, fp32 or bf16"),
            (self.truncation in ("drop", "truncate", "error"), "--truncation must be drop, truncate or error"),
            (self.format in ("auto", "messages", "prompt_completion", "alpaca", "text"),
             "--format must be auto, messages, prompt_completion, alpaca or text"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 1e-4)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        # Written beside and renamed: `tunelab train --resume` reads it back after a crash.
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        os.replace(staging, path)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        """Read a YAML file of TrainConfig fields; `overrides` (from flags) win."""
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise UserError(f"{path}: config file not found") from None
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of option names to values")
        return cls.build(**{**{k.replace("-", "_"): v for k, v in data.items()}, **overrides}, source=str(path))

    @classmethod
    def build(cls, source: str = "options", **values: Any) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{source}: unknown option(s) {', '.join(unknown)}; see `tunelab train --help`")
        return cls(**values)
