"""Models behind an OpenAI-compatible endpoint in `tunelab eval`: a contender to compare with
(`--contender NAME=URL#MODEL`) or the judge (`--judge URL#MODEL`, grading in judge.py).

Both ask through the shared client (tunelab/client.py): the private-address check and
`--allow-remote`, the API key from the environment or a file, retries with backoff. Requests are
greedy (temperature 0). A request that fails after its retries stops the evaluation with one
line: a comparison with answers missing would not be one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tunelab.client import ChatClient, Failure
from tunelab.errors import UserError


class Endpoint:
    """One model behind an OpenAI-compatible chat completions endpoint."""

    def __init__(self, name: str, url: str, model: str, flag: str, api_key: str | None = None,
                 timeout: float = 120.0):
        self.name = name
        """Its column in the results."""
        self.url = url
        """The URL as given: the API base or the full chat completions address."""
        self.model = model
        """The `model` sent with each request ("default" when none was given)."""
        self.client = ChatClient(url, model, flag, api_key=api_key, timeout=timeout)

    @classmethod
    def contender(cls, spec: str, model: str | None = None, api_key: str | None = None) -> Endpoint:
        """NAME=URL[#MODEL], as `--contender` takes it; `model` when the URL names none."""
        name, sep, rest = spec.partition("=")
        if not sep or not name or not rest.startswith(("http://", "https://")):
            raise UserError(f"--contender {spec}: expected NAME=URL, e.g. gpt=http://localhost:8000/v1#gpt-4o-mini")
        url, _, in_url = rest.partition("#")
        return cls(name, url, in_url or model or "default", f"--contender {spec}", api_key)

    @classmethod
    def judge(cls, spec: str, model: str | None = None, api_key: str | None = None) -> Endpoint:
        """URL[#MODEL], as `--judge` takes it."""
        if not spec.startswith(("http://", "https://")):
            raise UserError(f"--judge {spec}: expected URL[#MODEL], e.g. http://localhost:8000/v1#judge-model")
        url, _, in_url = spec.partition("#")
        return cls("judge", url, in_url or model or "default", f"--judge {spec}", api_key)

    def check(self, allow_remote: bool) -> None:
        """Refuse a host outside the private network unless allowed, or one where nothing listens."""
        self.client.check(allow_remote)

    def complete(self, messages: list[dict[str, str]], max_tokens: int) -> dict:
        """The response of one greedy chat completion."""
        try:
            return self.client.complete(messages, max_tokens=max_tokens, temperature=0)
        except Failure as e:
            retried = e.reason in ("timeout", "connection", "http_429") or e.reason.startswith("http_5")
            tries = f" after {self.client.retries + 1} tries" if retried else ""
            raise UserError(f"{self.client.flag}: {e.reason} ({e.detail}){tries} at {self.client.url}") from None

    def answer(self, messages: list[dict[str, str]], max_tokens: int):
        """One answer as generate.Answer, token counts from the reply's `usage` when it has them."""
        from tunelab.decoding.generate import Answer

        reply = self.complete(messages, max_tokens)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{self.client.flag}: the reply has no choices[0].message.content; "
                            "is it an OpenAI-compatible chat completions endpoint?") from None
        usage = reply.get("usage") or {}
        return Answer(text.strip(), int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)),
                      "length" if choice.get("finish_reason") == "length" else "stop")

    def answers(self, conversations: list[list[dict[str, str]]], max_tokens: int, workers: int = 4,
                progress=None) -> list:
        """Answers in input order, a few requests in flight at once."""
        with ThreadPoolExecutor(workers) as pool:
            results = []
            try:
                for answer in pool.map(lambda c: self.answer(c, max_tokens), conversations):
                    results.append(answer)
                    if progress is not None:
                        progress.update()
            except BaseException:
                self.client.stopping.set()  # the other requests end without further retries
                raise
            return results

    def close(self) -> None:
        self.client.close()
