"""The copy constraint: answer fields that the training data copies from the input stay copies.

An extraction task often copies some answer values verbatim from its input (a name, a city). A
small fine-tuned model sometimes writes a value it memorised in training instead of the one in
front of it ("Cyladus" for "Cyrus"). Where the training rows copy a JSON field from the input in
(nearly) every row, decoding can refuse such inventions: while the model writes that field's
string value, the value so far must stay a substring of the input.

- which fields are copied is found over the training rows before training (data/copied.py), and
  their paths are saved in run.json;
- `CopyRule`: a run's copied fields with its tokenizer; it makes one `CopyConstraint` per
  prompt, whose input is the prompt's last user message (no template, system or example text);
- `CopyConstraint`: follows one answer's JSON as it is decoded (`JsonCursor`) and, where a
  copied value is written, takes the model's best-scoring token that keeps the value a substring
  of the input (`choose`, for greedy rows; `restrict` for sampled ones); it records whether it
  ever refused the model's first choice (`changed`). generate.py's `next_tokens` asks each row's
  constraint, in the loop that evaluation, generate, chat and serve share.

Values are compared as the JSON text the model writes: the input is JSON-escaped the same way,
so a quote or a backslash in a name is copied like any other character. Field paths join keys
with dots, with `*` for a list position (`people.*.name`).

Plain-text answers: where the training rows copy their answers' names and numbers (the copied
field `TEXT_ANSWER`, data/copied.py), each word the model writes that starts with a capital
letter or a digit must, case-folded, stay a prefix of a word of the input or of a house word
(the words the training answers write by themselves: "The", "Summary"), and may end only as a
whole one. So "Kwame Ol" is refused where the input says "kwame oyelaran", "Kwame Oyelaran"
(re-cased) and "The customer" pass, and an answer that starts with `{`, `[` or a fence is left
to the JSON rule. Words are compared one by one, so a name's punctuation and spacing are free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.copied import TEXT_ANSWER, WORD, folded_words, is_name_word, whole_copy
from tunelab.text import input_text

CANDIDATES = 16
"""The model's best-scoring tokens tried first; only when all are refused is the whole
vocabulary searched."""


# ----------------------------------------------------------------------------- following the JSON

@dataclass
class _Frame:
    """One open object or list of the JSON text written so far."""

    is_list: bool
    key: str | None = None
    """Of an object: the last key read, whose value comes or is being written."""
    awaiting: str = "key"
    """"key", "colon", "value" or "comma" (a list awaits only "value" or "comma")."""


@dataclass
class JsonCursor:
    """Where JSON text read one piece at a time stands: the path of the value being written and,
    inside a string, its text so far (escaped, as written). Text before the first `{` or `[` and
    anything that is not JSON is passed over."""

    frames: list[_Frame] = field(default_factory=list)
    string: str | None = None
    """The open string's text so far, escapes as written; None outside a string."""
    string_is_key: bool = False
    escaping: bool = False
    """The open string's last character is a backslash that escapes the next one."""

    def clone(self) -> JsonCursor:
        frames = [_Frame(f.is_list, f.key, f.awaiting) for f in self.frames]
        return JsonCursor(frames, self.string, self.string_is_key, self.escaping)

    @property
    def path(self) -> str:
        """Path of the value at this point (`person.name`, `people.*.name`)."""
        return ".".join("*" if f.is_list else (f.key or "") for f in self.frames)

    def value_path(self) -> str | None:
        """The path of the string value being written, or of the value about to start; None while
        a key is written, or where no value is due."""
        if self.string is not None:
            return None if self.string_is_key else self.path
        if self.frames and self.frames[-1].awaiting in ("colon", "value"):
            return self.path
        return None

    def read(self, text: str) -> None:
        for char in text:
            self.read_char(char)

    def read_char(self, char: str) -> None:
        if self.string is not None:
            if self.escaping:
                self.escaping = False
            elif char == "\\":
                self.escaping = True
            elif char == '"':
                self._close_string()
                return
            self.string += char
            return
        top = self.frames[-1] if self.frames else None
        if char == '"':
            self.string = ""
            self.string_is_key = top is not None and not top.is_list and top.awaiting == "key"
        elif char in "{[":
            self.frames.append(_Frame(is_list=char == "[", awaiting="value" if char == "[" else "key"))
        elif top is None:
            return
        elif char in "}]":
            self.frames.pop()
            if self.frames:
                self.frames[-1].awaiting = "comma"
        elif char == ":" and not top.is_list:
            top.awaiting = "value"
        elif char == ",":
            top.awaiting = "value" if top.is_list else "key"
        # Numbers, true, false, null and white space change nothing this cursor follows.

    def _close_string(self) -> None:
        top = self.frames[-1] if self.frames else None
        if self.string_is_key and top is not None:
            try:
                top.key = json.loads(f'"{self.string}"')
            except ValueError:
                top.key = self.string
            top.awaiting = "colon"
        elif top is not None:
            top.awaiting = "comma"
        self.string, self.string_is_key, self.escaping = None, False, False


