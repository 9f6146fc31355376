"""docs/CLI.md is the parser's own `--help`, so the reference cannot drift from the code."""

import os
import subprocess
import sys
from pathlib import Path

from tunelab.cli import command_parsers, reference

ROOT = Path(__file__).parents[1]
REGENERATE = "python docs/cli_reference.py"


def test_docs_cli_md_is_what_the_parser_prints():
    written = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")
    assert written == reference(), f"docs/CLI.md is out of date with the CLI's --help; regenerate it: {REGENERATE}"


def test_the_reference_has_every_command_once_at_a_fixed_width(monkeypatch):
    text = reference()
    for name in command_parsers():
        assert text.count(f"\n## {name}\n") == 1, name
    assert "tunelab data check" in command_parsers() and "--max-steps" in text
    monkeypatch.setenv("COLUMNS", "40")  # the terminal this runs in does not change it
    assert reference() == text
    assert max(map(len, text.splitlines())) <= 100


def test_the_regeneration_command_writes_the_file(tmp_path):
    script = tmp_path / "docs" / "cli_reference.py"
    script.parent.mkdir()
    script.write_text((ROOT / "docs" / "cli_reference.py").read_text())
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "docs" / "CLI.md").read_text() == reference()
