"""The `tunelab` command: one sub-command per pipeline stage.

Each command is a function and one typed options model (`COMMANDS`, at the end): its flags are
built from the model's fields (`add_flags`), so a default, a choice or a bound is written once
and the model validates what the flags give. Shared options live in config.py; the rest beside
their command. Heavy libraries are imported inside the functions that need them, so `--help` is
instant. A UserError (bad data, path or flag) prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import types
import typing
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic_core import PydanticUndefined

from tunelab.config import (
    Arg,
    ComputeOptions,
    DataOptions,
    EndpointAccess,
    GenerationOptions,
    Method,
    Options,
    RunFolder,
    TeacherOptions,
    TrainConfig,
)
from tunelab.errors import UserError, check_output_file, check_output_folder, hide_known_warnings
from tunelab.serve.options import ServeOptions
from tunelab.ui.options import UIOptions


class DemoOptions(ComputeOptions):
    out: str = "runs/demo"
    """run folder"""
    examples: int = Field(1200, ge=1)
    """examples to generate"""
    method: Method = "full"
    """fine-tuning method"""
    max_steps: int = Field(100, ge=1)
    """optimizer steps of 8 examples (100 take about 6 minutes on 2 CPU cores)"""
    eval_limit: int = Field(100, ge=1)
    """held-out examples to evaluate"""


def cmd_demo(o: DemoOptions) -> None:
    from tunelab.demo import run_demo

    run_demo(Path(o.out), examples=o.examples, method=o.method, max_steps=o.max_steps, eval_limit=o.eval_limit,
             threads=o.threads)


class DataCheckOptions(Options):
    data: Annotated[str, Arg(positional=True)]
    """JSONL, CSV or Parquet file"""
    base: str | None = None
    """also run the token-level checks with this base model's tokenizer and template"""
    out: str | None = None
    """save the report here (data_check.json, length histogram)"""


def cmd_data_check(o: DataCheckOptions, flags: dict[str, Any]) -> None:
    from tunelab.data.check import cli_check

    if o.out:
        check_output_folder(Path(o.out), "--out")
    options = DataOptions.build(flags=flags, **flags)
    cli_check(Path(o.data), options, o.base, Path(o.out) if o.out else None)


def teacher_from_options(o: TeacherOptions, shots: str | None):
    from tunelab.teacher.ask import Teacher
    from tunelab.teacher.label import read_shots
    from tunelab.teacher.schema import read_schema

    return Teacher(url=o.teacher, model=o.model, system=o.system,
                   shots=read_shots(Path(shots)) if shots else [],
                   schema=read_schema(Path(o.json_schema)) if o.json_schema else None,
                   concurrency=o.concurrency, timeout=o.timeout, retries=o.retries)


def api_key_from_options(o: EndpointAccess) -> str | None:
    from tunelab.client import api_key

    return api_key(o.api_key_env, Path(o.api_key_file) if o.api_key_file else None)


class LabelOptions(TeacherOptions):
    inputs: Annotated[str, Arg(positional=True)]
    """a .txt file (one input per line), or JSONL, CSV or Parquet rows in any accepted shape (answers not needed)"""
    examples: Annotated[str | None, Arg(metavar="FILE")] = None
    """few-shot examples: rows with answers"""


def cmd_data_label(o: LabelOptions) -> None:
    from tunelab.teacher.label import cli_label

    cli_label(Path(o.inputs), teacher_from_options(o, o.examples), Path(o.out), o.allow_remote, api_key_from_options(o))


class SynthOptions(TeacherOptions):
    examples: Annotated[str, Arg(metavar="FILE")]
    """example inputs (.txt, one per line, or data rows; rows with answers also serve as few-shot examples for
    labelling)"""
    n: int = Field(ge=1)
    """number of new inputs to write and label"""
    seed: int = Field(0, ge=0)
    """seed for the examples shown in each request"""


def cmd_data_synth(o: SynthOptions) -> None:
    from tunelab.teacher.synth import cli_synth

    # synth's --examples are inputs; cli_synth makes their answers, if they have any, few-shot examples.
    cli_synth(Path(o.examples), o.n, teacher_from_options(o, None), Path(o.out), o.allow_remote, o.seed,
              api_key_from_options(o))