# ----------------------------------------------------------------------------- the constraint

@dataclass
class CopyRule:
    """A run's copied fields, and what checking a token against them needs."""

    tokenizer: Any
    fields: frozenset[str]
    """Paths of the copied fields."""
    stop_ids: frozenset[int]
    """End-of-turn tokens: they end the answer (and are refused only inside a copied value)."""
    house_words: frozenset[str] = frozenset()
    """With TEXT_ANSWER among `fields`: the training answers' house words, case-folded
    (data/copied.py `house_words`), which a plain-text answer may write though its input lacks them."""
    _texts: list[str] | None = field(default=None, repr=False)
    _house_prefixes: frozenset[str] | None = field(default=None, repr=False)

    @property
    def text(self) -> bool:
        """Whether plain-text answers keep their name words copies of the input."""
        return TEXT_ANSWER in self.fields

    def constraint(self, conversation: list[dict[str, str]]) -> CopyConstraint | None:
        """The constraint for one prompt; None when it has no user text to copy from."""
        source = input_text(conversation)
        if not source:
            return None
        words = folded_words(source) if self.text else set()
        return CopyConstraint(self, json.dumps(source, ensure_ascii=False)[1:-1], frozenset(words),
                              frozenset(_prefixes(words)))

    def house_prefixes(self) -> frozenset[str]:
        if self._house_prefixes is None:
            self._house_prefixes = frozenset(_prefixes(self.house_words))
        return self._house_prefixes

    def token_texts(self) -> list[str]:
        """Every token's own text, decoded once (only a search of the whole vocabulary needs it)."""
        if self._texts is None:
            self._texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        return self._texts


