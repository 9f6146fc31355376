"""The shared text helpers: each one's contract, and the two normalisations kept apart."""

from __future__ import annotations

import json

from tunelab.text import (
    answer_values,
    dotted,
    field_path,
    input_text,
    json_leaves,
    normalise_answer,
    normalise_for_dedup,
    parse_json_answer,
    quoted_spans,
)


def test_input_text_is_the_last_user_message():
    conversation = [{"role": "system", "content": "You extract names."},
                    {"role": "user", "content": "Shot: Ana flew."}, {"role": "assistant", "content": "Ana"},
                    {"role": "user", "content": "Cyrus flew."}, {"role": "assistant", "content": "Cyrus"}]
    assert input_text(conversation) == "Cyrus flew."
    assert input_text(conversation[:3]) == "Shot: Ana flew."
    assert input_text(conversation[:1]) == ""


def test_normalise_answer_is_squads():
    assert normalise_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalise_answer("An apple a day") == "apple day"
    assert normalise_answer("there, then") == "there then"  # articles as whole words only


def test_normalise_for_dedup_keeps_every_word():
    assert normalise_for_dedup("  The  Eiffel-Tower, in PARIS! ") == "the eiffel tower in paris"
    assert normalise_for_dedup("snake_case «quoted»") == "snake_case quoted"
    assert normalise_for_dedup("?!") == ""


def test_the_two_normalisations_differ_on_purpose():
    """Answers compare up to articles and ASCII punctuation (SQuAD); duplicate rows compare on all
    their words, with Unicode case folding."""
    a, b = "The Straße", "STRASSE"
    assert normalise_answer(a) != normalise_answer(b)  # "straße" against "strasse"
    assert normalise_for_dedup(a) == "the strasse" and normalise_for_dedup(b) == "strasse"
    assert normalise_answer("a cat") == normalise_answer("the cat")
    assert normalise_for_dedup("a cat") != normalise_for_dedup("the cat")
    assert normalise_answer("e-mail") != normalise_for_dedup("e-mail")  # "email" against "e mail"


def test_parse_json_answer_takes_objects_and_lists_fenced_or_not():
    assert parse_json_answer(' {"a": 1} ') == {"a": 1}
    assert parse_json_answer('```json\n[1, "x"]\n```') == [1, "x"]
    assert parse_json_answer('```\n{"a": true}\n```') == {"a": True}
    for text in ('"just a string"', "42", "null", "{not json", "Sure: {\"a\": 1}", ""):
        assert parse_json_answer(text) is None, text


def test_json_leaves_by_path_with_both_spellings():
    value = json.loads('{"name": "Ana", "rooms": [{"n": 2, "view": "sea"}, {"n": 3}], "vip": false, '
                       '"note": null, "tags": [], "2024": "leap"}')
    leaves = json_leaves(value)
    assert leaves == {("name",): "Ana", ("rooms", 0, "n"): 2, ("rooms", 0, "view"): "sea", ("rooms", 1, "n"): 3,
                      ("vip",): False, ("note",): None, ("2024",): "leap"}
    assert [dotted(p) for p in leaves][:4] == ["name", "rooms.0.n", "rooms.0.view", "rooms.1.n"]
    assert [field_path(p) for p in leaves][:4] == ["name", "rooms.*.n", "rooms.*.view", "rooms.*.n"]
    assert field_path(("2024",)) == "2024"  # an object key made of digits is no list position
    assert json_leaves([]) == {} and json_leaves("x") == {(): "x"}


def test_quoted_spans_and_answer_values():
    assert quoted_spans('Guest "Ana Lima", room \'12B\', from \u201cPorto\u201d; "x" is too short') == \
        ["Ana Lima", "12B", "Porto"]
    assert answer_values('The guest is "Priya Patel" on \'Sunday\'') == {("quoted", 0): "Priya Patel",
                                                                         ("quoted", 1): "Sunday"}
    assert answer_values('{"name": "Ana", "guests": 4, "note": " ", "tags": ["vip"]}') == \
        {("name",): "Ana", ("tags", 0): "vip"}  # strings only, blank ones left out
    assert answer_values("Plain words without quotes") == {}
