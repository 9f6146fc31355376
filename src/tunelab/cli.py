"""The `tunelab` command: one sub-command per pipeline stage.

Heavy libraries are imported inside the functions that need them, so `--help` is instant.
A UserError (bad data, path or flag) prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
import warnings
from collections.abc import Collection
from pathlib import Path

from tunelab.config import DataOptions, Precision, TrainConfig
from tunelab.errors import UserError, check_output_file, check_output_folder


def cmd_demo(args: argparse.Namespace) -> None:
    from tunelab.demo import run_demo

    run_demo(Path(args.out), examples=args.examples, method=args.method, max_steps=args.max_steps,
             eval_limit=args.eval_limit)


def cmd_data_check(args: argparse.Namespace) -> None:
    from tunelab.data.check import cli_check

    if args.out:
        check_output_folder(Path(args.out), "--out")
    flags = config_flags(args, DataOptions)
    options = DataOptions.build(flags=flags, **flags)
    cli_check(Path(args.data), options, args.base, Path(args.out) if args.out else None)


def teacher_from_args(args: argparse.Namespace, shots: str | None):
    from tunelab.teacher.ask import Teacher
    from tunelab.teacher.label import read_shots
    from tunelab.teacher.schema import read_schema

    return Teacher(url=args.teacher, model=args.model, system=args.system,
                   shots=read_shots(Path(shots)) if shots else [],
                   schema=read_schema(Path(args.json_schema)) if args.json_schema else None,
                   concurrency=args.concurrency, timeout=args.timeout, retries=args.retries)


def api_key_from_args(args: argparse.Namespace) -> str | None:
    from tunelab.client import api_key

    return api_key(args.api_key_env, Path(args.api_key_file) if args.api_key_file else None)


def cmd_data_label(args: argparse.Namespace) -> None:
    from tunelab.teacher.label import cli_label

    cli_label(Path(args.inputs), teacher_from_args(args, args.examples), Path(args.out), args.allow_remote,
              api_key_from_args(args))


def cmd_data_synth(args: argparse.Namespace) -> None:
    from tunelab.teacher.synth import cli_synth

    # synth's --examples are inputs; cli_synth makes their answers, if they have any, few-shot examples.
    cli_synth(Path(args.examples), args.n, teacher_from_args(args, None), Path(args.out), args.allow_remote, args.seed,
              api_key_from_args(args))


def cmd_data_review(args: argparse.Namespace) -> None:
    from tunelab.data.review import cli_review

    cli_review(Path(args.file), Path(args.out))


def add_teacher_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, metavar="URL",
                        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1 (loopback or private "
                             "addresses only, unless --allow-remote)")
    parser.add_argument("--model", required=True, metavar="NAME", help="model name sent to the teacher")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system prompt for the teacher")
    parser.add_argument("--json-schema", default=None, metavar="FILE",
                        help="JSON schema every answer must match (asked as structured output, checked locally)")
    parser.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight (default: 4)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                        help="seconds to wait for one answer before retrying (default: 120)")
    parser.add_argument("--retries", type=int, default=5, metavar="N",
                        help="retries of a request on 429, 5xx, timeouts (default: 5)")
    add_endpoint_access_flags(parser, "a teacher")
    parser.add_argument("--out", required=True, metavar="FILE", help="training file to write (.jsonl)")


def add_endpoint_access_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """--allow-remote and where the API key comes from: never a flag's value, which the shell
    history and the process list would show."""
    parser.add_argument("--allow-remote", action="store_true",
                        help=f"allow {what} outside this machine and its private network (your data leaves home)")
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="environment variable holding the API key, sent as 'Authorization: Bearer' "
                             "(default: TUNELAB_API_KEY, else OPENAI_API_KEY, if set)")
    parser.add_argument("--api-key-file", default=None, metavar="FILE", help="file holding the API key")


def cmd_train(args: argparse.Namespace) -> None:
    flags = config_flags(args, TrainConfig)
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN, the run folder to continue")
    # A resumed run starts from its own options; flags given now override them (and are checked).
    saved = Path(args.out) / "config.yaml" if args.resume else None
    config_file = args.config or (saved if saved and saved.exists() else None)
    # Checked before training's heavy imports, so a mistyped option fails at once.
    config = TrainConfig.from_yaml(config_file, **flags) if config_file else TrainConfig.build(flags=flags, **flags)
    from tunelab.train.loop import default_out, finished, train

    out = Path(args.out) if args.out else default_out(Path(args.data))
    if args.resume and not args.overwrite and (line := finished(config, Path(args.data), out)):
        print(line)  # the one line: there is no new run to announce
        return
    train(config, Path(args.data), out, overwrite=args.overwrite, resume=args.resume, force=args.force)
    print(f"Run saved in {out}. Next: tunelab eval {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from tunelab.evaluate.core import format_report
    from tunelab.evaluate.endpoint import Endpoint
    from tunelab.evaluate.forgetting import DEFAULT_QUESTIONS
    from tunelab.report.html import write_report
    from tunelab.run import Run

    key = api_key_from_args(args) if args.contender or args.judge else None
    endpoints = [Endpoint.contender(spec, args.contender_model, key) for spec in args.contender]
    names = [e.name for e in endpoints]
    taken = [n for n in names if names.count(n) > 1 or n in ("zero-shot", "few-shot", "retrieval", "tuned")]
    if taken:
        raise UserError(f"--contender {taken[0]}=...: the name is already taken; choose another NAME")
    judge = Endpoint.judge(args.judge, args.judge_model, key) if args.judge else None
    for endpoint in [*endpoints, *([judge] if judge else [])]:
        endpoint.check(args.allow_remote)
    run = Run(args.run, args.precision)
    check_output_file(run.files.eval, "the results file")  # written at the end: check before the work
    results = run.evaluate(
        limit=args.limit, include_base=not args.no_base, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, data=Path(args.data) if args.data else None, shots=args.shots,
        retrieval=not args.no_retrieval, endpoints=endpoints, assertions=args.assertions and Path(args.assertions),
        forgetting=None if args.no_forgetting else Path(args.forgetting or DEFAULT_QUESTIONS), judge=judge,
        copy_constraint=not args.no_copy_constraint,
    )
    print(format_report(results))
    print(f"\nResults saved in {run.files.eval}; report written to {write_report(run.path)}")


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 0")
    return value


def cmd_report(args: argparse.Namespace) -> None:
    from tunelab.report.html import COMPARISON_FILE, write_comparison, write_report

    runs, out = [Path(run) for run in args.runs], Path(args.out) if args.out else None
    path = write_report(runs[0], out) if len(runs) == 1 else write_comparison(runs, out or Path(COMPARISON_FILE))
    for run in runs:
        if not (run / "eval.json").exists():
            print(f"tunelab: note: {run} has no eval.json, so its report shows training and data only; "
                  f"run `tunelab eval {run}` for the rest", file=sys.stderr)
    print(f"Report written to {path}")


def cmd_generate(args: argparse.Namespace) -> None:
    """Answers go out one JSON line each, in input order, as soon as they are made, so an
    interrupted run keeps every answer written; every path is checked before the model loads."""
    from tunelab.run import Run
    from tunelab.runfolder import RunFiles
    from tunelab.teacher.label import read_inputs

    if (args.prompt is None) == (args.input is None):
        raise UserError("tunelab generate: pass exactly one of --prompt TEXT or --input FILE")
    if args.output is not None:
        if args.input is None:
            raise UserError("--output goes with --input FILE; the answer to --prompt is printed")
        check_output_file(Path(args.output), "--output")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UserError(f"--output {args.output}: is the --input file; choose another --output")
    RunFiles(Path(args.run)).check()
    # A .txt file holds one prompt per line, as for `tunelab data label`.
    inputs = read_inputs(Path(args.input)) if args.input is not None else []
    run = Run(args.run, args.precision)
    if args.prompt is not None:
        print(run.generate(args.prompt, max_new_tokens=args.max_new_tokens, copy_constraint=not args.no_copy_constraint))
        return
    from tunelab.decoding.generate import generate_answers

    answers = generate_answers(run.model(), run.template, (conversation for _, conversation in inputs),
                               max_new_tokens=args.max_new_tokens, copying=run.copy_rule(not args.no_copy_constraint),
                               precision=run.precision)
    write_answers([line for line, _ in inputs], answers, Path(args.output) if args.output else None)


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


def cmd_chat(args: argparse.Namespace) -> None:
    from tunelab.decoding.generate import stream_reply
    from tunelab.run import Run

    run = Run(args.run, args.precision)
    model = run.model()
    copying = run.copy_rule(not args.no_copy_constraint)
    conversation = [{"role": "system", "content": args.system}] if args.system else []
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
            for piece in stream_reply(model, run.template, conversation, args.max_new_tokens, copying=copying,
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


def cmd_serve(args: argparse.Namespace) -> None:
    from tunelab.serve.app import ServeOptions, serve

    serve(ServeOptions(runs=[Path(r) for r in args.runs], host=args.host, port=args.port, api_key=args.api_key,
                       max_queue=args.max_queue, batch_size=args.batch_size,
                       rules=Path(args.rules) if args.rules else None, copy_constraint=not args.no_copy_constraint,
                       precision=args.precision))


def cmd_export(args: argparse.Namespace) -> None:
    from tunelab.export import export
    from tunelab.export.ollama import ollama_name

    out = export(args.run, args.format, args.out, dtype=args.dtype)
    print(f"Exported {args.run} as {args.format} to {out}; see {out / 'README.md'}")
    if args.format == "ollama":
        print(f"Import it: ollama create {ollama_name(out)} -f {out / 'Modelfile'}")


def add_config_flags(parser, model: type[DataOptions], exclude: Collection[str] = ()) -> None:
    """A flag for every field of `model` (`max_steps` -> `--max-steps`), its help the field's
    docstring and its choices the field's. Values stay strings for the model to validate (one
    kind of error message for YAML and flags alike); defaults are left out of the namespace, so
    a flag overrides the YAML config only when it is given."""
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction,
                                help=f"{field.description} (default: {'on' if field.default else 'off'})")
            continue
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ()
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        # A default of None is explained in the description ("default 1e-3 for LoRA ...").
        default = f" (default: {field.default})" if field.default is not None else ""
        parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=metavar,
                            help=field.description + default)


def config_flags(args: argparse.Namespace, model: type[DataOptions]) -> dict[str, typing.Any]:
    """The fields of `model` given as flags."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}


