"""`tunelab report`: one self-contained HTML page per run, and a page that compares runs.

    RUN/report.html   written by `tunelab eval` (through `write_report`) and by `tunelab report RUN`
    comparison.html   `tunelab report RUN1 RUN2 ...`: the runs side by side, in the current folder
                      (or `--out FILE`); each run's own report.html is rebuilt too, and linked

A run's page shows what the run folder holds, each section only when its file is there: the
training and held-out loss curves (metrics.jsonl), the evaluation (eval.json: metrics with their
confidence intervals, differences between contenders, answer buckets, cost per request, the
forgetting check, and side-by-side answers with their differences from the reference), the data
check (data_check.json) and the settings (config.yaml, run.json). eval.json is read in the shape
evaluate.py describes (schema 2) or in the first, simpler one (base and tuned only).

Everything is inline: CSS in a <style> tag, plots as SVG drawn here, no script and nothing fetched
from the network, so the file can be mailed or opened offline. Only the standard library and PyYAML are imported: the command
starts at once, without torch.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path

import yaml

from tunelab.errors import UserError

REPORT_FILE = "report.html"
COMPARISON_FILE = "comparison.html"
SHOWN_SAMPLES = 40
"""Side-by-side answers shown on a run's page (the tuned model's mistakes first)."""

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
SERIES_COLOURS = ["#1f6fb4", "#d9730d", "#2e8b57", "#b03a8c", "#7a5c2e", "#5b5ea6", "#c0392b", "#17817a"]


@dataclass
class RunData:
    """What a run folder holds, read once; each part is None or empty when its file is missing."""

    path: Path
    """The run folder."""
    config: dict
    """config.yaml as written, shown as it is (a run made by an older tunelab still shows)."""
    info: dict
    """run.json: base model, method, sizes."""
    steps: list[dict]
    """The rows of metrics.jsonl: training loss per step and held-out loss at intervals."""
    data_check: dict | None
    """data_check.json."""
    eval: dict | None
    """eval.json in its current shape (see `upgrade`)."""

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def settings(self) -> dict:
        """config.yaml with `lr: null` replaced by the learning rate training used (the default
        for the method), so the page shows the number rather than null."""
        if "lr" not in self.config or self.config["lr"] is not None:
            return self.config
        from tunelab.config import TrainConfig

        method = self.config.get("method")
        default = TrainConfig.model_construct(**({"method": method} if method in ("lora", "full") else {}))
        return {**self.config, "lr": f"{default.learning_rate:g} (default for {default.method})"}

    def curve(self, key: str) -> list[tuple[float, float]]:
        # A resumed run may repeat steps; the last row written for a step wins.
        points = {row["step"]: row[key] for row in self.steps if isinstance(row.get(key), (int, float))}
        return sorted(points.items())

    def tuned_metrics(self) -> dict:
        """The fine-tuned model's metrics: {metric: {"value", "low", "high"}}."""
        if not self.eval:
            return {}
        table = self.eval.get("metrics") or {}
        names = contender_names(self.eval)
        return table.get("tuned") or (table.get(names[-1]) if names else None) or {}


# ---- reading the run folder ---------------------------------------------------------------------

