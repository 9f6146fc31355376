"""`tunelab data label/synth/review` against a real HTTP server on loopback.

The server below answers chat completions deterministically and misbehaves on purpose, steered
by markers in the input: FAIL429 and FAIL500 fail the first time a request is seen, STALL sleeps
past the client's timeout the first time, BADJSON answers something that is not JSON until the
client points out the mistake, ALWAYSBAD never matches the schema. It logs every request by a
hash of its body, so the tests count on the server's side what the client asked.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from clirun import run_cli
from fakeapi import api_url, send_json, serve
from tunelab.cli import main
from tunelab.client import check_private, retry_after
from tunelab.errors import UserError
from tunelab.teacher.ask import Cache
from tunelab.teacher.schema import answer_problem

TEACHER_DOC = Path(__file__).resolve().parents[1] / "docs" / "TEACHER.md"
SCHEMA = {"type": "object", "required": ["label"], "properties": {"label": {"type": "string"}}}
_rng = random.Random(0)
WORDS = ["".join(_rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(_rng.randint(4, 8))) for _ in range(400)]


class TeacherServer:
    def __init__(self, schema_mode: bool = False, refuse_response_format: bool = False):
        self.schema_mode = schema_mode
        self.refuse_response_format = refuse_response_format
        self.lock = threading.Lock()
        self.log: list[dict] = []
        """Every request: key, phase, status, time, and whether its answer was delivered."""
        self.phase = 1
        self.hold_after: int | None = None
        """Once this many requests were let through, further requests wait for `release` and get nothing."""
        self.release = threading.Event()
        self.near_copies: list[str] = []
        """Near duplicates the synth answers contain on purpose."""
        self.key: str | None = None
        """When set, a request without `Authorization: Bearer KEY` is refused with 401."""
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self)

        self.http = serve(Handler)
        self.url = api_url(self.http)

    def close(self):
        self.release.set()
        self.http.shutdown()
        self.http.server_close()

    def requests(self, phase: int | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.log if phase is None or r["phase"] == phase]

    def delivered(self) -> int:
        return sum(r["delivered"] for r in self.requests())

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers["Content-Length"]))
        if not raw:
            return  # the client dropped this request before sending its body (it had stopped on another answer)
        body = json.loads(raw)
        key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        with self.lock:
            seen = sum(r["key"] == key for r in self.log)
            entry = {"key": key, "phase": self.phase, "time": time.monotonic(), "status": 200, "delivered": False,
                     "structured": "response_format" in body, "body": body,
                     "authorization": handler.headers.get("Authorization")}
            self.log.append(entry)
            # Counted at admission, not delivery: two answers in flight at once must not both pass.
            hold = self.hold_after is not None and sum(not r["held"] for r in self.log[:-1]) >= self.hold_after
            entry["held"] = hold
        if hold:
            self.release.wait()
            return  # the client was killed meanwhile: it gets nothing
        if handler.path != "/v1/chat/completions":
            return self.reply(handler, entry, 404, {"error": "not found"})
        if self.key is not None and entry["authorization"] != f"Bearer {self.key}":
            return self.reply(handler, entry, 401, {"error": "invalid api key"})
        messages = body["messages"]
        last = messages[-1]["content"]
        if messages[0]["role"] == "system" and messages[0]["content"].startswith("You write inputs"):
            return self.reply(handler, entry, 200, completion(self.synth_answer(key, last)))
        if "FAIL429" in last and seen == 0:
            return self.reply(handler, entry, 429, {"error": "slow down"}, {"Retry-After": "1"})
        if "FAIL500" in last and seen == 0:
            return self.reply(handler, entry, 500, {"error": "boom"})
        if "STALL" in last and seen == 0:
            time.sleep(2.5)
        if self.refuse_response_format and "response_format" in body:
            return self.reply(handler, entry, 400, {"error": {"message": "response_format is not supported"}})
        if not self.schema_mode:
            return self.reply(handler, entry, 200, completion(f"answer to: {last}"))
        question = next(m["content"] for m in messages if m["role"] == "user")
        if "ALWAYSBAD" in question:
            return self.reply(handler, entry, 200, completion('{"label": 3}'))
        if "BADJSON" in question and not last.startswith("That answer does not match"):
            return self.reply(handler, entry, 200, completion("label: positive"))
        fenced = "```json\n" + json.dumps({"label": f"for {question}"}) + "\n```"
        return self.reply(handler, entry, 200, completion(fenced))

    def synth_answer(self, key: str, prompt: str) -> str:
        rng = random.Random(key)
        fresh = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(8)]
        shown = re.findall(r"<example>\n(.*?)\n</example>", prompt, re.S)
        copies = [shown[0].upper() + "?", fresh[0].lower() + "!!"]
        with self.lock:
            self.near_copies += copies
        return json.dumps(fresh[:4] + [copies[0]] + fresh[4:] + [copies[1]])

    def reply(self, handler, entry, status: int, payload: dict, headers: dict | None = None) -> None:
        try:
            send_json(handler, payload, status, headers)
            handler.wfile.flush()
        except OSError:  # the client gave up (timeout) or was killed
            return
        with self.lock:
            entry["status"] = status
            entry["delivered"] = True


def completion(content: str) -> dict:
    return {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}


@pytest.fixture
def server():
    server = TeacherServer()
    yield server
    server.close()


def cli(*args: str, cwd: Path | None = None, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd, stdin=stdin, env=env)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def user_text(row: dict) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == "user")


def answer(row: dict) -> str:
    return row["messages"][-1]["content"]


def test_label_in_input_order_with_retries(tmp_path, server):
    questions = [f"question {i}" + {3: " FAIL429", 5: " FAIL500", 7: " STALL"}.get(i, "") for i in range(12)]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in questions))
    (tmp_path / "shots.jsonl").write_text(json.dumps({"prompt": "an example", "completion": "its answer"}) + "\n")
    out = tmp_path / "labels.jsonl"
    result = cli("data", "label", str(tmp_path / "inputs.jsonl"), "--teacher", server.url, "--model", "big",
                 "--system", "Be brief.", "--examples", str(tmp_path / "shots.jsonl"), "--concurrency", "4",
                 "--timeout", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    labelled = rows(out)
    assert [user_text(r) for r in labelled] == questions
    assert [answer(r) for r in labelled] == [f"answer to: {q}" for q in questions]
    metadata = labelled[0]["metadata"]
    assert metadata["teacher"] == server.url + "/chat/completions" and metadata["model"] == "big"
    assert len(metadata["prompt_hash"]) == 16 and metadata["time"].endswith("+00:00") and metadata["line"] == 1
    # The teacher saw the system prompt and the few-shot example before each input.
    first = server.requests()[0]["body"]["messages"]
    assert first[:3] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "an example"},
                         {"role": "assistant", "content": "its answer"}]
    by_marker = {}
    for request in server.requests():
        last = request["body"]["messages"][-1]["content"]
        by_marker.setdefault(last.split()[-1], []).append(request)
    assert [r["status"] for r in by_marker["FAIL429"]] == [429, 200]
    assert by_marker["FAIL429"][1]["time"] - by_marker["FAIL429"][0]["time"] >= 1.0  # Retry-After: 1 honoured
    assert [r["status"] for r in by_marker["FAIL500"]] == [500, 200]
    assert len(by_marker["STALL"]) == 2 and not by_marker["STALL"][0]["delivered"]
    assert len(server.requests()) == 12 + 3

    # Everything is cached: a second run asks the teacher nothing.
    out.unlink()
    again = cli("data", "label", str(tmp_path / "inputs.jsonl"), "--teacher", server.url, "--model", "big",
                "--system", "Be brief.", "--examples", str(tmp_path / "shots.jsonl"), "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert len(server.requests()) == 15 and "0 requests to the teacher, 12 answers from" in again.stdout
    assert rows(out) == labelled


@pytest.mark.slow
def test_sigkill_half_way_then_restart_asks_nothing_twice(tmp_path, server):
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("".join(f"ticket number {i}\n" for i in range(20)))
    out = tmp_path / "labels.jsonl"
    server.hold_after = 8
    args = [sys.executable, "-m", "tunelab.cli", "data", "label", str(inputs), "--teacher", server.url,
            "--model", "big", "--concurrency", "2", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    # Both threads waiting on held requests: the 8 answers before them have gone to the cache.
    while sum(r["held"] for r in server.requests()) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    server.hold_after = None
    server.release.set()
    server.phase = 2
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr

    answered_first = {r["key"] for r in server.requests(1) if r["delivered"]}
    asked_again = [r["key"] for r in server.requests(2)]
    assert len(answered_first) == 8 and len(asked_again) == 12
    assert not answered_first & set(asked_again)
    delivered = [r["key"] for r in server.requests() if r["delivered"]]
    assert len(delivered) == len(set(delivered)) == 20
    assert [answer(r) for r in rows(out)] == [f"answer to: ticket number {i}" for i in range(20)]


def test_json_schema_fallback_reask_and_rejects(tmp_path):
    server = TeacherServer(schema_mode=True, refuse_response_format=True)
    try:
        (tmp_path / "inputs.txt").write_text("fine 1\nBADJSON 2\nALWAYSBAD 3\nfine 4\n")
        (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
        out = tmp_path / "fields.jsonl"
        result = cli("data", "label", str(tmp_path / "inputs.txt"), "--teacher", server.url, "--model", "big",
                     "--json-schema", str(tmp_path / "schema.json"), "--concurrency", "1", "--out", str(out))
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    labelled = rows(out)
    assert [user_text(r) for r in labelled] == ["fine 1", "BADJSON 2", "fine 4"]
    expected = [{"label": f"for {t}"} for t in ("fine 1", "BADJSON 2", "fine 4")]
    assert [json.loads(answer(r)) for r in labelled] == expected
    rejects = rows(tmp_path / "fields.rejects.jsonl")
    assert [(r["line"], r["reason"], r["answer"]) for r in rejects] == [(3, "schema", '{"label": 3}')]
    assert "label" in rejects[0]["detail"] and "1 inputs failed (schema 1)" in result.stderr
    # response_format was refused once (400), then never sent again; ALWAYSBAD was asked 1 + 2 times.
    structured = [r for r in server.requests() if r["structured"]]
    assert [r["status"] for r in structured] == [400]
    always_bad = [r for r in server.requests() if "ALWAYSBAD" in r["body"]["messages"][0]["content"]]
    assert len(always_bad) == 3


def test_synth_drops_near_duplicates_and_reaches_n(tmp_path, server):
    examples = ["My parcel arrived with a broken lid, what can I do?", "The invoice for March lists a wrong address.",
                "Can I change the delivery day of my weekly order?", "I was charged twice for one subscription.",
                "How do I close my account and export my data?"]
    (tmp_path / "examples.txt").write_text("\n".join(examples) + "\n")
    out = tmp_path / "synth.jsonl"
    result = cli("data", "synth", "--examples", str(tmp_path / "examples.txt"), "--n", "30", "--teacher", server.url,
                 "--model", "big", "--out", str(out))
    assert result.returncode == 0, result.stderr
    texts = [user_text(r) for r in rows(out)]
    assert len(texts) == 30 and len(set(texts)) == 30
    assert server.near_copies and not set(server.near_copies) & set(texts)
    assert all(answer(r) == f"answer to: {user_text(r)}" and r["metadata"]["synthesized"] for r in rows(out))
    rounds = sum("You write inputs" in r["body"]["messages"][0]["content"] for r in server.requests())
    assert f"near_duplicate {2 * rounds}" in result.stderr


def test_remote_teacher_refused_without_allow_remote(tmp_path, capsys):
    (tmp_path / "inputs.txt").write_text("hello\n")
    code = main(["data", "label", str(tmp_path / "inputs.txt"), "--teacher", "http://93.184.216.34:8080/v1",
                 "--model", "big", "--out", str(tmp_path / "labels.jsonl")])
    error = capsys.readouterr().err
    assert code == 2 and len(error.splitlines()) == 1 and "--allow-remote" in error
    assert not (tmp_path / "labels.cache").exists()
    flag = "--teacher URL"
    assert check_private("http://93.184.216.34:8080/v1", True, flag) == ("93.184.216.34", 8080)
    for url in ("http://localhost:1/v1", "http://10.1.2.3:8080", "http://[::1]:8080", "http://192.168.1.9/v1"):
        check_private(url, False, flag)
    # A key crosses the internet encrypted only; on the private network plain http is fine.
    with pytest.raises(UserError, match="unencrypted"):
        check_private("http://93.184.216.34:8080/v1", True, flag, has_key=True)
    assert check_private("https://93.184.216.34/v1", True, flag, has_key=True) == ("93.184.216.34", 443)
    check_private("http://10.1.2.3:8080", False, flag, has_key=True)


def test_user_errors_are_one_line(tmp_path, server, capsys):
    (tmp_path / "inputs.txt").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    (tmp_path / "bad_schema.json").write_text('{"type": 12}')
    (tmp_path / "exists.jsonl").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    base = ["data", "label", str(tmp_path / "inputs.txt"), "--model", "big"]
    out = ["--out", str(tmp_path / "labels.jsonl")]
    cases = {
        "cannot reach": [*base, "--teacher", closed, *out],
        "404": [*base, "--teacher", server.url.replace("/v1", "/wrong"), *out],
        "bad.jsonl:2": [*base, "--teacher", server.url, "--examples", str(tmp_path / "bad.jsonl"), *out],
        "not a valid JSON schema": [*base, "--teacher", server.url, "--json-schema", str(tmp_path / "bad_schema.json"),
                                    *out],
        "already exists": [*base, "--teacher", server.url, "--out", str(tmp_path / "exists.jsonl")],
        "not an http(s) URL": [*base, "--teacher", "127.0.0.1:8080", *out],
    }
    for expected, argv in cases.items():
        code = main(argv)
        error = capsys.readouterr().err
        assert code == 2 and len(error.splitlines()) == 1 and expected in error, (expected, error)


def test_cache_cuts_off_a_line_a_kill_left_half_written(tmp_path):
    folder = tmp_path / "labels.cache"
    folder.mkdir()
    (folder / "answers.jsonl").write_text('{"key": "a", "answer": "x", "time": "t"}\n{"key": "b", "ans')
    cache = Cache(folder)
    cache.put({"key": "c", "answer": "z", "time": "t"})
    cache.close()
    assert sorted(Cache(folder).records) == ["a", "c"]


def test_answers_are_validated_with_jsonschema():
    assert answer_problem('{"label": "x"}', SCHEMA) is None
    assert answer_problem('```json\n{"label": "x"}\n```', SCHEMA) is None
    assert answer_problem('{"label": 3}', SCHEMA) == ("schema", "at label: 3 is not of type 'string'")
    assert answer_problem("{}", SCHEMA) == ("schema", "'label' is a required property")
    assert answer_problem("label: x", SCHEMA)[0] == "invalid_json"
    # Keywords past type and required are checked too (the hand-written fallback skipped them).
    assert answer_problem('{"label": "abc"}', {**SCHEMA, "properties": {"label": {"maxLength": 2}}})[0] == "schema"


def test_retry_after_in_seconds_or_as_a_date():
    assert retry_after("3") == 3.0 and retry_after(None) == 0.0 and retry_after("soon") == 0.0
    assert retry_after("100000") == 120.0  # capped
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= retry_after(later) <= 31


def test_api_key_is_sent_to_the_teacher_and_written_nowhere(tmp_path, server, monkeypatch, capsys):
    """`--api-key-env`, `--api-key-file` and the default variables each send `Authorization:
    Bearer KEY`; the key is in no file the run writes (cache, training file) and in no output."""
    for name in ("TUNELAB_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "inputs.txt").write_text("hello\nworld\n")
    server.key = "sk-test-first-key-0123456789"
    base = ["data", "label", str(tmp_path / "inputs.txt"), "--teacher", server.url, "--model", "m"]

    def label(out: str, *flags: str) -> tuple[int, str]:
        asked = len(server.requests())
        code = main([*base, *flags, "--out", str(tmp_path / out)])
        captured = capsys.readouterr()
        if code == 0:
            assert {r["authorization"] for r in server.requests()[asked:]} == {f"Bearer {server.key}"}
        return code, captured.out + captured.err

    monkeypatch.setenv("MY_KEY", server.key)
    code, output = label("env.jsonl", "--api-key-env", "MY_KEY")
    assert code == 0 and len(rows(tmp_path / "env.jsonl")) == 2 and server.key not in output
    keys = [server.key]

    server.key = "sk-test-from-a-file-98765"
    (tmp_path / "key.txt").write_text(server.key + "\n")
    assert label("file.jsonl", "--api-key-file", str(tmp_path / "key.txt"))[0] == 0
    keys.append(server.key)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-variable")
    server.key = "sk-test-tunelab-variable"
    monkeypatch.setenv("TUNELAB_API_KEY", server.key)
    assert label("tunelab.jsonl")[0] == 0  # TUNELAB_API_KEY first
    keys.append(server.key)
    monkeypatch.delenv("TUNELAB_API_KEY")
    server.key = "sk-test-openai-variable"
    assert label("openai.jsonl")[0] == 0
    keys.append(server.key)

    # A wrong key is one line naming the likely cause; 401 is not retried (two inputs: at most two requests).
    asked = len(server.requests())
    code, output = label("wrong.jsonl", "--api-key-file", str(tmp_path / "key.txt"))
    assert code == 2 and "answers 401 unauthorized; is the API key right?" in output and len(output.splitlines()) == 1
    assert asked < len(server.requests()) <= asked + 2 and keys[1] not in output
    monkeypatch.delenv("MY_KEY")
    code, output = label("missing.jsonl", "--api-key-env", "MY_KEY")
    assert code == 2 and "--api-key-env MY_KEY: the environment variable MY_KEY is not set" in output
    (tmp_path / "two.txt").write_text("sk-test-line-one\nsk-test-line-two\n")
    code, output = label("two.jsonl", "--api-key-file", str(tmp_path / "two.txt"))
    assert code == 2 and "expected the API key alone" in output and "sk-test-line" not in output

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name not in ("key.txt", "two.txt")]
    assert any(p.name == "answers.jsonl" for p in written)
    for path in written:
        text = path.read_text()
        assert not any(key in text for key in keys), path
    assert "--api-key" not in " ".join(p.name for p in written)


def labelled_file(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"old answer {i}"}],
                                        "metadata": {"teacher": "t"}}) + "\n" for i in range(n)))


def test_review_accepts_edits_rejects_and_resumes(tmp_path):
    labelled_file(tmp_path / "labels.jsonl", 4)
    no_editor = {"EDITOR": "", "VISUAL": ""}
    first = cli("data", "review", "labels.jsonl", "--out", "reviewed.jsonl", cwd=tmp_path, stdin="a\nr\nq\n",
                env=no_editor)
    assert first.returncode == 0, first.stderr
    assert "1 accepted, 0 edited, 1 rejected so far" in first.stdout and not (tmp_path / "reviewed.jsonl").exists()
    second = cli("data", "review", "labels.jsonl", "--out", "reviewed.jsonl", cwd=tmp_path,
                 stdin="x\ne\nnew answer\non two lines\n.\na\n", env=no_editor)
    assert second.returncode == 0, second.stderr
    assert "[3/4] line 3" in second.stdout and "question 0" not in second.stdout
    reviewed = rows(tmp_path / "reviewed.jsonl")
    assert [(user_text(r), answer(r), r["metadata"]["review"]) for r in reviewed] == [
        ("question 0", "old answer 0", "accepted"), ("question 2", "new answer\non two lines", "edited"),
        ("question 3", "old answer 3", "accepted")]
    assert reviewed[0]["metadata"]["teacher"] == "t"
    assert "Data check of reviewed.jsonl" in second.stdout and "3 read, 3 valid" in second.stdout


def test_review_edits_with_editor(tmp_path):
    labelled_file(tmp_path / "labels.jsonl", 2)
    result = cli("data", "review", "labels.jsonl", "--out", "reviewed.jsonl", cwd=tmp_path, stdin="e\na\n",
                 env={"EDITOR": "sed -i s/old/better/", "VISUAL": ""})
    assert result.returncode == 0, result.stderr
    assert [answer(r) for r in rows(tmp_path / "reviewed.jsonl")] == ["better answer 0", "old answer 1"]


def test_readme_commands(tmp_path, server):
    """Each `tunelab data label/synth/review` line of docs/TEACHER.md, as written."""
    lines = [line.strip() for line in TEACHER_DOC.read_text().splitlines()]
    commands = [line for line in lines if line.startswith("tunelab data ")]
    assert [c.split()[2] for c in commands] == ["label", "label", "synth", "review"]
    (tmp_path / "tickets.txt").write_text("".join(f"ticket {i}: the app crashes on page {i}\n" for i in range(6)))
    (tmp_path / "shots.jsonl").write_text("".join(
        json.dumps({"prompt": f"example ticket {i}: {' '.join(random.Random(i).sample(WORDS, 8))}",
                    "completion": f"summary {i}"}) + "\n" for i in range(5)))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    server.schema_mode = False
    for command in commands:
        argv = [a.replace("http://127.0.0.1:8080/v1", server.url) for a in shlex.split(command)[1:]]
        server.schema_mode = "--json-schema" in argv
        stdin = "a\n" * 2000 if argv[1] == "review" else ""
        result = cli(*argv, cwd=tmp_path, stdin=stdin)
        assert result.returncode == 0, (command, result.stderr)
    assert len(rows(tmp_path / "labels.jsonl")) == 6 and (tmp_path / "labels.cache" / "answers.jsonl").exists()
    assert len(rows(tmp_path / "synth.jsonl")) == 1000
    assert len(rows(tmp_path / "reviewed.jsonl")) == 6


def test_a_txt_file_from_notepad_or_in_latin1(tmp_path, server):
    """A .txt of inputs is read as the data files are: a byte-order mark is not part of the first
    input, and a byte that is not UTF-8 is one line naming the file and line, before any request."""
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffAna in Rome\nBen in Oslo\n".encode())
    result = cli("data", "label", str(bom), "--teacher", server.url, "--model", "m", "--out", str(tmp_path / "a.jsonl"))
    assert result.returncode == 0, result.stderr
    assert [user_text(r) for r in rows(tmp_path / "a.jsonl")] == ["Ana in Rome", "Ben in Oslo"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Ana in Rome\nCaf\xe9 in Paris\n".encode("latin-1"))
    asked = len(server.requests())
    result = cli("data", "label", str(latin1), "--teacher", server.url, "--model", "m",
                 "--out", str(tmp_path / "b.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == \
        f"tunelab: error: {latin1}:2: not UTF-8 text (byte 0xe9 at column 4); save the file as UTF-8"
    assert len(server.requests()) == asked
