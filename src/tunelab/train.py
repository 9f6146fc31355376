"""The fine-tuning loop: explicit, on accelerate (CPU, one GPU or several processes alike).

setup (data, template, model) -> train (AdamW, warmup + cosine decay, accumulation, clipping,
held-out loss at intervals) -> save (config, template, split, weights or adapter, metrics).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab import data as data_mod
from tunelab import speed
from tunelab.batching import encode_examples, heldout_loss, pack
from tunelab.config import TrainConfig
from tunelab.errors import UserError
from tunelab.models import load_model, load_tokenizer, resolve_base
from tunelab.run import RunFiles
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


def prepare(config: TrainConfig, data_path: Path) -> Prepared:
    examples = data_mod.load_examples(data_path, config.format)
    train, test = data_mod.split(examples, config.test_size, config.seed)
    base_path = resolve_base(config.base)
    tokenizer = load_tokenizer(base_path)
    template = Template.for_model(tokenizer, config.template)
    encode = dict(max_length=config.max_length, truncation=config.truncation,
                  train_on_prompt=config.train_on_prompt, source=str(data_path))
    train_encoded, stats = encode_examples(train, template, **encode)
    if stats.dropped or stats.truncated:
        print(f"{data_path}: {len(stats.dropped)} example(s) over --max-length {config.max_length} dropped "
              f"(lines {', '.join(map(str, stats.dropped[:10]))}{'...' if len(stats.dropped) > 10 else ''}), "
              f"{stats.truncated} truncated")
    test_encoded = encode_examples(test, template, **encode)[0] if test else []
    return Prepared(base_path, tokenizer, template, train, test, train_encoded, test_encoded)


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


def default_out(data_path: Path) -> Path:
    return Path("runs") / f"{data_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(config: TrainConfig, data_path: Path, out: Path, overwrite: bool = False, quiet: bool = False) -> Path:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    out = Path(out)
    files = RunFiles(out)
    if files.config.exists() and not overwrite:
        raise UserError(f"{out}: already holds a run; choose another --out or pass --overwrite")
    prepared = prepare(config, data_path)

    speed.configure_threads()
    accelerator = speed.make_accelerator(config.grad_accum, config.precision)
    set_seed(config.seed)
    model = build_model(config, prepared.base_path)
    model = speed.prepare_model(model, config.gradient_checkpointing, config.compile)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = speed.make_optimizer(trainable, config.learning_rate, config.weight_decay, accelerator.device)

    loader = torch.utils.data.DataLoader(
        prepared.train_encoded, batch_size=config.batch_size, shuffle=True, collate_fn=pack,
        generator=torch.Generator().manual_seed(config.seed),
    )
    # Under `accelerate launch` each process takes every n-th micro-batch (one global batch is n
    # micro-batches side by side), and accelerate steps a prepared scheduler n times per step.
    n = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(loader) / n) / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(steps_per_epoch * config.epochs))
    warmup = round(total_steps * config.warmup_ratio)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup * n, total_steps * n)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    eval_every = config.eval_every or max(1, total_steps // 4)
    eval_set = prepared.test_encoded[: config.eval_examples]

    if accelerator.is_main_process:
        if out.exists() and overwrite:
            shutil.rmtree(out)
        files.create(config, prepared)
    metrics = files.metrics_writer() if accelerator.is_main_process else None

    def evaluate(step: int) -> None:
        if not eval_set:
            return
        model.eval()
        loss = heldout_loss(accelerator.unwrap_model(model), eval_set, config.batch_size)
        model.train()
        if metrics:
            metrics.write({"step": step, "eval_loss": round(loss, 5)})
        bar.write(f"step {step}: held-out loss {loss:.4f}")

    bar = tqdm(total=total_steps, desc="training", disable=quiet or not accelerator.is_main_process, unit="step")
    step, tokens, started = 0, 0, time.perf_counter()
    evaluate(0)
    while step < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss, reported, batch_tokens = speed.global_token_loss(accelerator, model, batch)
                accelerator.backward(loss)
                tokens += batch_tokens
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            elapsed = time.perf_counter() - started
            loss_value = reported.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / elapsed:.0f}")
            bar.update()
            if metrics:
                metrics.write({"step": step, "loss": round(loss_value, 5), "lr": scheduler.get_last_lr()[0],
                               "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
                               "elapsed_s": round(elapsed, 2)})
            if step % eval_every == 0 or step == total_steps:
                evaluate(step)
            if step >= total_steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # gathers FSDP/DeepSpeed shards: every process takes part
    if accelerator.is_main_process:
        files.save_weights(accelerator.unwrap_model(model), config.method, state)
        metrics.close()
    return out
