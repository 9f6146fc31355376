"""The fine-tuning loop: explicit, on accelerate (CPU, one GPU or several processes alike).

setup (data, template, model) -> train (AdamW, warmup + cosine decay, accumulation, clipping,
held-out loss at intervals) -> save (config, template, split, weights or adapter, metrics).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import data as data_mod
from tunelab import speed
from tunelab.batching import encode_examples, pack
from tunelab.checkpoint import Checkpoints, Position, trim_metrics
from tunelab.config import TrainConfig
from tunelab.errors import UserError, check_output_folder
from tunelab.loss import backward_step, heldout_loss
from tunelab.models import load_model, load_tokenizer, resolve_base
from tunelab.runfolder import RunFiles
from tunelab.template import Template


@dataclass
class Prepared:
    """Everything checked before the run folder is touched."""

    base_path: Path
    tokenizer: object
    template: Template
    train: list[data_mod.Example]
    test: list[data_mod.Example]
    train_encoded: list
    test_encoded: list
    report: object = None
    """The data check's Report, saved in the run folder."""


def prepare(config: TrainConfig, data_path: Path, out: Path | None = None) -> Prepared:
    """Check the data (errors stop here, with the report saved in `out`), then split and encode."""
    from tunelab.datacheck import CheckOptions, run_check

    base_path = resolve_base(config.base)
    tokenizer = load_tokenizer(base_path)
    template = Template.for_model(tokenizer, config.template)
    report = run_check(data_path, CheckOptions.from_config(config), template, out)
    examples = [e for e in data_mod.load_examples(data_path, config.format) if e.line not in report.duplicate_lines]
    train, test = data_mod.split(examples, config.test_size, config.seed, groups=report.groups)
    encode = dict(max_length=config.max_length, truncation=config.truncation,
                  train_on_prompt=config.train_on_prompt, source=str(data_path))
    train_encoded, stats = encode_examples(train, template, **encode)
    if stats.dropped or stats.truncated:
        print(f"{data_path}: {len(stats.dropped)} example(s) over --max-length {config.max_length} dropped "
              f"(lines {', '.join(map(str, stats.dropped[:10]))}{'...' if len(stats.dropped) > 10 else ''}), "
              f"{stats.truncated} truncated")
    test_encoded = encode_examples(test, template, **encode)[0] if test else []
    return Prepared(base_path, tokenizer, template, train, test, train_encoded, test_encoded, report)


def build_model(config: TrainConfig, base_path: Path):
    model = load_model(base_path)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(",")
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"--lora-targets {config.lora_targets}: {str(e).splitlines()[0]}") from None
    return model


def check_out(files: RunFiles, overwrite: bool, resume: bool, force: bool) -> None:
    out = files.root
    check_output_folder(out, "--out")
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite replaces it; pass one of them")
    if force and not resume:
        raise UserError("--force only applies with --resume")
    if resume and not files.config.exists():
        raise UserError(f"{out}: no run to resume (no config.yaml); drop --resume to start one")
    if files.config.exists() and not (overwrite or resume):
        raise UserError(f"{out}: already holds a run; choose another --out, pass --overwrite, "
                        "or --resume to continue it")


def step_groups(micro_batches, size: int):
    """The micro-batches of each optimizer step, `size` at a time (the last of an epoch may be short)."""
    while group := list(itertools.islice(micro_batches, size)):
        yield group


