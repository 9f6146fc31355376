"""Data from a teacher: a bigger model behind any OpenAI-compatible endpoint answers the user's
inputs (`tunelab data label`) with the user's system prompt and few-shot examples.

- Private by default, keys from the environment or a file, retries with backoff: the shared
  client's (tunelab/client.py).
- Nothing asked twice: answers are cached as they arrive (ask.py).
- An answer off `--json-schema` is asked again with the error shown (schema.py), then set aside.
- A failed input is set aside in a rejects file with its reason instead of stopping the run.

The training file is written beside `--out` and renamed when complete, rows in input order.
Synthesis of new inputs (`tunelab data synth`) is in synth.py and ends here, in `label`.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.client import Failure
from tunelab.errors import UserError, check_not_kernel_folder, check_output_beside, check_output_file
from tunelab.files import write_jsonl_atomic
from tunelab.teacher.ask import Cache, Teacher, TeacherClient, connect, run_pool
from tunelab.teacher.schema import answer_problem, strip_fence


def read_inputs(path: Path) -> list[tuple[int, list[dict[str, str]]]]:
    """(line, conversation to answer) per input: a `.txt` file holds one input per non-empty line;
    a data file (JSONL, CSV, Parquet) holds rows in any accepted shape, answers optional and unused."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        from tunelab.data.load import text_lines

        if not path.is_file():
            raise UserError(f"{path}: file not found")
        # As for the data files: a byte-order mark is dropped, a byte that is not UTF-8 named with its line.
        inputs = [(number, [{"role": "user", "content": line.strip()}])
                  for number, line in text_lines(path) if line.strip()]
        if not inputs:
            raise UserError(f"{path}: no inputs found; the file is empty")
        return inputs
    from tunelab.data.load import load_examples

    return [(e.line, e.prompt_messages()) for e in load_examples(path, require_answer=False)]


def read_shots(path: Path) -> list[list[dict[str, str]]]:
    """Few-shot examples: rows with their answers, in any accepted shape (system messages left out)."""
    from tunelab.data.load import load_examples

    if Path(path).suffix.lower() == ".txt":
        raise UserError(f"{path}: few-shot examples need answers; give rows such as "
                        '{"prompt": ..., "completion": ...} in a .jsonl file')
    return [[m for m in e.messages if m["role"] != "system"] for e in load_examples(path)]


@dataclass
class Paths:
    """The files of one `data label` or `data synth` run, all beside --out."""

    out: Path
    """The training file, written beside it and renamed when complete."""

    @property
    def cache(self) -> Path:
        """Folder of cached answers: keep it to rerun without asking the teacher again."""
        return self.out.with_name(self.out.stem + ".cache")

    @property
    def rejects(self) -> Path:
        """Inputs that got no usable answer, one JSON line each with the reason."""
        return self.out.with_name(self.out.stem + ".rejects.jsonl")


def prepare(teacher: Teacher, out: Path, allow_remote: bool, api_key: str | None) -> tuple[Paths, TeacherClient]:
    """The run's files and its client, once every file it writes and the teacher are checked
    (nothing sent yet)."""
    paths = Paths(out)
    check_not_kernel_folder(out, "--out")
    check_output_file(out, "--out")
    if out.suffix.lower() != ".jsonl":
        raise UserError(f"--out {out}: the training file is JSON lines; name it e.g. {out.with_suffix('.jsonl')}")
    if out.exists():
        raise UserError(f"--out {out}: already exists; remove it or choose another name "
                        f"(answers already received stay cached in {paths.cache})")
    check_output_beside(paths.cache, "--out", out, "the answer cache", folder=True)
    check_output_beside(paths.cache / "answers.jsonl", "--out", out, "the cached answers")
    check_output_beside(paths.rejects, "--out", out, "the rejects file")
    chat = connect(teacher, allow_remote, api_key)
    try:
        return paths, TeacherClient(teacher, chat, Cache(paths.cache))
    except BaseException:
        chat.close()
        raise


def label_one(client: TeacherClient, conversation: list[dict[str, str]]) -> tuple[str, str]:
    """(answer, time) for one input; an answer off the schema is asked again, showing what was wrong."""
    teacher = client.teacher
    messages = teacher.messages_for(conversation)
    for _ in range(teacher.reasks + 1):
        answer, received = client.ask(messages, temperature=0.0, structured=True)
        if teacher.schema is None:
            return answer, received
        problem = answer_problem(answer, teacher.schema)
        if problem is None:
            return strip_fence(answer), received
        messages = [*messages, {"role": "assistant", "content": answer},
                    {"role": "user", "content": f"That answer does not match the JSON schema: {problem[1]}. "
                                                "Answer again with only the corrected JSON."}]
    raise Failure(*problem, answer=answer)


def label(inputs: list[tuple[int, list[dict[str, str]]]], client: TeacherClient, paths: Paths,
          extra: dict[str, Any] | None = None) -> Counter:
    """Label every input, write the training file and the rejects file; counts of failures by reason."""
    teacher = client.teacher
    results = run_pool(client, [conversation for _, conversation in inputs], lambda c: label_one(client, c))
    provenance = {"teacher": client.url, "model": teacher.model, "prompt_hash": teacher.prompt_hash(), **(extra or {})}
    failures: Counter = Counter()
    rows, rejects = [], []
    for (line, conversation), result in zip(inputs, results):
        if isinstance(result, Failure):
            failures[result.reason] += 1
            rejects.append({"line": line, "messages": conversation, "reason": result.reason, "detail": result.detail,
                            **({"answer": result.answer} if result.answer is not None else {})})
            continue
        answer, received = result
        rows.append({"messages": [*conversation, {"role": "assistant", "content": answer}],
                     "metadata": {**provenance, "time": received, "line": line}})
    if not rows:
        write_jsonl_atomic(paths.rejects, rejects)
        counts = ", ".join(f"{reason} {count}" for reason, count in failures.most_common())
        raise UserError(f"--teacher {teacher.url}: no input got a usable answer ({counts}); "
                        f"the reasons are listed in {paths.rejects}")
    write_jsonl_atomic(paths.out, rows)
    if rejects:
        write_jsonl_atomic(paths.rejects, rejects)
    elif paths.rejects.exists():
        paths.rejects.unlink()  # from an earlier run whose failures are now answered
    print(f"{len(rows)} of {len(inputs)} inputs labelled in {paths.out} "
          f"({client.asked} requests to the teacher, {client.cached} answers from {paths.cache})")
    if failures:
        counts = ", ".join(f"{reason} {count}" for reason, count in failures.most_common())
        print(f"tunelab: {sum(failures.values())} inputs failed ({counts}); listed in {paths.rejects}. "
              f"Remove {paths.out} and run again to retry them; answers received are kept.", file=sys.stderr)
    return failures


def cli_label(inputs_path: Path, teacher: Teacher, out: Path, allow_remote: bool,
              api_key: str | None = None) -> Counter:
    """`tunelab data label INPUTS --teacher URL --model NAME ... --out FILE`"""
    inputs = read_inputs(inputs_path)
    paths, client = prepare(teacher, out, allow_remote, api_key)
    try:
        return label(inputs, client, paths)
    except KeyboardInterrupt:
        say_interrupted(client, paths)
        raise
    finally:
        client.close()


def say_interrupted(client: TeacherClient, paths: Paths) -> None:
    """The one line after Ctrl-C: what is kept and how to go on (the CLI then exits with 130)."""
    print(f"tunelab: interrupted: {client.cache.answers()} answers are cached in {paths.cache}; "
          "run the same command to continue (cached answers are not asked again)", file=sys.stderr)
