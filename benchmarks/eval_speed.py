"""Evaluation speed: tunelab's batched generation vs one-by-one `model.generate` calls.

    PYTHONPATH=src python benchmarks/eval_speed.py --prompts 48
    PYTHONPATH=src python benchmarks/eval_speed.py --prompts 48 --demo-run runs/demo --limit 100

The prompts are the demo's booking-extraction questions (`tunelab.demo.bookings`), asked of
the base model (`--base`, smollm2-135m by default) through its own chat template, greedily, with
the same token limit, in two forms: zero-shot (the question alone) and few-shot (`--shots`
training examples before every question, as `tunelab eval` builds them). Three ways to answer
them, timed on the same prompts:

- `one-by-one`: what a new user writes first: one `model.generate` call per prompt;
- `hf-batched`: `model.generate` on left-padded batches sorted by length (tunelab's earlier path);
- `tunelab-fp32`: `tunelab.decoding.generate.generate_detailed` in fp32, the arithmetic of the two ways
  above: KV-cache loop where finished rows leave the batch, the prefix that every prompt of a
  window shares is computed once, and the cache has room for the next tokens;
- `tunelab`: the same loop in the arithmetic `tunelab eval` uses by default (`--precision`, auto:
  bf16 autocast where the hardware computes bf16 natively, as in training);
- with `--compare-to REV`, `tunelab@REV`: the same from generate.py as it was at git revision REV,
  to check that a change to the loop keeps its speed (same process, same prompts, same load).

Printed: seconds, answers per second, the speed-up over one-by-one, and how many answers equal
the one-by-one answers. With `--rounds N` the prompts are split into N rounds and every way
answers its share of each round in turn, so a machine whose load changes over minutes (other
jobs on the same cores) slows each way alike and the speed-up stays meaningful; tunelab then
computes the shared prefix once per round rather than once, which only makes it slower.
`--threads` sets torch's threads for every way: on a loaded machine, two threads per matrix
product on two busy cores wait on each other and batched products become many times slower
than single-row ones, which says more about the load than about the loop. With `--threads 1`
the process's CPU time, printed beside the wall time, is the work each way does whatever share
of a core the load leaves it: its ratio is the steadier speed-up on a busy machine.

With `--demo-run RUN` (a finished `tunelab demo` run), also the wall time of that run's evaluation
with the demo's contenders (zero-shot, few-shot, tuned, and the forgetting check; `--retrieval`
adds the retrieval contender) on `--limit` held-out examples. Results go to OUT/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def one_by_one(model, template, prompts, max_new_tokens: int) -> list[str]:
    import torch

    answers = []
    for conversation in prompts:
        ids = torch.tensor([template.encode_prompt(conversation)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=template.stop_token_ids,
                             pad_token_id=template.tokenizer.pad_token_id)
        answers.append(template.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def generate_module_at(revision: str):
    """tunelab's generate.py as it was at a git revision, to time an earlier loop beside today's."""
    import importlib.util
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{revision}:src/tunelab/generate.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "generate_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("generate_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def hf_batched(model, template, prompts, max_new_tokens: int, batch_size: int) -> list[str]:
    import torch

    tokenizer = template.tokenizer
    encoded = [template.encode_prompt(c) for c in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    answers = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in batch])
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=template.stop_token_ids, pad_token_id=pad)
        for i, row in zip(batch, out):
            answers[i] = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
    return answers


def tunelab_batched(model, template, prompts, max_new_tokens: int, batch_size: int, precision: str) -> list[str]:
    from tunelab.decoding.generate import generate_detailed

    return [a.text for a in generate_detailed(model, template, prompts, max_new_tokens, batch_size,
                                              precision=precision)]


def timed(function, *args) -> tuple[float, float, list[str]]:
    """Wall seconds, CPU seconds of this process, and the answers."""
    started, cpu = time.perf_counter(), time.process_time()
    answers = function(*args)
    return time.perf_counter() - started, time.process_time() - cpu, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="smollm2-135m", help="base model (default: smollm2-135m)")
    parser.add_argument("--prompts", type=int, default=48, help="questions per form; 0 times only --demo-run "
                                                                "(default: 48)")
    parser.add_argument("--shots", type=int, default=3, help="examples in the few-shot prompt (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="token limit per answer (default: 48)")
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default: 32, as tunelab eval)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="arithmetic of the 'tunelab' way (default: auto, as tunelab eval)")
    parser.add_argument("--ways", default="one-by-one,hf-batched,tunelab-fp32,tunelab",
                        help="comma-separated ways to time")
    parser.add_argument("--compare-to", default=None, metavar="REV",
                        help="also time generate.py as it was at this git revision (way 'tunelab@REV')")
    parser.add_argument("--demo-run", default=None, help="a finished demo run: also time its full evaluation")
    parser.add_argument("--limit", type=int, default=20, help="held-out examples for --demo-run (default: 20)")
    parser.add_argument("--retrieval", action="store_true", help="--demo-run: add the retrieval contender")
    parser.add_argument("--rounds", type=int, default=1, help="interleave the ways over this many rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every way (default: torch's own, one per core)")
    parser.add_argument("--out", default="runs/eval-speed", help="folder for eval_speed.json")
    args = parser.parse_args()

    import torch

    from tunelab.data.load import Example
    from tunelab.demo import bookings
    from tunelab.device import computes_bf16
    from tunelab.evaluate.baselines import few_shot_prompts
    from tunelab.models import load_model, load_tokenizer, resolve_base
    from tunelab.template import Template

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_base(args.base)
    model = load_model(path).eval()
    template = Template.for_model(load_tokenizer(path))
    rows = bookings.make_examples(args.prompts + 50, seed=1)
    examples = [Example([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}],
                        i + 1) for i, r in enumerate(rows)]
    questions = [e.messages[:1] for e in examples[: args.prompts]]
    forms = {"zero-shot": questions, "few-shot": few_shot_prompts(questions, examples[args.prompts:], args.shots)}
    if not args.prompts:  # --prompts 0 --demo-run RUN: only the demo's evaluation
        forms = {}
    ways = {"one-by-one": lambda p: one_by_one(model, template, p, args.max_new_tokens),
            "hf-batched": lambda p: hf_batched(model, template, p, args.max_new_tokens, args.batch_size),
            "tunelab-fp32": lambda p: tunelab_batched(model, template, p, args.max_new_tokens, args.batch_size, "fp32"),
            "tunelab": lambda p: tunelab_batched(model, template, p, args.max_new_tokens, args.batch_size,
                                                 args.precision)}
    chosen = args.ways.split(",")
    if args.compare_to:
        earlier = generate_module_at(args.compare_to)
        ways[f"tunelab@{args.compare_to}"] = lambda p: [
            a.text for a in earlier.generate_detailed(model, template, p, args.max_new_tokens, args.batch_size)]
        chosen.append(f"tunelab@{args.compare_to}")
    for precision in ("fp32", args.precision):  # warm-up: first-call allocations, lazy imports
        tunelab_batched(model, template, questions[:2], 4, 2, precision)

    results: dict = {"base": args.base, "prompts": args.prompts, "shots": args.shots,
                     "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "rounds": args.rounds,
                     "precision": args.precision,
                     "computes": "bf16" if computes_bf16(args.precision, model.device) else "fp32",
                     "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "forms": {}}
    for form, prompts in forms.items():
        seconds = {way: 0.0 for way in chosen}
        cpu = {way: 0.0 for way in chosen}
        answers: dict[str, list[str]] = {way: [] for way in chosen}
        size = -(-len(prompts) // args.rounds)
        for start in range(0, len(prompts), size):
            for way in chosen:
                spent, used, got = timed(ways[way], prompts[start : start + size])
                seconds[way] += spent
                cpu[way] += used
                answers[way] += got
        rows_out = {}
        reference = answers[chosen[0]]
        for way in chosen:
            rows_out[way] = {"seconds": seconds[way], "cpu_seconds": cpu[way],
                             "answers_per_second": len(prompts) / seconds[way],
                             "same_as_first": sum(a == b for a, b in zip(answers[way], reference))}
            print(f"{form:10} {way:11} {seconds[way]:8.1f} s  {len(prompts) / seconds[way]:7.2f} answers/s  "
                  f"CPU {cpu[way]:8.1f} s  "
                  f"same answers as {chosen[0]}: {rows_out[way]['same_as_first']}/{len(prompts)}", flush=True)
        if "one-by-one" in rows_out:
            for row in rows_out.values():
                row["speedup"] = rows_out["one-by-one"]["seconds"] / row["seconds"]
                row["cpu_speedup"] = rows_out["one-by-one"]["cpu_seconds"] / row["cpu_seconds"]
            print(f"{form:10} speed-up over one-by-one, wall time: "
                  + ", ".join(f"{w} {r['speedup']:.1f}x" for w, r in rows_out.items())
                  + "; CPU time: " + ", ".join(f"{w} {r['cpu_speedup']:.1f}x" for w, r in rows_out.items()),
                  flush=True)
        results["forms"][form] = rows_out

    if args.demo_run:
        from tunelab.run import Run

        del model
        run = Run(args.demo_run, args.precision)
        started = time.perf_counter()
        evaluated = run.evaluate(limit=args.limit, shots=args.shots, retrieval=args.retrieval,
                                 progress=False).model_dump()
        seconds = time.perf_counter() - started
        names = [c["name"] for c in evaluated["contenders"]]
        exact = {n: evaluated["metrics"][n]["exact_match"]["value"] for n in names}
        results["demo_evaluation"] = {"run": args.demo_run, "examples": args.limit, "seconds": seconds,
                                      "contenders": names, "cost": evaluated["cost"], "exact_match": exact,
                                      "precision": run.precision, "load_average": os.getloadavg()}
        print(f"demo evaluation in {run.precision} ({', '.join(names)}, the forgetting check), "
              f"{evaluated['examples_evaluated']} examples: {seconds:.1f} s; "
              + ", ".join(f"{n} {evaluated['cost'][n]['seconds']:.1f} s" for n in names)
              + "; exact match " + ", ".join(f"{n} {100 * exact[n]:.1f}%" for n in names))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_speed.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
