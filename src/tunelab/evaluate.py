"""Base model vs fine-tuned model on the held-out split: same prompts, greedy decoding.

Metrics: normalised exact match, word-level F1 (the softer one), and held-out loss and
perplexity of the reference answers. Results and side-by-side examples go to RUN/eval.json.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter

from tunelab.batching import encode_examples
from tunelab.data import read_jsonl
from tunelab.generate import generate_batch
from tunelab.loss import heldout_loss


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def word_f1(prediction: str, reference: str) -> float:
    """Overlap of word tokens (SQuAD-style F1): partial credit for partly right answers."""
    pred, ref = re.findall(r"\w+", prediction.lower()), re.findall(r"\w+", reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(model, template, examples, encoded, max_new_tokens: int, batch_size: int) -> tuple[dict, list[str]]:
    started = time.perf_counter()
    answers = generate_batch(model, template, [e.prompt_messages() for e in examples], max_new_tokens, batch_size)
    loss = heldout_loss(model, encoded)
    n = len(examples)
    return {
        "exact_match": sum(exact_match(a, e.reference) for a, e in zip(answers, examples)) / n,
        "word_f1": sum(word_f1(a, e.reference) for a, e in zip(answers, examples)) / n,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50)),
        "seconds": round(time.perf_counter() - started, 1),
    }, answers


def evaluate(run, limit: int | None = None, batch_size: int = 16, max_new_tokens: int | None = None,
             include_base: bool = True) -> dict:
    from tunelab.errors import UserError

    examples = read_jsonl(run.files.test)[:limit]
    if not examples:
        raise UserError(f"{run.path}: the run has no held-out examples; train with --test-size above 0")
    if any(e.is_raw for e in examples):
        raise UserError(f"{run.path}: a raw-text run has no answers to compare; its held-out loss is in "
                        f"{run.files.metrics}")
    encoded, _ = encode_examples(examples, run.template, max_length=run.config.max_length, truncation="truncate")
    tokenizer = run.tokenizer
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = min(512, int(longest * 1.5) + 16)

    results: dict = {"examples_evaluated": len(examples), "max_new_tokens": max_new_tokens}
    outputs: dict[str, list[str]] = {}
    if include_base:
        results["base"], outputs["base"] = score(run.base_model(), run.template, examples, encoded, max_new_tokens, batch_size)
    results["tuned"], outputs["tuned"] = score(run.model(), run.template, examples, encoded, max_new_tokens, batch_size)
    results["samples"] = [
        {"line": e.line, "prompt": e.prompt_messages()[-1]["content"], "reference": e.reference,
         **{name: answers[i] for name, answers in outputs.items()}}
        for i, e in enumerate(examples)
    ]
    run.files.eval.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    return results


def format_table(results: dict) -> str:
    columns = [c for c in ("base", "tuned") if c in results]
    rows = [("exact match", "exact_match", "{:.1%}"), ("word F1", "word_f1", "{:.1%}"),
            ("held-out loss", "loss", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}")]
    lines = [f"{'':16}" + "".join(f"{c:>12}" for c in columns)]
    for label, key, fmt in rows:
        lines.append(f"{label:16}" + "".join(f"{fmt.format(results[c][key]):>12}" for c in columns))
    return "\n".join(lines)


def format_samples(results: dict, count: int = 3) -> str:
    lines = []
    for sample in results["samples"][:count]:
        lines.append(f"- prompt:    {sample['prompt']!r}")
        lines.append(f"  reference: {sample['reference']!r}")
        for name in ("base", "tuned"):
            if name in sample:
                lines.append(f"  {name + ':':11}{sample[name]!r}")
    return "\n".join(lines)
