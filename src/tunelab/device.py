"""Device set-up, for training and for every command that runs a model: the accelerator and its
precision, threads, the allocator, packed attention and the optimizer (the loss and the training
step are in train/loss.py).
Each speed option was measured with benchmarks/step_timing.py and benchmarks/train_throughput.py
and kept because it paid (numbers in docs/BENCHMARKS.md).

Packed attention. A micro-batch is one row of examples back to back. transformers turns the
restarting position ids into a dense block-diagonal mask over the whole row, so attention costs
grow with the square of the row length although only the blocks on the diagonal are useful (on
the demo batch of 8 examples, ~1.2 s of a 5-6 s training step on 2 CPU cores). `packed_sdpa`
runs scaled-dot-product attention example by example instead, causal within each, from the
boundaries that `batching.pack` puts in the batch (`cu_seq_lens_q`). A model already on
FlashAttention (GPU, flash-attn installed) keeps it: it finds the same boundaries from the
position ids and runs variable-length attention itself. A model whose attention SDPA cannot
compute (Gemma 2 soft-caps its attention scores) keeps its own, and each example of a
micro-batch runs as its own forward pass instead.

On a GPU the loop over examples costs more than it saves: each example is a few small kernel
launches per layer and the boundaries are read back to the host at every layer, so a step of
32 examples of SmolLM2-135M took 2.0 s on an H200 against 0.19 s with transformers' own SDPA
and its block-diagonal mask (docs/BENCHMARKS.md). There the model keeps SDPA.
"""

from __future__ import annotations

import contextlib
import os
import time
import typing
from collections.abc import Collection

import torch

from tunelab.config import Device, Precision
from tunelab.cores import usable_cores
from tunelab.errors import UserError

PACKED_ATTENTION = "tunelab_packed_sdpa"


