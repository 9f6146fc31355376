"""Bad input to `tunelab data label`, `data review` and `export` ends in one line, never a traceback:
addresses that only look private, bad numbers, output paths that cannot be written, damaged
caches and decisions files, a missing editor, and Ctrl-C while the teacher is answering.

The teacher here is a small HTTP server on loopback that answers "answer to: INPUT"; it can hold
requests until the test releases them, to stop the client while requests are in flight.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from fakeapi import api_url, send_json, serve
from tunelab.cli import main
from tunelab.client import check_private
from tunelab.errors import UserError


class Teacher:
    """Answers every chat completion; with `hold_after` set, requests past that many wait for
    `release` and are then answered as usual."""

    def __init__(self):
        self.lock = threading.Lock()
        self.asked: list[str] = []
        self.held = 0
        self.hold_after: int | None = None
        self.release = threading.Event()
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                question = body["messages"][-1]["content"]
                with teacher.lock:
                    teacher.asked.append(question)
                    hold = teacher.hold_after is not None and len(teacher.asked) > teacher.hold_after
                    teacher.held += hold
                if hold:
                    teacher.release.wait(60)
                send_json(self, {"choices": [{"index": 0, "finish_reason": "stop", "message": {
                    "role": "assistant", "content": f"answer to: {question}"}}]})

        self.http = serve(Handler)
        self.url = api_url(self.http)

    def close(self):
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def teacher():
    server = Teacher()
    yield server
    server.close()


@pytest.fixture
def closed_port() -> str:
    """A teacher URL where nothing listens: a check that comes after contacting it would say so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    """(exit code, standard error's lines, standard output) of `tunelab ARGV`, in this process."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def one_error(capsys, argv: list[str], start: str) -> None:
    code, err, _ = run(capsys, *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("tunelab: error: " + start), (argv, err)


@pytest.fixture
def read_only(tmp_path):
    """A folder no file can be created in, whoever runs the tests: root ignores permission bits
    but not the immutable attribute (chattr +i), where the file system has one."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = _cannot_create_in(folder) or subprocess.run(["chattr", "+i", str(folder)],
                                                            capture_output=True).returncode == 0
    if not (immutable and _cannot_create_in(folder)):
        pytest.skip("no way to make a read-only folder on this machine")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def _cannot_create_in(folder: Path) -> bool:
    try:
        (folder / "tunelab-probe").touch()
    except OSError:
        return True
    (folder / "tunelab-probe").unlink()
    return False


# --- Which addresses are private ------------------------------------------------------------------

NOT_LOCAL = ["192.0.2.1", "198.51.100.7", "203.0.113.9", "198.18.0.1", "198.19.255.254", "240.0.0.1",
             "172.32.0.1", "100.64.0.1", "[2001:db8::1]", "[::ffff:192.0.2.1]"]
"""Documentation (TEST-NET-1/2/3, 2001:db8::/32), benchmarking (198.18.0.0/15), reserved
(240.0.0.0/4) and shared (100.64.0.0/10) ranges, which Python's `is_private` counts as private,
and the first address past 172.16.0.0/12."""
LOCAL = ["127.0.0.1", "127.8.9.10", "[::1]", "10.0.0.1", "10.255.255.254", "172.16.0.1", "172.31.255.254",
         "192.168.1.9", "[fd12:3456::1]", "[fc00::1]", "169.254.10.20", "[fe80::1]", "[::ffff:10.1.2.3]"]
"""Loopback, RFC 1918, unique-local (fc00::/7) and link-local addresses."""


@pytest.mark.parametrize("host", NOT_LOCAL)
def test_documentation_and_benchmark_addresses_are_not_private(tmp_path, capsys, host):
    (tmp_path / "inputs.txt").write_text("hello\n")
    url = f"http://{host}:8080/v1"
    one_error(capsys, ["data", "label", str(tmp_path / "inputs.txt"), "--teacher", url, "--model", "m",
                       "--out", str(tmp_path / "labels.jsonl")], f"--teacher {url}: {host.strip('[]')} is ")
    assert not (tmp_path / "labels.cache").exists()
    # With --allow-remote it is contacted like any other server.
    assert check_private(url, True, "--teacher") == (host.strip("[]"), 8080)


