import json
import re

import pytest

from tunelab.demo.bookings import (
    FIRST_NAMES,
    INSTRUCTION,
    NAME_POOLS,
    NUMBER_WORDS,
    SURNAMES,
    WEEKDAYS,
    describe,
    make_examples,
    time_phrases,
    to_24h,
    words_to_int,
)

ROWS = make_examples()


def test_deterministic_and_seeded():
    assert make_examples(200, seed=3) == make_examples(200, seed=3)
    assert make_examples(200, seed=3) != make_examples(200, seed=4)
    # A longer run must extend, not reshuffle, a shorter one with the same seed.
    assert make_examples(300, seed=3)[:200] == make_examples(200, seed=3)


@pytest.mark.parametrize("n", [0, 1, 17, 1200])
def test_n_respected(n):
    assert len(make_examples(n)) == n


def test_no_duplicate_prompts():
    prompts = [r["prompt"] for r in make_examples(3000, seed=1)]
    assert len(prompts) == len(set(prompts))


def test_rows_shape_and_values():
    for row in ROWS:
        assert list(row) == ["prompt", "completion", "metadata"]
        assert row["metadata"]["name_pool"] in range(NAME_POOLS)
        assert row["prompt"].startswith(INSTRUCTION + "\nRequest: ")
        data = json.loads(row["completion"])
        assert list(data) == ["name", "guests", "day", "time"]
        assert isinstance(data["name"], str) and len(data["name"].split()) == 2
        assert type(data["guests"]) is int and 1 <= data["guests"] <= 12
        assert data["day"] in WEEKDAYS
        assert re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", data["time"])


def test_fields_appear_in_prompt():
    for row in ROWS:
        data = json.loads(row["completion"])
        prompt = row["prompt"].split("Request: ", 1)[1]
        low = prompt.lower()
        assert data["name"] in prompt
        assert data["day"][:3] in low
        h, m = map(int, data["time"].split(":"))
        assert any(p in prompt for p in time_phrases(h, m)), row
        numbers = {NUMBER_WORDS.index(t) if t in NUMBER_WORDS else int(t)
                   for t in re.findall(r"\b(?:\d+|[a-z]+)\b", low) if t.isdigit() or t in NUMBER_WORDS}
        g = data["guests"]
        said_directly = g in numbers
        said_as_company = "me and" in low and (g - 1) in numbers
        said_as_pair = g == 2 and ("my partner" in low or "me and a friend" in low)
        assert said_directly or said_as_company or said_as_pair, row


def test_variety():
    sentences = [r["prompt"].split("Request: ", 1)[1] for r in ROWS]
    assert len({json.loads(r["completion"])["name"] for r in ROWS}) > 500
    assert any("friends" in s for s in sentences)
    assert any("quarter to" in s for s in sentences)
    assert any("noon" in s or "midday" in s for s in sentences)
    assert any(re.search(r"\bon (Mon|Tue|Wed|Thu|Fri|Sat|Sun)\b", s) for s in sentences)


@pytest.mark.parametrize("phrase, expected", [
    ("half past seven in the evening", "19:30"),
    ("noon", "12:00"),
    ("quarter to nine pm", "20:45"),
    ("7pm", "19:00"),
    ("7:30 pm", "19:30"),
    ("19:30", "19:30"),
    ("quarter past eleven in the morning", "11:15"),
    ("quarter to one pm", "12:45"),
    ("quarter to twelve in the morning", "11:45"),
    ("twelve thirty pm", "12:30"),
    ("eight o'clock in the evening", "20:00"),
    ("09:15", "09:15"),
])
def test_to_24h(phrase, expected):
    assert to_24h(phrase) == expected


def test_every_generated_time_phrase_normalises_back():
    for h in range(8, 23):
        for m in (0, 15, 30, 45):
            for phrase in time_phrases(h, m):
                assert to_24h(phrase) == f"{h:02d}:{m:02d}", phrase


def test_words_to_int():
    assert words_to_int("four") == 4
    assert words_to_int("Twelve") == 12
    assert words_to_int("7") == 7


def test_describe():
    text = describe()
    assert "JSON" in text and 3 <= text.count(". ") + 1 <= 5


def test_the_demo_holds_out_names_whose_parts_training_never_saw(tmp_path):
    """The demo's split (its own config) puts every name pool on one side, so no first name or
    surname of a held-out answer occurs in any training answer, and the table measures copying."""
    from tunelab.data import load as data
    from tunelab.demo import demo_config, write_dataset

    config = demo_config()
    path = write_dataset(tmp_path / "bookings.jsonl", 1200)
    train, test = data.split(data.load_examples(path, split_by=config.split_by), config.test_size, config.seed,
                             split_by=config.split_by)
    assert 0.05 <= len(test) / 1200 <= 0.15
    trained_parts = {part for e in train for part in json.loads(e.reference)["name"].split()}
    held_out_parts = {part for e in test for part in json.loads(e.reference)["name"].split()}
    assert held_out_parts and not held_out_parts & trained_parts
    assert trained_parts | held_out_parts <= set(FIRST_NAMES) | set(SURNAMES)
