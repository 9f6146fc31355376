"""The documentation runs: every `tunelab ...` command line and every Python snippet that
README.md and docs/*.md show, in the documented form, on a tiny model; and every link between the
pages leads somewhere.

The tiny model takes the place of the default base: `resolve_base("smollm2-135m")` uses
`$TUNELAB_CACHE/models/smollm2-135m` once it holds a config.json, so `tunelab train data.jsonl`
trains it unchanged. Commands run in one working folder that holds the files they name. Forms
with placeholders (DATA, RUN, [--flag]) get concrete values from FORMS below; a form the docs
show and FORMS does not know, or one FORMS knows and the docs no longer show, fails the test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import tunelab
from clirun import run_cli

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`(tunelab [^`]+)`((?:\s*/\s*`--[^`]+`)*)")
PROMPT = "Country of Paris? (0)"


def documented() -> tuple[set[str], list[str]]:
    """(command forms shown in code blocks, indented blocks and inline code, Python snippets)."""
    forms, snippets = set(), []
    for doc in DOCS:
        text = doc.read_text()
        for language, body in FENCE.findall(text):
            if language == "python":
                snippets.append(body)
            else:
                forms |= commands_in(body.splitlines())
        outside = FENCE.sub("", text)
        indented = [line for line in outside.splitlines() if line.startswith("    ")]
        forms |= commands_in(indented)
        for match in INLINE.finditer(outside):
            form = " ".join(match[1].split())
            forms.add(form)
            # `tunelab generate RUN --prompt TEXT` / `--input FILE`: the alternative replaces the
            # last option of the form before it.
            for alternative in re.findall(r"`(--[^`]+)`", match[2]):
                forms.add(re.sub(r" --\S+ \S+$", "", form) + " " + " ".join(alternative.split()))
    return forms, snippets


def commands_in(lines: list[str]) -> set[str]:
    """`tunelab ...` commands, and launchers running `-m tunelab.cli`, comments left out; a line
    may chain several commands with &&."""
    found = set()
    for line in lines:
        for part in line.split("&&"):
            if part.strip().startswith("tunelab ") or " -m tunelab.cli " in part:
                found.add(shlex.join(shlex.split(part, comments=True)))
    return found


@dataclass
class Form:
    """How the test runs one documented form."""

    commands: list[str] = field(default_factory=list)
    """Concrete command lines, run in this order in the shared working folder."""
    twice: bool = False
    """A command a user re-runs (eval, generate, a train with --overwrite): each line runs twice."""
    expect: str = ""
    """Printed on standard output by every line."""
    stdin: str | None = None
    needs_run: bool = True
    """Reads runs/mine, which the README's first command trains."""
    setup: Callable[[Path], None] | None = None
    """Puts the working folder in the state the docs assume, once before the commands."""
    xfail: str | None = None
    gpus: int = 0
    """GPUs the command needs; skipped where there are fewer."""
    skip: str | None = None
    """Why the test cannot run it."""


README_TRAIN = "tunelab train data.jsonl --out runs/mine"
SMALL_DEMO = "--examples 40 --eval-limit 2"
CHAT_INPUT = f"{PROMPT}\n\n"
TRAIN_DONE = "Run saved in"


def crashed_run(workdir: Path) -> None:
    """runs/crashed as a crash after the checkpoint of step 2 leaves it: no final weights."""
    line = "tunelab train data.jsonl --out runs/crashed --save-every 1 --max-steps 3"
    assert_worked(run_line(workdir, line), line, TRAIN_DONE)
    shutil.rmtree(workdir / "runs" / "crashed" / "adapter")
    shutil.rmtree(workdir / "runs" / "crashed" / "checkpoints" / "step-000003")


def other_run(workdir: Path) -> None:
    """runs/other: a second run, with other settings, to compare with runs/mine."""
    line = "tunelab train data.jsonl --out runs/other --max-steps 2 --lr 0.01 --overwrite"
    assert_worked(run_line(workdir, line), line, TRAIN_DONE)


def orders_file(workdir: Path) -> None:
    """orders.jsonl: the country task, each row's metadata naming the customer who asked it."""
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    (workdir / "orders.jsonl").write_text("".join(
        json.dumps({**row, "metadata": {"customer": f"customer-{i % 8}"}}) + "\n" for i, row in enumerate(rows)))


