"""Write docs/CLI.md, the command-line reference, from the parser's own `--help`:
`python docs/cli_reference.py` (tests/test_cli_reference.py fails when the file is out of date)."""

from pathlib import Path

from tunelab.cli import reference

if __name__ == "__main__":
    path = Path(__file__).with_name("CLI.md")
    path.write_text(reference(), encoding="utf-8")
    print(f"Wrote {path}")
