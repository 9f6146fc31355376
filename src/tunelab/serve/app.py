"""`tunelab serve`: runs behind an OpenAI-compatible HTTP API and a chat page.

    POST /v1/chat/completions   chat, plain or streamed (server-sent events)
    POST /v1/completions        one prompt, answered as the run's user turn
    GET  /v1/models             the served runs, named by their folders
    GET  /health                liveness and queue (no key needed)
    GET  /                      a chat page (index.html)

Every request is checked at the door (protocol.py), then rendered and tokenized by its run's
saved Template off the event loop, in one rendering (linear in the conversation's length), and
queued for the scheduler thread (scheduler.py), which answers a batch of one model's requests
with the generation loop `tunelab generate` and evaluation use, so a greedy request gets their
answer and /health answers while the model works. Runs on the same base share one copy of it,
each LoRA adapter picked by the request's `model`. Generation is greedy unless the request gives
a temperature.

What a web page in the user's browser could otherwise do to a server on loopback is refused
before any route runs (`Guard`): a `Host` that is not the server's own name (DNS rebinding), an
`Origin` that is not its own page's (unless `--cors-origin` names it), and a POST body that is not
`application/json` (a form can post text/plain across origins without asking). A connection
that takes longer than `HEAD_TIMEOUT` to send a request's head is closed (slow-header clients).
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.serve.moderation import Moderation
from tunelab.serve.options import ServeOptions
from tunelab.serve.protocol import (
    DEFAULT_MAX_TOKENS,
    MAX_BODY_BYTES,
    ChatRequest,
    CompletionRequest,
    Refused,
    Reply,
    Sampling,
    parse,
)
from tunelab.serve.scheduler import Job, Scheduler

API_KEY_VARIABLE = "TUNELAB_API_KEY"
"""The environment variable that holds the API key when no flag gives one (a key on the command
line is visible to every user of the machine in `ps`)."""
HEAD_TIMEOUT = 5.0
"""Seconds a connection may take to send a request line and headers (uvicorn's keep-alive
timeout, 5 s, closes only a connection idle between requests)."""
BODY_TIMEOUT = 30.0
"""Seconds a client may take to send a request's body (408 beyond)."""


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


def load_served(paths: list[Path], copy_constraint: bool = True, precision: str | None = None,
                device: str = "auto", threads: int | None = None) -> dict[str, Served]:
    """Load each run once, on `device` (`device.inference_device`), computing with `threads`
    (`device.configure_threads`); LoRA runs on the same base share one base model in memory."""
    from peft import PeftModel

    from tunelab.models import for_inference, load_model
    from tunelab.run import Run

    runs = [Run(p, precision, device, threads) for p in paths]  # checks every folder before loading any weights
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
        for_inference(model).to(run.device)
        context = getattr(model.config, "max_position_embeddings", None) or run.config.max_length
        served[name] = Served(name, run.template, model, adapter, context, run.copy_rule(copy_constraint),
                              run.precision)
    return served


# ----------------------------------------------------------------------------- the door

