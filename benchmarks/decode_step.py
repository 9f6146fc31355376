"""What a decoding step costs on this machine, and what tunelab's generation loop saves.

    PYTHONPATH=src python benchmarks/decode_step.py

Three measurements with the base model (`--base`, smollm2-135m by default), each printed as a
table and saved to OUT/decode_step.json:

- `matmul`: GFLOP/s of one product of the model's MLP shape (hidden x intermediate) by rows,
  in fp32 and in bf16: how much batching and bf16 can buy on this CPU (tunelab's evaluation,
  generation and serving run on the CPU);
- `step`: milliseconds of one decoding step (a forward pass of one new token per row, after a
  prompt of `--prompt-tokens`) by rows in a batch, in fp32 and under bf16 autocast;
- `cache`: seconds to answer the 48 booking prompts of benchmarks/eval_speed.py, zero-shot and
  few-shot, batches of 32, in `--precision` (auto: bf16 where native), with tunelab's cache
  (room for the next tokens) and with transformers' DynamicCache (which concatenates every
  step), alternating over `--rounds` rounds so a changing load slows both alike; and whether
  the answers are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

ROWS = (1, 16, 32, 48, 128, 512)
STEP_ROWS = (1, 16, 32, 48)


def matmul_gflops(hidden: int, intermediate: int, rows: int, dtype, repeats: int = 100) -> float:
    import torch

    x, weight = torch.randn(rows, hidden, dtype=dtype), torch.randn(intermediate, hidden, dtype=dtype)
    for _ in range(5):
        torch.nn.functional.linear(x, weight)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(x, weight)
    return 2 * rows * hidden * intermediate * repeats / (time.perf_counter() - started) / 1e9


def step_ms(model, rows: int, prompt_tokens: int, precision: str, steps: int = 16) -> float:
    """Median milliseconds of a decoding step for `rows` rows."""
    import torch

    from tunelab.decoding.generate import _new_cache
    from tunelab.device import autocast, casts_kept

    ids = torch.randint(100, 1000, (rows, prompt_tokens))
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad(), casts_kept(model), autocast(precision, model.device):
        cache = _new_cache(model)
        token = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True,
                      logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            started = time.perf_counter()
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            token = model(input_ids=token, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                          cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - started)
    return 1000 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="base model (default: smollm2-135m)")
    parser.add_argument("--prompt-tokens", type=int, default=80, help="prompt length for the step timing")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="arithmetic of the cache comparison (default: auto, as tunelab eval)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the cache comparison")
    parser.add_argument("--out", default="runs/decode-step", help="folder for decode_step.json")
    args = parser.parse_args()

    import torch
    from transformers import DynamicCache

    import tunelab.decoding.generate as generate
    from tunelab.data.load import Example
    from tunelab.demo import bookings
    from tunelab.device import computes_bf16
    from tunelab.evaluate.baselines import few_shot_prompts
    from tunelab.models import for_inference, load_model, load_tokenizer, resolve_base
    from tunelab.template import Template

    path = resolve_base(args.base)
    model = for_inference(load_model(path))
    template = Template.for_model(load_tokenizer(path))
    results: dict = {"base": args.base, "threads": torch.get_num_threads(), "load_average": os.getloadavg()}

    hidden, intermediate = model.config.hidden_size, model.config.intermediate_size
    results["matmul"] = {dtype: {rows: matmul_gflops(hidden, intermediate, rows, getattr(torch, name))
                                 for rows in ROWS}
                         for dtype, name in (("fp32", "float32"), ("bf16", "bfloat16"))}
    print(f"GFLOP/s of a {hidden}x{intermediate} product, by rows:")
    print("| rows | " + " | ".join(map(str, ROWS)) + " |\n|---|" + "---|" * len(ROWS))
    for dtype, by_rows in results["matmul"].items():
        print(f"| {dtype} | " + " | ".join(f"{v:.0f}" for v in by_rows.values()) + " |")

    results["step"] = {p: {rows: step_ms(model, rows, args.prompt_tokens, p) for rows in STEP_ROWS}
                       for p in ("fp32", "bf16")}
    print(f"\nms per decoding step after {args.prompt_tokens} prompt tokens, by rows (per row in brackets):")
    print("| rows | " + " | ".join(map(str, STEP_ROWS)) + " |\n|---|" + "---|" * len(STEP_ROWS))
    for p, by_rows in results["step"].items():
        print(f"| {p} | " + " | ".join(f"{v:.1f} ({v / r:.1f})" for r, v in by_rows.items()) + " |")

    rows = bookings.make_examples(98, seed=1)
    examples = [Example([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                        i + 1) for i, r in enumerate(rows)]
    questions = [e.messages[:1] for e in examples[:48]]
    forms = {"zero-shot": questions, "few-shot": few_shot_prompts(questions, examples[48:], 3)}
    caches = {"room": generate._new_cache, "concatenate": lambda model: DynamicCache(config=model.config)}
    list(generate.generate_detailed(model, template, questions[:2], 4, 2, precision=args.precision))  # warm-up
    seconds = {form: {name: [] for name in caches} for form in forms}
    answers: dict = {form: {} for form in forms}
    try:
        for _ in range(args.rounds):
            for form, prompts in forms.items():
                for name, make in caches.items():
                    generate._new_cache = make
                    started = time.perf_counter()
                    answers[form][name] = [a.text for a in generate.generate_detailed(
                        model, template, prompts, 32, 32, precision=args.precision)]
                    seconds[form][name].append(time.perf_counter() - started)
    finally:
        generate._new_cache = caches["room"]
    computes = "bf16" if computes_bf16(args.precision, model.device) else "fp32"
    results["cache"] = {"precision": args.precision, "computes": computes, "seconds": seconds,
                        "same_answers": {f: sum(a == b for a, b in zip(*answers[f].values())) for f in forms}}
    print(f"\n48 prompts, 32 tokens, batches of 32, {args.precision} ({computes}), seconds over {args.rounds} rounds:")
    for form in forms:
        print(f"  {form:9} " + "; ".join(f"{name} " + " ".join(f"{s:.2f}" for s in times)
                                       for name, times in seconds[form].items())
              + f"; same answers {results['cache']['same_answers'][form]}/{len(forms[form])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
