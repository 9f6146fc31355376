"""Private by construction: tunelab opens no network connection on its own.

Each command runs in a subprocess whose every connection and name look-up for a host other than
this machine fails and is logged (tests/nonet/sitecustomize.py); the offline switches are left
to tunelab itself to set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab import OFFLINE_ENVIRONMENT

pytestmark = pytest.mark.slow

NONET = Path(__file__).parent / "nonet"


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """The test's environment without the offline switches, with the network guard first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    env["PYTHONPATH"] = os.pathsep.join([str(NONET), env.get("PYTHONPATH", "")])
    env["TUNELAB_NONET_LOG"] = str(tmp_path / "blocked.log")
    return env


def run(args: list, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, input=stdin,
                          timeout=300)


def blocked(env: dict) -> list[str]:
    log = Path(env["TUNELAB_NONET_LOG"])
    return log.read_text().splitlines() if log.exists() else []


def test_the_guard_blocks_and_logs_outside_connections(offline_env):
    code = ("import socket\n"
            "server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen()\n"
            "socket.create_connection(server.getsockname()).close()\n"  # loopback stays open
            "for host in ('example.com', '93.184.216.34'):\n"
            "    try:\n"
            "        socket.create_connection((host, 443), timeout=1)\n"
            "    except OSError as e:\n"
            "        print(type(e).__name__)\n"
            "try:\n"
            "    socket.getaddrinfo('example.org', 443)\n"
            "except OSError as e:\n"
            "    print(type(e).__name__)\n")
    result = run(["-c", code], offline_env)
    assert result.stdout.split() == ["NetworkBlocked"] * 3, result.stderr
    assert blocked(offline_env) == ["create_connection 'example.com'", "create_connection '93.184.216.34'",
                                    "getaddrinfo 'example.org'"]


def test_importing_tunelab_sets_the_offline_switches(offline_env):
    code = "import os, json, tunelab; print(json.dumps({k: os.environ.get(k) for k in tunelab.OFFLINE_ENVIRONMENT}))"
    switches = json.loads(run(["-c", code], offline_env).stdout)
    assert switches == {name: "1" for name in OFFLINE_ENVIRONMENT}
    assert set(switches) >= {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
                             "HF_DATASETS_OFFLINE", "DO_NOT_TRACK"}


def test_train_eval_generate_and_chat_need_no_network(offline_env, tmp_path, tiny_model_dir, write_jsonl):
    cities = [("Paris", "France"), ("Berlin", "Germany"), ("Madrid", "Spain"), ("Rome", "Italy")]
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Country of {city}? ({i})", "completion": country}
                                                  for i in range(3) for city, country in cities])
    out = tmp_path / "run"
    cli = ["-m", "tunelab.cli"]
    steps = [
        (["train", data, "--base", tiny_model_dir, "--out", out, "--max-steps", "2", "--batch-size", "4",
          "--test-size", "2"], None),
        (["eval", out, "--max-new-tokens", "4"], None),
        (["generate", out, "--input", data, "--max-new-tokens", "4", "--output", tmp_path / "answers.jsonl"], None),
        (["chat", out, "--max-new-tokens", "4"], "Country of Rome? (1)\n"),
    ]
    for args, stdin in steps:
        result = run([*cli, *args], offline_env, stdin)
        assert result.returncode == 0, f"tunelab {args[0]}: {result.stderr[-2000:]}"
        assert blocked(offline_env) == [], f"tunelab {args[0]} tried the network"
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 12
    assert (out / "eval.json").exists()