def add_copy_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--no-copy-constraint", action="store_true",
                        help=f"let {what} hold any value in the fields that the training data copies from the input "
                             "(by default such values stay substrings of the input; the data check lists the fields)")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=typing.get_args(Precision), default=None,
                        help="arithmetic of generation: bf16 (matmuls in bf16, as in mixed-precision training; "
                             "generation about 2x faster on CPUs with AVX512-BF16) or fp32; auto picks bf16 where "
                             "the hardware computes it natively (default: the run's --precision setting)")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


class Parser(argparse.ArgumentParser):
    """A flag mistake is one line like any other user error (sub-commands inherit this class)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        # The innermost sub-command parses first; main() reports unknown flags against its help.
        if not hasattr(namespace, "command_parser"):
            namespace.command_parser = self
        return namespace, extras

    def error(self, message: str) -> typing.NoReturn:
        command = "" if self.prog == "tunelab" else f"{self.prog}: "
        self.exit(2, f"tunelab: error: {command}{message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tunelab", description="Fine-tune small language models locally.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="fine-tune smollm2-135m on the bundled example task and compare")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--examples", type=positive_int, default=1200, help="examples to generate (default: 1200)")
    demo.add_argument("--method", choices=("lora", "full"), default="full", help="fine-tuning method (default: full)")
    demo.add_argument("--max-steps", type=positive_int, default=100,
                      help="optimizer steps of 8 examples (default: 100, about 6 minutes on 2 CPU cores)")
    demo.add_argument("--eval-limit", type=positive_int, default=100,
                      help="held-out examples to evaluate (default: 100)")
    demo.set_defaults(func=cmd_demo)

    data = commands.add_parser("data", help="check a data file before training; label, grow and review data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_commands.add_parser(
        "check", help="find format errors, token-level problems, duplicates and leakage before training",
        description="Check a data file as `tunelab train` would, print a summary and list every problem. "
                    "Exit code 2 if there is an error.")
    check.add_argument("data", help="JSONL, CSV or Parquet file")
    check.add_argument("--base", default=None,
                       help="also run the token-level checks with this base model's tokenizer and template")
    add_config_flags(check, DataOptions)
    check.add_argument("--out", default=None,
                       help="save the report here (data_check.json, length histogram)")
    check.set_defaults(func=cmd_data_check)

    label = data_commands.add_parser(
        "label", help="answer inputs with a bigger model (the teacher) and write a training file",
        description="Send each input to an OpenAI-compatible endpoint with your system prompt and few-shot "
                    "examples; write the answers as a chat training file in input order. Answers are cached "
                    "beside --out, so a run stopped at any point and started again asks nothing twice.")
    label.add_argument("inputs", help="a .txt file (one input per line), or JSONL, CSV or Parquet rows in any "
                                      "accepted shape (answers not needed)")
    label.add_argument("--examples", default=None, metavar="FILE", help="few-shot examples: rows with answers")
    add_teacher_flags(label)
    label.set_defaults(func=cmd_data_label)

    synth = data_commands.add_parser(
        "synth", help="grow a handful of example inputs into N new ones with the teacher, then label them",
        description="Ask the teacher for new inputs in the style of the examples, drop near duplicates (as the "
                    "data check finds them), then label the first N as `tunelab data label` does.")
    synth.add_argument("--examples", required=True, metavar="FILE",
                       help="example inputs (.txt, one per line, or data rows; rows with answers also serve "
                            "as few-shot examples for labelling)")
    synth.add_argument("--n", type=int, required=True, help="number of new inputs to write and label")
    synth.add_argument("--seed", type=int, default=0, help="seed for the examples shown in each request (default: 0)")
    add_teacher_flags(synth)
    synth.set_defaults(func=cmd_data_synth)

    review = data_commands.add_parser(
        "review", help="accept, edit or reject each pair in the terminal, then check the reviewed file",
        description="Show each pair; [a]ccept, [e]dit ($EDITOR, or type the answer), [r]eject or [q]uit. "
                    "Decisions are saved as you go: run the same command again to continue.")
    review.add_argument("file", help="data file of pairs (e.g. the output of `tunelab data label`)")
    review.add_argument("--out", required=True, metavar="FILE", help="reviewed training file to write (.jsonl)")
    review.set_defaults(func=cmd_data_review)

    train = commands.add_parser("train", help="fine-tune a base model on a data file")
    train.add_argument("data", help="JSONL, CSV or Parquet file of examples")
    train.add_argument("--out", default=None, help="run folder (default: runs/<data>-<time>)")
    train.add_argument("--config", default=None, help="YAML file of the options below; flags override it")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest complete checkpoint (see --save-every); "
                            "options not given are those of the run")
    train.add_argument("--force", action="store_true",
                       help="with --resume: continue even though the data or options changed since the checkpoint")
    add_config_flags(train.add_argument_group("data options (as for `tunelab data check`)"), DataOptions)
    add_config_flags(train.add_argument_group("training options"), TrainConfig, exclude=DataOptions.model_fields)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser(
        "eval", help="compare the fine-tuned model with prompting the base model, and other models",
        description="Answer the held-out examples (or --data) with the base model zero-shot, few-shot and with "
                    "retrieved examples, the fine-tuned model and any --contender; print and save the metrics "
                    "with 95% intervals, error buckets, cost per request and a forgetting check.")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--data", default=None, help="evaluate this labelled file (any accepted shape) "
                                                       "instead of the run's held-out split")
    evaluate.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N examples")
    evaluate.add_argument("--shots", type=non_negative_int, default=3,
                          help="training examples in the few-shot and retrieval prompts; 0 skips both (default: 3)")
    evaluate.add_argument("--no-retrieval", action="store_true", help="skip the retrieval contender")
    evaluate.add_argument("--no-base", action="store_true", help="skip the base model's contenders")
    evaluate.add_argument("--contender", action="append", default=[], metavar="NAME=URL[#MODEL]",
                          help="also ask a model behind an OpenAI-compatible endpoint (repeatable)")
    evaluate.add_argument("--contender-model", default=None, help="model name for contenders whose URL has no #MODEL")
    evaluate.add_argument("--assertions", default=None, metavar="FILE",
                          help="YAML rules (regex, must_contain, must_not_contain, json_schema) or a Python file "
                               "with check(prompt, answer), applied to every answer")
    evaluate.add_argument("--forgetting", default=None, metavar="FILE",
                          help="multiple-choice JSONL for the forgetting check (default: the bundled questions)")
    evaluate.add_argument("--no-forgetting", action="store_true", help="skip the forgetting check")
    evaluate.add_argument("--judge", default=None, metavar="URL[#MODEL]",
                          help="grade answers against references with a model behind an OpenAI-compatible endpoint")
    evaluate.add_argument("--judge-model", default=None, help="model name for --judge when its URL has no #MODEL")
    add_endpoint_access_flags(evaluate, "a --contender or --judge")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help="token limit per answer (default: 1.5 times the longest reference, at most 512)")
    evaluate.add_argument("--batch-size", type=positive_int, default=32, help="prompts per batch (default: 32)")
    add_copy_flag(evaluate, "the local contenders' answers")
    add_precision_flag(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    report = commands.add_parser("report", help="write a run's HTML report, or compare several runs side by side")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s)")
    report.add_argument("--out", default=None,
                        help="HTML file to write (default: RUN/report.html for one run; for several, "
                             "comparison.html in the current folder, each run's report.html rebuilt too)")
    report.set_defaults(func=cmd_report)

    generate = commands.add_parser("generate", help="answer a prompt or a file of prompts with the fine-tuned model")
    generate.add_argument("run", help="run folder")
    generate.add_argument("--prompt", default=None, help="one prompt")
    generate.add_argument("--input", default=None,
                          help="a .txt file (one prompt per line), or JSONL, CSV or Parquet rows in any accepted shape")
    generate.add_argument("--output", default=None, help="write JSON lines here instead of standard output")
    generate.add_argument("--max-new-tokens", type=positive_int, default=256)
    add_copy_flag(generate, "answers")
    add_precision_flag(generate)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="talk to the fine-tuned model, streaming")
    chat.add_argument("run", help="run folder")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512)
    add_copy_flag(chat, "replies")
    add_precision_flag(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="OpenAI-compatible server and chat page for one or more runs")
    serve.add_argument("runs", nargs="+", metavar="RUN", help="run folders; each is served as the model named "
                                                              "by its folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; any other "
                                                           "needs --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    serve.add_argument("--api-key", default=None, help="key clients send as `Authorization: Bearer KEY`")
    serve.add_argument("--max-queue", type=positive_int, default=32,
                       help="requests waiting or answered at once; more get 429 (default: 32)")
    serve.add_argument("--batch-size", type=positive_int, default=8,
                       help="most requests answered by one batched generation (default: 8)")
    serve.add_argument("--rules", default=None, help="YAML moderation rules: input/output words and patterns")
    add_copy_flag(serve, "answers")
    add_precision_flag(serve)
    serve.set_defaults(func=cmd_serve)

    export = commands.add_parser("export", help="write the fine-tuned model for transformers, llama.cpp or Ollama")
    export.add_argument("run", help="run folder")
    export.add_argument("--format", required=True, metavar="{merged,gguf,ollama}",
                        help="merged: Hugging Face folder; gguf: llama.cpp file; ollama: GGUF and Modelfile")
    export.add_argument("--out", required=True, help="new folder to write (refused if it exists)")
    export.add_argument("--dtype", metavar="{f32,f16,q8_0}", default=None,
                        help="weights (default: f32 for merged, f16 for gguf and ollama; q8_0 is GGUF only)")
    export.set_defaults(func=cmd_export)
    return parser


KNOWN_HARMLESS_WARNINGS = [
    # peft asks each model whether gradient checkpointing is on through the property name that
    # transformers 5 deprecated; nothing for a tunelab user to change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
]
"""(category, message regex, module regex) of library warnings that the CLI does not show."""


def hide_known_warnings() -> None:
    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def main(argv: list[str] | None = None) -> int:
    hide_known_warnings()
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        args.func(args)
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