def bookings_file(workdir: Path) -> None:
    """runs/demo-data/bookings.jsonl as `tunelab demo` writes it, 60 rows of it."""
    from tunelab.demo import write_dataset

    write_dataset(workdir / "runs" / "demo-data" / "bookings.jsonl", 60)


def people_file(workdir: Path) -> None:
    """runs/gen-data/people/train.jsonl as benchmarks/generalisation.py writes it: rows in entity groups."""
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    (workdir / "runs" / "gen-data" / "people").mkdir(parents=True, exist_ok=True)
    (workdir / "runs" / "gen-data" / "people" / "train.jsonl").write_text("".join(
        json.dumps({**row, "metadata": {"group": f"g{i % 8}"}}) + "\n" for i, row in enumerate(rows)))


def evaluated(workdir: Path) -> None:
    """runs/mine/eval.json, of the run's held-out split (a form with --data may have evaluated another file)."""
    results = workdir / "runs" / "mine" / "eval.json"
    if not results.exists() or json.loads(results.read_text()).get("data") != "runs/mine/test.jsonl":
        assert_worked(run_line(workdir, "tunelab eval runs/mine"), "tunelab eval runs/mine", "exact match")


REVIEW = "tunelab data review --run runs/mine"
REVIEW_INPUT = "a\nt\nThe country is France\n.\nf\nA fixed reference\n.\ns\n"
"""Accept a reference, type an answer, fix a reference, skip (the tiny model answers all 4 held-out rows wrong)."""


def reviewed(workdir: Path) -> None:
    """runs/mine/corrections.jsonl, from reviewing the wrong answers of runs/mine."""
    evaluated(workdir)
    if not (workdir / "runs" / "mine" / "corrections.jsonl").exists():
        assert_worked(run_line(workdir, REVIEW, REVIEW_INPUT), REVIEW, "corrected")


def corrected_run(workdir: Path) -> None:
    """runs/corrected: trained with the corrections of runs/mine."""
    line = "tunelab train data.jsonl --data-extra runs/mine/corrections.jsonl --out runs/corrected --overwrite"
    reviewed(workdir)
    if not (workdir / "runs" / "corrected" / "run.json").exists():
        assert_worked(run_line(workdir, line), line, TRAIN_DONE)


def extra_file(workdir: Path) -> None:
    """extra.jsonl: two chat rows to train besides data.jsonl."""
    (workdir / "extra.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Country of {city}?"}, {"role": "assistant", "content": country}]}) + "\n"
        for city, country in (("Bern", "Switzerland"), ("Kyiv", "Ukraine"))))


def prefs_file(workdir: Path) -> None:
    """prefs.jsonl: the country task as pairs, each row's answer chosen over the next row's."""
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    (workdir / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": row["prompt"], "chosen": row["completion"], "rejected": other["completion"]}) + "\n"
        for row, other in zip(rows, rows[1:] + rows[:1]) if row["completion"] != other["completion"]))


