"""The typed options of every command, and the configuration of a fine-tuning run.

Each `tunelab` command takes one options model (a subclass of `Options`); its flags are built
from the model's fields (cli.py), so a default, a choice or a bound is written once, here or
beside the command, and each field's docstring is the flag's `--help` line. `DataOptions` says
how a data file is read, split and encoded; `tunelab data check` takes exactly these.
`TrainConfig` adds the model and training options. YAML files (`--config`) and command-line
flags fill the same model, flags winning; pydantic validates and coerces the values (`lr: 1e-3`,
a string to PyYAML, becomes 0.001), and every value it refuses becomes one line naming the
option, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator
from pydantic_core import ErrorDetails

from tunelab.data.load import METADATA_KEYS, SHAPE_KEYS, SHAPES
from tunelab.errors import UserError, check_not_broken_link
from tunelab.files import write_text_atomic
from tunelab.template import NAMED

# The allowed values of each choice, written here once; the CLI's choices come from these.
Format = Literal[("auto", *SHAPES)]  # type: ignore[valid-type]  # built at run time: Any to mypy
TemplateName = Literal[("auto", *NAMED)]  # type: ignore[valid-type]
Truncation = Literal["drop", "truncate", "error"]
Method = Literal["lora", "full"]
Objective = Literal["sft", "dpo", "orpo"]
Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["auto", "cuda", "mps", "cpu"]


@dataclass(frozen=True)
class Arg:
    """How a field is written on the command line where its name and type do not say it
    (`Annotated[str, Arg(positional=True)]`). A list is repeatable as a flag, one or more
    values as a positional argument. `flag=False`: not on the command line at all, a value only
    the Python caller sets (the folder `tunelab ui` runs its jobs in)."""

    positional: bool = False
    metavar: str | None = None
    flag: bool = True


# Options several commands share, each described once.
RunFolder = Annotated[str, Arg(positional=True), Field(description="run folder")]


class Options(BaseModel):
    """A command's options: validated as a whole, each refused value one line naming its flag."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False,
                              validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info) -> Any:
        # pydantic would read `epochs: true` as 1; a yes/no where a number belongs is a mistake.
        kind = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {kind, *typing.get_args(kind)}:
            raise ValueError("must be a number, not true or false")
        return value

    @classmethod
    def build(cls, source: str | None = None, flags: Collection[str] = (), **values: Any) -> Self:
        """Validate `values` (field names); a refused value is a UserError naming it by where it
        came from: `flags` (field names given as command-line flags), else the YAML file
        `source`, else a Python argument."""
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            lines = [cls._explain(error, source, flags) for error in e.errors()]
            raise UserError(lines[0], lines[1:]) from None

    @classmethod
    def _explain(cls, error: ErrorDetails, source: str | None, flags: Collection[str]) -> str:
        key = str(error["loc"][0]) if error["loc"] else ""
        value = error["input"]
        where = f"{source}: " if source and key not in flags else ""
        if error["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"{where}unknown option '{key}'{hint}; the options are listed by `tunelab train --help`"
        if error["type"] in ("int_parsing", "int_type", "int_from_float"):
            allowed = "must be a whole number"
        elif error["type"] in ("float_parsing", "float_type"):
            allowed = "must be a number"
        elif error["type"] in ("bool_type", "bool_parsing"):
            allowed = "must be true or false (without quotes)"
        elif error["type"] == "string_too_short":
            allowed = "must not be empty"
        else:
            allowed = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
        if key in flags:
            return f"--{key.replace('_', '-')} {value}: {allowed}"
        if source:
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
            return f"{source}: {key}: {shown} {allowed}"
        return f"{key}={value!r}: {allowed}"


class ComputeOptions(Options):
    """What every command that runs a model computes with: train, eval, generate, chat, serve, demo."""

    threads: Annotated[int | None, Arg(metavar="N")] = Field(None, ge=1)
    """CPU threads torch computes with (default: the cores that other programs leave free, measured at the start)"""


class GenerationOptions(ComputeOptions):
    """How a command that answers with a run's model generates: eval, generate, chat and serve."""

    no_copy_constraint: bool = False
    """let answers hold any value in the fields, and any name in plain-text answers, that the training data copies
    from the input (by default such values stay substrings of the input, and such names words of it; the data
    check lists them)"""
    precision: Precision | None = None
    """arithmetic of generation: bf16 (matmuls in bf16, as in mixed-precision training; generation about 2x faster
    on CPUs with AVX512-BF16) or fp32; auto picks bf16 where the hardware computes it natively (default: the run's
    --precision setting)"""
    device: Device = "auto"
    """where the model runs: auto picks a CUDA GPU, then Apple's GPU (mps), then the CPU"""


class EndpointAccess(Options):
    """How a model behind an OpenAI-compatible endpoint is reached: --allow-remote, and where
    the API key comes from (never a flag's value, which the shell history and `ps` would show)."""

    allow_remote: bool = False
    """allow an endpoint outside this machine and its private network (your data leaves home)"""
    api_key_env: Annotated[str | None, Arg(metavar="NAME")] = None
    """environment variable holding the API key, sent as 'Authorization: Bearer' (default: TUNELAB_API_KEY, else
    OPENAI_API_KEY, if set)"""
    api_key_file: Annotated[str | None, Arg(metavar="FILE")] = None
    """file holding the API key"""


class TeacherOptions(EndpointAccess):
    """How `tunelab data label` and `data synth` reach and prompt the teacher."""

    teacher: Annotated[str, Arg(metavar="URL")]
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (loopback or private addresses only,
    unless --allow-remote)"""
    model: Annotated[str, Arg(metavar="NAME")]
    """model name sent to the teacher"""
    system: Annotated[str | None, Arg(metavar="TEXT")] = None
    """system prompt for the teacher"""
    json_schema: Annotated[str | None, Arg(metavar="FILE")] = None
    """JSON schema every answer must match (asked as structured output, checked locally)"""
    concurrency: Annotated[int, Arg(metavar="N")] = Field(4, ge=1)
    """requests in flight"""
    timeout: Annotated[float, Arg(metavar="SECONDS")] = Field(120.0, gt=0)
    """seconds to wait for one answer before retrying"""
    retries: Annotated[int, Arg(metavar="N")] = Field(5, ge=0)
    """retries of a request on 429, 5xx, timeouts"""
    out: Annotated[str, Arg(metavar="FILE")]
    """training file to write (.jsonl)"""


class DataOptions(Options):
    """How a data file is read, split and encoded: shared by `tunelab data check` and training."""

    format: Format = "auto"
    """Shape of the data rows; 'auto' detects it from the keys ('text': raw documents)."""
    template: TemplateName = "auto"
    """Prompt template: 'auto' is the model's own chat template (alpaca when it has none)."""
    test_size: float = 0.1
    """Held-out fraction in [0, 1), or a whole count >= 1, of examples."""
    split_by: str | None = None
    """Split by this field of the rows, so that no value of it is on both sides (held-out data
    that looks like the future): a key of the row such as 'id', or of its metadata, written
    'metadata.customer'. --test-size then applies to rows, met as nearly as whole groups allow."""
    seed: int = Field(0, ge=0)
    """Seed for the split, data order and initialisation."""
    max_length: int = Field(1024, ge=8)
    """Longest example in tokens; longer ones are handled by --truncation."""
    truncation: Truncation = "drop"
    """What to do with examples longer than --max-length: drop them, cut them, or stop."""
    train_on_prompt: StrictBool = False
    """Also train on the prompt tokens, not only the response tokens."""
    data_extra: Annotated[str | None, Arg(metavar="FILE")] = None
    """Rows trained besides the training split and never held out, e.g. a run's corrections.jsonl
    (`tunelab data review --run RUN`); a held-out row with the prompt of an extra row leaves the
    held-out split, so that no answer is both trained and tested (W_EXTRA_HELD_OUT)."""

    @field_validator("test_size")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        # 1.5 used to be read as a count of 1; it is more likely a mistyped fraction.
        if value < 0 or (value >= 1 and not value.is_integer()):
            raise ValueError("must be a fraction in [0, 1) or a whole count >= 1")
        return value

    @field_validator("split_by")
    @classmethod
    def _a_field_of_the_rows(cls, value: str | None) -> str | None:
        if value is None:
            return value
        keys = [*dict.fromkeys(k for keys in SHAPE_KEYS.values() for k in keys), *METADATA_KEYS]
        first, *rest = value.split(".")
        if not all(value.split(".")) or first not in keys:
            close = difflib.get_close_matches(value, keys, n=1)
            hint = f"'{close[0]}', " if close and close[0] != "metadata" else ""
            raise ValueError(f"must be a field of the rows: {hint}'id', or a key of their metadata written "
                             f"'metadata.{value.split('.')[-1] or 'KEY'}'")
        if first == "metadata" and not rest:
            raise ValueError("must name a key of the metadata, e.g. 'metadata.customer'")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


class TrainConfig(DataOptions):
    """Every option of a fine-tuning run, as saved in RUN/config.yaml."""

    base: str = "smollm2-135m"
    """Base model: 'smollm2-135m', a local Hugging Face folder or a .gguf file."""
    method: Method = "lora"
    """Fine-tune LoRA adapters or all weights."""
    objective: Objective = "sft"
    """What is trained: 'sft' learns the answers (of a preference row, the chosen one); 'dpo' and 'orpo' learn
    to prefer each chosen answer over its rejected one (rows with 'chosen' and 'rejected'; docs/TRAINING.md):
    dpo against the base model (LoRA only: the base is the adapter switched off), orpo with no reference."""
    beta: float = Field(0.1, gt=0)
    """With --objective dpo: how far from the base model the preferences may pull (DPO's beta); with orpo:
    the weight of the preference term beside the chosen answers' loss (ORPO's lambda)."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training split (ignored when --max-steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(8, gt=0)
    """Examples per micro-batch (packed into one padding-free row)."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate (default 1e-3 for LoRA, 1e-4 for full fine-tuning)."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Fraction of steps spent warming the learning rate up from zero."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip gradients to this global norm (0 turns clipping off)."""
    lora_rank: int = Field(16, gt=0)
    """LoRA rank r."""
    lora_alpha: int = Field(32, gt=0)
    """LoRA scaling alpha."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA path."""
    lora_targets: str = "all-linear"
    """Comma-separated module names to adapt, or 'all-linear'."""
    train_examples: int | None = Field(None, ge=1)
    """Train on only the first N examples of the training split, in an order drawn from --seed
    (the held-out split unchanged), so that runs with growing N train on nested sets (`tunelab curve`)."""
    copy_augment: float = Field(0.0, ge=0, le=16)
    """Variants added per training example whose answer copies names from its input, with those
    names made up anew, so that copying fits and reciting memorised names does not (0: off; 0.5:
    every other such example)."""
    eval_every: int | None = Field(None, gt=0)
    """Held-out loss every N optimizer steps (default: 4 times a run, 10 with --early-stopping or --keep-best)."""
    eval_examples: int = Field(64, gt=0)
    """Held-out examples used for the loss during training."""
    early_stopping: Annotated[int | None, Arg(metavar="PATIENCE")] = Field(None, gt=0)
    """Stop training when the held-out loss has not improved for this many evaluations in a row
    (needs held-out data; without --eval-every, the held-out loss is then measured 10 times a run)."""
    keep_best: StrictBool = False
    """Save the weights of the step with the lowest held-out loss instead of the last step's
    (kept on disk in RUN/best while training, not in memory)."""
    save_every: int | None = Field(None, gt=0)
    """Save a checkpoint (RUN/checkpoints) every N optimizer steps; see --resume."""
    keep: int = Field(2, gt=0)
    """Checkpoints kept: the last N, plus the one with the lowest held-out loss."""
    gradient_checkpointing: StrictBool = False
    """Recompute activations in the backward pass: less memory for long examples, about 1/3 more compute."""
    precision: Precision = "auto"
    """Matmul precision: bf16 autocast (trained weights and optimizer stay fp32, LoRA holds the frozen
    linear layers in bf16) or fp32; 'auto' picks bf16
    where the hardware computes it natively (recent NVIDIA GPUs, CPUs with AVX512-BF16 or AMX), else fp32."""
    compile: StrictBool = False
    """torch.compile the model: slow first steps, then faster on GPUs (not on CPU)."""

    @field_validator("method", mode="before")
    @classmethod
    def _not_an_objective(cls, value: Any) -> Any:
        # The method is what is trained (adapters or all weights); DPO and ORPO are what it learns.
        if value in typing.get_args(Objective):
            raise ValueError(f"must be 'lora' or 'full'; for preference tuning pass --objective {value}")
        return value

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.method == "lora" else 1e-4)

    def save(self, path: Path) -> None:
        # Written beside and renamed: `tunelab train --resume` reads it back after a crash.
        write_text_atomic(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: Path, **flags: Any) -> TrainConfig:
        """Read a YAML file of TrainConfig fields; `flags` (values given on the command line)
        win over it."""
        return cls.build(source=str(path), flags=flags, **{**read_yaml(Path(path)), **flags})


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file, with `max-steps` spelt `max_steps`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        check_not_broken_link(path)
        raise UserError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; pass a YAML config file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values, such as `lr: 0.001`")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
