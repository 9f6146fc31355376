"""Preference tuning: DPO and ORPO on pairs of answers to one prompt (rows with 'chosen' and
'rejected', data/load.py), in the same loop, template, checkpoints and resume as SFT.

- `check_options`, `check_pairs`: what a preference run refuses before it starts (DPO on a full
  fine-tune, --copy-augment; rows without a rejected answer);
- `encode_pairs`: each pair's chosen and rejected conversations encoded by the run's template,
  trained on the response only (its end-of-turn token included), under --max-length;
- `collate`: the pairs of a micro-batch packed in one padding-free row (batching.pack) as SFT
  packs examples, all chosen answers then all rejected ones, so both sides of a pair are always
  in the same forward pass; no padding is needed, so none is spent;
- `sequence_logps`: each sequence's summed log-probability of its response tokens;
- `dpo_loss`, `orpo_loss`: the loss of each pair, and the rewards logged beside it;
- `backward_step`: forward and backward over the micro-batches of one optimizer step, every pair
  weighing the same across micro-batches and processes (as every token does in SFT, loss.py).

DPO (Rafailov et al., 2023): -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), with pi and
ref the summed response log-probs of the model being trained and of the reference, the base
model. In a LoRA run the reference is the same model with its adapter switched off (peft's
`disable_adapter`), so no second copy is held; at the first step (LoRA's B is zero) the two
agree and every pair's loss is log 2. A full fine-tune would need a frozen copy of every weight,
twice the memory (and a second sharded model under FSDP), so --objective dpo refuses --method
full and names orpo, which needs no reference.

ORPO (Hong et al., 2024): the chosen answers' token loss (as SFT) plus beta * -logsigmoid of the
log odds ratio, odds = p / (1 - p) of each answer's mean token log-prob p (length-normalised, so
a long answer is not unlikely for its length alone). TRL's ORPOTrainer computes the same.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tunelab.data.load import Example
from tunelab.device import one_example_batches, runs_packed
from tunelab.encoding import encode_one
from tunelab.errors import UserError
from tunelab.template import IGNORE, Encoded, Template
from tunelab.train.batching import pack


@dataclass
class Pair:
    """One preference row, encoded: the prompt with the chosen answer, and with the rejected one."""

    chosen: Encoded
    rejected: Encoded
    line: int
    """The row's line in the data file."""


def check_options(config) -> None:
    """Refuse, in one line and before the data is read, options a preference run cannot train with."""
    objective = config.objective
    if objective == "dpo" and config.method == "full":
        raise UserError("--objective dpo needs --method lora: its reference model is the base, which a LoRA run "
                        "has by switching the adapter off, while a full fine-tune would hold a second copy of "
                        "every weight; use --method lora, or --objective orpo (no reference model)")
    if config.copy_augment:
        raise UserError(f"--copy-augment makes variants of answers to learn, which --objective {objective} has "
                        "no rejected answers for; drop --copy-augment, or train with --objective sft")


def check_pairs(examples: list[Example], objective: str, source: Path | str) -> None:
    """Refuse, in one line, data that is not all pairs."""
    unpaired = [e.line for e in examples if e.rejected is None]
    if len(unpaired) == len(examples):
        raise UserError(f"{source}: --objective {objective} learns from pairs of a chosen and a rejected answer, and "
                        "no row has one; give rows 'prompt', 'chosen' and 'rejected' (docs/TRAINING.md), or "
                        "train with --objective sft")
    if unpaired:
        more = f" (and {len(unpaired) - 1} more rows)" if len(unpaired) > 1 else ""
        raise UserError(f"{source}:{unpaired[0]}: no rejected answer{more}, and --objective {objective} learns "
                        "from pairs only; give every row 'chosen' and 'rejected', or train with --objective sft")


def encode_pairs(examples: list[Example], template: Template, config,
                 source: str = "data") -> tuple[list[Pair], list[int]]:
    """(the pairs to train on, lines of those dropped for length). Both sides follow --truncation:
    a pair is dropped when either is over --max-length (drop), or both are cut to it (truncate)."""
    pairs, dropped = [], []
    for example in examples:
        sides = []
        for side in (example, Example(example.rejected_messages(), example.line)):
            full, pieces, outcome = encode_one(side, template, config.max_length, config.truncation,
                                               config.train_on_prompt)
            if outcome == "too_long":
                raise UserError(f"{source}:{example.line}: a side of this pair has {len(full.input_ids)} tokens, "
                                f"over --max-length {config.max_length}; raise --max-length or pass "
                                "--truncation drop/truncate")
            if outcome == "no_trainable":
                raise UserError(f"{source}:{example.line}: no answer token of this pair is left to train after "
                                f"truncation to {config.max_length} tokens; raise --max-length or shorten the prompt")
            sides.append(pieces[0] if pieces else None)
        if None in sides:
            dropped.append(example.line)
        else:
            pairs.append(Pair(sides[0], sides[1], example.line))
    if not pairs:
        raise UserError(f"{source}: every pair is longer than --max-length {config.max_length}; raise it")
    return pairs, dropped


