"""The `tunelab` command: one sub-command per pipeline stage.

Heavy libraries are imported inside the functions that need them, so `--help` is instant.
A UserError (bad data, path or flag) prints one line per problem and exits with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
import warnings
from pathlib import Path

from tunelab.config import TrainConfig
from tunelab.errors import UserError, check_output_file, check_output_folder


def cmd_demo(args: argparse.Namespace) -> None:
    from tunelab.demo import run_demo

    run_demo(Path(args.out), examples=args.examples, method=args.method, max_steps=args.max_steps,
             eval_limit=args.eval_limit)


def cmd_data_check(args: argparse.Namespace) -> None:
    from tunelab.datacheck import cli_check

    if args.out:
        check_output_folder(Path(args.out), "--out")
    cli_check(Path(args.data), args)


def cmd_train(args: argparse.Namespace) -> None:
    from tunelab.train import default_out, train

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    if args.resume and not args.out:
        raise UserError("--resume needs --out RUN, the run folder to continue")
    out = Path(args.out) if args.out else default_out(Path(args.data))
    # A resumed run starts from its own options; flags given now override them (and are checked).
    saved = out / "config.yaml" if args.resume and (out / "config.yaml").exists() else None
    config_file = args.config or saved
    config = TrainConfig.from_yaml(config_file, **overrides) if config_file else TrainConfig.build(**overrides)
    train(config, Path(args.data), out, overwrite=args.overwrite, resume=args.resume, force=args.force)
    print(f"Run saved in {out}. Next: tunelab eval {out}")


def cmd_eval(args: argparse.Namespace) -> None:
    from tunelab.endpoint import Endpoint
    from tunelab.evaluate import format_report
    from tunelab.forgetting import DEFAULT_QUESTIONS
    from tunelab.run import Run

    endpoints = [Endpoint.parse(spec, args.contender_model) for spec in args.contender]
    names = [e.name for e in endpoints]
    taken = [n for n in names if names.count(n) > 1 or n in ("zero-shot", "few-shot", "retrieval", "tuned")]
    if taken:
        raise UserError(f"--contender {taken[0]}=...: the name is already taken; choose another NAME")
    if args.judge and not args.judge.startswith(("http://", "https://")):
        raise UserError(f"--judge {args.judge}: expected URL[#MODEL], e.g. http://localhost:8000/v1#judge-model")
    judge = Endpoint.parse(f"judge={args.judge}", args.judge_model) if args.judge else None
    run = Run(args.run)
    check_output_file(run.files.eval, "the results file")  # written at the end: check before the work
    results = run.evaluate(
        limit=args.limit, include_base=not args.no_base, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, data=Path(args.data) if args.data else None, shots=args.shots,
        retrieval=not args.no_retrieval, endpoints=endpoints, assertions=args.assertions and Path(args.assertions),
        forgetting=None if args.no_forgetting else Path(args.forgetting or DEFAULT_QUESTIONS), judge=judge,
    )
    print(format_report(results))
    print(f"\nResults saved in {run.files.eval}")


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 0")
    return value


def cmd_generate(args: argparse.Namespace) -> None:
    """Answers go out one JSON line each, in input order, as soon as they are made, so an
    interrupted run keeps every answer written; every path is checked before the model loads."""
    from tunelab.run import Run

    if (args.prompt is None) == (args.input is None):
        raise UserError("tunelab generate: pass exactly one of --prompt TEXT or --input FILE")
    if args.output is not None:
        if args.input is None:
            raise UserError("--output goes with --input FILE; the answer to --prompt is printed")
        check_output_file(Path(args.output), "--output")
        if Path(args.output).resolve() == Path(args.input).resolve():
            raise UserError(f"--output {args.output}: is the --input file; choose another --output")
    run = Run(args.run)
    if args.prompt is not None:
        print(run.generate(args.prompt, max_new_tokens=args.max_new_tokens))
        return
    from tqdm.auto import tqdm

    from tunelab.data import load_examples
    from tunelab.generate import generate_answers

    examples = load_examples(Path(args.input), require_answer=False)
    answers = generate_answers(run.model(), run.template, (e.prompt_messages() for e in examples),
                               max_new_tokens=args.max_new_tokens)
    where = args.output or "standard output"
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    bar = tqdm(total=len(examples), desc="generating", unit="answer", file=sys.stderr)
    written = 0
    try:
        for example, answer in zip(examples, answers):
            line = json.dumps({"line": example.line, "answer": answer}, ensure_ascii=False)
            if out is sys.stdout:
                bar.write(line, file=sys.stdout)  # clears the progress bar first when both go to a terminal
            else:
                out.write(line + "\n")
            out.flush()
            written += 1
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        last = f" (input lines up to {examples[written - 1].line})" if written else ""
        print(f"tunelab: interrupted: {written} of {len(examples)} answers written to {where}{last}",
              file=sys.stderr)
        raise
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    print(f"{written} answers written to {where}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from tunelab.generate import stream_reply
    from tunelab.run import Run

    run = Run(args.run)
    model = run.model()
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
            for piece in stream_reply(model, run.template, conversation, args.max_new_tokens):
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


def cmd_not_yet(args: argparse.Namespace) -> None:
    raise UserError(f"tunelab {args.command}: not available yet; use `tunelab generate` or the Python API for now")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every TrainConfig field (`max_steps` -> `--max-steps`). Defaults are left
    out of the namespace, so a flag overrides the YAML config only when it is given."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if typing.get_origin(kind) is typing.Literal:
            kwargs["choices"] = typing.get_args(kind)
        else:
            args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            kwargs["type"] = args[0]
        kwargs["help"] += f" (default: {f.default})"
        parser.add_argument(flag, **kwargs)


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

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"tunelab: error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tunelab", description="Fine-tune small language models locally.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="fine-tune smollm2-135m on the bundled example task and compare")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--examples", type=positive_int, default=1200, help="examples to generate (default: 1200)")
    demo.add_argument("--method", choices=("lora", "full"), default="full", help="fine-tuning method (default: full)")
    demo.add_argument("--max-steps", type=positive_int, default=100,
                      help="optimizer steps of 8 examples (default: 100, about 6 minutes on 2 CPU cores)")
    demo.add_argument("--eval-limit", type=positive_int, default=100, help="held-out examples to evaluate (default: 100)")
    demo.set_defaults(func=cmd_demo)

    data = commands.add_parser("data", help="check a data file before training")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_commands.add_parser(
        "check", help="find format errors, token-level problems, duplicates and leakage before training",
        description="Check a data file as `tunelab train` would, print a summary and list every problem. "
                    "Exit code 2 if there is an error.")
    check.add_argument("data", help="JSONL, CSV or Parquet file")
    check.add_argument("--base", default=None,
                       help="also run the token-level checks with this base model's tokenizer and template")
    check.add_argument("--format", default="auto", choices=typing.get_args(typing.get_type_hints(TrainConfig)["format"]),
                       help="shape of the rows (default: auto)")
    check.add_argument("--template", default="auto", help="prompt template, as for train (default: auto)")
    check.add_argument("--test-size", type=float, default=0.1, help="held-out fraction or count (default: 0.1)")
    check.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    check.add_argument("--max-length", type=int, default=1024, help="longest example in tokens (default: 1024)")
    check.add_argument("--truncation", choices=("drop", "truncate", "error"), default="drop",
                       help="what train does with longer examples (default: drop)")
    check.add_argument("--train-on-prompt", action="store_true", help="prompt tokens are trained too")
    check.add_argument("--out", default=None,
                       help="save the report here (data_check.json, length histogram)")
    check.set_defaults(func=cmd_data_check)

    train = commands.add_parser("train", help="fine-tune a base model on a data file",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("data", help="JSONL, CSV or Parquet file of examples")
    train.add_argument("--out", default=None, help="run folder (default: runs/<data>-<time>)")
    train.add_argument("--config", default=None, help="YAML file of the options below; flags override it")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out from its newest complete checkpoint (see --save-every); "
                            "options not given are those of the run")
    train.add_argument("--force", action="store_true",
                       help="with --resume: continue even though the data or options changed since the checkpoint")
    add_config_flags(train)
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
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help="token limit per answer (default: 1.5 times the longest reference, at most 512)")
    evaluate.add_argument("--batch-size", type=positive_int, default=16, help="prompts per batch (default: 16)")
    evaluate.set_defaults(func=cmd_eval)

    generate = commands.add_parser("generate", help="answer a prompt or a file of prompts with the fine-tuned model")
    generate.add_argument("run", help="run folder")
    generate.add_argument("--prompt", default=None, help="one prompt")
    generate.add_argument("--input", default=None, help="JSONL, CSV or Parquet file of prompts (any accepted shape)")
    generate.add_argument("--output", default=None, help="write JSON lines here instead of standard output")
    generate.add_argument("--max-new-tokens", type=positive_int, default=256)
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="talk to the fine-tuned model, streaming")
    chat.add_argument("run", help="run folder")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=positive_int, default=512)
    chat.set_defaults(func=cmd_chat)

    for name, text in (("serve", "OpenAI-compatible server (not available yet)"),
                       ("export", "merged weights and GGUF (not available yet)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("run", nargs="?")
        sub.set_defaults(func=cmd_not_yet)
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
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        for line in e.lines():
            print(f"tunelab: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
