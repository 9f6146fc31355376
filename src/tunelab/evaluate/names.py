"""Invented names: plain-text answers that name someone or something their input never mentions.

A plain-text answer states no quoted values for `metrics.hallucinated_values` to check, so a
house-style rewrite that turns "kwame oyelaran" into "Kwame Olenara" would pass unseen. Here a
word of the answer is an invented name when it may be a name or a number (`data.copied.name_words`:
it starts with a capital letter or a digit) and it is written as none of the ways a house style
writes a word (`decoding.copying.case_forms`: as written, in lower case, capitalised, in capitals;
so "NeilCAM" for "neilcam" is invented, as decoding refuses it) of the input (the last user
message), the reference, or the house words of the run's training answers
(`data.copied.house_words`: every word they write in lower case, so a sentence's first "The" or
"Customer" is no name, and the capitalised words they write without their input holding them,
such as a "Summary" label). Words are compared one by one, so "O'Brien" for "o'brien" and
"Oyelaran," for "oyelaran" are no inventions.

`invented_names` counts, per contender, the answers holding such a word and keeps a few examples;
JSON references are left to `hallucinated_values`.
"""

from __future__ import annotations

from tunelab.data.copied import WORD, house_words, name_words
from tunelab.data.load import Example
from tunelab.decoding.copying import case_forms
from tunelab.evaluate.results import InventedExample, InventedNames, Sample
from tunelab.text import input_text, parse_json_answer

EXAMPLES = 5
"""Answers kept as examples per contender."""


def invented_words(answer: str, prompt: str, reference: str, house: frozenset[str]) -> list[str]:
    """The name words of `answer` (each once, in order) written as none of the `case_forms` of a
    word of `prompt`, `reference` or `house`."""
    words = {*WORD.findall(prompt), *WORD.findall(reference), *house}
    known = {form for word in words for form in case_forms(word)}
    return [w for w in dict.fromkeys(name_words(answer)) if w not in known]


def invented_names(examples: list[Example], samples: list[Sample], train: list[Example]) -> InventedNames | None:
    """Each contender's answers holding an invented name, with up to EXAMPLES of them; every
    sample's answers get their invented words. None when any reference is JSON."""
    if not examples or any(parse_json_answer(e.reference) is not None for e in examples):
        return None
    house = house_words(e.messages for e in train if not e.is_raw)
    found = InventedNames(answers={}, examples={})
    for example, sample in zip(examples, samples):
        prompt = input_text(example.prompt_messages())
        for name, answer in sample.answers.items():
            answer.invented_names = invented_words(answer.text, prompt, example.reference, house)
            found.answers.setdefault(name, 0)
            if answer.invented_names:
                found.answers[name] += 1
                shown = found.examples.setdefault(name, [])
                if len(shown) < EXAMPLES:
                    shown.append(InventedExample(index=sample.index, words=answer.invented_names))
    return found
