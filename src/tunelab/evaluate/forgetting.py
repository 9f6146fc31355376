"""Forgetting check: did fine-tuning cost the model its general knowledge?

Multiple-choice questions scored as ARC and MMLU are scored: no generation, each choice is put
as the assistant's answer to the question (through the run's template) and the choice with the
highest log-likelihood is the model's pick. Accuracy is reported both on the summed
log-likelihood and on the log-likelihood per token (which does not favour short choices).

Questions are JSONL, one per line: {"question": "...", "choices": ["...", ...], "answer": 1}
(`answer` is the index of the right choice, or its letter "A", "B", ...). tunelab ships 42
general-knowledge questions of its own in examples/general_knowledge.jsonl, used by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.device import one_example_batches, runs_packed
from tunelab.errors import UserError
from tunelab.template import Template
from tunelab.train.batching import pack
from tunelab.train.loss import token_loss

DEFAULT_QUESTIONS = Path(__file__).parent / "general_knowledge.jsonl"


@dataclass
class Question:
    """One multiple-choice question."""

    text: str
    """The question, sent as the user's message."""
    choices: list[str]
    """The possible answers."""
    answer: int
    """Index of the right one in `choices`."""


def load_questions(path: Path) -> list[Question]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--forgetting {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"--forgetting {path}: not UTF-8 text; give a JSONL file of questions") from None
    questions = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: not valid JSON") from None
        if (not isinstance(row, dict) or not isinstance(row.get("question"), str)
                or not isinstance(row.get("choices"), list) or len(row["choices"]) < 2
                or not all(isinstance(c, str) and c for c in row["choices"])):
            raise UserError(f'{where}: expected {{"question": "...", "choices": ["...", "..."], "answer": 0}}')
        answer = row.get("answer")
        if isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
            answer = ord(answer.upper()) - ord("A")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(row["choices"]):
            raise UserError(f"{where}: 'answer' must be the index (0, 1, ...) or letter (A, B, ...) of a choice")
        questions.append(Question(row["question"], row["choices"], answer))
    if not questions:
        raise UserError(f"{path}: no questions found")
    return questions


@torch.no_grad()
def choice_loglikelihoods(model, template: Template, questions: list[Question],
                          batch_size: int = 16) -> list[list[tuple[float, int]]]:
    """Per question, per choice: (summed log-likelihood of the choice's tokens, its token count),
    the end-of-turn token included, since a complete answer ends there."""
    encoded, owners = [], []
    for q, question in enumerate(questions):
        for choice in question.choices:
            encoded.append(template.encode([{"role": "user", "content": question.text},
                                            {"role": "assistant", "content": choice}]))
            owners.append(q)
    scores: list[list[tuple[float, int]]] = [[] for _ in questions]
    device = next(model.parameters()).device
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        packed = pack(chunk)
        # A model that cannot keep packed examples apart in attention takes them one at a time.
        rows = [packed] if runs_packed(model) else one_example_batches([packed])
        losses = []
        for row in rows:
            losses += token_loss(model, {k: v.to(device) for k, v in row.items()}, reduction="none").tolist()
        offset = 0
        for i, item in enumerate(chunk):
            n = item.trainable
            scores[owners[start + i]].append((-sum(losses[offset : offset + n]), n))
            offset += n
    return scores


def accuracy(model, template: Template, questions: list[Question]) -> dict:
    """{"accuracy": by summed log-likelihood, "accuracy_per_token": by mean log-likelihood per token}."""
    scores = choice_loglikelihoods(model, template, questions)
    by_sum = by_token = 0
    for question, choices in zip(questions, scores):
        by_sum += max(range(len(choices)), key=lambda c: choices[c][0]) == question.answer
        by_token += max(range(len(choices)), key=lambda c: choices[c][0] / max(choices[c][1], 1)) == question.answer
    return {"accuracy": by_sum / len(questions), "accuracy_per_token": by_token / len(questions)}
