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
checked before anything is written; the export is then written into a hidden folder beside --out
and renamed when complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tunelab.errors import UserError

FORMATS = ("merged", "gguf", "ollama")
DTYPES = {"merged": ("f32", "f16"), "gguf": ("f32", "f16", "q8_0"), "ollama": ("f32", "f16", "q8_0")}
"""The weights each format can hold (Q8_0 is a GGUF quantisation); see `export` for the defaults."""


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
    if out.exists():
        raise UserError(f"{out}: already exists; remove it or choose another --out")
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
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if format == "merged":
            merged.write_merged(model, run.tokenizer, run.template, staging, dtype)
        else:
            gguf.write_gguf(model, run.tokenizer, run.template, staging / gguf.GGUF_FILE, dtype, tokenizer_pre,
                            name=run.path.resolve().name)
        if modelfile is not None:
            (staging / "Modelfile").write_text(modelfile)
        (staging / "README.md").write_text(card.model_card(run, format, dtype, out))
        staging.chmod(0o755)  # mkdtemp's folder is private; an export is read by other programs and users
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
