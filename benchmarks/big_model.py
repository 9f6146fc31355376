"""A ~1.7B-parameter model trained with LoRA on this CPU: tunelab against TRL's SFTTrainer.

    python benchmarks/random_base.py config /work/bench/bigmodel/base-1.7b --shape smollm2-1.7b
    python benchmarks/random_base.py weights /work/bench/bigmodel/base-1.7b
    PYTHONPATH=src python benchmarks/big_model.py --base /work/bench/bigmodel/base-1.7b --steps 4
    PYTHONPATH=src python benchmarks/big_model.py --base smollm2-135m --copies

The base is SmolLM2-1.7B's shape with random weights (benchmarks/random_base.py: random weights
change no timing or memory, the same shapes run the same kernels). Each setting trains LoRA
(rank 16, all linear layers) for `--steps` optimizer steps of `--batch` examples of ~256 tokens
(three booking requests to a prompt, their three answers as the completion), each in a fresh
process so its peak memory (ru_maxrss) is its own. Printed per setting: seconds per step (the
median of the steps after the first, which pays for warm-up), peak RSS, peak anonymous memory
and the peak RSS once training has begun, with its file-backed part (`MemoryPeaks`), the threads
torch ran on and the load average before and after. Settings, run one at a time:

- `tunelab` / `tunelab-gc`: `tunelab train --method lora --max-steps N` without and with
  --gradient-checkpointing (precision auto: bf16 autocast on a CPU with native bf16, where the
  frozen linear layers are held in bf16); `tunelab-fp32-base`: as `tunelab`, the frozen base left
  in fp32 as loaded (what tunelab did before it held it in bf16);
- `trl` / `trl-nogc`: SFTTrainer with a LoRA peft_config on the same rows and the same fp32 base
  model, its defaults (gradient checkpointing on, bf16 autocast) and gradient checkpointing off.

`--copies` measures instead what a LoRA forward under bf16 autocast saves for the backward pass
(torch's saved-tensor hooks, each storage counted once, the weights themselves left out): with
the frozen base in fp32, the bf16 copy autocast makes of each linear weight (2 bytes a linear
parameter); with the linear layers held in bf16, as tunelab trains under bf16 autocast, none.

Both sides run on the same torch thread count (--threads, default torch's own), since tunelab's
default of the cores other programs leave free would change with the machine's load mid-benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SETTINGS = ("tunelab", "tunelab-gc", "tunelab-fp32-base", "trl", "trl-nogc")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
MAX_LENGTH = 1024


def write_data(work: Path, rows: int) -> Path:
    """Rows of ~256 tokens: three booking requests, answered in order."""
    from tunelab.demo import bookings

    made = bookings.make_examples(rows * 3)
    lines = []
    for i in range(rows):
        three = made[3 * i:3 * i + 3]
        prompt = "Extract each booking as JSON with keys name, guests, day, time, one per line.\n" + "\n".join(
            e["prompt"].split("Request: ", 1)[1] for e in three)
        completion = "\n".join(e["completion"] for e in three)
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}]}))
    path = work / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_tunelab(setting: str, base: str, data: Path, out: Path, steps: int, batch: int, threads: int,
                peaks: MemoryPeaks) -> list[float]:
    from tunelab.config import TrainConfig
    from tunelab.train import loop
    from tunelab.train.loop import train

    run_loop = loop.run_loop

    def training(*args, **kwargs):
        peaks.training = True
        return run_loop(*args, **kwargs)

    loop.run_loop = training
    if setting == "tunelab-fp32-base":  # the frozen base as loaded, to measure what holding it in bf16 saves
        from tunelab import device

        device.frozen_base_in_bf16 = lambda model: 0

    config = TrainConfig(base=base, method="lora", batch_size=batch, max_steps=steps, max_length=MAX_LENGTH,
                         test_size=0, warmup_ratio=0.0, gradient_checkpointing=setting == "tunelab-gc")
    train(config, data, out, overwrite=True, quiet=True, threads=threads)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    return [b - a for a, b in zip([0.0, *elapsed], elapsed)]


def run_trl(setting: str, base: str, data: Path, out: Path, steps: int, batch: int,
            peaks: MemoryPeaks) -> list[float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.data import load as data_mod
    from tunelab.models import load_model, load_tokenizer

    rows = [{"prompt": e.prompt_messages(), "completion": [e.messages[-1]]} for e in data_mod.load_examples(data)]
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, max_length=MAX_LENGTH,
                     learning_rate=2e-4, warmup_steps=0, save_strategy="no", report_to="none", logging_steps=1,
                     disable_tqdm=True, gradient_checkpointing=setting == "trl",
                     use_cpu=not torch.cuda.is_available())
    ends = [time.perf_counter()]

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *_, **__):
            peaks.training = True
            ends[0] = time.perf_counter()

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

    trainer = SFTTrainer(model=load_model(Path(base)), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=load_tokenizer(Path(base)),
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA), callbacks=[StepTimes()])
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def saved_copies(base: str, tokens: int = 256) -> None:
    """What one LoRA forward under bf16 autocast saves for backward, with the frozen base in fp32
    and as tunelab trains it (linear layers held in bf16: `device.frozen_base_in_bf16`)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab import device
    from tunelab.models import load_model, resolve_base

    for held in ("fp32", "bf16"):
        model = get_peft_model(load_model(resolve_base(base)), LoraConfig(task_type="CAUSAL_LM", **LORA))
        if held == "bf16":
            device.frozen_base_in_bf16(model)
        output = model.get_output_embeddings()
        linear = [m.base_layer.weight for m in model.modules() if hasattr(m, "base_layer")
                  and isinstance(m.base_layer, torch.nn.Linear) and m.base_layer is not output]
        shapes = {tuple(w.shape) for w in linear} | {tuple(w.shape)[::-1] for w in linear}
        held_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        copies, other = {}, {}

        def pack(saved: torch.Tensor, shapes=shapes, held_storages=held_storages, copies=copies, other=other):
            storage = saved.untyped_storage()
            if storage.data_ptr() in held_storages:
                return saved  # a weight itself, held anyway
            is_copy = saved.dtype == torch.bfloat16 and tuple(saved.shape) in shapes
            (copies if is_copy else other)[storage.data_ptr()] = storage.nbytes()
            return saved

        ids = torch.randint(0, 1000, (1, tokens))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        expected, rest = 2 * sum(w.numel() for w in linear) / 2**20, sum(other.values()) / 2**20
        print(f"{base}, {tokens} tokens, frozen linear layers in {held}: bf16 copies of weights saved for backward "
              f"{sum(copies.values()) / 2**20:.1f} MiB in {len(copies)} storages (2 bytes x {len(linear)} frozen "
              f"linear weights = {expected:.1f} MiB); everything else saved {rest:.1f} MiB")


