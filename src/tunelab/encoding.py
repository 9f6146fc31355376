"""Tokenize examples through the template, under the --max-length truncation policy.

`encode_one` turns one example into the token ids and labels to train on and says what the
policy did with it (OUTCOMES): kept whole, cut to --max-length, dropped, or a raw-text document
cut into chunks. The data check encodes every row once this way to count tokens and report what
--max-length costs; training packs the same pieces (train/batching.py), evaluation measures
held-out loss on them, so the three agree on what an example is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tunelab.data.load import Example
from tunelab.errors import UserError
from tunelab.template import Encoded, Template


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)
    """Source line numbers of examples dropped for being longer than --max-length."""
    chunks: int = 0
    """Pieces of --max-length tokens that raw-text documents were cut into."""


OUTCOMES = ("kept", "truncated", "dropped", "chunked", "too_long", "no_trainable")
"""What `encode_one` did with an example: kept whole, cut to --max-length, dropped, a raw
document cut into chunks; or a problem: over --max-length under --truncation error, or no
trained token left after truncation."""


def encode_one(
    example: Example, template: Template, max_length: int, truncation: str = "drop", train_on_prompt: bool = False
) -> tuple[Encoded, list[Encoded], str]:
    """Encode one example under the truncation policy: (full encoding, pieces to train on,
    outcome). A raw-text document is chunked to `max_length`, every token trained, so it is
    never truncated nor dropped."""
    if example.is_raw:
        item = template.encode_text(example.text)
        # A one-token tail predicts nothing (targets are shifted), so it is left out.
        pieces = [Encoded(item.input_ids[i : i + max_length], item.labels[i : i + max_length])
                  for i in range(0, len(item.input_ids), max_length) if len(item.input_ids) - i > 1]
        return item, pieces, "chunked" if len(pieces) > 1 else "kept"
    item = template.encode(example.messages, train_on_prompt=train_on_prompt)
    if len(item.input_ids) <= max_length:
        return item, [item], "kept" if item.trainable else "no_trainable"
    if truncation == "error":
        return item, [], "too_long"
    if truncation == "drop":
        return item, [], "dropped"
    cut = Encoded(item.input_ids[:max_length], item.labels[:max_length])
    return item, [cut], "truncated" if cut.trainable else "no_trainable"


@dataclass
class EncodedExample:
    """One example as `encode_one` left it."""

    example: Example
    full: Encoded
    """The whole example, before any cut."""
    pieces: list[Encoded]
    """What is trained: the example, cut to --max-length, or chunks of a raw document; none if dropped."""
    outcome: str
    """One of OUTCOMES."""


def encode_examples(
    examples: list[Example],
    template: Template,
    max_length: int,
    truncation: str = "drop",
    train_on_prompt: bool = False,
    source: str = "data",
) -> tuple[list[Encoded], EncodeStats]:
    encoded = (EncodedExample(e, *encode_one(e, template, max_length, truncation, train_on_prompt)) for e in examples)
    return collect_encoded(encoded, max_length, source)


def collect_encoded(
    items: Iterable[EncodedExample], max_length: int, source: str = "data"
) -> tuple[list[Encoded], EncodeStats]:
    """The pieces to train on, in order, and what the truncation policy did; a UserError for an
    example that cannot be trained under it."""
    encoded, stats = [], EncodeStats()
    for item in items:
        line, outcome = item.example.line, item.outcome
        if outcome == "too_long":
            raise UserError(
                f"{source}:{line}: example has {len(item.full.input_ids)} tokens, over --max-length "
                f"{max_length}; raise --max-length or pass --truncation drop/truncate"
            )
        if outcome == "dropped":
            stats.dropped.append(line)
            continue
        if outcome == "no_trainable":
            raise UserError(
                f"{source}:{line}: no response tokens left to train after truncation to "
                f"{max_length} tokens; raise --max-length or shorten the prompt"
            )
        stats.truncated += outcome == "truncated"
        stats.chunks += len(item.pieces) if item.example.is_raw else 0
        encoded += item.pieces
        stats.kept += 1
    if not encoded:
        raise UserError(f"{source}: every example is longer than --max-length {max_length}; raise it")
    return encoded, stats