@pytest.mark.parametrize("host", LOCAL)
def test_loopback_private_unique_local_and_link_local_addresses_are_local(host):
    assert check_private(f"http://{host}:8080/v1", False, "--teacher") == (host.strip("[]"), 8080)


# --- Numbers the client cannot work with -----------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--retries", "-1"), ("--timeout", "-5"), ("--timeout", "nan"),
                                         ("--timeout", "inf"), ("--timeout", "0"), ("--concurrency", "0"),
                                         ("--concurrency", "-3")])
@pytest.mark.parametrize("command", ["label", "synth"])
def test_bad_numbers_are_refused_before_the_teacher_is_asked(tmp_path, capsys, closed_port, command, flag, value):
    (tmp_path / "inputs.txt").write_text("hello\n")
    inputs = [str(tmp_path / "inputs.txt")] if command == "label" else ["--examples", str(tmp_path / "inputs.txt"),
                                                                          "--n", "2"]
    code, err, _ = run(capsys, "data", command, *inputs, "--teacher", closed_port, "--model", "m", flag, value,
                       "--out", str(tmp_path / "labels.jsonl"))
    # The flag's own error, not "cannot reach" the closed port: the value is refused first.
    assert code == 2 and len(err) == 1 and err[0].startswith(f"tunelab: error: {flag} "), err
    assert value.lstrip("-") in err[0] and "cannot reach" not in err[0]


def test_the_shared_client_refuses_bad_numbers_whoever_builds_it():
    from tunelab.client import ChatClient

    for timeout, retries, flag in [(float("nan"), 5, "--timeout nan"), (-1.0, 5, "--timeout -1"),
                                   (10.0, -2, "--retries -2"), (10.0, 1.5, "--retries 1.5")]:
        with pytest.raises(UserError, match=f"^{flag}: must be"):
            ChatClient("http://127.0.0.1:1/v1", "m", "--judge x", timeout=timeout, retries=retries)


# --- Output paths, checked before the teacher is asked ---------------------------------------------

def test_label_output_paths_are_checked_before_the_teacher_is_contacted(tmp_path, capsys, closed_port, read_only):
    (tmp_path / "inputs.txt").write_text("hello\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "cached.cache").write_text("")  # a file where the cache folder goes
    (tmp_path / "nested.cache" / "answers.jsonl").mkdir(parents=True)
    (tmp_path / "rejected.rejects.jsonl").mkdir()
    base = ["data", "label", str(tmp_path / "inputs.txt"), "--teacher", closed_port, "--model", "m", "--out"]
    cases = {
        tmp_path / "folder.jsonl": "is a folder; name a file inside it",
        tmp_path / "missing" / "labels.jsonl": "folder",
        tmp_path / "a-file" / "labels.jsonl": "is a file, not a folder",
        read_only / "labels.jsonl": "cannot write in",
        Path("/proc/labels.jsonl"): "/proc is the kernel's view",
        Path("/sys/kernel/labels.jsonl"): "/sys is the kernel's view",
        tmp_path / "cached.jsonl": f"the answer cache {tmp_path / 'cached.cache'} is a file",
        tmp_path / "nested.jsonl": "the cached answers",
        tmp_path / "rejected.jsonl": "the rejects file",
    }
    for out, message in cases.items():
        code, err, _ = run(capsys, *base, str(out))
        assert code == 2 and len(err) == 1 and err[0].startswith(f"tunelab: error: --out {out}"), (out, err)
        assert message in err[0] and "cannot reach" not in err[0], (out, err)


def test_review_output_paths_are_checked_before_any_pair_is_shown(tmp_path, capsys, monkeypatch, read_only):
    labelled(tmp_path / "labels.jsonl", 2)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "folder.jsonl").mkdir()
    (tmp_path / "decided.decisions.jsonl").mkdir()
    cases = {
        tmp_path / "folder.jsonl": "is a folder; name a file inside it",
        tmp_path / "missing" / "reviewed.jsonl": "does not exist",
        tmp_path / "a-file" / "reviewed.jsonl": "is a file, not a folder",
        read_only / "reviewed.jsonl": "cannot write in",
        Path("/proc/reviewed.jsonl"): "/proc is the kernel's view",
        Path("/sys/reviewed.jsonl"): "/sys is the kernel's view",
        tmp_path / "decided.jsonl": f"the decisions file {tmp_path / 'decided.decisions.jsonl'} is a folder",
    }
    for out, message in cases.items():
        code, err, stdout = run(capsys, "data", "review", str(tmp_path / "labels.jsonl"), "--out", str(out))
        assert code == 2 and len(err) == 1 and err[0].startswith(f"tunelab: error: --out {out}"), (out, err)
        assert message in err[0] and "question" not in stdout, (out, err)


