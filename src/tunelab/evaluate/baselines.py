"""The prompting alternatives a fine-tune is compared with: the base model given K examples.

- few-shot: the same K training examples (drawn with a fixed seed) before every question;
- retrieval: the K training examples most similar to each question (BM25 over the training
  prompts, plain Python), the "put my own data in the prompt" alternative.

Both put the examples in as earlier user/assistant turns of the conversation, so the run's
Template renders them exactly as it renders a chat, before the question itself.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter

from tunelab.data.load import Example


def user_text(messages: list[dict[str, str]]) -> str:
    """What a conversation asks: its user turns, joined."""
    return "\n".join(m["content"] for m in messages if m["role"] == "user")


def with_examples(question: list[dict[str, str]], shots: list[Example]) -> list[dict[str, str]]:
    """The question's conversation with each shot's turns (its system message left out) placed
    after the question's own system message and before its first other turn."""
    system = [m for m in question[:1] if m["role"] == "system"]
    turns: list[dict[str, str]] = []
    for shot in shots:
        turns += [m for m in shot.messages if m["role"] != "system"]
    return system + turns + question[len(system):]


def fixed_shots(train: list[Example], k: int, seed: int = 0) -> list[Example]:
    """K training examples drawn once with a fixed seed: the same prompt prefix for every question."""
    chat = [e for e in train if not e.is_raw]
    return random.Random(seed).sample(chat, min(k, len(chat)))


def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over the user text of training examples (k1=1.5, b=0.75)."""

    def __init__(self, examples: list[Example], k1: float = 1.5, b: float = 0.75):
        self.examples = [e for e in examples if not e.is_raw]
        self.k1, self.b = k1, b
        self.documents = [Counter(_terms(user_text(e.messages))) for e in self.examples]
        self.lengths = [sum(d.values()) for d in self.documents]
        self.average_length = sum(self.lengths) / max(len(self.lengths), 1)
        frequency: Counter = Counter()
        for document in self.documents:
            frequency.update(document.keys())
        n = len(self.documents)
        self.idf = {term: math.log(1 + (n - f + 0.5) / (f + 0.5)) for term, f in frequency.items()}

    def scores(self, query: str) -> list[float]:
        terms = set(_terms(query))
        scores = []
        for document, length in zip(self.documents, self.lengths):
            score = 0.0
            for term in terms:
                tf = document.get(term, 0)
                if tf:
                    norm = tf + self.k1 * (1 - self.b + self.b * length / self.average_length)
                    score += self.idf[term] * tf * (self.k1 + 1) / norm
            scores.append(score)
        return scores

    def most_similar(self, question: list[dict[str, str]], k: int) -> list[Example]:
        """The K training examples closest to the question, the closest last (nearest the
        question in the prompt). A training example with the very same question is skipped:
        it would hand the model its answer."""
        query = user_text(question)
        scores = self.scores(query)
        ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        chosen = [i for i in ranked if user_text(self.examples[i].messages) != query][:k]
        return [self.examples[i] for i in reversed(chosen)]


def few_shot_prompts(questions: list[list[dict[str, str]]], train: list[Example], k: int,
                     seed: int = 0) -> list[list[dict[str, str]]]:
    """Every question with the same K examples before it (none of them the question itself)."""
    texts = {user_text(q) for q in questions}
    pool = [e for e in train if user_text(e.messages) not in texts]
    shots = fixed_shots(pool, k, seed)
    return [with_examples(q, shots) for q in questions]


def retrieval_prompts(questions: list[list[dict[str, str]]], train: list[Example],
                      k: int) -> list[list[dict[str, str]]]:
    """Every question with its K most similar training examples before it."""
    index = BM25(train)
    return [with_examples(q, index.most_similar(q, k)) for q in questions]
