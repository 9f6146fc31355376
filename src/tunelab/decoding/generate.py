"""Generation through the run's template: one loop for evaluation, `tunelab generate`, chat and serve.

`generate_rows` answers one batch of `Request`s with the KV cache, one token per step for every
row still going:
- the token prefix that every prompt shares (a system prompt, the examples of a few-shot
  prompt) is computed once and its cache copied into each row;
- each row picks its next token in `next_tokens`: the likeliest one (greedy, the default), or a
  draw with its own temperature, top_p and seed;
- a row ends at the template's end of turn, at the first of its stop strings, at its token limit,
  or once its cancel event is set (a client that left, Ctrl-C), and leaves the batch and the
  cache at once, so the rows still going pay only for themselves;
- a row's text can stream to a callback as it grows, never half a character;
- the cache keeps room for the tokens to come, so a step writes its token in place;
- the forward passes compute in the caller's precision: fp32, or bf16 autocast as in training
  (a Run passes the one it trained with, `--precision` on the commands), each weight cast to
  bf16 once a batch (`casts_kept`), not at every step.

`generate_detailed` (and `generate_answers`, `generate_batch` on top of it) feeds it what
`tunelab generate`, evaluation and the Python API's `Run.generate` ask: prompts sorted by length
inside a window, so a batch wastes little on padding, answers given back in input order. Serve's
scheduler batches concurrent requests into `generate_rows`; chat streams through `stream_reply`.
"""

from __future__ import annotations

import copy
import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from tunelab.decoding.copying import CopyConstraint, CopyRule
from tunelab.device import autocast, casts_kept
from tunelab.template import Template

WINDOW_BATCHES = 4
"""Prompts are read this many batches at a time and sorted by length inside the window: batches
of similar length waste little on left padding, and answers still leave in input order soon
after they are made (a run stopped half-way keeps every answer written so far)."""


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    """The decoded answer, end-of-turn and special tokens removed, cut before the first stop
    string, stripped."""
    prompt_tokens: int
    """Tokens of the prompt, as the template encodes it."""
    generated_tokens: int
    """Tokens generated, the end-of-turn token included."""
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (the token limit) or "cancelled"."""
    copy_changed: bool = False
    """Whether the copy constraint (copying.py) refused a token the model preferred."""

    @property
    def stopped(self) -> bool:
        """Whether the answer ended by itself rather than at the token limit."""
        return self.finish_reason == "stop"


@dataclass
class Request:
    """One prompt to answer, and how."""

    prompt: list[int]
    """Token ids of the prompt, as the template encodes the conversation."""
    max_new_tokens: int = 256
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 takes the likeliest token at each step (greedy); above it, tokens are drawn from the
    model's distribution sharpened (below 1) or flattened (above 1) by it."""
    top_p: float = 1.0
    """When sampling, draw only from the likeliest tokens whose probabilities add up to this."""
    seed: int | None = None
    """When sampling, draw from a generator of this row's own, so the answer repeats; None draws
    from torch's global random state."""
    stop_strings: Sequence[str] = ()
    """The answer ends before the first of these (which is left out of its text)."""
    cancel: threading.Event | None = None
    """Set from another thread (a client that left, Ctrl-C): the row ends at its next token."""
    on_text: Callable[[str], None] | None = None
    """Receives the answer's text as it grows, in pieces that join to exactly `Answer.text`: never
    trailing whitespace (answers are stripped), half a character, or the beginning of what may
    become a stop string."""
    copy: CopyConstraint | None = None
    """Keeps the fields that the run's training data copies from the input substrings of this
    prompt's input (copying.py; it follows one answer, so a Request is answered once); None lets
    the model write anything."""


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def generate_answers(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None, precision: str = "fp32",
) -> Iterator[str]:
    """Yield the answer to each conversation's next assistant turn, greedily, in input order,
    each as soon as it and every answer before it are done. `conversations` may be any
    iterable, read a window at a time. With `copying`, the run's copied fields stay copies of
    each conversation's input (copying.py). `precision` is the arithmetic ("fp32", "bf16" or
    "auto", as `device.autocast` reads it; a Run passes its own)."""
    for answer in generate_detailed(model, template, conversations, max_new_tokens, batch_size, copying, precision):
        yield answer.text


def generate_detailed(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None, precision: str = "fp32",
) -> Iterator[Answer]:
    """`generate_answers` with each answer's token counts and whether it stopped by itself."""
    conversations = iter(conversations)
    while window := list(itertools.islice(conversations, batch_size * WINDOW_BATCHES)):
        requests = [Request(template.encode_prompt(c), max_new_tokens, copy=copying.constraint(c) if copying else None)
                    for c in window]
        prefix = _shared_prefix(model, [r.prompt for r in requests], precision)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
        answers: list[Answer | None] = [None] * len(requests)
        ready = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            results = _generate(model, template, [requests[i] for i in batch], prefix, precision)
            for i, answer in zip(batch, results):
                answers[i] = answer
            while ready < len(answers) and answers[ready] is not None:
                yield answers[ready]
                ready += 1


