"""One client for every model tunelab asks over HTTP: the teacher of `tunelab data label/synth`,
the contenders and the judge of `tunelab eval`, all behind an OpenAI-compatible
`/v1/chat/completions` endpoint (llama.cpp, Ollama, vLLM, a hosted API).

- Private by default: `check` refuses a URL whose host is not on this machine or its private
  network (`LOCAL_NETWORKS`) before anything is sent, unless the user passes `--allow-remote`;
  then it fails at once, in one line, when nothing listens there (rather than after every retry
  of every request).
- A key, when one is needed, comes from an environment variable or a file (`api_key`), never from
  a flag's value (it would sit in the shell history and the process list); it is sent as
  `Authorization: Bearer KEY` and nowhere else: not in errors, caches or metadata.
- Retries: 429, 5xx, timeouts and dropped connections are retried with exponential backoff and
  full jitter, at least as long as a Retry-After header asks; an answer no retry changes (401,
  403, 404, 405) stops the command with one line, other 4xx fail the one request.

Safe to share between threads: one httpx connection pool serves them all.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
import socket
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunelab.errors import UserError

BACKOFF_BASE = 0.5
"""Seconds before the first retry; doubled at each further retry, with full jitter."""
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
"""A server asking for a longer pause than this is waited on for this long only."""
_BASE_URL = "pass the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1"
FATAL_STATUSES = {401: ("401 unauthorized", "is the API key right? (--api-key-env, --api-key-file)"),
                  403: ("403 forbidden", "does the API key give access to this model?"),
                  404: ("404 not found", _BASE_URL),
                  405: ("405 method not allowed", _BASE_URL)}
"""Answers that no retry will change: the URL or the access is wrong, for every request alike."""
LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "::1/128",                           # loopback
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",    # RFC 1918 private networks
    "fc00::/7",                                         # IPv6 unique local
    "169.254.0.0/16", "fe80::/10",                      # link-local
    "0.0.0.0/32", "::/128",                             # "any address": a connection to it stays on this machine
))
"""The addresses that count as this machine or its private network, listed rather than taken
from `ipaddress`'s `is_private`, which also counts documentation and benchmark ranges
(192.0.2.0/24, 198.18.0.0/15, 240.0.0.0/4, ...) that are no network of the user's."""
KEY_VARIABLES = ("TUNELAB_API_KEY", "OPENAI_API_KEY")
"""Environment variables read for the API key, in this order, when no --api-key-env or
--api-key-file is given."""


@dataclass(eq=False)
class Failure(Exception):
    """A request that got no usable answer: a short reason to count, and the detail."""

    reason: str
    """e.g. `timeout`, `connection`, `http_500`, `bad_response`, `schema`."""
    detail: str
    answer: str | None = None
    """What the model answered, when it answered something unusable."""


def chat_url(url: str) -> str:
    """The chat-completions URL from what users paste: `http://host:port`, `.../v1`, or the full path."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def api_key(env: str | None = None, file: Path | None = None) -> str | None:
    """The API key from `--api-key-file FILE`, `--api-key-env NAME`, or else the first of
    KEY_VARIABLES that is set; None when there is none (local servers need none)."""
    if file is not None:
        where = f"--api-key-file {file}"
        try:
            key = Path(file).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise UserError(f"{where}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: cannot read it ({type(e).__name__})") from None
    elif env is not None:
        where = f"--api-key-env {env}"
        key = os.environ.get(env, "").strip()
        if not key:
            raise UserError(f"{where}: the environment variable {env} is not set")
    else:
        where, key = next(((f"${name}", os.environ[name].strip()) for name in KEY_VARIABLES
                           if os.environ.get(name, "").strip()), ("", None))
        if key is None:
            return None
    # An HTTP header holds printable ASCII only; the key itself is never shown.
    if not key or not all(" " < c < "\x7f" for c in key):
        raise UserError(f"{where}: expected the API key alone, one word of printable ASCII characters")
    return key


def check_private(url: str, allow_remote: bool, flag: str, has_key: bool = False) -> tuple[str, int]:
    """(host, port) of `url`, or a UserError when its host is outside this machine and its
    private network and the user did not allow it, or when a key would go there unencrypted.
    The host name is resolved by the local resolver: nothing is sent to it."""
    try:
        parts = urlsplit(url)
        parts.hostname  # noqa: B018 (parsed here: a bad [IPv6] address raises)
    except ValueError as e:
        raise UserError(f"{flag}: not a valid URL ({e}); pass e.g. http://127.0.0.1:8080/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{flag}: not an http(s) URL; pass e.g. http://127.0.0.1:8080/v1")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"{flag}: the port is not a number") from None
    try:
        found = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise UserError(f"{flag}: cannot resolve host {parts.hostname!r} ({e.strerror})") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if is_local(ip):
            continue
        if not allow_remote:
            raise UserError(f"{flag}: {parts.hostname} is {ip}, outside this machine and its private network; "
                            "your data would leave home. Pass --allow-remote to send it there anyway")
        if has_key and parts.scheme != "https":
            raise UserError(f"{flag}: the API key would cross the internet unencrypted; use https://")
    return parts.hostname, port


def is_local(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is in LOCAL_NETWORKS (an IPv4 address written as IPv6, ::ffff:a.b.c.d, as itself)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in LOCAL_NETWORKS)


def check_timeout(seconds: float, flag: str = "--timeout") -> None:
    """Refuse a timeout that is no number of seconds above 0 (`nan`, `inf` and negatives parse as floats)."""
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
        shown = format(seconds, "g") if isinstance(seconds, (int, float)) else repr(seconds)
        raise UserError(f"{flag} {shown}: must be a number of seconds above 0, e.g. {flag} 120")


def check_count(value: int, flag: str, least: int) -> None:
    """Refuse a count such as `--retries` or `--concurrency` below `least` (or not a whole number)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f"{flag} {value}: must be a whole number of at least {least}")


