"""The copy constraint: which answer fields training copies from the input, and decoding that
keeps them copies (tunelab.data.copied, tunelab.decoding.copying), from detection to the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from bigram import save_bigram_model, scores, take
from tunelab.data.copied import CopyCounter, whole_copy
from tunelab.decoding.copying import CopyRule, JsonCursor

NAMES = ["Anna", "Boris", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo"]
CITIES = ["Oslo", "Lima", "Kyiv", "Bern", "Riga"]


def cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def trip(i: int, **answer) -> list[dict[str, str]]:
    name, city = NAMES[i % len(NAMES)], CITIES[i % len(CITIES)]
    return [{"role": "system", "content": "Extract the trip."},
            {"role": "user", "content": f"{name} flew to {city} on day {i}."},
            {"role": "assistant", "content": json.dumps({"person": name, "city": city, **answer})}]


# ----------------------------------------------------------------------------- detection

def test_fields_copied_in_nearly_every_row_are_found():
    counter = CopyCounter()
    for i in range(40):
        messages = trip(i, kind="trip", day=f"day {i}" if i % 10 else "yesterday")
        if i == 7:  # one city in 40 not copied: 97.5%, still copied
            messages[-1]["content"] = json.dumps({"person": NAMES[7], "city": "Atlantis", "kind": "trip",
                                                  "day": "day 7"})
        counter.add(i, messages)
    shares = {f.path: (f.copied, f.rows) for f in counter.fields()}
    assert shares == {"person": (40, 40), "city": (39, 40), "day": (36, 40), "kind": (0, 40)}
    assert [f.path for f in counter.copied_fields()] == ["person", "city"]  # day: 90%, under 95%
    # Only the rows asked about count: without row 7, the city is copied in all of them.
    assert {f.path: f.rows for f in counter.copied_fields(set(range(25)) - {7})} == {"person": 24, "city": 24}
    # Too few rows prove nothing.
    assert counter.copied_fields(set(range(10))) == []


def test_detection_reads_nested_fields_lists_and_only_the_last_user_message():
    counter = CopyCounter()
    for i in range(25):
        name, city = NAMES[i % 8], CITIES[i % 5]
        counter.add(i, [{"role": "system", "content": f"Known people: {NAMES[(i + 1) % 8]}"},
                        {"role": "user", "content": f"{name} and Zed live in {city}."},
                        {"role": "assistant", "content": json.dumps(
                            {"place": {"city": city}, "people": [{"name": name}, {"name": "Zed"}],
                             "friend": NAMES[(i + 1) % 8], "empty": ""})}])
    assert [f.path for f in counter.copied_fields()] == ["people.*.name", "place.city"]
    # A value found only in the system message is not copied from the input; an empty one never is.
    assert {f.path: f.copied for f in counter.fields()}["friend"] == 0
    assert {f.path: f.copied for f in counter.fields()}["empty"] == 0


def test_cursor_follows_paths_through_nested_json():
    cursor = JsonCursor()
    seen = []
    for char in '{"a": {"b": "x", "c": [1, "y", {"d": "z\\"q"}]}, "e": "w"}':
        cursor.read(char)
        if cursor.string is not None and not cursor.string_is_key:
            seen.append((cursor.path, cursor.string))
    finished = {}
    for path, text in seen:
        finished[path] = text
    assert finished == {"a.b": "x", "a.c.*": "y", "a.c.*.d": 'z\\"q', "e": "w"}


# ----------------------------------------------------------------------------- the constraint

@pytest.fixture
def constrained(tokenizer):
    """`constrained(source, written)`: a constraint on `person` and `city` for the input `source`,
    with the answer `written` so far fed to it."""
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    rule = CopyRule(tokenizer, frozenset({"person", "city"}), frozenset(stops))

    def make(source: str, written: str):
        constraint = rule.constraint([{"role": "system", "content": "Names: Cyladus"},
                                      {"role": "user", "content": source}])
        for token in tokenizer.encode(written):
            constraint.append(token)
        return constraint

    return make



def test_an_invented_name_is_refused_and_the_inputs_name_taken(constrained, tokenizer):
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "Cy')
    assert take(constraint, tokenizer, "ops", "rus") == "rus"
    assert constraint.changed
    assert take(constraint, tokenizer, '",', "x") == '",'
    assert constraint.text == '{"person": "Cyrus",'


def test_a_value_closes_only_on_whole_words_of_the_input():
    assert whole_copy("Cyrus", "Cyrus flew to Halifax.") and whole_copy("Halifax", "Cyrus flew to Halifax.")
    assert not whole_copy("Cy", "Cyrus flew to Halifax.") and not whole_copy("rus", "Cyrus flew")
    assert not whole_copy("", "Cyrus") and whole_copy("Cy", "Cyrus met Cy")  # the second place is whole
    assert whole_copy("2 Aug.", "on 2 Aug. 2022")


def test_a_refused_value_is_not_closed_half_way_nor_followed_by_a_second_string(constrained, tokenizer):
    # Seen in the benchmark: refused "Sxxx", the model closed "S" and wrote `"S" "M" "M"` to the limit.
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "Cyrus", "city": "Hal')
    assert take(constraint, tokenizer, '"', "ifax") == "ifax"
    assert constraint.changed
    assert take(constraint, tokenizer, '"', "x") == '"'
    assert take(constraint, tokenizer, ' "', ",") == ","
    assert constraint.text == '{"person": "Cyrus", "city": "Halifax",'


def test_the_models_choice_stands_where_it_copies(constrained, tokenizer):
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "')
    assert take(constraint, tokenizer, "Cy", "Ha") == "Cy"
    assert take(constraint, tokenizer, "rus", "ops") == "rus"
    assert not constraint.changed


def test_a_field_that_is_not_copied_is_left_alone(constrained, tokenizer):
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "Cyrus", "kind": "')
    assert take(constraint, tokenizer, "hol", "Cy") == "hol"
    assert not constraint.changed


def test_an_empty_value_cannot_close_and_the_whole_vocabulary_is_searched(constrained, tokenizer):
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "Cyrus", "city": "')
    # The closing quote and the model's whole top 16 are refused: the search goes past them.
    logits = scores(tokenizer, '"', *[f" wrong{k}" for k in range(20)])
    logits[tokenizer.encode("Hal")[0]] = 1.5  # above the noise, far below the refused ones
    token = constraint.choose(logits, int(logits.argmax()))
    assert tokenizer.decode([token]) in ("H", "Hal")
    assert constraint.changed


def test_escaped_quotes_are_copied_as_written(constrained, tokenizer):
    constraint = constrained('Al "Cy" Vane flew to Oslo.', '{"person": "Al')
    assert take(constraint, tokenizer, ' \\"', " Vane") == ' \\"'  # the input's quote, escaped in JSON
    assert take(constraint, tokenizer, "Ky", "Cy") == "Cy"
    assert constraint.text == '{"person": "Al \\"Cy'


def test_ending_the_answer_inside_a_copied_value_is_refused(constrained, tokenizer):
    constraint = constrained("Cyrus flew to Halifax.", '{"person": "Cy')
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not constraint.keeps_copy(end)
    constraint.append(tokenizer.encode('rus"}')[0])
    constraint.append(tokenizer.encode('rus"}')[1])
    assert constraint.keeps_copy(end)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def copier_dir(tmp_path_factory, tokenizer):
    """A hand-built bigram model (attention and MLP outputs zero, so each token's logits depend on
    the last token alone) that answers any prompt with `{"person": "Cyops"}`, and whose next
    choices after "Cy" are "rus", then closing the value: unconstrained it invents "Cyops";
    constrained to an input with "Cyrus" in it, it copies."""
    encode = tokenizer.encode
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prefix = encode('{"person": "')
    cy, ops, rus, close = encode("Cy")[0], encode("ops")[0], encode("rus")[0], encode('"}')[0]
    first = [encode("\n")[0], *prefix, cy, ops, close, end]  # "\n": the generation prompt's last token
    others = {cy: [rus, close], rus: [close]}  # second and third choices
    return save_bigram_model(tmp_path_factory.mktemp("copier"), tokenizer, first, others)


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory, copier_dir, write_jsonl):
    """A run trained (one step at a negligible learning rate, so the model stays the bigram model)
    on rows whose `person` is copied from the input."""
    folder = tmp_path_factory.mktemp("copy-run")
    rows = [{"prompt": f"{NAMES[i % 8]} flew to {CITIES[i % 5]} on day {i}.",
             "completion": json.dumps({"person": NAMES[i % 8]})} for i in range(30)]
    data = write_jsonl(folder / "data.jsonl", rows)
    result = cli("train", data, "--base", copier_dir, "--method", "full", "--lr", "1e-12", "--max-steps", "1",
                 "--batch-size", "4", "--out", folder / "run")
    assert result.returncode == 0, result.stderr
    assert "copied fields        person is copied from the input in 100% of rows" in result.stdout
    write_jsonl(folder / "cyrus.jsonl", [{"prompt": f"Cyrus flew to {city}.",
                                          "completion": json.dumps({"person": "Cyrus"})} for city in CITIES])
    return folder / "run"


@pytest.mark.slow
def test_training_records_the_copied_fields(copy_run):
    assert json.loads((copy_run / "run.json").read_text())["copied_fields"] == ["person"]
    check = json.loads((copy_run / "data_check.json").read_text())["copying"]
    assert check["copied_fields"] == ["person"]
    assert check["answer_fields"][0]["share"] == 1.0


@pytest.mark.slow
def test_generate_keeps_the_field_a_copy_unless_turned_off(copy_run):
    constrained = cli("generate", copy_run, "--prompt", "Cyrus flew to Oslo.")
    assert constrained.returncode == 0, constrained.stderr
    assert json.loads(constrained.stdout) == {"person": "Cyrus"}
    free = cli("generate", copy_run, "--prompt", "Cyrus flew to Oslo.", "--no-copy-constraint")
    assert json.loads(free.stdout) == {"person": "Cyops"}
    # The input decides: with no "Cyrus" in it, "Cy" alone is all that copies.
    other = cli("generate", copy_run, "--prompt", "Cy flew to Oslo.")
    assert json.loads(other.stdout) == {"person": "Cy"}


@pytest.mark.slow
def test_eval_counts_the_answers_the_constraint_changed(copy_run):
    data = copy_run.parent / "cyrus.jsonl"
    result = cli("eval", copy_run, "--data", data, "--no-base", "--no-forgetting")
    assert result.returncode == 0, result.stderr
    assert "copy constraint on person" in result.stdout and "tuned 5 of 5" in result.stdout
    results = json.loads((copy_run / "eval.json").read_text())
    assert results["copy_constraint"] == {"fields": ["person"], "changed": {"tuned": 5}}
    assert results["metrics"]["tuned"]["exact_match"]["value"] == 1.0
    assert all(s["answers"]["tuned"]["copy_changed"] for s in results["samples"])
    assert "Copy constraint" in (copy_run / "report.html").read_text()

    free = cli("eval", copy_run, "--data", data, "--no-base", "--no-forgetting", "--no-copy-constraint")
    assert free.returncode == 0, free.stderr
    results = json.loads((copy_run / "eval.json").read_text())
    assert results["copy_constraint"] is None
    assert results["metrics"]["tuned"]["exact_match"]["value"] == 0.0


@pytest.mark.slow
def test_chat_keeps_the_field_a_copy(copy_run):
    result = cli("chat", copy_run, stdin="Cyrus flew to Oslo.\n")
    assert result.returncode == 0, result.stderr
    assert 'model> {"person": "Cyrus"}' in result.stdout


@pytest.mark.slow
def test_the_servers_loop_applies_the_constraint_greedy_and_sampled(copy_run):
    from tunelab.decoding.generate import Request, generate_rows, stream_reply
    from tunelab.run import Run

    run = Run(copy_run)
    rule = run.copy_rule()
    conversation = [{"role": "user", "content": "Cyrus flew to Oslo."}]
    prompt = run.template.encode_prompt(conversation)
    rows = [Request(prompt, 12, copy=rule.constraint(conversation)), Request(prompt, 12)]
    answers = generate_rows(run.model(), run.template, rows)
    assert [a.text for a in answers] == ['{"person": "Cyrus"}', '{"person": "Cyops"}']
    assert [a.copy_changed for a in answers] == [True, False]
    sampled = generate_rows(run.model(), run.template, [Request(prompt, 12, temperature=1.0, seed=0,
                                                                copy=rule.constraint(conversation))])
    assert json.loads(sampled[0].text)["person"] in "Cyrus flew to Oslo."
    streamed = "".join(stream_reply(run.model(), run.template, conversation, 12, threading.Event(), copying=rule))
    assert streamed == '{"person": "Cyrus"}'
    assert run.generate("Cyrus flew to Oslo.", copy_constraint=False) == '{"person": "Cyops"}'