class MemoryPeaks(threading.Thread):
    """Peaks of this process's memory, sampled every 50 ms from /proc/self/status: the anonymous
    resident memory (RssAnon) over the whole run, and the resident memory (VmRSS) and its
    file-backed part (RssFile) once training has begun (`training` set). ru_maxrss also counts
    the weights file's pages, mapped while the model loads (6.4 GiB for the 1.7B model): page
    cache the kernel can drop, and held on through training where the loaded weights are the
    file's pages themselves."""

    def __init__(self):
        super().__init__(daemon=True)
        self.anonymous = self.training_rss = self.training_file = 0
        self.training = False

    def run(self) -> None:
        while True:
            with open("/proc/self/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            size = {key: int(fields[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile", "VmRSS")}
            self.anonymous = max(self.anonymous, size["RssAnon"])
            if self.training:
                self.training_rss = max(self.training_rss, size["VmRSS"])
                self.training_file = max(self.training_file, size["RssFile"])
            time.sleep(0.05)


def child(setting: str, base: str, work: Path, steps: int, batch: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    peaks = MemoryPeaks()
    peaks.start()
    out = work / setting
    if setting.startswith("tunelab"):
        step_s = run_tunelab(setting, base, work / "train.jsonl", out, steps, batch, threads, peaks)
    else:
        step_s = run_trl(setting, base, work / "train.jsonl", out, steps, batch, peaks)
    result = {"setting": setting, "step_s": step_s, "threads": torch.get_num_threads(),
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,  # KiB on Linux
              "peak_anonymous_gib": peaks.anonymous / 1024**3, "training_rss_gib": peaks.training_rss / 1024**3,
              "training_file_gib": peaks.training_file / 1024**3}
    (work / f"{setting}.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the model folder random_base.py wrote (with weights)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps a setting (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="examples a step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default="runs/bench-big-model", help="work folder")
    parser.add_argument("--copies", action="store_true", help="measure the bf16 weight copies saved for backward")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.copies:
        saved_copies(args.base)
        return
    work = Path(args.out).resolve()
    if args.child:
        child(args.child, args.base, work, args.steps, args.batch, args.threads)
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work.mkdir(parents=True, exist_ok=True)
    write_data(work, max(8, args.steps * args.batch))
    results = []
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            raise SystemExit(f"unknown setting {setting}")
        print(f"running {setting}...", flush=True)
        load_before = os.getloadavg()[0]
        done = subprocess.run([sys.executable, __file__, "--base", args.base, "--out", str(work), "--steps",
                               str(args.steps), "--batch", str(args.batch), "--threads", str(threads),
                               "--child", setting], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-3000:], sep="\n", flush=True)
            print(f"  {setting} failed (exit {done.returncode})", flush=True)
            continue
        r = json.loads((work / f"{setting}.json").read_text())
        r["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        (work / f"{setting}.json").write_text(json.dumps(r, indent=2))
        results.append(r)
        print(f"  steps {', '.join(f'{s:.1f}' for s in r['step_s'])} s; peak RSS {r['peak_rss_gib']:.2f} GiB, "
              f"anonymous {r['peak_anonymous_gib']:.2f} GiB, while training {r['training_rss_gib']:.2f} GiB "
              f"({r['training_file_gib']:.2f} file-backed)", flush=True)

    print("\n| setting | s/step (median after the first) | first step s | peak RSS GiB | peak anonymous GiB "
          "| peak RSS while training GiB (file-backed) | threads | load before, after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        later = r["step_s"][1:] or r["step_s"]
        print(f"| {r['setting']} | {median(later):.1f} | {r['step_s'][0]:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['peak_anonymous_gib']:.2f} | {r['training_rss_gib']:.2f} ({r['training_file_gib']:.2f}) | "
              f"{r['threads']} | {r['load_avg_1min'][0]:.1f}, {r['load_avg_1min'][1]:.1f} |")
    (work / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
