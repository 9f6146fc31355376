"""Every mistake a user can make: one line `tunelab: error: ...`, exit code 2, no traceback,
nothing lost. Each case of the corpus writes its bad input into tmp_path and runs the CLI's
`main` as the `tunelab` command would (in the test's process: clirun.run_cli); most fail before
any model loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from clirun import run_cli

GOOD_ROWS = [{"prompt": f"Country of {city}? ({i})", "completion": country}
             for i in range(3) for city, country in (("Paris", "France"), ("Rome", "Italy"))]


def cli(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd)


@dataclass
class Setting:
    """What a case can build on: a scratch folder, the tiny model and a finished tiny run."""

    tmp: Path
    model: Path
    run: Path
    write_jsonl: Callable[[Path, list], Path]

    def good_data(self) -> Path:
        return self.write_jsonl(self.tmp / "good.jsonl", GOOD_ROWS)

    def write(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir()
        return path

    def gguf(self, name: str, keep: int | None) -> Path:
        """A small valid GGUF file, cut to `keep` bytes from its start (None: cut 1000 from its end)."""
        import gguf
        import numpy as np

        path = self.tmp / name
        writer = gguf.GGUFWriter(path, "llama")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        content = path.read_bytes()
        path.write_bytes(content[:keep] if keep is not None else content[:-1000])
        return path

    def read_only(self) -> Path:
        """A folder no file can be created in, whoever runs the tests (root ignores permission bits)."""
        folder = self.folder("read-only")
        folder.chmod(0o555)
        if _cannot_create_in(folder):
            return folder
        if _cannot_create_in(Path("/sys")):
            return Path("/sys")  # sysfs refuses new files even to root
        pytest.skip("no read-only folder on this machine")

    def run_without(self, name: str) -> Path:
        copy = self.tmp / "run-copy"
        shutil.copytree(self.run, copy)
        shutil.rmtree(copy / name) if (copy / name).is_dir() else (copy / name).unlink()
        return copy


def _cannot_create_in(folder: Path) -> bool:
    probe = folder / "tunelab-probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


LATIN1 = '{"prompt": "Caf\xe9 au lait?", "completion": "oui"}\n'.encode("latin-1")


def _latin1_second_line(s: Setting) -> Path:
    return s.write("latin1.jsonl", json.dumps(GOOD_ROWS[0]).encode() + b"\n" + LATIN1)


def _no_weights_base(s: Setting) -> Path:
    folder = s.tmp / "no-weights"
    shutil.copytree(s.model, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    return folder


# name -> (arguments built from a Setting, what the one line must say)
CASES = {
    # the data file
    "data-latin1": (lambda s: ["data", "check", _latin1_second_line(s)], ["latin1.jsonl:2:", "save the file as UTF-8"]),
    "train-latin1": (lambda s: ["train", _latin1_second_line(s), "--base", s.model, "--out", s.tmp / "out"],
                     ["latin1.jsonl:2:", "save the file as UTF-8"]),
    "csv-bad-header": (lambda s: ["data", "check", s.write("d.csv", "promt,completion\na,b\nc,d\n")],
                       ["d.csv:1:", "'promt'", "did you mean 'prompt'"]),
    "csv-no-header": (lambda s: ["data", "check", s.write("d.csv", "a,b\nc,d\n")], ["d.csv:1:", "fits no shape"]),
    "csv-repeated-column": (lambda s: ["data", "check", s.write("d.csv", "prompt,prompt,completion\na,b,c\n")],
                            ["d.csv:1:", "'prompt' appears twice"]),
    "csv-semicolons": (lambda s: ["data", "check", s.write("d.csv", "\ufeffprompt;completion\na;b\n")],
                       ["d.csv:1:", "separated by ';', not commas", "CSV UTF-8"]),
    "json-array": (lambda s: ["data", "check", s.write("d.jsonl", json.dumps(GOOD_ROWS, indent=1))],
                   ["d.jsonl:1:", "one object per line"]),
    "data-empty": (lambda s: ["data", "check", s.write("empty.jsonl", "")], ["empty.jsonl", "no examples"]),
    "data-missing": (lambda s: ["train", s.tmp / "nope.jsonl", "--out", s.tmp / "out"], ["nope.jsonl: file not found"]),
    "data-folder": (lambda s: ["data", "check", s.folder("d.jsonl")], ["d.jsonl: is a folder"]),
    "data-unknown-type": (lambda s: ["data", "check", s.write("d.txt", "hello")],
                          ["d.txt", ".jsonl, .csv or .parquet"]),
    "data-check-out-is-file": (lambda s: ["data", "check", s.good_data(), "--out", s.write("report", "mine")],
                               ["--out", "report: is a file"]),
    # where training writes
    "train-out-is-file": (lambda s: ["train", s.good_data(), "--base", s.model, "--out", s.write("out", "mine")],
                          ["--out", "out: is a file"]),
    "train-out-under-file": (lambda s: ["train", s.good_data(), "--base", s.model, "--out",
                                        s.write("out", "mine") / "run"], ["is a file, so no folder can be made"]),
    "train-out-read-only": (lambda s: ["train", s.good_data(), "--base", s.model, "--out", s.read_only() / "run"],
                            ["--out", "cannot write in"]),
    "train-out-holds-a-run": (lambda s: ["train", s.good_data(), "--base", s.model, "--out", s.run],
                              ["already holds a run", "--overwrite"]),
    # the base model
    "base-missing": (lambda s: ["train", s.good_data(), "--base", s.tmp / "nothing", "--out", s.tmp / "out"],
                     ["nothing", "not found"]),
    "base-empty-folder": (lambda s: ["train", s.good_data(), "--base", s.folder("empty"), "--out", s.tmp / "out"],
                          ["empty: an empty folder"]),
    "base-not-a-model": (lambda s: ["train", s.good_data(), "--base", s.write("notes.txt", "hi").parent,
                                    "--out", s.tmp / "out"], ["a folder without config.json"]),
    "base-no-weights": (lambda s: ["train", s.good_data(), "--base", _no_weights_base(s), "--out", s.tmp / "out"],
                        ["no-weights: the folder has config.json but no weights"]),
    "base-gguf-truncated-header": (lambda s: ["train", s.good_data(), "--base", s.gguf("cut.gguf", 40),
                                              "--out", s.tmp / "out"], ["cut.gguf", "truncated or damaged"]),
    "base-gguf-truncated-data": (lambda s: ["train", s.good_data(), "--base", s.gguf("cut.gguf", None),
                                            "--out", s.tmp / "out"], ["cut.gguf", "truncated or damaged"]),
    "base-gguf-not-gguf": (lambda s: ["data", "check", s.good_data(), "--base", s.write("model.gguf", "x" * 100)],
                           ["model.gguf", "truncated or damaged"]),
    # flags and options
    "flag-bad-choice": (lambda s: ["train", s.good_data(), "--method", "magic"],
                        ["--method magic", "'lora' or 'full'"]),
    "flag-not-a-number": (lambda s: ["generate", s.run, "--prompt", "hi", "--max-new-tokens", "many"],
                          ["--max-new-tokens many: must be a whole number"]),
    "flag-zero": (lambda s: ["eval", s.run, "--limit", "0"], ["--limit 0: must be greater than or equal to 1"]),
    "flag-missing-argument": (lambda s: ["generate"], ["tunelab generate", "required"]),
    "flag-unknown": (lambda s: ["train", s.good_data(), "--learning-rate", "1e-3"],
                     ["error: tunelab train: unrecognized arguments: --learning-rate", "`tunelab train --help`"]),
    "flag-abbreviated": (lambda s: ["train", s.good_data(), "--epoch", "2"],
                         ["tunelab train: unrecognized arguments: --epoch 2"]),
    "flag-abbreviated-run-command": (lambda s: ["eval", s.run, "--no-forget"],
                                     ["tunelab eval: unrecognized arguments: --no-forget"]),
    "flag-unknown-nested": (lambda s: ["data", "check", s.good_data(), "--bse", "x"],
                            ["error: tunelab data check: unrecognized arguments: --bse x",
                             "`tunelab data check --help`"]),
    "command-typo": (lambda s: ["trian", s.good_data()], ["error: argument COMMAND: invalid choice: 'trian'"]),
    "yaml-epochs-two": (lambda s: ["train", s.good_data(), "--base", s.model, "--out", s.tmp / "out", "--config",
                                   s.write("c.yaml", "epochs: two\n")], ["c.yaml", "epochs", "'two'"]),
    **{f"{command}-config-latin1": (
        lambda s, command=command, extra=extra: [command, s.good_data(), *extra, "--out", s.tmp / "out", "--config",
                                                 s.write("c.yaml", b"lr: 1e-4\n# caf\xe9\n")],
        ["c.yaml: not UTF-8 text", "save it as UTF-8"])
       for command, extra in [("train", []), ("curve", ["--sizes", "8,16"]), ("sweep", ["--grid", "lr=1e-4,2e-4"])]},
    # the run folder
    "eval-not-a-run": (lambda s: ["eval", s.folder("some-folder")], ["some-folder: not a tunelab run folder"]),
    "eval-no-such-run": (lambda s: ["eval", s.tmp / "no-run"], ["no-run: no such run folder"]),
    "eval-run-is-data-file": (lambda s: ["eval", s.good_data()], ["good.jsonl: is a file, not a run folder"]),
    "eval-no-weights": (lambda s: ["eval", s.run_without("adapter")], ["has no trained weights"]),
    "generate-no-tokenizer": (lambda s: ["generate", s.run_without("tokenizer"), "--prompt", "hi"],
                              ["incomplete run folder (no tokenizer)"]),
    "review-no-such-run": (lambda s: ["data", "review", "--run", s.tmp / "no-run"], ["no-run: no such run folder"]),
    "review-run-is-data-file": (lambda s: ["data", "review", "--run", s.good_data()],
                                ["good.jsonl: is a file, not a run folder"]),
    "review-not-a-run": (lambda s: ["data", "review", "--run", s.folder("some-folder")],
                         ["some-folder: not a tunelab run folder"]),
    "chat-not-a-run": (lambda s: ["chat", s.folder("some-folder")], ["not a tunelab run folder"]),
    "chat-no-weights": (lambda s: ["chat", s.run_without("adapter")], ["has no trained weights"]),
    # generate's input and output
    "generate-output-folder-missing": (lambda s: ["generate", s.run, "--input", s.good_data(), "--output",
                                                  s.tmp / "answers" / "out.jsonl"],
                                       ["answers does not exist", "mkdir"]),
    "generate-output-read-only": (lambda s: ["generate", s.run, "--input", s.good_data(), "--output",
                                             s.read_only() / "out.jsonl"], ["--output", "cannot write in"]),
    "generate-output-is-folder": (lambda s: ["generate", s.run, "--input", s.good_data(), "--output",
                                             s.folder("answers")], ["answers: is a folder"]),
    "generate-output-is-input": (lambda s: ["generate", s.run, "--input", s.good_data(), "--output",
                                            s.tmp / "good.jsonl"], ["is the --input file"]),
    "generate-prompt-and-input": (lambda s: ["generate", s.run, "--prompt", "hi", "--input", s.good_data()],
                                  ["exactly one of --prompt"]),
    "generate-prompt-empty": (lambda s: ["generate", s.run, "--prompt", "  "], ["--prompt is empty"]),
    "generate-input-latin1": (lambda s: ["generate", s.run, "--input", _latin1_second_line(s)],
                              ["latin1.jsonl:2:", "save the file as UTF-8"]),
    "generate-input-empty": (lambda s: ["generate", s.run, "--input", s.write("prompts.jsonl", "\n")],
                             ["prompts.jsonl: no examples found"]),
    "generate-input-raw-text": (lambda s: ["generate", s.run, "--input", s.write_jsonl(s.tmp / "p.jsonl",
                                                                                   [{"text": "a document"}])],
                                ["p.jsonl:1:", "asks nothing"]),
    "generate-precision-unknown": (lambda s: ["generate", s.run, "--prompt", "hi", "--precision", "half"],
                                   ["--precision half: must be 'auto', 'fp32' or 'bf16'"]),
    # the demo
    "demo-out-is-file": (lambda s: ["demo", "--out", s.write("demo", "mine")], ["--out", "demo: is a file"]),
    "demo-out-read-only": (lambda s: ["demo", "--out", s.read_only() / "demo"], ["--out", "cannot write in"]),
    "demo-zero-examples": (lambda s: ["demo", "--examples", "0"], ["--examples"]),
    # --split-by
    "split-by-missing-in-some-rows": (lambda s: ["data", "check", _customers(s, ["acme", None, "bolt", None]),
                                                 "--split-by", "metadata.customer"],
                                      ["customers.jsonl:2:", "E_SPLIT_BY", "no metadata.customer", "1 more row",
                                       "give every row that field"]),
    "split-by-one-group": (lambda s: ["data", "check", _customers(s, ["acme"] * 6), "--split-by", "metadata.customer"],
                           ["E_SPLIT", "--split-by metadata.customer", "one group"]),
    "split-by-no-training-group": (lambda s: ["data", "check", _customers(s, ["acme", "bolt"] * 3), "--split-by",
                                              "metadata.customer", "--test-size", "0.9"],
                                   ["E_SPLIT", "leaves no training group", "lower --test-size"]),
    "split-by-unknown-field": (lambda s: ["data", "check", s.good_data(), "--split-by", "customer"],
                               ["--split-by customer", "'metadata.customer'"]),
}


def _customers(s: Setting, customers: list[str | None]) -> Path:
    """Good rows whose metadata names these customers (None: the row has no metadata)."""
    rows = [{**row, "metadata": {"customer": c}} if c else row for row, c in zip(GOOD_ROWS, customers)]
    return s.write_jsonl(s.tmp / "customers.jsonl", rows)
@pytest.mark.parametrize("name", list(CASES))
def test_mistake_is_one_line_and_exit_2(name, tmp_path, tiny_model_dir, tiny_run, write_jsonl):
    build, expected = CASES[name]
    setting = Setting(tmp_path, tiny_model_dir, tiny_run, write_jsonl)
    args = build(setting)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = cli(*args, cwd=tmp_path)  # a default output folder would land here, and be seen
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: "), result.stderr
    for fragment in expected:
        assert fragment in lines[0]
    # Nothing lost: every file the user had is still there, unchanged, and no output was made.
    assert {p: p.read_bytes() for p in before} == before
    assert not (tmp_path / "out").is_dir()


def test_a_data_file_with_several_bad_rows_lists_each(tmp_path, write_jsonl):
    rows = [GOOD_ROWS[0], {"prompt": "no answer"}, GOOD_ROWS[1], {"messages": []}]
    result = cli("data", "check", write_jsonl(tmp_path / "d.jsonl", rows))
    errors = [line for line in result.stderr.splitlines() if line.startswith("tunelab: error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(errors) == 2 and "d.jsonl:2: " in errors[0] and "d.jsonl:4: " in errors[1]


def test_a_byte_order_mark_is_accepted_in_jsonl_and_csv(tmp_path):
    from tunelab.data import load as data

    bom = "\ufeff".encode()
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(bom + "\n".join(json.dumps(r) for r in GOOD_ROWS[:2]).encode() + b"\n")
    table = tmp_path / "d.csv"
    table.write_bytes(bom + b"prompt,completion\r\nCountry of Paris? (0),France\r\nCountry of Rome? (0),Italy\r\n")
    for path, first_line in ((jsonl, 1), (table, 2)):
        examples = data.load_examples(path)
        assert [e.line for e in examples] == [first_line, first_line + 1]
        assert examples[0].messages == [{"role": "user", "content": "Country of Paris? (0)"},
                                        {"role": "assistant", "content": "France"}]
    assert cli("data", "check", table).returncode == 0


def test_output_piped_into_head_ends_quietly(tmp_path):
    """`tunelab data check DATA | head -1`: the reader leaves early, which is no error of the user's."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in GOOD_ROWS))
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "data", "check", str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # before the table is printed: the import alone takes longer
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert stderr == ""
