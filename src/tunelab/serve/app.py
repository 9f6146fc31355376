"""`tunelab serve`: runs behind an OpenAI-compatible HTTP API and a chat page.

    POST /v1/chat/completions   chat, plain or streamed (server-sent events)
    POST /v1/completions        one prompt, answered as the run's user turn
    GET  /v1/models             the served runs, named by their folders
    GET  /health                liveness and queue (no key needed)
    GET  /                      a chat page (static/index.html)

Every request is rendered and tokenized by its run's saved Template, as in training. Runs on
the same base share one copy of it, each LoRA adapter picked by the request's `model`.

Requests wait in one bounded queue (`--max-queue` places, 429 when full). A scheduler thread
takes what waits, up to a batch, for one model, and answers it with one `generate_rows` off the
event loop (each row with its own token limit, sampling and stop strings), so /health answers
while the model works. The loop is the one `tunelab generate` and evaluation use, so a greedy
request gets their answer. A client that leaves sets its request's cancel event: its row stops
at the next token and its place is freed. Generation is greedy unless the request gives a
temperature.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import json
import re
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import UserError

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (413 beyond)."""
MAX_TOKENS = 2048
"""Largest max_tokens a request may ask for."""
DEFAULT_MAX_TOKENS = 256
"""max_tokens of a request that gives none (less where the context has less room)."""
MAX_STOP_STRINGS = 4


@dataclass
class ServeOptions:
    """The options of `tunelab serve`."""

    runs: list[Path]
    """Run folders to serve; each is the model named by its folder's name."""
    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs `api_key`."""
    port: int = 8000
    """Port to bind; 0 picks a free one (printed at start)."""
    api_key: str | None = None
    """Key every request but /health and the page must send as `Authorization: Bearer KEY`."""
    max_queue: int = 32
    """Requests waiting or being answered at once; more get 429 at once."""
    batch_size: int = 8
    """Most requests answered by one batched generation."""
    rules: Path | None = None
    """YAML moderation rules (see `Rules`)."""
    copy_constraint: bool = True
    """Keep the fields a run's training data copies from the input substrings of the request's
    last user message (copying.py); False is `--no-copy-constraint`."""
    precision: str | None = None
    """Arithmetic of generation, "auto", "bf16" or "fp32"; None: each run's training precision."""


# ----------------------------------------------------------------------------- moderation

class RuleSet(BaseModel):
    """What one side of a conversation may not contain."""

    model_config = ConfigDict(extra="forbid")
    words: list[str] = []
    """Blocked words, matched whole and ignoring case."""
    patterns: list[str] = []
    """Blocked regular expressions (Python syntax; add (?i) to ignore case)."""

    def compiled(self, source: Path) -> list[re.Pattern]:
        found = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.words]
        for pattern in self.patterns:
            try:
                found.append(re.compile(pattern))
            except re.error as e:
                raise UserError(f"{source}: pattern {pattern!r} is not a valid regular expression ({e})") from None
        return found


class Rules(BaseModel):
    """A `--rules` file: `input:` checks every message of a request, `output:` the answer.

        input:  {words: [password], patterns: ['\\b\\d{16}\\b']}
        output: {words: [confidential]}
    """

    model_config = ConfigDict(extra="forbid")
    input: RuleSet = RuleSet()
    """Rules for what clients send."""
    output: RuleSet = RuleSet()
    """Rules for what the model answers."""


@dataclass
class Moderation:
    input: list[re.Pattern] = field(default_factory=list)
    output: list[re.Pattern] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None) -> Moderation:
        if path is None:
            return cls()
        import yaml

        if not path.is_file():
            raise UserError(f"--rules {path}: no such file")
        try:
            rules = Rules.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: {where}: {first['msg']}; a rules file has `input:` and `output:`, "
                            "each with `words:` and `patterns:` lists") from None
        return cls(rules.input.compiled(path), rules.output.compiled(path))

    @staticmethod
    def blocks(patterns: list[re.Pattern], text: str) -> bool:
        return any(p.search(text) for p in patterns)


# ----------------------------------------------------------------------------- models

