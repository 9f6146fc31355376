"""Models behind an OpenAI-compatible endpoint: a contender to compare with, or a judge.

Plain urllib, chat completions, greedy (temperature 0), a bounded number of retries on
connection errors, 429 and 5xx. `URL` is the API base (`http://host:8000/v1`) or the full
`.../chat/completions` address; the API key, if any, comes from $OPENAI_API_KEY.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tunelab.errors import UserError

RETRIES = 3
"""Tries per request; waits of 0.5 s, 1 s, ... between them."""


@dataclass
class Endpoint:
    """One model behind an OpenAI-compatible chat completions endpoint."""

    name: str
    """Its column in the results."""
    url: str
    """The API base or the full chat completions address."""
    model: str
    """The `model` sent with each request ("default" when none was given)."""
    timeout: float = 120.0
    """Seconds to wait for one answer."""

    @classmethod
    def parse(cls, spec: str, model: str | None = None) -> Endpoint:
        """NAME=URL[#MODEL], as `--contender` takes it."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest.startswith(("http://", "https://")):
            raise UserError(f"--contender {spec}: expected NAME=URL, e.g. gpt=http://localhost:8000/v1#gpt-4o-mini")
        url, _, in_url = rest.partition("#")
        return cls(name, url, in_url or model or "default")

    @property
    def address(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def complete(self, messages: list[dict[str, str]], max_tokens: int) -> dict:
        """The raw response of one greedy chat completion."""
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        problem = ""
        for attempt in range(RETRIES):
            if attempt:
                time.sleep(0.5 * 2 ** (attempt - 1))
            request = urllib.request.Request(self.address, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                problem = f"HTTP {e.code} {e.reason}"
                if e.code != 429 and e.code < 500:  # the request itself is wrong: retrying will not help
                    break
            except (urllib.error.URLError, OSError) as e:
                problem = str(getattr(e, "reason", e))
            except ValueError:
                problem = "the reply is not JSON"
                break
        raise UserError(f"{self.name} ({self.address}): {problem} after {attempt + 1} "
                        f"tr{'y' if attempt == 0 else 'ies'}; check the URL and that the server is running")

    def answer(self, messages: list[dict[str, str]], max_tokens: int):
        """One answer as generate.Answer, token counts from the reply's `usage` when it has them."""
        from tunelab.decoding.generate import Answer

        reply = self.complete(messages, max_tokens)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.name} ({self.address}): the reply has no choices[0].message.content; "
                            "is it an OpenAI-compatible chat completions endpoint?") from None
        usage = reply.get("usage") or {}
        return Answer(text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                      "length" if choice.get("finish_reason") == "length" else "stop")

    def answers(self, conversations: list[list[dict[str, str]]], max_tokens: int, workers: int = 4,
                progress=None) -> list:
        """Answers in input order, a few requests in flight at once."""
        with ThreadPoolExecutor(workers) as pool:
            results = []
            for answer in pool.map(lambda c: self.answer(c, max_tokens), conversations):
                results.append(answer)
                if progress is not None:
                    progress.update()
            return results


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
