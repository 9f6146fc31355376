"""Tokenize examples through the template and pack micro-batches without padding.

A micro-batch is one row holding its examples back to back. Position ids restart at every
example, which makes transformers build a block-diagonal causal mask, so no example attends
to another and no compute is spent on padding. Targets are shifted per example, so the last
token of one example never predicts the first of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunelab.data import Example
from tunelab.errors import UserError
from tunelab.template import IGNORE, Encoded, Template


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped: list[int] = field(default_factory=list)
    """Source line numbers of examples dropped for being longer than --max-length."""


def encode_examples(
    examples: list[Example],
    template: Template,
    max_length: int,
    truncation: str = "drop",
    train_on_prompt: bool = False,
    source: str = "data",
) -> tuple[list[Encoded], EncodeStats]:
    encoded, stats = [], EncodeStats()
    for example in examples:
        item = template.encode(example.messages, train_on_prompt=train_on_prompt)
        if len(item.input_ids) > max_length:
            if truncation == "error":
                raise UserError(
                    f"{source}:{example.line}: example has {len(item.input_ids)} tokens, over --max-length "
                    f"{max_length}; raise --max-length or pass --truncation drop/truncate"
                )
            if truncation == "drop":
                stats.dropped.append(example.line)
                continue
            item = Encoded(item.input_ids[:max_length], item.labels[:max_length])
            stats.truncated += 1
        if item.trainable == 0:
            raise UserError(
                f"{source}:{example.line}: no response tokens left to train after truncation to "
                f"{max_length} tokens; raise --max-length or shorten the prompt"
            )
        encoded.append(item)
        stats.kept += 1
    if not encoded:
        raise UserError(f"{source}: every example is longer than --max-length {max_length}; raise it")
    return encoded, stats


def shifted_targets(labels: list[int]) -> list[int]:
    """targets[t] is what position t must predict: the label of token t+1."""
    return labels[1:] + [IGNORE]


def pack(items: list[Encoded]) -> dict[str, torch.Tensor]:
    """One padding-free row: input_ids, position_ids and targets of shape (1, total tokens)."""
    input_ids, positions, targets = [], [], []
    for item in items:
        input_ids += item.input_ids
        positions += range(len(item.input_ids))
        targets += shifted_targets(item.labels)
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor([targets]),
    }


def token_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over trained tokens only. The output projection runs only where a target
    exists, so the vocabulary-sized logits of prompt tokens are never built."""
    targets = batch["targets"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    logits = model(
        input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False
    ).logits[0]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction=reduction)


@torch.no_grad()
def heldout_loss(model, encoded: list[Encoded], batch_size: int = 8) -> float:
    """Mean token cross-entropy over every trained token of `encoded`."""
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = pack(encoded[start : start + batch_size])
        batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        total += token_loss(model, batch, reduction="sum").item()
        count += int((batch["targets"] != IGNORE).sum())
    return total / max(count, 1)
