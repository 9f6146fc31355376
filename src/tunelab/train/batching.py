"""Pack tokenized examples (encoding.py) into micro-batches without padding.

A micro-batch is one row holding its examples back to back. Position ids restart at every
example, which makes transformers build a block-diagonal causal mask, so no example attends
to another and no compute is spent on padding. Targets are shifted per example, so the last
token of one example never predicts the first of the next.
"""

from __future__ import annotations

import torch

from tunelab.template import IGNORE, Encoded


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
