"""The data check's shortcuts count what the straightforward way counts: each answer parsed once
for the copied fields and the novelty's values, the copied fields counted in numpy over a mask
of the training rows, the near-duplicate bands searched by several threads."""

import json
import random
from collections import Counter

import numpy as np
import pytest

from tunelab.data import dedup, load, novelty
from tunelab.data.copied import CopiedField, CopyCounter, whole_copy
from tunelab.text import field_path, input_text, json_leaves, parse_json_answer

NAMES = ["Zoë Åberg", "José Núñez", "李小龙", "Anna O'Neil", "Cy", "Cyrus", ""]


def answers(n: int) -> list[list[dict[str, str]]]:
    """Rows whose answers take every form the counters read: nested objects, lists at the top and
    inside, keys that look like paths ("", "*", "a.b"), fenced JSON, plain text with and without
    quotes and names, numbers, booleans and nulls."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        name, other = rng.choice(NAMES), rng.choice(NAMES)
        user = f"Book {name} for {i % 7}, with {other.lower()} on day {i % 5}"
        kind = i % 7
        if kind == 0:
            answer = json.dumps({"name": name, "guests": i % 7, "ok": True, "note": None,
                                 "people": [{"n": name}, {"n": other}, [other, i]]}, ensure_ascii=i % 2 == 0)
        elif kind == 1:
            answer = json.dumps([{"name": name}, name, {"": other, "*": name, "a.b": "day", "a": {"b": other}}])
        elif kind == 2:
            answer = "```json\n" + json.dumps({"name": name, "day": f"day {i % 5}"}) + "\n```"
        elif kind == 3:  # now and then a name the input lacks
            invented = "".join(rng.choice("bcdfgklm") for _ in range(6)).title() if i % 3 == 0 else ""
            answer = f"Booked {name} and {other.upper()} for day {i % 5} {invented}"
        elif kind == 4:
            answer = f"The name is '{name}' and \"{other}\""
        elif kind == 5:
            answer = json.dumps({"a": {"b": name}, "a.b": other, "list": [], "obj": {}})
        else:
            answer = "{not json: " + name
        rows.append([{"role": "system", "content": f"Known: {other}"}, {"role": "user", "content": user},
                     {"role": "assistant", "content": answer}])
    return rows


def straightforward_fields(rows, training: set[int]) -> list[CopiedField]:
    """The JSON fields' counts as the check made them before: every leaf by its path, each answer
    parsed for the purpose, a Python loop over the training rows."""
    seen, copied = Counter(), Counter()
    for row, messages in enumerate(rows):
        parsed = parse_json_answer(messages[-1]["content"])
        if parsed is None or row not in training:
            continue
        fields: dict[str, bool] = {}
        source = input_text(messages)
        for path, value in json_leaves(parsed).items():
            if isinstance(value, str):
                name = field_path(path)
                fields[name] = fields.get(name, True) and bool(value.strip()) and whole_copy(value, source)
        for name, is_copied in fields.items():
            seen[name] += 1
            copied[name] += is_copied
    return [CopiedField(name, seen[name], copied[name]) for name in seen]


def test_one_parse_per_answer_counts_as_parsing_it_for_each_count():
    rows = answers(700)
    once, twice = CopyCounter(), CopyCounter()
    for row, messages in enumerate(rows):
        answer = messages[-1]["content"]
        parsed = parse_json_answer(answer)
        once.add_answer(row, answer, parsed, input_text(messages))
        twice.add(row, messages)
        assert novelty.parsed_value_hashes(answer, parsed) == novelty.value_hashes(answer)
    assert once.fields() == twice.fields() and once.paths == twice.paths and once.words == twice.words
    assert {"*.", "*.*", "*.a.b", "people.*.*", "a.b"} <= set(once.paths)  # the odd keys were met
    training = {row for row in range(len(rows)) if row % 10}
    expected = straightforward_fields(rows, training)
    counted = [f for f in once.fields(training) if f.path != "(text)"]
    assert sorted(counted, key=lambda f: f.path) == sorted(expected, key=lambda f: f.path)
    assert any(0 < f.copied < f.rows for f in counted)


def test_fields_over_a_mask_of_rows_are_the_fields_over_the_set_of_them():
    rows = answers(700)
    counter = CopyCounter()
    for row, messages in enumerate(rows):
        counter.add(row, messages)
    mask = np.random.default_rng(0).random(len(rows)) < 0.8
    by_mask, by_set = counter.fields(mask), counter.fields(set(np.flatnonzero(mask).tolist()))
    assert by_mask == by_set and by_mask != counter.fields()
    text = {f.path: f for f in by_mask}["(text)"]
    assert 0 < text.copied < text.rows  # plain-text answers counted, some inventing a name
    assert counter.fields(np.zeros(len(rows), bool)) == [] == counter.fields(set())


def test_near_pairs_are_the_same_on_any_number_of_threads():
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(300)]
    texts += [" ".join(t.split()[:-1] + ["changed"]) for t in texts[:120]]  # near copies
    texts += ["shared templated prefix of every row " + t for t in texts[:200]]  # buckets of look-alike rows
    finder = dedup.NearDuplicates()
    for text in texts:
        finder.add(text)
    skip = np.zeros(len(texts), bool)
    skip[::17] = True
    for kept in (None, skip):
        alone = finder.pairs(kept)
        assert len(alone[0]) > 100
        for threads in (2, 5):
            assert all(np.array_equal(a, b) for a, b in zip(alone, finder.pairs(kept, threads=threads)))


def pairs_by_sorting(signatures: np.ndarray, index: np.ndarray) -> set[tuple[int, int]]:
    """The near-duplicate search as it was written first: each band's keys sorted (stably, so a
    bucket's first row comes first), each row compared with its bucket's first row."""
    bands, found = signatures.view(np.uint64), set()
    for band in range(dedup.PERMUTATIONS // dedup.BAND_ROWS):
        keys = bands[index, band]
        order = np.argsort(keys, kind="stable")
        starts = np.ones(len(order), bool)
        starts[1:] = keys[order][1:] != keys[order][:-1]
        head = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
        for a, b in zip(index[order[head[~starts]]].tolist(), index[order[~starts]].tolist()):
            if (signatures[a] == signatures[b]).mean() >= dedup.THRESHOLD:
                found.add((a, b))
    return found


@pytest.mark.parametrize("hashed_from", [0, 1 << 30])  # pyarrow's hash tables, or sorts
def test_buckets_find_the_pairs_and_copies_that_sorted_ones_did(monkeypatch, hashed_from):
    monkeypatch.setattr(dedup, "HASHED_FROM", hashed_from)
    rng = random.Random(4)
    words = [f"word{i}" for i in range(500)]
    bases = [[rng.choice(words) for _ in range(30)] for _ in range(100)]
    texts = []
    for _ in range(2000):  # variants of a few texts, a word or two changed: buckets of look-alike rows
        text = list(rng.choice(bases))
        for _ in range(rng.randrange(3)):
            text[rng.randrange(30)] = rng.choice(words)
        texts.append(" ".join(text))
    finder = dedup.NearDuplicates()
    for text in texts:
        finder.add(text)
    skip = np.random.default_rng(1).random(len(texts)) < 0.1
    first, later, _ = finder.pairs(skip)
    expected = pairs_by_sorting(finder.signatures(), np.flatnonzero(~skip))
    assert set(zip(first.tolist(), later.tolist())) == expected and len(expected) > 500

    keys = np.random.default_rng(2).integers(0, 300, 5000).astype(np.uint64) * np.uint64(2**40 + 7)
    firsts, copies = dedup.exact_duplicates(keys)
    first_at: dict[int, int] = {}
    expected = []
    for i, key in enumerate(keys.tolist()):
        if key in first_at:
            expected.append((first_at[key], i))
        first_at.setdefault(key, i)
    assert list(zip(firsts.tolist(), copies.tolist())) == expected
    assert [first for first, _ in expected] == dedup.first_equal(keys)[copies].tolist()


@pytest.mark.parametrize("hashed_from", [0, 1 << 30])
def test_packed_novelty_is_the_novelty_of_lists_of_rows_either_way(monkeypatch, hashed_from):
    monkeypatch.setattr(dedup, "HASHED_FROM", hashed_from)
    rng = np.random.default_rng(5)
    rows = [list(dict.fromkeys(rng.integers(0, 3000, rng.integers(0, 6)).tolist())) for _ in range(4000)]
    values = np.array([h for row in rows for h in row], np.uint64)
    ends = np.cumsum([len(row) for row in rows])
    held_out = rng.random(len(rows)) < 0.2
    training = ~held_out & (rng.random(len(rows)) < 0.9)
    packed = novelty.measure_packed(values, ends, training, held_out)
    listed = novelty.measure([r for r, t in zip(rows, training) if t], [r for r, h in zip(rows, held_out) if h])
    assert packed == listed and packed.novel_rows and packed.seen_rows and packed.without_values


def outcome(parse, line: str):
    try:
        return "row", parse(line)
    except json.JSONDecodeError as e:
        return "JSONDecodeError", e.msg, e.colno
    except (ValueError, RecursionError) as e:
        return type(e).__name__, str(e)


def test_a_line_is_read_as_json_loads_reads_it():
    lines = ['{"a": 1}\n', '{"a": 1}', '  {"a": 1}\n', '{"a": 1}  \r\n', '{"a": 1}\t\n', '{"a": 1} x\n',
             '{"a": 1}\x0b\n', '{"a": 1}\u00a0\n', '{"a": 1}{"b": 2}\n', "\ufeff{}\n", "", "\n", "[1, 2]\n", '"s"\n',
             "NaN\n", '{"a": Infinity}\n', "{bad\n", '{"a": "\\ud800"}\n', '{"n": ' + "9" * 5000 + "}\n",
             "[" * 100_000 + "]" * 100_000 + "\n", '{"a": 1, "a": 2}\n', '{"x": 1e999}\n']
    for line in lines:
        assert outcome(load._json_line, line) == outcome(json.loads, line), repr(line[:40])
