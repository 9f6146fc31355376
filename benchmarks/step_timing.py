"""Seconds per training step of SmolLM2-135M on the demo batch, one speed option at a time.

    PYTHONPATH=src python benchmarks/step_timing.py            # every variant, each in a fresh process
    PYTHONPATH=src python benchmarks/step_timing.py --variant packed,bf16 --steps 8
    PYTHONPATH=src python benchmarks/step_timing.py --alternate 8x1,4x2,8x1-gc2 --steps 13

A step is tunelab's: 8 booking examples packed into one row (~880 tokens), loss on the
completions, backward, clipping, AdamW. The first step (allocation, compilation) is left out of
the summary; on a shared machine the minimum is the steadiest number. This is how the options in
src/tunelab/device.py were chosen; docs/BENCHMARKS.md has the results.

Variant words (joined with commas): `packed` (per-example attention instead of transformers'
dense block-diagonal mask), `threads` (tunelab's thread settings), `bf16` (autocast), `fused`
(fused AdamW), `compile` (torch.compile), `gc` (gradient checkpointing), `lora`, `alloc` (glibc
malloc keeps freed memory for reuse instead of returning large blocks to the system).

`--alternate` times ways of cutting a step's memory against each other in one process, one model,
with tunelab's own settings (packed attention, its threads, bf16 autocast where native, fused
AdamW, freed memory reused): `MxA` is A micro-batches of M examples per step of 8 (`4x2`: the
same 8 examples in two micro-batches), `-gcN` recomputes the activations of every N-th decoder
layer in backward, `-trim` first hands the freed memory back to the system (as training's heap
cap does after a step past its bound), so the step faults it in again. Each round runs one step
of every setting, in an order rotated from round to round, on that round's 8 examples; the first
round is left out. The ratio is each round's step time over the first setting's in the same
round, its median over the rounds: the machine's load changes between rounds far more than
within one.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

VARIANTS = ["sdpa", "packed", "packed,threads", "packed,threads,fused", "packed,threads,bf16",
            "packed,threads,bf16,compile", "packed,threads,bf16,gc", "packed,threads,bf16,lora",
            "packed,threads,bf16,alloc", "packed,threads,bf16,alloc,lora"]


def run(variant: str, steps: int) -> dict:
    import torch

    words = set(variant.split(","))
    if "alloc" in words:
        from tunelab.device import reuse_freed_memory

        reuse_freed_memory().__enter__()  # for the life of this process
    if "threads" in words:
        from tunelab.device import configure_threads

        configure_threads()
    from tunelab import device
    from tunelab.config import TrainConfig
    from tunelab.data.load import Example
    from tunelab.demo import bookings
    from tunelab.encoding import encode_examples
    from tunelab.models import load_tokenizer, resolve_base
    from tunelab.template import Template
    from tunelab.train.batching import pack
    from tunelab.train.loop import build_model
    from tunelab.train.loss import token_loss

    base = resolve_base("smollm2-135m")
    template = Template.for_model(load_tokenizer(base))
    rows = bookings.make_examples(8 * steps)
    examples = [Example([{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}], i) for i, r in enumerate(rows)]
    encoded = encode_examples(examples, template, 1024)[0]
    torch.manual_seed(0)
    model = build_model(TrainConfig(method="lora" if "lora" in words else "full"), base)
    model = device.prepare_model(model, "gc" in words, "compile" in words) if "packed" in words else model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if "fused" in words else None)
    times, losses = [], []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    for step in range(steps):
        batch = pack(encoded[step * 8:(step + 1) * 8])
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in words):
            loss = token_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
        losses.append(round(loss.item(), 4))
    steady = sorted(times[1:])
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"variant": variant, "first_s": times[0], "min_s": steady[0], "median_s": steady[len(steady) // 2],
            "losses": losses, "system_s_per_step": (after.ru_stime - usage.ru_stime) / steps,
            "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def alternate(settings: list[str], rounds: int) -> None:
    import os
    import statistics

    import torch

    from tunelab import device
    from tunelab.config import TrainConfig
    from tunelab.data.load import Example
    from tunelab.demo import bookings
    from tunelab.encoding import encode_examples
    from tunelab.models import load_tokenizer, resolve_base
    from tunelab.template import IGNORE, Template
    from tunelab.train.batching import pack
    from tunelab.train.loop import build_model
    from tunelab.train.loss import token_loss

    device.configure_threads()
    base = resolve_base("smollm2-135m")
    template = Template.for_model(load_tokenizer(base))
    rows = bookings.make_examples(8 * rounds)
    examples = [Example([{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}], i) for i, r in enumerate(rows)]
    encoded = encode_examples(examples, template, 1024)[0]
    torch.manual_seed(0)
    model = device.prepare_model(build_model(TrainConfig(method="full"), base))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = device.make_optimizer(params, 1e-4, 0.0, torch.device("cpu"))
    cast = device.autocast("auto", torch.device("cpu"))

    def step(setting: str, examples: list) -> float:
        setting, trim = setting.removesuffix("-trim"), setting.endswith("-trim")
        shape, _, every = setting.partition("-gc")
        size, accum = map(int, shape.split("x"))
        if every:
            model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=int(every))
        else:
            model.activation_checkpointing_disable()
        started = time.perf_counter()
        if trim:  # what training's heap cap (device.FreedMemoryCap) does after a step past its bound
            device.release_freed_memory()
        batches = [pack(examples[i * size:(i + 1) * size]) for i in range(accum)]
        trained = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
        for batch in batches:
            with cast:
                loss = token_loss(model, batch, reduction="sum")
            (loss / trained).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {s: [] for s in settings}
    load = os.getloadavg()[0]
    with device.reuse_freed_memory():
        for r in range(rounds):
            order = settings[r % len(settings):] + settings[:r % len(settings)]
            for setting in order:
                times[setting].append(step(setting, encoded[r * 8:(r + 1) * 8]))
    print(f"load average {load:.1f} before, {os.getloadavg()[0]:.1f} after; {rounds - 1} rounds after the first")
    print("| setting | median step s | min step s | ratio to " + settings[0] + " (median of rounds) |")
    print("|---|---|---|---|")
    first = times[settings[0]][1:]
    for setting in settings:
        mine = times[setting][1:]
        ratio = statistics.median(m / f for m, f in zip(mine, first))
        print(f"| {setting} | {statistics.median(mine):.2f} | {min(mine):.2f} | {ratio:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default=None, help="one variant, e.g. packed,bf16 (default: all, in turn)")
    parser.add_argument("--variants", default=None, help="comma-separated list of variants joined by '+' "
                        "(e.g. packed,threads,bf16+packed,threads,bf16,alloc); default: the standard list")
    parser.add_argument("--alternate", default=None, help="settings timed in turn in one process, e.g. 8x1,4x2,8x1-gc2")
    parser.add_argument("--steps", type=int, default=6, help="steps per variant (with --alternate: rounds)")
    args = parser.parse_args()
    if args.alternate:
        alternate(args.alternate.split(","), args.steps)
        return
    if args.variant:
        import json

        print(json.dumps(run(args.variant, args.steps)))
        return
    import json
    import os

    print("| variant | first step s | min step s | median step s | losses, first 4 steps | system s/step | "
          "page faults/step | peak RSS GB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in args.variants.split("+") if args.variants else VARIANTS:
        load = os.getloadavg()[0]
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:])
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {variant} | {r['first_s']:.1f} | {r['min_s']:.2f} | {r['median_s']:.2f} | "
              f"{' '.join(map(str, r['losses'][:4]))} | {r['system_s_per_step']:.2f} | "
              f"{r['page_faults_per_step']:.0f} | "
              f"{r['peak_rss_gb']:.2f} | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