@dataclass
class Served:
    """One model name the server answers to."""

    name: str
    template: Any
    """The run's Template."""
    model: Any
    """The model that answers it, shared with the other adapters on the same base."""
    adapter: str | None
    """The LoRA adapter to switch on for it, None for a fully fine-tuned run."""
    context: int
    """Tokens the model can attend to: prompt plus answer."""
    copying: Any = None
    """The run's copy constraint (a copying.CopyRule), None when it has none or it is off."""
    precision: str = "fp32"
    """The arithmetic of its generation (`Run.precision`)."""


def load_served(paths: list[Path], copy_constraint: bool = True, precision: str | None = None) -> dict[str, Served]:
    """Load each run once; LoRA runs on the same base share one base model in memory."""
    from peft import PeftModel

    from tunelab.models import for_inference, load_model
    from tunelab.run import Run

    runs = [Run(p, precision) for p in paths]  # checks every folder before loading any weights
    served: dict[str, Served] = {}
    shared: dict[Path, Any] = {}
    for run in runs:
        name = run.path.resolve().name
        if name in served:
            raise UserError(f"{run.path}: two runs are named '{name}'; models are named by their folders, "
                            "so serve runs from folders of different names")
        if run.files.adapter.exists():
            base = run.base_path().resolve()
            if base not in shared:
                shared[base] = PeftModel.from_pretrained(load_model(base), str(run.files.adapter), adapter_name=name)
            else:
                shared[base].load_adapter(str(run.files.adapter), adapter_name=name)
            model, adapter = shared[base], name
        else:
            model, adapter = load_model(run.files.model), None
        for_inference(model)
        context = getattr(model.config, "max_position_embeddings", None) or run.config.max_length
        served[name] = Served(name, run.template, model, adapter, context, run.copy_rule(copy_constraint),
                              run.precision)
    return served


# ----------------------------------------------------------------------------- scheduling

@dataclass
class Job:
    """One request, from the queue through generation to its answer."""

    served: Served
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
    constraint: Any = None
    """Its copy constraint (a copying.CopyConstraint), or None."""

    @property
    def key(self) -> str:
        """Requests for the same model (the same adapter switched on) share one batched generation."""
        return self.served.name

    def request(self):
        """What the generation loop needs of it."""
        from tunelab.decoding.generate import Request

        return Request(self.prompt, self.max_tokens, self.temperature, self.top_p, self.seed, self.stop,
                       self.cancel, lambda piece: self.send("text", piece), self.constraint)

    def send(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    """The bounded queue and the thread that answers it a batch at a time."""

    def __init__(self, max_queue: int, batch_size: int):
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.waiting: list[Job] = []
        self.running = 0
        self.cancelled = 0
        self.answered = 0
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
                    "answered": self.answered, "batches": self.batches, "cancelled": self.cancelled}

    def close(self) -> None:
        with self.lock:
            self.closing = True
            self.lock.notify()
        self.thread.join()

    def work(self) -> None:
        from tunelab.decoding.generate import generate_rows

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
            served = batch[0].served
            try:
                if served.adapter is not None:
                    served.model.set_adapter(served.adapter)
                answers = generate_rows(served.model, served.template, [job.request() for job in batch],
                                        served.precision)
                for job, answer in zip(batch, answers):
                    job.send("done", answer)
            except Exception:  # a bug: the requests get a 500, the server goes on
                traceback.print_exc()
                for job in batch:
                    job.send("error", "generation failed; see the server's log")
            with self.lock:
                self.running = 0
                self.answered += len(batch)
                self.batches += 1


# ----------------------------------------------------------------------------- requests

class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise Refused(f"message content of type {part.get('type')!r} is not supported; send text")
            parts.append(part["text"])
        return "".join(parts)


