import random

import numpy as np

from tunelab.data import dedup
from tunelab.text import normalise_for_dedup


def jaccard(a: str, b: str) -> float:
    a, b = normalise_for_dedup(a).encode(), normalise_for_dedup(b).encode()
    grams = [{s[i : i + dedup.SHINGLE] for i in range(len(s) - dedup.SHINGLE + 1)} for s in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


def test_near_duplicates_match_exact_jaccard_on_planted_pairs():
    rng = random.Random(0)
    vocabulary = [f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.choice('nrst')}{i}" for i in range(3000)]
    texts = [" ".join(rng.choice(vocabulary) for _ in range(60)) for _ in range(400)]
    for i in range(0, 240, 4):  # plant copies of earlier texts with 0 to 19 words changed
        words = texts[i].split()
        for k in rng.sample(range(60), i // 4 % 20):
            words[k] = rng.choice(vocabulary)
        texts.append(" ".join(words).upper() + " !!")  # case and punctuation do not count
    finder = dedup.NearDuplicates()
    for text in texts:
        finder.add(text)
    first, later, similarity = finder.pairs()
    found = {(int(a), int(b)): s for a, b, s in zip(first, later, similarity)}
    planted = {(i, 400 + k): jaccard(texts[i], texts[400 + k]) for k, i in enumerate(range(0, 240, 4))}
    # The estimate's standard error is about 0.05 (64 hash functions): far enough from 0.8, a pair is sure.
    clearly_near = {pair for pair, j in planted.items() if j >= 0.95}
    assert len(clearly_near) >= 6 and clearly_near <= set(found)
    assert not {pair for pair, j in planted.items() if j < 0.65} & set(found)
    for (a, b), estimate in found.items():  # nothing else: every pair found is similar indeed
        assert jaccard(texts[a], texts[b]) >= 0.65 and abs(estimate - jaccard(texts[a], texts[b])) < 0.2


def test_short_and_empty_texts_and_skipped_rows():
    finder = dedup.NearDuplicates()
    for text in ["hi", "Hi!", "", "?", "a longer text that is different"]:
        finder.add(text)
    first, later, _ = finder.pairs()
    assert list(zip(first.tolist(), later.tolist())) == [(0, 1), (2, 3)]  # "" and "?" normalise alike
    first, later, _ = finder.pairs(skip=np.array([False, True, False, False, False]))
    assert list(zip(first.tolist(), later.tolist())) == [(2, 3)]


def test_exact_duplicates_and_components():
    first, copy = dedup.exact_duplicates(np.array([5, 3, 5, 3, 5, 9], np.uint64))
    assert list(zip(first.tolist(), copy.tolist())) == [(0, 2), (1, 3), (0, 4)]  # in order of the copies
    labels = dedup.components(7, np.array([0, 3, 1, 5]), np.array([4, 4, 3, 6]))
    assert labels.tolist() == [0, 0, 2, 0, 0, 5, 5]


def edited_copy(rng: random.Random, text: str, at_most: float) -> str:
    """`text` with letters replaced one at a time, until its exact Jaccard similarity to `text`
    falls to `at_most` (each letter changes about 1% of the 5-grams of a 150-word text)."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.isalpha()]
    rng.shuffle(positions)
    for position in positions:
        chars[position] = rng.choice([c for c in "qwxyz" if c != chars[position]])
        if jaccard(text, "".join(chars)) <= at_most:
            return "".join(chars)
    raise AssertionError("never got that far apart")


def test_the_threshold_sits_between_pairs_just_above_and_just_below_it():
    # One pair is estimated within about 0.05 of its true similarity, so a single pair at 0.85
    # can fall either side of 0.8; forty of them cannot. With the threshold at 0.7, 0.75, 0.85
    # or 0.9 instead of 0.8, one of the two counts below is far off.
    rng = random.Random(1)
    vocabulary = [f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.choice('nrst')}{i}" for i in range(3000)]
    finder, above, below = dedup.NearDuplicates(), [], []
    for pairs, at_most in ((above, 0.86), (below, 0.76)):
        for _ in range(40):
            text = " ".join(rng.choice(vocabulary) for _ in range(150))
            copy = edited_copy(rng, text, at_most)
            assert at_most - 0.01 <= jaccard(text, copy) <= at_most
            pairs.append((finder.count, finder.count + 1))
            finder.add(text)
            finder.add(copy)
    first, later, _ = finder.pairs()
    found = set(zip(first.tolist(), later.tolist()))
    assert found <= set(above) | set(below)
    assert len(found & set(above)) >= 28  # of 40 at Jaccard 0.85-0.86
    assert len(found & set(below)) <= 12  # of 40 at Jaccard 0.75-0.76


def test_the_shortcut_for_ascii_text_normalises_as_the_rule_does():
    # Every ASCII character in every position, and texts that are not ASCII (the rule's own path).
    rng = random.Random(2)
    texts = ["".join(chr(rng.randrange(128)) for _ in range(rng.randrange(40))) for _ in range(3000)]
    texts += ["Straße STRASSE", "Ünïcödé_words, 東京 and ß!", "tab\tnew\nline\x0bvt\x0cff\x1fus", "", "  __  "]
    for text in texts:
        assert dedup.normalised_bytes(text) == normalise_for_dedup(text).encode(), repr(text)
