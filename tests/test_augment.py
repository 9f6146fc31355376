"""Copy augmentation: which words a row copies, the surrogates that replace them, and a training
run with --copy-augment on and off."""

from __future__ import annotations

import copy
import json
import random
import re

import pytest

from tunelab.cli import main
from tunelab.data.augment import copied_words, copy_variants, fresh_surrogate, surrogate, training_vocabulary
from tunelab.data.load import Example

INSTRUCTION = "Extract the person and the city as JSON with keys name, city."


def row(prompt: str, answer: str, line: int = 1) -> Example:
    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], line)


def people(names: list[tuple[str, str]], start: int = 1) -> list[Example]:
    """A JSON extraction row per (name, city), in two wordings."""
    rows = []
    for i, (name, city) in enumerate(names):
        sentence = f"{name} moved to {city} last spring." if i % 2 else f"Yesterday {name} flew into {city}."
        rows.append(row(f"{INSTRUCTION}\n{sentence}", json.dumps({"name": name, "city": city}), start + i))
    return rows


def words_in(train: list[Example], example: Example) -> list[str]:
    return copied_words(example, *training_vocabulary(train))


def test_json_answers_copy_their_string_values_that_the_input_holds():
    train = people([("Cyrus Halden", "Halifax"), ("Odette Marchbanks", "Tromso")])
    assert words_in(train, train[0]) == ["Cyrus", "Halden", "Halifax"]
    # A value the answer writes rather than copies (normalised, or a label) is not a copy.
    mood = row("Review by Cyrus Halden: loved it.", json.dumps({"name": "Cyrus Halden", "sentiment": "Positive"}))
    assert words_in([mood], mood) == ["Cyrus", "Halden"]
    date = row("Ana Souza came on 3 May 2024.", json.dumps({"name": "Ana Souza", "date": "2024-05-03"}))
    assert words_in([date], date) == ["Ana", "Souza"]


def test_a_label_that_some_answer_writes_without_its_input_is_never_replaced():
    copied = row("Status: Approved by Cyrus Halden", json.dumps({"status": "Approved", "by": "Cyrus Halden"}), 1)
    written = row("The boss said yes", json.dumps({"status": "Approved", "by": "Bram Okonkwo"}), 2)
    assert words_in([copied, written], copied) == ["Cyrus", "Halden"]


def test_free_text_answers_copy_capitalised_runs_and_codes_but_not_ordinary_words():
    train = [
        row("Summarise: yesterday Cyrus Halden flew to Halifax with order AB12. The trip was long.",
            "The trip of Cyrus Halden to Halifax (order AB12) was long."),
        row("Summarise: the meeting ran late.", "The meeting ran late."),
    ]
    # "The" starts sentences in both input and answer, but "the" is an ordinary word of the data.
    assert words_in(train, train[0]) == ["Cyrus", "Halden", "Halifax", "AB12"]
    assert words_in(train, train[1]) == []


def test_a_rewrite_that_reorders_a_name_copies_each_of_its_words():
    note = row("Rewrite: mtg Halden, Cyrus / Halifax / fri", "On Friday, Cyrus Halden will meet us in Halifax.")
    assert words_in([note], note) == ["Cyrus", "Halden", "Halifax"]  # "Friday" is written, not copied
    variant = copy_variants([note], [], 1, seed=0).variants[0]
    first, last, city = re.fullmatch(r"On Friday, (\w+) (\w+) will meet us in (\w+)\.", variant.reference).groups()
    assert variant.messages[0]["content"] == f"Rewrite: mtg {last}, {first} / {city} / fri"


def test_a_name_inside_a_longer_word_is_not_a_copy():
    anna = row("Annabel lives in Halifax.", json.dumps({"name": "Anna", "city": "Halifax"}))
    assert words_in([anna], anna) == ["Halifax"]


def test_each_word_is_replaced_by_the_same_surrogate_in_input_and_answer():
    train = people([("Cyrus Halden", "Halifax"), ("Odette Halden", "Tromso"), ("Bram Okonkwo", "Tromso")])
    variants = copy_variants(train, [], 1, seed=0).variants
    assert len(variants) == 3
    for original, variant in zip(train, variants):
        prompt, answer = variant.messages[0]["content"], json.loads(variant.reference)
        before = json.loads(original.reference)
        assert answer.keys() == before.keys()
        for key in answer:
            assert answer[key] != before[key]
            assert answer[key] in prompt  # still a copy of the input
            assert len(answer[key].split()) == len(before[key].split())  # same number of words
            assert all(w[0].isupper() and w[1:].islower() for w in answer[key].split())  # same capitalisation
        for word in re.findall(r"\w+", original.reference):
            if word[0].isupper():
                assert word not in prompt, word  # no original name left behind
        assert variant.messages[0]["content"].startswith(INSTRUCTION)  # the rest untouched
        assert variant.line == original.line


def test_surrogates_have_the_shape_of_the_word_they_replace():
    rng = random.Random(0)
    for word in ("Halifax", "McDonald", "JFK", "halden", "AB12", "Trondheimsfjorden"):
        made = surrogate(word, rng)
        assert made != word
        assert abs(len(made) - len(word)) <= 1
        assert made[0].isupper() == word[0].isupper()
        assert [c.isdigit() for c in made if c.isdigit()] == [c.isdigit() for c in word if c.isdigit()]
    assert surrogate("AB12", rng)[2:].isdigit() and surrogate("AB12", rng)[:2].isupper()


