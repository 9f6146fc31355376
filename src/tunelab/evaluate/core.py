"""Did fine-tuning beat prompting, where does it fail, and what does each answer cost?

Contenders answer the same questions with greedy decoding:
- `zero-shot`: the base model, the question alone;
- `few-shot`: the base model with the same K training examples before every question;
- `retrieval`: the base model with the K training examples most similar to each question;
- `tuned`: the fine-tuned model;
- any model behind an OpenAI-compatible endpoint (`--contender NAME=URL#MODEL`).
Where the run has copied fields (copying.py), every local contender decodes with the copy
constraint (it comes from the user's data, not from the fine-tune, so the comparison stays
fair), unless `--no-copy-constraint`. The base model is loaded once for its three contenders;
prompt building is in baselines.py, metrics and buckets in metrics.py, assertions in
assertions.py, the multiple-choice forgetting check in forgetting.py, endpoints and the judge
in judge.py.

RUN/eval.json is an `EvalResults` (results.py, where each section is described), written
beside and renamed, so it is either whole or absent. The text `tunelab eval` prints is at the
end of this module: the same numbers, contenders as columns.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data import novelty
from tunelab.data.copied import TEXT_ANSWER
from tunelab.data.load import Example, iter_examples, load_examples, read_jsonl, split_example
from tunelab.decoding.generate import Answer, generate_detailed
from tunelab.device import autocast, casts_kept, computes_bf16, release_freed_memory
from tunelab.encoding import encode_examples
from tunelab.errors import UserError
from tunelab.evaluate import metrics
from tunelab.evaluate import results as saved  # saved.Contender, saved.Answer: as eval.json holds them
from tunelab.evaluate.baselines import few_shot_prompts, retrieval_prompts, user_text
from tunelab.evaluate.endpoint import Endpoint
from tunelab.evaluate.forgetting import DEFAULT_QUESTIONS
from tunelab.evaluate.names import invented_names
from tunelab.evaluate.results import (
    Assertions,
    CopyConstraint,
    Cost,
    Difference,
    EvalResults,
    Forgetting,
    ForgettingScore,
    Interval,
    Judge,
    Novelty,
    RuleResults,
    Sample,
    as_results,
)
from tunelab.runfolder import RunFiles
from tunelab.text import parse_json_answer
from tunelab.train.loss import heldout_loss

LOCAL = ("zero-shot", "few-shot", "retrieval", "tuned")
WARM_UP_TOKENS = 2
"""Tokens of the uncounted warm-up request each contender answers before it is timed."""
SCORES = ("exact_match", "token_f1", "rouge_l")


@dataclass
class Contender:
    """One column of the comparison: who answered, and the answers."""

    name: str
    """Column name: zero-shot, few-shot, retrieval, tuned, or an endpoint's NAME."""
    kind: str
    """"local" or "endpoint"."""
    model: str
    """The model's path or name."""
    prompt: str
    """How it was prompted: zero-shot, few-shot, retrieval, fine-tuned or endpoint."""
    answers: list[Answer] = field(default_factory=list)
    """One per example, in order."""
    seconds: float = 0.0
    """Wall time of all its answers."""


def load_labelled(path: Path) -> list[Example]:
    """Examples of a --data file, which must carry reference answers."""
    path = Path(path)
    try:
        return load_examples(path)
    except UserError:
        load_examples(path, require_answer=False)  # not even prompts: that error is the one to show
        first = next(item.line for item in iter_examples(path) if not isinstance(item, Example))
        raise UserError(f"--data {path}:{first}: no reference answer; evaluation compares answers with "
                        "references, so give every row a completion, output or last assistant turn") from None


def read_run_examples(files: RunFiles, path: Path) -> list[Example]:
    """The run's train.jsonl or test.jsonl, as training wrote it; a file cut short or damaged is
    one line naming its first bad line."""
    try:
        return read_jsonl(path)
    except FileNotFoundError:
        raise files.damaged(path, "missing") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                split_example(json.loads(line))
            except (ValueError, KeyError, TypeError) as e:
                problem = e.msg if isinstance(e, json.JSONDecodeError) else f"no {e}"
                raise files.damaged(Path(f"{path}:{number}"), f"not an example as training writes them "
                                                              f"({problem})") from None
    raise files.damaged(path, "not UTF-8 text")


