"""Generation through the run's template: answers in input order, and streaming for chat.

Two loops, both greedy by default and both through the run's Template:
- `generate_detailed` (and `generate_answers`, `generate_batch` on top of it) is what
  `tunelab generate`, evaluation and the Python API's `Run.generate` use. It decodes greedily
  with the KV cache and pays for only what each answer needs: prompts are sorted by length
  inside a window, so a batch wastes little on padding; the token prefix that every prompt of a
  window shares (a system prompt, the examples of a few-shot prompt) is computed once and its
  cache copied into each batch; a row leaves the batch as soon as it has produced its
  end-of-turn token.
- `generate_rows` is the server's (serve.py): one batch through transformers' `generate`, with
  sampling (temperature, top_p, seed), stop strings, per-row cancellation and text streamed
  row by row. Chat streams its replies through `stream_reply`.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunelab.copying import CopyConstraint, CopyRule, choose_tokens, copy_logits
from tunelab.template import Template

WINDOW_BATCHES = 4
"""Prompts are read this many batches at a time and sorted by length inside the window: batches
of similar length waste little on left padding, and answers still leave in input order soon
after they are made (a run stopped half-way keeps every answer written so far)."""


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    """The decoded answer, end-of-turn and special tokens removed (and, in `generate_rows`, cut
    before the first stop string), stripped."""
    prompt_tokens: int
    """Tokens of the prompt, as the template encodes it."""
    generated_tokens: int
    """Tokens generated."""
    finish_reason: str
    """"stop" (end of turn or a stop string), "length" (the token limit) or "cancelled"."""
    copy_changed: bool = False
    """Whether the copy constraint (copying.py) refused a token the model preferred."""

    @property
    def stopped(self) -> bool:
        """Whether the answer ended by itself rather than at the token limit."""
        return self.finish_reason == "stop"


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def generate_answers(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None,
) -> Iterator[str]:
    """Yield the answer to each conversation's next assistant turn, greedily, in input order,
    each as soon as it and every answer before it are done. `conversations` may be any
    iterable, read a window at a time. With `copying`, the run's copied fields stay copies of
    each conversation's input (copying.py)."""
    for answer in generate_detailed(model, template, conversations, max_new_tokens, batch_size, copying):
        yield answer.text


@torch.no_grad()
def generate_detailed(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None,
) -> Iterator[Answer]:
    """`generate_answers` with each answer's token counts and whether it stopped by itself."""
    conversations = iter(conversations)
    while window := list(itertools.islice(conversations, batch_size * WINDOW_BATCHES)):
        encoded = [template.encode_prompt(c) for c in window]
        constraints = [copying.constraint(c) if copying else None for c in window]
        prefix = _shared_prefix(model, encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list[Answer | None] = [None] * len(encoded)
        ready = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            results = _generate(model, template, [encoded[i] for i in batch], max_new_tokens, prefix,
                                [constraints[i] for i in batch])
            for i, answer in zip(batch, results):
                answers[i] = answer
            while ready < len(answers) and answers[ready] is not None:
                yield answers[ready]
                ready += 1


def generate_batch(
    model, template: Template, conversations: list[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16, copying: CopyRule | None = None,
) -> list[str]:
    """All answers at once, in input order."""
    return list(generate_answers(model, template, conversations, max_new_tokens, batch_size, copying))


@dataclass
class _Prefix:
    length: int
    """Leading tokens that every prompt of the window shares."""
    cache: DynamicCache
    """Their keys and values, for a batch of one."""


def _shared_prefix(model, prompts: list[list[int]]) -> _Prefix | None:
    """The KV cache of the tokens every prompt starts with, computed once. Each prompt keeps at
    least one token of its own, whose logits give its first answer token."""
    length = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        length = next((i for i, (a, b) in enumerate(zip(prompts[0][:length], p)) if a != b), length)
    if length < 1:
        return None
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompts[0][:length]], device=device), cache=cache, use_cache=True,
          logits_to_keep=1)
    return _Prefix(length, cache)


def _generate(model, template: Template, prompts: list[list[int]], max_new_tokens: int,
              prefix: _Prefix | None, constraints: list[CopyConstraint | None]) -> list[Answer]:
    """One batch of token-id prompts to their answers: the prompts' own tokens left-padded after
    the shared prefix, then one token per step for the rows still going (each row's copy
    constraint, if any, has the last word on its token)."""
    tokenizer = template.tokenizer
    device = next(model.parameters()).device
    stops = set(template.stop_token_ids)
    shared = prefix.length if prefix else 0
    if prefix:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(prompts))
    else:
        cache = DynamicCache(config=model.config)
    own = [p[shared:] for p in prompts]
    width = max(len(p) for p in own)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in own], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * len(p) for p in own], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]
    generated: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    active = list(range(len(prompts)))  # rows of the batch still generating, in cache order
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        if any(constraints):  # the copy constraint may refuse a row's first choice (copying.py)
            tokens = choose_tokens(logits, tokens, [constraints[i] for i in active])
        keep = []
        for row, (i, token) in enumerate(zip(active, tokens.tolist())):
            generated[i].append(token)
            if token in stops:
                stopped[i] = True
            else:
                keep.append(row)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, tokens = mask[index], tokens[index]
            active = [active[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                       cache=cache, use_cache=True).logits[:, -1]
    return [Answer(tokenizer.decode([t for t in g if t not in stops], skip_special_tokens=True).strip(),
                   len(p), len(g), "stop" if s else "length", bool(c and c.changed))
            for p, g, s, c in zip(prompts, generated, stopped, constraints)]


@torch.no_grad()
def generate_rows(
    model, template: Template, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_p: float = 1.0, seed: int | None = None, stop_strings: Sequence[str] = (),
    cancel: Sequence[threading.Event] | None = None, on_text: Callable[[int, str], None] | None = None,
    constraints: Sequence[CopyConstraint | None] | None = None,
) -> list[Answer]:
    """One left-padded batch of token-id prompts to their answers.

    temperature 0 is greedy; above it, tokens are sampled (nucleus `top_p`; `seed` makes it
    repeatable). A row ends at the template's end of turn, at the first of `stop_strings`
    (left out of its text), or once its `cancel` event is set (a client that left), without
    ending the other rows. `on_text(row, piece)` receives each row's text as it grows, pieces
    that join to exactly the answer's text. `constraints` are the rows' copy constraints
    (copying.py), None where a row has none."""
    tokenizer = template.tokenizer
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    rows = RowStreamer(template, len(prompts), list(stop_strings), list(cancel or []), on_text)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    if constraints and any(constraints):
        sampling["logits_processor"] = [copy_logits(list(constraints), width, sampling=temperature > 0)]
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
    changed = [bool(c and c.changed) for c in constraints or [None] * len(prompts)]
    return [Answer(text.strip(), len(prompt), len(tokens), reason or "length", copy)
            for prompt, text, tokens, reason, copy in zip(prompts, rows.text, rows.tokens, rows.finished, changed)]


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
                 stop: threading.Event | None = None, copying: CopyRule | None = None) -> Iterator[str]:
    """Yield the reply to `conversation` piece by piece as it is generated (with `copying`, the
    run's copied fields kept copies of the last user message).

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
    constraint = copying.constraint(conversation) if copying else None
    if constraint:
        kwargs["logits_processor"] = [copy_logits([constraint], ids.shape[1], sampling=False)]
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