FORMS: dict[str, Form | None] = {
    # README, the walk-through (its report line is with docs/REPORT.md's below)
    "tunelab data check data.jsonl": Form(["tunelab data check data.jsonl"], twice=True, needs_run=False,
                                          expect="Data check of data.jsonl"),
    README_TRAIN: Form(),  # run once by the fixture readme_run
    "tunelab eval runs/mine": Form(["tunelab eval runs/mine"], twice=True, expect="exact match"),
    "tunelab chat runs/mine": Form(["tunelab chat runs/mine"], twice=True, stdin=CHAT_INPUT, expect="model> "),
    "tunelab generate runs/mine --input prompts.jsonl": Form(
        ["tunelab generate runs/mine --input prompts.jsonl"], twice=True, expect='"answer"'),
    "tunelab export runs/mine --format ollama --out exports/mine": Form(  # an existing --out is refused: once
        ["tunelab export runs/mine --format ollama --out exports/mine"], expect="ollama create"),
    # the set-up line, after pip installs the package; small flags keep it short on the tiny model
    "tunelab demo": Form([f"tunelab demo {SMALL_DEMO} --max-steps 2"], needs_run=False, expect="Wall time"),
    # README, the pipeline table
    "tunelab data check DATA [--base MODEL]": Form(
        ["tunelab data check data.jsonl", "tunelab data check data.jsonl --base smollm2-135m"], twice=True,
        needs_run=False, expect="Data check of data.jsonl"),
    "tunelab train DATA [--config FILE.yaml] [flags]": Form(
        ["tunelab train data.jsonl --config train.yaml --max-steps 2 --lr 0.01 --out runs/configured --overwrite"],
        twice=True, needs_run=False, expect=TRAIN_DONE),
    "tunelab eval RUN": Form(["tunelab eval runs/mine"], twice=True, expect="exact match"),
    "tunelab eval RUN [--data FILE] [--shots K] [--contender NAME=URL#MODEL]": Form(
        ["tunelab eval runs/mine --shots 2"], twice=True, expect="exact match"),
    # docs/EVALUATION.md
    **{form: Form(skip="run in exactly this form by tests/test_evaluate.py (files and a loopback endpoint it makes)")
       for form in ("tunelab eval RUN --shots 2 --assertions checks.yaml",
                    "tunelab eval RUN --data harder.jsonl --no-base",
                    "tunelab eval RUN --no-base --contender big=http://localhost:8000/v1",
                    "tunelab eval RUN --no-base --assertions check.py --forgetting questions.jsonl")},
    "tunelab generate RUN --prompt TEXT": Form([f"tunelab generate runs/mine --prompt {shlex.quote(PROMPT)}"],
                                              twice=True),
    "tunelab generate RUN --input FILE": Form(
        ["tunelab generate runs/mine --input prompts.jsonl"], twice=True, expect='"answer"'),
    "tunelab chat RUN": Form(["tunelab chat runs/mine"], stdin=CHAT_INPUT, expect="model> "),
    # docs/SERVE.md, generate and chat
    "tunelab generate RUN --input FILE [--output FILE]": Form(
        ["tunelab generate runs/mine --input prompts.jsonl --output answers.jsonl"]),
    # docs/DATA.md, the data check
    "tunelab data check DATA [--base MODEL] [--test-size F] [--max-length N] [--truncation drop|truncate|error] "
    "[--out DIR]": Form(
        [f"tunelab data check data.jsonl --base smollm2-135m --test-size 0.2 --max-length 64 --truncation {policy} "
         f"--out checked-{policy}" for policy in ("drop", "truncate", "error")],
        needs_run=False, expect="Data check of data.jsonl"),
    "tunelab train --help": Form(["tunelab train --help"], needs_run=False, expect="--max-steps"),
    # docs/DATA.md, learning from corrections: eval, review the wrong answers, train on the corrections
    **{form: Form([REVIEW], twice=True, stdin=REVIEW_INPUT, setup=evaluated, expect="Reviewed all")
       for form in (REVIEW, "tunelab data review --run RUN")},
    "tunelab train data.jsonl --data-extra runs/mine/corrections.jsonl --out runs/corrected": Form(
        ["tunelab train data.jsonl --data-extra runs/mine/corrections.jsonl --out runs/corrected"],
        setup=reviewed, expect=TRAIN_DONE),
    "tunelab eval runs/corrected": Form(["tunelab eval runs/corrected"], setup=corrected_run, expect="exact match"),
    "tunelab eval runs/mine --data runs/corrected/test.jsonl": Form(
        ["tunelab eval runs/mine --data runs/corrected/test.jsonl"], setup=corrected_run, expect="exact match"),
    "tunelab train DATA --data-extra FILE": Form(["tunelab train data.jsonl --data-extra extra.jsonl --out runs/extra"],
                                                 needs_run=False, setup=extra_file, expect=TRAIN_DONE),
    # docs/DATA.md, --split-by, on rows whose metadata names a customer
    "tunelab data check orders.jsonl --split-by metadata.customer": Form(
        ["tunelab data check orders.jsonl --split-by metadata.customer"], twice=True, needs_run=False,
        setup=orders_file, expect="--split-by metadata.customer: "),
    "tunelab train orders.jsonl --split-by metadata.customer --out runs/by-customer": Form(
        ["tunelab train orders.jsonl --split-by metadata.customer --out runs/by-customer"], needs_run=False,
        setup=orders_file, expect=TRAIN_DONE),
    # docs/TRAINING.md, preference tuning on pairs
    "tunelab train prefs.jsonl --objective dpo --out runs/dpo": Form(
        ["tunelab train prefs.jsonl --objective dpo --out runs/dpo"], needs_run=False, setup=prefs_file,
        expect=TRAIN_DONE),
    # docs/TRAINING.md, after a crash: a run with checkpoints whose training stopped before its final save
    "tunelab train DATA --out RUN --resume": Form(
        ["tunelab train data.jsonl --out runs/crashed --resume"], needs_run=False, expect=TRAIN_DONE,
        setup=crashed_run),
    # docs/TRAINING.md, when to stop
    "tunelab train data.jsonl --out runs/best --early-stopping 3 --keep-best": Form(
        ["tunelab train data.jsonl --out runs/best --early-stopping 3 --keep-best"], needs_run=False,
        expect="(--keep-best)"),
    # docs/REPORT.md
    "tunelab report runs/mine": Form(["tunelab report runs/mine"], twice=True,
                                     expect="Report written to runs/mine/report.html"),
    "tunelab report runs/mine runs/other": Form(["tunelab report runs/mine runs/other"], twice=True,
                                                expect="Report written to comparison.html", setup=other_run),
    "tunelab report runs/mine runs/other --out runs/compare.html": Form(
        ["tunelab report runs/mine runs/other --out runs/compare.html"], twice=True,
        expect="Report written to runs/compare.html", setup=other_run),
    # export: the README table's form (every format and dtype), then each line of docs/EXPORT.md; an
    # existing --out is refused, so none is run twice
    "tunelab export RUN --format merged\\|gguf\\|ollama --out DIR [--dtype f32\\|f16\\|q8_0]": Form(
        ["tunelab export runs/mine --format merged --out exports/merged",
         "tunelab export runs/mine --format ollama --out exports/ollama"]
        + [f"tunelab export runs/mine --format gguf --out exports/gguf-{d} --dtype {d}"
           for d in ("f32", "f16", "q8_0")]),
    "tunelab export RUN --format merged --out DIR": Form(
        ["tunelab export runs/mine --format merged --out exports/merged"]),
    "tunelab export RUN --format merged --out DIR --dtype f16": Form(
        ["tunelab export runs/mine --format merged --out exports/merged-f16 --dtype f16"]),
    "tunelab export RUN --format ollama --out DIR": Form(
        ["tunelab export runs/mine --format ollama --out exports/ollama"]),
    **{f"tunelab export RUN --format gguf --out DIR --dtype {d}": Form(
        [f"tunelab export runs/mine --format gguf --out exports/gguf-{d} --dtype {d}"])
       for d in ("f16", "f32", "q8_0")},
    # docs/TEACHER.md: they call a teacher model's server (tests/test_teacher.py runs them against one)
    **{form: Form(skip="needs an OpenAI-compatible teacher server at 127.0.0.1:8080") for form in (
        "tunelab data label tickets.txt --teacher http://127.0.0.1:8080/v1 --model qwen2.5-7b-instruct "
        "--json-schema schema.json --concurrency 8 --out fields.jsonl",
        "tunelab data label tickets.txt --teacher http://127.0.0.1:8080/v1 --model qwen2.5-7b-instruct "
        "--system 'Summarise the ticket in one sentence.' --examples shots.jsonl --out labels.jsonl",
        "tunelab data synth --examples shots.jsonl --n 1000 --teacher http://127.0.0.1:8080/v1 "
        "--model qwen2.5-7b-instruct --out synth.jsonl",
        "tunelab data review labels.jsonl --out reviewed.jsonl")},
    # docs/SERVE.md: a server runs until stopped; tests/test_serve.py starts each of these forms and talks to it
    **{form: Form(skip="a server that runs until stopped: tests/test_serve.py runs this form") for form in (
        "tunelab serve runs/bookings runs/support --port 8000 --api-key sk-local-123",
        "tunelab serve runs/bookings --port 8000 --max-queue 1",
        "tunelab serve runs/bookings --port 8000 --rules rules.yaml")},
    # docs/UI.md: a server that runs until stopped; tests/test_ui.py starts `tunelab ui` (a port in use, a login
    # link off loopback) and tests/test_ui_e2e.py drives its app on a real server and in a browser
    **{form: Form(skip="a server that runs until stopped: tests/test_ui.py and tests/test_ui_e2e.py run it")
       for form in ("tunelab ui --runs runs --data data --port 7860 --jobs 1",
                    "tunelab ui --host 0.0.0.0 --api-key KEY")},
    # docs/DEMO.md: a second demo into the same folder, as a user re-runs it with more steps
    "tunelab demo --max-steps 135": Form([f"tunelab demo {SMALL_DEMO} --max-steps 3"], needs_run=False,
                                         expect="Wall time"),
    # docs/BENCHMARKS.md
    "tunelab data check FILE --out DIR": Form(["tunelab data check data.jsonl --out report"], twice=True,
                                              needs_run=False, expect="Report saved in report"),
    # docs/MULTI_GPU.md
    "accelerate launch --config_file examples/accelerate/ddp.yaml -m tunelab.cli train data.jsonl --out runs/mine":
        Form(["accelerate launch --config_file examples/accelerate/ddp.yaml -m tunelab.cli train data.jsonl "
              "--out runs/multi-gpu"], needs_run=False, gpus=8),  # num_processes in ddp.yaml
    "accelerate launch --multi_gpu --num_processes 2 -m tunelab.cli train data.jsonl --batch-size 4": Form(
        ["accelerate launch --multi_gpu --num_processes 2 -m tunelab.cli train data.jsonl --batch-size 4"],
        needs_run=False, expect=TRAIN_DONE),
    "torchrun --nproc_per_node 2 -m tunelab.cli train data.jsonl --batch-size 4": Form(
        ["torchrun --nproc_per_node 2 -m tunelab.cli train data.jsonl --batch-size 4"],
        needs_run=False, expect=TRAIN_DONE),
    # docs/ITERATE.md and the README's table: small sizes and few steps on the 40-row data; each runs twice, as
    # a stopped curve or sweep is run again (the second reuses every run)
    **{form: Form(["tunelab curve data.jsonl --sizes 8,16 --out runs/curve --max-steps 2"], twice=True,
                  needs_run=False, expect="Curve saved in runs/curve/curve.json")
       for form in ("tunelab curve data.jsonl --sizes 100,200,400,800 --out runs/curve",
                    "tunelab curve DATA [--sizes N,N,...] [flags]")},
    **{form: Form(["tunelab sweep data.jsonl --grid lr=3e-4,1e-3 --grid lora_rank=8 --budget-minutes 60 "
                   "--out runs/sweep --max-steps 2"], twice=True, needs_run=False, expect="winner: ")
       for form in ("tunelab sweep data.jsonl --grid lr=3e-4,1e-3,3e-3 --grid lora_rank=8,32 --budget-minutes 60 "
                    "--out runs/sweep", "tunelab sweep DATA --grid KEY=V1,V2 [--budget-minutes N] [flags]")},
    "tunelab curve data.jsonl --config train.yaml --sizes 100,200,400,800 --out runs/curve": Form(
        ["tunelab curve data.jsonl --config train.yaml --sizes 8,16 --out runs/curve-configured --max-steps 2"],
        needs_run=False, expect="Curve saved in runs/curve-configured/curve.json"),
    "tunelab curve runs/demo-data/bookings.jsonl --sizes 50,100,200,400,800 --method full --max-steps 50 "
    "--max-length 256 --split-by metadata.name_pool --out runs/bookings-curve": Form(
        ["tunelab curve runs/demo-data/bookings.jsonl --sizes 16,32 --method full --max-steps 2 --max-length 256 "
         "--split-by metadata.name_pool --out runs/bookings-curve"], needs_run=False, setup=bookings_file,
        expect="Curve saved in runs/bookings-curve/curve.json"),
    "tunelab curve runs/gen-data/people/train.jsonl --sizes 50,100,200,400 --max-steps 40 --split-by metadata.group "
    "--out runs/people-curve": Form(
        ["tunelab curve runs/gen-data/people/train.jsonl --sizes 8,16 --max-steps 2 --split-by metadata.group "
         "--out runs/people-curve"], needs_run=False, setup=people_file,
        expect="Curve saved in runs/people-curve/curve.json"),
    "tunelab train DATA --train-examples N": Form(
        ["tunelab train data.jsonl --train-examples 8 --max-steps 2 --out runs/eight --overwrite"], needs_run=False,
        expect=TRAIN_DONE),
    # docs/ITERATE.md, the measured sweep: the same grid on 16 examples of the demo's bookings, 2 steps a run
    "tunelab sweep runs/demo-data/bookings.jsonl --grid lr=2e-5,1e-4,5e-4 --method full --max-steps 50 "
    "--max-length 256 --split-by metadata.name_pool --train-examples 200 --out runs/lr-sweep": Form(
        ["tunelab sweep runs/demo-data/bookings.jsonl --grid lr=2e-5,1e-4,5e-4 --method full --max-steps 2 "
         "--max-length 256 --split-by metadata.name_pool --train-examples 16 --out runs/lr-sweep"],
        needs_run=False, setup=bookings_file, expect="winner: "),
    # docs/TRAINING.md, the measured overfitting run: the same flags on 16 examples of the demo's bookings
    "tunelab train runs/demo-data/bookings.jsonl --method full --train-examples 200 --epochs 5 --lr 5e-4 "
    "--early-stopping 3 --keep-best --max-length 256 --split-by metadata.name_pool --out runs/early": Form(
        ["tunelab train runs/demo-data/bookings.jsonl --method full --train-examples 16 --epochs 1 --lr 5e-4 "
         "--early-stopping 3 --keep-best --max-length 256 --split-by metadata.name_pool --out runs/early"],
        needs_run=False, setup=bookings_file, expect=TRAIN_DONE),
    # Names of commands in running text, not command lines: each must be a command that exists.
    "tunelab train": None,
    "tunelab eval": None,
    "tunelab eval --shots 3": None,
    "tunelab generate": None,
    "tunelab data label": None,
    "tunelab data review": None,
    "tunelab data synth": None,
    "tunelab data check": None,
    "tunelab eval/generate/chat": None,
    "tunelab report": None,
    "tunelab serve": None,
    "tunelab ui": None,
    "tunelab curve": None,
    "tunelab sweep": None,
}


