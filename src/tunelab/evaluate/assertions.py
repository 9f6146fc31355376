"""User assertions: simple tests every answer should pass, from a YAML file or a Python file.

YAML: a list of rules, each with an optional `name` and exactly one check:

    - name: has a date
      regex: '\\d{4}-\\d{2}-\\d{2}'        # re.search on the answer
    - must_contain: "guests"              # a string or a list of strings, all required
    - must_not_contain: ["sorry", "As an AI"]
    - json_schema: {type: object, required: [name, guests]}

`json_schema` validates the answer's JSON (`text.parse_json_answer`: an object or a list, a
```json fence allowed) with the `jsonschema` package, under the draft the schema names (`$schema`),
else the latest: every keyword counts (`minimum`, `pattern`, `additionalProperties`, `enum`, ...),
and true or false is not an integer.

Python: a file defining `def check(prompt, answer) -> bool | str`; True passes, False fails, a
string fails with that string as the reason.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.text import parse_json_answer

KINDS = ("regex", "must_contain", "must_not_contain", "json_schema")


@dataclass
class Rule:
    """One assertion applied to every answer."""

    name: str
    """How the rule is reported (its `name`, or its kind and value)."""
    test: Callable[[str, str], bool | str]
    """(prompt, answer) -> True when the answer passes, False or a reason when it fails."""

    def failure(self, prompt: str, answer: str) -> str | None:
        """None when the answer passes, else why it failed."""
        outcome = self.test(prompt, answer)
        if outcome is True:
            return None
        return outcome if isinstance(outcome, str) and outcome else "failed"


def load_rules(path: Path) -> list[Rule]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--assertions {path}: no such file")
    if path.suffix == ".py":
        return [_python_rule(path)]
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"--assertions {path}: expected a .yaml/.yml file of rules or a .py file with check()")
    import yaml

    try:
        rules = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(rules, list) or not rules:
        raise UserError(f"{path}: expected a list of rules, e.g. `- must_contain: \"guests\"`")
    return [_yaml_rule(path, i, rule) for i, rule in enumerate(rules, 1)]


def _yaml_rule(path: Path, number: int, rule) -> Rule:
    where = f"{path}: rule {number}"
    if not isinstance(rule, dict):
        raise UserError(f"{where}: expected a mapping such as `regex: '...'`, got {rule!r}")
    unknown = set(rule) - {"name", *KINDS}
    kinds = [k for k in KINDS if k in rule]
    if unknown or len(kinds) != 1:
        extra = f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; " if unknown else ""
        raise UserError(f"{where}: {extra}give exactly one of {', '.join(KINDS)}")
    kind = kinds[0]
    value = rule[kind]
    name = str(rule.get("name") or f"{kind}: {json.dumps(value, ensure_ascii=False)}")
    if kind == "regex":
        try:
            pattern = re.compile(str(value))
        except re.error as e:
            raise UserError(f"{where}: bad regex {value!r} ({e})") from None
        return Rule(name, lambda _p, a: bool(pattern.search(a)))
    if kind in ("must_contain", "must_not_contain"):
        texts = value if isinstance(value, list) else [value]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise UserError(f"{where}: {kind} takes a string or a list of strings")
        if kind == "must_contain":
            return Rule(name, lambda _p, a: next((f"missing {t!r}" for t in texts if t not in a), True))
        return Rule(name, lambda _p, a: next((f"contains {t!r}" for t in texts if t in a), True))
    if not isinstance(value, dict):
        raise UserError(f"{where}: json_schema takes a JSON schema object")
    return Rule(name, _schema_test(where, value))


def _schema_test(where: str, schema: dict) -> Callable[[str, str], bool | str]:
    import jsonschema

    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise UserError(f"{where}: invalid JSON schema ({e.message})") from None
    validator = validator_class(schema)

    def test(_prompt: str, answer: str) -> bool | str:
        value = parse_json_answer(answer)
        if value is None:
            return "not JSON"
        error = next(iter(validator.iter_errors(value)), None)
        return True if error is None else error.message

    return test


def _python_rule(path: Path) -> Rule:
    spec = importlib.util.spec_from_file_location(f"tunelab_assertions_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: Python syntax error ({e.msg})") from None
    except Exception as e:  # the user's module failed while loading: report it as their file's problem
        raise UserError(f"{path}: failed to load ({type(e).__name__}: {e})") from None
    check = getattr(module, "check", None)
    if not callable(check):
        raise UserError(f"{path}: define a function `def check(prompt, answer) -> bool | str`")
    return Rule(f"{path.name}:check", check)


@dataclass
class AssertionResults:
    """How a contender's answers fared against the rules."""

    passed: dict[str, int]
    """Rule name -> answers that passed it."""
    failures: list[list[str]]
    """Per answer, the failed rules with their reasons ("rule: reason")."""

    def as_dict(self, total: int) -> dict:
        return {"rules": self.passed, "answers": total,
                "all_passed": sum(not f for f in self.failures)}


def apply(rules: list[Rule], prompts: list[str], answers: list[str]) -> AssertionResults:
    passed = {rule.name: 0 for rule in rules}
    failures = []
    for prompt, answer in zip(prompts, answers):
        failed = []
        for rule in rules:
            try:
                reason = rule.failure(prompt, answer)
            except Exception as e:  # a user's check() that crashes on one answer fails that answer
                reason = f"check raised {type(e).__name__}: {e}"
            if reason is None:
                passed[rule.name] += 1
            else:
                failed.append(f"{rule.name}: {reason}")
        failures.append(failed)
    return AssertionResults(passed, failures)