class ChatClient:
    """Chat completions from one model at one URL, with retries; shared by threads."""

    def __init__(self, url: str, model: str, flag: str, api_key: str | None = None, timeout: float = 120.0,
                 retries: int = 5):
        """`flag` is how the user named the endpoint (e.g. `--teacher http://127.0.0.1:8080/v1`):
        every error message starts with it."""
        import httpx2

        check_timeout(timeout)
        check_count(retries, "--retries", 0)
        self.url = chat_url(url)
        self.model = model
        self.flag = flag
        self.timeout = timeout
        self.retries = retries
        self.has_key = bool(api_key)
        self.asked = 0
        """Requests sent, retries included."""
        self.stopping = threading.Event()
        """Set when the command stops (a fatal answer, Ctrl-C): no retry starts after it."""
        self._count_lock = threading.Lock()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx2.Client(timeout=timeout, headers=headers)

    def __repr__(self) -> str:  # the key stays out of reprs, so out of tracebacks and logs
        return f"ChatClient({self.url!r}, model={self.model!r}, key={'yes' if self.has_key else 'no'})"

    def check(self, allow_remote: bool) -> None:
        """Refuse a host outside the private network unless allowed (see `check_private`), and
        fail at once when nothing listens there."""
        host, port = check_private(self.url, allow_remote, self.flag, self.has_key)
        try:
            socket.create_connection((host, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise UserError(f"{self.flag}: cannot reach {host}:{port} ({reason}); is the server running?") from None

    def complete(self, messages: list[dict[str, str]], **options: Any) -> dict:
        """The response of one chat completion (`options` such as temperature go in the body)."""
        return self.post({"model": self.model, "messages": messages, **options})

    def post(self, body: dict[str, Any]) -> dict:
        """The JSON response to `body`, retried as the module docstring says; a Failure when the
        retries are spent or the server will never take the request."""
        import httpx2

        for attempt in range(self.retries + 1):
            if self.stopping.is_set():
                raise Failure("stopped", "the command was stopped")
            wait = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * random.random()
            with self._count_lock:
                self.asked += 1
            try:
                response = self._http.post(self.url, json=body)
            except httpx2.TimeoutException:
                problem = Failure("timeout", f"no answer within {self.timeout:g} s")
            except httpx2.TransportError as e:
                problem = Failure("connection", f"{type(e).__name__}: {e}")
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        raise Failure("bad_response", f"not JSON: {response.text[:200]!r}") from None
                if status in FATAL_STATUSES:
                    answer, hint = FATAL_STATUSES[status]
                    raise UserError(f"{self.flag}: {self.url} answers {answer}; {hint}")
                problem = Failure(f"http_{status}", response.text[:200].strip())
                if status != 429 and status < 500:
                    raise problem  # a request the server will never take (too long, malformed): no retry
                wait = max(wait, retry_after(response.headers.get("retry-after")))
            if attempt == self.retries:
                raise problem
            self.stopping.wait(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()


def content(response: dict) -> str:
    """The answer's text, stripped; a Failure when the response is not a chat completion."""
    try:
        text = response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise Failure("bad_response", f"not a chat completion: {str(response)[:200]!r}") from None
    if not isinstance(text, str) or not text.strip():
        raise Failure("empty_answer", "the model answered nothing")
    return text.strip()


def retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); 0 if absent or unreadable."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)
