"""Data from a teacher: a bigger model behind any OpenAI-compatible endpoint answers the user's
inputs (`tunelab data label`) or writes new ones from a handful of examples (`tunelab data synth`).

The teacher is asked through `/v1/chat/completions` with the user's system prompt and few-shot
examples. Three promises shape the code:

- Private by default: a URL whose host is not loopback or a private address is refused before
  anything is sent, unless the user passes `--allow-remote`.
- Nothing asked twice: every answer is appended to a cache file as it arrives, keyed by a sha256
  of the exact request (URL and body), so a run killed at any moment and started again takes
  what it already has from the cache and asks only the rest.
- Robust: a bounded pool of threads, retries with exponential backoff and jitter on 429, 5xx,
  timeouts and dropped connections (at least Retry-After when the server sends it), and a
  failed input is set aside in a rejects file with its reason instead of stopping the run.

The training file is written beside `--out` and renamed when complete, rows in input order.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import random
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tunelab.errors import UserError

BACKOFF_BASE = 0.5
"""Seconds before the first retry; doubled at each further retry, with full jitter."""
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 120.0
"""A server asking for a longer pause than this is waited on for this long only."""
FATAL_STATUSES = {401: "the teacher refuses the request (401 unauthorized)",
                  403: "the teacher refuses the request (403 forbidden)",
                  404: "nothing answers there (404)",
                  405: "that URL does not take chat completions (405)"}
"""Answers that no retry will change: the URL or the access is wrong, for every input alike."""
SYNTH_PER_ROUND = 10
"""New inputs asked for in one synth request."""
SYNTH_SHOWN = 5
"""Examples shown (a random sample of them) in one synth request."""
SYNTH_SYSTEM = ("You write inputs for a dataset. Given examples of inputs, you write new ones in the same style, "
                "format, language and length, on varied subjects, each clearly different from the examples and "
                "from each other. Answer with a JSON array of strings and nothing else.")


@dataclass
class Teacher:
    """Where the teacher is and how it is prompted: the same for every input of a run."""

    url: str
    """The chat-completions endpoint (see `endpoint`)."""
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


@dataclass(eq=False)
class Failure(Exception):
    """An input the teacher could not answer usefully: a short reason to count, and the detail."""

    reason: str
    detail: str
    answer: str | None = None


def endpoint(url: str) -> str:
    """The chat-completions URL from what users paste: `http://host:port`, `.../v1`, or the full path."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def check_private(url: str, allow_remote: bool) -> tuple[str, int]:
    """Refuse a teacher outside this machine and its private network unless allowed; (host, port).

    The host name is resolved by the local resolver: the teacher itself is not contacted.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"--teacher {url}: not an http(s) URL; pass e.g. http://127.0.0.1:8080/v1")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"--teacher {url}: the port is not a number") from None
    if allow_remote:
        return parts.hostname, port
    try:
        found = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise UserError(f"--teacher {url}: cannot resolve host {parts.hostname!r} ({e.strerror})") from None
    for *_, address in found:
        ip = ipaddress.ip_address(address[0].split("%")[0])
        if not (ip.is_loopback or ip.is_private or ip.is_link_local):
            raise UserError(f"--teacher {url}: {parts.hostname} is {ip}, outside this machine and its private "
                            "network; your data would leave home. Pass --allow-remote to send it there anyway")
    return parts.hostname, port


def check_reachable(url: str, host: str, port: int, timeout: float) -> None:
    """Fail at once, in one line, when nothing listens there (rather than after every retry of every input)."""
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"--teacher {url}: cannot reach {host}:{port} ({reason}); is the server running?") from None


class Cache:
    """Every answer, one JSON line each, appended with one write as it arrives.

    A write cut short by a kill leaves a line without its newline: it is cut off on the next
    start, so the next append does not glue onto it.
    """

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "answers.jsonl"
        self.records: dict[str, dict[str, Any]] = {}
        data = self.path.read_bytes() if self.path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            record = json.loads(line)
            self.records[record["key"]] = record
        if len(complete) != len(data):
            os.truncate(self.path, len(complete))
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

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


def request_key(url: str, body: dict[str, Any]) -> str:
    request = json.dumps({"url": url, "body": body}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(request.encode()).hexdigest()


class Client:
    """Asks the teacher, through the cache, with retries. Safe to share between threads."""

    def __init__(self, teacher: Teacher, cache: Cache):
        import httpx2

        self.teacher = teacher
        self.url = endpoint(teacher.url)
        self.cache = cache
        self.asked = 0
        """Requests sent to the teacher, retries included."""
        self.cached = 0
        """Answers taken from the cache."""
        self._count_lock = threading.Lock()
        self.stopping = threading.Event()
        """Set when the run stops (a fatal answer, Ctrl-C): requests in flight end, no retry starts."""
        self._http = httpx2.Client(timeout=teacher.timeout)
        self._refused_key = "response_format refused by " + self.url

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
        answer = self._post(body)
        received = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.cache.put({"key": key, "answer": answer, "time": received})
        return answer, received

    def _post(self, body: dict[str, Any]) -> str:
        import httpx2
        for attempt in range(self.teacher.retries + 1):
            if self.stopping.is_set():
                raise Failure("stopped", "the run was stopped")
            wait = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt) * random.random()
            with self._count_lock:
                self.asked += 1
            try:
                response = self._http.post(self.url, json=body)
            except httpx2.TimeoutException:
                problem = Failure("timeout", f"no answer within {self.teacher.timeout:g} s")
            except httpx2.TransportError as e:
                problem = Failure("connection", f"{type(e).__name__}: {e}")
            else:
                status = response.status_code
                if status == 200:
                    return _content(response)
                if status in FATAL_STATUSES:
                    raise UserError(f"--teacher {self.teacher.url}: {FATAL_STATUSES[status]} at {self.url}; "
                                    "pass the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8080/v1")
                problem = Failure(f"http_{status}", response.text[:200].strip())
                if status != 429 and status < 500:
                    raise problem  # a request the server will never take (too long, malformed): no retry
                wait = max(wait, _retry_after(response.headers.get("retry-after")))
            if attempt == self.teacher.retries:
                raise problem
            self.stopping.wait(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()


def _content(response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Failure("bad_response", f"not a chat completion: {response.text[:200]!r}") from None
    if not isinstance(content, str) or not content.strip():
        raise Failure("empty_answer", "the teacher answered nothing")
    return content.strip()


def _retry_after(value: str | None) -> float:
    """Seconds from a Retry-After header (a number of seconds or an HTTP date); 0 if absent or unreadable."""
    if not value:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds()
        except (TypeError, ValueError):
            return 0.0
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)


# Reading the user's files ------------------------------------------------------------------------

def read_inputs(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line, conversation to answer) per input: a `.txt` file holds one input per non-empty line;
    a data file (JSONL, CSV, Parquet) holds rows in any accepted shape, answers optional and unused."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        from tunelab.data.load import text_lines

        if not path.is_file():
            raise UserError(f"{path}: file not found")
        # As for the data files: a byte-order mark is dropped, a byte that is not UTF-8 named with its line.
        inputs = [(number, [{"role": "user", "content": line.strip()}])
                  for number, line in text_lines(path) if line.strip()]
        if not inputs:
            raise UserError(f"{path}: no inputs found; the file is empty")
        return inputs
    from tunelab.data.load import load_examples

    return [(e.line, e.prompt_messages()) for e in load_examples(path, require_answer=False)]


def read_shots(path: Path) -> list[list[dict[str, str]]]:
    """Few-shot examples: rows with their answers, in any accepted shape (system messages left out)."""
    from tunelab.data.load import load_examples

    if Path(path).suffix.lower() == ".txt":
        raise UserError(f"{path}: few-shot examples need answers; give rows such as "
                        '{"prompt": ..., "completion": ...} in a .jsonl file')
    return [[m for m in e.messages if m["role"] != "system"] for e in load_examples(path)]


def read_schema(path: Path) -> dict:
    path = Path(path)
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); --json-schema takes a JSON schema") from None
    if not isinstance(schema, dict):
        raise UserError(f"{path}: a JSON schema is an object, got {type(schema).__name__}")
    problem = schema_problem(schema)
    if problem:
        raise UserError(f"{path}: not a valid JSON schema ({problem})")
    return schema


# Checking answers against the schema -------------------------------------------------------------

def schema_problem(schema: dict) -> str | None:
    try:
        import jsonschema
    except ImportError:
        return None if isinstance(schema.get("type", "object"), (str, list)) else "'type' must be a string or a list"
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        return e.message
    return None


def answer_problem(answer: str, schema: dict) -> tuple[str, str] | None:
    """(reason, detail) when the answer is not JSON matching the schema, else None.

    A Markdown code fence around the JSON is accepted (and removed by `strip_fence`).
    """
    try:
        value = json.loads(strip_fence(answer))
    except json.JSONDecodeError as e:
        return "invalid_json", f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    try:
        import jsonschema
    except ImportError:
        errors = minimal_errors(value, schema)
        return ("schema", errors[0]) if errors else None
    error = jsonschema.exceptions.best_match(jsonschema.validators.validator_for(schema)(schema).iter_errors(value))
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path))
    return "schema", (f"at {where}: " if where else "") + error.message


def strip_fence(answer: str) -> str:
    text = answer.strip()
    if text.startswith("```") and text.endswith("```") and "\n" in text:
        return text[text.index("\n") + 1 : -3].strip()
    return text


_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool,
          "null": type(None)}


def minimal_errors(value: Any, schema: dict, where: str = "") -> list[str]:
    """The check used when the `jsonschema` package is not installed: `type`, `enum`, `required`,
    `properties` and `items` only, recursively; other keywords are not checked."""
    errors = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        matches = [isinstance(value, _TYPES[k]) and not (k in ("integer", "number") and isinstance(value, bool))
                   for k in kinds if k in _TYPES]
        if matches and not any(matches):
            return [f"{where or 'the answer'}: {json.dumps(value)[:60]} is not of type {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where or 'the answer'}: {json.dumps(value)[:60]} is not one of {schema['enum']}")
    if isinstance(value, dict):
        errors += [f"{where or 'the answer'}: '{name}' is a required property"
                   for name in schema.get("required", []) if name not in value]
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += minimal_errors(value[name], sub, f"{where}/{name}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += minimal_errors(item, schema["items"], f"{where}/{i}")
    return errors


# Labelling --------------------------------------------------------------------------------------

def label_one(client: Client, conversation: list[dict[str, str]]) -> tuple[str, str]:
    """(answer, time) for one input; an answer off the schema is asked again, showing what was wrong."""
    teacher = client.teacher
    messages = teacher.messages_for(conversation)
    for _ in range(teacher.reasks + 1):
        answer, received = client.ask(messages, temperature=0.0, structured=True)
        if teacher.schema is None:
            return answer, received
        problem = answer_problem(answer, teacher.schema)
        if problem is None:
            return strip_fence(answer), received
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"That answer does not match the JSON schema: {problem[1]}. "
                                                "Answer again with only the corrected JSON."}]
    raise Failure(*problem, answer=answer)


def run_pool(client: Client, items: list, work: Callable) -> list:
    """`work(item)` for every item on `concurrency` threads: its result or its Failure, in item order.

    A UserError (wrong URL, refused access) stops the run: it would be the same for every item.
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
    except BaseException:
        client.stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