def read_run(folder: Path) -> RunData:
    folder = Path(folder)
    config_file = folder / "config.yaml"
    if not folder.is_dir() or not config_file.exists():
        raise UserError(f"{folder}: not a tunelab run folder (no config.yaml); train one with `tunelab train`")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{config_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    results = read_json(folder / "eval.json")
    return RunData(path=folder, config=config if isinstance(config, dict) else {},
                   info=read_json(folder / "run.json") or {}, steps=read_jsonl(folder / "metrics.jsonl"),
                   data_check=read_json(folder / "data_check.json"), eval=upgrade(results) if results else None)


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rewrite it with the command that made it")
    return value if isinstance(value, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    if not path.exists():
        return rows
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # A run killed mid-write leaves a partial last line; anything else is damage.
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not valid JSON; the file is damaged") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def upgrade(results: dict) -> dict:
    """eval.json in the shape `tunelab eval` writes (schema 2, described in evaluate.py). The
    first shape, `base` and `tuned` at the top level with plain numbers and answers inline in
    each sample, is converted to it, so a run evaluated by an older tunelab still shows."""
    if isinstance(results.get("schema"), int) and results["schema"] >= 2:
        return results
    names = [name for name in ("base", "tuned") if isinstance(results.get(name), dict)]
    renamed = {"loss": "heldout_loss"}
    return {
        "schema": 1, "examples_evaluated": results.get("examples_evaluated"),
        "contenders": [{"name": name} for name in names],
        "metrics": {name: {renamed.get(key, key): {"value": value} for key, value in results[name].items()
                           if key != "seconds" and is_number(value)} for name in names},
        "samples": [{**sample, "answers": {name: {"text": sample[name]} for name in names
                                           if isinstance(sample.get(name), str)}}
                    for sample in results.get("samples") or [] if isinstance(sample, dict)],
    }


def contender_names(results: dict) -> list[str]:
    return [str(c["name"]) for c in results.get("contenders") or [] if isinstance(c, dict) and "name" in c]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ---- writing ------------------------------------------------------------------------------------

def write_report(run_folder: Path, out: Path | None = None) -> Path:
    """Write the run's page to RUN/report.html (or `out`) from what the run folder holds; returns
    the path written."""
    run = read_run(run_folder)
    if out:
        check_folder(Path(out))
    path = Path(out) if out else run.path / REPORT_FILE
    write_atomically(path, render_run(run))
    return path


def write_comparison(run_folders: list[Path], out: Path) -> Path:
    """Rebuild each run's own page (the comparison links to them), then write the comparison of
    all of them to `out`. Every run is read before anything is written."""
    check_folder(out)
    runs = [read_run(folder) for folder in run_folders]
    for run in runs:
        write_atomically(run.path / REPORT_FILE, render_run(run))
    write_atomically(out, render_comparison(runs, out))
    return out


def check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: the folder {path.parent} does not exist; create it or choose another path")


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


# ---- a run's page -------------------------------------------------------------------------------

def render_run(run: RunData) -> str:
    base = run.info.get("base") or run.config.get("base", "?")
    method = run.info.get("method") or run.config.get("method", "?")
    body = [f"<h1>tunelab run <code>{escape(run.name)}</code></h1>",
            f"<p class=sub>{escape(str(run.path.resolve()))} · base {escape(str(base))} · {escape(str(method))}</p>"]
    if run.eval:
        body += [verdict(run.eval), *empty_answer_banners(run.eval)]
    body.append(section_curves(run))
    if run.eval:
        body += [section(run.eval) for section in (section_metrics, section_differences, section_novelty,
                                                   section_buckets, section_cost, section_assertions,
                                                   section_forgetting, section_copy_constraint, section_answers)]
    else:
        body.append("<h2>Evaluation</h2><p class=note>This run has not been evaluated yet: run "
                    f"<code>tunelab eval {escape(str(run.path))}</code> for the metrics, buckets, cost per "
                    "request and side-by-side answers, then <code>tunelab report</code> again.</p>")
    body += [section_data_check(run.data_check), section_settings(run)]
    return page(f"tunelab report: {run.name}", "\n".join(part for part in body if part))


def verdict(results: dict) -> str:
    """One sentence on exact match: which contenders the tuned model beats, loses to, or cannot be
    told apart from at the 95% level."""
    beats, loses, ties = [], [], []
    for d in results.get("differences") or []:
        if not isinstance(d, dict) or d.get("metric") != "exact_match" or not is_number(d.get("difference")):
            continue
        low, high = d.get("low"), d.get("high")
        text = f"{d.get('contender')} ({signed(d['difference'])} points)"
        (beats if is_number(low) and low > 0 else loses if is_number(high) and high < 0 else ties).append(text)
    if not beats and not loses and not ties:
        return ""
    parts = [f"beats {', '.join(beats)}" if beats else "", f"loses to {', '.join(loses)}" if loses else "",
             f"cannot be told apart from {', '.join(ties)}" if ties else ""]
    return (f"<p class=verdict>On exact match, the tuned model {escape('; '.join(p for p in parts if p))} "
            "(95% bootstrap intervals, details below).</p>")


MOSTLY_EMPTY = 0.5
"""A contender with more than this share of empty answers gets a banner at the top of its page."""


def empty_answer_banners(results: dict) -> list[str]:
    """A warning per contender whose answers are mostly empty, with the likely cause: the model
    ends its turn at once, or it reached the token limit without writing any text."""
    samples = [s for s in results.get("samples") or [] if isinstance(s, dict)]
    banners = []
    for name, table in (results.get("buckets") or {}).items():
        if not isinstance(table, dict):
            continue
        total = sum(v for v in table.values() if is_number(v))
        empty = table.get("empty", 0)
        if not total or not is_number(empty) or empty <= MOSTLY_EMPTY * total:
            continue
        answers = [(s.get("answers") or {}).get(name) for s in samples]
        answers = [a for a in answers if isinstance(a, dict) and a.get("bucket") == "empty"]
        at_limit = sum(a.get("stopped") is False for a in answers)
        if answers and at_limit > len(answers) / 2:
            cause = (f"they reached the token limit ({results.get('max_new_tokens', '?')} new tokens) without "
                     "any visible text, only spaces or special tokens: check the chat template the run uses, "
                     "or raise --max-new-tokens")
        else:
            cause = ("the model ends its turn at once. A fine-tuned model does that when it learned the "
                     "end-of-turn token too early: training answers that are empty or cut away by --max-length "
                     "(see the data check), or too high a learning rate; a base model, when the prompt "
                     "does not suit it")
        banners.append(f"<p class=banner><b>{escape(str(name))}: {empty} of {total} answers are empty.</b> "
                       f"Most likely {escape(cause)}.</p>")
    return banners


def section_curves(run: RunData) -> str:
    train, heldout = run.curve("loss"), run.curve("eval_loss")
    if not train and not heldout:
        return "<h2>Loss</h2><p class=note>No metrics.jsonl with losses in this run folder.</p>"
    series = [("training loss", train, SERIES_COLOURS[0], False), ("held-out loss", heldout, SERIES_COLOURS[1], True)]
    last = [f"{label} {points[-1][1]:.4f} at step {points[-1][0]}" for label, points, _, _ in series if points]
    best = min(heldout, key=lambda p: p[1]) if heldout else None
    note = "; ".join(last) + (f"; lowest held-out loss {best[1]:.4f} at step {best[0]}" if best else "")
    return ("<h2>Loss</h2>" + line_chart([s for s in series if s[1]], "step", "loss")
            + f"<p class=note>{escape(note)}.</p>")


def section_metrics(results: dict) -> str:
    names, table = contender_names(results), results.get("metrics") or {}
    if not names or not table:
        return ""
    rows = []
    for key in ordered_keys([table.get(name) or {} for name in names]):
        label, kind, higher = METRICS.get(key, (key.replace("_", " "), "number", True))
        entries = {name: (table.get(name) or {}).get(key) for name in names}
        winners = best_of({name: e.get("value") for name, e in entries.items() if isinstance(e, dict)}, higher)
        cells = "".join(metric_cell(entries[name], kind, name in winners) for name in names)
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    note = f"{results.get('examples_evaluated', '?')} examples"
    if results.get("data"):
        note += f" of {results['data']}"
    if any(isinstance(e, dict) and "low" in e for name in names for e in (table.get(name) or {}).values()):
        note += "; in brackets, the 95% bootstrap confidence interval"
    if results.get("judge"):
        judge = results["judge"]
        note += f"; judge: {judge.get('model')} at {judge.get('url')}, ungraded answers {judge.get('ungraded')}"
    return (f"<h2>Metrics</h2><table class=metrics>{contender_header(results, names)}{''.join(rows)}</table>"
            f"<p class=note>{escape(note)}; the best of each row in green.</p>{field_table(results)}")


def contender_header(results: dict, names: list[str]) -> str:
    """A header row of contender names; an endpoint's model name under its own."""
    described = {str(c.get("name")): c for c in results.get("contenders") or [] if isinstance(c, dict)}
    cells = []
    for name in names:
        model = described.get(name, {}).get("model") if described.get(name, {}).get("kind") == "endpoint" else None
        cells.append(f"<th>{escape(name)}" + (f"<br><span class=ci>{escape(str(model))}</span>" if model else "") + "</th>")
    return f"<tr><th></th>{''.join(cells)}</tr>"


def metric_cell(entry, kind: str, best: bool) -> str:
    if not isinstance(entry, dict) or not is_number(entry.get("value")):
        return "<td class=na>–</td>"
    text = number(entry["value"], kind)
    if is_number(entry.get("low")) and is_number(entry.get("high")):
        text += f" <span class=ci>[{number(entry['low'], kind)}, {number(entry['high'], kind)}]</span>"
    return f"<td class=best>{text}</td>" if best else f"<td>{text}</td>"


def field_table(results: dict) -> str:
    fields = {name: table for name, table in (results.get("fields") or {}).items() if table}
    if not fields:
        return ""
    names = list(fields)
    rows = []
    for path in ordered_keys(list(fields.values())):
        winners = best_of({name: fields[name].get(path) for name in names}, True)
        cells = "".join("<td class=na>–</td>" if not is_number(fields[name].get(path)) else
                        f"<td{' class=best' if name in winners else ''}>{number(fields[name][path], 'percent')}</td>"
                        for name in names)
        rows.append(f"<tr><th><code>{escape(path)}</code></th>{cells}</tr>")
    extractive = results.get("extractive_fields") or []
    note = (f"<p class=note>Values of {escape(', '.join(map(str, extractive)))} should come from the prompt; an answer "
            "value found nowhere in it, even ignoring case, punctuation and how numbers are written, and unlike "
            "the reference's, counts as hallucinated.</p>") if extractive else ""
    head = "".join(f"<th>{escape(name)}</th>" for name in names)
    return (f"<h3>Accuracy per JSON field</h3><table class=metrics><tr><th></th>{head}</tr>{''.join(rows)}</table>"
            + note)


def section_differences(results: dict) -> str:
    """The tuned model minus each other contender, with the examples only one of them gets right."""
    differences = [d for d in results.get("differences") or [] if isinstance(d, dict) and "contender" in d]
    if not differences:
        return ""
    lines = {s.get("index", i): s.get("line") for i, s in enumerate(results.get("samples") or []) if isinstance(s, dict)}
    metrics = ordered_keys([{d.get("metric"): None} for d in differences])
    others = ordered_keys([{d["contender"]: None} for d in differences])
    head = "".join(f"<th>{escape(METRICS.get(m, (m,))[0])}</th>" for m in metrics)
    rows = []
    for other in others:
        mine = {d.get("metric"): d for d in differences if d["contender"] == other}
        cells = []
        for metric in metrics:
            d = mine.get(metric)
            if not d or not is_number(d.get("difference")):
                cells.append("<td class=na>–</td>")
                continue
            low, high = d.get("low"), d.get("high")
            sign = " class=up" if is_number(low) and low > 0 else " class=down" if is_number(high) and high < 0 else ""
            interval = (f" <span class=ci>[{signed(low)}, {signed(high)}]</span>"
                        if is_number(low) and is_number(high) else "")
            cells.append(f"<td{sign}>{signed(d['difference'])}{interval}</td>")
        first = next(iter(mine.values()))
        rows.append(f"<tr><th>tuned − {escape(other)}</th>{''.join(cells)}"
                    f"<td>{line_list(first.get('tuned_only_right'), lines)}</td>"
                    f"<td>{line_list(first.get('contender_only_right'), lines)}</td></tr>")
    return ("<h2>Differences: tuned against each contender</h2><table class=metrics><tr><th></th>"
            f"{head}<th>only tuned right</th><th>only the other right</th></tr>{''.join(rows)}</table>"
            "<p class=note>Differences in percentage points, with their 95% bootstrap interval: green where the "
            "tuned model is better beyond it, red where it is worse. Right means an exact match; examples are named "
            "by their line in the data file.</p>")


def signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def line_list(indices, lines: dict, shown: int = 8) -> str:
    if not isinstance(indices, list) or not indices:
        return "<span class=na>none</span>"
    named = [str(lines.get(i, f"#{i}")) for i in indices[:shown]]
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return escape(f"{len(indices)}: lines {', '.join(named)}{more}")


def section_novelty(results: dict) -> str:
    """How many evaluated answer values training never showed, and exact match on the rows that
    hold such a value against the rows that hold only values seen in training."""
    found = results.get("novelty")
    if not isinstance(found, dict) or not is_number(found.get("values")):
        return ""
    if not found["values"]:
        return ("<h2>Novelty</h2><p class=note>The reference answers hold no values to compare with training "
                "(plain text without quoted spans).</p>")
    rows = [(kind, label, found.get(f"{kind}_rows")) for kind, label in
            (("novel", "rows with a novel value"), ("seen", "rows with only seen values"))]
    accuracy = found.get("accuracy") if isinstance(found.get("accuracy"), dict) else {}
    names = [name for name in contender_names(results) if isinstance(accuracy.get(name), dict)]
    lines = []
    for kind, label, count in rows:
        entries = {name: accuracy[name].get(kind) for name in names}
        winners = best_of({n: e.get("value") for n, e in entries.items() if isinstance(e, dict)}, True)
        cells = "".join(metric_cell(entries[name], "percent", name in winners) for name in names)
        lines.append(f"<tr><th>{escape(label)} <span class=ci>({escape(str(count))})</span></th>{cells}</tr>")
    share = number(found["share"], "percent") if is_number(found.get("share")) else "?"
    note = (f"{share} of the {found['values']} reference answer values never occur in a training answer "
            f"({escape(str(found.get('training_file', '')))}); a row is novel when it holds at least one such value. "
            "A tuned model that is right on seen rows and wrong on novel ones recites what it was trained on instead "
            "of copying from the input; a held-out set without novel rows cannot show it.")
    return (f"<h2>Novelty</h2><table class=metrics><tr><th>exact match on</th>"
            f"{''.join(f'<th>{escape(n)}</th>' for n in names)}</tr>{''.join(lines)}</table>"
            f"<p class=note>{note}</p>")


def section_buckets(results: dict) -> str:
    counts = {name: table for name, table in (results.get("buckets") or {}).items() if isinstance(table, dict)}
    if not counts:
        return ""
    buckets = ordered_keys(list(counts.values()))
    head = "".join(f"<th>{escape(b)}</th>" for b in buckets)
    rows = []
    for name, table in counts.items():
        total = sum(v for v in table.values() if is_number(v)) or 1
        bar = "".join(f"<span style='width:{100 * table[b] / total:.2f}%;background:{bucket_colour(b)}' "
                      f"title='{escape(b)}'></span>" for b in buckets if is_number(table.get(b)) and table[b])
        cells = "".join(f"<td>{table.get(b, 0)}</td>" for b in buckets)
        rows.append(f"<tr><th>{escape(name)}</th>{cells}<td class=barcell><div class=bar>{bar}</div></td></tr>")
    legend = "".join(f"<span class=key><i style='background:{bucket_colour(b)}'></i>{escape(b)}</span>"
                     for b in buckets)
    return (f"<h2>Answer buckets</h2><table class=buckets><tr><th></th>{head}<th></th></tr>{''.join(rows)}</table>"
            f"<p class=legend>{legend}</p>{bucket_examples(results)}")


def bucket_colour(bucket: str) -> str:
    return BUCKET_COLOURS.get(bucket, "#999")


def bucket_examples(results: dict) -> str:
    """Answers of each bucket but `correct`, per contender, folded away."""
    samples = {s.get("index", i): s for i, s in enumerate(results.get("samples") or []) if isinstance(s, dict)}
    blocks = []
    for name, table in (results.get("bucket_examples") or {}).items():
        for bucket, indices in (table or {}).items():
            if bucket == "correct" or not isinstance(indices, list):
                continue
            items = "".join(f"<li>line {escape(str(samples[i].get('line')))}: <span class=ans>"
                            f"{escape(answer_text(samples[i], name)) or '(empty)'}</span></li>"
                            for i in indices if i in samples)
            blocks.append(f"<li><b>{escape(name)}</b>, {escape(bucket)}:<ul>{items}</ul></li>")
    if not blocks:
        return ""
    return f"<details><summary>Examples of each bucket</summary><ul class=examples>{''.join(blocks)}</ul></details>"


def answer_text(sample: dict, name: str) -> str:
    answer = (sample.get("answers") or {}).get(name)
    return str(answer.get("text", "")) if isinstance(answer, dict) else ""


def section_cost(results: dict) -> str:
    cost = {name: table for name, table in (results.get("cost") or {}).items() if isinstance(table, dict)}
    if not cost:
        return ""
    keys = [k for k in COST if any(k in table for table in cost.values())]
    rows = []
    for key in keys:
        label, higher = COST[key]
        winners = best_of({name: table.get(key) for name, table in cost.items()}, higher) if key != "seconds" else set()
        cells = "".join("<td class=na>–</td>" if not is_number(table.get(key)) else
                        f"<td{' class=best' if name in winners else ''}>{number(table[key], 'cost')}</td>"
                        for name, table in cost.items())
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    head = "".join(f"<th>{escape(name)}</th>" for name in cost)
    return (f"<h2>Cost per request</h2><table class=metrics><tr><th></th>{head}</tr>{''.join(rows)}</table>"
            "<p class=note>Means per request on this machine, measured while evaluating, after one uncounted "
            "warm-up request per contender: a longer prompt (few-shot, retrieval) costs more for every "
            f"request.{precision_note(results)}</p>")


def precision_note(results: dict) -> str:
    """Which arithmetic the local contenders answered in (eval.json files before it say nothing)."""
    precision = results.get("precision")
    if precision not in ("bf16", "fp32"):
        return ""
    if precision == "fp32":
        return " The local contenders computed in fp32."
    return " The local contenders computed in bf16 (bf16 autocast; <code>--precision fp32</code> for fp32)."


def section_assertions(results: dict) -> str:
    """Per rule of the user's assertions file, how many answers of each contender pass it."""
    checked = (results.get("assertions") or {}).get("results") or {}
    checked = {name: table for name, table in checked.items() if isinstance(table, dict)}
    if not checked:
        return ""
    rules = ordered_keys([table.get("rules") or {} for table in checked.values()])
    rows = []
    for rule in [*rules, None]:  # None: the answers that pass every rule
        passed, shares = {}, {}
        for name, table in checked.items():
            count = table.get("all_passed") if rule is None else (table.get("rules") or {}).get(rule)
            answers = table.get("answers")
            if is_number(count) and is_number(answers) and answers:
                passed[name], shares[name] = count, count / answers
        winners = best_of(shares, True)
        cells = "".join(f"<td{' class=best' if name in winners else ''}>{passed[name]} "
                        f"<span class=ci>{number(shares[name], 'percent')}</span></td>" if name in passed else
                        "<td class=na>–</td>" for name in checked)
        rows.append(f"<tr><th>{escape('every rule' if rule is None else str(rule))}</th>{cells}</tr>")
    head = "".join(f"<th>{escape(name)}</th>" for name in checked)
    source = escape(str(results["assertions"].get("file", "")))
    return (f"<h2>Assertions</h2><table class=metrics><tr><th></th>{head}</tr>{''.join(rows)}</table>"
            f"<p class=note>Answers passing each rule of {source}.</p>")


def section_copy_constraint(results: dict) -> str:
    """How many answers of each contender the copy constraint changed (copying.py)."""
    copying = results.get("copy_constraint")
    if not isinstance(copying, dict) or not isinstance(copying.get("changed"), dict):
        return ""
    total = results.get("examples_evaluated")
    changed = {name: count for name, count in copying["changed"].items() if is_number(count)}
    head = "".join(f"<th>{escape(name)}</th>" for name in changed)
    cells = "".join(f"<td>{count}" + (f" <span class=ci>{number(count / total, 'percent')}</span>"
                                      if is_number(total) and total else "") + "</td>" for count in changed.values())
    fields = ", ".join(f"<code>{escape(str(f))}</code>" for f in copying.get("fields") or [])
    return (f"<h2>Copy constraint</h2><table class=metrics><tr><th></th>{head}</tr>"
            f"<tr><th>answers changed</th>{cells}</tr></table>"
            f"<p class=note>The training data copies {fields} from the input, so decoding kept those values "
            "substrings of the input; these answers differ from what the model would have written "
            "(<code>--no-copy-constraint</code> turns it off).</p>")


def section_forgetting(results: dict) -> str:
    forgetting = results.get("forgetting")
    if not isinstance(forgetting, dict) or not forgetting.get("results"):
        return ""
    scored = {name: r for name, r in forgetting["results"].items() if isinstance(r, dict)}
    rows = []
    for key, label in (("accuracy", "accuracy"), ("accuracy_per_token", "accuracy, length-normalised")):
        winners = best_of({name: r.get(key) for name, r in scored.items()}, True)
        cells = "".join(f"<td{' class=best' if name in winners else ''}>{number(r[key], 'percent')}</td>"
                        if is_number(r.get(key)) else "<td class=na>–</td>" for name, r in scored.items())
        rows.append(f"<tr><th>{label}</th>{cells}</tr>")
    head = "".join(f"<th>{escape(name)}</th>" for name in scored)
    return ("<h2>Forgetting check</h2><table class=metrics>"
            f"<tr><th></th>{head}</tr>{''.join(rows)}</table><p class=note>{forgetting.get('questions', '?')} "
            f"multiple-choice questions of {questions_file(forgetting.get('file'))}, scored by log-likelihood: the "
            "base model (zero-shot) against the tuned one; a drop means the fine-tune lost general knowledge.</p>")


def questions_file(file) -> str:
    """The forgetting questions' file by its name (the full path on hover): tunelab's own set is
    named as bundled, wherever tunelab is installed."""
    if not file:
        return "?"
    path = Path(str(file))
    name = f"{path.name} (bundled with tunelab)" if path.parent.parts[-2:] == ("tunelab", "examples") else path.name
    return f"<span title='{escape(str(file))}'>{escape(name)}</span>"


def section_answers(results: dict) -> str:
    samples = [s for s in results.get("samples") or [] if isinstance(s, dict)]
    if not samples:
        return ""
    names = contender_names(results)
    tuned = "tuned" if "tuned" in names else (names[-1] if names else "")

    def bucket(sample: dict, name: str) -> str:
        answer = (sample.get("answers") or {}).get(name)
        if isinstance(answer, dict) and answer.get("bucket"):
            return str(answer["bucket"])
        right = normalise(answer_text(sample, name)) == normalise(str(sample.get("reference", "")))
        return "correct" if right else ""

    ordered = sorted(range(len(samples)), key=lambda i: (bucket(samples[i], tuned) == "correct", i))[:SHOWN_SAMPLES]
    blocks = []
    for i in ordered:
        sample, reference = samples[i], str(samples[i].get("reference", ""))
        cells = [f"<div class=cell><h4>reference</h4><div class=ans>{escape(reference)}</div></div>"]
        for name, answer in (sample.get("answers") or {}).items():
            label = bucket(sample, name)
            badge = f" <span class=badge style='background:{bucket_colour(label)}'>{escape(label)}</span>" if label else ""
            grade = answer.get("judge") if isinstance(answer, dict) else None
            badge += f" <span class=ci>judge {number(grade, 'cost')}</span>" if is_number(grade) else ""
            failed = answer.get("assertions_failed") if isinstance(answer, dict) else None
            failed_html = (f"<div class=failed>fails: {escape(', '.join(map(str, failed)))}</div>"
                           if isinstance(failed, list) and failed else "")
            cells.append(f"<div class=cell><h4>{escape(name)}{badge}</h4>"
                         f"<div class=ans>{word_diff(answer_text(sample, name), reference)}</div>{failed_html}</div>")
        where = f"line {sample['line']}" if sample.get("line") is not None else f"example {i + 1}"
        blocks.append(f"<div class=sample><div class=prompt><b>{escape(str(where))}</b> "
                      f"{escape(str(sample.get('prompt', '')))}</div><div class=grid>{''.join(cells)}</div></div>")
    shown = f"the first {len(ordered)} of {len(samples)}" if len(ordered) < len(samples) else f"all {len(samples)}"
    return (f"<h2>Answers side by side</h2><p class=note>{shown} examples, those the {escape(tuned)} model gets "
            "wrong first. In each answer, <mark>highlighted words</mark> are not in the reference and "
            "<del>struck words</del> are reference words the answer lacks.</p>" + "".join(blocks))


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def word_diff(answer: str, reference: str) -> str:
    """The answer as HTML, its words compared with the reference's (words and punctuation marks
    are the units, so a changed JSON value is marked alone rather than with its quotes)."""
    ours, theirs = tokens(answer), tokens(reference)
    matcher = difflib.SequenceMatcher(None, [t for _, t in ours], [t for _, t in theirs], autojunk=False)
    out = []
    for op, a1, a2, b1, b2 in matcher.get_opcodes():
        if op in ("replace", "delete") and a2 > a1:
            out.append(f"{escape(ours[a1][0])}<mark>{escape(''.join(s + t for s, t in ours[a1:a2]).lstrip())}</mark>")
        if op in ("replace", "insert") and b2 > b1:
            out.append(f"<del>{escape(''.join(s + t for s, t in theirs[b1:b2]))}</del>")
        if op == "equal":
            out.append(escape("".join(s + t for s, t in ours[a1:a2])))
    return "".join(out) if answer.strip() else "<span class=empty>(empty)</span>"


def tokens(text: str) -> list[tuple[str, str]]:
    """(whitespace before, token) pairs: words and single punctuation marks."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"(\s*)(\w+|[^\w\s])", text)]


def section_data_check(check: dict | None) -> str:
    if not check:
        return ""
    rows = [("file", str(check.get("file", "?"))),
            ("rows", f"{check.get('rows', '?')} read, {check.get('valid', '?')} valid: {kinds_of_rows(check)}")]
    for kind in ("error", "warning"):
        counts = check.get(f"{kind}_counts") or {}
        listed = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        rows.append((f"{kind}s", f"{sum(counts.values())}" + (f" ({listed})" if listed else "")))
    duplicates = check.get("duplicates") or {}
    if duplicates:
        rows.append(("exact duplicates", f"{(duplicates.get('exact') or {}).get('count', 0)} (dropped before the split)"))
        rows.append(("near duplicates", f"{(duplicates.get('near') or {}).get('count', 0)} pairs"))
    split = check.get("split") or {}
    if split:
        by = f", by {split['split_by']}" if split.get("split_by") else ""
        rows.append(("split", f"train {split.get('train', '?')} / test {split.get('test', '?')} "
                              f"(test size {split.get('test_size', '?')}, seed {split.get('seed', '?')}{by}), "
                              f"{split.get('leaked_count', 0)} near-duplicate pairs across it"))
    found = check.get("novelty") or {}
    if is_number(found.get("values")) and found["values"] and is_number(found.get("share")):
        rows.append(("novelty", f"{number(found['share'], 'percent')} of {found['values']} held-out answer values "
                                f"never occur in a training answer; {found.get('novel_rows', '?')} held-out rows "
                                "hold one"))
    lengths = check.get("lengths") or {}
    if "min" in lengths:
        rows.append((f"length ({lengths.get('unit', '')})", f"min {lengths['min']}, median {lengths.get('median')}, "
                                                            f"p95 {lengths.get('p95')}, max {lengths.get('max')}"))
    trainable = check.get("trainable_tokens") or {}
    if "min" in trainable:
        rows.append(("trained tokens", f"min {trainable['min']}, median {trainable.get('median')}, "
                                       f"total {trainable.get('total')}"))
    truncation = check.get("truncation") or {}
    if len(truncation) > 1:
        rows.append(("truncation", ", ".join(f"{k} {v}" for k, v in truncation.items())))
    table = "".join(f"<tr><th>{escape(name)}</th><td>{escape(value)}</td></tr>" for name, value in rows)
    problems = (check.get("errors") or [])[:10] + (check.get("warnings") or [])[:10]
    listed = "".join(f"<li>line {escape(str(p.get('line')))}: <code>{escape(str(p.get('code')))}</code> "
                     f"{escape(str(p.get('message', '')))}</li>" for p in problems if isinstance(p, dict))
    details = f"<details><summary>First problems</summary><ul>{listed}</ul></details>" if listed else ""
    limit = (check.get("options") or {}).get("max_length") if check.get("template") else None
    histogram = histogram_svg(lengths, limit if is_number(limit) else None)
    return f"<h2>Data check</h2><table class=kv>{table}</table>{histogram}{details}"


SHAPE_NAMES = {"chat": ("conversation", "conversations"), "text": ("raw-text document", "raw-text documents")}
"""What data_check.json's `shapes` count: every row with an answer becomes a conversation (a
prompt and its answer, whatever its keys), raw text stays a document; as `tunelab data check`
says it."""


def kinds_of_rows(check: dict) -> str:
    shapes = {k: v for k, v in (check.get("shapes") or {}).items() if is_number(v)}
    if not shapes:
        return "none"
    named = [f"{n} {SHAPE_NAMES[k][n != 1]}" if k in SHAPE_NAMES else f"{n} in the {k} shape"
             for k, n in sorted(shapes.items())]
    return ", ".join(named)


def histogram_svg(lengths: dict, limit: int | None = None) -> str:
    """Bars of the example lengths, both axes labelled, and `--max-length` as a dashed line."""
    bins = [b for b in lengths.get("histogram") or [] if isinstance(b, list) and len(b) == 3]
    if not bins or not any(b[2] for b in bins):
        return ""
    unit = str(lengths.get("unit") or "length")
    left, width, height, top = 48, 480, 120, max(b[2] for b in bins)
    step = width / len(bins)
    bars = "".join(f"<rect x='{left + i * step + 1:.1f}' y='{height - 100 * b[2] / top:.1f}' "
                   f"width='{step - 2:.1f}' height='{100 * b[2] / top:.1f}' fill='#1f6fb4'>"
                   f"<title>{b[0]}–{b[1]} {escape(unit)}: {b[2]} rows</title></rect>" for i, b in enumerate(bins))
    axes = (f"<line x1='{left}' x2='{left + width}' y1='{height}' y2='{height}' class=axis />"
            f"<line x1='{left}' x2='{left}' y1='{height - 100}' y2='{height}' class=axis />"
            f"<text x='{left - 4}' y='{height - 96}' text-anchor='end'>{top}</text>"
            f"<text x='{left - 4}' y='{height + 4}' text-anchor='end'>0</text>"
            f"<text transform='translate(12 {height - 50}) rotate(-90)' text-anchor='middle'>rows</text>"
            f"<text x='{left}' y='{height + 14}'>{bins[0][0]}</text>"
            f"<text x='{left + width}' y='{height + 14}' text-anchor='end'>{bins[-1][1]}</text>"
            f"<text x='{left + width / 2}' y='{height + 30}' text-anchor='middle'>example length "
            f"({escape(unit)})</text>")
    mark = ""
    span = bins[-1][1] + 1 - bins[0][0]
    if limit is not None and span > 0:
        x = left + width * (limit - bins[0][0]) / span
        mark = (f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{height - 108}' y2='{height}' class=limit />"
                f"<text x='{x - 4:.1f}' y='{height - 100}' text-anchor='end' class=limit>--max-length {limit}</text>")
    caption = "Rows of the data file by length" + (f"; rows longer than --max-length {limit} are dropped or "
                                                   "cut as --truncation says" if limit is not None else "")
    return (f"<figure><svg class=hist viewBox='0 -12 {left + width + 8} {height + 48}' "
            f"width='{left + width + 8}' height='{height + 48}' role='img'>{bars}{axes}{mark}</svg>"
            f"<figcaption>{escape(caption)}.</figcaption></figure>")


def section_settings(run: RunData) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(yaml_value(v))}</td></tr>" for k, v in run.settings.items())
    info = "".join(f"<tr><th>{escape(str(k))}</th><td>{escape(yaml_value(v))}</td></tr>" for k, v in run.info.items())
    return (f"<h2>Settings</h2><div class=columns><table class=kv><caption>config.yaml</caption>{rows}</table>"
            + (f"<table class=kv><caption>run.json</caption>{info}</table>" if info else "") + "</div>")


def yaml_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# ---- several runs side by side ------------------------------------------------------------------

def render_comparison(runs: list[RunData], out: Path) -> str:
    # Runs named alike (a/run, b/run) are shown by the path given.
    labels = [run.name if [r.name for r in runs].count(run.name) == 1 else str(run.path) for run in runs]
    head = "".join(f"<th><a href='{escape(relative_link(run.path / REPORT_FILE, out))}'>{escape(label)}</a></th>"
                   for run, label in zip(runs, labels))
    rows = []
    keys = ordered_keys([run.settings for run in runs])
    differing = [k for k in keys if len({yaml_value(run.settings.get(k)) for run in runs}) > 1]
    for key in differing:
        cells = "".join(f"<td>{escape(yaml_value(run.settings.get(key)))}</td>" for run in runs)
        rows.append(f"<tr class=setting><th>{escape(key)}</th>{cells}</tr>")
    evaluated_on = [evaluated_file(run) for run in runs]
    if len(set(evaluated_on) - {""}) > 1:  # metrics on different files do not compare
        cells = "".join(f"<td>{escape(data) or '–'}</td>" for data in evaluated_on)
        rows.append(f"<tr class=setting><th>evaluated on</th>{cells}</tr>")
    numeric: list[tuple[str, str, bool, list[float | None]]] = []
    numeric.append(("held-out loss (end of training)", "number", False,
                    [run.curve("eval_loss")[-1][1] if run.curve("eval_loss") else None for run in runs]))
    tuned = [run.tuned_metrics() for run in runs]
    for key in ordered_keys(tuned):
        label, kind, higher = METRICS.get(key, (key.replace("_", " "), "number", True))
        numeric.append((f"tuned: {label}", kind, higher,
                        [(t.get(key) or {}).get("value") if isinstance(t.get(key), dict) else None for t in tuned]))
    numeric.append(("examples evaluated", "count", True,
                    [run.eval.get("examples_evaluated") if run.eval else None for run in runs]))
    for label, kind, higher, values in numeric:
        winners = best_of({str(i): v for i, v in enumerate(values) if v is not None}, higher) if kind != "count" else set()
        cells = "".join("<td class=na>–</td>" if v is None else
                        f"<td{' class=best' if str(i) in winners else ''}>{number(v, kind)}</td>"
                        for i, v in enumerate(values))
        rows.append(f"<tr><th>{escape(label)}</th>{cells}</tr>")
    same = [k for k in keys if k not in differing]
    same_rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(yaml_value(runs[0].settings.get(k)))}</td></tr>"
                        for k in same)
    unevaluated = [label for run, label in zip(runs, labels) if not run.eval]
    note = (f"<p class=note>Not evaluated yet: {escape(', '.join(unevaluated))} (run <code>tunelab eval RUN</code>)."
            "</p>") if unevaluated else ""
    curves = [(label, run.curve("eval_loss"), SERIES_COLOURS[i % len(SERIES_COLOURS)], False)
              for i, (run, label) in enumerate(zip(runs, labels))]
    body = (f"<h1>tunelab: {len(runs)} runs compared</h1>"
            "<p class=sub>Settings that differ between the runs, then each run's held-out loss and its tuned "
            "model's metrics; the best of each row in green. Each run's name opens its own report.</p>"
            f"<table class=metrics><tr><th></th>{head}</tr>{''.join(rows)}</table>{note}"
            + (f"<details><summary>Settings shared by all runs</summary><table class=kv>{same_rows}</table></details>"
               if same_rows else "")
            + ("<h2>Held-out loss</h2>" + line_chart([c for c in curves if c[1]], "step", "held-out loss")
               if any(c[1] for c in curves) else ""))
    return page(f"tunelab: {len(runs)} runs compared", body)


def evaluated_file(run: RunData) -> str:
    """The file eval.json was measured on: "held-out split" for the run's own test.jsonl."""
    if not run.eval:
        return ""
    data = str(run.eval.get("data") or "")
    # eval.json names the run folder as it was given then, and its split inside it.
    own = [str(Path(str(run.eval.get("run", run.path))) / "test.jsonl"), str((run.path / "test.jsonl").resolve())]
    return "held-out split" if not data or data in own else data


def relative_link(target: Path, page_path: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page_path.resolve().parent)).as_posix()


