"""The HTML report: built from run folders written by hand (no training), in both shapes of
eval.json, checked for its sections, its escaping, its offline-ness, the comparison of runs,
the CLI, and a render in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from markupsafe import escape

from clirun import run_cli
from tunelab.evaluate.results import EvalResults
from tunelab.report.html import render_run, write_comparison, write_report
from tunelab.report.runs import read_run
from tunelab.report.sections import word_diff

HOSTILE = "<script>alert('x')</script> & \"quotes\""

CONFIG = """base: smollm2-135m
method: lora
format: auto
template: auto
epochs: 2.0
max_steps: null
batch_size: 8
lr: null
seed: 0
test_size: 0.1
lora_rank: 16
"""

DATA_CHECK = {
    "file": "/data/bookings.jsonl", "options": {"format": "auto", "test_size": 0.1, "seed": 0, "max_length": 128},
    "template": "model", "rows": 220, "valid": 217, "shapes": {"chat": 217},
    "error_counts": {"E_JSON": 2, "E_SHAPE": 1}, "warning_counts": {"W_DUPLICATE": 4, "W_NEAR_DUPLICATE": 3},
    "errors": [{"line": 7, "code": "E_JSON", "message": f"not JSON {HOSTILE}"}],
    "warnings": [{"line": 12, "code": "W_DUPLICATE", "message": "copy of line 3"}],
    "duplicates": {"exact": {"count": 4, "pairs": [[3, 12]]}, "near": {"count": 3, "pairs": [[5, 9, 0.83]]}},
    "split": {"train": 191, "test": 22, "test_size": 0.1, "seed": 0, "leaked_count": 0, "leaked_pairs": [],
              "split_by": "metadata.customer", "groups": {"train": 40, "test": 5}},
    "novelty": {"values": 44, "novel_values": 11, "share": 0.25, "novel_rows": 9, "seen_rows": 13,
                "rows_without_values": 0, "training_values": 120},
    "lengths": {"unit": "tokens", "min": 41, "median": 77.0, "mean": 79.3, "p95": 120.0, "max": 163, "total": 17210,
                "histogram": [[0, 40, 0], [41, 81, 120], [82, 122, 80], [123, 163, 17]]},
    "trainable_tokens": {"min": 20, "median": 31.0, "total": 6800},
    "truncation": {"policy": "drop", "kept": 217},
}

SAMPLES = [
    {"line": 3, "prompt": f"Book a table for 4 on Friday {HOSTILE}",
     "reference": '{"people": 4, "day": "Friday"}'},
    {"line": 8, "prompt": "Table for two tomorrow at 8pm", "reference": '{"people": 2, "day": "tomorrow"}'},
    {"line": 15, "prompt": "Dinner for six, Saturday", "reference": '{"people": 6, "day": "Saturday"}'},
]

SIMPLE_EVAL = {
    "examples_evaluated": 3, "max_new_tokens": 40,
    "base": {"exact_match": 0.0, "word_f1": 0.41, "loss": 2.31, "perplexity": 10.07, "seconds": 3.2},
    "tuned": {"exact_match": 2 / 3, "word_f1": 0.93, "loss": 0.52, "perplexity": 1.68, "seconds": 2.9},
    "samples": [
        {**SAMPLES[0], "base": f"Sure! {HOSTILE}", "tuned": '{"people": 4, "day": "Friday"}'},
        {**SAMPLES[1], "base": "Two people.", "tuned": '{"people": 2, "day": "today"}'},
        {**SAMPLES[2], "base": "", "tuned": '{"people": 6, "day": "Saturday"}'},
    ],
}


def rich_eval() -> dict:
    """eval.json as `tunelab eval` writes it with all contenders (schema 2, see evaluate.py)."""
    def metric(value, low, high):
        return {"value": value, "low": low, "high": high}

    names = ["zero-shot", "few-shot", "retrieval", "tuned"]
    answers = {
        "zero-shot": ["I can help with that!", "", "Saturday, 6 people"],
        "few-shot": ['{"people": 4, "day": "Friday"}', '{"people": 2}', '{"people": 6, "day": "Sat"}'],
        "retrieval": ['{"people": 4, "day": "Friday"}', '{"people": 2, "day": "tomorrow"}',
                      '{"people": 6, "day": "Sat"}'],
        "tuned": ['{"people": 4, "day": "Friday"}', '{"people": 2, "day": "tomorrow"}',
                  '{"people": 6, "day": "sunday"}'],
    }
    buckets = {
        "zero-shot": ["invalid format", "empty", "invalid format"],
        "few-shot": ["correct", "wrong", "wrong"],
        "retrieval": ["correct", "correct", "wrong"],
        "tuned": ["correct", "correct", "hallucinated value"],
    }
    order = ["correct", "wrong", "hallucinated value", "invalid format", "empty", "no stop", "repetition loop"]
    results = {"schema": 2, "run": "runs/mine", "data": "runs/mine/test.jsonl", "examples_evaluated": 3,
               "max_new_tokens": 40, "shots": 3, "precision": "bf16", "contenders": [], "metrics": {}, "fields": {},
               "extractive_fields": ["day", "people"], "buckets": {}, "bucket_examples": {}, "differences": [],
               "cost": {}}
    for i, name in enumerate(names):
        share = buckets[name].count("correct") / 3
        results["contenders"].append({"name": name, "kind": "local", "model": "smollm2-135m",
                                      "prompt": "fine-tuned" if name == "tuned" else name})
        results["metrics"][name] = {
            "exact_match": metric(share, max(0.0, share - 0.3), min(1.0, share + 0.3)),
            "token_f1": metric(0.2 + 0.2 * i, 0.1 + 0.2 * i, 0.3 + 0.2 * i),
            "valid_json": metric(1.0 if i else 0.0, 1.0 if i else 0.0, 1.0 if i else 0.0),
            "hallucinated_values": metric(0.3 - 0.05 * i, 0.1, 0.5),
        }
        if i:
            results["fields"][name] = {"day": 0.3 * i, "people": 1.0}
        results["buckets"][name] = {b: buckets[name].count(b) for b in order}
        results["bucket_examples"][name] = {b: [k for k, x in enumerate(buckets[name]) if x == b]
                                            for b in order if b in buckets[name]}
        results["cost"][name] = {"prompt_tokens": 60 + 200 * (name in ("few-shot", "retrieval")),
                                 "generated_tokens": 14.0, "seconds_per_request": 0.05 * (1 + i),
                                 "requests_per_second": 20.0 / (1 + i), "seconds": 0.15 * (1 + i)}
    for name in ("zero-shot", "tuned"):
        results["metrics"][name]["heldout_loss"] = {"value": 2.31 if name == "zero-shot" else 0.52}
        results["metrics"][name]["perplexity"] = {"value": 10.07 if name == "zero-shot" else 1.68}
    for name in names[:-1]:
        for metric_name in ("exact_match", "token_f1", "rouge_l"):
            results["differences"].append({
                "contender": name, "metric": metric_name, "difference": 0.6 if name == "zero-shot" else 0.2,
                "low": 0.3 if name == "zero-shot" else -0.1, "high": 0.9 if name == "zero-shot" else 0.5,
                "tuned_only_right": [0, 1] if name == "zero-shot" else [1] if name == "few-shot" else [],
                "contender_only_right": []})
    results["assertions"] = {"file": "rules.yaml", "results": {name: {
        "rules": {"valid JSON": 3 if i else 0, f"no {HOSTILE}": 3}, "answers": 3, "all_passed": 3 if i else 0}
        for i, name in enumerate(names)}}
    results["judge"] = {"url": "http://127.0.0.1:8000/v1", "model": "grader", "ungraded": {n: 0 for n in names}}
    results["metrics"]["tuned"]["judge"] = metric(0.8, 0.6, 1.0)
    results["forgetting"] = {"file": "general_knowledge.jsonl", "questions": 40, "results": {
        "zero-shot": {"accuracy": 0.45, "accuracy_per_token": 0.5},
        "tuned": {"accuracy": 0.425, "accuracy_per_token": 0.5}}}
    results["novelty"] = {"training_file": "runs/mine/train.jsonl", "values": 6, "novel_values": 2, "share": 1 / 3,
                          "novel_rows": 2, "seen_rows": 1, "rows_without_values": 0, "training_values": 40,
                          "accuracy": {n: {"novel": metric(0.5 if n == "tuned" else 0.0, 0.0, 1.0) | {"rows": 2},
                                           "seen": metric(1.0 if i else 0.0, 1.0 if i else 0.0, 1.0) | {"rows": 1}}
                                       for i, n in enumerate(names)}}
    results["samples"] = [
        {"index": k, "novelty": ["novel", "seen", "novel"][k], **sample,
         "answers": {n: {"text": answers[n][k], "bucket": buckets[n][k], "stopped": True,
                         "assertions_failed": [] if n != "zero-shot" else ["valid JSON"],
                         "judge": 0.75 if n == "tuned" else None} for n in names}}
        for k, sample in enumerate(SAMPLES)]
    return results


def make_run(folder: Path, eval_json: dict | None, config: str = CONFIG, final_loss: float = 0.4) -> Path:
    """A run folder as training writes it (config, run.json, metrics, data check), without weights."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config)
    (folder / "run.json").write_text(json.dumps({"base": "smollm2-135m", "method": "lora",
                                                 "train_examples": 191, "test_examples": 22}))
    (folder / "data_check.json").write_text(json.dumps(DATA_CHECK))
    rows = [{"step": 0, "eval_loss": 2.4}]
    for step in range(1, 41):
        loss = final_loss + 2.0 * 0.9 ** step + 0.05 * (step % 3)
        rows.append({"step": step, "loss": round(loss, 5), "lr": 1e-3, "tokens": 900, "tokens_per_s": 400.0,
                     "elapsed_s": step * 2.0})
        if step % 10 == 0:
            rows.append({"step": step, "eval_loss": round(final_loss + 0.1 + 2.0 * 0.9 ** step, 5)})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if eval_json is not None:
        (folder / "eval.json").write_text(json.dumps(eval_json))
    return folder


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd)


