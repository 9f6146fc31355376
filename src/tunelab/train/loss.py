"""The training step and the losses it is made of.

- `token_loss`: cross-entropy over the trained tokens of one packed micro-batch (see
  batching.pack), the output projection run only where a target exists;
- `chunked_token_loss`: the same, the output projection and loss done `LOSS_CHUNK` positions at
  a time, so the vocabulary-sized logits of a long batch never fill memory;
- `heldout_loss`: the mean token loss over a held-out set;
- `backward_step`: forward and backward over the micro-batches of one optimizer step, every
  trained token weighing the same across micro-batches and processes.
"""

from __future__ import annotations

import contextlib

import torch

from tunelab.device import one_example_batches, runs_packed
from tunelab.template import IGNORE, Encoded
from tunelab.train.batching import pack

LOSS_CHUNK = 1024
"""Trained positions per chunk of output projection + cross-entropy (49k-vocabulary logits of
1024 positions are 200 MB in fp32)."""


def token_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over trained tokens only. The output projection runs only where a target
    exists, so the vocabulary-sized logits of prompt tokens are never built; past LOSS_CHUNK
    trained tokens it runs in chunks, so those of a long batch never fill memory either."""
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


@contextlib.contextmanager
def _hidden_instead_of_logits(head):
    """Make the output projection return its input, so the model hands back final hidden states."""
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        del head.forward


def _sharded(weight: torch.Tensor) -> bool:
    """FSDP and DeepSpeed ZeRO-3 hold a layer's full weight only inside its own forward."""
    from torch.distributed.tensor import DTensor

    return isinstance(weight, DTensor) or hasattr(weight, "ds_id") or weight.dim() != 2 or weight.numel() == 0


def _chunk_loss(hidden, weight, bias, targets):
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_token_loss(model, inputs: dict, keep: torch.Tensor, targets: torch.Tensor,
                       chunk: int = LOSS_CHUNK) -> torch.Tensor | None:
    """Summed cross-entropy of the trained positions `keep`, the output projection and loss done
    `chunk` positions at a time and recomputed in backward, so at most one chunk of logits is in
    memory. None when the model's output layer is not a plain Linear (e.g. LoRA on lm_head), is
    sharded (FSDP, ZeRO-3) or is followed by a logit soft-cap (Gemma 2): the caller then computes
    the logits of all trained positions at once."""
    from torch.utils.checkpoint import checkpoint

    unwrapped = model.module if hasattr(model, "module") else model
    head = unwrapped.get_output_embeddings()
    capped = getattr(unwrapped.config, "final_logit_softcapping", None)
    if type(head) is not torch.nn.Linear or _sharded(head.weight) or capped:
        return None
    with _hidden_instead_of_logits(head):
        hidden = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(keep), chunk):
        total = total + checkpoint(_chunk_loss, hidden[start:start + chunk], head.weight, head.bias,
                                   targets[start:start + chunk], use_reentrant=False)
    return total


def backward_step(accelerator, model, micro_batches: list[dict]) -> tuple[torch.Tensor, int]:
    """Forward and backward over the micro-batches of one optimizer step, on every process: the
    gradient is that of the mean cross-entropy over all their trained tokens together, as if one
    process had run the whole global batch at once. Returns (that mean loss, tokens in the step).

    Micro-batches and processes hold different numbers of trained tokens, so averaging their own
    means (what plain accumulation and the gradient all-reduce do) would give the tokens of short
    micro-batches more weight. Instead each summed loss is divided by the step's global count of
    trained tokens. `accelerator.backward` divides by the accumulation steps and the all-reduce by
    the processes, so the scale undoes both. Gradients are synchronised on the last micro-batch only."""
    # A model that cannot run packed attention takes each example as a micro-batch of its own.
    if not runs_packed(accelerator.unwrap_model(model)):
        micro_batches = one_example_batches(micro_batches)
    n = accelerator.num_processes
    counts = torch.tensor([sum(int((b["targets"] != IGNORE).sum()) for b in micro_batches),
                           sum(b["input_ids"].numel() for b in micro_batches)], dtype=torch.float64,
                          device=accelerator.device)
    trained, tokens = accelerator.reduce(counts, reduction="sum") if n > 1 else counts
    scale = accelerator.gradient_accumulation_steps * n / trained.clamp(min=1)
    total = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # What `accelerator.accumulate` does, from the step's own micro-batches rather than a
        # count of calls: DeepSpeed steps its engine on this flag, DDP and FSDP synchronise
        # gradients on the last micro-batch only.
        accelerator.sync_gradients = last
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss = token_loss(model, batch, reduction="sum")
            accelerator.backward(loss * scale)
        total += loss.detach().float()
    if n > 1:
        total = accelerator.reduce(total, reduction="sum")
    return total / trained.clamp(min=1), int(tokens)