@dataclass
class Paths:
    """The files of one `data label` or `data synth` run, all beside --out."""

    out: Path
    """The training file, written beside it and renamed when complete."""

    @property
    def cache(self) -> Path:
        """Folder of cached answers: keep it to rerun without asking the teacher again."""
        return self.out.with_name(self.out.stem + ".cache")

    @property
    def rejects(self) -> Path:
        """Inputs that got no usable answer, one JSON line each with the reason."""
        return self.out.with_name(self.out.stem + ".rejects.jsonl")


def prepare(teacher: Teacher, out: Path, allow_remote: bool) -> tuple[Paths, Client]:
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: the training file is JSON lines; name it e.g. {out.with_suffix('.jsonl')}")
    if out.exists():
        raise UserError(f"--out {out}: already exists; remove it or choose another name "
                        f"(answers already received stay cached in {Paths(out).cache})")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if teacher.concurrency < 1:
        raise UserError(f"--concurrency {teacher.concurrency}: must be at least 1")
    host, port = check_private(endpoint(teacher.url), allow_remote)
    check_reachable(teacher.url, host, port, teacher.timeout)
    paths = Paths(out)
    return paths, Client(teacher, Cache(paths.cache))


def label(inputs: list[tuple[int, list[dict[str, str]]]], client: Client, paths: Paths,
          extra: dict[str, Any] | None = None) -> Counter:
    """Label every input, write the training file and the rejects file; counts of failures by reason."""
    teacher = client.teacher
    results = run_pool(client, [conversation for _, conversation in inputs], lambda c: label_one(client, c))
    provenance = {"teacher": client.url, "model": teacher.model, "prompt_hash": teacher.prompt_hash(), **(extra or {})}
    failures: Counter = Counter()
    rows, rejects = [], []
    for (line, conversation), result in zip(inputs, results):
        if isinstance(result, Failure):
            failures[result.reason] += 1
            rejects.append({"line": line, "messages": conversation, "reason": result.reason, "detail": result.detail,
                            **({"answer": result.answer} if result.answer is not None else {})})
            continue
        answer, received = result
        rows.append({"messages": [*conversation, {"role": "assistant", "content": answer}],
                     "metadata": {**provenance, "time": received, "line": line}})
    if not rows:
        write_jsonl_atomic(paths.rejects, rejects)
        counts = ", ".join(f"{reason} {count}" for reason, count in failures.most_common())
        raise UserError(f"--teacher {teacher.url}: no input got a usable answer ({counts}); "
                        f"the reasons are listed in {paths.rejects}")
    write_jsonl_atomic(paths.out, rows)
    if rejects:
        write_jsonl_atomic(paths.rejects, rejects)
    elif paths.rejects.exists():
        paths.rejects.unlink()  # from an earlier run whose failures are now answered
    print(f"{len(rows)} of {len(inputs)} inputs labelled in {paths.out} "
          f"({client.asked} requests to the teacher, {client.cached} answers from {paths.cache})")
    if failures:
        counts = ", ".join(f"{reason} {count}" for reason, count in failures.most_common())
        print(f"tunelab: {sum(failures.values())} inputs failed ({counts}); listed in {paths.rejects}. "
              f"Remove {paths.out} and run again to retry them; answers received are kept.", file=sys.stderr)
    return failures


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(partial, path)


