"""The fine-tuning loop: explicit, on accelerate (CPU, one GPU or several processes alike).

`train` reads in four steps:
- prepare: check the data (the data check encodes every example, and hands the encodings on),
  split and encode it, before anything is written;
- set_up: accelerator, model, AdamW, warmup + cosine decay, the loader; the run folder;
- run_loop: accumulation, clipping, held-out loss at intervals, checkpoints (loss.py has the
  forward/backward step itself; preference.py that of --objective dpo and orpo), early stopping
  and the best weights (stopping.py);
- save_final: the weights or adapter (the last step's, or with --keep-best the best) beside
  config, template, split and metrics; where and why training stopped in run.json.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tunelab import device, fit
from tunelab.config import TrainConfig
from tunelab.data import load as data_mod
from tunelab.data.augment import copy_variants
from tunelab.data.check import Report, run_check
from tunelab.data.load import Example
from tunelab.encoding import EncodedExample, collect_encoded, encode_examples, encode_one
from tunelab.errors import UserError, check_output_folder, known_warnings_hidden
from tunelab.models import load_model, load_tokenizer, resolve_base
from tunelab.runfolder import MetricsWriter, RunFiles
from tunelab.runlock import LOCK_FILE, RunLock
from tunelab.template import Encoded, Template
from tunelab.train import preference
from tunelab.train.batching import pack
from tunelab.train.checkpoint import Checkpoint, Checkpoints, Position, finished_run, process_rng_states, trim_metrics
from tunelab.train.loss import backward_step, heldout_loss
from tunelab.train.stopping import BestWeights, Watch, eval_every, record, refuse_without_heldout

if TYPE_CHECKING:
    from accelerate import Accelerator

IN_MEMORY_BYTES = 256 << 20
"""Data files up to this size are read and encoded once: the data check keeps every example and
its encoding for training, which holds all encodings in memory anyway. Larger files are checked
streaming, in bounded memory, and then read and encoded again for training."""


@dataclass
class Prepared:
    """Everything checked before the run folder is touched."""

    base_path: Path
    """The base model's local folder."""
    template: Template
    """The prompt template, with its tokenizer."""
    train: list[Example]
    """The training side of the split (exact duplicates removed), in file order."""
    test: list[Example]
    """The held-out side of the split."""
    train_encoded: list[Encoded]
    """What is trained: the training examples encoded, cut or chunked, those too long dropped;
    then the `extra` rows' pieces (`extra_pieces` of them); then the `augmented` variants."""
    test_encoded: list[Encoded]
    """The held-out examples encoded, for the held-out loss."""
    dropped: list[int]
    """Lines of training examples dropped for being longer than --max-length."""
    report: Report
    """The data check's report, saved in the run folder."""
    augmented: list[Example]
    """Variants of training examples added by --copy-augment (see augment.py), one encoding each at
    the end of `train_encoded`."""
    extra: list[Example]
    """The --data-extra rows (data/extra.py), trained besides the split; their lines are the extra file's."""
    extra_pieces: int = 0
    """What the extra rows became after encoding, in `train_encoded` after the training examples'."""
    train_pairs: list[preference.Pair] | None = None
    """With --objective dpo or orpo, what is trained instead of `train_encoded`: the training
    pairs encoded, those too long dropped."""

    @property
    def tokenizer(self):
        return self.template.tokenizer