IDLE_ENOUGH = 0.7
"""Share of a core that must be idle for it to count as free: a core that something else keeps
busy more than 30% of the time stalls every parallel region that waits for its thread."""
SAMPLE_SECONDS = 0.1
"""How long the CPU's busy time is sampled before choosing the thread count."""


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads, and return how many: `threads` (--threads) if given, else
    `free_cores()`, divided between processes under `accelerate launch`; an explicit
    OMP_NUM_THREADS is respected when --threads is not given. One inter-op thread: no step has
    independent ops worth running side by side, and a second pool only competes for the same
    cores.

    Why not every core: torch splits each op over its threads and waits for the slowest, so a
    thread on a core that another program is using holds up every op. On 2 cores beside a
    competing process, a training step with 2 threads took 3-7x as long as with 1
    (benchmarks/busy_cpu.py, docs/BENCHMARKS.md). The count is chosen once, at the start."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be 1 or more")
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        # Processes launched together would see each other starting up as load: they share the cores instead.
        threads = max(1, usable_cores() // local) if local > 1 else free_cores()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
        torch.set_num_interop_threads(1)
    return threads


def free_cores(seconds: float = SAMPLE_SECONDS) -> int:
    """How many of the usable cores other programs leave free (at least one): see `thread_count`."""
    cores = usable_cores()
    return thread_count(cores, busy_cores(cores, seconds))


def thread_count(cores: int, busy: float) -> int:
    """The threads for `cores` usable cores of which other programs keep `busy` (in cores) busy:
    the idle capacity in whole cores, each at least IDLE_ENOUGH idle; never fewer than one."""
    return max(1, min(cores, int(cores - busy + 1 - IDLE_ENOUGH)))


def busy_cores(cores: int, seconds: float = SAMPLE_SECONDS) -> float:
    """The cores' worth of CPU time other programs use now. On Linux, measured over `seconds`
    from /proc/stat on the cores of this process's affinity, less this process's own CPU time:
    what is running now, where the load average lags by a minute and counts this process too.
    Elsewhere, the one-minute load average (0 where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        mine = os.sched_getaffinity(0)
        before, own_before, started = cpu_times(mine), time.process_time(), time.monotonic()
        if before:
            time.sleep(seconds)
            after, own, wall = cpu_times(mine), time.process_time() - own_before, time.monotonic() - started
            used = sum(_busy_share(before[cpu], after[cpu]) for cpu in before if cpu in after)
            return max(0.0, used - (own / wall if wall > 0 else 0.0))
    try:
        return min(float(cores), os.getloadavg()[0])
    except (AttributeError, OSError):  # Windows has no load average
        return 0.0


def cpu_times(cpus: Collection[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks so far of each of `cpus`, from /proc/stat; {} where unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *fields = line.split() or [""]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal (guest time is counted in user already)
            ticks = [int(f) for f in fields[:8]]
            times[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return times


def _busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """While training, let glibc malloc keep freed memory for reuse. By default it hands every
    block over 32 MiB straight back to the system when freed, so each training step maps,
    zero-fills (one page fault per 4 KiB page) and unmaps the same large activation buffers
    again: ~15% of a step on 2 CPU cores (benchmarks/step_timing.py, variant `alloc`). Inside,
    large blocks come from the heap and stay there; on the way out glibc's defaults come back and
    the unused heap is returned to the system. Linux with glibc only; elsewhere nothing changes."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 30)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)  # glibc's defaults
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


class FreedMemoryCap:
    """Within `reuse_freed_memory`, a bound on what the heap keeps. Freed blocks stay for the next
    step's reuse, but long-lived small objects land between them, and a later step's larger
    blocks then extend the heap instead of fitting: without a bound the demo's training grew
    ~0.1 GiB a step (docs/BENCHMARKS.md, "Where the demo's memory goes"). The resident memory
    after the first `settle` steps is what a step needs; `after_step` hands the free memory back
    (as `release_freed_memory` does) once the resident memory is `slack` bytes above that, which
    costs the next step its page faults again, now and then instead of at every step. The need
    is not measured again later: a version that re-measured it after each trim let it ratchet up
    with the heap (the demo's peak 4.77 GiB at step 86, against 4.23 by step 46 with the need
    fixed; docs/BENCHMARKS.md), so a batch of longer examples is trimmed after at every step."""

    def __init__(self, settle: int = 2, slack: int = 256 << 20):
        self.settle, self.slack = settle, slack
        self.steps, self.level, self.trims = 0, 0, 0
        self.libc = _glibc()

    def after_step(self) -> None:
        if self.libc is None:
            return
        self.steps += 1
        now = resident_bytes()
        if self.steps <= self.settle:
            self.level = max(self.level, now)
        elif now > self.level + self.slack:
            self.libc.malloc_trim(0)
            self.trims += 1


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_freed_memory() -> None:
    """Collect the objects kept only by reference cycles (a trained model and its optimizer are:
    accelerate wraps the model's forward in a method that holds the model) and hand the
    allocator's free memory back to the system: between phases (after a held-out pass, after
    training, between the models of an evaluation), so what one phase freed does not stay
    resident through the next. Linux with glibc trims; elsewhere only the collection runs."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def packed_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                cu_seq_lens_q=None, sliding_window=None, **kwargs):
    """Attention over a packed row, one example at a time: causal within each example, and
    within the layer's sliding window where it has one and the example is longer than it. Falls
    back to transformers' SDPA (with the mask it built) for anything that is not one packed row,
    e.g. generation."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1 or kwargs.get("past_key_values") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, sliding_window=sliding_window, **kwargs)
    bounds = cu_seq_lens_q.tolist()
    gqa = query.shape[1] != key.shape[1]
    dropout = dropout if module.training else 0.0
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
        if sliding_window and end - start > sliding_window:
            # transformers' sliding window: a token sees itself and the window - 1 tokens before it.
            i = torch.arange(end - start, device=query.device)
            band = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < sliding_window)
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=band, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        outputs.append(out)
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def use_packed_attention(model, per_example: bool = True) -> bool:
    """Switch a transformers model (or a peft model around one) to `packed_sdpa`, keeping
    FlashAttention where it is already chosen, and SDPA when `per_example` is False (on a GPU,
    where one kernel over the row's block-diagonal mask is faster than a loop). Returns whether
    the model attends within each example of a packed row by itself; where it cannot (its
    attention is not SDPA, e.g. Gemma 2's soft-capped scores), it keeps its own attention, says so
    on stderr, and `loss.backward_step` runs each example of a micro-batch as its own forward pass
    (`one_example_batches`)."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    # The mask is still built as for SDPA, so the fallback path stays correct.
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if runs_packed(inner) and (inner.config._attn_implementation != "sdpa" or not per_example):
        return True
    try:
        inner.set_attn_implementation(PACKED_ATTENTION)
    except ValueError:  # transformers refuses SDPA-based attention for this architecture
        pass
    if runs_packed(inner):
        return True
    print(f"tunelab: note: {type(inner).__name__} cannot use packed per-example attention (its attention "
          f"'{inner.config._attn_implementation}' is not SDPA); each example of a micro-batch runs as its own "
          "forward pass: same loss, slower", file=sys.stderr)
    return False


def runs_packed(model) -> bool:
    """Whether `model` keeps the examples of a packed row apart in attention by itself:
    tunelab's packed attention, FlashAttention's variable-length kernels, or SDPA over the
    block-diagonal mask that transformers builds from the restarting position ids."""
    implementation = model.config._attn_implementation or ""
    return implementation in (PACKED_ATTENTION, "sdpa") or implementation.startswith("flash_attention")


def one_example_batches(micro_batches: list[dict]) -> list[dict]:
    """Each packed micro-batch cut into one packed row per example, for models that cannot run
    packed attention: their own attention then needs no mask across examples, and the memory
    of one forward is that of one example. The trained tokens, so the loss, are the same."""
    rows = []
    for batch in micro_batches:
        bounds = batch["cu_seq_lens_q"].tolist()
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows.append({"input_ids": batch["input_ids"][:, start:end],
                         "position_ids": batch["position_ids"][:, start:end],
                         "targets": batch["targets"][:, start:end],
                         "cu_seq_lens_q": torch.tensor([0, end - start], dtype=batch["cu_seq_lens_q"].dtype)})
    return rows


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, the fused kernel on GPUs and CPUs. On a GPU it saves a launch per parameter tensor;
    on a CPU it saves memory: the default (foreach) AdamW builds its update in a temporary as
    large as all the trained weights (0.5 GB for a 135M model in full fine-tuning), fused updates
    each tensor in place (docs/BENCHMARKS.md, "Where the demo's memory goes")."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def inference_device(choice: str = "auto") -> torch.device:
    """Where a model answers (generation, evaluation, serving): `choice` "cuda", "mps" or "cpu"
    as asked, or for "auto" the best present: an NVIDIA (or ROCm) GPU, then Apple's GPU (MPS),
    then the CPU. Training picks its device through accelerate, which follows the same order.
    A device asked for that this machine does not have is a user error, before any model loads."""
    if choice not in typing.get_args(Device):
        raise UserError(f"--device {choice}: choose one of {', '.join(typing.get_args(Device))}")
    present = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if choice == "auto":
        return torch.device(next(name for name, here in present.items() if here))
    if not present[choice]:
        hint = "this torch sees no GPU" if choice == "cuda" else "MPS needs Apple silicon and macOS 12.3 or later"
        raise UserError(f"--device {choice}: not available on this machine ({hint}); use --device auto or cpu")
    return torch.device(choice)


def native_bf16(device: torch.device | None = None) -> bool:
    """Whether bf16 matmuls run natively on `device` (by default the one training uses: the GPU
    if there is one): fast on GPUs with bf16 and CPUs with AVX512-BF16 or AMX (training steps
    1.3-1.5x faster than fp32 on such a 2-core CPU), emulated and slower elsewhere."""
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_gpu:
        return torch.cuda.is_bf16_supported()
    if device is not None and device.type == "mps":
        return False  # bf16 on Apple's GPU is not measured here: "auto" stays fp32 there
    # A private probe, the only one torch has: tests/test_private_hooks.py fails if it goes.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(precision: str, device: torch.device):
    """The arithmetic of a forward pass on `device` outside training (generation, the held-out
    loss), chosen as --precision chooses training's: bf16 autocast (matmuls in bf16; weights,
    norms and softmax in fp32) for "bf16", and for "auto" where `device` computes bf16 natively
    (generation about 2x faster on a CPU with AVX512-BF16); plain fp32 otherwise. The same on
    every device: CUDA, MPS (where "auto" means fp32) and the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=computes_bf16(precision, device))


