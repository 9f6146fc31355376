"""Export a finished run to where people run models, with a model card (README.md, card.py) in each:

    tunelab export RUN --format merged --out DIR   a Hugging Face folder: LoRA folded into the base,
                                                   safetensors, tokenizer with the run's chat template
                                                   (merged.py)
    tunelab export RUN --format gguf --out DIR     DIR/model.gguf for llama.cpp: weights, tokenizer
                                                   and the run's chat template in its metadata (gguf.py)
    tunelab export RUN --format ollama --out DIR   the GGUF and a Modelfile whose TEMPLATE, SYSTEM and
                                                   stop parameters render the run's template (ollama.py)

Everything that can refuse (an unknown format or dtype, an existing --out, a run without
weights, an architecture or tokenizer GGUF cannot describe, a template Ollama cannot express) is
checked before anything is written, --out first of all (before the model loads); the export is
then written into a hidden folder beside --out and renamed when complete, so a failed or
interrupted export leaves nothing behind. A folder left by an export killed outright (kill -9)
is removed by the next export into the same folder (`remove_stale_staging`).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from tunelab.errors import UserError, check_not_kernel_folder, check_output_folder

FORMATS = ("merged", "gguf", "ollama")
DTYPES = {"merged": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0"), "ollama": ("f32", "f16", "q8_0")}
"""The weights each format can hold (Q8_0 is a GGUF quantisation); see `export` for the defaults."""
STAGING_MARK = ".tunelab-export-"
"""In the name of a staging folder, `.OUT.tunelab-export-PID`: the process id tells a folder
that an export killed outright left behind (its process is gone) from one being written now."""


def export(run_path: Path | str, format: str, out: Path | str, dtype: str | None = None) -> Path:
    """Write the run `run_path` as `format` into the new folder `out`; `dtype` defaults to f32
    for merged and f16 for gguf and ollama. This is the one place format and dtype are checked."""
    from tunelab.export import card, gguf, merged, ollama
    from tunelab.run import Run

    out = Path(out)
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose {', '.join(FORMATS)}")
    dtype = dtype or ("f32" if format == "merged" else "f16")
    if dtype not in DTYPES[format]:
        raise UserError(f"--dtype {dtype} is not available for {format}; choose {', '.join(DTYPES[format])}")
    check_not_kernel_folder(out, "--out")
    check_output_folder(out, "--out")
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another --out")
    remove_stale_staging(out.parent)
    staging = None
    try:
        run = Run(run_path)
        tokenizer_pre = modelfile = None
        if format in ("gguf", "ollama"):
            from transformers import AutoConfig

            weights = run.files.model if run.files.model.exists() else run.base_path()
            tokenizer_pre = gguf.check_gguf_supported(AutoConfig.from_pretrained(weights), run.tokenizer)
        if format == "ollama":
            modelfile = ollama.ollama_modelfile(run.template)
        model = run.model()

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = out.parent / f".{out.name}{STAGING_MARK}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)  # this process's own, from an earlier export that failed
        staging.mkdir()
        if format == "merged":
            merged.write_merged(model, run.tokenizer, run.template, staging, dtype)
        else:
            gguf.write_gguf(model, run.tokenizer, run.template, staging / gguf.GGUF_FILE, dtype, tokenizer_pre,
                            name=run.path.resolve().name)
        if modelfile is not None:
            (staging / "Modelfile").write_text(modelfile)
        (staging / "README.md").write_text(card.model_card(run, format, dtype, out))
        staging.rename(out)
    except BaseException as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            removed = f"; the half-written {staging} was removed" if staging is not None else ""
            print(f"tunelab: interrupted: nothing was written to {out}{removed}", file=sys.stderr)
        raise
    return out


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove, and report, the staging folders in `parent` that an export killed outright (kill -9,
    a power cut) left behind: hidden folders of tunelab's own naming whose process is gone.
    A running export's folder is left alone. Returns the folders removed."""
    if not parent.is_dir():
        return []
    removed = []
    for path in sorted(parent.iterdir()):
        match = re.fullmatch(rf"\..+{re.escape(STAGING_MARK)}(\d+)", path.name)
        if match is None or not path.is_dir() or _process_alive(int(match[1])):
            continue
        shutil.rmtree(path, ignore_errors=True)
        print(f"tunelab: removed {path}, a half-written export left by process {match[1]}, which is gone",
              file=sys.stderr)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0 delivers nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OverflowError:
        return False
    return True
