"""Metrics, buckets and intervals on hand-made answers, checked by hand."""

import json

import pytest

from tunelab.evaluate import metrics
from tunelab.evaluate.metrics import (
    bootstrap_interval,
    bucket,
    exact_match,
    extractive_paths,
    hallucinated_values,
    json_fields,
    repetition_loop,
    rouge_l,
    token_f1,
)

BOOKING_PROMPT = "Extract the booking: table for Priya Patel, 4 people, friday at 19:30"
BOOKING = json.dumps({"name": "Priya Patel", "guests": 4, "day": "friday", "time": "19:30"})


def test_exact_match_normalises_text_and_compares_json_as_values():
    assert exact_match("  The  France. ", "france") == 1.0
    assert exact_match("Germany", "France") == 0.0
    assert exact_match('{"guests": 4, "name": "Priya Patel", "day": "friday", "time": "19:30"}', BOOKING) == 1.0
    assert exact_match('{"name": "Priya Patel", "guests": 5, "day": "friday", "time": "19:30"}', BOOKING) == 0.0


def test_token_f1_and_rouge_l_by_hand():
    # answer: cat sat on mat (4), reference: the cat is on the mat (6 words)
    # common words: cat, on, mat, the(0 in answer) -> 3; P = 3/4, R = 3/6 -> F1 = 0.6
    assert token_f1("cat sat on mat", "the cat is on the mat") == pytest.approx(0.6)
    # LCS of [cat sat on mat] and [the cat is on the mat] is [cat on mat]: same 3 -> 0.6
    assert rouge_l("cat sat on mat", "the cat is on the mat") == pytest.approx(0.6)
    # order matters to ROUGE-L, not to F1: LCS of [mat on cat] and [cat on mat] has length 1
    assert token_f1("mat on cat", "cat on mat") == 1.0
    assert rouge_l("mat on cat", "cat on mat") == pytest.approx(1 / 3)
    assert rouge_l("", "x") == 0.0 and rouge_l("", "") == 1.0


def test_json_fields_per_leaf():
    answer = json.dumps({"name": "priya patel", "guests": 5, "day": "friday"})
    assert json_fields(answer, BOOKING) == {"name": True, "guests": False, "day": True, "time": False}
    assert json_fields("not json", BOOKING) == {"name": False, "guests": False, "day": False, "time": False}
    assert json_fields("x", "plain text") is None


def test_hallucinated_values_only_in_fields_copied_from_the_input():
    prompts = [BOOKING_PROMPT, "Book Tom Li for 2 on monday at 18:00"]
    references = [BOOKING, json.dumps({"name": "Tom Li", "guests": 2, "day": "monday", "time": "18:00"})]
    # every reference's name, day and time appear in its prompt; guests is a number, not a string value
    assert extractive_paths(prompts, references) == {"name", "day", "time"}
    invented = json.dumps({"name": "Priya Sharma", "guests": 4, "day": "friday", "time": "19:30"})
    assert hallucinated_values(invented, BOOKING_PROMPT, {"name", "day", "time"}) == (3, 1)
    assert hallucinated_values(BOOKING, BOOKING_PROMPT, {"name", "day", "time"}) == (3, 0)
    # plain text: its quoted spans are its values, one field
    quoted = 'The guest is "Priya Sharma" on \'Sunday\''
    assert hallucinated_values(quoted, BOOKING_PROMPT, {"quoted.*"}) == (2, 2)



def test_values_rewritten_as_the_task_asks_or_trivially_are_not_hallucinated():
    paths = {"name", "day", "time", "date", "amount"}
    prompt = "Request: table for PRIYA o'neil on Wed 3 March at 9:45pm, deposit 1,200.00 - thanks"
    # case and punctuation changed, numbers written another way: still the prompt's values
    answer = json.dumps({"name": "Priya O Neil", "time": "09:45", "amount": "1200"})
    assert hallucinated_values(answer, prompt, paths) == (3, 0)
    # a date or day rewritten as the reference rewrites it is not made up, even though the
    # prompt never writes it so ...
    reference = json.dumps({"name": "Priya O'Neil", "day": "wednesday", "date": "2025-03-03"})
    rewritten = json.dumps({"name": "priya o'neil", "day": "Wednesday", "date": "2025-03-03"})
    assert hallucinated_values(rewritten, prompt, paths, reference) == (3, 0)
    # ... but a rewritten value that differs from the reference and from the prompt is
    wrong_date = json.dumps({"name": "Priya O'Neil", "day": "thursday", "date": "2025-03-04"})
    assert hallucinated_values(wrong_date, prompt, paths, reference) == (3, 2)
    # and so is a number the prompt does not hold, however it is written
    assert hallucinated_values(json.dumps({"time": "21:15", "amount": "1,300"}), prompt, paths) == (2, 2)
    assert metrics.value_words("09:45am, 1,200.50 x007") == ["9", "45", "am", "1200.5", "x", "7"]

def test_repetition_loop():
    assert repetition_loop("the cat sat. " * 4)
    assert not repetition_loop("the cat sat. " * 3)
    assert repetition_loop("no " * 12)
    assert not repetition_loop("one two three four five six seven eight nine ten eleven twelve")
    assert not repetition_loop('{"a": 1, "b": 1, "c": 1}')


@pytest.mark.parametrize("answer,reference,stopped,hallucinated,expected", [
    ("France", "france", True, 0, "correct"),
    ("Spain", "France", True, 0, "wrong"),
    (json.dumps({"name": "Priya Sharma"}), BOOKING, True, 1, "hallucinated value"),
    ('{"name": "Priya Patel", "guests": 4', BOOKING, True, 0, "invalid format"),
    ("   ", "France", True, 0, "empty"),
    ("It is a country in Europe whose capital", "France", False, 0, "no stop"),
    ("France France France France France France France France France France France France France",
     "France", False, 0, "repetition loop"),
])
def test_each_bucket(answer, reference, stopped, hallucinated, expected):
    assert bucket(answer, reference, stopped, hallucinated) == expected
    assert expected in metrics.BUCKETS


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    small = [1, 0, 1, 1, 0, 1, 0, 1, 1, 0]
    low, high = bootstrap_interval(small)
    assert low < sum(small) / len(small) < high
    assert bootstrap_interval(small) == (low, high)  # fixed seed: reproducible
    wide = high - low
    low, high = bootstrap_interval(small * 20)
    assert low < 0.6 < high and high - low < wide / 3
    assert bootstrap_interval([1.0] * 30) == (1.0, 1.0)
    # a rate: 1 of 4 values made up in one example, 0 of 4 in the other three
    low, high = bootstrap_interval([1, 0, 0, 0], totals=[4, 4, 4, 4])
    assert 0.0 <= low <= 1 / 16 <= high <= 0.25