def test_export_output_paths_are_checked_before_the_run_is_read(tmp_path, capsys, read_only):
    """The run folder does not exist: an error about --out shows it was checked first."""
    (tmp_path / "a-file").write_text("")
    cases = {
        tmp_path / "a-file": "is a file, not a folder",
        tmp_path / "a-file" / "export": "is a file, so no folder can be made under it",
        read_only / "export": "cannot write in",
        Path("/proc/export"): "/proc is the kernel's view",
        Path("/sys/export"): "/sys is the kernel's view",
    }
    for out, message in cases.items():
        code, err, _ = run(capsys, "export", str(tmp_path / "no-such-run"), "--format", "merged", "--out", str(out))
        assert code == 2 and len(err) == 1 and err[0].startswith(f"tunelab: error: --out {out}"), (out, err)
        assert message in err[0], (out, err)


# --- Damaged files ----------------------------------------------------------------------------------

def test_a_damaged_line_in_the_teacher_cache_is_skipped_with_a_warning(tmp_path, capsys, teacher):
    (tmp_path / "inputs.txt").write_text("first\nsecond\nthird\n")
    argv = ["data", "label", str(tmp_path / "inputs.txt"), "--teacher", teacher.url, "--model", "m",
            "--concurrency", "1", "--out", str(tmp_path / "labels.jsonl")]
    assert run(capsys, *argv)[0] == 0 and len(teacher.asked) == 3
    cache = tmp_path / "labels.cache" / "answers.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    # Line 1 changed on disk, line 2 kept, line 3 cut short by a kill.
    cache.write_bytes(b'{"key": "\xff\xfe garbage\n' + lines[1].encode() + lines[2][:20].encode())
    (tmp_path / "labels.jsonl").unlink()
    code, err, _ = run(capsys, *argv)
    assert code == 0 and err[0].startswith(f"tunelab: warning: {cache}:1: 2 damaged line(s) skipped (line 1, 3)"), err
    assert teacher.asked[3:] == ["first", "third"]  # "second" came from the cache
    assert [json.loads(line)["messages"][-1]["content"] for line in (tmp_path / "labels.jsonl").open()] == [
        "answer to: first", "answer to: second", "answer to: third"]


@pytest.mark.parametrize("content, start", [
    (None, "--json-schema {path}: is a folder"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", "--json-schema {path}: not a text file"),
    (b'{"type": "object",', "{path}:1: not valid JSON"),
    (b"", "{path}:1: not valid JSON"),
])
def test_a_json_schema_that_is_a_folder_binary_or_not_json_is_one_line(tmp_path, capsys, closed_port, content, start):
    path = tmp_path / "schema.json"
    path.mkdir() if content is None else path.write_bytes(content)
    (tmp_path / "inputs.txt").write_text("hello\n")
    one_error(capsys, ["data", "label", str(tmp_path / "inputs.txt"), "--teacher", closed_port, "--model", "m",
                       "--json-schema", str(path), "--out", str(tmp_path / "labels.jsonl")], start.format(path=path))


def labelled(path: Path, n: int) -> None:
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                     {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
                            for i in range(n)))