class Sampling(BaseModel):
    """What chat and completion requests share. Fields OpenAI defines and tunelab does not
    honour are refused with 400 (`refuse_unsupported`), never ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise Refused(f"stop: at most {MAX_STOP_STRINGS} stop strings")
        return tuple(s for s in stop if s)

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise Refused(f"n={self.n}: this server returns one choice per request; send n=1 (or leave it out)",
                          param="n")
        response_format = (self.model_extra or {}).get("response_format")
        kind = response_format.get("type", "text") if isinstance(response_format, dict) else response_format
        if response_format is not None and kind != "text":
            raise Refused(f"response_format {kind!r} is not supported: this server does not constrain "
                          "generation to JSON; leave response_format out and validate the answer",
                          param="response_format")
        for name in ("tools", "functions", "logprobs", "logit_bias", "echo", "suffix", "best_of"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, False, [], {}, 1):
                raise Refused(f"{name} is not supported by this server; leave it out", param=name)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise Refused("prompt: send one prompt per request", param="prompt")
        return self.prompt[0]


class Refused(Exception):
    """A request the server answers with an OpenAI-shaped error instead of generating."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.code, self.param, self.kind = message, status, code, param, kind

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# ----------------------------------------------------------------------------- the app

class Server:
    """The HTTP side: checks a request, queues it and turns its answer into OpenAI's shape."""

    def __init__(self, served: dict[str, Served], options: ServeOptions, moderation: Moderation):
        self.served = served
        self.options = options
        self.moderation = moderation
        self.scheduler = Scheduler(options.max_queue, options.batch_size)
        self.created = int(time.time())

    def app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            self.scheduler.thread.start()
            yield
            self.scheduler.close()  # after uvicorn has let the requests in flight finish

        routes = [
            Route("/", self.page), Route("/health", self.health), Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
        ]
        return Starlette(routes=routes, lifespan=lifespan)

    async def page(self, request):
        from starlette.responses import HTMLResponse

        return HTMLResponse((importlib.resources.files("tunelab.serve") / "index.html").read_text("utf-8"))

    async def health(self, request):
        from starlette.responses import JSONResponse

        loaded = len({id(s.model) for s in self.served.values()})
        return JSONResponse({"status": "ok", "models": list(self.served), "loaded_models": loaded,
                             **self.scheduler.stats()})

    async def models(self, request):
        from starlette.responses import JSONResponse

        try:
            self.authorize(request)
        except Refused as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "tunelab"} for name in self.served]})

    async def chat(self, request):
        return await self.answer(request, ChatRequest)

    async def completions(self, request):
        return await self.answer(request, CompletionRequest)

    def authorize(self, request) -> None:
        if self.options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.options.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Refused("invalid or missing API key; send it as `Authorization: Bearer KEY`", status=401,
                          code="invalid_api_key")

    async def read(self, request, kind: type[Sampling]) -> Sampling:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise Refused(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise Refused(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="body_too_large")
        try:
            return kind.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise Refused(f"{where}: {first['msg']}", param=where) from None

    def prepare(self, body: Sampling) -> tuple[Served, list[dict[str, str]]]:
        body.refuse_unsupported()
        served = self.served.get(body.model)
        if served is None:
            raise Refused(f"model '{body.model}' is not served here; served: {', '.join(self.served)}",
                          status=404, code="model_not_found", param="model")
        if isinstance(body, ChatRequest):
            conversation = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                            for m in body.messages]
        else:
            conversation = [{"role": "user", "content": body.text()}]
        if any(self.moderation.blocks(self.moderation.input, m["content"]) for m in conversation):
            raise Refused("the request was refused by this server's content rules", code="content_filter")
        return served, conversation

    async def answer(self, request, kind: type[Sampling]):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            self.authorize(request)
            body = await self.read(request, kind)
            served, conversation = self.prepare(body)
            try:
                prompt = served.template.encode_prompt(conversation)
            except UserError as e:
                raise Refused(str(e)) from None
            max_tokens = body.max_completion_tokens or body.max_tokens
            room = served.context - len(prompt)
            if max_tokens is not None and max_tokens > MAX_TOKENS:
                raise Refused(f"max_tokens {max_tokens} is over this server's limit of {MAX_TOKENS}",
                              param="max_tokens")
            if max_tokens is None:
                max_tokens = min(DEFAULT_MAX_TOKENS, room)
            if max_tokens < 1 or len(prompt) + max_tokens > served.context:
                raise Refused(f"this model's context is {served.context} tokens, but the prompt has {len(prompt)} "
                              f"tokens and max_tokens asks for {max_tokens} more; shorten the prompt or lower "
                              "max_tokens", param="max_tokens", code="context_length_exceeded")
            job = Job(served, prompt, max_tokens, body.temperature, body.top_p, body.seed, body.stop_strings(),
                      asyncio.get_running_loop(),
                      constraint=served.copying.constraint(conversation) if served.copying else None)
            if not self.scheduler.admit(job):
                raise Refused(f"the server is busy ({self.options.max_queue} requests queued); retry shortly",
                              status=429, code="rate_limit_exceeded", kind="requests")
        except Refused as e:
            return e.response()

        chat = isinstance(body, ChatRequest)
        reply = Reply(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", served.name, len(prompt))
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(job, reply, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            answer = None
            async for kind_, value in self.events(request, job):
                if kind_ == "error":
                    raise Refused(value, status=500, kind="server_error")
                if kind_ == "done":
                    answer = value
            if answer is None:  # the client left; nobody reads this
                return JSONResponse({}, status_code=499)
            if self.moderation.blocks(self.moderation.output, answer.text):
                raise Refused("the answer was withheld by this server's content rules", code="content_filter")
        except Refused as e:
            return e.response()
        return JSONResponse(reply.whole(answer))

    async def events(self, request, job: Job):
        """The job's events as they come. Stops, cancelling the job, when the client goes away
        (`request` given: polled here; a stream's response notices on its own) or when the
        caller stops reading."""
        finished = False
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                yield kind, value
                if kind in ("done", "error"):
                    finished = True
                    return
        finally:
            if not finished:
                self.scheduler.cancel(job)

    async def stream(self, job: Job, reply: Reply, usage: bool):
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Starlette
        cancels this generator when the client disconnects; the `finally` frees the place."""
        def event(data: dict | str) -> str:
            return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

        finished = False
        shown = ""
        try:
            yield event(reply.chunk("", None, first=True))
            while not finished:
                kind, value = await job.events.get()
                if kind == "text":
                    if self.moderation.blocks(self.moderation.output, shown + value):
                        error = Refused("the answer was withheld by this server's content rules",
                                        code="content_filter")
                        yield event({"error": {"message": error.message, "type": error.kind, "param": None,
                                               "code": error.code}})
                        break
                    shown += value
                    yield event(reply.chunk(value, None))
                elif kind == "error":
                    finished = True
                    yield event({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                else:
                    finished = True
                    yield event(reply.chunk("", value.finish_reason))
                    if usage:
                        yield event({**reply.chunk("", None), "choices": [], "usage": reply.usage(value)})
            yield event("[DONE]")
        finally:
            if not finished:
                self.scheduler.cancel(job)


@dataclass
class Reply:
    """OpenAI's response objects for one request."""

    chat: bool
    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, answer) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": answer.generated_tokens,
                "total_tokens": self.prompt_tokens + answer.generated_tokens}

    def whole(self, answer) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": answer.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(answer)}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}


