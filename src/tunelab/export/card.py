"""The model card, README.md in every export: how the model was trained (base, method, schedule,
data, losses), how it did in `tunelab eval`, its prompt template, and how to run it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.export.gguf import GGUF_FILE
from tunelab.export.ollama import ollama_name


def model_card(run, format: str, dtype: str, out: Path) -> str:
    config, info = run.config, run.info
    method = (f"LoRA (rank {config.lora_rank}, alpha {config.lora_alpha}, {config.lora_targets}), merged into the base"
              if info["method"] == "lora" else "full fine-tuning")
    lines = [
        f"# {run.path.resolve().name}",
        "",
        f"Fine-tuned with tunelab from `{info['base']}` and exported as {format} ({dtype}).",
        "",
        "## Training",
        "",
        f"- base model: `{info['base']}`",
        f"- method: {method}",
        f"- schedule: {_schedule(config)}",
        f"- data: {_data_summary(run)}",
        *[f"- {line}" for line in _loss_summary(run)],
        "",
        "## Evaluation",
        "",
        *_evaluation(run),
        "",
        "## Prompt template",
        "",
        f"`{run.template.name}`; an answer ends with "
        + ", ".join(f"`{t}`" for t in dict.fromkeys(run.tokenizer.convert_ids_to_tokens(run.template.stop_token_ids)))
        + ". Its Jinja source (also the tokenizer's chat template):",
        "",
        "```jinja",
        run.template.source,
        "```",
        "",
        "## How to run it",
        "",
        *_how_to_run(format, out),
    ]
    return "\n".join(lines) + "\n"


def _schedule(config) -> str:
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.epochs:g} epochs"
    return (f"{length} of {config.batch_size * config.grad_accum} examples, peak learning rate "
            f"{config.learning_rate:g}, up to {config.max_length} tokens")


def _data_summary(run) -> str:
    summary = f"{run.info['train_examples']} training and {run.info['test_examples']} held-out examples"
    report = run.path / "data_check.json"
    if not report.exists():
        return summary
    check = json.loads(report.read_text())
    duplicates = check["duplicates"]["exact"]["count"]
    return (f"{summary}, from `{Path(check['file']).name}` ({check['rows']} rows, {check['valid']} valid, "
            f"{duplicates} exact duplicates dropped; {check['lengths']['median']:g} {check['lengths']['unit']} "
            f"per example at the median)")


def _loss_summary(run) -> list[str]:
    metrics = run.files.metrics
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    train = [r["loss"] for r in rows if "loss" in r]
    held_out = [r["eval_loss"] for r in rows if "eval_loss" in r]
    lines = []
    if train:
        lines.append(f"final training loss: {train[-1]:.4f}")
    if held_out:
        lines.append(f"held-out loss: {held_out[0]:.4f} before training, {held_out[-1]:.4f} after")
    return lines


def _evaluation(run) -> list[str]:
    if not run.files.eval.exists():
        return [f"Not evaluated; `tunelab eval {run.path}` compares the base and tuned models on the held-out split."]
    from tunelab.evaluate.core import format_table
    from tunelab.evaluate.results import EvalResults

    results = EvalResults.read(run.files.eval)
    return [f"`tunelab eval` on {results.examples_evaluated} held-out examples, greedy decoding:",
            "", "```", format_table(results), "```"]


def _how_to_run(format: str, out: Path) -> list[str]:
    if format == "merged":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{out}")',
            f'model = AutoModelForCausalLM.from_pretrained("{out}")',
            'ids = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True,',
            '                                    return_tensors="pt", return_dict=True)',
            "answer = model.generate(**ids, max_new_tokens=256)",
            'print(tokenizer.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
            "",
            f"or serve it: `vllm serve {out}`.",
        ]
    gguf = out / GGUF_FILE
    lines = [
        "With llama.cpp (the chat template is in the GGUF):",
        "",
        f"    llama-cli -m {gguf} --jinja -cnv",
        f"    llama-server -m {gguf} --jinja",
    ]
    if format == "ollama":
        lines += ["", "With Ollama:", "", f"    ollama create {ollama_name(out)} -f {out / 'Modelfile'}",
                  f"    ollama run {ollama_name(out)}"]
    return lines