def _progress(total: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name:>10}", unit="answer", file=sys.stderr, disable=not enabled, leave=False)


def _generate(model, template, prompts, max_new_tokens: int, batch_size: int, contender: Contender,
              progress: bool, copying, precision: str) -> None:
    # A short answer first, not timed: a model's first forward passes pay for allocations and
    # kernel set-up that no later request pays, and the cost per request should compare the
    # contenders, not which of them ran first.
    for _ in generate_detailed(model, template, prompts[:1], min(max_new_tokens, WARM_UP_TOKENS), 1, copying,
                               precision):
        pass
    started = time.perf_counter()
    with _progress(len(prompts), contender.name, progress) as bar:
        for answer in generate_detailed(model, template, prompts, max_new_tokens, batch_size, copying, precision):
            contender.answers.append(answer)
            bar.update()
    contender.seconds = time.perf_counter() - started


def evaluate(run, limit: int | None = None, batch_size: int = 32, max_new_tokens: int | None = None,
             include_base: bool = True, data: Path | None = None, shots: int = 3, retrieval: bool = True,
             endpoints: list[Endpoint] = (), assertions: Path | None = None,
             forgetting: Path | None = DEFAULT_QUESTIONS, judge: Endpoint | None = None, progress: bool = True,
             copy_constraint: bool = True) -> EvalResults:
    """Every contender on the same examples; results saved to RUN/eval.json and returned.
    `copy_constraint=False` decodes without the run's copy constraint. Nothing is written before
    the end, so Ctrl-C leaves the run as it was (one line says so); a judge that fails once the
    answers are made leaves them saved, ungraded (one line says so)."""
    try:
        results = _evaluate(run, limit, batch_size, max_new_tokens, include_base, data, shots, retrieval, endpoints,
                            assertions, forgetting, judge, progress, copy_constraint)
    except KeyboardInterrupt:
        before = "the eval.json from before is unchanged" if run.files.eval.exists() else "there is no eval.json"
        print(f"tunelab: interrupted: nothing was saved (eval.json is written only at the end; {before}); run "
              f"`tunelab eval {run.path}` again, with --limit N to evaluate fewer examples", file=sys.stderr)
        raise
    if results.judge and results.judge.failed:
        print(f"tunelab: warning: the judge failed after every answer was made ({results.judge.failed}); "
              f"{run.files.eval} keeps the answers and metrics without the judge's grades", file=sys.stderr)
    return results