def sections(html: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", html)


def assert_offline(html: str) -> None:
    """No attribute points at the network, nor loads anything: no script at all."""
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:)?//""", html, re.I)
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html


def test_simple_eval_json_renders_every_section_it_has(tmp_path):
    run = make_run(tmp_path / "run", SIMPLE_EVAL)
    path = write_report(run)
    html = path.read_text()
    assert path == run / "report.html"
    assert sections(html) == ["Loss", "Metrics", "Answers side by side", "Data check", "Settings"]
    # Loss curves: the training line (40 points) and the held-out one with markers.
    paths = re.findall(r"<path d='(M[^']*)'", html)
    assert [p.count("L") + 1 for p in paths] == [40, 5]
    assert "lowest held-out loss 0.5" in html
    # Metric table: best of each row highlighted, in the right direction.
    metrics = html[html.index("<h2>Metrics</h2>"):html.index("<h2>Answers")]
    assert "<td class=best>66.7%</td>" in metrics and "<td>0.0%</td>" in metrics
    assert "<td class=best>0.520</td>" in metrics and "<td>2.310</td>" in metrics  # lower loss wins
    # Answers: the tuned model's mistake (line 8) comes first; its wrong word is marked, the missing one struck.
    answers = html[html.index("<h2>Answers"):]
    assert answers.index("line 8") < answers.index("line 3")
    assert "<mark>today</mark><del>tomorrow</del>" in answers
    assert "(empty)" in answers
    # Data check and settings.
    check = html[html.index("<h2>Data check"):]
    assert "E_JSON 2, E_SHAPE 1" in check and "W_DUPLICATE 4" in check and "train 191 / test 22" in check
    assert "<td>220 read, 217 valid: 217 conversations</td>" in check  # what the shapes count, in words
    # The length histogram: bars, both axes named, and --max-length marked where it falls.
    histogram = check[check.index("<svg class=hist"):check.index("</figure>")]
    assert histogram.count("<rect") == 4 and ">example length (tokens)</text>" in histogram
    assert ">rows</text>" in histogram and ">120</text>" in histogram  # the y axis: rows, up to the tallest bar
    limit = re.search(r"<line x1='([\d.]+)' x2='[\d.]+' [^>]*class=limit />", histogram)
    assert limit and float(limit.group(1)) == pytest.approx(48 + 480 * 128 / 164, abs=0.1)
    assert ">--max-length 128</text>" in histogram
    # Settings: the learning rate training used, not `null`, when config.yaml left it to the default.
    assert "<th>lora_rank</th><td>16</td>" in html and "<th>lr</th><td>0.001 (default for lora)</td>" in html
    assert_offline(html)


