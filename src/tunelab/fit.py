"""Whether a training run can fit in this machine's memory, decided from the base model's config
before its weights load: a model too big for the machine is one line at once, not minutes of
loading and swapping that end in the kernel's out-of-memory kill.

The check refuses only on a floor the run cannot go under, never on a guess:

- full fine-tuning holds every weight in fp32 with its gradient and AdamW's two states, 16 bytes
  a parameter;
- LoRA holds, for each adapter parameter, the same 16 bytes, and the frozen weights: under bf16
  autocast the linear layers but the output layer in bf16 (2 bytes a parameter,
  `device.frozen_base_in_bf16`) and the rest (embeddings, norms, output layer) in fp32; without
  autocast all of them in fp32 (4 bytes).

Activations, the tokenizer and Python itself come on top, so a run that passes may still not
fit; one refused could not have fitted. Training on a CUDA GPU keeps gradients, optimizer states
and activations in the GPU's memory: what the machine's memory must hold there is the fp32
weights as they load (4 bytes a parameter), whichever the method.

The parameter count comes from the model built on torch's meta device from config.json: exact
for any architecture transformers knows (tied weights counted once), with no memory allocated.
The memory available is the smaller of the kernel's MemAvailable (/proc/meminfo) and the room
left under a cgroup memory limit (a container's), not counting the page cache the kernel would
reclaim; where neither can be read (not Linux) psutil's figure, and without psutil no check."""

from __future__ import annotations

from pathlib import Path

from tunelab import device
from tunelab.config import TrainConfig
from tunelab.cores import CGROUP_ROOT, MEMBERSHIP, cgroup_folders
from tunelab.errors import UserError

GIB = 1024**3
FULL_BYTES = 16
"""A trained parameter: its fp32 weight, its gradient and AdamW's two moment estimates."""
FROZEN_BYTES = 4
"""A frozen parameter under LoRA: its fp32 weight."""
BF16_BYTES = 2
"""A frozen linear layer's parameter under bf16 autocast, held in bf16."""


def model_on_meta(base_path: Path):
    """The base model's modules built from its config.json on the meta device: shapes, no data."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_path), trust_remote_code=False)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def linear_count(model) -> int:
    """Parameters of the linear layers other than the output layer."""
    import torch

    output = model.get_output_embeddings()
    return sum(module.weight.numel() for module in model.modules()
               if isinstance(module, torch.nn.Linear) and module is not output)


def adapter_count(model, rank: int, targets: str) -> int:
    """Parameters LoRA of `rank` adds on the `targets` (as --lora-targets: 'all-linear' or names,
    comma-separated): rank * (inputs + outputs) for each targeted linear layer. 'all-linear'
    leaves out the output layer, as peft does."""
    import torch

    output = model.get_output_embeddings()
    names = None if targets == "all-linear" else targets.split(",")
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if names is None and module is output:
            continue
        if names is not None and name.rsplit(".", 1)[-1] not in names and name not in names:
            continue
        count += rank * (module.in_features + module.out_features)
    return count


def needed_bytes(config: TrainConfig, base_path: Path) -> dict[str, int]:
    """The floor each method must hold in this machine's memory for the base in `base_path`:
    {'full': ..., 'lora': ...}, with `config`'s precision and gradient checkpointing."""
    import torch

    model = model_on_meta(base_path)
    parameters = parameter_count(model)
    if torch.cuda.is_available():
        return {"full": FROZEN_BYTES * parameters, "lora": FROZEN_BYTES * parameters}
    adapters = adapter_count(model, config.lora_rank, config.lora_targets)
    lora = FROZEN_BYTES * parameters + FULL_BYTES * adapters
    if device.accelerator_options(config.precision)["mixed_precision"] == "bf16":
        lora -= (FROZEN_BYTES - BF16_BYTES) * linear_count(model)
    return {"full": FULL_BYTES * parameters, "lora": lora}


def available_bytes() -> int | None:
    """Memory this process can still take, or None where it cannot be known."""
    figures = [figure for figure in (_meminfo_available(), _cgroup_room()) if figure is not None]
    if figures:
        return min(figures)
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def check_fits(config: TrainConfig, base_path: Path) -> None:
    """Refuse (UserError) a run whose floor (`needed_bytes`) is above the memory available."""
    available = available_bytes()
    if available is None:
        return
    try:
        needed = needed_bytes(config, base_path)
    except (OSError, ValueError, KeyError):
        return  # a config.json transformers cannot read: loading the model says what is wrong with it
    if needed[config.method] <= available:
        return
    name = config.base
    have = f"{available / GIB:.1f} GiB is available"
    if config.method == "full":
        lora = f"--method lora (~{needed['lora'] / GIB:.0f} GiB) or " if needed["lora"] <= available else ""
        raise UserError(f"{name} needs at least {needed['full'] / GIB:.1f} GiB for full fine-tuning (weights, "
                        f"gradients and AdamW's states) and {have}; use {lora}a smaller model")
    bf16 = needed_bytes(config.model_copy(update={"precision": "bf16"}), base_path)["lora"]
    weights = "in bf16" if bf16 == needed["lora"] else "in fp32"
    precision = f"--precision bf16 (~{bf16 / GIB:.0f} GiB) or " if bf16 <= available else ""
    raise UserError(f"{name} needs at least {needed['lora'] / GIB:.1f} GiB for LoRA (its weights {weights} and "
                    f"the adapters' training state) and {have}; use {precision}a smaller model, or stop "
                    "other programs that hold memory")


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: Path = CGROUP_ROOT, membership: Path = MEMBERSHIP) -> int | None:
    """The least room left under a memory limit on this process's cgroup or any above it: the
    limit less the usage, the usage without the inactive page cache (as `docker stats` counts
    it), which the kernel reclaims before it kills. cgroup v2's memory.max and memory.current,
    else v1's memory.limit_in_bytes and memory.usage_in_bytes; None without a limit."""
    v2, v1 = cgroup_folders("memory", root, membership)
    rooms = [room for folder in v2
             if (room := _room(folder, "memory.max", "memory.current", "inactive_file")) is not None]
    if not rooms:
        rooms = [room for folder in v1
                 if (room := _room(folder, "memory.limit_in_bytes", "memory.usage_in_bytes",
                                   "total_inactive_file")) is not None]
    return min(rooms, default=None)


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 2**60:  # v1 writes "no limit" as a number near 2**63
            return None
        usage = int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return max(0, int(limit) - (usage - inactive))
