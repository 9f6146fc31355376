"""The judge of `tunelab eval --judge URL#MODEL`: a model behind an OpenAI-compatible endpoint
(endpoint.py, on the shared client) grades every answer against its reference with a fixed
rubric, one word: CORRECT, PARTIAL or INCORRECT.
"""

from __future__ import annotations

from tunelab.evaluate.endpoint import Endpoint

RUBRIC = """You grade an answer against a reference answer.
Question:
{question}

Reference answer:
{reference}

Answer to grade:
{answer}

Reply CORRECT if the answer says the same as the reference (wording may differ), PARTIAL if it
is partly right, INCORRECT otherwise. Reply with the single word only."""
"""The judge's prompt; its one-word grade scores 1, 0.5 or 0."""

GRADES = {"CORRECT": 1.0, "PARTIAL": 0.5, "INCORRECT": 0.0}


def parse_grade(text: str) -> float | None:
    """The first grade word in the judge's reply, or None when it gave none."""
    # The earliest word wins, so "INCORRECT" is not read as the "CORRECT" inside it.
    found = [(text.upper().find(word), score) for word, score in GRADES.items()]
    found = [(at, score) for at, score in found if at >= 0]
    return min(found)[1] if found else None


def judge(endpoint: Endpoint, questions: list[str], references: list[str], answers: list[str]) -> list[float | None]:
    """A grade per answer: 1 correct, 0.5 partial, 0 incorrect, None when the reply had no grade."""
    conversations = [[{"role": "user", "content": RUBRIC.format(question=q, reference=r, answer=a)}]
                     for q, r, a in zip(questions, references, answers)]
    return [parse_grade(a.text) for a in endpoint.answers(conversations, max_tokens=8)]
