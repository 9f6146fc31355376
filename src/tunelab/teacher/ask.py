"""Asking the teacher: how it is prompted (`Teacher`), the cache that makes sure nothing is asked
twice, and the pool of threads that asks many inputs at once.

Every answer is appended to a cache file as it arrives, keyed by a sha256 of the exact request
(URL and body; never the API key), so a run killed at any moment and started again takes what it
already has from the cache and asks only the rest. Retries, timeouts, the API key and the
private-address check are the shared client's (tunelab/client.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tunelab.client import ChatClient, Failure, check_count, check_timeout, content
from tunelab.files import read_appended

REFUSED_PREFIX = "response_format refused by "
"""The cache key, before the URL, of the note that an endpoint refuses structured output."""


@dataclass
class Teacher:
    """Where the teacher is and how it is prompted: the same for every input of a run."""

    url: str
    """The chat-completions endpoint, or its base URL (see `client.chat_url`)."""
    model: str
    """Model name sent in every request."""
    system: str | None = None
    """System prompt, unless an input brings its own."""
    shots: list[list[dict[str, str]]] = field(default_factory=list)
    """Few-shot conversations (user and assistant turns) placed before each input."""
    schema: dict | None = None
    """JSON schema every answer must match (requested as structured output, checked locally)."""
    concurrency: int = 4
    """Requests in flight at once."""
    timeout: float = 120.0
    """Seconds to wait for one answer before retrying."""
    retries: int = 5
    """Retries of one request on 429, 5xx, a timeout or a dropped connection."""
    reasks: int = 2
    """Times an answer that does not match the schema is asked for again."""

    def __post_init__(self) -> None:
        # Checked here rather than by whatever parsed the flags, so no caller can pass a value
        # that would hang (a NaN timeout), spin (no thread) or never ask (-1 retries).
        check_count(self.concurrency, "--concurrency", 1)
        check_timeout(self.timeout)
        check_count(self.retries, "--retries", 0)
        check_count(self.reasks, "reasks", 0)

    def prompt_hash(self) -> str:
        """Identifies the prompt (system, examples, schema) a row was labelled with."""
        prompt = {"system": self.system, "shots": self.shots, "schema": self.schema}
        return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]

    def messages_for(self, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
        """The request: system prompt, few-shot examples, then the input (its own system message wins)."""
        own_system = [m for m in conversation if m["role"] == "system"]
        system = own_system or ([{"role": "system", "content": self.system}] if self.system else [])
        shots = [m for shot in self.shots for m in shot]
        return [*system, *shots, *(m for m in conversation if m["role"] != "system")]


class Cache:
    """Every answer, one JSON line each, appended with one write as it arrives.

    A write cut short by a kill leaves a line without its newline: it is cut off on the next
    start, so the next append does not glue onto it. A damaged line (a cut write, bytes changed
    on disk, an edit by hand) is skipped with a warning naming it: its request is asked again.
    """

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "answers.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        for record in read_appended(self.path, _cache_record, "their requests are asked again"):
            self.records[record["key"]] = record
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def answers(self) -> int:
        """Answers held (the notes of an endpoint refusing structured output aside)."""
        return sum("answer" in record for record in self.records.values())

    def get(self, key: str) -> dict[str, Any] | None:
        return self.records.get(key)

    def put(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            written = 0
            while written < len(line):
                written += os.write(self._fd, line[written:])
            self.records[record["key"]] = record

    def close(self) -> None:
        os.close(self._fd)


def _cache_record(record: dict[str, Any]) -> bool:
    """Whether a cache record is whole: an answer with its time, or a remembered refusal."""
    if "answer" in record:
        return isinstance(record["answer"], str) and isinstance(record.get("time"), str)
    return record["key"].startswith(REFUSED_PREFIX)


def request_key(url: str, body: dict[str, Any]) -> str:
    request = json.dumps({"url": url, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(request.encode()).hexdigest()


def connect(teacher: Teacher, allow_remote: bool, api_key: str | None) -> ChatClient:
    """The client for `teacher`, once its URL is allowed and something listens there (nothing sent yet)."""
    chat = ChatClient(teacher.url, teacher.model, f"--teacher {teacher.url}", api_key=api_key,
                      timeout=teacher.timeout, retries=teacher.retries)
    try:
        chat.check(allow_remote)
    except BaseException:
        chat.close()
        raise
    return chat


class TeacherClient:
    """Asks the teacher through the cache. Safe to share between threads."""

    def __init__(self, teacher: Teacher, chat: ChatClient, cache: Cache):
        self.teacher = teacher
        self.chat = chat
        self.url = chat.url
        self.cache = cache
        self.cached = 0
        """Answers taken from the cache."""
        self._count_lock = threading.Lock()
        self._refused_key = REFUSED_PREFIX + self.url

    @property
    def asked(self) -> int:
        """Requests sent to the teacher, retries included."""
        return self.chat.asked

    def ask(self, messages: list[dict[str, str]], temperature: float, structured: bool = False) -> tuple[str, str]:
        """(answer, time it was received), from the cache when this exact request was answered before."""
        body: dict[str, Any] = {"model": self.teacher.model, "messages": messages, "temperature": temperature}
        if structured and self.teacher.schema is not None and self.cache.get(self._refused_key) is None:
            # Not "strict": OpenAI's strict mode refuses schemas without additionalProperties: false.
            with_format = {**body, "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "schema": self.teacher.schema}}}
            try:
                return self._ask(with_format)
            except Failure as e:
                if e.reason != "http_400":
                    raise
                # Ask without structured output; if that is taken, the endpoint refuses response_format
                # (not this input): remember it, so no later request is refused for it again.
                answer = self._ask(body)
                self.cache.put({"key": self._refused_key, "detail": e.detail})
                return answer
        return self._ask(body)

    def _ask(self, body: dict[str, Any]) -> tuple[str, str]:
        key = request_key(self.url, body)
        record = self.cache.get(key)
        if record is not None:
            with self._count_lock:
                self.cached += 1
            return record["answer"], record["time"]
        answer = content(self.chat.post(body))
        received = datetime.now(UTC).isoformat(timespec="seconds")
        self.cache.put({"key": key, "answer": answer, "time": received})
        return answer, received

    def close(self) -> None:
        self.chat.close()
        self.cache.close()


def run_pool(client: TeacherClient, items: list, work: Callable) -> list:
    """`work(item)` for every item on `concurrency` threads: its result or its Failure, in item order.

    A UserError (wrong URL, refused access) stops the run: it would be the same for every item.
    On Ctrl-C no new request starts and none is retried, but the requests in flight are waited
    for (each ends within --timeout), so the answers they bring are cached. A second Ctrl-C ends
    the wait; Python still lets those threads finish their one request before it exits.
    """
    results: list = [None] * len(items)

    def one(index: int) -> None:
        try:
            results[index] = work(items[index])
        except Failure as e:
            results[index] = e

    pool = ThreadPoolExecutor(max_workers=client.teacher.concurrency)
    futures = [pool.submit(one, i) for i in range(len(items))]
    try:
        for future in futures:
            future.result()
    except KeyboardInterrupt:
        client.chat.stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        wait([future for future in futures if not future.cancelled()])  # a cancelled one never counts as done
        raise
    except BaseException:
        client.chat.stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results