def test_user_text_is_escaped(tmp_path):
    html = write_report(make_run(tmp_path / "run", SIMPLE_EVAL)).read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &#34;quotes&#34;" in html
    # In a prompt, an answer (through the word diff) and a data check message alike.
    assert html.count("&lt;script&gt;") >= 3


def test_rich_eval_json_shows_intervals_buckets_cost_differences_and_forgetting(tmp_path):
    html = write_report(make_run(tmp_path / "run", rich_eval())).read_text()
    assert sections(html) == ["Loss", "Metrics", "Differences: tuned against each contender", "Novelty",
                              "Answer buckets", "Cost per request", "Assertions", "Forgetting check",
                              "Answers side by side", "Data check", "Settings"]
    assert ("On exact match, the tuned model beats zero-shot (+60.0 points); cannot be told apart from few-shot "
            "(+20.0 points), retrieval (+20.0 points)") in html
    metrics = html[html.index("<h2>Metrics"):html.index("<h2>Differences")]
    header = re.search(r"<tr><th></th>(.*?)</tr>", metrics).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["zero-shot", "few-shot", "retrieval", "tuned"]
    assert "<span class=ci>[36.7%, 96.7%]</span>" in metrics  # tuned exact match 66.7% with its interval
    assert "95% bootstrap confidence interval" in metrics
    assert "judge: grader at http://127.0.0.1:8000/v1" in metrics  # a URL as plain text, not a link
    assert "<tr><th>judge&#39;s grade</th><td class=na>–</td>" in metrics
    # Lower is better for hallucinated values and loss: the tuned model's 15% and 0.520 win their rows.
    row = re.search(r"<tr><th>hallucinated values</th>(.*?)</tr>", metrics).group(1)
    assert row.count("class=best") == 1 and re.search(r"class=best>15\.0%", row)
    row = re.search(r"<tr><th>held-out loss</th>(.*?)</tr>", metrics).group(1)
    assert row == "<td>2.310</td><td class=na>–</td><td class=na>–</td><td class=best>0.520</td>"
    assert re.search(r"<tr><th><code>day</code></th><td>30.0%</td><td>60.0%</td><td class=best>90.0%</td></tr>",
                     metrics)
    differences = html[html.index("<h2>Differences"):html.index("<h2>Answer buckets")]
    row = re.search(r"<tr><th>tuned − zero-shot</th>(.*?)</tr>", differences).group(1)
    assert row.startswith("<td class=up>+60.0 <span class=ci>[+30.0, +90.0]</span></td>")
    assert "<td>2: lines 3, 8</td>" in row
    row = re.search(r"<tr><th>tuned − few-shot</th>(.*?)</tr>", differences).group(1)
    assert row.startswith("<td>+20.0 ") and "<td>1: lines 8</td>" in row  # interval spans 0: not coloured
    novelty = html[html.index("<h2>Novelty"):html.index("<h2>Answer buckets")]
    row = re.search(r"<tr><th>rows with a novel value <span class=ci>\(2\)</span></th>(.*?)</tr>", novelty).group(1)
    assert row.count("class=best") == 1 and "<td class=best>50.0% <span class=ci>[0.0%, 100.0%]</span></td>" in row
    assert "<tr><th>rows with only seen values <span class=ci>(1)</span></th><td>0.0%" in novelty
    assert "33.3% of the 6 reference answer values never occur in a training answer" in novelty
    check = html[html.index("<h2>Data check"):]
    assert "seed 0, by metadata.customer" in check
    assert "25.0% of 44 held-out answer values never occur in a training answer; 9 held-out rows hold one" in check
    buckets = html[html.index("<h2>Answer buckets"):html.index("<h2>Cost")]
    tuned_row = re.search(r"<tr><th>tuned</th>(.*?)</tr>", buckets).group(1)
    assert re.findall(r"<td>(\d+)</td>", tuned_row) == ["2", "0", "1", "0", "0", "0", "0"]
    assert "Examples of each bucket" in buckets and "<b>tuned</b>, hallucinated value:" in buckets
    cost = html[html.index("<h2>Cost"):html.index("<h2>Assertions")]
    row = re.search(r"<tr><th>prompt tokens</th>(.*?)</tr>", cost).group(1)
    assert row == "<td class=best>60</td><td>260</td><td>260</td><td class=best>60</td>"
    assert "The local contenders computed in bf16 (bf16 autocast; <code>--precision fp32</code> for fp32)." in cost
    assertions = html[html.index("<h2>Assertions"):html.index("<h2>Forgetting")]
    assert "<tr><th>every rule</th><td>0 <span class=ci>0.0%</span></td>" in assertions
    assert "no &lt;script&gt;" in assertions
    forgetting = html[html.index("<h2>Forgetting"):html.index("<h2>Answers")]
    assert "<tr><th>accuracy</th><td class=best>45.0%</td><td>42.5%</td></tr>" in forgetting
    answers = html[html.index("<h2>Answers"):]
    assert answers.index("line 15") < answers.index("line 3")  # the tuned model's mistake first
    assert answers.count("<div class=cell>") == 3 * 5  # the reference and four contenders per example
    assert "<mark>sunday</mark><del>Saturday</del>" in answers and "fails: valid JSON" in answers
    assert answers.count("<span class=ci>judge 0.75</span>") == 3
    assert_offline(html)