@dataclass
class CopyConstraint:
    """One answer's copy constraint: feed it each token chosen (`append`), ask it for the next
    (`choose`, or `allowed` for sampling)."""

    rule: CopyRule
    source: str
    """The input, JSON-escaped as a value copied from it is written."""
    words: frozenset[str] = frozenset()
    """The input's words, case-folded (for plain-text answers)."""
    prefixes: frozenset[str] = frozenset()
    """Every prefix of them."""
    tokens: list[int] = field(default_factory=list)
    """The answer's tokens so far."""
    text: str = ""
    """Their text, up to the last complete character."""
    cursor: JsonCursor = field(default_factory=JsonCursor)
    """Where `text` stands in the JSON."""
    changed: bool = False
    """Whether a token the model preferred was ever refused."""
    finished: bool = False
    """An end-of-turn token was appended."""

    @property
    def active(self) -> bool:
        """Whether the next token could write (part of) a copied value, or a key (whose field is
        not known until it closes): only then are tokens checked."""
        if self.finished:
            return False
        if self._in_text(self.text):
            return True
        cursor = self.cursor
        return ((cursor.string is not None and cursor.string_is_key) or cursor.value_path() in self.rule.fields
                or self._after_copy(cursor))

    def _after_copy(self, cursor: JsonCursor) -> bool:
        """Whether a copied value has just closed: only a comma or the object's end may follow
        (a model refused its invented value may otherwise open a second string in its place)."""
        return (cursor.string is None and bool(cursor.frames) and cursor.frames[-1].awaiting == "comma"
                and not cursor.frames[-1].is_list and cursor.path in self.rule.fields)

    def append(self, token: int) -> None:
        if self.finished:
            return
        if token in self.rule.stop_ids:
            self.finished = True
            return
        self.tokens.append(token)
        text = self._decoded(self.tokens)
        if text.startswith(self.text):
            self.cursor.read(text[len(self.text):])
        else:  # decoding more tokens changed earlier text (rare): read it all again
            self.cursor = JsonCursor()
            self.cursor.read(text)
        self.text = text

    def choose(self, scores, preferred: int) -> int:
        """The token to take: `preferred` (the model's first choice) where it keeps every copied
        value a substring of the input, else the best-scoring token that does."""
        if not self.active or self.keeps_copy(preferred):
            return preferred
        allowed = self.allowed(scores, first_only=True)
        if not allowed:  # nothing keeps the value a copy (a value that already is none): the model's
            return preferred
        self.changed = True
        return allowed[0]

    def restrict(self, scores):
        """`scores` (one row's logits) for sampling: where the next token could write a copied
        value, every token that would break the copy scored -inf."""
        if not self.active:
            return scores
        allowed = self.allowed(scores)
        if not allowed:  # nothing keeps the value a copy: the model's own choice
            return scores
        self.changed |= int(scores.argmax()) not in allowed
        kept = scores.new_full(scores.shape, float("-inf"))
        kept[allowed] = scores[allowed]
        return kept

    def allowed(self, scores, first_only: bool = False) -> list[int]:
        """Tokens that keep every copied value a substring of the input, best score first: among
        the CANDIDATES best, or, where all of those are refused, in the whole vocabulary. Tokens
        scored -inf (ruled out before) are never allowed."""
        import torch

        best = torch.topk(scores, min(CANDIDATES, scores.shape[-1]))
        found = []
        for score, token in zip(best.values.tolist(), best.indices.tolist()):
            if score != float("-inf") and self.keeps_copy(token):
                found.append(token)
                if first_only:
                    return found
        if found:
            return found
        texts = self.rule.token_texts()
        value = self.cursor.string or ""
        # A first sieve on each token's own text, then the exact check on the few that pass.
        if self._in_text(self.text):
            likely = [t for t, text in enumerate(texts) if t < scores.shape[-1] and t not in self.rule.stop_ids
                      and self.keeps_names(self.text + text)] + [t for t in self.rule.stop_ids if t < scores.shape[-1]]
        elif self._after_copy(self.cursor):
            likely = [t for t, text in enumerate(texts) if t < scores.shape[-1] and text.strip()[:1] in (",", "}")]
        else:
            likely = [t for t, text in enumerate(texts) if t < scores.shape[-1] and _extends(value, text, self.source)]
        ranked = sorted(likely, key=lambda t: -float(scores[t]))
        for token in ranked:
            if float(scores[token]) != float("-inf") and self.keeps_copy(token):
                found.append(token)
                if first_only:
                    break
        return found

    def keeps_copy(self, token: int) -> bool:
        """Whether appending `token` keeps every copied value written so far a substring of the
        input (and closes none empty)."""
        if token in self.rule.stop_ids:  # ending is no invention, unless it cuts a copied value short
            if self._in_text(self.text):
                return self.keeps_names(self.text + " ")
            return self.cursor.string is None or self.cursor.string_is_key or self.cursor.path not in self.rule.fields
        text = self._decoded([*self.tokens, token], keep_partial=True)
        if not text.startswith(self.text):
            return True  # earlier text changed; no judgement possible on this piece
        if self._in_text(text):
            return self.keeps_names(text.rstrip("\ufffd"))
        piece = text[len(self.text):]
        if not piece:
            return False  # a control token that writes nothing, where a value or key is due
        partial = piece.endswith("\ufffd")  # a character that the next token completes
        piece = piece.rstrip("\ufffd")
        cursor = self.cursor.clone()
        for char in piece:
            inside = cursor.string is not None and not cursor.string_is_key and cursor.path in self.rule.fields
            if inside and char == '"' and not cursor.escaping and not whole_copy(cursor.string, self.source):
                return False  # an empty value, or one that ends or starts inside a word of the input, is no copy
            if self._after_copy(cursor) and char not in " \t\n,}":
                return False
            cursor.read_char(char)
            if inside and cursor.string is not None and cursor.string not in self.source:
                return False
        if partial and cursor.string is not None and not cursor.string_is_key and cursor.path in self.rule.fields:
            return not self.source.isascii()
        return True

    def _in_text(self, text: str) -> bool:
        """Whether an answer that reads `text` so far is plain text the name rule applies to (the
        run copies names, and the answer has not opened JSON)."""
        return self.rule.text and not text.lstrip().startswith(("{", "[", "`"))

    def keeps_names(self, text: str) -> bool:
        """Whether the name words of the plain-text answer `text` that go beyond `self.text` (the
        word open at its end included) stay copies: a closed one a whole word of the input or a
        house word, the one still open at the end a prefix of one. Case is free throughout."""
        start = len(self.text)
        while start and self.text[start - 1].isalnum():
            start -= 1  # the piece may complete the word open before it
        house = self.rule.house_words
        for match in WORD.finditer(text, start):
            word = match.group()
            if not (word[0].isdigit() or word[0].isupper()):
                continue
            folded = word.casefold()
            closed = match.end() < len(text)
            if closed and is_name_word(word):
                known = folded in self.words or folded in house
            elif not closed and (len(word) > 1 or word.isdigit()):  # a lone capital may still become "I" or "A"
                known = folded in self.prefixes or folded in self.rule.house_prefixes()
            else:
                continue
            if not known:
                return False
        return True

    def _decoded(self, tokens: list[int], keep_partial: bool = False) -> str:
        text = self.rule.tokenizer.decode(tokens, skip_special_tokens=True)
        return text if keep_partial else text.rstrip("\ufffd")


def _prefixes(words) -> set[str]:
    return {word[:end] for word in words for end in range(1, len(word) + 1)}


def _extends(value: str, text: str, source: str) -> bool:
    """Whether a token's own text, written after `value` inside a copied value, could keep it a
    copy: what comes before its closing quote continues `value` within `source`."""
    end = 0
    escaping = value.endswith("\\") and (len(value) - len(value.rstrip("\\"))) % 2 == 1
    while end < len(text):
        if escaping:
            escaping = False
        elif text[end] == "\\":
            escaping = True
        elif text[end] == '"':
            return whole_copy(value + text[:end], source)
        end += 1
    return "\ufffd" not in text and bool(text) and (value + text) in source
