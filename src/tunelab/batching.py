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
    """One padding-free row: input_ids, position_ids and targets of shape (1, total tokens), and
    cu_seq_lens_q, where each example starts (and the row ends), for per-example attention."""
    input_ids, positions, targets, starts = [], [], [], [0]
    for item in items:
        input_ids += item.input_ids
        positions += range(len(item.input_ids))
        targets += shifted_targets(item.labels)
        starts.append(len(input_ids))
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([positions]),
        "targets": torch.tensor([targets]),
        "cu_seq_lens_q": torch.tensor(starts, dtype=torch.int32),
    }


def token_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over trained tokens only. The output projection runs only where a target
    exists, so the vocabulary-sized logits of prompt tokens are never built; past LOSS_CHUNK
    trained tokens it runs in chunks, so those of a long batch never fill memory either."""
    from tunelab.speed import LOSS_CHUNK, chunked_token_loss

    targets = batch["targets"][0]
    keep = (targets != IGNORE).nonzero().squeeze(-1)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if "cu_seq_lens_q" in batch:
        inputs["cu_seq_lens_q"] = batch["cu_seq_lens_q"]
    if len(keep) > LOSS_CHUNK:
        total = chunked_token_loss(model, inputs, keep, targets[keep])
        if total is not None:
            return total / len(keep) if reduction == "mean" else total
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0]
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
