"""The queue of `tunelab serve` and the thread that answers it a batch at a time.

Requests wait in one bounded queue (`--max-queue` places; `admit` says no at once when they are
all taken, which the server answers with 429). The scheduler thread takes what waits, up to a
batch, for one model, and answers it with one `generate_rows` off the event loop, each row with
its own token limit, sampling and stop strings. A client that leaves sets its job's cancel
event: its row stops at the next token and its place is freed.

A failure inside generation fails only its own row: when a batch raises, every job that has
not yet streamed any text is answered again alone, so the requests that shared a batch with a
bad one still get their answers (the request checks at the door make this the rare case).
"""

from __future__ import annotations

import asyncio
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One request, from the queue through generation to its answer."""

    served: Any
    """The model it asks (app.Served)."""
    conversation: list[dict[str, str]]
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("text", piece), then ("done", Answer) or ("error", message), filled by the scheduler."""
    cancel: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False
    """Whether any of its text has been sent: it can no longer be answered again from the start."""

    @property
    def key(self) -> str:
        """Requests for the same model (the same adapter switched on) share one batched generation."""
        return self.served.name

    def request(self):
        """What the generation loop needs of it, its copy constraint new (a constraint follows
        one answer)."""
        from tunelab.decoding.generate import Request

        copying = self.served.copying
        return Request(self.prompt, self.max_tokens, self.temperature, self.top_p, self.seed, self.stop,
                       self.cancel, self.text, copying.constraint(self.conversation) if copying else None)

    def text(self, piece: str) -> None:
        self.streamed = True
        self.send("text", piece)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


FAILED = "generation failed; see the server's log"


class Scheduler:
    """The bounded queue and the thread that answers it a batch at a time."""

    def __init__(self, max_queue: int, batch_size: int):
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.waiting: list[Job] = []
        self.running = 0
        self.cancelled = 0
        self.answered = 0
        self.failed = 0
        self.batches = 0
        self.closing = False
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self.work, name="tunelab-scheduler", daemon=True)

    def admit(self, job: Job) -> bool:
        """Queue the job, or say no at once when every place is taken."""
        with self.lock:
            if len(self.waiting) + self.running >= self.max_queue:
                return False
            self.waiting.append(job)
            self.lock.notify()
            return True

    def cancel(self, job: Job) -> None:
        """The client left: stop its row at the next token, or drop it if it still waits."""
        job.cancel.set()
        with self.lock:
            self.cancelled += 1
            if job in self.waiting:
                self.waiting.remove(job)

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"waiting": len(self.waiting), "running": self.running, "max_queue": self.max_queue,
                    "answered": self.answered, "failed": self.failed, "batches": self.batches,
                    "cancelled": self.cancelled}

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    def work(self) -> None:
        while True:
            with self.lock:
                while not self.waiting and not self.closing:
                    self.lock.wait()
                if not self.waiting:
                    return
                key = self.waiting[0].key
                batch = [job for job in self.waiting if job.key == key][: self.batch_size]
                for job in batch:
                    self.waiting.remove(job)
                self.running = len(batch)
            outcomes = self.answer(batch)
            failed = sum(kind == "error" for _, kind, _ in outcomes)
            with self.lock:
                self.running = 0
                self.answered += len(batch) - failed
                self.failed += failed
                self.batches += 1
            for job, kind, value in outcomes:  # once counted: /health never lags an answer its client has
                job.send(kind, value)

    def answer(self, batch: list[Job]) -> list[tuple[Job, str, Any]]:
        """Answer the batch: for each job ("done", its answer), or ("error", FAILED) for a job that
        fails (a 500), the others still answered."""
        try:
            return [(job, "done", answer) for job, answer in zip(batch, self.generate(batch))]
        except Exception:  # a bug: the server goes on
            traceback.print_exc()
        if len(batch) == 1:
            return [(batch[0], "error", FAILED)]
        outcomes: list[tuple[Job, str, Any]] = []
        for job in batch:
            if not job.streamed:  # text already sent cannot be taken back and sent again
                try:
                    [answer] = self.generate([job])
                    outcomes.append((job, "done", answer))
                    continue
                except Exception:
                    traceback.print_exc()
            outcomes.append((job, "error", FAILED))
        return outcomes

    @staticmethod
    def generate(jobs: list[Job]) -> list:
        """The jobs' answers, in order, from one batched generation (their text streamed as it comes)."""
        from tunelab.decoding.generate import generate_rows

        served = jobs[0].served
        if served.adapter is not None:
            served.model.set_adapter(served.adapter)
        return generate_rows(served.model, served.template, [job.request() for job in jobs], served.precision)
