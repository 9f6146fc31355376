"""What the tests' fake OpenAI-compatible endpoints share: a server on a free loopback port in a
thread of its own, and a JSON reply. Each test file keeps its own handler (what it answers)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A server for `handler` on 127.0.0.1 at a free port, serving until `shutdown()`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def api_url(server: ThreadingHTTPServer) -> str:
    """The server's base URL as tunelab's --teacher, --judge and --compare take it."""
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def send_json(handler: BaseHTTPRequestHandler, payload: dict, status: int = 200, headers: dict | None = None) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