def test_the_docs_show_exactly_the_forms_this_test_runs():
    forms, snippets = documented()
    assert sorted(forms - FORMS.keys()) == [], "documented command forms this test does not run: add them to FORMS"
    assert sorted(FORMS.keys() - forms) == [], "FORMS lists commands the docs no longer show"
    assert len(snippets) >= 1


@pytest.mark.parametrize("form", [form for form, how in FORMS.items() if how is None])
def test_a_command_named_in_the_text_exists(form, capsys):
    from tunelab.cli import build_parser

    words = form.split()[1:]
    for name in words[-1].split("/"):
        with pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*words[:-1], name, "--help"])
        assert exited.value.code == 0, name
    capsys.readouterr()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model_dir, pairs_file, write_jsonl) -> Path:
    """A working folder with the files the docs name, and a cache whose smollm2-135m is the tiny model."""
    folder = tmp_path_factory.mktemp("docs")
    shutil.copytree(tiny_model_dir, folder / "cache" / "models" / "smollm2-135m")
    work = folder / "work"
    work.mkdir()
    shutil.copy(pairs_file, work / "data.jsonl")
    write_jsonl(work / "prompts.jsonl", [{"prompt": PROMPT}, {"prompt": "Country of Rome? (1)"}])
    (work / "train.yaml").write_text("method: full\nlr: 0.001\nmax_steps: 3\nbatch_size: 4\n")
    return work