# ---- shared pieces ------------------------------------------------------------------------------

def best_of(values: dict[str, float], higher: bool) -> set[str]:
    finite = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    if len(finite) < 2:
        return set()
    if len(set(finite.values())) == 1:  # all equal: nothing wins
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


def line_chart(series: list[tuple[str, list[tuple[float, float]], str, bool]], x_label: str, y_label: str,
               width: int = 720, height: int = 300) -> str:
    """An SVG line chart: (label, points, colour, with markers) per series, axes with round ticks."""
    xs = [x for _, points, _, _ in series for x, _ in points]
    ys = [y for _, points, _, _ in series for _, y in points if math.isfinite(y)]
    if not xs or not ys:
        return ""
    left, right, top, bottom = 56, 16, 12, 40
    x_ticks, y_ticks = ticks(min(xs), max(xs), whole=True), ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / ((y1 - y0) or 1) * (height - top - bottom)

    parts = [f"<svg class=chart viewBox='0 0 {width} {height}' width='{width}' height='{height}' role='img'>"]
    for y in y_ticks:
        parts.append(f"<line x1='{left}' x2='{width - right}' y1='{sy(y):.1f}' y2='{sy(y):.1f}' class=grid />"
                     f"<text x='{left - 6}' y='{sy(y) + 4:.1f}' text-anchor='end'>{tick_label(y)}</text>")
    for x in x_ticks:
        parts.append(f"<line x1='{sx(x):.1f}' x2='{sx(x):.1f}' y1='{height - bottom}' y2='{height - bottom + 4}' "
                     f"class=axis /><text x='{sx(x):.1f}' y='{height - bottom + 17}' text-anchor='middle'>"
                     f"{tick_label(x)}</text>")
    parts.append(f"<line x1='{left}' x2='{width - right}' y1='{height - bottom}' y2='{height - bottom}' class=axis />"
                 f"<text x='{(left + width - right) / 2}' y='{height - 4}' text-anchor='middle'>{escape(x_label)}</text>"
                 f"<text transform='translate(14 {(top + height - bottom) / 2}) rotate(-90)' text-anchor='middle'>"
                 f"{escape(y_label)}</text>")
    for label, points, colour, markers in series:
        points = [(x, y) for x, y in points if math.isfinite(y)]
        path = " ".join(f"{'M' if j == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for j, (x, y) in enumerate(points))
        parts.append(f"<path d='{path}' fill='none' stroke='{colour}' stroke-width='2' />")
        if markers or len(points) == 1:
            parts += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{colour}' />" for x, y in points]
    parts.append("</svg>")
    # The legend sits under the plot, in HTML, so it can never hide a line.
    legend = "".join(f"<span class=key><i style='background:{colour}'></i>{escape(label)}</span>"
                     for label, _, colour, _ in series)
    return "<figure>" + "".join(parts) + f"<figcaption class=legend>{legend}</figcaption></figure>"


def ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values that cover [low, high]; with `whole`, whole numbers only (steps)."""
    if high <= low:
        low, high = low - 1, high + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = [m * magnitude for m in ((1, 2, 5, 10) if whole else (1, 2, 2.5, 5, 10))]
    step = next(m for m in steps if m >= raw)
    step = max(step, 1) if whole else step
    start, values = math.floor(round(low / step, 9)) * step, []
    while not values or values[-1] < high - 1e-12:
        values.append(round(start + step * len(values), 10))
    return values


def tick_label(value: float) -> str:
    return f"{value:g}"


STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1180px;
       margin: 24px auto; padding: 0 20px; }
h1 { font-size: 22px; margin-bottom: 2px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
h4 { margin: 0 0 4px; font-size: 13px; color: #555; }
.sub, .note, .legend { color: #666; font-size: 13px; }
.verdict { background: #eef4fb; border-left: 4px solid #1f6fb4; padding: 8px 12px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
table.metrics td, table.buckets td { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f6f6f6; font-weight: 600; } caption { text-align: left; font-weight: 600; padding: 4px 0; }
td.best { background: #d9f2d9; font-weight: 600; } td.na { color: #aaa; } tr.setting td { background: #fbfbf3; }
td.up { background: #d9f2d9; } td.down { background: #f8dada; }
.failed { color: #a33; font-size: 12px; margin-top: 4px; } h3 { font-size: 15px; margin: 18px 0 4px; }
.ci { color: #777; font-weight: normal; font-size: 12px; }
.bar { display: flex; width: 240px; height: 14px; background: #eee; }
.bar span { display: block; height: 100%; } td.barcell { padding: 6px 10px; }
.key { margin-right: 14px; white-space: nowrap; } .key i { display: inline-block; width: 10px; height: 10px;
       margin-right: 4px; }
.columns { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 8px 0; } figcaption { color: #666; font-size: 12px; }
svg text { font-size: 12px; fill: #444; }
svg line.grid { stroke: #e6e6e6; } svg line.axis { stroke: #888; } svg rect { fill-opacity: .85; }
svg line.limit { stroke: #c0392b; stroke-dasharray: 4 3; stroke-width: 1.5; } svg text.limit { fill: #c0392b; }
.banner { background: #fdf2e9; border-left: 4px solid #d68910; padding: 8px 12px; }
.sample { border: 1px solid #ddd; border-radius: 4px; margin: 12px 0; padding: 8px 10px; }
.prompt { white-space: pre-wrap; max-height: 9em; overflow: auto; font-size: 13px; color: #333; margin-bottom: 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(200px, 1fr)); gap: 8px; }
.cell { background: #fafafa; padding: 6px; border-radius: 3px; min-width: 0; }
.ans { white-space: pre-wrap; word-break: break-word; font: 13px/1.4 ui-monospace, Menlo, Consolas, monospace; }
mark { background: #ffd6d6; } del { color: #a33; background: #f3f3f3; }
.badge { color: #fff; font-size: 11px; padding: 1px 6px; border-radius: 8px; font-weight: normal; }
.empty { color: #aaa; font-style: italic; } code { font-size: 13px; background: #f3f3f3; padding: 0 3px; }
details { margin: 8px 0; } summary { cursor: pointer; color: #1f6fb4; }
"""


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{STYLE}</style></head>"
            f"<body>\n{body}\n<p class=note>Written by tunelab report.</p></body></html>\n")
