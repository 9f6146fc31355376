"""Greedy generation through the run's template: answers in input order, and streaming for chat.

`generate_answers` is the one generation loop: batch generation, evaluation and chat's
one-off replies all go through it (chat streams through `stream_reply`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from tunelab.template import Template

WINDOW_BATCHES = 4
"""Prompts are read this many batches at a time and sorted by length inside the window: batches
of similar length waste little on left padding, and answers still leave in input order soon
after they are made (a run stopped half-way keeps every answer written so far)."""


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@torch.no_grad()
def generate_answers(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16,
) -> Iterator[str]:
    """Yield the answer to each conversation's next assistant turn, greedily, in input order,
    each as soon as it and every answer before it are done. `conversations` may be any
    iterable, read a window at a time."""
    conversations = iter(conversations)
    while window := list(itertools.islice(conversations, batch_size * WINDOW_BATCHES)):
        encoded = [template.encode_prompt(c) for c in window]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list[str | None] = [None] * len(encoded)
        ready = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            for i, answer in zip(batch, _generate(model, template, [encoded[i] for i in batch], max_new_tokens)):
                answers[i] = answer
            while ready < len(answers) and answers[ready] is not None:
                yield answers[ready]
                ready += 1


def generate_batch(
    model, template: Template, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16,
) -> list[str]:
    """All answers at once, in input order."""
    return list(generate_answers(model, template, conversations, max_new_tokens, batch_size))


def _generate(model, template: Template, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """One left-padded batch of token-id prompts to their decoded answers."""
    tokenizer = template.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=template.stop_token_ids, pad_token_id=pad,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


class StopWhenSet(StoppingCriteria):
    """Ends generation after the current token once `event` is set (Ctrl-C during a chat reply)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def stream_reply(model, template: Template, conversation: list[dict[str, str]], max_new_tokens: int = 512,
                 stop: threading.Event | None = None) -> Iterator[str]:
    """Yield the reply to `conversation` piece by piece as it is generated.

    Generation runs in a thread. Setting `stop`, or leaving the loop early (a KeyboardInterrupt
    while waiting for the next piece, a `break`), ends it at the next token."""
    from transformers import TextIteratorStreamer

    tokenizer = template.tokenizer
    stop = stop or threading.Event()
    ids = torch.tensor([template.encode_prompt(conversation)], device=next(model.parameters()).device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, eos_token_id=template.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                  streamer=streamer, stopping_criteria=StoppingCriteriaList([StopWhenSet(stop)]))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():  # no_grad is per thread
                model.generate(**kwargs)
        except BaseException as e:  # handed to the reading thread, which would otherwise wait forever
            failures.append(e)
            streamer.end()

    # A daemon thread: a second Ctrl-C while the reply winds down still leaves at once.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    finished = False
    try:
        yield from streamer
        finished = True
    finally:
        if not finished:
            stop.set()
        thread.join()
    if failures:
        raise failures[0]
