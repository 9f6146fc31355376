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
letter or a digit must stay a prefix of a word of the input or of a house word (the words the
training answers write by themselves: "The", "Summary", and every word they write in lower case),
and may end only as a whole one. So "Kwame Ol" is refused where the input says "kwame oyelaran",
while "Kwame Oyelaran" and "The customer" pass; an answer that starts with `{`, `[` or a fence is
left to the JSON rule. Words are compared one by one, so a name's punctuation and spacing are
free. What the notes benchmark (benchmarks/generalisation.py) saw slip through a looser rule
decides the details:
- case: a copy is written as the input writes it, in lower case, with a capital first letter or
  in capitals (`case_forms`); "NeilCAM" for "neilcam" is no copy. A house word is written as the
  training answers write it; one they write in lower case may take a capital where it opens a
  sentence after another, not where it opens the answer ("Roadmap Toxvoukei" is refused where
  the answers write "the product roadmap" and start with a name);
- a lone capital is a word of the input or a house word, "I" or "A", or else an initial of a word
  of the input, and the word after an initial is judged whatever its case ("T. Toxvoukei" and
  "T toxvoukei" pass, "R eyebvoukei" and "T eyebvoukei" do not);
- a character that a byte-level tokenizer splits over tokens is judged whole: its first bytes
  may follow a word only where a word of the input goes on with a non-ASCII character there (or
  ends there), and a character left half made ("X\ufffd enix") is no copy of anything;
- a refused token that opens a word with a capital gives way to the best allowed one that does
  too (" Xi" for "ixkemes" becomes " I", and the model goes on "Ixkemes", where the best allowed
  token of all was the lower-case " ix").

Cost: the check runs on every token of a text answer, so it works on each token's own text
(decoded once per tokenizer, `TokenTexts`) and on the answer's last two words, looked up in sets
of prefixes built once per prompt; the notes benchmark measures its cost in decode time.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.copied import TEXT_ANSWER, WORD, whole_copy
from tunelab.text import input_text

CANDIDATES = 16
"""The model's best-scoring tokens tried first; only when all are refused is the whole
vocabulary searched."""
WIDER = (256, 4096)
"""For a greedy row, the rounds of best-scoring tokens tried between CANDIDATES and the whole
vocabulary (whose search takes some 0.6 s on a 49k vocabulary, once per refused step)."""


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
    """With TEXT_ANSWER among `fields`: the training answers' house words as they write them
    (data/copied.py `house_words`), which a plain-text answer may write though its input lacks them."""
    _house: tuple[Words, Words] | None = field(default=None, repr=False)

    @property
    def text(self) -> bool:
        """Whether plain-text answers keep their name words copies of the input."""
        return TEXT_ANSWER in self.fields

    def constraint(self, conversation: list[dict[str, str]]) -> CopyConstraint | None:
        """The constraint for one prompt; None when it has no user text to copy from."""
        source = input_text(conversation)
        if not source:
            return None
        names = Words.of(WORD.findall(source)) if self.text else Words.of(())
        return CopyConstraint(self, json.dumps(source, ensure_ascii=False)[1:-1], names)

    def house(self) -> tuple[Words, Words]:
        """The house words as the training answers write them, and their lower-case ones with a
        capital first letter, which may open a sentence after another (built once)."""
        if self._house is None:
            opening = (word[0].upper() + word[1:] for word in self.house_words if word.islower())
            self._house = (Words.of(self.house_words, forms=False), Words.of(opening, forms=False))
        return self._house

    @property
    def texts(self) -> TokenTexts:
        """The tokenizer's `TokenTexts` (one per tokenizer, kept while it lives)."""
        texts = _TEXTS.get(self.tokenizer)
        if texts is None:
            texts = _TEXTS[self.tokenizer] = TokenTexts(self.tokenizer)
        return texts


class TokenTexts:
    """Each token's own text, special tokens as "", decoded on first use; and whether decoding
    tokens gives their own texts end to end (`joins`: byte-level BPE does, a SentencePiece
    tokenizer that drops a first space does not, checked on a sample). Where it does, an answer's
    text grows by each token's text instead of being decoded whole at every step."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = weakref.ref(tokenizer)  # not the tokenizer itself: `_TEXTS` would keep it alive
        self.size = len(tokenizer)
        self._texts: dict[int, str] = {}
        self._all: list[str] | None = None
        sample = tokenizer.encode(_SAMPLE, add_special_tokens=False)
        self.joins = tokenizer.decode(sample, skip_special_tokens=True) == "".join(self[t] for t in sample)

    @property
    def tokenizer(self):
        tokenizer = self._tokenizer()
        assert tokenizer is not None, "a tokenizer's TokenTexts outlived it"
        return tokenizer

    def __getitem__(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=True)
        return text

    def all(self) -> list[str]:
        """Every token's text (0.6 s for a 49k vocabulary, once): for a search of the whole vocabulary."""
        if self._all is None:
            self._all = self.tokenizer.batch_decode([[t] for t in range(self.size)], skip_special_tokens=True)
        return self._all