@pytest.fixture(scope="module")
def readme_run(workdir) -> subprocess.CompletedProcess:
    """The README's first command, run once: it trains runs/mine, which most other commands read."""
    return run_line(workdir, README_TRAIN)


@pytest.fixture(scope="module")
def ran() -> dict[tuple[str, int], subprocess.CompletedProcess]:
    """(line, first or second run) -> its result: forms that come down to the same line share it."""
    return {}


def environment(workdir: Path) -> dict[str, str]:
    src = str(Path(tunelab.__file__).parents[1])
    pythonpath = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TUNELAB_CACHE": str(workdir.parent / "cache"), "PYTHONPATH": pythonpath}


CONSOLE_SCRIPTS = {"tunelab": "tunelab.cli", "accelerate": "accelerate.commands.launch",
                   "torchrun": "torch.distributed.run"}
"""The modules behind the commands the docs use: console scripts are not on PATH in an
unactivated virtual environment, `python -m` runs wherever the tests run."""


def run_line(workdir: Path, line: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    words = shlex.split(line)
    if words[0] == "tunelab":  # in this process: a new one would first spend seconds importing torch
        return run_cli(*words[1:], cwd=workdir, env=environment(workdir), stdin=stdin)
    if words[:2] == ["accelerate", "launch"]:  # the module is the launch sub-command itself
        words = ["accelerate", *words[2:]]
    words = [sys.executable, "-m", CONSOLE_SCRIPTS[words[0]], *words[1:]]
    return subprocess.run(words, cwd=workdir, env=environment(workdir), input=stdin, capture_output=True,
                          text=True, timeout=600)


def assert_worked(result: subprocess.CompletedProcess, line: str, expect: str) -> None:
    if result.returncode == 2 and "not available yet" in result.stderr:
        pytest.skip(f"{line}: the feature is not built yet")
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, f"{line}\n{result.stderr[-3000:]}"
    assert expect in result.stdout, f"{line}\n{result.stdout[-3000:]}"


RUNNABLE = [pytest.param(form, marks=pytest.mark.xfail(reason=how.xfail, strict=False)) if how.xfail else form
            for form, how in FORMS.items() if how is not None]


@pytest.mark.slow
@pytest.mark.parametrize("form", RUNNABLE)
def test_a_documented_command_runs(form, workdir, ran, request):
    how = FORMS[form]
    if how.skip:
        pytest.skip(how.skip)
    if how.gpus:
        import torch

        if torch.cuda.device_count() < how.gpus:
            pytest.skip(f"needs {how.gpus} GPUs")
    if how.needs_run:
        assert_worked(request.getfixturevalue("readme_run"), README_TRAIN, "Run saved in runs/mine")
    if how.setup:
        how.setup(workdir)
    for line in how.commands:
        for attempt in range(2 if how.twice else 1):
            if (line, attempt) not in ran:
                ran[line, attempt] = run_line(workdir, line, how.stdin)
            assert_worked(ran[line, attempt], line, how.expect)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(documented()[1])))
