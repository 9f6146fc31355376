"""Batched generation: left padding changes no answer, and answers keep the input order."""

import pytest

from tunelab.decoding.generate import generate_batch
from tunelab.template import Template


@pytest.fixture(scope="module")
def lively_model(tokenizer):
    """A random 2-layer Llama whose greedy answers depend on every token of the prompt (the default
    initialisation is so flat that it answers blank lines to anything, padded or not)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.slow
def test_batched_answers_equal_one_by_one_answers_for_very_different_lengths(lively_model, tokenizer):
    template = Template.for_model(tokenizer)
    prompts = ["Hi", "Describe the weather in Paris today. " * 12, "Name a colour.",
               "List the numbers " + " ".join(map(str, range(60))), "Why?"]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    lengths = [len(template.encode_prompt(c)) for c in conversations]
    assert max(lengths) > 5 * min(lengths)  # in one batch, the short prompts are mostly padding
    alone = [generate_batch(lively_model, template, [c], max_new_tokens=12)[0] for c in conversations]
    assert len(set(alone)) == len(alone) and all(alone)  # distinct answers: a mixed-up order would show
    assert generate_batch(lively_model, template, conversations, max_new_tokens=12) == alone
    assert generate_batch(lively_model, template, conversations, max_new_tokens=12, batch_size=2) == alone