def generate_batch(
    model, template: Template, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None, precision: str = "fp32",
) -> list[str]:
    """All answers at once, in input order."""
    return list(generate_answers(model, template, conversations, max_new_tokens, batch_size, copying, precision))


def generate_rows(model, template: Template, requests: list[Request], precision: str = "fp32") -> list[Answer]:
    """One batch of requests to their answers, in order, each with its own settings."""
    return _generate(model, template, requests, _shared_prefix(model, [r.prompt for r in requests], precision),
                     precision)


def stream_reply(model, template: Template, conversation: list[dict[str, str]], max_new_tokens: int = 512,
                 stop: threading.Event | None = None, copying: CopyRule | None = None,
                 precision: str = "fp32") -> Iterator[str]:
    """Yield the reply to `conversation` piece by piece as it is generated, greedily (with
    `copying`, the run's copied fields kept copies of the last user message).

    Generation runs in a thread. Setting `stop`, or leaving the loop early (a KeyboardInterrupt
    while waiting for the next piece, a `break`), ends it at the next token."""
    stop = stop or threading.Event()
    pieces: queue.Queue[str | None] = queue.Queue()
    request = Request(template.encode_prompt(conversation), max_new_tokens, cancel=stop, on_text=pieces.put,
                      copy=copying.constraint(conversation) if copying else None)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            generate_rows(model, template, [request], precision)
        except BaseException as e:  # handed to the reading thread, which would otherwise wait forever
            failures.append(e)
        finally:
            pieces.put(None)

    # A daemon thread: a second Ctrl-C while the reply winds down still leaves at once.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    finished = False
    try:
        while (piece := pieces.get()) is not None:
            yield piece
        finished = True
    finally:
        if not finished:
            stop.set()
        thread.join()
    if failures:
        raise failures[0]


# ----------------------------------------------------------------------------- the loop

ROOM = 64
"""Positions a layer's cache buffers keep free beyond what they hold (a quarter more once that is
larger): they grow, with one copy, only every so many steps."""