class ReviewOptions(Options):
    file: Annotated[str | None, Arg(positional=True)] = None
    """data file of pairs (e.g. the output of `tunelab data label`)"""
    out: Annotated[str | None, Arg(metavar="FILE")] = None
    """reviewed training file to write (.jsonl)"""
    run: Annotated[str | None, Arg(metavar="RUN")] = None
    """instead of a file: review the wrong answers of this run's eval, writing RUN/corrections.jsonl and
    RUN/fixes.jsonl"""


def cmd_data_review(o: ReviewOptions) -> None:
    from tunelab.data.review import cli_review, cli_review_run

    if o.run:
        if o.file or o.out:
            raise UserError("--run reviews a run's wrong answers and writes into the run; drop FILE and --out")
        cli_review_run(Path(o.run))
        return
    if not o.file or not o.out:
        raise UserError("pass a FILE of pairs and --out FILE, or --run RUN to review a run's wrong answers")
    cli_review(Path(o.file), Path(o.out))


class TrainOptions(ComputeOptions):
    """What `tunelab train` takes besides the TrainConfig (whose flags it also has)."""

    data: Annotated[str, Arg(positional=True)]
    """JSONL, CSV or Parquet file of examples"""
    out: str | None = None
    """run folder (default: runs/<data>-<time>)"""
    config: str | None = None
    """YAML file of the options below; flags override it"""
    overwrite: bool = False
    """replace a run already in --out"""
    resume: bool = False
    """continue the run in --out from its newest complete checkpoint (see --save-every); options not given are
    those of the run"""
    force: bool = False
    """with --resume: continue even though the data or options changed since the checkpoint"""


def cmd_train(o: TrainOptions, flags: dict[str, Any]) -> None:
    if o.resume and not o.out:
        raise UserError("--resume needs --out RUN, the run folder to continue")
    # A resumed run starts from its own options; flags given now override them (and are checked).
    saved = Path(o.out) / "config.yaml" if o.resume else None
    config_file = o.config or (saved if saved and saved.exists() else None)
    # Checked before training's heavy imports, so a mistyped option fails at once.
    config = TrainConfig.from_yaml(config_file, **flags) if config_file else TrainConfig.build(flags=flags, **flags)
    from tunelab.train.loop import default_out, finished, is_main_process, train

    out = Path(o.out) if o.out else default_out(Path(o.data))
    if o.resume and not o.overwrite and (line := finished(config, Path(o.data), out)):
        print(line)  # the one line: there is no new run to announce
        return
    train(config, Path(o.data), out, overwrite=o.overwrite, resume=o.resume, force=o.force, threads=o.threads)
    if is_main_process():
        print(f"Run saved in {out}. Next: tunelab eval {out}")


class EvalOptions(EndpointAccess, GenerationOptions):
    run: RunFolder
    data: str | None = None
    """evaluate this labelled file (any accepted shape) instead of the run's held-out split"""
    limit: int | None = Field(None, ge=1)
    """evaluate only the first N examples"""
    shots: int = Field(3, ge=0)
    """training examples in the few-shot and retrieval prompts; 0 skips both"""
    no_retrieval: bool = False
    """skip the retrieval contender"""
    no_base: bool = False
    """skip the base model's contenders"""
    contender: Annotated[list[str], Arg(metavar="NAME=URL[#MODEL]")] = []
    """also ask a model behind an OpenAI-compatible endpoint (repeatable)"""
    contender_model: str | None = None
    """model name for contenders whose URL has no #MODEL"""
    assertions: Annotated[str | None, Arg(metavar="FILE")] = None
    """YAML rules (regex, must_contain, must_not_contain, json_schema) or a Python file with check(prompt, answer),
    applied to every answer"""
    forgetting: Annotated[str | None, Arg(metavar="FILE")] = None
    """multiple-choice JSONL for the forgetting check (default: the bundled questions)"""
    no_forgetting: bool = False
    """skip the forgetting check"""
    judge: Annotated[str | None, Arg(metavar="URL[#MODEL]")] = None
    """grade answers against references with a model behind an OpenAI-compatible endpoint"""
    judge_model: str | None = None
    """model name for --judge when its URL has no #MODEL"""
    max_new_tokens: int | None = Field(None, ge=1)
    """token limit per answer (default: 1.5 times the longest reference, at most 512)"""
    batch_size: int = Field(32, ge=1)
    """prompts per batch"""


