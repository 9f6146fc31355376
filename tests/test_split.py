"""`--split-by`: whole groups of a field on one side of the split, in the data check and in
training alike; and the data check's novelty line and warning, through the CLI."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from tunelab.data import load as data
from tunelab.errors import UserError


def noise(i: int) -> str:
    """Text unlike any other row's, so that no two rows are near duplicates."""
    return hashlib.sha256(str(i).encode()).hexdigest() * 2


def rows_of(customers: list[str], values=lambda i, c: {"customer": c, "order": i}) -> list[dict]:
    return [{"prompt": f"Who placed order {i}? {noise(i)}", "completion": json.dumps(values(i, c)),
             "metadata": {"customer": c}} for i, c in enumerate(customers)]


def grouped(path, seed=0, test_size=0.2, split_by="metadata.customer"):
    return data.split(data.load_examples(path, split_by=split_by), test_size, seed, split_by=split_by)


def test_no_group_is_on_both_sides_and_the_share_is_met_in_whole_groups(tmp_path, write_jsonl):
    customers = [f"c{i % 40}" for i in range(400)]  # 40 groups of 10 rows
    path = write_jsonl(tmp_path / "d.jsonl", rows_of(customers))
    train, test = grouped(path)
    assert not {e.group for e in train} & {e.group for e in test}
    assert len(train) + len(test) == 400 and len(test) == 80  # 8 whole groups make the 20% asked
    assert Counter(e.group for e in test) == {g: 10 for g in {e.group for e in test}}


def test_uneven_groups_stop_where_the_next_would_overshoot_more_than_it_helps():
    # Ranks in split order: groups of 30, 10, 50 and 10 rows, 100 rows, 25 asked: 30 is closer
    # to 25 than 0 is, 30 + 10 is further than 30, so only the first group is held out.
    ranks = np.repeat(np.array([1, 2, 3, 4], np.uint64), [30, 10, 50, 10])
    assert data.split_groups(ranks, 0.25, "id").sum() == 30
    assert data.split_groups(ranks, 0.36, "id").sum() == 40
    assert data.split_groups(ranks, 0, "id").sum() == 0


def test_the_split_is_deterministic_with_the_seed_and_independent_of_row_order(tmp_path, write_jsonl):
    rows = rows_of([f"c{i % 25}" for i in range(200)])
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])

    def held_out(path, seed):
        return {e.group for e in grouped(path, seed)[1]}

    assert held_out(path, 0) == held_out(path, 0) == held_out(shuffled, 0)
    assert held_out(path, 0) != held_out(path, 1)


def test_the_field_may_be_a_row_key_a_nested_metadata_key_or_a_spreadsheet_column():
    row = {"id": 7, "prompt": "p", "completion": "c", "metadata": {"customer": {"region": "north"}, "none": None}}
    assert data.group_value(row, "id") == "7"
    assert data.group_value(row, "metadata.customer.region") == "north"
    assert data.group_value(row, "metadata.customer") == '{"region": "north"}'
    assert data.group_value(row, "metadata.none") is None
    assert data.group_value(row, "metadata.missing") is None
    assert data.group_value({"prompt": "p", "metadata": '{"customer": "acme"}'}, "metadata.customer") == "acme"


def test_the_python_split_names_the_first_row_without_the_field(tmp_path, write_jsonl):
    rows = rows_of(["a", "b", "c", "d"])
    del rows[1]["metadata"], rows[3]["metadata"]
    with pytest.raises(UserError, match="line 2: no metadata.customer to split by .* and 1 more row lacks it"):
        grouped(write_jsonl(tmp_path / "d.jsonl", rows))