def collate(pairs: list[Pair]) -> dict[str, torch.Tensor]:
    """One packed row: the chosen sides of `pairs`, then their rejected sides."""
    return pack([p.chosen for p in pairs] + [p.rejected for p in pairs])


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    return (len(batch["cu_seq_lens_q"]) - 1) // 2


def chosen_token_count(batch: dict[str, torch.Tensor]) -> int:
    """Trained tokens of the chosen answers: those before the first rejected sequence."""
    first_rejected = int(batch["cu_seq_lens_q"][pair_count(batch)])
    return int((batch["targets"][0, :first_rejected] != IGNORE).sum())


def sequence_logps(model, batch: dict[str, torch.Tensor], packed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's trained tokens, how many there are), a value per
    sequence of the packed row. As in loss.token_loss, the output projection runs only at
    trained positions; `packed=False` (a model that cannot keep packed examples apart in
    attention) runs each sequence as its own forward pass."""
    rows = [batch] if packed else one_example_batches([batch])
    sums, counts = [], []
    for row in rows:
        targets = row["targets"][0]
        keep = (targets != IGNORE).nonzero().squeeze(-1)
        inputs = {k: row[k] for k in ("input_ids", "position_ids", "cu_seq_lens_q")}
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[0].float()
        token_logps = logits.log_softmax(-1).gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1)
        ends = row["cu_seq_lens_q"][1:].to(keep.device, torch.int64)
        sequence = torch.bucketize(keep, ends, right=True)  # the sequence each trained position is in
        sums.append(token_logps.new_zeros(len(ends)).index_add(0, sequence, token_logps))
        counts.append(torch.bincount(sequence, minlength=len(ends)))
    return torch.cat(sums), torch.cat(counts)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's DPO loss, the rewards beta * (policy - reference) of its chosen and rejected
    answers), from summed response log-probs."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0; a mean log-prob that rounds to 0 is held just below it."""
    return torch.log(-torch.expm1(x.clamp(max=-1e-6)))


def orpo_loss(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor, rejected_logps: torch.Tensor,
              rejected_tokens: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each pair's odds-ratio term beta * -logsigmoid(log odds ratio), the rewards beta * mean
    token log-prob of its chosen and rejected answers, as TRL logs them). The chosen answers'
    token loss, ORPO's other term, is the caller's: it weighs tokens, not pairs."""
    chosen_mean = chosen_logps / chosen_tokens.clamp(min=1)
    rejected_mean = rejected_logps / rejected_tokens.clamp(min=1)
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return -beta * F.logsigmoid(log_odds), beta * chosen_mean.detach(), beta * rejected_mean.detach()


def backward_step(accelerator, model, micro_batches: list[dict], objective: str,
                  beta: float) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Forward and backward over the micro-batches of one optimizer step (of `collate`d pairs):
    the gradient is that of the mean loss over all their pairs together (ORPO's token loss: the
    mean over all their chosen answer tokens), as if one process had run the whole step at once;
    the scaling is loss.backward_step's. Returns (that loss, tokens in the step, the mean reward
    margin chosen - rejected and the share of pairs whose chosen answer has the higher reward)."""
    packed = runs_packed(accelerator.unwrap_model(model))
    n = accelerator.num_processes
    counts = torch.tensor([sum(pair_count(b) for b in micro_batches), sum(chosen_token_count(b) for b in micro_batches),
                           sum(b["input_ids"].numel() for b in micro_batches)], dtype=torch.float64,
                          device=accelerator.device)
    pairs, chosen_tokens, tokens = accelerator.reduce(counts, reduction="sum") if n > 1 else counts
    scale = accelerator.gradient_accumulation_steps * n
    sums = torch.zeros(3, device=accelerator.device)  # loss, reward margins, pairs ranked right
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        accelerator.sync_gradients = last  # as loss.backward_step: gradients synchronised on the last
        half = pair_count(batch)
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            if objective == "dpo":
                with torch.no_grad(), accelerator.unwrap_model(model).disable_adapter():
                    reference, _ = sequence_logps(model, batch, packed)
            logps, lengths = sequence_logps(model, batch, packed)
            if objective == "dpo":
                losses, chosen_rewards, rejected_rewards = dpo_loss(logps[:half], logps[half:], reference[:half],
                                                                    reference[half:], beta)
                loss = losses.sum() / pairs
            else:
                losses, chosen_rewards, rejected_rewards = orpo_loss(logps[:half], lengths[:half], logps[half:],
                                                                     lengths[half:], beta)
                loss = -logps[:half].sum() / chosen_tokens.clamp(min=1) + losses.sum() / pairs
            accelerator.backward(loss * scale)
        sums += torch.stack([loss.detach().float(), (chosen_rewards - rejected_rewards).sum().float(),
                             (chosen_rewards > rejected_rewards).sum().float()])
    if n > 1:
        sums = accelerator.reduce(sums, reduction="sum")
    loss, margins, right = sums
    return loss, int(tokens), {"reward_margin": round(float(margins / pairs), 5),
                               "reward_accuracy": round(float(right / pairs), 4)}