def cmd_eval(o: EvalOptions) -> None:
    from tunelab.evaluate.core import format_report
    from tunelab.evaluate.endpoint import Endpoint
    from tunelab.evaluate.forgetting import DEFAULT_QUESTIONS
    from tunelab.report.html import write_report
    from tunelab.run import Run

    key = api_key_from_options(o) if o.contender or o.judge else None
    endpoints = [Endpoint.contender(spec, o.contender_model, key) for spec in o.contender]
    names = [e.name for e in endpoints]
    taken = [n for n in names if names.count(n) > 1 or n in ("zero-shot", "few-shot", "retrieval", "tuned")]
    if taken:
        raise UserError(f"--contender {taken[0]}=...: the name is already taken; choose another NAME")
    judge = Endpoint.judge(o.judge, o.judge_model, key) if o.judge else None
    for endpoint in [*endpoints, *([judge] if judge else [])]:
        endpoint.check(o.allow_remote)
    run = Run(o.run, o.precision, o.device, o.threads)
    check_output_file(run.files.eval, "the results file")  # written at the end: check before the work
    results = run.evaluate(
        limit=o.limit, include_base=not o.no_base, max_new_tokens=o.max_new_tokens,
        batch_size=o.batch_size, data=Path(o.data) if o.data else None, shots=o.shots,
        retrieval=not o.no_retrieval, endpoints=endpoints, assertions=o.assertions and Path(o.assertions),
        forgetting=None if o.no_forgetting else Path(o.forgetting or DEFAULT_QUESTIONS), judge=judge,
        copy_constraint=not o.no_copy_constraint,
    )
    print(format_report(results))
    print(f"\nResults saved in {run.files.eval}; report written to {write_report(run.path)}")


class ReportOptions(Options):
    runs: Annotated[list[str], Arg(positional=True, metavar="RUN")]
    """run folder(s)"""
    out: str | None = None
    """HTML file to write (default: RUN/report.html for one run; for several, comparison.html in the current
    folder, each run's report.html rebuilt too)"""


def cmd_report(o: ReportOptions) -> None:
    from tunelab.report.html import COMPARISON_FILE, write_comparison, write_report

    runs, out = [Path(run) for run in o.runs], Path(o.out) if o.out else None
    path = write_report(runs[0], out) if len(runs) == 1 else write_comparison(runs, out or Path(COMPARISON_FILE))
    for run in runs:
        if not (run / "eval.json").exists():
            print(f"tunelab: note: {run} has no eval.json, so its report shows training and data only; "
                  f"run `tunelab eval {run}` for the rest", file=sys.stderr)
    print(f"Report written to {path}")


class GenerateOptions(GenerationOptions):
    run: RunFolder
    prompt: str | None = None
    """one prompt"""
    input: str | None = None
    """a .txt file (one prompt per line), or JSONL, CSV or Parquet rows in any accepted shape"""
    output: str | None = None
    """write JSON lines here instead of standard output"""
    max_new_tokens: int = Field(256, ge=1)
    """token limit per answer"""


def cmd_generate(o: GenerateOptions) -> None:
    """Answers go out one JSON line each, in input order, as soon as they are made, so an
    interrupted run keeps every answer written; every path is checked before the model loads."""
    from tunelab.run import Run
    from tunelab.runfolder import RunFiles
    from tunelab.teacher.label import read_inputs

    if (o.prompt is None) == (o.input is None):
        raise UserError("tunelab generate: pass exactly one of --prompt TEXT or --input FILE")
    if o.prompt is not None and not o.prompt.strip():
        raise UserError("tunelab generate: --prompt is empty; give the text to answer")
    if o.output is not None:
        if o.input is None:
            raise UserError("--output goes with --input FILE; the answer to --prompt is printed")
        check_output_file(Path(o.output), "--output")
        if Path(o.output).resolve() == Path(o.input).resolve():
            raise UserError(f"--output {o.output}: is the --input file; choose another --output")
    RunFiles(Path(o.run)).check()
    # A .txt file holds one prompt per line, as for `tunelab data label`.
    inputs = read_inputs(Path(o.input)) if o.input is not None else []
    run = Run(o.run, o.precision, o.device, o.threads)
    if o.prompt is not None:
        print(run.generate(o.prompt, max_new_tokens=o.max_new_tokens, copy_constraint=not o.no_copy_constraint))
        return
    from tunelab.decoding.generate import generate_answers

    answers = generate_answers(run.model(), run.template, (conversation for _, conversation in inputs),
                               max_new_tokens=o.max_new_tokens, copying=run.copy_rule(not o.no_copy_constraint),
                               precision=run.precision)
    write_answers([line for line, _ in inputs], answers, Path(o.output) if o.output else None)