def _evaluate(run, limit: int | None, batch_size: int, max_new_tokens: int | None, include_base: bool,
              data: Path | None, shots: int, retrieval: bool, endpoints: list[Endpoint], assertions: Path | None,
              forgetting: Path | None, judge: Endpoint | None, progress: bool, copy_constraint: bool) -> EvalResults:
    from tunelab.evaluate import assertions as assertions_mod
    from tunelab.evaluate import forgetting as forgetting_mod

    # Every input is read and checked before the first model loads.
    source = Path(data) if data else run.files.test
    examples = (load_labelled(source) if data else read_run_examples(run.files, source))[:limit]
    if not examples:
        raise UserError(f"{run.path}: the run has no held-out examples; train with --test-size above 0, "
                        "or evaluate a labelled file with --data FILE")
    if any(e.is_raw for e in examples):
        raise UserError(f"{run.path}: a raw-text run has no answers to compare; its held-out loss is in "
                        f"{run.files.metrics}")
    train = read_run_examples(run.files, run.files.train)  # for the few-shot prompts and the novelty
    rules = assertions_mod.load_rules(assertions) if assertions else None
    questions = forgetting_mod.load_questions(forgetting) if forgetting else None
    tokenizer = run.tokenizer
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples)
        max_new_tokens = min(512, int(longest * 1.5) + 16)

    prompts = [e.prompt_messages() for e in examples]
    copying = run.copy_rule(copy_constraint)
    if judge:  # reached once now, so an unreachable judge fails before the models run, not after
        judge.complete([{"role": "user", "content": "Reply with the word OK."}], max_tokens=2)
    contenders: list[Contender] = []
    for endpoint in endpoints:  # first: an unreachable URL fails before any local work
        contender = Contender(endpoint.name, "endpoint", endpoint.model, "endpoint")
        # The uncounted warm-up request, as for local contenders; a bad URL fails here, before
        # any progress bar.
        endpoint.answer(prompts[0], WARM_UP_TOKENS)
        started = time.perf_counter()
        with _progress(len(prompts), endpoint.name, progress) as bar:
            contender.answers = endpoint.answers(prompts, max_new_tokens, progress=bar)
        contender.seconds = time.perf_counter() - started
        contenders.append(contender)

    encoded, _ = encode_examples(examples, run.template, max_length=run.config.max_length, truncation="truncate")
    losses: dict[str, float] = {}
    forgotten: dict[str, dict] = {}
    local: list[Contender] = []
    if include_base:
        base_path = str(run.base_path())
        base = run.base_model()
        variants = [("zero-shot", prompts)]
        if shots and train:
            variants.append(("few-shot", few_shot_prompts(prompts, train, shots)))
            if retrieval:
                variants.append(("retrieval", retrieval_prompts(prompts, train, shots)))
        for name, variant in variants:
            contender = Contender(name, "local", base_path, name)
            _generate(base, run.template, variant, max_new_tokens, batch_size, contender, progress, copying,
                      run.precision)
            local.append(contender)
        with casts_kept(base), autocast(run.precision, base.device):
            losses["zero-shot"] = heldout_loss(base, encoded)
        # The forgetting check stays in fp32 whatever the run's precision: it compares the close
        # log-likelihoods of a few choices, and bf16 flipped 2 of the demo base model's 42
        # answers (a spurious 5-point loss for the tuned model). fp32 costs ~5 s more a model.
        if questions:
            forgotten["zero-shot"] = forgetting_mod.accuracy(base, run.template, questions)
        del base
        release_freed_memory()  # the base model's weights and caches, before the tuned model loads
    tuned_model = run.model()
    tuned = Contender("tuned", "local", str(run.path), "fine-tuned")
    _generate(tuned_model, run.template, prompts, max_new_tokens, batch_size, tuned, progress, copying, run.precision)
    local.append(tuned)
    with casts_kept(tuned_model), autocast(run.precision, tuned_model.device):
        losses["tuned"] = heldout_loss(tuned_model, encoded)
    if questions:
        forgotten["tuned"] = forgetting_mod.accuracy(tuned_model, run.template, questions)
    contenders = local + contenders

    scored = score(examples, contenders, judge, rules, assertions)
    for name, loss in losses.items():
        scored.metrics[name]["heldout_loss"] = Interval(value=loss)
        scored.metrics[name]["perplexity"] = Interval(value=math.exp(min(loss, 50)))
    results = scored.model_copy(update={
        "run": str(run.path), "data": str(source), "max_new_tokens": max_new_tokens, "shots": shots,
        "precision": "bf16" if computes_bf16(run.precision, tuned_model.device) else "fp32",
        "device": tuned_model.device.type, "threads": run.threads,
        "forgetting": Forgetting(file=str(forgetting), questions=len(questions),
                                 results={name: ForgettingScore.model_validate(found)
                                          for name, found in forgotten.items()}) if questions else None,
        "copy_constraint": CopyConstraint(fields=sorted(copying.fields),
                                          changed={c.name: sum(a.copy_changed for a in c.answers) for c in local})
        if copying else None,
        "novelty": novelty_results(examples, run.files.train, scored.samples, train),
        "invented_names": invented_names(examples, scored.samples, train),
    })
    results.write(run.files.eval)
    return results