def test_a_documented_python_snippet_runs(index, workdir, tmp_path):
    """Each snippet runs as written, in a folder of its own holding data.jsonl."""
    snippet = documented()[1][index]
    shutil.copy(workdir / "data.jsonl", tmp_path / "data.jsonl")
    (tmp_path / "snippet.py").write_text(snippet)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=environment(workdir),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_error_code_is_listed_in_the_docs():
    codes = {code for path in (ROOT / "src" / "tunelab").rglob("*.py")
             for code in re.findall(r"(?<!\.)\b[EW]_[A-Z][A-Z0-9_]*\b", path.read_text())}  # not os.W_OK
    docs = "".join(doc.read_text() for doc in DOCS)
    assert len(codes) > 20
    assert sorted(code for code in codes if f"`{code}`" not in docs) == []


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PLANNED = {ROOT / "docs" / "CLI.md"}
"""Pages the docs link to that another change adds (docs/CLI.md, generated from --help): their
links are let through while the page is absent, and checked like any other once it is there."""


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page: lower case, punctuation but - and _
    dropped, spaces as -."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def links() -> list[tuple[Path, str]]:
    """(page, target) for every Markdown link of README.md and docs/*.md to a local file or anchor."""
    return [(doc, target) for doc in DOCS for target in LINK.findall(FENCE.sub("", doc.read_text()))
            if not re.match(r"[a-z]+:", target)]


def test_every_local_link_leads_to_a_file_and_heading():
    assert len(links()) > 30
    broken = []
    for doc, target in links():
        path, _, anchor = target.partition("#")
        page = (doc.parent / path).resolve() if path else doc
        if page in PLANNED and not page.exists():
            continue
        if not page.exists() or (anchor and anchor not in anchors(page)):
            broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for doc, target in links() if doc.name == "README.md"}
    assert [page.name for page in DOCS[1:] if page not in linked] == []