@contextlib.contextmanager
def casts_kept(model):
    """Mark `model`'s frozen weights as requiring grad while a batch is generated, and freeze
    them again after. bf16 autocast keeps its cast of a weight for as long as its context lasts
    only if the weight requires grad; a frozen one (a LoRA run's base, also once merged) is cast
    again at every forward pass, which made decoding ~60% slower on a CPU. The kept casts hold a
    bf16 copy of the weights (half their size) while a batch is answered. Callers run under
    no_grad, so nothing builds a graph; outside this context the weights stay frozen, so a user
    of `Run.model()` who forgets no_grad builds no graph over them either. Two threads
    generating with one model at once leave it frozen when the first ends: the other pays the
    casts again, its answers unchanged."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def frozen_base_in_bf16(model) -> int:
    """Hold the frozen linear layers of a LoRA model (weights and biases) in bf16, for training
    under bf16 autocast, and return how many parameters were cast. Autocast casts each of them to
    bf16 for its matmul anyway, at every forward pass, and the matmul saves that copy for the
    backward pass: the same values held once halve their memory and drop the copies and the casts
    (2 + 2 bytes a parameter), and every loss and gradient is bit for bit the same
    (tests/test_train.py). The embeddings, the norms and the output layer keep fp32 (the output
    projection may run outside autocast, in chunks: train/loss.py); the adapters train in fp32.

    The loaded weights are pages of the weights file, mapped (transformers loads safetensors
    without a copy); the frozen ones left in fp32 are copied out of it, so that the mapping, the
    whole file's size, is let go rather than kept resident for a few of its tensors."""
    output = model.get_output_embeddings()
    cast = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad and parameter.dtype == torch.float32:
                parameter.data = parameter.data.to(torch.bfloat16)
                cast += parameter.numel()
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.dtype == torch.float32:
            parameter.data = parameter.data.clone()
    return cast