def test_mostly_empty_answers_get_a_banner_with_the_likely_cause(tmp_path):
    results = rich_eval()
    assert "answers are empty" not in render_run(read_run(make_run(tmp_path / "quiet", results)))
    for sample in results["samples"]:  # the tuned model ends its turn at once on two of three
        if sample["line"] != 3:
            sample["answers"]["tuned"].update(text="", bucket="empty", stopped=True)
    results["buckets"]["tuned"].update(correct=1, empty=2, **{"hallucinated value": 0})
    for sample in results["samples"]:  # few-shot writes nothing visible before the token limit
        sample["answers"]["few-shot"].update(text="", bucket="empty", stopped=False)
    results["buckets"]["few-shot"].update(correct=0, wrong=0, empty=3)
    html = render_run(read_run(make_run(tmp_path / "empty", results)))
    top = html[:html.index("<h2>")]  # above every section
    banners = re.findall(r"<p class=banner>(.*?)</p>", top)
    assert len(banners) == 2
    few, tuned = banners
    assert few.startswith("<b>few-shot: 3 of 3 answers are empty.</b>") and "token limit (40 new tokens)" in few
    assert tuned.startswith("<b>tuned: 2 of 3 answers are empty.</b>") and "end-of-turn token too early" in tuned


def test_the_bundled_forgetting_questions_are_named_without_their_path(tmp_path):
    results = rich_eval()
    bundled = "/opt/venv/lib/python3.11/site-packages/tunelab/examples/general_knowledge.jsonl"
    results["forgetting"]["file"] = bundled
    html = render_run(read_run(make_run(tmp_path / "bundled", results)))
    note = re.search(r"<h2>Forgetting check</h2>.*?<p class=note>(.*?)</p>", html, re.S).group(1)
    visible = re.sub(r"<[^>]+>", "", note)
    assert "40 multiple-choice questions of general_knowledge.jsonl (bundled with tunelab)" in visible
    assert "/opt/venv" not in visible and f"title='{bundled}'" in note  # the path only on hover
    results["forgetting"]["file"] = "/home/me/work/questions/my_mcq.jsonl"
    html = render_run(read_run(make_run(tmp_path / "own", results)))
    note = re.search(r"<h2>Forgetting check</h2>.*?<p class=note>(.*?)</p>", html, re.S).group(1)
    assert "of my_mcq.jsonl, scored" in re.sub(r"<[^>]+>", "", note)