def score(examples: list[Example], contenders: list[Contender], judge: Endpoint | None = None, rules=None,
          rules_file: Path | None = None) -> EvalResults:
    """Every metric, bucket, difference and cost of the contenders' answers, and their assertions
    (`rules`, read from `rules_file`) and judge's grades (no model needed)."""
    from tunelab.evaluate import assertions as assertions_mod
    from tunelab.evaluate.judge import judge as grade

    prompt_texts = ["\n".join(m["content"] for m in e.prompt_messages()) for e in examples]
    questions = [user_text(e.prompt_messages()) for e in examples]
    references = [e.reference for e in examples]
    is_json = all(parse_json_answer(r) is not None for r in references)
    extractive = metrics.extractive_paths(prompt_texts, references)
    out = EvalResults(examples_evaluated=len(examples), extractive_fields=sorted(extractive),
                      assertions=Assertions(file=str(rules_file), results={}) if rules else None,
                      judge=Judge(url=judge.url, model=judge.model) if judge else None,
                      samples=[Sample(index=i, line=e.line, prompt=questions[i], reference=e.reference)
                               for i, e in enumerate(examples)])
    per_example: dict[str, dict[str, list[float]]] = {}
    for c in contenders:
        texts = [a.text for a in c.answers]
        rows = {m: [getattr(metrics, m)(t, r) for t, r in zip(texts, references)] for m in SCORES}
        table = {m: _summary(rows[m]) for m in SCORES}
        if is_json:
            fields = [metrics.json_fields(t, r) for t, r in zip(texts, references)]
            table["valid_json"] = _summary([float(parse_json_answer(t) is not None) for t in texts])
            table["field_accuracy"] = _summary([sum(f.values()) / max(len(f), 1) for f in fields])
            paths = sorted({p for f in fields for p in f})
            out.fields[c.name] = {p: sum(f.get(p, False) for f in fields) / sum(p in f for f in fields) for p in paths}
        counted = [metrics.hallucinated_values(t, p, extractive, r) for t, p, r in zip(texts, prompt_texts, references)]
        if extractive and sum(n for n, _ in counted):
            values, made_up = [n for n, _ in counted], [h for _, h in counted]
            low, high = metrics.bootstrap_interval(made_up, values)
            table["hallucinated_values"] = Interval(value=sum(made_up) / sum(values), low=low, high=high)
        failures = [[] for _ in texts]
        if rules:
            checked = assertions_mod.apply(rules, questions, texts)
            failures = checked.failures
            out.assertions.results[c.name] = RuleResults.model_validate(checked.as_dict(len(texts)))
            table["assertions_passed"] = _summary([float(not f) for f in failures])
        grades = [None] * len(texts)
        if judge and not out.judge.failed:
            try:
                grades = grade(judge, questions, references, texts)
            except UserError as e:
                # Every answer is made by now: keep them, without grades, rather than lose them all.
                out.judge.failed = str(e)
            graded = [g for g in grades if g is not None]
            out.judge.ungraded[c.name] = len(grades) - len(graded)
            if graded:
                table["judge"] = _summary(graded)
        buckets = [metrics.bucket(a.text, r, a.stopped, h) for a, r, (_, h) in zip(c.answers, references, counted)]
        out.buckets[c.name] = {b: buckets.count(b) for b in metrics.BUCKETS}
        out.bucket_examples[c.name] = {b: [i for i, x in enumerate(buckets) if x == b][:5]
                                       for b in metrics.BUCKETS if b in buckets}
        out.metrics[c.name] = table
        out.contenders.append(saved.Contender(name=c.name, kind=c.kind, model=c.model, prompt=c.prompt))
        n = len(c.answers)
        out.cost[c.name] = Cost(prompt_tokens=sum(a.prompt_tokens for a in c.answers) / n,
                                generated_tokens=sum(a.generated_tokens for a in c.answers) / n,
                                seconds_per_request=c.seconds / n, requests_per_second=n / max(c.seconds, 1e-9),
                                seconds=c.seconds)
        per_example[c.name] = rows
        for i, (a, sample) in enumerate(zip(c.answers, out.samples)):
            sample.answers[c.name] = saved.Answer(
                text=a.text, bucket=buckets[i], **{m: rows[m][i] for m in SCORES}, prompt_tokens=a.prompt_tokens,
                generated_tokens=a.generated_tokens, stopped=a.stopped, copy_changed=a.copy_changed,
                assertions_failed=failures[i], judge=grades[i])
    if judge and out.judge.failed:  # a column graded in part would not compare
        out.judge.ungraded = {}
        for table in out.metrics.values():
            table.pop("judge", None)
        for sample in out.samples:
            for answer in sample.answers.values():
                answer.judge = None
    if "tuned" in per_example:
        tuned_right = {i for i, d in enumerate(per_example["tuned"]["exact_match"]) if d}
        for c in contenders:
            if c.name == "tuned":
                continue
            other_right = {i for i, d in enumerate(per_example[c.name]["exact_match"]) if d}
            for m in SCORES:
                diffs = [t - o for t, o in zip(per_example["tuned"][m], per_example[c.name][m])]
                low, high = metrics.bootstrap_interval(diffs)
                out.differences.append(Difference(
                    contender=c.name, metric=m, difference=sum(diffs) / len(diffs), low=low, high=high,
                    tuned_only_right=sorted(tuned_right - other_right),
                    contender_only_right=sorted(other_right - tuned_right)))
    return out


