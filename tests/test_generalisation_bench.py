"""The generalisation benchmark's data: its novel test rows name nothing that training names."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generalisation.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("generalisation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task", ["people", "orders", "rewrite", "notes"])
def test_novel_test_entities_occur_nowhere_in_training(bench, task):
    train, test = bench.make_task(task, train_rows=400, test_rows=60, seen_rows=20)
    training_text = "\n".join(json.dumps(row, ensure_ascii=False) for row in train)
    novel = bench.novel_rows(train, test)
    assert novel == [True] * 60 + [False] * 20
    for row in test[:60]:
        for entity in row["metadata"]["entities"]:
            # Each distinctive word (not a shared prefix such as "Port", nor a product kind)
            for word in entity.split():
                if word in bench.CITY_PREFIXES or word in " ".join(bench.ITEMS).split():
                    continue
                assert not re.search(rf"\b{re.escape(word)}\b", training_text, re.I), (task, word)
        assert entity_copied(row, any_case=task == "notes")
    train_groups = {row["metadata"]["group"] for row in train}
    assert not train_groups & {row["metadata"]["group"] for row in test[:60]}
    assert {row["metadata"]["group"] for row in test[60:]} <= train_groups


def entity_copied(row, any_case: bool = False) -> bool:
    """Every entity the answer carries is written in the prompt (a copying task): verbatim, or
    with `any_case` in any case (the notes task re-cases its names)."""
    prompt = row["prompt"].lower() if any_case else row["prompt"]
    return all(entity in row["completion"] for entity in row["metadata"]["entities"]) and all(
        all((word.lower() if any_case else word) in prompt for word in entity.split())
        for entity in row["metadata"]["entities"])


def test_no_entity_is_a_word_of_the_notes_wording(bench):
    # TEMPLATE_WORDS leaves the notes wording out (the pools stay as measured before it).
    wording = {w.lower() for line in [bench.NOTES_INSTRUCTION, *bench.NOTES_TEMPLATES]
               for w in re.findall(r"[A-Za-z]+", line)}
    entities = {w.lower() for group in bench.entity_groups(0) for words in group.values() for w in words}
    assert not wording & entities


def test_rows_are_deterministic_and_in_tunelab_shape(bench, tmp_path):
    from tunelab.data.load import load_examples

    first = bench.make_task("orders", train_rows=50, test_rows=10, seen_rows=5)
    assert first == bench.make_task("orders", train_rows=50, test_rows=10, seen_rows=5)
    path = bench.write_jsonl(tmp_path / "orders.jsonl", first[0])
    examples = load_examples(path)
    assert len(examples) == 50
    assert json.loads(examples[0].reference) == json.loads(first[0][0]["completion"])