@contextlib.contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so that a line and its count are never split: a Ctrl-C
    inside the block is raised as KeyboardInterrupt right after it."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets Ctrl-C
        yield
        return
    pressed: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: pressed.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def write_answers(lines: list[int], answers, output: Path | None) -> None:
    """Write each answer as one JSON line as soon as it comes, with a progress bar on standard
    error; on Ctrl-C, say how far it got."""
    from tqdm.auto import tqdm

    where = str(output) if output else "standard output"
    out = output.open("w", encoding="utf-8") if output else sys.stdout
    bar = tqdm(total=len(lines), desc="generating", unit="answer", file=sys.stderr)
    written = 0
    try:
        for line, answer in zip(lines, answers):
            record = json.dumps({"line": line, "answer": answer}, ensure_ascii=False)
            with ctrl_c_held():  # an answer counts as written exactly when its line is out
                if out is sys.stdout:
                    bar.write(record, file=sys.stdout)  # clears the progress bar first when both go to a terminal
                else:
                    out.write(record + "\n")
                out.flush()
                written += 1
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        last = f" (input lines up to {lines[written - 1]})" if written else ""
        print(f"tunelab: interrupted: {written} of {len(lines)} answers written to {where}{last}", file=sys.stderr)
        raise
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    print(f"{written} answers written to {where}", file=sys.stderr)


class ChatOptions(GenerationOptions):
    run: RunFolder
    system: str | None = None
    """system message"""
    max_new_tokens: int = Field(512, ge=1)
    """token limit per reply"""


