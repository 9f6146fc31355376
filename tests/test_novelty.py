"""How novel held-out answers are to training: values by hand, and eval.json on a tiny run."""

from __future__ import annotations

import json
import subprocess

import pytest

from clirun import run_cli
from tunelab.data import novelty
from tunelab.evaluate.core import format_report
from tunelab.evaluate.metrics import accuracy_by_kind


def test_values_are_json_leaves_or_quoted_spans_and_plain_text_has_none():
    assert novelty.compared_values('{"name": "Chloe Souza", "guests": 7, "vip": true, "note": null, '
                                 '"items": [{"dish": "Pad Thai"}], "time": "21:00"}') == \
        ["chloe souza", "7", "pad thai", "2100"]
    assert novelty.compared_values('The guest is "Chloe Souza", arriving at \u201cnine\u201d.') == \
        ["chloe souza", "nine"]
    assert novelty.compared_values("A table for seven on Saturday.") == []
    assert novelty.value_hashes('{"a": "X", "b": "x"}') == novelty.value_hashes('{"c": "x"}')  # one value, once


def test_novelty_of_hand_made_rows():
    training = ['{"name": "Ana Silva", "city": "Lisbon"}', '{"name": "Tom Weber", "city": "Berlin"}',
                'Booked for "Ana Silva".']
    held_out = ['{"name": "Ana Silva", "city": "Berlin"}',   # both seen
                '{"name": "Cyrus Cole", "city": "Lisbon"}',  # one of two novel
                '{"name": "Ines Kaur", "city": "Halifax"}',  # both novel
                "Booked, thanks."]                           # no values
    measured = novelty.measure(map(novelty.value_hashes, training), map(novelty.value_hashes, held_out))
    assert measured.to_dict() == {"values": 6, "novel_values": 3, "share": 0.5, "novel_rows": 2, "seen_rows": 1,
                                  "rows_without_values": 1, "training_values": 4}
    assert measured.kinds == ["seen", "novel", "novel", "none"]
    assert measured.describe() == ("50% of 6 held-out answer values never occur in a training answer; "
                                   "2 of 3 held-out rows hold one")
    assert not measured.looks_familiar()  # 4 distinct training values: too few to say
    accuracy = accuracy_by_kind(measured.kinds, [1.0, 0.0, 1.0, 1.0])
    assert accuracy["novel"]["value"] == 0.5 and accuracy["novel"]["rows"] == 2
    assert accuracy["seen"] == {"value": 1.0, "low": 1.0, "high": 1.0, "rows": 1}
    assert accuracy_by_kind(["none"], [1.0]) == {"novel": None, "seen": None}
    assert novelty.measure([], [novelty.value_hashes("plain")]).describe().startswith("no answer values")


def cli(*args) -> subprocess.CompletedProcess:
    return run_cli(*args)


@pytest.fixture(scope="module")
def customer_run(tmp_path_factory, tiny_model_dir, write_jsonl):
    """A tiny run trained on JSON answers, split by customer: every held-out customer is new."""
    folder = tmp_path_factory.mktemp("novelty")
    rows = [{"prompt": f"Order {i} was placed by customer {c}.", "completion": json.dumps({"customer": f"C{c}"}),
             "metadata": {"customer": c}} for i in range(30) for c in [i % 6]]
    data = write_jsonl(folder / "orders.jsonl", rows)
    result = cli("train", data, "--base", tiny_model_dir, "--out", folder / "run", "--max-steps", "1",
                 "--batch-size", "4", "--split-by", "metadata.customer", "--test-size", "5")
    assert result.returncode == 0, result.stderr
    return folder / "run"


def test_eval_json_says_how_novel_the_held_out_answers_are(customer_run, tmp_path, write_jsonl):
    trained = {json.loads(json.loads(line)["messages"][-1]["content"])["customer"]
               for line in (customer_run / "train.jsonl").read_text().splitlines()}
    seen = sorted(trained)[0]
    # Two rows whose customer training saw, one new customer, one answer in plain text.
    rows = [{"prompt": "Order 90 was placed by customer x.", "completion": json.dumps({"customer": seen})},
            {"prompt": "Order 91 was placed by customer y.", "completion": json.dumps({"customer": seen})},
            {"prompt": "Order 92 was placed by customer z.", "completion": json.dumps({"customer": "Cnew"})},
            {"prompt": "Order 93?", "completion": "No such order."}]
    result = cli("eval", customer_run, "--data", write_jsonl(tmp_path / "probe.jsonl", rows), "--no-base",
                 "--no-forgetting", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    results = json.loads((customer_run / "eval.json").read_text())
    found = results["novelty"]
    assert found["training_file"] == str(customer_run / "train.jsonl")
    assert {k: found[k] for k in ("values", "novel_values", "share", "novel_rows", "seen_rows",
                                  "rows_without_values", "training_values")} == \
        {"values": 3, "novel_values": 1, "share": 1 / 3, "novel_rows": 1, "seen_rows": 2, "rows_without_values": 1,
         "training_values": len(trained)}
    assert [s["novelty"] for s in results["samples"]] == ["seen", "seen", "novel", "none"]
    tuned = found["accuracy"]["tuned"]
    exact = [s["answers"]["tuned"]["exact_match"] for s in results["samples"]]
    assert tuned["novel"]["rows"] == 1 and tuned["novel"]["value"] == exact[2]
    assert tuned["seen"]["rows"] == 2 and tuned["seen"]["value"] == (exact[0] + exact[1]) / 2
    printed = format_report(results)
    assert "novelty: 33% of 3 held-out answer values never occur in a training answer; 1 of 3 held-out rows " \
           "hold one" in printed and printed in result.stdout
    assert "rows with a novel value (1)" in printed and "rows with only seen values (2)" in printed


def test_the_run_held_out_customers_training_never_saw(customer_run):
    """Evaluated on its own split, every held-out answer of the run is new to training."""
    result = cli("eval", customer_run, "--no-base", "--no-forgetting", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    found = json.loads((customer_run / "eval.json").read_text())["novelty"]
    assert found["share"] == 1.0 and found["seen_rows"] == 0 and found["accuracy"]["tuned"]["seen"] is None
    assert "novelty: 100% of 5 held-out answer values" in result.stdout
    html = cli("report", customer_run)
    assert html.returncode == 0, html.stderr
    page = (customer_run / "report.html").read_text()
    assert "<h2>Novelty</h2>" in page and "rows with a novel value" in page
    assert "100.0% of 5 held-out answer values never occur" in page  # the data check's line


def test_packed_rows_measure_as_lists_of_rows_do():
    # The data check's form (all rows' hashes in one array) against `measure` on the same rows.
    import numpy as np

    rng = np.random.default_rng(0)
    rows = [list(dict.fromkeys(rng.integers(0, 1000, rng.integers(0, 5)).tolist())) for _ in range(500)]
    values = np.array([h for row in rows for h in row], np.uint64)
    ends = np.cumsum([len(row) for row in rows])
    held_out = rng.random(500) < 0.2
    training = ~held_out & (rng.random(500) < 0.9)  # some rows neither (dropped copies)
    packed = novelty.measure_packed(values, ends, training, held_out)
    listed = novelty.measure([r for r, t in zip(rows, training) if t], [r for r, h in zip(rows, held_out) if h])
    assert packed == listed and packed.novel_rows and packed.seen_rows and packed.without_values
