"""Assertion rules on hand-made answers: a `json_schema` rule is validated by jsonschema, every
keyword counting."""

from __future__ import annotations

import pytest

from tunelab.errors import UserError
from tunelab.evaluate.assertions import apply, load_rules

SCHEMA = """\
- name: booking
  json_schema:
    type: object
    required: [name, guests]
    additionalProperties: false
    properties:
      name: {type: string, pattern: '^[A-Z][a-z]+( [A-Z][a-z]+)*$'}
      guests: {type: integer, minimum: 1}
"""


def failures(tmp_path, rules: str, answers: list[str]) -> list[list[str]]:
    path = tmp_path / "rules.yaml"
    path.write_text(rules)
    return apply(load_rules(path), [""] * len(answers), answers).failures


def test_a_json_schema_rule_enforces_every_keyword(tmp_path):
    answers = ['{"name": "Ana Lima", "guests": 2}',
               '```json\n{"name": "Ana Lima", "guests": 2}\n```',  # a fenced answer is JSON too
               '{"name": "Ana Lima", "guests": true}',  # a boolean is no integer
               '{"name": "Ana Lima", "guests": 2.5}',
               '{"name": "Ana Lima", "guests": 0}',  # minimum
               '{"name": "ana lima", "guests": 2}',  # pattern
               '{"name": "Ana Lima", "guests": 2, "vip": true}',  # additionalProperties
               '{"name": "Ana Lima"}',  # required
               "Ana Lima, 2 guests"]
    failed = failures(tmp_path, SCHEMA, answers)
    assert failed[:2] == [[], []]
    reasons = [f[0].removeprefix("booking: ") for f in failed[2:]]
    assert reasons == ["True is not of type 'integer'", "2.5 is not of type 'integer'",
                       "0 is less than the minimum of 1", "'ana lima' does not match '^[A-Z][a-z]+( [A-Z][a-z]+)*$'",
                       "Additional properties are not allowed ('vip' was unexpected)",
                       "'guests' is a required property", "not JSON"]


def test_an_invalid_schema_is_the_users_error_with_its_rule(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("- must_contain: guests\n- json_schema: {type: objekt}\n")
    with pytest.raises(UserError, match=r"rules.yaml: rule 2: invalid JSON schema \('objekt' is not valid"):
        load_rules(path)