def novelty_results(examples: list[Example], train_file: Path, samples: list[Sample],
                    train: list[Example] | None = None) -> Novelty:
    """eval.json's "novelty": the examples' answer values against the run's training answers
    (`train`, read from `train_file` if not given), and each contender's exact match on rows with
    a novel value and rows with only seen ones. Marks each sample with its row's kind."""
    train = read_jsonl(train_file) if train is None else train
    training = (novelty.value_hashes(e.reference) for e in train if not e.is_raw)
    measured = novelty.measure(training, (novelty.value_hashes(e.reference) for e in examples))
    for sample, kind in zip(samples, measured.kinds):
        sample.novelty = kind
    names = list(samples[0].answers) if samples else []
    accuracy = {name: metrics.accuracy_by_kind(measured.kinds, [s.answers[name].exact_match for s in samples])
                for name in names}
    return Novelty.model_validate({"training_file": str(train_file), **measured.to_dict(), "accuracy": accuracy})


def _summary(values: list[float]) -> Interval:
    low, high = metrics.bootstrap_interval(values)
    return Interval(value=sum(values) / len(values), low=low, high=high)


# Printing: the same numbers as eval.json, contenders as columns.

ROWS = [("exact match", "exact_match", "pct"), ("token F1", "token_f1", "pct"), ("ROUGE-L", "rouge_l", "pct"),
        ("valid JSON", "valid_json", "pct"), ("field accuracy", "field_accuracy", "pct"),
        ("hallucinated values", "hallucinated_values", "pct"), ("assertions passed", "assertions_passed", "pct"),
        ("judge", "judge", "pct"), ("held-out loss", "heldout_loss", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}")]


def _cell(entry: Interval | None, style: str) -> str:
    if entry is None:
        return "-"
    if style != "pct":
        return style.format(entry.value)
    return f"{entry.value:.0%} ({entry.low:.0%}-{entry.high:.0%})"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(lines)


def format_table(results: EvalResults | dict) -> str:
    """Metrics as rows, contenders as columns, each rate with its 95% interval. Takes eval.json's
    dict too (the export's model card reads the file)."""
    results = as_results(results)
    rows = []
    for label, key, style in ROWS:
        cells = [_cell(results.metrics.get(n, {}).get(key), style) for n in results.names]
        if any(c != "-" for c in cells):
            rows.append([label, *cells])
    return _grid([f"{results.examples_evaluated} examples", *results.names], rows)


def format_buckets(results: EvalResults) -> str:
    rows = [[b, *[str(results.buckets[n][b]) for n in results.names]] for b in metrics.BUCKETS]
    return _grid(["answers", *results.names], rows)


def format_cost(results: EvalResults) -> str:
    names, cost = results.names, results.cost
    rows = [["prompt tokens", *[f"{cost[n].prompt_tokens:.0f}" for n in names]],
            ["generated tokens", *[f"{cost[n].generated_tokens:.1f}" for n in names]],
            ["seconds / request", *[f"{cost[n].seconds_per_request:.3f}" for n in names]],
            ["requests / second", *[f"{cost[n].requests_per_second:.1f}" for n in names]]]
    # The arithmetic and the device of the local contenders' answers (older eval.json files do not say).
    said = " on ".join(part for part in (results.precision, results.device) if part)
    title = f"cost per request ({said})" if said else "cost per request"
    return _grid([title, *names], rows)


def format_differences(results: EvalResults) -> str:
    lines = []
    for d in results.differences:
        if d.metric != "exact_match":
            continue
        lines.append(f"tuned - {d.contender}: exact match {d.difference:+.0%} (95% CI {d.low:+.0%} to "
                     f"{d.high:+.0%}); only tuned right: {len(d.tuned_only_right)}, only "
                     f"{d.contender} right: {len(d.contender_only_right)}")
    return "\n".join(lines)


def format_samples(results: EvalResults, count: int = 3) -> str:
    """A few examples side by side, those where the contenders disagree first."""
    samples = results.samples
    disagreeing = [s for s in samples if len({a.bucket for a in s.answers.values()}) > 1]
    lines = []
    for sample in (disagreeing + [s for s in samples if s not in disagreeing])[:count]:
        lines.append(f"- prompt:    {sample.prompt!r}")
        lines.append(f"  reference: {sample.reference!r}")
        for name, answer in sample.answers.items():
            lines.append(f"  {name + ':':11}{answer.text!r} [{answer.bucket}]")
    return "\n".join(lines)


def format_forgetting(results: EvalResults) -> str:
    f = results.forgetting
    if not f:
        return ""
    parts = [f"{name} {r.accuracy:.0%}" for name, r in f.results.items()]
    return f"forgetting check ({f.questions} multiple-choice questions, log-likelihood): " + ", ".join(parts)


def format_copy_constraint(results: EvalResults) -> str:
    copying = results.copy_constraint
    if not copying:
        return ""
    n = results.examples_evaluated
    counts = ", ".join(f"{name} {changed} of {n}" for name, changed in copying.changed.items())
    kept = ", ".join("the names of text answers" if f == TEXT_ANSWER else f for f in copying.fields)
    return (f"copy constraint on {kept} (values kept copies of the input; "
            f"--no-copy-constraint turns it off): answers it changed: {counts}")


def format_invented_names(results: EvalResults) -> str:
    found = results.invented_names
    if not found:
        return ""
    n = results.examples_evaluated
    counts = ", ".join(f"{name} {count} of {n}" for name, count in found.answers.items())
    lines = [f"invented names (a capitalised word or number in neither the input nor the reference): {counts}"]
    for name, shown in found.examples.items():
        lines.append(f"  {name}: " + "; ".join(f"#{e.index} {', '.join(e.words)}" for e in shown[:3]))
    return "\n".join(lines)


def format_novelty(results: EvalResults) -> str:
    """How new the evaluated answers are to training, and exact match on new vs seen values."""
    found = results.novelty
    if not found:
        return ""
    measured = novelty.Novelty(values=found.values, novel_values=found.novel_values, novel_rows=found.novel_rows,
                               seen_rows=found.seen_rows, without_values=found.rows_without_values)
    lines = [f"novelty: {measured.describe()}"]
    if not found.values:
        return lines[0]
    rows = []
    for kind, label in (("novel", "a novel value"), ("seen", "only seen values")):
        count = getattr(found, f"{kind}_rows")
        cells = [_cell(found.accuracy.get(n, {}).get(kind), "pct") for n in results.names]
        rows.append([f"rows with {label} ({count})", *cells])
    return lines[0] + "\n" + _grid(["exact match on", *results.names], rows)


def format_report(results: EvalResults | dict) -> str:
    """Everything `tunelab eval` prints."""
    results = as_results(results)
    sections = [format_table(results), format_differences(results), format_novelty(results), format_buckets(results),
                format_cost(results), format_forgetting(results), format_copy_constraint(results),
                format_invented_names(results), format_samples(results)]
    return "\n\n".join(s for s in sections if s)