# ----------------------------------------------------------------------------- the command

def bind(host: str, port: int) -> socket.socket:
    """Bind before loading any model, so a port in use fails in a second."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        reason = "is in use" if e.errno in (98, 48, 10048) else f"cannot be bound ({e.strerror})"
        raise UserError(f"--host {host} --port {port}: the address {reason}; pick another with --port") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(options: ServeOptions) -> None:
    if not is_loopback(options.host) and not options.api_key:
        raise UserError(f"--host {options.host}: serving beyond this machine needs --api-key KEY "
                        "(clients send it as `Authorization: Bearer KEY`)")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("tunelab serve needs starlette and uvicorn: pip install 'tunelab[serve]'") from None
    moderation = Moderation.load(options.rules)
    for path in options.runs:
        from tunelab.runfolder import RunFiles

        RunFiles(path).check()
    sock = bind(options.host, options.port)

    server = Server(load_served(options.runs, options.copy_constraint, options.precision), options, moderation)
    port = sock.getsockname()[1]
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"Serving {', '.join(server.served)} on http://{host}:{port} (chat page at /, API at /v1); "
          "Ctrl-C stops", flush=True)
    config = uvicorn.Config(server.app(), log_level="warning", timeout_graceful_shutdown=None)
    uvicorn.Server(config).run(sockets=[sock])
