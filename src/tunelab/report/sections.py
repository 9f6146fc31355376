"""The numbers of a run's page, arranged as tables for the templates: which cell is the best of
its row (in the right direction: lower is better for losses and hallucinated values), how each
number is written, which rows and columns a section has. Everything here is plain text; the
templates escape it.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from markupsafe import Markup, escape

from tunelab.evaluate.results import EvalResults, Interval, Sample

METRICS = {
    # key in eval.json: (label, format, higher is better)
    "exact_match": ("exact match", "percent", True),
    "word_f1": ("word F1", "percent", True),
    "token_f1": ("token F1", "percent", True),
    "rouge_l": ("ROUGE-L", "percent", True),
    "valid_json": ("valid JSON", "percent", True),
    "field_accuracy": ("field accuracy", "percent", True),
    "hallucinated_values": ("hallucinated values", "percent", False),
    "assertions_passed": ("assertions passed", "percent", True),
    "judge": ("judge's grade", "percent", True),
    "heldout_loss": ("held-out loss", "number", False),
    "perplexity": ("perplexity", "number", False),
}
"""How each metric of eval.json is shown; one it does not list is shown under its own key."""

COST = {"prompt_tokens": ("prompt tokens", False), "generated_tokens": ("generated tokens", False),
        "seconds_per_request": ("seconds / request", False), "requests_per_second": ("requests / second", True),
        "seconds": ("seconds in all", False)}

BUCKET_COLOURS = {"correct": "#3a8a3a", "wrong": "#c0392b", "hallucinated value": "#8e44ad",
                  "invalid format": "#d68910", "empty": "#7f8c8d", "no stop": "#2874a6", "repetition loop": "#a04000"}

SHOWN_SAMPLES = 40
"""Side-by-side answers shown on a run's page (the tuned model's mistakes first)."""

MOSTLY_EMPTY = 0.5
"""A contender with more than this share of empty answers gets a banner at the top of its page."""


@dataclass
class Cell:
    text: str = "–"
    note: str = ""
    """Shown small after the text: an interval, a share."""
    style: str = ""
    """The cell's class: best, na, up, down."""


NA = Cell(style="na")


@dataclass
class Row:
    label: str
    cells: list[Cell]
    note: str = ""
    """Shown small after the label."""
    code: bool = False
    """The label is a name from the data (a JSON field)."""


@dataclass
class Table:
    head: list[str]
    rows: list[Row]
    corner: str = ""
    """The top-left header cell."""
    models: dict[str, str] = field(default_factory=dict)
    """Per column, a model name shown under it (endpoint contenders)."""


def metric_label(key: str) -> tuple[str, str, bool]:
    return METRICS.get(key, (key.replace("_", " "), "number", True))


def metrics_table(results: EvalResults) -> Table | None:
    names, table = results.names, results.metrics
    if not names or not table:
        return None
    rows = []
    for key in ordered_keys([table.get(name, {}) for name in names]):
        label, kind, higher = metric_label(key)
        entries = {name: table.get(name, {}).get(key) for name in names}
        winners = best_of({name: e.value for name, e in entries.items() if e}, higher)
        rows.append(Row(label, [interval_cell(entries[name], kind, name in winners) for name in names]))
    models = {c.name: c.model for c in results.contenders if c.kind == "endpoint" and c.model}
    return Table(names, rows, models=models)


def interval_cell(entry: Interval | None, kind: str, best: bool) -> Cell:
    if entry is None or entry.value is None:
        return NA
    note = (f"[{number(entry.low, kind)}, {number(entry.high, kind)}]"
            if entry.low is not None and entry.high is not None else "")
    return Cell(number(entry.value, kind), note, "best" if best else "")


def has_intervals(results: EvalResults) -> bool:
    return any(e.low is not None for table in results.metrics.values() for e in table.values())


