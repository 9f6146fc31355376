"""Tests of decoding: scripted logits, and a hand-built bigram model: attention and MLP outputs are zero, so each
token's logits depend on the last token alone, and the test decides exactly what it writes."""

from pathlib import Path

import torch


def save_bigram_model(folder: Path, tokenizer, first: list[int], others: dict[int, list[int]]) -> Path:
    """Save in `folder` a model that, after the generation prompt's last token (`first[0]`), writes
    `first[1:]` greedily, and whose next choices after a token of `others` are its list, in
    order (second choice, third, ...)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    states = sorted(set(first[:-1]) | set(others))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for dim, state in enumerate(states):
            embed[state, dim] = 1.0
        for state, after in zip(first, first[1:]):
            head[after, states.index(state)] = 10.0
        for state, afters in others.items():
            for rank, after in enumerate(afters):
                head[after, states.index(state)] += 9.0 - rank
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def scores(tokenizer, *preferred: str):
    """Logits that rank the first token of each text in `preferred` in that order, every other
    token far below (noise, so that nothing ties)."""
    import torch

    logits = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(0))
    for rank, text in enumerate(preferred):
        logits[tokenizer.encode(text)[0]] = 20.0 - rank
    return logits


def take(constraint, tokenizer, *preferred: str) -> str:
    """The token the copy constraint lets through of logits preferring `preferred`, appended to it."""
    logits = scores(tokenizer, *preferred)
    token = constraint.choose(logits, int(logits.argmax()))
    constraint.append(token)
    return tokenizer.decode([token])
