"""Generation through the run's template: answers in input order, and streaming for chat.

`generate_rows` is the one generation loop: `tunelab generate`, evaluation and the Python API's
`Run.generate` go through it by way of `generate_answers`, and the server (serve.py) calls it
directly for its batches; chat streams its replies through `stream_reply`. Generation is greedy
unless a temperature is given.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunelab.template import Template

WINDOW_BATCHES = 4
"""Prompts are read this many batches at a time and sorted by length inside the window: batches
of similar length waste little on left padding, and answers still leave in input order soon
after they are made (a run stopped half-way keeps every answer written so far)."""


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


@dataclass
class Answer:
    """One generated answer."""

    text: str
    """The answer, stripped of surrounding whitespace and cut before the first stop string."""
    tokens: int
    """Tokens generated for it, the end-of-turn token not counted."""
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (max_new_tokens reached) or "cancelled"."""


@torch.no_grad()
def generate_answers(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, **sampling,
) -> Iterator[str]:
    """Yield the answer to each conversation's next assistant turn, in input order, each as
    soon as it and every answer before it are done. `conversations` may be any iterable,
    read a window at a time. `sampling` (temperature, top_p, seed, stop_strings) is passed
    to `generate_rows`; without it generation is greedy."""
    conversations = iter(conversations)
    while window := list(itertools.islice(conversations, batch_size * WINDOW_BATCHES)):
        encoded = [template.encode_prompt(c) for c in window]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list[str | None] = [None] * len(encoded)
        ready = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            rows = generate_rows(model, template, [encoded[i] for i in batch], max_new_tokens, **sampling)
            for i, answer in zip(batch, rows):
                answers[i] = answer.text
            while ready < len(answers) and answers[ready] is not None:
                yield answers[ready]
                ready += 1


def generate_batch(
    model, template: Template, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, **sampling,
) -> list[str]:
    """All answers at once, in input order."""
    return list(generate_answers(model, template, conversations, max_new_tokens, batch_size, **sampling))


@torch.no_grad()
def generate_rows(
    model, template: Template, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_p: float = 1.0, seed: int | None = None, stop_strings: Sequence[str] = (),
    cancel: Sequence[threading.Event] | None = None, on_text: Callable[[int, str], None] | None = None,
) -> list[Answer]:
    """One left-padded batch of token-id prompts to their answers.

    temperature 0 is greedy; above it, tokens are sampled (nucleus `top_p`; `seed` makes it
    repeatable). A row ends at the template's end of turn, at the first of `stop_strings`
    (left out of its text), or once its `cancel` event is set (a client that left), without
    ending the other rows. `on_text(row, piece)` receives each row's text as it grows, pieces
    that join to exactly the answer's text."""
    tokenizer = template.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows = RowStreamer(template, len(prompts), list(stop_strings), list(cancel or []), on_text)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    # A seed draws from a generator of its own, leaving the process's random state as it was.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices) if seed is not None else nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=template.stop_token_ids,
            pad_token_id=pad, streamer=rows, stopping_criteria=StoppingCriteriaList([StopFinishedRows(rows)]),
            **sampling,
        )
    return [Answer(text.strip(), len(tokens), reason or "length")
            for text, tokens, reason in zip(rows.text, rows.tokens, rows.finished)]


@dataclass
class RowStreamer(BaseStreamer):
    """Follows each row of a batch as `generate` makes it: its tokens, its text, and why it ended.

    Text goes to `on_text` only once it is final: never trailing whitespace (answers are
    stripped), a half-decoded character, or the beginning of what may become a stop string."""

    template: Template
    size: int
    """Rows in the batch."""
    stop_strings: list[str]
    cancel: list[threading.Event]
    """One event per row, or none."""
    on_text: Callable[[int, str], None] | None
    tokens: list[list[int]] = field(init=False)
    """Tokens generated per row, up to its end."""
    text: list[str] = field(init=False)
    """Decoded text per row, cut before a stop string."""
    finished: list[str | None] = field(init=False)
    """Why each row ended ("stop", "cancelled"), None while it goes on."""
    sent: list[str] = field(init=False)
    """What `on_text` received per row so far."""
    prompt_seen: bool = False

    def __post_init__(self) -> None:
        self.tokens = [[] for _ in range(self.size)]
        self.text = [""] * self.size
        self.finished = [None] * self.size
        self.sent = [""] * self.size

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompts first
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.finished[row] is not None:
                continue
            if self.cancel and self.cancel[row].is_set():
                self.finished[row] = "cancelled"
                continue
            if token in self.template.stop_token_ids:
                self.finished[row] = "stop"
            else:
                self.tokens[row].append(token)
                text = self.template.tokenizer.decode(self.tokens[row], skip_special_tokens=True).lstrip()
                cuts = [text.find(s) for s in self.stop_strings if s in text]
                if cuts:
                    text = text[: min(cuts)]
                    self.finished[row] = "stop"
                self.text[row] = text
            self._send(row)

    def end(self) -> None:
        for row in range(self.size):
            self._send(row, final=True)

    def _send(self, row: int, final: bool = False) -> None:
        if self.on_text is None:
            return
        text = self.text[row].rstrip()
        if not final and self.finished[row] is None:
            text = text.rstrip("\ufffd")
            for s in self.stop_strings:
                held = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                text = text[: len(text) - held]
        # Decoding more tokens can change a row's earlier text (rarely); what was sent stays sent.
        if len(text) > len(self.sent[row]) and text.startswith(self.sent[row]):
            self.on_text(row, text[len(self.sent[row]):])
            self.sent[row] = text


class StopFinishedRows(StoppingCriteria):
    """Ends each row that its RowStreamer saw finish (a stop string, a cancelled request)."""

    def __init__(self, rows: RowStreamer):
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.tensor([reason is not None for reason in self.rows.finished], device=input_ids.device)


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