def fields_table(results: EvalResults) -> Table | None:
    fields = {name: table for name, table in results.fields.items() if table}
    if not fields:
        return None
    rows = []
    for path in ordered_keys(list(fields.values())):
        winners = best_of({name: table.get(path) for name, table in fields.items()}, True)
        rows.append(Row(path, [NA if table.get(path) is None else
                               Cell(number(table[path], "percent"), style="best" if name in winners else "")
                               for name, table in fields.items()], code=True))
    return Table(list(fields), rows)


def verdict(results: EvalResults) -> str:
    """On exact match, which contenders the tuned model beats, loses to, or cannot be told apart
    from at the 95% level; "" without differences."""
    beats, loses, ties = [], [], []
    for d in results.differences:
        if d.metric != "exact_match":
            continue
        text = f"{d.contender} ({signed(d.difference)} points)"
        (beats if d.low > 0 else loses if d.high < 0 else ties).append(text)
    parts = [f"beats {', '.join(beats)}" if beats else "", f"loses to {', '.join(loses)}" if loses else "",
             f"cannot be told apart from {', '.join(ties)}" if ties else ""]
    return "; ".join(p for p in parts if p)


def empty_answer_banners(results: EvalResults) -> list[tuple[str, int, int, str]]:
    """(contender, empty answers, answers, likely cause) per contender whose answers are mostly
    empty: the model ends its turn at once, or it reached the token limit without visible text."""
    banners = []
    for name, table in results.buckets.items():
        total, empty = sum(table.values()), table.get("empty", 0)
        if not total or empty <= MOSTLY_EMPTY * total:
            continue
        answers = [s.answers[name] for s in results.samples if name in s.answers]
        answers = [a for a in answers if a.bucket == "empty"]
        at_limit = sum(a.stopped is False for a in answers)
        if answers and at_limit > len(answers) / 2:
            cause = (f"they reached the token limit ({results.max_new_tokens or '?'} new tokens) without "
                     "any visible text, only spaces or special tokens: check the chat template the run uses, "
                     "or raise --max-new-tokens")
        else:
            cause = ("the model ends its turn at once. A fine-tuned model does that when it learned the "
                     "end-of-turn token too early: training answers that are empty or cut away by --max-length "
                     "(see the data check), or too high a learning rate; a base model, when the prompt "
                     "does not suit it")
        banners.append((name, empty, total, cause))
    return banners


def differences_table(results: EvalResults) -> Table | None:
    """The tuned model minus each other contender, with the examples only one of them gets right."""
    if not results.differences:
        return None
    lines = {s.index: s.line for s in results.samples}
    metrics = ordered_keys([{d.metric: None} for d in results.differences])
    rows = []
    for other in ordered_keys([{d.contender: None} for d in results.differences]):
        mine = {d.metric: d for d in results.differences if d.contender == other}
        cells = []
        for metric in metrics:
            d = mine.get(metric)
            if not d:
                cells.append(NA)
                continue
            style = "up" if d.low > 0 else "down" if d.high < 0 else ""
            cells.append(Cell(signed(d.difference), f"[{signed(d.low)}, {signed(d.high)}]", style))
        first = next(iter(mine.values()))
        cells += [line_list(first.tuned_only_right, lines), line_list(first.contender_only_right, lines)]
        rows.append(Row(f"tuned − {other}", cells))
    return Table([metric_label(m)[0] for m in metrics] + ["only tuned right", "only the other right"], rows)


def line_list(indices: list[int], lines: dict, shown: int = 8) -> Cell:
    if not indices:
        return Cell("none", style="na")
    named = [str(lines.get(i) if lines.get(i) is not None else f"#{i}") for i in indices[:shown]]
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return Cell(f"{len(indices)}: lines {', '.join(named)}{more}")


def novelty_table(results: EvalResults) -> Table | None:
    """Exact match on the rows holding a value training never showed, and on the rows holding
    only values seen in training."""
    found = results.novelty
    if not found or not found.values:
        return None
    names = [name for name in results.names if name in found.accuracy]
    rows = []
    for kind, label, count in (("novel", "rows with a novel value", found.novel_rows),
                               ("seen", "rows with only seen values", found.seen_rows)):
        entries = {name: found.accuracy[name].get(kind) for name in names}
        winners = best_of({n: e.value for n, e in entries.items() if e}, True)
        rows.append(Row(label, [interval_cell(entries[n], "percent", n in winners) for n in names], f"({count})"))
    return Table(names, rows, corner="exact match on")