class Guard:
    """ASGI middleware that refuses what a browser page of another site could send: a request
    whose `Host` is not one of `hosts` (None: any, for a server bound to every address, which
    needs a key), one whose `Origin` is neither the server's own nor in `origins`, and a POST
    whose body is not JSON."""

    def __init__(self, app, hosts: set[str] | None, origins: set[str]):
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        origin = headers.get("origin")
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        try:
            if self.hosts is not None and host not in self.hosts:
                raise Refused(f"Host {host!r} is not this server's; send one of {', '.join(sorted(self.hosts))}",
                              code="invalid_host")
            if origin is not None and origin != f"http://{host}" and origin not in self.origins:
                raise Refused(f"requests from pages of {origin} are refused; start the server with "
                              f"--cors-origin {origin} to allow them", status=403, code="cross_origin")
            if scope["method"] == "POST" and media_type != "application/json":
                raise Refused(f"Content-Type {media_type or 'missing'}: send the body as application/json",
                              status=415, code="unsupported_media_type")
        except Refused as e:
            return await e.response()(scope, receive, send)
        await self.app(scope, receive, send)


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The `Host` values of requests to this server: its loopback names and the bound host, with
    the port (without it only on port 80, as clients send it). None when bound to every address
    (0.0.0.0, ::): clients then name the machine as they know it, and a key is required."""
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return None
    except ValueError:
        pass
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host.lower()}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def head_timeout_protocol(seconds: float):
    """uvicorn's h11 connection, closed when a request's head (request line and headers) is not
    all there `seconds` after the connection opened or the head began. uvicorn times out only
    a connection idle after a response, so a client that sends half a request line and waits
    would hold its connection (and file descriptor) for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeout(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.head_timer = self.loop.call_later(seconds, self.head_late)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            waiting = self.conn.their_state is h11.IDLE  # the next request's head is not complete
            if waiting and self.head_timer is None:
                self.head_timer = self.loop.call_later(seconds, self.head_late)
            elif not waiting and self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def connection_lost(self, exc) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def head_late(self) -> None:
            self.head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeout


# ----------------------------------------------------------------------------- the app

class Server:
    """The HTTP side: checks a request, queues it and turns its answer into OpenAI's shape."""

    def __init__(self, served: dict[str, Served], options: ServeOptions, moderation: Moderation,
                 api_key: str | None = None):
        self.served = served
        self.options = options
        self.moderation = moderation
        self.api_key = api_key
        self.scheduler = Scheduler(options.max_queue, options.batch_size)
        self.created = int(time.time())

    def app(self, hosts: set[str] | None):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
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
        middleware = [Middleware(Guard, hosts=hosts, origins=set(self.options.cors_origin))]
        if self.options.cors_origin:
            middleware.append(Middleware(CORSMiddleware, allow_origins=self.options.cors_origin,
                                         allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type"]))
        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)

    async def page(self, request):
        from starlette.responses import HTMLResponse

        return HTMLResponse((importlib.resources.files("tunelab.serve") / "index.html").read_text("utf-8"))

    async def health(self, request):
        from starlette.responses import JSONResponse

        from tunelab.device import computes_bf16

        loaded = len({id(s.model) for s in self.served.values()})
        # Where each model answers and in what arithmetic, as eval.json says it for evaluation.
        answering = {name: {"device": s.model.device.type,
                            "precision": "bf16" if computes_bf16(s.precision, s.model.device) else "fp32"}
                     for name, s in self.served.items()}
        return JSONResponse({"status": "ok", "models": list(self.served), "loaded_models": loaded,
                             "answering": answering, **self.scheduler.stats()})

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
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {self.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Refused("invalid or missing API key; send it as `Authorization: Bearer KEY`", status=401,
                          code="invalid_api_key")

    async def read(self, request) -> bytes:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise Refused(f"request body over {MAX_BODY_BYTES} bytes", status=413, code="body_too_large")
        body = b""
        try:
            async with asyncio.timeout(BODY_TIMEOUT):
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        raise Refused(f"request body over {MAX_BODY_BYTES} bytes", status=413,
                                      code="body_too_large")
        except TimeoutError:
            raise Refused(f"the request body took over {BODY_TIMEOUT:.0f} s to arrive", status=408,
                          code="timeout") from None
        return body

    def encode(self, served: Served, conversation: list[dict[str, str]]) -> list[int]:
        """The prompt's tokens (run in a worker thread: long conversations take a while). The
        conversation is rendered once: finding an earlier assistant turn's exact start costs
        two renderings of everything before it, which made a 1,600-message request take 15 s."""
        if self.moderation.blocks_input([m["content"] for m in conversation]):
            raise Refused("the request was refused by this server's content rules", code="content_filter")
        try:
            return served.template.encode_prompt(conversation, cut_turns=False)
        except UserError as e:  # a template that cannot render this conversation
            raise Refused(str(e), param="messages") from None

    async def answer(self, request, kind: type[Sampling]):
        from starlette.responses import JSONResponse, StreamingResponse

        try:
            self.authorize(request)
            body = parse(await self.read(request), kind)
            body.refuse_unsupported()
            served = self.served.get(body.model)
            if served is None:
                raise Refused(f"model '{body.model}' is not served here; served: {', '.join(self.served)}",
                              status=404, code="model_not_found", param="model")
            conversation = body.conversation()
            stop = body.stop_strings()
            prompt = await asyncio.to_thread(self.encode, served, conversation)
            max_tokens = body.max_completion_tokens or body.max_tokens
            if max_tokens is None:
                max_tokens = min(DEFAULT_MAX_TOKENS, served.context - len(prompt))
            if max_tokens < 1 or len(prompt) + max_tokens > served.context:
                raise Refused(f"this model's context is {served.context} tokens, but the prompt has {len(prompt)} "
                              f"tokens and max_tokens asks for {max_tokens} more; shorten the prompt or lower "
                              "max_tokens", param="max_tokens", code="context_length_exceeded")
            job = Job(served, conversation, prompt, max_tokens, body.temperature, body.top_p, body.seed, stop,
                      asyncio.get_running_loop())
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
            if self.moderation.blocks_output(answer.text):
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
                    if self.moderation.blocks_output(shown + value):
                        yield event(Refused("the answer was withheld by this server's content rules",
                                            code="content_filter").body())
                        break
                    shown += value
                    yield event(reply.chunk(value, None))
                elif kind == "error":
                    finished = True
                    yield event(Refused(value, status=500, kind="server_error").body())
                else:
                    finished = True
                    yield event(reply.chunk("", value.finish_reason))
                    if usage:
                        yield event({**reply.chunk("", None), "choices": [], "usage": reply.usage(value)})
            yield event("[DONE]")
        finally:
            if not finished:
                self.scheduler.cancel(job)


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


def api_key(options: ServeOptions) -> str | None:
    """The key clients must send: --api-key, else the first line of --api-key-file, else
    $TUNELAB_API_KEY, else none."""
    if options.api_key_file is not None:
        if options.api_key:
            raise UserError("--api-key and --api-key-file: give the key one way")
        try:
            lines = options.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise UserError(f"--api-key-file {options.api_key_file}: cannot read it ({e.strerror})") from None
        if not lines or not lines[0].strip():
            raise UserError(f"--api-key-file {options.api_key_file}: the first line is empty; write the key there")
        return lines[0].strip()
    return options.api_key or os.environ.get(API_KEY_VARIABLE) or None


def serve(options: ServeOptions) -> None:
    key = api_key(options)
    if not is_loopback(options.host) and not key:
        raise UserError(f"--host {options.host}: serving beyond this machine needs an API key: --api-key-file "
                        f"FILE, ${API_KEY_VARIABLE} or --api-key KEY (clients send it as `Authorization: Bearer KEY`)")
    for origin in options.cors_origin:
        if not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
            raise UserError(f"--cors-origin {origin}: an origin is a scheme and a host, such as "
                            "https://app.example.com (no path)")
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

    served = load_served(options.runs, not options.no_copy_constraint, options.precision, options.device,
                         options.threads)
    server = Server(served, options, moderation, key)
    port = sock.getsockname()[1]
    host = f"[{options.host}]" if ":" in options.host else options.host
    print(f"Serving {', '.join(server.served)} on http://{host}:{port} (chat page at /, API at /v1); "
          "Ctrl-C stops", flush=True)
    config = uvicorn.Config(server.app(allowed_hosts(options.host, port)), log_level="warning",
                            timeout_graceful_shutdown=None, http=head_timeout_protocol(HEAD_TIMEOUT),
                            timeout_keep_alive=5, h11_max_incomplete_event_size=16 * 1024)
    uvicorn.Server(config).run(sockets=[sock])