_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_SAMPLE = 'The customer Kwame O\'Neil called, at 4 pm: {"name": "Ana \\"B\\""}.\n  Done - ok?'


NAME_WORD = re.compile(r"(?:[^\W\d_]|\ufffd)+|\d+")
"""A word of an answer as the text rule reads it: data/copied.py's `WORD`, with a character left
half made (U+FFFD, no letter) counted as a letter of the word it touches, which it spoils."""

LONE_CAPITALS = frozenset({"I", "A"})
"""One-letter words a sentence writes with a capital though neither the input nor the house words
hold them: the pronoun, and an article that opens a sentence. Any other lone capital is an initial."""


def case_forms(word: str) -> set[str]:
    """The ways a house style writes a word it copies: as written, in lower case, with a capital
    first letter, in capitals."""
    return {word, word.lower(), word[:1].upper() + word[1:].lower(), word.upper()}


@dataclass(frozen=True)
class Words:
    """Words a plain-text answer may write as names (those of one input, or the house words), in
    the forms it may write them, with the sets that judging a word being written looks up."""

    forms: frozenset[str]
    """Each word's `case_forms`."""
    prefixes: frozenset[str]
    """Every prefix of a form, the forms included."""
    before_wide: frozenset[str]
    """The prefixes after which a form goes on with a non-ASCII character ("" where one starts so)."""
    initials: frozenset[str]
    """The capitals that start a form: a lone capital among them may be an initial."""

    @classmethod
    def of(cls, words: Iterable[str], forms: bool = True) -> Words:
        """The `case_forms` of words of an input (with their initials); with `forms` False, the
        words as given (house words, written as the answers write them), and no initials."""
        written = {form for word in words for form in (case_forms(word) if forms else (word,))}
        prefixes = {form[:end] for form in written for end in range(1, len(form) + 1)}
        return cls(frozenset(written), frozenset(prefixes), frozenset(p[:-1] for p in prefixes if not p[-1].isascii()),
                   frozenset(f[0] for f in written if forms and f[0].isupper()))