def computes_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` ("auto", "bf16" or "fp32") means bf16 matmuls on `device`."""
    if precision not in typing.get_args(Precision):
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(typing.get_args(Precision))}")
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def make_accelerator(grad_accum: int, precision: str = "auto"):
    """An Accelerator for one run. accelerate keeps its settings process-wide, so a second run in
    the same process (the Python API, tests) with another precision starts from a clean state;
    the distributed set-up itself (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Private, and the only way in accelerate 1.15: tests/test_private_hooks.py fails if it goes.
    AcceleratorState._reset_state()
    return Accelerator(gradient_accumulation_steps=grad_accum, **accelerator_options(precision))


def accelerator_options(precision: str = "auto") -> dict:
    """Accelerator arguments: mixed precision from --precision (an `accelerate launch` config's
    own choice wins over 'auto'), and CPU processes with gloo when launched as several processes
    on a machine without a GPU (accelerate otherwise expects mpirun there)."""
    if precision == "auto":
        chosen = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        mixed = chosen if chosen != "no" else ("bf16" if native_bf16() else "no")
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return {"mixed_precision": mixed, "cpu": several and not torch.cuda.is_available()}


def prepare_model(model, gradient_checkpointing: bool = False, compile: bool = False,
                  device: torch.device | None = None):
    """Packed attention (per example except on GPUs), then the optional trade-offs: recompute
    activations in backward (less memory, ~1/3 more compute) and torch.compile (slow first
    steps, faster later ones on GPU)."""
    use_packed_attention(model, per_example=device is None or device.type != "cuda")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return torch.compile(model, dynamic=True) if compile else model