def is_main_process() -> bool:
    """Whether this is the process that prints and writes the run folder: the only one, or rank 0
    under `accelerate launch` (as accelerate decides, known before it is set up)."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare(config: TrainConfig, data_path: Path, out: Path | None = None, show: bool = True) -> Prepared:
    """Check the data (errors stop here, with the report saved in `out`), then split and encode.
    Every process of a launched run prepares the same data; only the one that `show`s prints."""
    data_mod.check_data_file(data_path)  # before the base model is converted or loaded
    if config.objective != "sft":
        preference.check_options(config)
    base_path = resolve_base(config.base)
    fit.check_fits(config, base_path)  # before the data check's work and long before the weights load
    template = Template.for_model(load_tokenizer(base_path), config.template)
    data_path = Path(data_path)
    in_memory = data_path.is_file() and data_path.stat().st_size <= IN_MEMORY_BYTES
    report = run_check(data_path, config, template, out, keep_examples=in_memory, show=show)
    checked = {item.example.line: item for item in report.examples or []}
    if in_memory:
        examples = [item.example for item in report.examples if item.example.line not in report.duplicate_lines]
    else:
        examples = [e for e in data_mod.load_examples(data_path, config.format, split_by=config.split_by)
                    if e.line not in report.duplicate_lines]
    if config.objective != "sft":
        preference.check_pairs(examples, config.objective, data_path)
    train, test = data_mod.split(examples, config.test_size, config.seed, groups=report.groups,
                                 split_by=config.split_by)
    replaced = {held for held, _ in report.extra_replaced}  # by extra rows with their prompt (data/extra.py)
    test = [e for e in test if e.line not in replaced]
    if config.train_examples is not None:
        train = first_examples(train, config.train_examples, config.seed, data_path)

    def encoded(examples: list[Example]):
        for example in examples:
            yield checked.get(example.line) or EncodedExample(example, *encode_one(
                example, template, config.max_length, config.truncation, config.train_on_prompt))

    train_encoded, stats = collect_encoded(encoded(train), config.max_length, str(data_path))
    if show and (stats.dropped or stats.truncated):
        print(f"{data_path}: {len(stats.dropped)} example(s) over --max-length {config.max_length} dropped "
              f"(lines {', '.join(map(str, stats.dropped[:10]))}{'...' if len(stats.dropped) > 10 else ''}), "
              f"{stats.truncated} truncated")
    test_encoded = collect_encoded(encoded(test), config.max_length, str(data_path))[0] if test else []
    report.examples = None  # what training needs is taken; the rest (copies, cut-off originals) goes
    extra = report.extra or []
    extra_pieces = 0
    if extra:
        pieces, extra_stats = encode_examples(extra, template, config.max_length, config.truncation,
                                              config.train_on_prompt, source=str(config.data_extra))
        train_encoded += pieces
        extra_pieces = len(pieces)
        if show and extra_stats.dropped:
            print(f"{config.data_extra}: {len(extra_stats.dropped)} extra row(s) over --max-length "
                  f"{config.max_length} dropped (lines {', '.join(map(str, extra_stats.dropped[:10]))})")
    augmented = []
    if config.copy_augment:
        augmentation = copy_variants(train, test, config.copy_augment, config.seed)
        if show:
            print(f"{data_path}: {augmentation.summary(len(train), config.copy_augment)}")
        for variant in augmentation.variants:
            _, pieces, outcome = encode_one(variant, template, config.max_length, config.truncation,
                                            config.train_on_prompt)
            # A surrogate may take more tokens than the name it replaces; its original is trained anyway.
            if outcome in ("kept", "truncated"):
                train_encoded += pieces
                augmented.append(variant)
    dropped, pairs = stats.dropped, None
    if config.objective != "sft":
        pairs, dropped = preference.encode_pairs(train, template, config, str(data_path))
        if extra:
            preference.check_pairs(extra, config.objective, Path(str(config.data_extra)))
            extra_pairs, _ = preference.encode_pairs(extra, template, config, str(config.data_extra))
            pairs += extra_pairs
            extra_pieces = len(extra_pairs)
    return Prepared(base_path, template, train, test, train_encoded, test_encoded, dropped, report, augmented,
                    extra, extra_pieces, pairs)


def first_examples(train: list[Example], n: int, seed: int, data_path: Path) -> list[Example]:
    """The first `n` training examples in an order drawn from `seed` (a hash of each example's
    content, as the split ranks them, salted apart from the split's), kept in file order. A
    smaller `n` takes a subset of a larger one's, whatever the row order of the file."""
    if n > len(train):
        raise UserError(f"--train-examples {n}: the training split of {data_path} has {len(train)} examples")
    order = sorted(train, key=lambda e: data_mod.split_rank(f"subset:{e.key}", seed))
    chosen = {e.line for e in order[:n]}
    return [e for e in train if e.line in chosen]


def build_model(config: TrainConfig, base_path: Path):
    model = load_model(base_path)
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        targets = config.lora_targets if config.lora_targets == "all-linear" else config.lora_targets.split(",")
        _refuse_tied_targets(model, targets, base_path)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, lora)
        except ValueError as e:
            raise UserError(f"--lora-targets {config.lora_targets}: {str(e).splitlines()[0]}") from None
    return model


