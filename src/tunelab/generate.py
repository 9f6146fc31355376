"""Greedy generation through the run's template: answers in input order, and streaming for chat.

`generate_answers` is the one generation loop: `tunelab generate`, evaluation and the Python
API's `Run.generate` go through it; chat streams its replies through `stream_reply`. It decodes
greedily with the KV cache, and pays for only what each answer needs:
- prompts are sorted by length inside a window, so a batch wastes little on padding;
- the token prefix that every prompt of a window shares (a system prompt, the examples of a
  few-shot prompt) is computed once and its cache copied into each batch;
- a row leaves the batch as soon as it has produced its end-of-turn token.
"""

from __future__ import annotations

import copy
import itertools
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from tunelab.template import Template

WINDOW_BATCHES = 4
"""Prompts are read this many batches at a time and sorted by length inside the window: batches
of similar length waste little on left padding, and answers still leave in input order soon
after they are made (a run stopped half-way keeps every answer written so far)."""


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    """The decoded answer, end-of-turn and special tokens removed, stripped."""
    prompt_tokens: int
    """Tokens of the prompt, as the template encodes it."""
    generated_tokens: int
    """Tokens generated, the end-of-turn token included when there is one."""
    stopped: bool
    """True when the answer ended with an end-of-turn token, False when it hit the token limit."""


def as_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def generate_answers(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16,
) -> Iterator[str]:
    """Yield the answer to each conversation's next assistant turn, greedily, in input order,
    each as soon as it and every answer before it are done. `conversations` may be any
    iterable, read a window at a time."""
    for answer in generate_detailed(model, template, conversations, max_new_tokens, batch_size):
        yield answer.text


@torch.no_grad()
def generate_detailed(
    model, template: Template, conversations: Iterable[list[dict[str, str]]], max_new_tokens: int = 256,
    batch_size: int = 16,
) -> Iterator[Answer]:
    """`generate_answers` with each answer's token counts and whether it stopped by itself."""
    conversations = iter(conversations)
    while window := list(itertools.islice(conversations, batch_size * WINDOW_BATCHES)):
        encoded = [template.encode_prompt(c) for c in window]
        prefix = _shared_prefix(model, encoded)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        answers: list[Answer | None] = [None] * len(encoded)
        ready = 0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            results = _generate(model, template, [encoded[i] for i in batch], max_new_tokens, prefix)
            for i, answer in zip(batch, results):
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
              prefix: _Prefix | None) -> list[Answer]:
    """One batch of token-id prompts to their answers: the prompts' own tokens left-padded after
    the shared prefix, then one token per step for the rows still going."""
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
                   len(p), len(g), s) for p, g, s in zip(prompts, generated, stopped)]


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