def test_contender_names_from_the_user_are_escaped(tmp_path):
    """An endpoint contender is named on the command line (`--contender NAME=URL`)."""
    hostile = json.loads(json.dumps(rich_eval()).replace('"few-shot', json.dumps(HOSTILE)[:-1]))
    assert HOSTILE in hostile["metrics"]
    html = write_report(make_run(tmp_path / "run", hostile)).read_text()
    assert "<script>" not in html and html.count("&lt;script&gt;alert") > 10
    assert_offline(html)


def test_markup_in_answers_data_and_run_names_shows_as_text(tmp_path):
    """A model's answer, a reference, a bucket example, a config value, a run folder's name (in the
    comparison's table and its SVG legend): all text, never markup."""
    results = rich_eval()
    for sample in results["samples"]:
        sample["answers"]["tuned"]["text"] = f"<script>alert({sample['line']})</script>"
        sample["reference"] = "<img src=x onerror=alert(1)>"
    config = CONFIG.replace("format: auto", "format: '<script>alert(2)</script>'")
    runs = [make_run(tmp_path / "a" / "<script>x", results, config=config),
            make_run(tmp_path / "b" / "<script>x", None)]
    own = write_report(runs[0]).read_text()
    compared = write_comparison(runs, tmp_path / "cmp.html").read_text()
    for html in (own, compared):
        assert "<script" not in html.lower() and "<img" not in html
        assert_offline(html)
    assert "<span class=ans>&lt;script&gt;alert(15)&lt;/script&gt;</span>" in own  # an answer among bucket examples
    answers = own[own.index("<h2>Answers"):]
    assert "<div class=ans>&lt;img src=x onerror=alert(1)&gt;</div>" in answers  # the reference
    assert "&lt;<mark>script&gt;</mark><del>img src=x onerror=</del>alert(" in answers  # the answer, in the word diff
    assert own.count("&lt;script&gt;alert(2)&lt;/script&gt;") == 1  # the config value
    legend = re.search(r"<figcaption class=legend>(.*?)</figcaption>", compared).group(1)
    assert f"{escape(runs[0])}</span>" in legend  # the run's path, as text, in the chart's legend


