"""`tunelab export RUN --format merged`: a Hugging Face folder that transformers and vLLM load as
they load any model: LoRA folded into the base, safetensors weights, and the tokenizer with the
run's chat template, so `apply_chat_template` renders exactly the prompts the model was trained on.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.template import Template


def write_merged(model, tokenizer, template: Template, folder: Path, dtype: str) -> None:
    import torch

    model = model.to(torch.float16 if dtype == "f16" else torch.float32)
    # Generation stops where tunelab's own stops: at the template's end-of-turn token as well as EOS.
    model.generation_config.eos_token_id = list(template.stop_token_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    # The run's template becomes the tokenizer's, so apply_chat_template (and vLLM) render exactly
    # the prompts the model was trained on.
    tokenizer.chat_template = template.source
    tokenizer.save_pretrained(folder)