def cli_label(inputs_path: Path, teacher: Teacher, out: Path, allow_remote: bool) -> Counter:
    """`tunelab data label INPUTS --teacher URL --model NAME ... --out FILE`"""
    inputs = read_inputs(inputs_path)
    paths, client = prepare(teacher, out, allow_remote)
    try:
        return label(inputs, client, paths)
    finally:
        client.close()
        client.cache.close()


# Synthesizing inputs ----------------------------------------------------------------------------

def synth_round(client: Client, examples: list[str], round_number: int, seed: int) -> list[str]:
    """New inputs from one request showing a random sample of the examples.

    The sample and the request depend only on the round's number and the seed, so a restarted
    run asks exactly the same requests again and finds their answers in the cache.
    """
    rng = random.Random(f"{seed}:{round_number}")
    shown = rng.sample(examples, min(SYNTH_SHOWN, len(examples)))
    listing = "\n\n".join(f"<example>\n{text}\n</example>" for text in shown)
    prompt = f"Examples:\n\n{listing}\n\nWrite {SYNTH_PER_ROUND} new inputs (batch {round_number})."
    messages = [{"role": "system", "content": SYNTH_SYSTEM}, {"role": "user", "content": prompt}]
    answer, _ = client.ask(messages, temperature=1.0)
    try:
        value = json.loads(strip_fence(answer))
    except json.JSONDecodeError:
        raise Failure("unparsable_inputs", f"not a JSON array: {answer[:80]!r}") from None
    if isinstance(value, dict) and len(value) == 1:  # {"inputs": [...]}, a common wrapping
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise Failure("unparsable_inputs", f"not a JSON array: {answer[:80]!r}")
    return [item.strip() for item in value if isinstance(item, str) and item.strip()]


