"""Load on `tunelab serve`, and on llama.cpp's server with the same run: N concurrent clients
for a bounded time, on loopback only.

    PYTHONPATH=src python benchmarks/serve_load.py RUN [--clients 8] [--seconds 30] [--max-tokens 32]
        [--price-per-cpu-hour 0.04] [--gguf model.gguf | --no-llama-cpp]

Starts `tunelab serve RUN --port 0 --max-queue Q`, keeps N clients sending chat requests back to
back for --seconds, and measures latency p50/p95, generated tokens per second, the count of each
kind of error (only 429 is acceptable), and the cost of 1000 requests: the server process's CPU
time (user + system, from /proc) at --price-per-cpu-hour.

Then, when llama-cpp-python and its server extras are installed (`pip install
'llama-cpp-python[server]'`), the same load against llama.cpp's own OpenAI-compatible server
(`python -m llama_cpp.server`, as many threads as torch uses) on the run's GGUF: --gguf, or one
exported for the occasion with `tunelab export RUN --format gguf` into a temporary folder. Both
are printed side by side, and as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Load:
    """What the clients saw."""

    latencies: list[float] = field(default_factory=list)
    """Seconds per answered request."""
    tokens: int = 0
    """Completion tokens of the answered requests."""
    statuses: Counter = field(default_factory=Counter)
    """HTTP status (or exception name) per request."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client(url: str, model: str, prompts: list[str], max_tokens: int, until: float, load: Load, seed: int) -> None:
    i = seed
    while time.monotonic() < until:
        body = json.dumps({"model": model, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}).encode()
        i += 1
        request = urllib.request.Request(url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        start = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                answer = json.loads(response.read())
            with load.lock:
                load.latencies.append(time.monotonic() - start)
                load.tokens += answer["usage"]["completion_tokens"]
                load.statuses[200] += 1
        except urllib.error.HTTPError as e:
            with load.lock:
                load.statuses[e.code] += 1
            if e.code == 429:
                time.sleep(0.05)  # a real client backs off
        except OSError as e:
            with load.lock:
                load.statuses[type(e).__name__] += 1


def run_load(name: str, url: str, model: str, pid: int, args: argparse.Namespace) -> dict:
    prompts = [f"Country of {city}?" for city in ("Paris", "Berlin", "Madrid", "Rome", "Oslo", "Lisbon")]
    load = Load()
    cpu_before = cpu_seconds(pid)
    start = time.monotonic()
    until = start + args.seconds
    threads = [threading.Thread(target=client, args=(url, model, prompts, args.max_tokens, until, load, i))
               for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    cpu = cpu_seconds(pid) - cpu_before
    answered = len(load.latencies)
    quantiles = statistics.quantiles(load.latencies, n=20) if answered >= 2 else [float("nan")] * 19
    cost = cpu / 3600 * args.price_per_cpu_hour / answered * 1000 if answered else float("nan")
    return {"server": name, "clients": args.clients, "seconds": round(elapsed, 1), "answered": answered,
            "requests_per_s": round(answered / elapsed, 2), "p50_s": round(statistics.median(load.latencies), 3)
            if answered else None, "p95_s": round(quantiles[18], 3), "tokens_per_s": round(load.tokens / elapsed, 1),
            "errors": {str(k): v for k, v in load.statuses.items() if k != 200},
            "server_cpu_s": round(cpu, 1), "usd_per_1000_requests": round(cost, 5)}


def start(command: list[str], ready: re.Pattern, timeout: float = 600) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if match := ready.search(line):
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its log
            return proc, match.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    sys.exit(f"server did not start: {' '.join(command)}")


def llama_cpp_missing() -> str | None:
    """Why llama.cpp's server cannot run here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    try:
        import llama_cpp.server.app  # noqa: F401  (needs the [server] extras: fastapi, sse-starlette, ...)
    except ImportError as e:
        return f"llama-cpp-python's server extras are missing ({e.name}; pip install 'llama-cpp-python[server]')"
    return None


def llama_cpp_load(gguf: str, model: str, args: argparse.Namespace) -> dict:
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = str(torch.get_num_threads())  # as many as tunelab's server computes with
    proc, url = start([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                       "--port", str(port), "--model_alias", model, "--n_threads", threads,
                       "--n_threads_batch", threads, "--n_ctx", "2048"],
                      re.compile(rf"(http://127\.0\.0\.1:{port})"))
    try:
        return run_load("llama.cpp server", url, model, proc.pid, args)
    finally:
        proc.terminate()
        proc.wait()


def side_by_side(results: list[dict]) -> str:
    rows = [("answered", lambda r: f"{r['answered']} in {r['seconds']} s"),
            ("requests/s", lambda r: r["requests_per_s"]),
            ("p50 latency s", lambda r: r["p50_s"]), ("p95 latency s", lambda r: r["p95_s"]),
            ("tokens/s", lambda r: r["tokens_per_s"]),
            ("errors", lambda r: ", ".join(f"{n} x {k}" for k, n in r["errors"].items()) or "none"),
            ("server CPU s", lambda r: r["server_cpu_s"]),
            ("$ per 1000 requests", lambda r: r["usd_per_1000_requests"])]
    lines = [f"{'':20}" + "".join(f"{r['server']:>20}" for r in results)]
    for name, value in rows:
        lines.append(f"{name:20}" + "".join(f"{str(value(r)):>20}" for r in results))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run folder to serve")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--price-per-cpu-hour", type=float, default=0.04,
                        help="USD per CPU-hour (default 0.04: on-demand cloud vCPU price, late 2020s)")
    parser.add_argument("--gguf", default=None,
                        help="the run's GGUF for llama.cpp's server (default: exported from RUN for the occasion)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="measure tunelab's server only")
    args = parser.parse_args()

    model = os.path.basename(os.path.normpath(args.run))
    load_before = os.getloadavg()[0]  # other work on the machine skews every number below
    results = []
    proc, url = start([sys.executable, "-m", "tunelab.cli", "serve", args.run, "--port", "0",
                       "--max-queue", str(args.max_queue), "--batch-size", str(args.batch_size)],
                      re.compile(r"on (http://127\.0\.0\.1:\d+)"))
    try:
        results.append(run_load("tunelab serve", url, model, proc.pid, args))
    finally:
        proc.terminate()
        proc.wait()
    missing = None if not args.no_llama_cpp else "--no-llama-cpp"
    missing = missing or llama_cpp_missing()
    if missing:
        print(f"{missing}: measuring tunelab's server only", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as folder:
            gguf = args.gguf
            if gguf is None:
                out = os.path.join(folder, "gguf")
                subprocess.run([sys.executable, "-m", "tunelab.cli", "export", args.run, "--format", "gguf",
                                "--out", out], check=True, stdout=subprocess.DEVNULL)
                gguf = next(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".gguf"))
            results.append(llama_cpp_load(gguf, model, args))
    print(f"{os.cpu_count()} CPU cores; load average before: {load_before:.1f}, after: {os.getloadavg()[0]:.1f}")
    print(f"{args.clients} clients, {args.seconds:g} s, max_tokens {args.max_tokens}")
    print(side_by_side(results))
    for row in results:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