def test_surrogates_are_never_a_word_of_the_held_out_rows():
    train = people([(f"Cyrus Halden{'e' * i}", "Halifax") for i in range(20)])
    free = copy_variants(train, [], 1, seed=3)
    made = {w for v in free.variants for w in re.findall(r"\w+", v.reference)} - {"name", "city"}
    # Held-out rows that happen to use every surrogate the first run made: none may come back.
    held_out = people([(word, "Oslo") for word in sorted(made)], start=100)
    before = copy.deepcopy(held_out)
    variants = copy_variants(train, held_out, 1, seed=3).variants
    again = {w for v in variants for w in re.findall(r"\w+", v.reference)}
    assert made and not made & again
    assert [e.messages for e in held_out] == [e.messages for e in before]  # read, never changed
    # And one word directly: its first choice forbidden, the next one is taken.
    first = fresh_surrogate("Halifax", random.Random(1), set(), set())
    second = fresh_surrogate("Halifax", random.Random(1), {first.lower()}, set())
    assert second != first


def test_variants_are_the_same_for_the_same_seed_in_any_row_order():
    train = people([("Cyrus Halden", "Halifax"), ("Odette Marchbanks", "Tromso"), ("Bram Okonkwo", "Ghent")])
    one = copy_variants(train, [], 2, seed=5).variants
    assert [v.messages for v in one] == [v.messages for v in copy_variants(train, [], 2, seed=5).variants]
    shuffled = copy_variants(train[::-1], [], 2, seed=5).variants
    assert sorted(json.dumps(v.messages) for v in shuffled) == sorted(json.dumps(v.messages) for v in one)
    assert [v.messages for v in copy_variants(train, [], 2, seed=6).variants] != [v.messages for v in one]
    assert len({v.reference for v in one}) == 6  # two different variants of each row


def test_a_fraction_gives_a_variant_to_that_share_of_the_rows():
    train = people([(f"Cyrus Halden{'e' * i}", f"Hali{'f' * i}ax") for i in range(200)])
    assert 70 <= len(copy_variants(train, [], 0.5, seed=0).variants) <= 130
    assert copy_variants(train, [], 0, seed=0).variants == []


@pytest.mark.slow
def test_training_with_and_without_copy_augmentation(tmp_path, tiny_model_dir, write_jsonl, capsys):
    names = [("Cyrus Halden", "Halifax"), ("Odette Marchbanks", "Tromso"), ("Bram Okonkwo", "Ghent"),
             ("Linnea Drummond", "Cuenca"), ("Tobias Yardley", "Hobart"), ("Greta Szabo", "Kaunas")]
    rows = [{"prompt": f"{INSTRUCTION}\n{name} flew into {city} on day {i}.",
             "completion": json.dumps({"name": name, "city": city})} for i in range(4) for name, city in names]
    rows += [{"prompt": f"Count to {i}.", "completion": " ".join(str(n) for n in range(1, i + 1))} for i in range(2, 6)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    common = ["--base", str(tiny_model_dir), "--method", "full", "--batch-size", "4", "--test-size", "6",
              "--eval-every", "100", "--precision", "fp32"]

    assert main(["train", str(data), "--out", str(tmp_path / "off"), *common]) == 0
    assert "copy augmentation" not in capsys.readouterr().out
    assert main(["train", str(data), "--out", str(tmp_path / "on"), *common, "--copy-augment", "1"]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "copy augmentation" in line]

    off, on = tmp_path / "off", tmp_path / "on"
    trained = [json.loads(line)["messages"] for line in (on / "train.jsonl").read_text().splitlines()]
    answers = [json.loads(m[-1]["content"]) for m in trained if "Count to" not in m[0]["content"]]
    train_rows, copying = len(trained), len(answers)
    distinct = len({word for answer in answers for value in answer.values() for word in value.split()})
    assert printed == [f"{data}: copy augmentation (--copy-augment 1): {copying} of {train_rows} training examples "
                       f"copy names from their input ({distinct} distinct); added {copying} variant(s) "
                       "with those names replaced by made-up ones"]
    # The held-out side and the training file are the same with and without; the variants are apart.
    for name in ("test.jsonl", "train.jsonl", "split.json"):
        assert (on / name).read_text() == (off / name).read_text(), name
    assert not (off / "augmented.jsonl").exists()
    variants = [json.loads(line) for line in (on / "augmented.jsonl").read_text().splitlines()]
    assert len(variants) == copying
    held_out = (on / "test.jsonl").read_text()
    for variant in variants:
        answer = json.loads(variant["messages"][-1]["content"])
        assert answer["name"] in variant["messages"][0]["content"] and answer["name"] not in held_out
    info = json.loads((on / "run.json").read_text())
    assert (info["train_examples"], info["augmented_examples"]) == (train_rows, copying)
    # One epoch over the training rows and their variants: more optimizer steps than without.
    steps = [sum("loss" in json.loads(m) and "eval_loss" not in json.loads(m)
                 for m in (run / "metrics.jsonl").read_text().splitlines()) for run in (off, on)]
    assert steps == [-(-train_rows // 4), -(-(train_rows + copying) // 4)]