def default_out(data_path: Path) -> Path:
    return Path("runs") / f"{data_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig, data_path: Path, out: Path, overwrite: bool = False, quiet: bool = False,
          resume: bool = False, force: bool = False) -> Path:
    """Train and save a run in `out`. `resume` continues the run there from its newest complete
    checkpoint; `force` lets it continue although the data or options changed."""
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    files = RunFiles(out)
    check_out(files, overwrite, resume, force)
    # The data check's report goes into --out only where it cannot mix with an earlier run's files.
    prepared = prepare(config, data_path, out if not files.config.exists() else None)
    checkpoints = Checkpoints(out, config, data_path)
    start = checkpoints.resume_point(force) if resume else None

    speed.configure_threads()
    accelerator = speed.make_accelerator(config.grad_accum, config.precision)
    set_seed(config.seed)
    model = build_model(config, prepared.base_path)
    model = speed.prepare_model(model, config.gradient_checkpointing, config.compile)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = speed.make_optimizer(trainable, config.learning_rate, config.weight_decay, accelerator.device)

    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        prepared.train_encoded, batch_size=config.batch_size, shuffle=True, collate_fn=pack, generator=generator,
    )
    # Under `accelerate launch` each process takes every n-th micro-batch (one global batch is n
    # micro-batches side by side), and accelerate steps a prepared scheduler n times per step.
    n = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(loader) / n) / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    warmup = round(total_steps * config.warmup_ratio)
    # accelerate steps a scheduler once per process at each step; DeepSpeed's engine steps it once.
    per_step = 1 if accelerator.distributed_type == DistributedType.DEEPSPEED else n
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * per_step, total_steps * per_step)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP swaps in sharded ones
    eval_every = config.eval_every or max(1, total_steps // 4)
    eval_set = prepared.test_encoded[: config.eval_examples]

    if accelerator.is_main_process:
        if overwrite and files.config.exists():  # only ever delete what is known to be a run
            shutil.rmtree(out)
        files.create(config, prepared.template, prepared.train, prepared.test, prepared.base_path,
                     len(prepared.train_encoded))
        prepared.report.save(out)
        if resume:
            trim_metrics(files.metrics, start.step if start else -1)
    metrics = files.metrics_writer() if accelerator.is_main_process else None

    def evaluate(step: int) -> float | None:
        if not eval_set:
            return None
        model.eval()
        loss = heldout_loss(accelerator.unwrap_model(model), eval_set, config.batch_size)
        model.train()
        if metrics:
            metrics.write({"step": step, "eval_loss": round(loss, 5)})
        bar.write(f"step {step}: held-out loss {loss:.4f}")
        return loss

    position = Position()
    if start:
        position = checkpoints.load(start, accelerator.unwrap_model(model), config.method, optimizer, scheduler,
                                    generator)
    step, tokens, started = position.step, position.tokens, time.perf_counter() - position.elapsed_s
    epoch, consumed = position.epoch, position.batch
    bar = tqdm(total=total_steps, initial=step, desc="training", disable=quiet or not accelerator.is_main_process,
               unit="step")
    if not start:
        evaluate(0)
    with speed.reuse_freed_memory(enabled=accelerator.device.type == "cpu"):
        while step < total_steps:
            epoch_rng = generator.get_state()  # this epoch's data order is drawn from here
            # On resume, skip the micro-batches of this epoch that the checkpoint had consumed.
            for micro_batches in step_groups(itertools.islice(loader, consumed, None), config.grad_accum):
                consumed += len(micro_batches)
                loss, step_tokens = backward_step(accelerator, model, micro_batches)
                tokens += step_tokens
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                elapsed = time.perf_counter() - started
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update()
                if metrics:
                    metrics.write({"step": step, "loss": round(loss_value, 5), "lr": scheduler.get_last_lr()[0],
                                   "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
                                   "elapsed_s": round(elapsed, 2)})
                saving = checkpoints.due(step)
                eval_loss = None
                if step % eval_every == 0 or step == total_steps or saving:
                    eval_loss = evaluate(step)
                if saving and accelerator.is_main_process:
                    checkpoints.save(Position(step, epoch, consumed, tokens, elapsed), eval_loss,
                                     accelerator.unwrap_model(model), config.method, optimizer, scheduler, epoch_rng)
                if step >= total_steps:
                    break
            epoch, consumed = epoch + 1, 0
    bar.close()
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards: every process takes part
    if accelerator.is_main_process:
        files.save_weights(accelerator.unwrap_model(model), config.method, state)
        metrics.close()
    return out
