"""Copy augmentation: training rows whose answer copies names from the input, repeated with those
names replaced by made-up ones.

Fine-tuned on a thousand rows, a small model can fill a field whose value the input holds in two
ways: copy it, or recite a name it has memorised. When the training names repeat, both fit the
data, and on a name it never saw the model often recites ("Cyrus" answered as "Cyladus"). A
variant of a row in which every copied name is replaced, consistently in the input and the
answer, by a fresh surrogate of the same shape (same words, capitalisation and length, built from
syllables) can only be fitted by copying.

What counts as copied, per training row (its input is `text.input_text`, the last user message,
the text the copy constraint copies from):
- a JSON answer (an object or a list): each string leaf that occurs verbatim in the input;
- any other answer: each of its words that occurs in the input (a rewrite may reorder a name).
Within those values, a word is replaced when it looks like a name: it has a capital letter (or
is a code of letters and digits such as AB12), its lower-case form is not a word of the training
text (so "The" at a sentence start stays) and no training answer holds it without its input
holding it too (so a label such as "Positive", which answers write rather than copy, stays).

Only the training side of the split is augmented, after the split; a surrogate is never a word of
any held-out row, nor of the training text. Everything is drawn from the seed and each row's
content, so the same data and seed give the same variants in any order.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

from tunelab.data.load import Example
from tunelab.text import input_text, json_leaves, parse_json_answer

WORD = re.compile(r"[^\W_]+")
"""A word: letters and digits (Unicode), split at spaces, punctuation and underscores."""

ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "pr", "r",
          "s", "st", "t", "tr", "v", "w", "z", "ch", "sh", "th", "kl", "fl", "gl")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ea", "ou", "ie")
CODAS = ("", "", "", "n", "r", "l", "s", "m", "nd", "rt", "th", "x")
CONSONANTS = "BCDFGHJKLMNPRSTVWXZ"
SURROGATE_TRIES = 50


@dataclass
class CopyAugmentation:
    """What copy augmentation found and added."""

    eligible: int = 0
    """Training rows whose answer copies at least one name-like word from the input."""
    names: int = 0
    """Distinct name-like words copied in those rows."""
    variants: list[Example] = field(default_factory=list)
    """The added rows, in the order of their originals; each keeps its original's line."""

    def summary(self, rows: int, per_row: float) -> str:
        """One line for the training output."""
        if not self.eligible:
            return (f"copy augmentation (--copy-augment {per_row:g}): none of the {rows} training examples copies "
                    "a name from its input into its answer; nothing added")
        return (f"copy augmentation (--copy-augment {per_row:g}): {self.eligible} of {rows} training examples copy "
                f"names from their input ({self.names} distinct); added {len(self.variants)} variant(s) with those "
                "names replaced by made-up ones")


def occurs(value: str, text: str) -> bool:
    """`value` is in `text` as whole words (not "Ann" inside "Anna")."""
    return re.search(rf"(?<![^\W_]){re.escape(value)}(?![^\W_])", text) is not None


def copy_candidates(answer: str) -> list[str]:
    """What an answer may have copied: its JSON string leaves that hold a word, or else each of its
    words (a rewrite may reorder a name: "Halden, Cyrus" -> "Cyrus Halden")."""
    parsed = parse_json_answer(answer)
    if parsed is not None:
        return [leaf for leaf in json_leaves(parsed).values() if isinstance(leaf, str) and WORD.search(leaf)]
    return WORD.findall(answer)


def is_code(word: str) -> bool:
    """An identifier such as AB12 or x7k: letters and digits mixed."""
    return any(c.isdigit() for c in word) and any(c.isalpha() for c in word)


def is_name_like(word: str, lower_words: set[str]) -> bool:
    """A word worth replacing: capitalised or a code, and not an ordinary word of the data."""
    if len(word) < 2 or word.lower() in lower_words:
        return False
    return is_code(word) or (word[0].isupper() and not word.isdigit())


def copied_words(example: Example, lower_words: set[str], written: set[str]) -> list[str]:
    """The name-like words that the example's last answer copies from its input, in order of
    first appearance. `lower_words`: words seen in lower case in the training text; `written`:
    words that some training answer holds without its input holding them."""
    if example.is_raw:
        return []
    prompt = input_text(example.messages)
    found: dict[str, None] = {}
    for value in copy_candidates(example.reference):
        if not occurs(value, prompt):
            continue
        for word in WORD.findall(value):
            if word not in written and is_name_like(word, lower_words):
                found[word] = None
    return list(found)


