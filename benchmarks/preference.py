"""Preference tuning: which fixes more held-out failures of a systematic mistake, SFT on the
corrections, DPO on them, or both?

    PYTHONPATH=src python benchmarks/preference.py --out runs/pref                 # smollm2-135m, CPU: hours
    PYTHONPATH=src python benchmarks/preference.py --out runs/pref --train-rows 320 --probe-rows 120 \\
        --max-steps 40 --new-tokens 12 --pair-epochs 2                             # the measured one: ~35 min
    PYTHONPATH=src python benchmarks/preference.py --out runs/pref-dry --base DIR --train-rows 40 --probe-rows 24 \\
        --max-steps 30 --lr 0.01 --new-tokens 12                                   # the pipeline on a tiny model

The task is this script's own: a date written in a sentence -> the date as YYYY-MM-DD. The
training rows write their dates month first ("03/05/2024", "March 5, 2024"); the probe rows
write them day first with dots ("05.03.2024"), which training never shows, so a fine-tune makes
one mistake on them systematically (reading the day as the month). Steps:

1. run0: LoRA SFT (tunelab defaults, `--max-steps` if given) on the training rows; answer every
   probe row, and `--control-rows` month-first rows it was not trained on, greedily
   (`Run.generate_batch`, no copy constraint) and score exact match;
2. run0's failures are cut in two by a hash of the prompt: the *corrected* half becomes
   corrections.jsonl in the shape `tunelab data review` writes (prompt, chosen = the right answer,
   rejected = run0's answer, line), the other half stays held out, the failures to fix; the
   probes of either kind run0 got right are the *kept* ones, to count what a variant breaks;
3. variants, each answering the held-out failures and the kept probes:
   - sft:      SFT on the training rows + the corrections (prompt + chosen), from the base;
   - dpo:      DPO on the corrections (`--pair-epochs` over them), from run0 merged (`tunelab
               export --format merged`), so the reference is run0 itself;
   - orpo:     ORPO on the corrections from run0 merged (its chosen-answer loss is the SFT part);
   - sft+dpo:  DPO on the corrections from the sft variant merged.
4. prints and writes OUT/results.json after each variant: failures fixed (of the held-out ones),
   kept probes broken, and training wall time. A training already done by an earlier run of the
   script with the same data, base and options is reused (OUT/NAME/benchmark.json), so
   `--variants` can add variants to a finished run.

docs/TRAINING.md#preference-tuning and docs/BENCHMARKS.md#preference-tuning give what it measured
on the real model, with the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SENTENCES = ["The booking starts on {date}.", "Payment was received on {date}.", "We met on {date} in the office.",
             "The contract ends {date}.", "Delivery is planned for {date}."]
INSTRUCTION = "Give the date in this sentence as YYYY-MM-DD.\n\n"
VARIANTS = ["sft", "dpo", "orpo", "sft+dpo"]


def rows(n: int, day_first: bool, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        year, month, day = rng.randint(2015, 2030), rng.randint(1, 12), rng.randint(1, 12)  # both read as a month
        if day == month:
            day = day % 12 + 1
        if day_first:
            written = f"{day:02d}.{month:02d}.{year}"
        elif rng.random() < 0.5:
            written = f"{month:02d}/{day:02d}/{year}"
        else:
            written = f"{MONTHS[month - 1]} {day}, {year}"
        sentence = rng.choice(SENTENCES).format(date=written)
        out.append({"prompt": INSTRUCTION + sentence, "completion": f"{year}-{month:02d}-{day:02d}"})
    return out


def write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def train(data: Path, out: Path, base: str, options: dict) -> tuple[Path, float]:
    """Train `out`, or reuse it when an earlier run of this script trained it from the same data,
    base and options (the benchmark is long: a rerun with another variant list keeps run0)."""
    from tunelab.config import TrainConfig
    from tunelab.train.loop import train as run_training

    record = out / "benchmark.json"
    recipe = {"data": hashlib.sha256(data.read_bytes()).hexdigest(), "base": base, "options": options}
    if record.exists() and json.loads(record.read_text())["recipe"] == recipe:
        return out, json.loads(record.read_text())["seconds"]
    started = time.perf_counter()
    run_training(TrainConfig.build(base=base, **options), data, out, overwrite=True, quiet=True)
    seconds = time.perf_counter() - started
    record.write_text(json.dumps({"recipe": recipe, "seconds": seconds}))
    return out, seconds


def merged(run: Path) -> str:
    from tunelab.cli import main

    folder = run.parent / f"{run.name}-merged"
    if not folder.exists():
        assert main(["export", str(run), "--format", "merged", "--out", str(folder)]) == 0
    return str(folder)


def answers(run: Path, probes: list[dict], new_tokens: int) -> list[str]:
    import tunelab

    return tunelab.load(run).generate_batch([p["prompt"] for p in probes], max_new_tokens=new_tokens,
                                            copy_constraint=False)


def right(answer: str, probe: dict) -> bool:
    from tunelab.evaluate.metrics import exact_match

    return exact_match(answer, probe["completion"]) == 1.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--train-rows", type=int, default=600)
    parser.add_argument("--probe-rows", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=None,
                        help="per SFT training, run0 and sft (default: one epoch)")
    parser.add_argument("--control-rows", type=int, default=40,
                        help="month-first probes, as trained, that run0 gets right: kept ones a variant can break")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="per training (default: tunelab's)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--pair-epochs", type=float, default=4,
                        help="epochs of the trainings on the corrections alone (a few dozen pairs, "
                             "so a few steps an epoch; --max-steps does not apply to them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    args = parser.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    train_file = write_jsonl(out / "train.jsonl", rows(args.train_rows, day_first=False, rng=rng))
    probes = rows(args.probe_rows, day_first=True, rng=rng)
    # Month-first rows not trained on: a variant that learns "swap the two numbers" instead of
    # "read dots day first" breaks these, which the day-first probes (all wrong in run0) cannot show.
    probes += rows(args.control_rows, day_first=False, rng=random.Random(args.seed + 1))
    common = {"seed": args.seed, **({"max_steps": args.max_steps} if args.max_steps else {}),
              **({"lr": args.lr} if args.lr else {})}

    run0, seconds0 = train(train_file, out / "run0", args.base, {**common, "test_size": 0.1})
    first = answers(run0, probes, args.new_tokens)
    wrong = {i for i, (a, p) in enumerate(zip(first, probes)) if not right(a, p)}
    failed = [i for i in range(args.probe_rows) if i in wrong]
    kept = [i for i in range(len(probes)) if i not in wrong]

    def reviewed(i: int) -> bool:
        return hashlib.sha256(probes[i]["prompt"].encode()).digest()[0] % 2 == 0

    corrected = [i for i in failed if reviewed(i)]
    to_fix = [i for i in failed if not reviewed(i)]
    print(f"run0: {len(failed)} of {args.probe_rows} day-first probes wrong ({len(corrected)} corrected, "
          f"{len(to_fix)} held out), {len(wrong) - len(failed)} of {args.control_rows} month-first ones; "
          f"{len(kept)} kept; trained in {seconds0:.0f} s", flush=True)
    if not corrected or not to_fix:
        print("too few failures to split; raise --probe-rows", file=sys.stderr)
        return 1
    corrections = write_jsonl(out / "corrections.jsonl", [
        {"prompt": [{"role": "user", "content": probes[i]["prompt"]}],
         "chosen": [{"role": "assistant", "content": probes[i]["completion"]}],
         "rejected": [{"role": "assistant", "content": first[i]}], "line": i + 1} for i in corrected
        if first[i].strip() and first[i].strip() != probes[i]["completion"]])  # E_PAIR_MISSING, E_PAIR_IDENTICAL
    with_corrections = write_jsonl(out / "train+corrections.jsonl",
                                   [json.loads(line) for line in train_file.read_text().splitlines()]
                                   + [json.loads(line) for line in corrections.read_text().splitlines()])
    # The pair trainings see only the few dozen corrections: epochs, not run0's step budget.
    pairs = {"seed": args.seed, **({"lr": args.lr} if args.lr else {}), "test_size": 0, "beta": args.beta,
             "epochs": args.pair_epochs}

    results = {"base": args.base, "probes": len(probes), "run0_wrong": len(failed), "corrected": len(corrected),
               "held_out_failures": len(to_fix), "kept": len(kept), "options": vars(args) | {"out": str(out)},
               "variants": {}}

    def score(name: str, trained: tuple[Path, float]) -> tuple[Path, float]:
        """Answer the held-out failures and the kept probes with one variant; results.json is
        rewritten after each, so a run stopped part way keeps the variants it finished."""
        run, seconds = trained
        got = answers(run, [probes[i] for i in to_fix + kept], args.new_tokens)
        fixed = sum(right(a, probes[i]) for a, i in zip(got[:len(to_fix)], to_fix))
        broken = sum(not right(a, probes[i]) for a, i in zip(got[len(to_fix):], kept))
        results["variants"][name] = {"fixed": fixed, "broken": broken, "train_s": round(seconds, 1)}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{name:<8} fixed {fixed} of {len(to_fix)}, broke {broken} of {len(kept)}, trained in {seconds:.0f} s",
              flush=True)
        return trained

    # DPO first: it needs run0 alone and is the question; the SFT variant retrains from the base.
    if "dpo" in args.variants:
        score("dpo", train(corrections, out / "dpo", merged(run0), {**pairs, "objective": "dpo"}))
    if "sft" in args.variants or "sft+dpo" in args.variants:
        sft = score("sft", train(with_corrections, out / "sft", args.base, {**common, "test_size": 0}))
    if "orpo" in args.variants:
        score("orpo", train(corrections, out / "orpo", merged(run0), {**pairs, "objective": "orpo"}))
    if "sft+dpo" in args.variants:
        score("sft+dpo", train(corrections, out / "sft+dpo", merged(sft[0]), {**pairs, "objective": "dpo"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