def _refuse_tied_targets(model, targets: str | list[str], base_path: Path) -> None:
    """A model that ties its output layer to its input embeddings (SmolLM2 does) has one weight in
    two places, and merging an adapter on either (what `tunelab eval`, `generate` and export do)
    breaks what was trained (peft 0.21): an adapter on the output layer alone, once merged, changes
    the input embeddings too; with peft's `ensure_weight_tying`, one adapter serves both places but
    is added to the shared weight twice. 'all-linear' leaves the output layer out."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if targets == "all-linear" or head is None or head.weight is not embeddings.weight:
        return
    tied = [name for name, module in model.named_modules() if module is head or module is embeddings]
    named = [t for t in targets if any(name == t or name.endswith("." + t) for name in tied)]
    if named:
        raise UserError(f"--lora-targets {','.join(named)}: {base_path} ties its output layer to its input "
                        "embeddings, and a LoRA adapter on a tied layer does not merge into the model; leave "
                        f"{'it' if len(named) == 1 else 'them'} out (the default all-linear does) or use --method full")


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


@dataclass
class Training:
    """What the loop works with, set up once per run."""

    accelerator: Accelerator
    model: torch.nn.Module
    """Prepared by accelerate (wrapped for DDP, FSDP or DeepSpeed when launched so)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: torch.utils.data.DataLoader
    """Packed micro-batches of the training examples, reshuffled every epoch."""
    generator: torch.Generator
    """The loader's shuffling generator: its state at an epoch's start is saved in checkpoints."""
    trainable: list[torch.nn.Parameter]
    total_steps: int
    eval_every: int
    eval_set: list[Encoded]
    """The held-out examples whose loss is measured during training."""
    threads: int = 1
    """torch's CPU threads (`device.configure_threads`), said in run.json with the device."""


SHARDED = ("FSDP", "DEEPSPEED")
"""accelerate's distributed types in which a process holds only part of the weights or the
optimizer state: a checkpoint written by one process would hold only its own part."""


def refuse_sharded_checkpoints(distributed_type: str, config: TrainConfig, resuming: bool) -> None:
    kind = getattr(distributed_type, "value", distributed_type)
    if kind not in SHARDED:
        return
    flag = "--save-every" if config.save_every else "--resume" if resuming else None
    if flag:
        raise UserError(f"{flag}: checkpoints are not supported under {kind} (each process holds only a shard "
                        f"of the weights and optimizer state); drop {flag}, or launch with DDP "
                        "(`accelerate launch --multi_gpu`) to save and resume checkpoints")


