"""Training throughput: tunelab vs Hugging Face TRL's SFTTrainer on the same machine, same data.

    PYTHONPATH=src python benchmarks/train_throughput.py --examples 240

SmolLM2-135M, full fine-tuning and LoRA, one epoch at batch 8 over the bundled booking examples
(`tunelab.demo.bookings`, 90% train / 10% held out by tunelab's split). Each setting runs in
a fresh subprocess, so its peak memory (ru_maxrss) is its own. Both sides get the same training
problem: the same train examples, the model's own chat template, loss on the completion only,
AdamW at the same peak learning rate, warmup then cosine decay, one epoch, batch 8, gradient
clipping at 1.0, max length 1024. TRL keeps its other defaults (gradient checkpointing and bf16
autocast are on by default in SFTConfig; use_cpu=True is set without a GPU, as TRL's error
message asks); `trl-packing` adds packing=True (TRL then packs rows of max_length 1024 tokens and
counts the batch in rows, so an epoch has ~9x fewer steps). The goal ratio is against the faster
of these two. `trl-tuned` is TRL set up by hand to match tunelab: one packed row of ~8 examples
per step, no gradient checkpointing. tunelab runs with its defaults too (--precision
auto: bf16 autocast where the CPU or GPU computes bf16 natively).

Printed per setting: useful (non-padding) tokens/s over the training loop, whole-run wall time
(process start to saved weights: imports, model load, tokenization, training, saving), peak
memory, the wall-time ratio to the faster TRL setting of the same method, the held-out loss
(every trained model loaded from disk and scored by tunelab.train.loss.heldout_loss on the same
encoded held-out examples), and model FLOPs utilisation against the fp32 matmul peak measured
here with torch.mm. Results also go to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = ("full", "lora")
TRL_VARIANTS = {
    "trl": {},
    "trl-packing": {"packing": True},
    # TRL set up as close to tunelab as it goes: one packed, padding-free row of about 8 examples
    # per step (so as many optimizer steps as tunelab), no gradient checkpointing.
    "trl-tuned": {"packing": True, "gradient_checkpointing": False, "per_device_train_batch_size": 1},
}
TUNELAB_VARIANTS = {
    "tunelab": {},
    # Activations recomputed in backward, as TRL's default does: the like-for-like memory comparison.
    "tunelab-gc": {"gradient_checkpointing": True},
    # The same examples per step as micro-batches of half as many (activations kept for one at a time).
    "tunelab-accum": {"grad_accum": 2},
}
DEFAULT_SETTINGS = [f"{tool}-{method}" for method in METHODS for tool in ("tunelab", "trl", "trl-packing", "trl-tuned")]
BATCH, MAX_LENGTH, TEST_SIZE, SEED, WARMUP = 8, 1024, 0.1, 0, 0.05
BASE = "smollm2-135m"
"""Base model (--base): the bundled name or a local folder; BATCH is set by --batch."""
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


def split_setting(setting: str) -> tuple[str, str]:
    tool, method = setting.rsplit("-", 1)
    if method not in METHODS or (tool not in TUNELAB_VARIANTS and tool not in TRL_VARIANTS):
        raise SystemExit(f"unknown setting {setting}")
    return tool, method


def learning_rate(method: str) -> float:
    from tunelab.config import TrainConfig

    return TrainConfig(method=method).learning_rate


def prepare_data(work: Path, examples: int):
    """Generate the examples and split them once, as `tunelab train` does (its data check, duplicates
    removed, hash split with SEED). The training split goes to train.jsonl, which every setting and
    seed trains on, so a seed only changes data order and initialisation, never the held-out set.
    Returns the train and held-out examples encoded by the model's template."""
    from tunelab.config import TrainConfig
    from tunelab.demo import bookings
    from tunelab.train.loop import prepare

    path = work / "bookings.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in bookings.make_examples(examples)))
    prepared = prepare(TrainConfig(base=BASE, max_length=MAX_LENGTH, test_size=TEST_SIZE, seed=SEED), path)
    assert len(prepared.train_encoded) == len(prepared.train), "an example is over MAX_LENGTH: TRL would truncate it"
    (work / "train.jsonl").write_text("".join(json.dumps({"messages": e.messages}) + "\n" for e in prepared.train))
    return prepared.train_encoded, prepared.test_encoded