def buckets_view(results: EvalResults) -> list[tuple[str, list[int], list[tuple[float, str, str]]]]:
    """Per contender: its name, its count per bucket (in `bucket_names` order) and the segments
    (width in %, colour, bucket) of its bar."""
    names = bucket_names(results)
    rows = []
    for name, table in results.buckets.items():
        total = sum(table.values()) or 1
        bar = [(100 * table[b] / total, bucket_colour(b), b) for b in names if table.get(b)]
        rows.append((name, [table.get(b, 0) for b in names], bar))
    return rows


def bucket_names(results: EvalResults) -> list[str]:
    return ordered_keys(list(results.buckets.values()))


def bucket_colour(bucket: str) -> str:
    return BUCKET_COLOURS.get(bucket, "#999")


def bucket_examples(results: EvalResults) -> list[tuple[str, str, list[tuple[int | None, str]]]]:
    """(contender, bucket, [(line, answer)]) for each bucket but `correct`."""
    samples = {s.index: s for s in results.samples}
    blocks = []
    for name, table in results.bucket_examples.items():
        for bucket, indices in table.items():
            if bucket != "correct":
                blocks.append((name, bucket, [(samples[i].line, answer_text(samples[i], name))
                                              for i in indices if i in samples]))
    return blocks


def answer_text(sample: Sample, name: str) -> str:
    answer = sample.answers.get(name)
    return answer.text if answer else ""


def cost_table(results: EvalResults) -> Table | None:
    if not results.cost:
        return None
    rows = []
    for key, (label, higher) in COST.items():
        values = {name: getattr(cost, key) for name, cost in results.cost.items()}
        winners = best_of(values, higher) if key != "seconds" else set()
        rows.append(Row(label, [Cell(number(v, "cost"), style="best" if n in winners else "")
                                for n, v in values.items()]))
    return Table(list(results.cost), rows)


def assertions_table(results: EvalResults) -> Table | None:
    """Per rule of the user's assertions file, how many answers of each contender pass it."""
    checked = results.assertions.results if results.assertions else {}
    if not checked:
        return None
    rows = []
    for rule in [*ordered_keys([table.rules for table in checked.values()]), None]:  # None: every rule
        passed = {name: table.all_passed if rule is None else table.rules.get(rule)
                  for name, table in checked.items()}
        shares = {name: count / checked[name].answers for name, count in passed.items()
                  if count is not None and checked[name].answers}
        winners = best_of(shares, True)
        rows.append(Row("every rule" if rule is None else rule,
                        [Cell(str(passed[name]), number(shares[name], "percent"), "best" if name in winners else "")
                         if name in shares else NA for name in checked]))
    return Table(list(checked), rows)


def forgetting_table(results: EvalResults) -> Table | None:
    if not results.forgetting or not results.forgetting.results:
        return None
    scored = results.forgetting.results
    rows = []
    for key, label in (("accuracy", "accuracy"), ("accuracy_per_token", "accuracy, length-normalised")):
        values = {name: getattr(score, key) for name, score in scored.items()}
        winners = best_of(values, True)
        rows.append(Row(label, [Cell(number(v, "percent"), style="best" if n in winners else "")
                                for n, v in values.items()]))
    return Table(list(scored), rows)


def questions_file(file: str) -> str:
    """The forgetting questions' file by its name: tunelab's own set is named as bundled,
    wherever tunelab is installed (the full path is shown on hover)."""
    path = Path(file)
    return f"{path.name} (bundled with tunelab)" if path.parent.parts[-2:] == ("tunelab", "examples") else path.name


def copy_constraint_table(results: EvalResults) -> Table | None:
    """How many answers of each contender the copy constraint changed (copying.py)."""
    copying, total = results.copy_constraint, results.examples_evaluated
    if not copying:
        return None
    cells = [Cell(str(count), number(count / total, "percent") if total else "") for count in copying.changed.values()]
    return Table(list(copying.changed), [Row("answers changed", cells)])