def test_comparison_links_are_relative_paths_even_for_a_scheme_like_folder_name(tmp_path):
    runs = [make_run(tmp_path / "javascript:alert(1)", SIMPLE_EVAL), make_run(tmp_path / "two words", SIMPLE_EVAL)]
    html = write_comparison(runs, tmp_path / "cmp.html").read_text()
    links = re.findall(r"<a href='([^']*)'>", html)
    assert links == ["javascript%3Aalert%281%29/report.html", "two%20words/report.html"]
    from urllib.parse import unquote

    assert [(tmp_path / unquote(link)).exists() for link in links] == [True, True]  # they lead to the reports


def test_eval_json_of_the_first_shape_is_upgraded_on_reading(tmp_path):
    (tmp_path / "eval.json").write_text(json.dumps(SIMPLE_EVAL))
    results = EvalResults.read(tmp_path / "eval.json")
    assert results.schema_version == 1 and results.names == ["base", "tuned"]
    assert results.metrics["tuned"]["heldout_loss"].value == 0.52 and "seconds" not in results.metrics["tuned"]
    assert results.samples[1].answers["tuned"].text == '{"people": 2, "day": "today"}'
    assert results.samples[1].index == 1 and results.samples[1].line == 8
    assert results.model_dump()["schema"] == 1  # dumped under eval.json's own keys


def test_eval_json_without_the_newer_sections_still_loads_and_reports(tmp_path):
    """A schema-2 file from before precision, novelty, the copy constraint, assertions, the judge
    and the forgetting check: those sections are simply absent from the page."""
    older = rich_eval()
    for key in ("precision", "novelty", "copy_constraint", "assertions", "judge", "forgetting", "extractive_fields",
                "bucket_examples"):
        older.pop(key, None)
    for sample in older["samples"]:
        sample.pop("novelty")
        for answer in sample["answers"].values():
            answer.pop("judge"), answer.pop("assertions_failed")
    html = write_report(make_run(tmp_path / "run", older)).read_text()
    assert sections(html) == ["Loss", "Metrics", "Differences: tuned against each contender", "Answer buckets",
                              "Cost per request", "Answers side by side", "Data check", "Settings"]
    assert "computed in" not in html and "Examples of each bucket" not in html


def test_typed_results_round_trip_through_the_file_under_the_same_keys(tmp_path):
    results = EvalResults.model_validate(rich_eval())
    results.write(tmp_path / "eval.json")
    written = json.loads((tmp_path / "eval.json").read_text())
    assert list(written) == ["schema", "run", "data", "examples_evaluated", "max_new_tokens", "shots", "precision",
                             "device", "threads", "contenders", "metrics", "fields", "extractive_fields", "buckets",
                             "bucket_examples", "differences", "cost", "assertions", "judge", "forgetting",
                             "copy_constraint", "invented_names", "novelty", "samples"]
    assert EvalResults.read(tmp_path / "eval.json") == results
    assert written["metrics"]["tuned"]["exact_match"] == rich_eval()["metrics"]["tuned"]["exact_match"]
    assert written["novelty"]["accuracy"]["tuned"] == rich_eval()["novelty"]["accuracy"]["tuned"]


@pytest.mark.parametrize("content, problem", [
    ('{"schema": 2, "examples_evaluated": 3, "metrics": [1, 2]}',
     "not the eval.json `tunelab eval` writes (metrics: input should be an object)"),
    ('{"schema": 2, "examples_evaluated": "many"}',
     "not the eval.json `tunelab eval` writes (examples_evaluated: input should be a valid integer"),
    ('["a list"]', "not the eval.json `tunelab eval` writes (the top level: input should be an object)"),
    ('{"schema": 2,', "not valid JSON (EOF while parsing"),
])
def test_eval_json_of_another_structure_is_one_line_naming_the_file(tmp_path, content, problem):
    run = make_run(tmp_path / "run", None)
    (run / "eval.json").write_text(content)
    result = cli("report", str(run))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"tunelab: error: {run}/eval.json: {problem}")
    assert result.stderr.rstrip().endswith(f"; run `tunelab eval {run}` again to rewrite it")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (run / "report.html").exists()


def test_run_without_eval_json_shows_training_and_data_and_says_what_to_run(tmp_path):
    run = make_run(tmp_path / "run", None)
    html = write_report(run).read_text()
    assert sections(html) == ["Loss", "Evaluation", "Data check", "Settings"]
    assert f"<code>tunelab eval {run}</code>" in html