class _RoomyLayer(DynamicLayer):
    """One layer's keys and values in buffers with room for the tokens still to come.

    transformers' DynamicLayer appends each step's token with `torch.cat`, which copies the whole
    cache every step. Here a step writes its token into the room left and hands attention views
    of the filled part: few-shot answers ~12% faster on a 2-core CPU, where each step attends to
    the long shared prefix (docs/BENCHMARKS.md)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.length = 0
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if self.buffers is None or end > self.buffers[0].shape[-2]:
            room = end + max(ROOM, end // 4)
            self.buffers = (self._moved(self.keys, key_states, room), self._moved(self.values, value_states, room))
        for buffer, new in zip(self.buffers, (key_states, value_states)):
            buffer[..., start:end, :] = new
        self.length = end
        self._view(self.buffers)
        return self.keys, self.values

    def _moved(self, held: torch.Tensor, new: torch.Tensor, room: int) -> torch.Tensor:
        """A buffer shaped like `new` with `room` positions, starting with what the layer `held`."""
        buffer = new.new_empty((*new.shape[:-2], room, new.shape[-1]))
        if self.length:
            buffer[..., : self.length, :] = held
        return buffer

    def _view(self, buffers: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.buffers = buffers
        self.keys, self.values = (b[..., : self.length, :] for b in buffers)

    def reset(self) -> None:
        super().reset()
        self.length, self.buffers = 0, None

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("tunelab's generation cache only grows; crop a DynamicCache instead")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._view(tuple(b.repeat_interleave(repeats, dim=0) for b in self.buffers))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._view(tuple(b[indices] for b in self.buffers))


def _new_cache(model) -> DynamicCache:
    """An empty cache for `model`, its plain layers kept in buffers with room (sliding-window
    and other special layers stay transformers' own)."""
    cache = DynamicCache(config=model.config)
    cache.layers = [_RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class _Prefix:
    length: int
    """Leading tokens that every prompt of the window shares."""
    cache: DynamicCache
    """Their keys and values, for a batch of one."""


@torch.no_grad()
def _shared_prefix(model, prompts: list[list[int]], precision: str) -> _Prefix | None:
    """The KV cache of the tokens every prompt starts with, computed once. Each prompt keeps at
    least one token of its own, whose logits give its first answer token. A lone prompt has
    nothing to share."""
    if len(prompts) < 2:
        return None
    length = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        length = next((i for i, (a, b) in enumerate(zip(prompts[0][:length], p)) if a != b), length)
    if length < 1:
        return None
    device = next(model.parameters()).device
    cache = _new_cache(model)
    with casts_kept(model), autocast(precision, device):
        model(input_ids=torch.tensor([prompts[0][:length]], device=device), cache=cache, use_cache=True,
              logits_to_keep=1)
    return _Prefix(length, cache)


@dataclass
class _Row:
    """One request while it is generated: its tokens, its text and why it ended."""

    request: Request
    template: Template
    generator: torch.Generator | None
    """The row's own random generator, when it samples with a seed."""
    tokens: list[int] = field(default_factory=list)
    """Tokens generated so far, the end-of-turn token included."""
    text: str = ""
    """Decoded text so far, cut before a stop string; kept up to date only for rows that need it
    (stop strings, streaming), the others are decoded once at the end."""
    sent: str = ""
    """What `on_text` received so far."""
    finish_reason: str | None = None
    """Why the row ended, None while it goes on."""

    def add(self, token: int) -> None:
        request = self.request
        self.tokens.append(token)
        if request.copy is not None:
            request.copy.append(token)
        if token in self.template.stop_token_ids:
            self.finish_reason = "stop"
        elif request.stop_strings or request.on_text:
            text = self.decode()
            cuts = [text.find(s) for s in request.stop_strings if s in text]
            if cuts:
                text = text[: min(cuts)]
                self.finish_reason = "stop"
            self.text = text
        if self.finish_reason is None and len(self.tokens) >= request.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None and request.cancel is not None and request.cancel.is_set():
            self.finish_reason = "cancelled"
        self.stream()

    def decode(self) -> str:
        stops = self.template.stop_token_ids
        return self.template.tokenizer.decode([t for t in self.tokens if t not in stops],
                                              skip_special_tokens=True).lstrip()

    def stream(self) -> None:
        """Send `on_text` what of the text is final: all of it once the row has ended."""
        if self.request.on_text is None:
            return
        text = self.text.rstrip()
        if self.finish_reason is None:
            text = text.rstrip("\ufffd")  # the first bytes of a character that the next token completes
            for s in self.request.stop_strings:
                held = next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                text = text[: len(text) - held]
        # Decoding more tokens can change a row's earlier text (rarely); what was sent stays sent.
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.request.on_text(text[len(self.sent):])
            self.sent = text

    def answer(self) -> Answer:
        text = self.text if self.request.stop_strings or self.request.on_text else self.decode()
        constraint = self.request.copy
        return Answer(text.strip(), len(self.request.prompt), len(self.tokens), self.finish_reason or "length",
                      bool(constraint and constraint.changed))


def next_tokens(scores: torch.Tensor, rows: list[_Row]) -> list[int]:
    """The next token of each row still going, from its line of `scores` (the model's logits).

    The one place where tokens are chosen: a greedy row takes its likeliest token, a sampling
    row draws one with its own temperature, top_p and seed. A row's copy constraint has the last
    word: it refuses a token that would make a copied value no longer a copy of the input."""
    tokens = []
    for row, line in zip(rows, scores):
        request = row.request
        if request.temperature > 0:
            if request.copy is not None:
                line = request.copy.restrict(line)
            tokens.append(_sample(line, request.temperature, request.top_p, row.generator))
        else:
            token = int(line.argmax())
            tokens.append(request.copy.choose(line, token) if request.copy is not None else token)
    return tokens


def _sample(scores: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    probabilities = torch.softmax(scores.float() / temperature, dim=-1)
    ranked, order = probabilities.sort(descending=True)
    # The smallest set of likeliest tokens whose probabilities reach top_p (always the first).
    ranked = ranked * (ranked.cumsum(-1) - ranked < top_p)
    return order[torch.multinomial(ranked, 1, generator=generator)].item()


@torch.no_grad()
def _generate(model, template: Template, requests: list[Request], prefix: _Prefix | None,
              precision: str) -> list[Answer]:
    """One batch of requests to their answers: the prompts' own tokens left-padded after the
    shared prefix, then one token per step for the rows still going."""
    device = next(model.parameters()).device
    with casts_kept(model), autocast(precision, device):
        rows = []
        for request in requests:
            generator = None
            if request.temperature > 0 and request.seed is not None:
                generator = torch.Generator(device=device)
                generator.manual_seed(request.seed)
            rows.append(_Row(request, template, generator))

        shared = prefix.length if prefix else 0
        if prefix:
            cache = copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(len(requests))
        else:
            cache = _new_cache(model)
        own = [r.prompt[shared:] for r in requests]
        width = max(len(p) for p in own)
        pad = template.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in own], device=device)
        mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * len(p) for p in own], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        scores = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]

        active = list(range(len(rows)))  # rows still generating, in cache order
        while True:
            for i, token in zip(active, next_tokens(scores, [rows[i] for i in active])):
                rows[i].add(token)
            keep = [k for k, i in enumerate(active) if rows[i].finish_reason is None]
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask = mask[index]
                active = [active[k] for k in keep]
            tokens = torch.tensor([[rows[i].tokens[-1]] for i in active], device=device)
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            scores = model(input_ids=tokens, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                           cache=cache, use_cache=True).logits[:, -1]
        return [row.answer() for row in rows]
