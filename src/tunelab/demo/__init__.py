"""`tunelab demo`: the whole pipeline on the bundled booking-extraction task.

Generate the examples, fine-tune smollm2-135m, evaluate the base model zero-shot and few-shot
against the fine-tuned one on held-out examples whose names training never saw (the split is by
the rows' name pool), and print the comparison, the report's path, the wall time and the peak
memory.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from tunelab.config import TrainConfig
from tunelab.demo import bookings
from tunelab.errors import check_output_folder
from tunelab.evaluate.core import format_report
from tunelab.evaluate.results import EvalResults


def write_dataset(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in bookings.make_examples(n):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def peak_memory_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


def demo_config(method: str = "full", max_steps: int | None = 100) -> TrainConfig:
    # Held out: names whose first names and surnames training never saw (bookings.NAME_POOLS); a
    # random split would hold out names that training shows, and flatter the tuned model.
    # Full fine-tuning recomputes the activations in backward, so that the demo peaks under 4 GiB
    # of memory, for ~1.3x the step time (docs/BENCHMARKS.md, "Where the demo's memory goes");
    # LoRA's optimizer states are small and it stays far under that without.
    return TrainConfig(method=method, max_steps=max_steps, batch_size=8, test_size=0.1, max_length=256,
                       split_by="metadata.name_pool", gradient_checkpointing=method == "full")


def run_demo(out: Path, examples: int = 1200, method: str = "full", max_steps: int | None = 100,
             eval_limit: int = 100, threads: int | None = None) -> EvalResults:
    from tunelab.report.html import write_report
    from tunelab.run import Run
    from tunelab.train.loop import train

    check_output_folder(out, "--out")
    check_output_folder(out.parent, "--out")  # the generated data goes beside the run
    started = time.perf_counter()
    print(bookings.describe(), "\n")
    data = write_dataset(out.parent / f"{out.name}-data" / "bookings.jsonl", examples)
    print(f"Wrote {examples} examples to {data}")
    config = demo_config(method, max_steps)
    train(config, data, out, overwrite=True, threads=threads)
    run = Run(out, threads=threads)
    held_out = min(eval_limit, len(run.files.test.read_text(encoding="utf-8").splitlines()))
    print(f"Evaluating the base model (zero-shot, few-shot) and the fine-tuned model on {held_out} "
          "held-out examples...")
    evaluated = time.perf_counter()
    results = run.evaluate(limit=eval_limit, shots=3, retrieval=False)
    evaluation = time.perf_counter() - evaluated
    report = write_report(out)
    minutes = (time.perf_counter() - started) / 60
    print()
    print(format_report(results))
    print()
    print(f"Report written to {report}")
    print(f"Wall time {minutes:.1f} min (evaluation {evaluation / 60:.1f} min), "
          f"peak memory {peak_memory_gib():.2f} GiB")
    print(f"Run folder: {out}  (try: tunelab chat {out})")
    return results