def cmd_chat(o: ChatOptions) -> None:
    from tunelab.decoding.generate import stream_reply
    from tunelab.run import Run

    run = Run(o.run, o.precision, o.device, o.threads)
    model = run.model()
    copying = run.copy_rule(not o.no_copy_constraint)
    conversation = [{"role": "system", "content": o.system}] if o.system else []
    print("Chatting with the fine-tuned model. Ctrl-C stops a reply; an empty line, Ctrl-D or Ctrl-C "
          "at the prompt leaves.", file=sys.stderr)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if not text:
            break
        conversation.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        try:
            for piece in stream_reply(model, run.template, conversation, o.max_new_tokens, copying=copying,
                                      precision=run.precision):
                reply += piece
                print(piece, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print(" [stopped]", flush=True)
        # The conversation goes on from what the screen shows: a stopped reply is kept as far
        # as it got; one stopped before its first word is dropped with its question.
        if reply.strip():
            conversation.append({"role": "assistant", "content": reply.strip()})
        else:
            conversation.pop()


def cmd_serve(o: ServeOptions) -> None:
    from tunelab.serve.app import serve

    serve(o)


def cmd_ui(o: UIOptions) -> None:
    from tunelab.ui.app import run_ui

    run_ui(o)


class ExportOptions(Options):
    run: RunFolder
    format: Annotated[str, Arg(metavar="{merged,gguf,ollama}")]
    """merged: Hugging Face folder; gguf: llama.cpp file; ollama: GGUF and Modelfile"""
    out: str
    """new folder to write (refused if it exists)"""
    dtype: Annotated[str | None, Arg(metavar="{f32,f16,q8_0}")] = None
    """weights (default: f32 for merged, f16 for gguf and ollama; q8_0 is GGUF only)"""


def cmd_export(o: ExportOptions) -> None:
    from tunelab.export import export
    from tunelab.export.ollama import ollama_name

    out = export(o.run, o.format, o.out, dtype=o.dtype)
    print(f"Exported {o.run} as {o.format} to {out}; see {out / 'README.md'}")
    if o.format == "ollama":
        print(f"Import it: ollama create {ollama_name(out)} -f {out / 'Modelfile'}")


class CurveOptions(Options):
    data: Annotated[str, Arg(positional=True)]
    """JSONL, CSV or Parquet file of examples"""
    sizes: Annotated[str, Arg(metavar="N,N,...")] = "100,200,400,800"
    """training examples of each run (each size trains on the smaller ones' examples and more)"""
    out: str | None = None
    """curve folder, one run folder per size (default: runs/<data>-curve); run the command again to continue it"""
    config: Annotated[str | None, Arg(metavar="FILE")] = None
    """YAML file of the training options below, as `tunelab train --config` reads it; flags override it"""
    assertions: Annotated[str | None, Arg(metavar="FILE")] = None
    """rules every answer is checked against, as for `tunelab eval --assertions`"""


def cmd_curve(o: CurveOptions, flags: dict[str, Any]) -> None:
    from tunelab.iterate.curve import format_curve, parse_sizes, run_curve

    sizes = parse_sizes(o.sizes)
    config = TrainConfig.from_yaml(Path(o.config), **flags) if o.config else TrainConfig.build(flags=flags, **flags)
    out = Path(o.out) if o.out else Path("runs") / f"{Path(o.data).stem}-curve"
    curve = run_curve(Path(o.data), sizes, out, config, Path(o.assertions) if o.assertions else None)
    print(format_curve(curve))
    print(f"\nCurve saved in {out / 'curve.json'}; plot in {out / 'curve.html'}")


class SweepOptions(Options):
    data: Annotated[str, Arg(positional=True)]
    """JSONL, CSV or Parquet file of examples"""
    grid: Annotated[list[str], Arg(metavar="KEY=V1,V2,...")]
    """a training option and its values to try (repeatable: every combination runs)"""
    budget_minutes: float | None = Field(None, gt=0)
    """start no run once this many minutes are spent"""
    metric: Literal["exact_match", "token_f1", "rouge_l"] = "exact_match"
    """what the winner is chosen by, on the held-out rows"""
    out: str | None = None
    """sweep folder, one run folder per combination (default: runs/<data>-sweep); run the command again to
    continue it"""
    config: Annotated[str | None, Arg(metavar="FILE")] = None
    """YAML file of the training options below, as `tunelab train --config` reads it; flags and --grid override it"""
    assertions: Annotated[str | None, Arg(metavar="FILE")] = None
    """rules every answer is checked against, as for `tunelab eval --assertions`"""


def cmd_sweep(o: SweepOptions, flags: dict[str, Any]) -> None:
    from tunelab.iterate.sweep import format_sweep, parse_grid, run_sweep

    grid = parse_grid(o.grid, flags)
    out = Path(o.out) if o.out else Path("runs") / f"{Path(o.data).stem}-sweep"
    sweep = run_sweep(Path(o.data), grid, flags, out, o.metric, o.budget_minutes,
                      Path(o.assertions) if o.assertions else None, Path(o.config) if o.config else None)
    print(format_sweep(sweep))
    print(f"\nSweep saved in {out / 'sweep.json'}; runs compared in {out / 'comparison.html'}")


# ----------------------------------------------------------------------------- flags from options

def add_flags(parser, model: type[Options], exclude: Collection[str] = (), negatable: bool = False) -> None:
    """An argument for every field of `model` (`max_steps` -> `--max-steps`, an `Arg(positional=True)`
    field by position), its help the field's docstring and its choices the field's `Literal`. A
    field without a default is a required flag. Values stay strings for the model to validate
    (one kind of error message for YAML and flags alike); defaults are left out of the namespace,
    so the model's default applies, and a flag overrides a YAML config only when it is given. A
    yes/no field is a switch (`--overwrite`); with `negatable` (options a YAML file may have
    turned on) it also has its `--no-` form."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        arg = next((m for m in field.metadata if isinstance(m, Arg)), Arg())
        if not arg.flag:
            continue
        listed = typing.get_origin(field.annotation) is list
        help = (field.description or "").replace("%", "%%")
        if arg.positional:
            # A positional argument with a default may be left out.
            nargs = ("+" if listed else None) if field.is_required() else ("*" if listed else "?")
            parser.add_argument(name, nargs=nargs, metavar=arg.metavar, help=help)
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            if negatable:
                parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                                    help=f"{help} (default: {'on' if field.default else 'off'})")
            else:
                parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, action="store_true", help=help)
            continue
        choices = literal_choices(field.annotation)
        metavar = arg.metavar or ("{" + ",".join(choices) + "}" if choices else name.upper())
        # A default of None is explained in the description ("default 1e-3 for LoRA ...").
        shown = field.default not in (None, PydanticUndefined) and not listed
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar,
                            required=field.is_required(), action="append" if listed else "store",
                            help=help + (f" (default: {field.default})" if shown else ""))


def literal_choices(annotation) -> tuple[str, ...]:
    """The values of a `Literal[...]` annotation, or of `Literal[...] | None`; () for any other."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(filter(None, map(literal_choices, typing.get_args(annotation))), ())
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def add_config_flags(parser, config: type[DataOptions]) -> None:
    """The flags of the run's options: the data options (as `tunelab data check` has them), and
    for training the rest of TrainConfig in a group of their own."""
    rest = config.model_fields.keys() - DataOptions.model_fields.keys()
    title = "data options (as for `tunelab data check`)" if rest else "data options"
    add_flags(parser.add_argument_group(title), DataOptions, negatable=True)
    if rest:
        add_flags(parser.add_argument_group("training options"), config, exclude=DataOptions.model_fields,
                  negatable=True)


def config_flags(args: argparse.Namespace, model: type[Options]) -> dict[str, typing.Any]:
    """The fields of `model` given as flags (or arguments)."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


class Parser(argparse.ArgumentParser):
    """A flag mistake is one line like any other user error (sub-commands inherit this class).
    A flag is spelled in full: an abbreviation (`--epoch` for `--epochs`) is an unknown flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # The innermost sub-command parses first; main() reports unknown flags against its help.
        if not hasattr(namespace, "command_parser"):
            namespace.command_parser = self
        return namespace, extras

    def error(self, message: str) -> typing.NoReturn:
        command = "" if self.prog == "tunelab" else f"{self.prog}: "
        self.exit(2, f"tunelab: error: {command}{message}; see `{self.prog} --help`\n")


# ----------------------------------------------------------------------------- the commands

@dataclass(frozen=True)
class Command:
    """A sub-command: the function that does it, called with its validated options."""

    run: Callable[..., None]
    options: type[Options]
    help: str
    description: str | None = None
    config: type[DataOptions] | None = None
    """Run options the command also takes as flags; `run` gets those given, as a dict, to
    validate with what else it reads (train: the YAML config)."""


@dataclass(frozen=True)
class CommandGroup:
    help: str
    commands: dict[str, Command]


COMMANDS: dict[str, Command | CommandGroup] = {
    "demo": Command(cmd_demo, DemoOptions, "fine-tune smollm2-135m on the bundled example task and compare"),
    "data": CommandGroup("check a data file before training; label, grow and review data", {
        "check": Command(
            cmd_data_check, DataCheckOptions, config=DataOptions,
            help="find format errors, token-level problems, duplicates and leakage before training",
            description="Check a data file as `tunelab train` would, print a summary and list every problem. "
                        "Exit code 2 if there is an error."),
        "label": Command(
            cmd_data_label, LabelOptions,
            help="answer inputs with a bigger model (the teacher) and write a training file",
            description="Send each input to an OpenAI-compatible endpoint with your system prompt and few-shot "
                        "examples; write the answers as a chat training file in input order. Answers are cached "
                        "beside --out, so a run stopped at any point and started again asks nothing twice."),
        "synth": Command(
            cmd_data_synth, SynthOptions,
            help="grow a handful of example inputs into N new ones with the teacher, then label them",
            description="Ask the teacher for new inputs in the style of the examples, drop near duplicates (as the "
                        "data check finds them), then label the first N as `tunelab data label` does."),
        "review": Command(
            cmd_data_review, ReviewOptions,
            help="accept, edit or reject each pair in the terminal, or correct a run's wrong answers",
            description="Show each pair; [a]ccept, [e]dit ($EDITOR, or type the answer), [r]eject or [q]uit. "
                        "With --run RUN, show each wrong answer of the run's eval: [a]ccept the reference, "
                        "[t]ype a better answer (corrections.jsonl), [f]ix the reference (fixes.jsonl), [s]kip or "
                        "[q]uit. Decisions are saved as you go: run the same command again to continue."),
    }),
    "train": Command(cmd_train, TrainOptions, "fine-tune a base model on a data file", config=TrainConfig),
    "eval": Command(
        cmd_eval, EvalOptions, help="compare the fine-tuned model with prompting the base model, and other models",
        description="Answer the held-out examples (or --data) with the base model zero-shot, few-shot and with "
                    "retrieved examples, the fine-tuned model and any --contender; print and save the metrics "
                    "with 95% intervals, error buckets, cost per request and a forgetting check."),
    "report": Command(cmd_report, ReportOptions, "write a run's HTML report, or compare several runs side by side"),
    "curve": Command(cmd_curve, CurveOptions, config=TrainConfig,
                     help="train on growing nested subsets of the data: what would more data buy?"),
    "sweep": Command(cmd_sweep, SweepOptions, config=TrainConfig,
                     help="train every combination of a grid of settings and name the winner"),
    "generate": Command(cmd_generate, GenerateOptions,
                        "answer a prompt or a file of prompts with the fine-tuned model"),
    "chat": Command(cmd_chat, ChatOptions, "talk to the fine-tuned model, streaming"),
    "serve": Command(cmd_serve, ServeOptions, "OpenAI-compatible server and chat page for one or more runs"),
    "ui": Command(cmd_ui, UIOptions, "the whole loop in the browser: data, training, evaluation, chat"),
    "export": Command(cmd_export, ExportOptions, "write the fine-tuned model for transformers, llama.cpp or Ollama"),
}


def build_parser() -> argparse.ArgumentParser:
    return command_parsers()["tunelab"]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of `tunelab` and of each sub-command, by its name (`tunelab data check`)."""
    parser = Parser(prog="tunelab", description="Fine-tune small language models locally.")
    return {"tunelab": parser, **add_commands(parser, COMMANDS, dest="command", metavar="COMMAND")}


def add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command | CommandGroup], dest: str,
                 metavar: str) -> dict[str, argparse.ArgumentParser]:
    subparsers = parser.add_subparsers(dest=dest, required=True, metavar=metavar)
    added = {}
    for name, command in commands.items():
        if isinstance(command, CommandGroup):
            group = added[f"{parser.prog} {name}"] = subparsers.add_parser(name, help=command.help)
            added |= add_commands(group, command.commands, dest=f"{name}_command", metavar="ACTION")
            continue
        sub = added[f"{parser.prog} {name}"] = subparsers.add_parser(name, help=command.help,
                                                                     description=command.description)
        add_flags(sub, command.options)
        if command.config:
            add_config_flags(sub, command.config)
        sub.set_defaults(tunelab_command=command)
    return added


REFERENCE_COLUMNS = 100
"""The terminal width docs/CLI.md is written at, so that it reads the same wherever it is made."""


def reference() -> str:
    """docs/CLI.md: every command's `--help`, as printed at REFERENCE_COLUMNS columns."""
    from unittest import mock

    sections = ["# Command-line reference\n\nEvery command's `--help`, generated from the parser by\n"
                "`python docs/cli_reference.py`; edit the options in the code, not here.\n"]
    with mock.patch.dict(os.environ, {"COLUMNS": str(REFERENCE_COLUMNS)}):
        for name, parser in command_parsers().items():
            sections.append(f"## {name}\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


def run_command(args: argparse.Namespace) -> None:
    """Validate the parsed arguments into the command's options and run it."""
    command: Command = args.tunelab_command
    given = config_flags(args, command.options)
    options = command.options.build(flags=given, **given)
    if command.config:
        command.run(options, config_flags(args, command.config))
    else:
        command.run(options)


def main(argv: list[str] | None = None) -> int:
    hide_known_warnings()
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        run_command(args)
    except UserError as e:
        for line in e.lines():
            print(f"tunelab: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of standard output went away (`tunelab data check DATA | head`): stop quietly,
        # and keep Python from reporting the pipe again when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
