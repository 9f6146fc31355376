"""tunelab: fine-tune small language models locally, privately and fast.

    import tunelab
    run = tunelab.finetune("data.jsonl")          # LoRA on smollm2-135m by default
    run.evaluate()                                 # tuned vs base zero-shot, few-shot, retrieval
    run.generate("Extract the booking ...")
"""

from __future__ import annotations

import os

# Private by construction: the libraries tunelab builds on look models up on their hub and send
# telemetry unless told not to, and read these variables when they are first imported. Setting
# them here, before any of them is imported, covers the CLI and the Python API alike; a value
# the user set stays.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
for _name, _value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(_name, _value)

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.run import Run

__version__ = "0.1.0"
__all__ = ["finetune", "load"]


def finetune(data: str | Path, out: str | Path | None = None, overwrite: bool = False, resume: bool = False,
             threads: int | None = None, **options: Any) -> Run:
    """Fine-tune on `data` (JSONL, CSV or Parquet); `options` are TrainConfig fields
    (base, method, epochs, lr, save_every, ...). `resume` continues the run in `out` from its
    newest checkpoint, with the same options; `threads`, torch's CPU threads (by default the
    cores other programs leave free). Returns the finished run."""
    from tunelab.config import TrainConfig
    from tunelab.run import Run
    from tunelab.train.loop import default_out, train

    config = TrainConfig.build(**options)
    out = Path(out) if out else default_out(Path(data))
    train(config, Path(data), out, overwrite=overwrite, resume=resume, threads=threads)
    return Run(out, threads=threads)


def load(path: str | Path, precision: str | None = None, device: str = "auto", threads: int | None = None) -> Run:
    """Open a finished run folder; `precision` ("auto", "bf16" or "fp32") is the arithmetic of its
    generation and evaluation, by default the run's own --precision setting; `device` ("auto":
    CUDA, then Apple's MPS, then the CPU; or "cuda", "mps", "cpu") is where its models answer;
    `threads`, torch's CPU threads (by default the cores other programs leave free)."""
    from tunelab.run import Run

    return Run(path, precision, device, threads)