def synthesize(client: Client, examples: list[str], n: int, seed: int) -> tuple[list[str], Counter]:
    """N new inputs, none a near duplicate of another or of an example; failed rounds by reason."""
    import numpy as np

    from tunelab.data.dedup import NearDuplicates

    near = NearDuplicates(seed=seed)
    for text in examples:
        near.add(text)
    kept: list[str] = []
    rejected: list[bool] = [False] * len(examples)
    failures: Counter = Counter()
    # A teacher that keeps repeating itself must not loop for ever.
    max_rounds = 3 * -(-n // SYNTH_PER_ROUND) + 10
    next_round = 0
    while len(kept) < n and next_round < max_rounds:
        wave = list(range(next_round, min(next_round + client.teacher.concurrency, max_rounds)))
        next_round = wave[-1] + 1
        results = run_pool(client, wave, lambda r: synth_round(client, examples, r, seed))
        for result in results:
            if isinstance(result, Failure):
                failures[result.reason] += 1
                continue
            first_new = len(rejected)
            for text in result:
                near.add(text)
                rejected.append(False)
            first, later, _ = near.pairs(skip=np.array(rejected))
            # A new text is dropped for a near duplicate that is kept, not for one dropped itself.
            partners: dict[int, list[int]] = {}
            for a, b in zip(first.tolist(), later.tolist()):
                partners.setdefault(b, []).append(a)
            for index in range(first_new, len(rejected)):
                if any(not rejected[a] for a in partners.get(index, [])):
                    rejected[index] = True
                    failures["near_duplicate"] += 1
                else:
                    kept.append(result[index - first_new])
    return kept[:n], failures


def cli_synth(examples_path: Path, n: int, teacher: Teacher, out: Path, allow_remote: bool, seed: int) -> Counter:
    """`tunelab data synth --examples FILE --n N --teacher URL --model NAME ... --out FILE`"""
    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    examples = [conversation[-1]["content"] for _, conversation in read_inputs(examples_path)]
    if not teacher.shots and Path(examples_path).suffix.lower() != ".txt":
        # Examples that carry answers also show the teacher how to answer.
        try:
            teacher.shots = read_shots(examples_path)
        except UserError:
            pass
    paths, client = prepare(teacher, out, allow_remote)
    try:
        texts, dropped = synthesize(client, examples, n, seed)
        if dropped:
            counts = ", ".join(f"{reason} {count}" for reason, count in dropped.most_common())
            print(f"tunelab: dropped while writing inputs: {counts}", file=sys.stderr)
        if len(texts) < n:
            print(f"tunelab: the teacher gave only {len(texts)} distinct new inputs of the {n} asked for; "
                  "labelling those", file=sys.stderr)
        if not texts:
            raise UserError(f"--teacher {teacher.url}: no usable new inputs came back; see the reasons above")
        inputs = [(i + 1, [{"role": "user", "content": text}]) for i, text in enumerate(texts)]
        return label(inputs, client, paths, extra={"synthesized": True})
    finally:
        client.close()
        client.cache.close()