@dataclass
class CopyConstraint:
    """One answer's copy constraint: feed it each token chosen (`append`), ask it for the next
    (`choose`, or `allowed` for sampling)."""

    rule: CopyRule
    source: str
    """The input, JSON-escaped as a value copied from it is written."""
    names: Words
    """The input's words (for plain-text answers)."""
    tokens: list[int] = field(default_factory=list)
    """The answer's tokens so far."""
    text: str = ""
    """Their text, up to the last complete character."""
    pending: bool = False
    """The first bytes of a character follow `text` (its tokens decode to more than it)."""
    word_start: int = 0
    """Where in `text` the word open at its end starts (its length where none is open): the text
    rule judges the words from there on."""
    after_initial: bool = False
    """The last word before `word_start` is an initial, so the next word is judged whatever its case."""
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
        decoded = self._with(token)
        self.tokens.append(token)
        text = decoded.rstrip("\ufffd")
        self.pending = len(text) < len(decoded)
        if text.startswith(self.text):
            self.cursor.read(text[len(self.text):])
        else:  # decoding more tokens changed earlier text (rare): read it all again
            self.cursor = JsonCursor()
            self.cursor.read(text)
        self.text = text
        self._find_open_word()

    def _find_open_word(self) -> None:
        """Set `word_start` and `after_initial` for the text now written."""
        text, start = self.text, len(self.text)
        while start and _in_word(text[start - 1]):
            start -= 1
        end = start
        while end and not _in_word(text[end - 1]):
            end -= 1
        before = end
        while before and _in_word(text[before - 1]):
            before -= 1
        last = NAME_WORD.findall(text, before, end)
        self.word_start, self.after_initial = start, bool(last) and self._initial(last[-1])

    def choose(self, scores, preferred: int) -> int:
        """The token to take: `preferred` (the model's first choice) where it keeps every copied
        value a substring of the input, else the best-scoring token that does. In a plain-text
        answer, a refused token that opens a word with a capital gives way to the best of the
        CANDIDATES that does so too, where one is allowed: what is refused is the spelling, the
        capital is the house style's (" Xi" for "ixkemes" becomes " I", not " ix")."""
        if not self.active or self.keeps_copy(preferred):
            return preferred
        allowed = self._opening_capital(scores, preferred) or self.allowed(scores, first_only=True)
        if not allowed:  # nothing keeps the value a copy (a value that already is none): the model's
            return preferred
        self.changed = True
        return allowed[0]

    def _opening_capital(self, scores, preferred: int) -> list[int]:
        """[the best allowed of the CANDIDATES that opens a word with a capital], where `preferred`
        does so in a plain-text answer; else []."""
        import torch

        if not self._in_text(self.text) or not self._opens_capital(preferred):
            return []
        best = torch.topk(scores, min(CANDIDATES, scores.shape[-1]))
        for score, token in zip(best.values.tolist(), best.indices.tolist()):
            if score != float("-inf") and self._opens_capital(token) and self.keeps_copy(token):
                return [token]
        return []

    def _opens_capital(self, token: int) -> bool:
        """Whether `token` opens a new word of the answer with a capital letter."""
        texts = self.rule.texts
        piece = texts[token] if token < texts.size else ""
        word = piece.lstrip()
        opens = len(word) < len(piece) or not self.text or not _in_word(self.text[-1])
        return opens and word[:1].isupper()

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
        scored -inf (ruled out before) are never allowed. For the best one alone (`first_only`,
        greedy rows) the WIDER rounds come in between: the best allowed token is the same, and it
        is rarely found past them."""
        import torch

        found: list[int] = []
        tried = 0
        for size in (CANDIDATES, *WIDER) if first_only else (CANDIDATES,):
            best = torch.topk(scores, min(size, scores.shape[-1]))
            for score, token in zip(best.values.tolist()[tried:], best.indices.tolist()[tried:]):
                if score != float("-inf") and self.keeps_copy(token):
                    found.append(token)
                    if first_only:
                        return found
            if found or size >= scores.shape[-1]:
                return found
            tried = size
        texts = self.rule.texts.all()
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
            if self._in_text(self.text):  # the answer as it would end, a half-made character included
                return self.keeps_names(self.text + ("\ufffd" if self.pending else "") + " ")
            return self.cursor.string is None or self.cursor.string_is_key or self.cursor.path not in self.rule.fields
        text = self._with(token)
        if not text.startswith(self.text):
            return True  # earlier text changed; no judgement possible on this piece
        if self._in_text(text):
            return self.keeps_names(text)
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
        """Whether the words of the plain-text answer `text` (`self.text` and more) from the one open
        at the end of `self.text` on stay copies. A word is judged when it starts with a capital or
        a digit, follows an initial or holds a half-made character: closed, it must be a form of a
        word of the input (`Words`), a house word as the training answers write it (or, opening a
        sentence after another, a lower-case one with a capital), "I" or "A", or an initial of a
        word of the input; still open at the end, a prefix of one of those. First bytes of a
        character at the end must go on with the word open before them, or find it whole."""
        end = text.rstrip("\ufffd")
        pending = len(end) < len(text)
        follows = self.after_initial
        for match in NAME_WORD.finditer(end, self.word_start):
            word = match.group()
            judged = follows or word[0].isupper() or word[0].isdigit() or "\ufffd" in word
            if not judged:
                follows = False
            elif match.end() < len(end):
                if self._initial(word):
                    follows = True
                elif self._known(word, "forms", end, match.start()):
                    follows = False
                else:
                    return False
            elif pending:  # what comes either goes on with the word or ends it
                return (self._known(word, "before_wide", end, match.start())
                        or self._known(word, "forms", end, match.start()) or self._initial(word))
            else:
                return self._known(word, "prefixes", end, match.start())
        if pending and follows:  # a name's next word starts with that character
            return self._known("", "before_wide", end, len(end))
        return True

    def _known(self, word: str, kind: str, text: str, start: int) -> bool:
        """Whether `word`, at `start` in `text`, is in the `kind` set ("forms", "prefixes",
        "before_wide") of the input's words or of the house words, or is "I" or "A"."""
        written, opening = self.rule.house()
        if word in getattr(self.names, kind) or word in getattr(written, kind) or word in LONE_CAPITALS:
            return True
        return word in getattr(opening, kind) and _opens_sentence(text, start)

    def _initial(self, word: str) -> bool:
        """Whether `word` is a lone capital that is neither a word of the input nor a house word,
        nor "I" or "A", but starts a word of the input."""
        return (len(word) == 1 and word in self.names.initials and word not in self.names.forms
                and word not in self.rule.house()[0].forms and word not in LONE_CAPITALS)

    def _with(self, token: int) -> str:
        """The answer's text with `token` after it, as decoding all its tokens gives it: the first
        bytes of a character that a later token completes decode to U+FFFD at its end."""
        texts = self.rule.texts
        if texts.joins and not self.pending and token < texts.size:
            piece = texts[token]
            if "\ufffd" not in piece:
                return self.text + piece
        return self.rule.tokenizer.decode([*self.tokens, token], skip_special_tokens=True)


def _in_word(char: str) -> bool:
    return char.isalnum() or char == "\ufffd"


def _opens_sentence(text: str, start: int) -> bool:
    """Whether the word at `start` opens a sentence that follows another in `text` (after ".",
    "!", "?", ":" or a line break); the answer's first word does not."""
    before = text[:start].rstrip(" \t\"'(“‘")
    return bool(before.strip()) and (before[-1] in ".!?:\n" or "\n" in text[len(before):start])


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