def test_word_diff_marks_extra_words_and_strikes_missing_ones():
    assert (word_diff('{"day": "Sat"}', '{"day": "Saturday"}')
            == '{&#34;day&#34;: &#34;<mark>Sat</mark><del>Saturday</del>&#34;}')
    assert word_diff("for 4 people", "for 4 people") == "for 4 people"
    assert word_diff("a b c", "a c") == "a <mark>b</mark> c"
    assert word_diff("a c", "a b c") == "a<del> b</del> c"
    assert word_diff(" \n", "a") == "<span class=empty>(empty)</span>"


def test_comparison_puts_runs_side_by_side_and_highlights_the_winner(tmp_path):
    better = rich_eval()
    better["run"], better["data"] = "runs/lr-3e-4", "runs/lr-3e-4/test.jsonl"  # relative, as given to eval
    worse = json.loads(json.dumps(better))
    worse["data"] = str(tmp_path / "lr-1e-3" / "test.jsonl")  # absolute
    worse["metrics"]["tuned"]["exact_match"]["value"] = 0.25
    runs = [make_run(tmp_path / "lr-1e-3", worse, final_loss=0.6),
            make_run(tmp_path / "lr-3e-4", better, config=CONFIG.replace("lr: null", "lr: 0.0003"), final_loss=0.3),
            make_run(tmp_path / "not-evaluated", None, config=CONFIG.replace("lr: null", "lr: 0.01"), final_loss=0.9)]
    out = write_comparison(runs, tmp_path / "cmp.html")
    html = out.read_text()
    assert all((run / "report.html").exists() for run in runs)
    assert re.findall(r"<th><a href='([^']*)'>", html) == [f"{run.name}/report.html" for run in runs]
    # Only the setting that differs is a row; the others are folded away.
    assert ("<tr class=setting><th>lr</th><td>0.001 (default for lora)</td><td>0.0003</td><td>0.01</td></tr>"
            in html)
    assert "<tr class=setting><th>lora_rank" not in html and "Settings shared by all runs" in html
    assert "evaluated on" not in html  # each on its own held-out split
    worse["data"] = "hard.jsonl"
    (runs[0] / "eval.json").write_text(json.dumps(worse))
    html = write_comparison(runs, tmp_path / "cmp.html").read_text()
    assert "<tr class=setting><th>evaluated on</th><td>hard.jsonl</td><td>held-out split</td><td>–</td></tr>" in html
    row = re.search(r"<tr><th>held-out loss \(end of training\)</th>(.*?)</tr>", html).group(1)
    assert re.findall(r"<td(?: class=(\w+))?>", row) == ["", "best", ""]
    row = re.search(r"<tr><th>tuned: exact match</th>(.*?)</tr>", html).group(1)
    assert row == "<td>25.0%</td><td class=best>66.7%</td><td class=na>–</td>"
    assert "Not evaluated yet: not-evaluated" in html
    assert len(re.findall(r"<path d='M", html)) == 3  # one held-out curve per run
    assert_offline(html)


def test_comparison_names_runs_of_the_same_name_by_their_path(tmp_path):
    runs = [make_run(tmp_path / "a" / "run", SIMPLE_EVAL), make_run(tmp_path / "b" / "run", SIMPLE_EVAL)]
    html = write_comparison(runs, tmp_path / "cmp.html").read_text()
    assert re.findall(r"<th><a href='([^']*)'>([^<]*)</a>", html) == [
        ("a/run/report.html", str(runs[0])), ("b/run/report.html", str(runs[1]))]
    assert "<tr class=setting>" not in html  # same settings: no row of differences
    assert "class=best" not in html  # equal results: nothing wins


def readme_commands() -> list[str]:
    """The `tunelab report` command lines of docs/REPORT.md, without `tunelab` and comments."""
    readme = (Path(__file__).parent.parent / "docs" / "REPORT.md").read_text()
    return [line.split("#")[0].strip().removeprefix("tunelab ") for line in readme.splitlines()
            if line.strip().startswith("tunelab report")]


