"""Checkpoints: a run that dies resumes exactly where it stopped.

    RUN/checkpoints/step-000010/
        adapter/ or model/   the weights at that step, laid out like the run's own (safetensors)
        state.pt             optimizer, scheduler and random number generator states (those of
                             every process): tensors and plain values only, read back with
                             torch.load(weights_only=True)
        checkpoint.json      step, position in the data, held-out loss, hashes of config and data,
                             the early-stopping state (stopping.py); written last

A checkpoint is written into a hidden folder beside its place and renamed when complete, so a
folder cut short by a crash or a full disk is never read as a checkpoint; such leftovers are
reported and removed. The last `keep` checkpoints and the one with the lowest held-out loss are
kept.

A resumed run ends with the same weights as an uninterrupted one because every random number
generator is restored, the data order of the current epoch is redrawn from the loader
generator's state at the start of that epoch, and the micro-batches of the epoch that were
already consumed are skipped.

Under several processes (DDP) every process takes part in a save (its RNG states are gathered)
and the main one writes it. Under FSDP or DeepSpeed, where each process holds only a shard of the
weights or optimizer state, training refuses --save-every and --resume (see train.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.files import write_text_atomic
from tunelab.runfolder import RunFiles

# Options that may change when a run is resumed: they decide what is saved and measured, never
# the weights. Any other change needs --force, max_steps and epochs included, because they shape
# the learning-rate schedule; eval_every too under --early-stopping or --keep-best, where the
# evaluations decide where training stops and which weights are saved.
RESUMABLE_CHANGES = ("save_every", "keep", "eval_every")
STATE = "state.pt"
INFO = "checkpoint.json"
# Test hook, "STEP:SECONDS": stall the save of that step between writing its files and the rename,
# so that tests can kill the process in the middle of a save.
PAUSE_ENV = "TUNELAB_TEST_PAUSE_SAVE"


@dataclass
class Position:
    """Where training stands, with enough to continue exactly."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    """Micro-batches of this epoch already consumed."""
    tokens: int = 0
    elapsed_s: float = 0.0


@dataclass
class Checkpoint:
    path: Path
    info: dict

    @property
    def step(self) -> int:
        return self.info["position"]["step"]

    @property
    def eval_loss(self) -> float | None:
        return self.info.get("eval_loss")


def fingerprint(config, data_path: Path) -> dict:
    """What a checkpoint must be resumed with: the options that shape the weights, and the data
    (with --data-extra, its file too)."""
    watching = config.early_stopping or config.keep_best
    free = [k for k in RESUMABLE_CHANGES if not (watching and k == "eval_every")]
    options = {k: v for k, v in config.to_dict().items() if k not in free}
    extra = {"data_extra_sha256": _file_sha256(Path(config.data_extra))} if config.data_extra else {}
    return {
        "config": options,
        "config_sha256": hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest(),
        "data_sha256": _file_sha256(Path(data_path)), **extra,
    }


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finished_run(files: RunFiles, config, data_path: Path) -> str | None:
    """For --resume on a run that finished and has no checkpoint to continue from (none, or only
    the one of the step where its training ended): the line saying
    so when the data and options are those it was trained with (run.json keeps their fingerprint),
    so nothing is trained again and its eval.json and report stay true. Finished means run.json
    records the end of training ("training", written after the weights): weights without it were
    being saved when the process died, may be cut short, and are trained again. Other data or
    options are refused as a checkpoint refuses them, --force included: with no checkpoint,
    continuing would be training from the start, which is --overwrite. None when --resume has
    something to continue.
    Asked with the run folder's lock held (runlock.py), so no training changes the run meanwhile."""
    from tunelab.data.load import check_data_file

    if not (files.adapter.exists() or files.model.exists()):
        return None
    check_data_file(data_path)
    if config.data_extra:
        check_data_file(Path(config.data_extra))
    checkpoints = Checkpoints(files.root, config, data_path)
    try:
        info = json.loads(files.info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    complete = checkpoints.complete()
    if not isinstance(info, dict) or "fingerprint" not in info:
        if complete:
            return None
        return (f"{files.root}: the run is finished; nothing to resume (an older tunelab trained it and kept no "
                "record of its data: pass --overwrite instead of --resume to train it again)")
    if "training" not in info:
        return None  # stopped while its weights were being saved (they may be cut short): trained again
    training = info["training"]
    if complete and not (isinstance(training, dict) and complete[-1].step == training.get("steps")):
        return None  # a checkpoint before the step where training ended, to continue from
    changes = checkpoints.changes(info)
    if changes and complete:
        return None  # the checkpoint's resume refuses them, or continues from it with --force
    if changes:
        raise UserError(f"{files.root}: the run finished with other data or options and has no checkpoint to "
                        "continue from; pass --overwrite instead of --resume to train it again", changes)
    return (f"{files.root}: the run is finished, trained on the same data and options; nothing to resume. "
            f"Next: tunelab eval {files.root}")


def kept(checkpoints: list[Checkpoint], keep: int) -> list[Checkpoint]:
    """The last `keep` checkpoints (oldest first in `checkpoints`) and the one with the lowest
    held-out loss."""
    chosen = checkpoints[-keep:]
    scored = [c for c in checkpoints if c.eval_loss is not None]
    if scored:
        best = min(scored, key=lambda c: (c.eval_loss, c.step))
        if best not in chosen:
            chosen = [best, *chosen]
    return chosen


class Checkpoints:
    """The checkpoints of one run folder."""

    def __init__(self, run: Path, config, data_path: Path):
        self.root = Path(run) / "checkpoints"
        self.every = config.save_every
        self.keep = config.keep
        self.data_path = Path(data_path)
        self.extra = config.data_extra
        self.fingerprint = fingerprint(config, data_path)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def complete(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first. Leftovers of interrupted saves are removed."""
        found = []
        for path in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if path.name.startswith("."):
                warn(f"{path}: left by an interrupted save; ignored and removed")
                shutil.rmtree(path, ignore_errors=True)
            elif (path / INFO).is_file():
                found.append(Checkpoint(path, json.loads((path / INFO).read_text())))
        return sorted(found, key=lambda c: c.step)

    def resume_point(self, force: bool = False) -> Checkpoint | None:
        """The newest complete checkpoint, refused if the data or options changed unless `force`."""
        checkpoints = self.complete()
        if not checkpoints:
            warn(f"{self.root.parent}: no complete checkpoint to resume from; training from the start")
            return None
        latest = checkpoints[-1]
        changes = self.changes(latest.info)
        if changes and not force:
            raise UserError(
                f"{latest.path}: saved with other data or options; resume with the same ones, "
                "or pass --force to continue anyway", changes,
            )
        for change in changes:
            warn(f"continuing despite a change: {change}")
        print(f"Resuming from {latest.path} (step {latest.step})", file=sys.stderr)
        return latest

    def changes(self, info: dict) -> list[str]:
        saved, now = info["fingerprint"], self.fingerprint
        found = []
        if saved["data_sha256"] != now["data_sha256"]:
            found.append(f"{self.data_path}: its content differs from the data the checkpoint was trained on")
        # A --data-extra given or dropped shows as a change of options below; here, a new content.
        old_extra, new_extra = saved.get("data_extra_sha256"), now.get("data_extra_sha256")
        if old_extra and new_extra and old_extra != new_extra:
            found.append(f"--data-extra {self.extra}: its content differs from the extra rows the checkpoint was "
                         "trained on")
        if saved["config_sha256"] != now["config_sha256"]:
            old, new = saved["config"], now["config"]
            found += [f"--{name.replace('_', '-')}: {old.get(name)} in the checkpoint, {new.get(name)} now"
                      for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]
        return found

    def save(self, position: Position, eval_loss: float | None, model, method: str, optimizer, scheduler,
             epoch_rng, rng: list[dict], stopping: dict | None = None) -> Checkpoint:
        """Write a checkpoint atomically, then remove those no longer kept. `epoch_rng` is the
        loader generator's state at the start of the current epoch; `rng` every process's RNG
        states (from `process_rng_states`), in process order; `stopping`, the early-stopping
        state (stopping.Watch), plain values."""
        import torch
        from safetensors import SafetensorError

        target = self.root / f"step-{position.step:06d}"
        info = {"position": asdict(position), "eval_loss": eval_loss, "fingerprint": self.fingerprint,
                "stopping": stopping, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        staging = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = self.root / f".{target.name}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            RunFiles(staging).save_weights(model, method)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng, "loader_rng": epoch_rng}, staging / STATE)
            (staging / INFO).write_text(json.dumps(info, indent=2))
            _sync(staging)
            _pause_for_tests(position.step)
            if target.exists():
                _remove(target)
            os.replace(staging, target)
            _sync_folder(self.root)
        except (OSError, RuntimeError, SafetensorError) as e:
            # Disk full, quota, permissions. torch reports a full disk as an obscure RuntimeError,
            # so the free space, measured before the partial files go, tells it apart.
            free = shutil.disk_usage(self.root if self.root.exists() else self.root.parent).free / 2**20
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError) and e.strerror:
                reason = e.strerror
            elif free < 64:
                reason = "the disk is full"
            else:
                reason = str(e).splitlines()[0]
            previous = self.complete()
            intact = f"{previous[-1].path} is intact" if previous else "no earlier checkpoint exists"
            raise UserError(
                f"{target}: cannot write the checkpoint ({reason}; {free:.0f} MiB free); {intact}. "
                "Free some space and continue with --resume"
            ) from None
        except BaseException:
            if staging:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        checkpoint = Checkpoint(target, info)
        self.prune()
        return checkpoint

    def prune(self) -> None:
        checkpoints = self.complete()
        keep = {c.path for c in kept(checkpoints, self.keep)}
        for checkpoint in checkpoints:
            if checkpoint.path not in keep:
                _remove(checkpoint.path)

    def load(self, checkpoint: Checkpoint, model, method: str, optimizer, scheduler, loader_generator,
             process_index: int = 0) -> Position:
        """Restore weights, optimizer, scheduler and every RNG (this process's own); set the loader
        generator to the start of the checkpoint's epoch. Returns the position to continue from."""
        import torch

        try:
            state = torch.load(checkpoint.path / STATE, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's message is a paragraph; the line that names what was refused is the useful one.
            lines = [line for line in str(e).splitlines() if "GLOBAL" in line] or str(e).splitlines()[:1]
            raise UserError(
                f"{checkpoint.path / STATE}: refused, it holds more than tensors and plain values and could "
                f"run code when read ({lines[0].strip()}); remove this checkpoint folder to resume from an "
                "earlier one"
            ) from None
        load_weights(model, method, checkpoint.path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if process_index >= len(state["rng"]):
            raise UserError(f"{checkpoint.path}: saved by {len(state['rng'])} process(es); resume it with as many")
        set_rng_states(state["rng"][process_index])
        loader_generator.set_state(state["loader_rng"])
        return Position(**checkpoint.info["position"])


def load_weights(model, method: str, folder: Path) -> None:
    from safetensors.torch import load_file

    if method == "lora":
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter" / "adapter_model.safetensors"))
        if result.unexpected_keys:
            raise RuntimeError(f"{folder}: adapter weights not in the model: {result.unexpected_keys[:5]}")
        return
    state = {}
    for file in sorted((folder / "model").glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head sharing embed_tokens) are saved once; they count as loaded.
    params = model.state_dict()
    loaded = {params[name].data_ptr() for name in state if name in params}
    untied = [name for name in missing if params[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise RuntimeError(f"{folder}: weights do not match the model (missing {untied[:5]}, "
                           f"unexpected {unexpected[:5]})")


def rng_states() -> dict:
    """Every RNG state, as tensors and plain values that torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch

    name, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, key.tolist(), int(pos), int(has_gauss), float(gauss)),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def process_rng_states(accelerator) -> list[dict]:
    """The RNG states of every process, in process order. Under several processes this is a
    collective: every process must call it."""
    if accelerator.num_processes == 1:
        return [rng_states()]
    from accelerate.utils import gather_object

    return gather_object([rng_states()])


def set_rng_states(states: dict) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trim_metrics(path: Path, step: int) -> None:
    """Keep only the metric rows up to `step`, the resumed checkpoint's, so that the resumed run
    appends exactly what an uninterrupted one would have written. A row cut short by a kill is
    dropped too."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= step:
            rows.append(line + "\n")
    write_text_atomic(path, "".join(rows))


def warn(message: str) -> None:
    print(f"tunelab: warning: {message}", file=sys.stderr)


def _remove(path: Path) -> None:
    # Hide the folder first, so that a kill halfway through the removal never leaves a
    # half-deleted folder that looks like a checkpoint.
    hidden = path.with_name(f".{path.name}-removed-{os.getpid()}")
    os.replace(path, hidden)
    shutil.rmtree(hidden)


def _sync(folder: Path) -> None:
    """Flush the files to disk, so that the rename never publishes a folder whose data a power
    loss could still take away."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_for_tests(step: int) -> None:
    hook = os.environ.get(PAUSE_ENV)
    if hook and int(hook.split(":")[0]) == step:
        time.sleep(float(hook.split(":")[1]))