def set_up(config: TrainConfig, prepared: Prepared, resuming: bool, threads: int | None = None) -> Training:
    """Accelerator, model, optimizer, schedule and loader, as accelerate prepares them; torch's
    CPU threads (`threads`, by default the cores other programs leave free)."""
    from accelerate.utils import DistributedType, set_seed
    from transformers import get_cosine_schedule_with_warmup

    threads = device.configure_threads(threads)
    accelerator = device.make_accelerator(config.grad_accum, config.precision)
    refuse_sharded_checkpoints(accelerator.distributed_type, config, resuming)
    set_seed(config.seed)
    with known_warnings_hidden():
        model = build_model(config, prepared.base_path)
        if config.method == "lora" and accelerator.mixed_precision == "bf16" and accelerator.distributed_type in (
                DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):  # FSDP wants one dtype
            device.frozen_base_in_bf16(model)
        model = device.prepare_model(model, config.gradient_checkpointing, config.compile, accelerator.device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = device.make_optimizer(trainable, config.learning_rate, config.weight_decay, accelerator.device)

    generator = torch.Generator().manual_seed(config.seed)
    pairs = prepared.train_pairs is not None  # each micro-batch: --batch-size pairs, both sides of each
    loader = torch.utils.data.DataLoader(
        prepared.train_pairs if pairs else prepared.train_encoded, batch_size=config.batch_size, shuffle=True,
        collate_fn=preference.collate if pairs else pack, generator=generator,
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
    every, note = eval_every(config, total_steps)
    if note and accelerator.is_main_process:
        print(note, file=sys.stderr if note.startswith("tunelab: note:") else sys.stdout)
    return Training(accelerator, model, optimizer, scheduler, loader, generator, trainable, total_steps,
                    eval_every=every, eval_set=prepared.test_encoded[: config.eval_examples], threads=threads)


def open_run_folder(files: RunFiles, config: TrainConfig, prepared: Prepared, overwrite: bool,
                    start: Checkpoint | None, resume: bool, fingerprint: dict | None = None,
                    compute: dict | None = None) -> MetricsWriter:
    """Lay out the run folder (main process only) and open its metrics for appending; `compute`
    says in run.json what trained it (device, threads)."""
    if overwrite and files.config.exists():  # only ever delete what is known to be a run
        for path in files.root.iterdir():
            if path.name == LOCK_FILE:  # this training's own lock stays
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    files.create(config, prepared.template, prepared.base_path, prepared.train, prepared.test, prepared.dropped,
                 (len(prepared.train_pairs) if prepared.train_pairs is not None
                  else len(prepared.train_encoded) - len(prepared.augmented)) - prepared.extra_pieces,
                 prepared.augmented, [f.path for f in prepared.report.copied], fingerprint, prepared.extra,
                 prepared.report.extra_replaced, compute)
    prepared.report.save(files.root)
    if resume:
        trim_metrics(files.metrics, start.step if start else -1)
        stale = [path for path in (files.eval, files.report) if path.exists()]
        for path in stale:  # they describe the weights this training replaces
            path.unlink()
        if stale:
            print(f"tunelab: note: {' and '.join(path.name for path in stale)} removed from {files.root}: they were "
                  f"of the weights before this resume; run `tunelab eval {files.root}` once it ends", file=sys.stderr)
    return files.metrics_writer()


def evaluate(training: Training, step: int, batch_size: int, metrics: MetricsWriter | None, bar) -> float | None:
    """The held-out loss, on every process (each on the whole held-out set, so none waits in a
    collective the others skip); written to the metrics by the main one."""
    if not training.eval_set:
        return None
    training.model.eval()
    loss = heldout_loss(training.accelerator.unwrap_model(training.model), training.eval_set, batch_size)
    training.model.train()
    device.release_freed_memory()  # the pass's activations stay free in the heap otherwise
    if training.accelerator.is_main_process:
        bar.write(f"step {step}: held-out loss {loss:.4f}")
    if metrics:
        metrics.write({"step": step, "eval_loss": round(loss, 5)})
    return loss


def run_loop(training: Training, config: TrainConfig, checkpoints: Checkpoints, start: Checkpoint | None,
             metrics: MetricsWriter | None, quiet: bool) -> Watch:
    """Optimizer steps from the start (or the checkpoint) to the last, or to where early stopping
    stops, with held-out losses and checkpoints on the way. Every process runs all of it: the
    gradient all-reduce, the held-out loss and the gathering of RNG states for a checkpoint are
    collectives. Returns the watch over the held-out losses (stopping.py)."""
    from tqdm.auto import tqdm

    t, accelerator = training, training.accelerator
    position = Position()
    if start:
        position = checkpoints.load(start, accelerator.unwrap_model(t.model), config.method, t.optimizer,
                                    t.scheduler, t.generator, accelerator.process_index)
    watch = Watch.resumed(config.early_stopping, start.info.get("stopping") if start else None)
    watch.step = position.step
    best = BestWeights(checkpoints.root.parent) if config.keep_best else None
    if best and accelerator.is_main_process:
        best.start(watch.best_step if start else None)
    step, tokens, started = position.step, position.tokens, time.perf_counter() - position.elapsed_s
    epoch, consumed = position.epoch, position.batch
    bar = tqdm(total=t.total_steps, initial=step, desc="training", unit="step",
               disable=quiet or not accelerator.is_main_process)
    if not start:
        look(t, config, watch, best, evaluate(t, 0, config.batch_size, metrics, bar), bar, checkpoints.root.parent)
    reuse = accelerator.device.type == "cpu"
    heap = device.FreedMemoryCap() if reuse else None
    with device.reuse_freed_memory(enabled=reuse), bar:
        while step < t.total_steps and not watch.stopped:
            epoch_rng = t.generator.get_state()  # this epoch's data order is drawn from here
            # On resume, skip the micro-batches of this epoch that the checkpoint had consumed.
            for micro_batches in step_groups(itertools.islice(t.loader, consumed, None), config.grad_accum):
                consumed += len(micro_batches)
                preferences: dict[str, float] = {}  # reward margin and accuracy of dpo and orpo
                if config.objective == "sft":
                    loss, step_tokens = backward_step(accelerator, t.model, micro_batches)
                else:
                    loss, step_tokens, preferences = preference.backward_step(accelerator, t.model, micro_batches,
                                                                              config.objective, config.beta)
                tokens += step_tokens
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(t.trainable, config.max_grad_norm)
                t.optimizer.step()
                lr = t.scheduler.get_last_lr()[0]  # the rate this step used, before the schedule moves on
                t.scheduler.step()
                t.optimizer.zero_grad()
                if heap:
                    heap.after_step()
                step += 1
                elapsed = time.perf_counter() - started
                loss_value = loss.item()
                watch.trained(step, loss_value)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tokens / elapsed:.0f}")
                bar.update()
                if metrics:
                    metrics.write({"step": step, "loss": round(loss_value, 5), "lr": lr,
                                   "tokens": tokens, "tokens_per_s": round(tokens / elapsed, 1),
                                   "elapsed_s": round(elapsed, 2), **preferences})
                saving = checkpoints.due(step)
                # A save measures the held-out loss for its checkpoint, but only the evaluations at
                # --eval-every and the last step count for stopping (--save-every may change on resume).
                watched = step % t.eval_every == 0 or step == t.total_steps
                eval_loss = None
                if watched or saving:
                    eval_loss = evaluate(t, step, config.batch_size, metrics, bar)
                if watched:
                    look(t, config, watch, best, eval_loss, bar, checkpoints.root.parent)
                if saving:
                    rng = process_rng_states(accelerator)  # a collective: every process takes part
                    if accelerator.is_main_process:
                        checkpoints.save(Position(step, epoch, consumed, tokens, elapsed), eval_loss,
                                         accelerator.unwrap_model(t.model), config.method, t.optimizer,
                                         t.scheduler, epoch_rng, rng, watch.to_dict())
                        if best:
                            best.pinned = watch.best_step
                    accelerator.wait_for_everyone()  # none resumes from a checkpoint still being written
                if step >= t.total_steps or watch.stopped:
                    break
            epoch, consumed = epoch + 1, 0
    return watch


def look(training: Training, config: TrainConfig, watch: Watch, best: BestWeights | None, loss: float | None,
         bar, run: Path) -> None:
    """Hand a held-out loss to the watch: with --keep-best, write the weights when it is the
    lowest so far; print W_OVERFITTING, or the stop, when they come."""
    if loss is None:
        return
    accelerator = training.accelerator
    if accelerator.num_processes > 1:  # all decide alike, on the main process's number
        from accelerate.utils import broadcast_object_list

        loss = broadcast_object_list([loss])[0]
    improved, warning = watch.observe(watch.step, loss, run)
    main = accelerator.is_main_process
    if improved and best:
        state = accelerator.get_state_dict(training.model)  # gathers FSDP/DeepSpeed shards: every process
        if main:
            best.save(watch.step, accelerator.unwrap_model(training.model), config.method, state)
        accelerator.wait_for_everyone()
    if main and warning:
        bar.write(warning)
    if main and watch.stopped:
        bar.write(watch.stop_line())


def save_final(training: Training, files: RunFiles, method: str, best_step: int | None = None) -> None:
    """Save the model's weights, or with `best_step` (--keep-best) make that step's, written to
    RUN/best when it was measured, the run's own."""
    training.accelerator.wait_for_everyone()
    if best_step is not None:
        if training.accelerator.is_main_process:
            BestWeights(files.root).publish(best_step, files, method)
        return
    # Gathers FSDP/DeepSpeed shards: every process takes part.
    state = training.accelerator.get_state_dict(training.model)
    if training.accelerator.is_main_process:
        files.save_weights(training.accelerator.unwrap_model(training.model), method, state)


def where_the_run_stands(checkpoints: Checkpoints, data_path: Path, out: Path) -> str:
    """The line printed when training is interrupted: what a resumed run would continue from."""
    found = checkpoints.complete()
    if not found:
        return (f"tunelab: interrupted; {out} has no checkpoint, so a new run starts from the beginning "
                "(pass --save-every N to save checkpoints that --resume continues from)")
    command = shlex.join(["tunelab", "train", str(data_path), "--out", str(out), "--resume"])
    return (f"tunelab: interrupted; the last complete checkpoint is {found[-1].path} (step {found[-1].step}); "
            f"continue with: {command}")


def finished(config: TrainConfig, data_path: Path, out: Path) -> str | None:
    """For `--resume`: the line saying the run in `out` is already finished with this data and
    these options (checkpoint.finished_run), asked under the run folder's lock; None when there
    is something to train."""
    check_output_folder(out, "--out")
    with RunLock(out) if is_main_process() else contextlib.nullcontext():
        return finished_run(RunFiles(out), config, data_path)


def train(config: TrainConfig, data_path: Path, out: Path, overwrite: bool = False, quiet: bool = False,
          resume: bool = False, force: bool = False, threads: int | None = None) -> Path:
    """Train and save a run in `out`. `resume` continues the run there from its newest complete
    checkpoint; `force` lets it continue although the data or options changed; `threads` is
    torch's CPU threads (`device.configure_threads`; a setting of this machine, not of the run,
    so not in the config: a resumed run measures again). The main process
    holds the run folder's lock (runlock.py) throughout, so a second training into it is refused."""
    out = Path(out)
    check_output_folder(out, "--out")
    main = is_main_process()
    with RunLock(out) if main else contextlib.nullcontext():
        try:
            return _train(config, data_path, out, overwrite, quiet, resume, force, main, threads)
        finally:
            # The model, its gradients and AdamW's states (4x the weights in full fine-tuning) are
            # kept by reference cycles until a collection: gone here, before whatever comes next
            # (the demo's evaluation) loads another model.
            device.release_freed_memory()


def _train(config: TrainConfig, data_path: Path, out: Path, overwrite: bool, quiet: bool, resume: bool,
           force: bool, main: bool, threads: int | None) -> Path:
    files = RunFiles(out)
    check_out(files, overwrite, resume, force)
    extra = Path(config.data_extra).resolve() if config.data_extra else None
    if overwrite and extra and extra.is_relative_to(out.resolve()):
        # --overwrite empties the folder, and --resume would then find the extra file gone.
        raise UserError(f"--data-extra {config.data_extra}: is inside --out {out}, which --overwrite empties; "
                        "copy it out of the run folder first, or train into another --out")
    if resume and (finished := finished_run(files, config, data_path)):
        if main:
            print(finished)
        return out
    refuse_without_heldout(config)
    # The data check's report goes into --out only where it cannot mix with an earlier run's files,
    # and is written and printed by one process.
    prepared = prepare(config, data_path, out if main and not files.config.exists() else None, show=main)
    refuse_without_heldout(config, len(prepared.test_encoded))
    checkpoints = Checkpoints(out, config, data_path)
    start = checkpoints.resume_point(force) if resume else None
    try:
        training = set_up(config, prepared, resuming=start is not None, threads=threads)
        compute = {"device": training.accelerator.device.type, "threads": training.threads}
        metrics = open_run_folder(files, config, prepared, overwrite, start, resume,
                                  checkpoints.fingerprint, compute) if main else None
        watch = run_loop(training, config, checkpoints, start, metrics, quiet)
        saved_step = watch.best_step if config.keep_best and watch.best_step is not None else watch.step
        save_final(training, files, config.method, saved_step if config.keep_best else None)
    except KeyboardInterrupt:
        if main:
            print(where_the_run_stands(checkpoints, data_path, out), file=sys.stderr)
        raise
    if metrics:
        metrics.close()
        record(files, watch.summary(training.total_steps, saved_step))
        if config.keep_best:
            print(f"Saved the weights of step {saved_step}, the lowest held-out loss ({watch.best_loss:.4f}), "
                  f"{'the last step' if saved_step == watch.step else f'not those of the last, step {watch.step}'} "
                  "(--keep-best)")
    return out