def test_the_data_check_prints_groups_and_novelty_and_saves_them(tmp_path, write_jsonl, cli):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of([f"c{i % 20}" for i in range(100)]))
    result = cli("data", "check", path, "--split-by", "metadata.customer", "--test-size", "0.2",
                 "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    split_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("split "))
    assert "train 80 / test 20 (--split-by metadata.customer: 16 / 4 groups)" in split_line
    # Every held-out customer is new, and so is every order number: 40 values, all novel.
    assert "novelty              100% of 40 held-out answer values never occur in a training answer; " \
           "20 of 20 held-out rows hold one" in result.stdout
    assert "W_SEEN_VALUES" not in result.stdout
    saved = json.loads((tmp_path / "r" / "data_check.json").read_text())
    assert saved["split"]["split_by"] == "metadata.customer" and saved["split"]["groups"] == {"train": 16, "test": 4}
    assert saved["options"]["split_by"] == "metadata.customer"
    assert saved["novelty"] == {"values": 40, "novel_values": 40, "share": 1.0, "novel_rows": 20, "seen_rows": 0,
                                "rows_without_values": 0, "training_values": 96}


def test_a_random_split_that_repeats_training_values_is_warned_about(tmp_path, write_jsonl, cli):
    # 60 customers in 600 rows, answers without a row-unique value: a random split holds out
    # customers that training shows, and the check says so, with the fix.
    rows = rows_of([f"customer {i % 60}" for i in range(600)], values=lambda i, c: {"customer": c, "size": i % 3})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    result = cli("data", "check", path)
    assert result.returncode == 0, result.stderr
    assert "novelty              0% of 120 held-out answer values never occur in a training answer; " \
           "0 of 60 held-out rows hold one" in result.stdout
    warning = [line for line in result.stdout.splitlines() if "d.jsonl: W_SEEN_VALUES" in line]
    assert len(warning) == 1 and "60 of 60 held-out rows" in warning[0]
    assert "held-out loss will flatter the model" in warning[0] and "--split-by" in warning[0]
    grouped_check = cli("data", "check", path, "--split-by", "metadata.customer")
    assert grouped_check.returncode == 0 and "W_SEEN_VALUES" not in grouped_check.stdout
    assert "novelty              50% of 120 held-out answer values" in grouped_check.stdout


def test_a_label_set_is_not_warned_about(tmp_path, write_jsonl, cli):
    """Classes repeat by nature: a held-out 'positive' seen in training is no leak."""
    rows = [{"prompt": f"Review {noise(i)}: {'great' if i % 2 else 'awful'}", "completion": json.dumps(
        {"sentiment": "positive" if i % 2 else "negative"})} for i in range(200)]
    result = cli("data", "check", write_jsonl(tmp_path / "d.jsonl", rows))
    assert result.returncode == 0 and "0 of 20 held-out rows hold one" in result.stdout
    assert "W_SEEN_VALUES" not in result.stdout


@pytest.mark.slow
def test_training_splits_by_the_field_as_the_check_does(tmp_path, tiny_model_dir, write_jsonl, cli):
    path = write_jsonl(tmp_path / "d.jsonl", rows_of([f"c{i % 10}" for i in range(60)]))
    out = tmp_path / "run"
    result = cli("train", path, "--base", tiny_model_dir, "--out", out, "--max-steps", "1", "--batch-size", "4",
                 "--split-by", "metadata.customer", "--test-size", "0.2")
    assert result.returncode == 0, result.stderr
    check = json.loads((out / "data_check.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert split["split_by"] == "metadata.customer"
    assert len(split["test_lines"]) == check["split"]["test"] == 12
    groups = {name: {json.loads(line)["metadata"]["group"] for line in (out / f"{name}.jsonl").read_text().splitlines()}
              for name in ("train", "test")}
    assert len(groups["test"]) == 2 and not groups["train"] & groups["test"]
    assert "metadata.customer" in (out / "config.yaml").read_text()


def test_training_stops_on_a_row_without_the_field(tmp_path, tiny_model_dir, write_jsonl, cli):
    rows = rows_of(["a", "b", "c", "d"])
    del rows[2]["metadata"]
    result = cli("train", write_jsonl(tmp_path / "d.jsonl", rows), "--base", tiny_model_dir, "--out", tmp_path / "run",
                 "--split-by", "metadata.customer")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith("tunelab: error: ")
    assert "d.jsonl:3: E_SPLIT_BY no metadata.customer to split by" in result.stderr.splitlines()[0]
    assert not (tmp_path / "run" / "config.yaml").exists()
