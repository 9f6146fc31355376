"""Greedy generation through the run's template: batches, and streaming for chat."""

from __future__ import annotations

import torch

from tunelab.template import Template


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@torch.no_grad()
def generate_batch(
    model, template: Template, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """Answer each conversation's next assistant turn, greedily; results keep the input order."""
    tokenizer = template.tokenizer
    encoded = [template.encode_prompt(c) for c in conversations]
    # Batches of similar length waste little on left padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(encoded)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in chunk)
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=template.stop_token_ids, pad_token_id=pad,
        )
        for row, i in enumerate(chunk):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers


@torch.no_grad()
def stream_reply(model, template: Template, conversation: list[dict[str, str]], max_new_tokens: int = 512):
    """Yield the reply to `conversation` piece by piece as it is generated."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    tokenizer = template.tokenizer
    ids = torch.tensor([template.encode_prompt(conversation)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, eos_token_id=template.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                  streamer=streamer)
    thread = Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    yield from streamer
    thread.join()