def review(capsys, monkeypatch, tmp_path: Path, keys: str) -> tuple[int, list[str], str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(keys))
    return run(capsys, "data", "review", str(tmp_path / "labels.jsonl"), "--out", str(tmp_path / "reviewed.jsonl"))


def test_a_damaged_line_in_the_decisions_file_is_skipped_with_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDITOR", "")
    monkeypatch.setenv("VISUAL", "")
    labelled(tmp_path / "labels.jsonl", 3)
    code, _, out = review(capsys, monkeypatch, tmp_path, "a\nr\nq\n")
    assert code == 0 and "1 accepted, 0 edited, 1 rejected so far" in out
    decisions = tmp_path / "reviewed.decisions.jsonl"
    first, second = decisions.read_text().splitlines(keepends=True)
    decisions.write_text("not json at all\n" + second + '{"key": "abc", "decis')  # line 3 cut by a kill
    code, err, out = review(capsys, monkeypatch, tmp_path, "a\na\n")
    assert code == 0 and err[0].startswith(f"tunelab: warning: {decisions}:1: 2 damaged line(s) skipped (line 1, 3)")
    assert "question 0" in out and "question 1" not in out and "question 2" in out  # pair 1 stays rejected
    reviewed = [json.loads(line) for line in (tmp_path / "reviewed.jsonl").open()]
    assert [r["messages"][0]["content"] for r in reviewed] == ["question 0", "question 2"]


def test_an_editor_that_does_not_exist_is_one_line_and_the_pair_stays_undecided(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDITOR", "no-such-editor-for-tunelab --wait")
    monkeypatch.setenv("VISUAL", "")
    labelled(tmp_path / "labels.jsonl", 2)
    code, err, out = review(capsys, monkeypatch, tmp_path, "e\nq\n")
    assert code == 0 and len(err) == 1
    assert err[0].startswith("tunelab: cannot start the editor 'no-such-editor-for-tunelab --wait'")
    assert "the pair stays undecided" in err[0] and "0 accepted, 0 edited, 0 rejected so far" in out
    assert (tmp_path / "reviewed.decisions.jsonl").read_text() == ""
    # Unbalanced quotes are no program either.
    monkeypatch.setenv("EDITOR", "vim '")
    code, err, _ = review(capsys, monkeypatch, tmp_path, "e\nq\n")
    assert code == 0 and len(err) == 1 and err[0].startswith("tunelab: cannot start the editor")


# --- Ctrl-C -----------------------------------------------------------------------------------------

def test_ctrl_c_in_label_caches_the_answers_in_flight_then_the_same_command_continues(tmp_path, teacher):
    (tmp_path / "inputs.txt").write_text("".join(f"ticket {i}\n" for i in range(12)))
    out = tmp_path / "labels.jsonl"
    argv = [sys.executable, "-m", "tunelab.cli", "data", "label", str(tmp_path / "inputs.txt"), "--teacher",
            teacher.url, "--model", "m", "--concurrency", "2", "--out", str(out)]
    teacher.hold_after = 4
    # A shell's background job starts with SIGINT ignored, and Python then keeps ignoring it.
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while teacher.held < 2:  # both threads wait on an answer; four answers are cached
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # the client stops starting requests; the two in flight still get their answers
    assert process.poll() is None
    teacher.release.set()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and stdout == ""
    assert stderr.splitlines() == [f"tunelab: interrupted: 6 answers are cached in {tmp_path / 'labels.cache'}; "
                                   "run the same command to continue (cached answers are not asked again)"]
    assert len(teacher.asked) == 6 and not out.exists()

    teacher.hold_after = None
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(teacher.asked) == 12 and len(set(teacher.asked)) == 12  # nothing asked twice
    assert [json.loads(line)["messages"][-1]["content"] for line in out.open()] == [
        f"answer to: ticket {i}" for i in range(12)]