def test_cli_report_one_run_and_several(tmp_path):
    run = make_run(tmp_path / "runs" / "mine", SIMPLE_EVAL)
    other = make_run(tmp_path / "runs" / "other", None, config=CONFIG.replace("epochs: 2.0", "epochs: 3.0"))
    (run / "report.html").unlink(missing_ok=True)

    # The command forms docs/REPORT.md documents, run exactly as written there.
    one, several, several_out = readme_commands()
    assert (one, several, several_out) == ("report runs/mine", "report runs/mine runs/other",
                                           "report runs/mine runs/other --out runs/compare.html")
    result = cli(*one.split(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Report written to runs/mine/report.html"
    assert "<h2>Metrics</h2>" in (run / "report.html").read_text()

    result = cli(*several.split(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Report written to comparison.html"
    assert "2 runs compared" in (tmp_path / "comparison.html").read_text()
    assert result.stderr.strip() == ("tunelab: note: runs/other has no eval.json, so its report shows training and "
                                     "data only; run `tunelab eval runs/other` for the rest")
    assert (other / "report.html").exists()

    result = cli(*several_out.split(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "<th>epochs</th><td>2.0</td><td>3.0</td>" in (tmp_path / "runs" / "compare.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["report", "{tmp}/nowhere"],
     "{tmp}/nowhere: not a tunelab run folder (no config.yaml); train one with `tunelab train`"),
    (["report", "{tmp}/run", "--out", "{tmp}/missing/r.html"],
     "--out {tmp}/missing/r.html: folder {tmp}/missing does not exist; create it (mkdir -p {tmp}/missing)"),
    (["report", "{tmp}/run", "{tmp}/nowhere"], "{tmp}/nowhere: not a tunelab run folder"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    make_run(tmp_path / "run", SIMPLE_EVAL)
    result = cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert result.stderr.startswith("tunelab: error: " + message.format(tmp=tmp_path))
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "report.html").exists()  # nothing written


def test_damaged_metrics_file_is_named_with_its_line(tmp_path):
    run = make_run(tmp_path / "run", SIMPLE_EVAL)
    broken = len((run / "metrics.jsonl").read_text().splitlines()) + 1
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{broken\n" + json.dumps({"step": 41, "loss": 0.1}) + "\n")
    result = cli("report", str(run))
    assert result.returncode == 2
    assert result.stderr.strip() == f"tunelab: error: {run}/metrics.jsonl:{broken}: not valid JSON; the file is damaged"
    # A partial last line, as a killed run leaves it, is skipped.
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().split("{broken")[0] + '{"step": 4')
    assert read_run(run).steps[-1]["step"] == 40


def test_report_does_not_import_torch(tmp_path):
    run = make_run(tmp_path / "run", rich_eval())
    code = ("import sys\nfrom tunelab.cli import main\n"
            "try:\n    main(['report', '--help'])\nexcept SystemExit:\n    pass\n"
            f"assert main(['report', {str(run)!r}]) == 0\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy', 'peft', 'accelerate') if m in sys.modules)\n"
            "print(heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert "usage: tunelab report" in result.stdout


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows of an 8-bit RGB or RGBA PNG, as Chromium writes it."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour = header[:4]
    assert depth == 8 and colour in (2, 6)
    channels = 3 if colour == 2 else 4
    raw, stride, rows, previous = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = previous[x], previous[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[x] = (line[x] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        rows.append(bytes(line[i:i + 3]) for i in range(0, stride, channels))
        rows[-1] = b"".join(rows[-1])
        previous = line
    return width, height, rows


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    html_path = write_report(make_run(tmp_path / "run", rich_eval()))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    dom = subprocess.run([*flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    # What the browser parsed: the curves, the histogram and every table with its rows.
    assert len(re.findall(r"<path d=\"M", dom.stdout)) == 2 and "<rect" in dom.stdout
    assert 'class="limit"' in dom.stdout and ">example length (tokens)</text>" in dom.stdout  # --max-length marked
    source = html_path.read_text()
    assert dom.stdout.count("<table") == source.count("<table") == 11
    assert dom.stdout.count("<tr") == source.count("<tr") > 50
    assert dom.stdout.count("<div class=\"sample\">") == 3

    screenshot = tmp_path / "report.png"
    shot = subprocess.run([*flags, f"--screenshot={screenshot}", html_path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr
    width, height, rows = png_pixels(screenshot)
    assert (width, height) == (1280, 2000)
    # The loss chart's lines, in the colours the report draws them, are on screen (top part of the page).
    top = b"".join(rows[:700])
    assert bytes.fromhex("1f6fb4") in top and bytes.fromhex("d9730d") in top
    # The metric table's best cells (light green) are drawn further down, and the page is not blank.
    assert bytes.fromhex("d9f2d9") in b"".join(rows[400:2000])
    assert len({row for row in rows}) > 300