def training_vocabulary(train: list[Example]) -> tuple[set[str], set[str]]:
    """(words seen in lower case anywhere in the training text, words some answer writes
    without its input holding them): the two sets `copied_words` excludes by."""
    lower_words, written = set(), set()
    for example in train:
        if example.is_raw:
            continue
        for message in example.messages:
            lower_words.update(w for w in WORD.findall(message["content"]) if w.islower())
        prompt_words = set(WORD.findall(input_text(example.messages)))
        for message in example.messages:
            if message["role"] == "assistant":
                written.update(w for w in WORD.findall(message["content"]) if w not in prompt_words)
    return lower_words, written


def all_words(examples: list[Example]) -> set[str]:
    """Every word of the examples, in lower case: what a surrogate must never be."""
    words = set()
    for example in examples:
        texts = [example.text] if example.is_raw else [m["content"] for m in example.messages]
        for text in texts:
            words.update(w.lower() for w in WORD.findall(text))
    return words


def syllable_word(length: int, rng: random.Random) -> str:
    """A pronounceable lower-case word of whole syllables, `length` letters give or take one."""
    for _ in range(SURROGATE_TRIES):
        text = ""
        while len(text) < length - 1:
            text += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        if len(text) <= length + 1:
            return text
    return text[:length]


def surrogate(word: str, rng: random.Random) -> str:
    """A made-up word of the same shape: each run of letters becomes syllables of the same length
    and case pattern (Title, UPPER, lower), each run of digits other digits."""
    parts = []
    for run in re.findall(r"\d+|[^\W\d_]+", word):
        if run.isdigit():
            parts.append("".join(rng.choice("123456789" if i == 0 else "0123456789") for i in range(len(run))))
        elif run.isupper() and len(run) > 1:
            # Acronyms and codes read as letters, not syllables: "JFK" -> "TRB".
            parts.append("".join(rng.choice(CONSONANTS) for _ in run) if len(run) <= 4
                         else syllable_word(len(run), rng).upper())
        elif run[0].isupper():
            parts.append(syllable_word(len(run), rng).capitalize())
        else:
            parts.append(syllable_word(len(run), rng))
    return "".join(parts)


def fresh_surrogate(word: str, rng: random.Random, forbidden: set[str], taken: set[str]) -> str:
    """A surrogate that is no word of `forbidden` (lower case) and not yet `taken` in this row."""
    for _ in range(SURROGATE_TRIES):
        candidate = surrogate(word, rng)
        if candidate.lower() not in forbidden and candidate not in taken:
            return candidate
    # Short words have few shapes; one letter more always leaves room.
    return fresh_surrogate(word + word[-1], rng, forbidden, taken)


def replace_words(example: Example, mapping: dict[str, str]) -> Example:
    """The example with each word of `mapping` replaced as a whole word in every message, also
    where a JSON answer writes it with escapes (a non-ASCII name as \\u00e9)."""
    forms = {}
    for word, new in mapping.items():
        forms[word] = new
        escaped = json.dumps(word)[1:-1]
        if escaped != word:
            forms[escaped] = new
    alternatives = "|".join(re.escape(w) for w in sorted(forms, key=len, reverse=True))
    pattern = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")
    messages = [{**m, "content": pattern.sub(lambda match: forms[match[0]], m["content"])} for m in example.messages]
    return Example(messages, example.line)


def variant_count(per_row: float, seed: int, key: str) -> int:
    """`per_row` variants per eligible row: the whole part always, one more with the chance of
    the fraction (drawn from the row, so the same rows get it in every run)."""
    whole = int(per_row)
    extra = random.Random(f"{seed}:{key}:count").random() < per_row - whole
    return whole + extra


def copy_variants(train: list[Example], held_out: list[Example], per_row: float, seed: int) -> CopyAugmentation:
    """Variants of the training rows that copy names, `per_row` per such row, each with every copied
    name replaced by a fresh surrogate in all its messages. `held_out` is only read, to keep the
    surrogates off its words."""
    result = CopyAugmentation()
    if per_row <= 0:
        return result
    lower_words, written = training_vocabulary(train)
    forbidden = all_words(held_out) | all_words(train)
    names = set()
    for example in train:
        words = copied_words(example, lower_words, written)
        if not words:
            continue
        result.eligible += 1
        names.update(words)
        for k in range(variant_count(per_row, seed, example.key)):
            rng = random.Random(f"{seed}:{example.key}:{k}")
            mapping: dict[str, str] = {}
            for word in words:
                mapping[word] = fresh_surrogate(word, rng, forbidden, set(mapping.values()))
            variant = replace_words(example, mapping)
            if answer_still_parses(example, variant):
                result.variants.append(variant)
    result.names = len(names)
    return result


def answer_still_parses(original: Example, variant: Example) -> bool:
    """A JSON answer stays JSON (a surrogate has no character that needs escaping, so this holds
    unless a replaced word was part of an escape sequence)."""
    return parse_json_answer(original.reference) is None or parse_json_answer(variant.reference) is not None