# ---- one setting, in its own process ----

def run_tunelab(variant: str, method: str, seed: int, work: Path, out: Path) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.train.loop import train

    # The training split only (test_size 0): the held-out examples were set apart by prepare_data.
    # No held-out loss during training (TRL does none either); it is measured afterwards for all.
    options = TUNELAB_VARIANTS[variant]
    config = TrainConfig(base=BASE, method=method, batch_size=BATCH // options.get("grad_accum", 1), epochs=1,
                         max_length=MAX_LENGTH, test_size=0, seed=seed, warmup_ratio=WARMUP, **options)
    train(config, work / "train.jsonl", out, overwrite=True, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    from tunelab.device import accelerator_options

    return {"steps": last["step"], "train_s": last["elapsed_s"], "tokens_seen": last["tokens"],
            "mixed_precision": accelerator_options(config.precision)["mixed_precision"],
            "final_train_loss": last["loss"], "weights": str(out / ("adapter" if method == "lora" else "model"))}


def run_trl(variant: str, method: str, seed: int, work: Path, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from tunelab.data import load as data_mod
    from tunelab.models import load_model, load_tokenizer, resolve_base

    train = data_mod.load_examples(work / "train.jsonl")
    # Conversational prompt/completion rows: TRL renders them with the tokenizer's chat template
    # (the one tunelab uses) and trains on the completion only.
    rows = [{"prompt": e.prompt_messages(), "completion": [e.messages[-1]]} for e in train]
    overrides = dict(TRL_VARIANTS[variant])
    if overrides.get("per_device_train_batch_size") == 1:  # rows of BATCH examples of average length
        lengths = json.loads((work / "lengths.json").read_text())
        overrides["max_length"] = round(BATCH * sum(lengths) / len(lengths))
    steps = math.ceil(len(rows) / BATCH)
    # Without packing (or packing ~8 examples a row) TRL takes tunelab's number of steps: round the
    # warmup as tunelab does. Packing 8 rows of 1024 tokens a step: pass the ratio.
    packs_rows = overrides.get("packing") and overrides.get("per_device_train_batch_size", BATCH) == BATCH
    warmup = WARMUP if packs_rows else round(steps * WARMUP)
    overrides.setdefault("per_device_train_batch_size", BATCH)
    args = SFTConfig(
        output_dir=str(out), num_train_epochs=1, learning_rate=learning_rate(method),
        lr_scheduler_type="cosine", warmup_steps=warmup, weight_decay=0.0, max_grad_norm=1.0,
        **{"max_length": MAX_LENGTH, **overrides}, seed=seed, save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True,
        # SFTConfig defaults to bf16, which on a machine without a GPU stops with "You need to
        # assign use_cpu if you want to train the model on CPU"; this is that fix.
        use_cpu=not torch.cuda.is_available(),
    )
    base = resolve_base(BASE)
    tokenizer = load_tokenizer(base)
    trainer = SFTTrainer(
        model=load_model(base), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if method == "lora" else None,
    )
    dataset = trainer.train_dataset
    lengths = [len(ids) for ids in dataset["input_ids"]]
    # Trained positions: TRL turns the completion mask into labels (-100 elsewhere) when it packs.
    if "labels" in dataset.column_names:
        trained = sum(sum(1 for label in labels if label != -100) for labels in dataset["labels"])
    else:
        trained = sum(map(sum, dataset["completion_mask"])) if "completion_mask" in dataset.column_names else None
    result = trainer.train()
    trainer.save_model(str(out / "weights"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    settings = {k: getattr(trainer.args, k) for k in (
        "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "warmup_steps", "num_train_epochs",
        "max_length", "packing", "padding_free", "gradient_checkpointing", "bf16", "optim", "completion_only_loss",
        "loss_type", "max_grad_norm", "use_cpu", "seed")}
    settings["padding_free"] = trainer.padding_free
    settings["attn_implementation"] = trainer.model.config._attn_implementation
    settings["torch_threads"] = torch.get_num_threads()
    return {"steps": trainer.state.global_step, "train_s": result.metrics["train_runtime"],
            "rows": len(lengths), "tokens_seen": sum(lengths),
            "trained_tokens": trained,
            "final_train_loss": losses[-1] if losses else None, "trl_settings": settings,
            "weights": str(out / "weights")}


def child(run: str, work: Path) -> None:
    setting, seed = run.rsplit("@", 1)
    tool, method = split_setting(setting)
    out = work / f"{setting}-seed{seed}"
    if tool in TUNELAB_VARIANTS:
        result = run_tunelab(tool, method, int(seed), work, out)
    else:
        result = run_trl(tool, method, int(seed), work, out)
    result["wall_s"] = time.perf_counter() - STARTED
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    (work / f"{setting}-seed{seed}.json").write_text(json.dumps(result, indent=2, default=str))


# ---- the parent: data, peak, children, held-out loss, table ----

def matmul_peak_gflops(dtype_name: str = "float32", n: int = 4096, repeats: int = 5) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def model_flops(method: str, encoded, config, lora_params: int) -> float:
    """Model FLOPs of one epoch on the useful tokens: 2 per weight per token forward, 2 more for
    the input gradients, 2 more for weight gradients of trained weights (full fine-tuning);
    attention scores over each example's causal triangle; the output projection only at trained
    positions (what a loss on completions needs). Recomputation (checkpointing) and padding do
    not count."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    head_dim = d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * inter  # q,o + k,v + mlp
    weights = layers * per_layer
    tokens = sum(len(e.input_ids) for e in encoded)
    trained = sum(e.trainable for e in encoded)
    attention = sum(2 * layers * heads * head_dim * len(e.input_ids) ** 2 for e in encoded)  # fwd, causal half
    factor = 6 if method == "full" else 4
    return factor * (weights * tokens + d * vocab * trained + attention) + 6 * lora_params * tokens


def heldout(setting: str, weights: str, test_encoded) -> float:
    from tunelab.models import load_model, resolve_base
    from tunelab.train.loss import heldout_loss

    _, method = split_setting(setting)
    if method == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(resolve_base(BASE)), weights).merge_and_unload()
    else:
        model = load_model(Path(weights))
    return heldout_loss(model.to(device()).eval(), test_encoded, BATCH)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def lora_parameter_count() -> int:
    from peft import LoraConfig, get_peft_model

    from tunelab.models import load_model, resolve_base

    model = get_peft_model(load_model(resolve_base(BASE)), LoraConfig(task_type="CAUSAL_LM", **LORA))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spread(values) -> str:
    """'mean' for one value, else 'mean ± sample sd'."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{mean(values):.4f} ± {stdev(values):.4f}"


def main() -> None:
    global BASE, BATCH
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=240,
                        help="booking examples generated (90%% trained for one epoch; the full set is 1200)")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help="comma-separated, from {tunelab,trl,trl-packing,trl-tuned}-{full,lora}")
    parser.add_argument("--seeds", default=str(SEED),
                        help="comma-separated training seeds (data order, initialisation), each setting run once per "
                             "seed on the same split; times and losses are averaged, losses also get their spread")
    parser.add_argument("--out", default="runs/bench-throughput", help="work folder")
    parser.add_argument("--reuse", action="store_true",
                        help="take a setting and seed already measured in --out (same --examples) instead of running "
                             "it again, e.g. to add a setting to a finished run")
    parser.add_argument("--base", default=BASE, help="base model: smollm2-135m or a local Hugging Face folder")
    parser.add_argument("--batch", type=int, default=BATCH, help="examples per step (default: %(default)s)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    BASE, BATCH = args.base, args.batch
    work = Path(args.out).resolve()
    if args.child:
        child(args.child, work)
        return

    import torch
    from transformers import AutoConfig

    from tunelab.models import load_model, resolve_base
    from tunelab.train.loss import heldout_loss

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work.mkdir(parents=True, exist_ok=True)
    settings = args.settings.split(",")
    seeds = list(dict.fromkeys(int(seed) for seed in args.seeds.split(",")))
    for setting in settings:
        split_setting(setting)
    train_encoded, test_encoded = prepare_data(work, args.examples)
    (work / "lengths.json").write_text(json.dumps([len(e.input_ids) for e in train_encoded]))
    peak, peak_bf16 = matmul_peak_gflops("float32"), matmul_peak_gflops("bfloat16")
    print(f"{args.examples} examples: {len(train_encoded)} trained for one epoch, {len(test_encoded)} held out; "
          f"torch.mm peak {peak:.1f} GFLOP/s fp32, {peak_bf16:.1f} GFLOP/s bf16, on {torch.get_num_threads()} threads",
          flush=True)

    runs = {}  # (setting, seed) -> result; seeds outermost, so a slow hour of the machine hits every setting
    for seed in seeds:
        for setting in settings:
            measured = work / f"{setting}-seed{seed}.json"
            if args.reuse and measured.exists():
                runs[setting, seed] = json.loads(measured.read_text())
                runs[setting, seed].setdefault("load_avg_1min", [math.nan, math.nan])
                print(f"reusing {setting} seed {seed}: {runs[setting, seed]['wall_s']:.0f} s", flush=True)
                continue
            print(f"running {setting} seed {seed}...", flush=True)
            load_before = os.getloadavg()[0]
            done = subprocess.run([sys.executable, __file__, "--out", str(work), "--base", BASE, "--batch", str(BATCH),
                                   "--child", f"{setting}@{seed}"],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-5000:], sep="\n")
                raise SystemExit(f"{setting} seed {seed} failed")
            r = runs[setting, seed] = json.loads(measured.read_text())
            # Other work on a shared machine shows here: a 1-minute load above the cores in use skews times.
            r["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            measured.write_text(json.dumps(r, indent=2, default=str))
            print(f"  {r['wall_s']:.0f} s, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)

    base_path = resolve_base(BASE)
    config = AutoConfig.from_pretrained(base_path)
    base_loss = heldout_loss(load_model(base_path).to(device()).eval(), test_encoded, BATCH)
    lora_params = lora_parameter_count()
    useful = sum(len(e.input_ids) for e in train_encoded)
    for (setting, _), r in runs.items():
        r["heldout_loss"] = heldout(setting, r["weights"], test_encoded)

    # One row per setting: times averaged over seeds, held-out loss as mean ± sd.
    results = {}
    for setting in settings:
        _, method = split_setting(setting)
        mine = [runs[setting, seed] for seed in seeds]
        train_s = mean([r["train_s"] for r in mine])
        flops_per_s = model_flops(method, train_encoded, config, lora_params if method == "lora" else 0) / train_s
        results[setting] = {
            "steps": mine[0]["steps"], "train_s": train_s, "wall_s": mean([r["wall_s"] for r in mine]),
            "useful_tokens_per_s": useful / train_s, "peak_rss_gb": max(r["peak_rss_gb"] for r in mine),
            "peak_gpu_gb": max(r.get("peak_gpu_gb", 0.0) for r in mine),
            "heldout_losses": [r["heldout_loss"] for r in mine],
            "heldout_loss": mean([r["heldout_loss"] for r in mine]),
            "mfu": flops_per_s / (peak * 1e9), "mfu_bf16_peak": flops_per_s / (peak_bf16 * 1e9),
            "load_avg_1min": [min((r["load_avg_1min"][0] for r in mine), key=lambda v: (math.isnan(v), v)),
                              max((r["load_avg_1min"][1] for r in mine), key=lambda v: (not math.isnan(v), v))],
            "runs": {seed: runs[setting, seed] for seed in seeds},
        }
    for setting, r in results.items():
        _, method = split_setting(setting)
        trl = [o["wall_s"] for s, o in results.items()
               if split_setting(s) in (("trl", method), ("trl-packing", method))]
        tuned = [o["wall_s"] for s, o in results.items() if split_setting(s) == ("trl-tuned", method)]
        r["faster_trl_wall_over_this"] = min(trl) / r["wall_s"] if trl else None
        r["trl_tuned_wall_over_this"] = tuned[0] / r["wall_s"] if tuned else None

    print(f"\nbase model held-out loss {base_loss:.4f}; {useful} useful tokens per epoch; "
          f"{len(seeds)} seed(s): {', '.join(map(str, seeds))}\n")
    print("| setting | steps | useful tok/s | train loop s | whole run s | faster TRL / this | trl-tuned / this | "
          "peak RSS GB | held-out loss | MFU (fp32 peak) | MFU (bf16 peak) | load before, after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setting, r in results.items():
        ratio = f"{r['faster_trl_wall_over_this']:.2f}x" if r["faster_trl_wall_over_this"] else "-"
        tuned = f"{r['trl_tuned_wall_over_this']:.2f}x" if r["trl_tuned_wall_over_this"] else "-"
        print(f"| {setting} | {r['steps']} | {r['useful_tokens_per_s']:.0f} | {r['train_s']:.0f} | {r['wall_s']:.0f} | "
              f"{ratio} | {tuned} | {r['peak_rss_gb']:.2f} | {spread(r['heldout_losses'])} | {r['mfu']:.1%} | "
              f"{r['mfu_bf16_peak']:.1%} | {r['load_avg_1min'][0]:.1f}, {r['load_avg_1min'][1]:.1f} |")
    if len(seeds) > 1:
        print("\n| setting | " + " | ".join(f"seed {seed}: held-out loss, whole run s" for seed in seeds) + " |")
        print("|---|" + "---|" * len(seeds))
        for setting in settings:
            cells = [f"{runs[setting, seed]['heldout_loss']:.4f}, {runs[setting, seed]['wall_s']:.0f}"
                     for seed in seeds]
            print(f"| {setting} | " + " | ".join(cells) + " |")
    for setting in settings:
        r = runs[setting, seeds[0]]
        if "trl_settings" in r:
            print(f"\n{setting}: {json.dumps(r['trl_settings'])}; rows {r['rows']}, tokens {r['tokens_seen']}, "
                  f"trained tokens {r['trained_tokens']}")
    if torch.cuda.is_available():
        print(f"\n{torch.cuda.get_device_name()}: peak GPU memory allocated " +
              ", ".join(f"{setting} {r['peak_gpu_gb']:.1f} GiB" for setting, r in results.items()))
    tunelab_trained = sum(e.trainable for e in train_encoded)
    print(f"\ntunelab: {len(train_encoded)} rows, tokens {useful}, trained tokens {tunelab_trained}")
    summary = {"examples": args.examples, "seeds": seeds, "train_examples": len(train_encoded),
               "test_examples": len(test_encoded), "useful_tokens": useful, "trained_tokens": tunelab_trained,
               "matmul_peak_gflops": peak, "matmul_peak_gflops_bf16": peak_bf16,
               "threads": torch.get_num_threads(), "base_heldout_loss": base_loss, "results": results}
    (work / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwall time of the benchmark {time.perf_counter() - STARTED:.0f} s; results in {work / 'results.json'}")


if __name__ == "__main__":
    main()