def invented_names_table(results: EvalResults) -> Table | None:
    """Per contender, the plain-text answers holding an invented name (evaluate/names.py), and the
    first few of them: the sample's line and the words."""
    found, total = results.invented_names, results.examples_evaluated
    if not found:
        return None
    lines = {s.index: s.line for s in results.samples}
    counts = [Cell(str(count), number(count / total, "percent") if total else "") for count in found.answers.values()]
    shown = [Cell("; ".join(f"line {lines.get(e.index) or e.index + 1}: {', '.join(e.words)}"
                            for e in found.examples.get(name, [])) or "-") for name in found.answers]
    return Table(list(found.answers), [Row("answers with one", counts), Row("examples", shown)])


def answer_bucket(sample: Sample, name: str) -> str:
    """The answer's bucket; files of the first shape have none, and then an exact match says
    "correct" as `tunelab eval` decides it."""
    answer = sample.answers.get(name)
    if answer and answer.bucket:
        return answer.bucket
    from tunelab.evaluate.metrics import exact_match  # here: metrics imports numpy, which the report needs not

    return "correct" if exact_match(answer_text(sample, name), sample.reference) else ""


def samples_view(results: EvalResults) -> tuple[str, list[Sample]]:
    """The contender whose mistakes come first (tuned, or the last one), and the samples shown."""
    names = results.names
    tuned = "tuned" if "tuned" in names else (names[-1] if names else "")
    order = sorted(results.samples, key=lambda s: answer_bucket(s, tuned) == "correct")  # stable: in order
    return tuned, order[:SHOWN_SAMPLES]


def word_diff(answer: str, reference: str) -> Markup:
    """The answer as HTML, its words compared with the reference's: <mark> on words the reference
    lacks, <del> on reference words the answer lacks (words and punctuation marks are the units,
    so a changed JSON value is marked alone rather than with its quotes). Every piece of text is
    escaped before it is wrapped."""
    if not answer.strip():
        return Markup("<span class=empty>(empty)</span>")
    ours, theirs = tokens(answer), tokens(reference)
    matcher = difflib.SequenceMatcher(None, [t for _, t in ours], [t for _, t in theirs], autojunk=False)
    out = []
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op in ("replace", "delete") and a2 > a1:
            out.append(Markup("{}<mark>{}</mark>").format(ours[a1][0], "".join(s + t for s, t in ours[a1:a2]).lstrip()))
        if op in ("replace", "insert") and b2 > b1:
            out.append(Markup("<del>{}</del>").format("".join(s + t for s, t in theirs[b1:b2])))
        if op == "equal":
            out.append(escape("".join(s + t for s, t in ours[a1:a2])))
    return Markup("").join(out)


def tokens(text: str) -> list[tuple[str, str]]:
    """(whitespace before, token) pairs: words and single punctuation marks."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(\s*)(\w+|[^\w\s])", text)]


# ---- numbers ------------------------------------------------------------------------------------

def best_of(values: dict[str, float | None], higher: bool) -> set[str]:
    """The keys holding the best value, or none when fewer than two compare or all are equal."""
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if len(finite) < 2 or len(set(finite.values())) == 1:
        return set()
    target = max(finite.values()) if higher else min(finite.values())
    return {k for k, v in finite.items() if v == target}


def ordered_keys(dicts: list[dict]) -> list[str]:
    keys: list[str] = []
    for entry in dicts:
        keys += [k for k in entry if k not in keys]
    return keys


def number(value: float, kind: str) -> str:
    if kind == "percent" and -1.0001 <= value <= 1.0001:
        return f"{100 * value:.1f}%"
    if kind == "count" or (isinstance(value, int) and not isinstance(value, bool)):
        return str(int(value))
    if not math.isfinite(value):
        return str(value)
    if kind == "cost":  # token counts, seconds and rates: three significant digits say enough
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"


def signed(value: float) -> str:
    return f"{100 * value:+.1f}"
