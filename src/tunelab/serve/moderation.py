"""`tunelab serve --rules FILE`: a content filter on what clients send and what the model answers.

A rules file names blocked words (matched whole, ignoring case) and regular expressions, for
each side of the conversation:

    input:  {words: [password], patterns: ['\\b\\d{16}\\b']}
    output: {words: [confidential]}

A request whose message matches an `input` rule is refused (400, code `content_filter`); an
answer that matches an `output` rule is withheld, a streamed one cut where it first matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from tunelab.errors import UserError


class RuleSet(BaseModel):
    """What one side of a conversation may not contain."""

    model_config = ConfigDict(extra="forbid")
    words: list[str] = []
    """Blocked words, matched whole and ignoring case."""
    patterns: list[str] = []
    """Blocked regular expressions (Python syntax; add (?i) to ignore case)."""

    def compiled(self, source: Path) -> list[re.Pattern]:
        found = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in self.words]
        for pattern in self.patterns:
            try:
                found.append(re.compile(pattern))
            except re.error as e:
                raise UserError(f"{source}: pattern {pattern!r} is not a valid regular expression ({e})") from None
        return found


class Rules(BaseModel):
    """A `--rules` file: `input:` checks every message of a request, `output:` the answer."""

    model_config = ConfigDict(extra="forbid")
    input: RuleSet = RuleSet()
    """Rules for what clients send."""
    output: RuleSet = RuleSet()
    """Rules for what the model answers."""


@dataclass
class Moderation:
    """The compiled rules; empty (blocking nothing) without a rules file."""

    input: list[re.Pattern] = field(default_factory=list)
    output: list[re.Pattern] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None) -> Moderation:
        if path is None:
            return cls()
        import yaml

        if not path.is_file():
            raise UserError(f"--rules {path}: no such file")
        try:
            rules = Rules.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise UserError(f"--rules {path}: not UTF-8 text; a rules file is YAML saved as UTF-8") from None
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise UserError(f"{path}: {where}: {first['msg']}; a rules file has `input:` and `output:`, "
                            "each with `words:` and `patterns:` lists") from None
        return cls(rules.input.compiled(path), rules.output.compiled(path))

    def blocks_input(self, texts: list[str]) -> bool:
        return any(p.search(text) for p in self.input for text in texts)

    def blocks_output(self, text: str) -> bool:
        return any(p.search(text) for p in self.output)
