"""What keeps `tunelab ui` safe on localhost: a web app that starts jobs and reads files is a
target for any page the user visits in the same browser.

- DNS rebinding: a page on evil.example whose name later resolves to 127.0.0.1 reaches this
  server with `Host: evil.example`. Only the bound address (and `localhost` for a loopback
  bind) is accepted as Host.
- Cross-site requests: a page elsewhere can POST a form here (the browser sends it, it just
  cannot read the answer). Every request but GET/HEAD must carry the session token, a random
  value made at start and written into each page (`<meta name="tunelab-token">`), as the
  `X-Tunelab-Token` header, which a cross-site form cannot set; an `Origin` or
  `Sec-Fetch-Site` saying another site is refused as well.
- Another machine: on an address other than loopback, each browser logs in once with the key
  (`/?key=KEY` sets an HttpOnly cookie); API clients may send `Authorization: Bearer KEY`.
- Files: `inside()` resolves a path (symbolic links, `..`) before checking that it lies in an
  allowed folder.
- Every response says `nosniff` and carries a Content-Security-Policy: pages run only the
  package's own script, and files from run folders (reports) run in a sandbox with an opaque
  origin, so a script in a report cannot act as the app.
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from tunelab.errors import UserError

TOKEN_HEADER = "x-tunelab-token"
LOGIN_COOKIE = "tunelab_key"
SAFE_METHODS = frozenset({"GET", "HEAD"})
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; frame-src 'self'; frame-ancestors 'self'; object-src 'none'; base-uri 'none'; "
               "form-action 'self'")
FILE_POLICY = "sandbox allow-scripts allow-popups; frame-ancestors 'self'"
"""For files served from the runs and data folders: an HTML report runs in an opaque origin."""


def allowed_hosts(host: str, port: int) -> set[str] | None:
    """The Host header values that name this server; None (any) on a wildcard address such as
    0.0.0.0, where the machine's names are not known and the login key guards instead."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {f"[{host}]" if ":" in host else host}
    if host in ("127.0.0.1", "::1", "localhost"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


class Guard:
    """ASGI middleware applying the rules above before the app sees a request."""

    def __init__(self, app, hosts: set[str] | None, token: str, login_key: str | None = None):
        self.app = app
        self.hosts = None if hosts is None else {h.lower() for h in hosts}
        self.token = token
        self.login_key = login_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal:
            await plain(send, 403, refusal)
            return
        if self.login_key and not self.logged_in(headers):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if hmac.compare_digest(query.get("key", [""])[0].encode(), self.login_key.encode()):
                rest = urlencode({k: v for k, v in query.items() if k != "key"}, doseq=True)
                location = scope["path"] + (f"?{rest}" if rest else "")
                await send({"type": "http.response.start", "status": 303, "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"set-cookie", f"{LOGIN_COOKIE}={self.login_key}; HttpOnly; SameSite=Strict; Path=/".encode()),
                ]})
                await send({"type": "http.response.body", "body": b""})
                return
            await plain(send, 401, "tunelab ui: log in with the link printed when `tunelab ui` started "
                                   "(http://HOST:PORT/?key=KEY)")
            return

        async def send_with_policy(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if b"content-security-policy" not in names:
                    extra += [(b"content-security-policy", PAGE_POLICY.encode()), (b"x-frame-options", b"SAMEORIGIN")]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_policy)

    def refusal(self, scope, headers: dict[str, str]) -> str | None:
        """Why the request is refused, or None."""
        host = headers.get("host", "").lower()
        if self.hosts is not None and host not in self.hosts:
            return (f"tunelab ui: refused a request for host {host!r}; open the address `tunelab ui` printed "
                    f"({sorted(self.hosts)[0]})")
        if scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}":
            return f"tunelab ui: refused a request from another site ({origin})"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "tunelab ui: refused a request from another site"
        if not hmac.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
            return "tunelab ui: refused a request without this session's token; reload the page"
        return None

    def logged_in(self, headers: dict[str, str]) -> bool:
        bearer = headers.get("authorization", "")
        if bearer.startswith("Bearer ") and hmac.compare_digest(bearer[7:].encode(), self.login_key.encode()):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            return False
        value = cookie[LOGIN_COOKIE].value if LOGIN_COOKIE in cookie else ""
        return hmac.compare_digest(value.encode(), self.login_key.encode())


async def plain(send, status: int, text: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"x-content-type-options", b"nosniff")]})
    await send({"type": "http.response.body", "body": text.encode()})


def inside(folder: Path, relative: str, what: str = "file") -> Path:
    """`folder / relative`, refused unless it resolves (links and `..` followed) into `folder`."""
    root = Path(folder).resolve()
    if "\x00" in relative:
        raise UserError(f"no such {what}: {relative!r}")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"no such {what}: {relative!r} is outside {folder}")
    return path
