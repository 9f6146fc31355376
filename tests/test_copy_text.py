"""The copy constraint on plain-text answers: their names and numbers stay words of the input
(tunelab.data.copied's detection, decoding/copying.py's text rule, evaluate/names.py's count)."""

from __future__ import annotations

import json

import pytest

from bigram import save_bigram_model, take
from tunelab.data.copied import TEXT_ANSWER, CopyCounter, describe, house_words
from tunelab.data.load import Example
from tunelab.decoding.copying import CopyRule
from tunelab.evaluate.names import invented_names, invented_words
from tunelab.evaluate.results import Answer, Sample

PEOPLE = [("kwame", "oyelaran"), ("thea", "abernathy"), ("lorcan", "mbeki"), ("priya", "haddad"),
          ("ingrid", "larsen"), ("tomas", "okafor"), ("mei", "tanaka"), ("omar", "rossi")]
TOPICS = ["billing", "a refund", "the late delivery", "a broken charger", "the new contract"]


def note(i: int, people=PEOPLE) -> list[dict[str, str]]:
    """An informal call note, all lower case, and its house-style sentence with the name re-cased."""
    first, last = people[i % len(people)]
    topic = TOPICS[i % len(TOPICS)]
    return [{"role": "user", "content": f"{first} {last} called re {topic}, wants callback at {i + 2}pm"},
            {"role": "assistant", "content": f"The customer {first.title()} {last.title()} called about {topic} "
                                             f"and asked to be called back at {i + 2} pm."}]


# ----------------------------------------------------------------------------- detection

def test_names_copied_in_nearly_every_text_answer_are_found():
    counter = CopyCounter()
    for i in range(40):
        messages = note(i)
        if i == 3:  # one name in 40 not in its input: 97.5%, still copied
            messages[-1]["content"] = messages[-1]["content"].replace("Priya", "Pria")
        counter.add(i, messages)
    text = {f.path: f for f in counter.fields()}[TEXT_ANSWER]
    assert (text.copied, text.rows) == (39, 40)
    assert [f.path for f in counter.copied_fields()] == [TEXT_ANSWER]
    assert describe(counter.copied_fields()) == ("names and numbers in answers are copied from the input in 98% of "
                                                 "rows: decoding keeps them words of the input; "
                                                 "--no-copy-constraint turns it off")
    # A sentence's first "The" is no name: the answers write "the" in lower case too ("about the late delivery").
    assert "the" in house_words(note(i) for i in range(40))


def test_answers_that_name_what_the_input_does_not_are_no_copy_task():
    counter = CopyCounter()
    capitals = ["Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Oslo", "Prague", "Dublin", "Athens",
                "Warsaw", "Bern", "Riga", "Sofia", "Tallinn", "Vilnius", "Zagreb", "Valletta", "Nicosia", "Skopje",
                "Tirana", "Minsk"]
    for i, city in enumerate(capitals):
        counter.add(i, [{"role": "user", "content": f"capital of country number {i}?"},
                        {"role": "assistant", "content": f"It is {city}."}])
    text = {f.path: f for f in counter.fields()}[TEXT_ANSWER]
    assert text.copied == 0 and counter.copied_fields() == []


def test_a_label_every_answer_writes_is_the_house_styles_own():
    rows = [[{"role": "user", "content": f"{first} {last} rang"},
             {"role": "assistant", "content": f"Summary: {first.title()} {last.title()} rang."}]
            for first, last in PEOPLE * 3]
    assert "Summary" in house_words(rows)  # as the answers write it
    counter = CopyCounter()
    for i, row in enumerate(rows):
        counter.add(i, row)
    assert [(f.path, f.share) for f in counter.copied_fields()] == [(TEXT_ANSWER, 1.0)]


def test_the_data_check_reports_copied_names(cli, write_jsonl, tmp_path):
    data = write_jsonl(tmp_path / "notes.jsonl", [{"messages": note(i)} for i in range(30)])
    result = cli("data", "check", data)
    assert result.returncode == 0, result.stderr
    assert ("copied fields        names and numbers in answers are copied from the input in 100% of rows: decoding "
            "keeps them words of the input; --no-copy-constraint turns it off") in result.stdout


# ----------------------------------------------------------------------------- the constraint

@pytest.fixture
def constrained(tokenizer):
    """`constrained(source, written)`: the text rule for the input `source`, with the answer
    `written` so far fed to it; the house words are those of the call notes above."""
    stops = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    rule = CopyRule(tokenizer, frozenset({TEXT_ANSWER}), frozenset(stops), house_words(note(i) for i in range(40)))

    def make(source: str, written: str):
        constraint = rule.constraint([{"role": "system", "content": "Known: Olenara"},
                                      {"role": "user", "content": source}])
        for token in tokenizer.encode(written) if written else []:
            constraint.append(token)
        return constraint

    return make



SOURCE = "kwame oyelaran called re billing, wants callback at 4pm"


def test_a_name_that_starts_as_a_copy_stays_one(constrained, tokenizer):
    # "Olenara" for "oyelaran": the benchmark's miss. " O" still copies, "len" does not.
    constraint = constrained(SOURCE, "The customer Kwame O")
    assert take(constraint, tokenizer, "len", "y") == "y"
    assert constraint.changed
    assert take(constraint, tokenizer, "en", "el") == "el"
    assert take(constraint, tokenizer, "aren", "aran") == "aran"
    assert constraint.text == "The customer Kwame Oyelaran"


def test_a_one_letter_change_is_refused_and_a_name_closes_only_whole(constrained, tokenizer):
    constraint = constrained(SOURCE, "The customer Kwame Oyel")
    assert not constraint.keeps_names("The customer Kwame Oyelaren ")  # one letter off
    assert not constraint.keeps_names("The customer Kwame Oyelar.")  # cut short
    assert constraint.keeps_names("The customer Kwame Oyelaran.")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert not constraint.keeps_copy(end)  # the answer cannot end inside "Oyel"
    assert take(constraint, tokenizer, "aren", "aran") == "aran"
    assert constraint.keeps_copy(end)
    # A number is a name word too: 4 is in the input, 5 is not.
    assert constraint.keeps_names("The customer Kwame Oyelaran called back at 4 ")
    assert not constraint.keeps_names("The customer Kwame Oyelaran called back at 5 ")


def test_a_name_only_the_system_message_holds_is_no_copy(constrained, tokenizer):
    constraint = constrained(SOURCE, "The customer")
    assert take(constraint, tokenizer, " Ol", " Kw") == " Kw"
    assert constraint.changed


def test_re_casing_is_a_copy(constrained, tokenizer):
    for written in ("Kwame Oyelaran", "KWAME OYELARAN", "kwame oyelaran"):
        constraint = constrained(SOURCE, "")
        for token in tokenizer.encode(written + " called"):
            assert constraint.keeps_copy(token), written
            constraint.append(token)
        assert not constraint.changed


def test_a_legitimate_word_that_is_no_copy_is_left_alone(constrained, tokenizer):
    # "The" and "Customer" are in no input; the training answers write "The" so, and "customer" in
    # lower case, which may open a sentence after another with a capital.
    for written in ("The customer is Kwame Oyelaran.", "The customer called. Customer Kwame Oyelaran called about "
                                                       "billing, I think.\nRefund: none."):
        constraint = constrained(SOURCE, "")
        for token in tokenizer.encode(written):
            assert take(constraint, tokenizer, tokenizer.decode([token])) == tokenizer.decode([token])
        assert not constraint.changed and constraint.text == written


def test_only_the_case_forms_a_house_style_writes_are_copies(constrained, tokenizer):
    # "NeilCAM" for "neilcam": the benchmark's miss. The input's own form, lower case, a capital
    # first letter and capitals throughout are copies; any other mix of cases is not.
    constraint = constrained("missed call: KIFLUSYIN NEILCAM (site visit), McDonald too", "")
    for good in ("Kiflusyin Neilcam ", "KIFLUSYIN NEILCAM ", "kiflusyin neilcam ", "Kiflusyin McDonald ",
                 "Kiflusyin Mcdonald ", "MCDONALD ", "The customer "):
        assert constraint.keeps_names(good), good
    for bad in ("Kiflusyin NeilCAM ", "Kiflusyin NeilC", "KIFLUSYIN NEilcam ", "McDONALD ", "ThE "):
        assert not constraint.keeps_names(bad), bad
    constraint = constrained("missed call: KIFLUSYIN NEILCAM (site visit)", "Kiflusyin Neil")
    assert take(constraint, tokenizer, "CAM", "cam") == "cam"
    assert constraint.changed and constraint.text == "Kiflusyin Neilcam"


def test_a_lone_capital_starts_a_name_whose_next_word_is_checked(constrained, tokenizer):
    # "R eyebvoukei" for "therbeth toxvoukei": the benchmark's miss.
    source = "call from therbeth toxvoukei abt launch - wants callback after 1pm"
    constraint = constrained(source, "")
    assert not constraint.keeps_names("R eyebvoukei called")  # "R" is no initial of a word of the input
    assert not constraint.keeps_names("R. Toxvoukei called")
    assert not constraint.keeps_names("T eyebvoukei called")  # an initial, but the name goes on invented
    assert not constraint.keeps_names("T. eyeb")
    for good in ("T. Toxvoukei called", "T toxvoukei called", "Therbeth T. called", "I think Therbeth called",
                 "A customer called"):
        assert constraint.keeps_names(good), good
    constraint = constrained(source, "The customer T")
    assert take(constraint, tokenizer, " eye", " to") == " to"
    assert constraint.changed
    # An initial the input writes itself is a word of it; the surname after it copies as before.
    constraint = constrained("r. smith called re billing", "")
    assert constraint.keeps_names("R. Smith called about billing.")
    assert not constraint.keeps_names("R. Smyth called about billing.")


def test_a_character_split_over_byte_tokens_is_checked_whole(constrained, tokenizer):
    lead, tail = tokenizer.convert_tokens_to_ids("Ã"), tokenizer.convert_tokens_to_ids("©")  # "é" is C3 A9
    assert tokenizer.decode([lead, tail]) == "é" and tokenizer.decode([lead]) == "\ufffd"
    # "X\ufffd enix" for "ixkemes": the benchmark's miss. The half character cannot continue "Ix"
    # (no word of the input goes on with a non-ASCII letter there), nor can "Ix" end there.
    constraint = constrained("ixkemes, andrei rang about merger", "Andrei Ix")
    assert not constraint.keeps_copy(lead)
    constraint.append(lead)  # were it written anyway, what follows cannot leave the character half made
    assert constraint.text == "Andrei Ix"
    assert not constraint.keeps_copy(tokenizer.encode(" enix")[0])
    assert not constraint.keeps_copy(tokenizer.encode("kem")[0])
    # A name that is spelt so is copied byte by byte, and only with the right second byte.
    constraint = constrained("jos\u00e9 ixkemes rang about merger", "Jos")
    assert constraint.keeps_copy(lead)
    constraint.append(lead)
    assert not constraint.keeps_copy(tokenizer.convert_tokens_to_ids("¨"))  # "è"
    assert constraint.keeps_copy(tail)
    constraint.append(tail)
    assert constraint.text == "Jos\u00e9" and constraint.keeps_names("Jos\u00e9 Ixkemes rang")


def test_a_house_word_opens_the_answer_only_as_the_training_answers_write_it(constrained, tokenizer):
    # "Roadmap Toxvoukei" for "therbeth toxvoukei": the benchmark's miss. The training answers
    # write "roadmap" in lower case only, and start with a name, never with it.
    constraint = constrained(SOURCE, "")
    assert not constraint.keeps_names("Refund Oyelaran called")
    assert not constraint.keeps_names("Ref")
    assert constraint.keeps_names("The customer Kwame Oyelaran called. Refund")
    assert take(constraint, tokenizer, "Ref", "K") == "K"


def test_a_refused_capital_gives_way_to_an_allowed_capital(constrained, tokenizer):
    # "Andrei ixkemes" for "Andrei Ixkemes": the benchmark's miss once " Xi" was refused. The
    # lower-case copy scores higher, but the model meant a capital there.
    constraint = constrained("ixkemes, andrei rang about merger", "Andrei")
    assert take(constraint, tokenizer, " Xi", " ix", " I") == " I"
    assert constraint.changed
    # Where no allowed token opens a word with a capital, the best allowed one is taken.
    constraint = constrained(SOURCE, "The customer")
    assert take(constraint, tokenizer, " Zed", " is", " Ol") == " is"


def test_json_answers_are_left_to_the_json_rule(constrained, tokenizer):
    constraint = constrained(SOURCE, '{"person": "')
    assert take(constraint, tokenizer, "Ol", "K") == "Ol"
    assert not constraint.changed


# ----------------------------------------------------------------------------- eval's count

def test_invented_names_count_what_neither_input_nor_reference_holds():
    house = house_words(note(i) for i in range(40))
    prompt, reference = SOURCE, "The customer Kwame Oyelaran called about billing."
    assert invented_words("The customer Kwame Olenara called about billing.", prompt, reference, house) == ["Olenara"]
    assert invented_words("The customer Kwame Oyelaran called about billing.", prompt, reference, house) == []
    # In the reference but not the input (a rewrite the task makes), or in the input only: no invention.
    assert invented_words("Billing: Kwame Oyelaran.", prompt, "Billing: Kwame Oyelaran.", house) == []
    assert invented_words("Kwame called at 4 pm.", prompt, reference, house) == []
    # A number the input lacks is invented; a sentence's first common word is not.
    assert invented_words("Kwame called at 5 pm.", prompt, reference, house) == ["5"]
    assert invented_words("Called about billing. The customer Kwame is upset.", prompt, reference, house) == []
    # A copy's case forms are the decoding rule's: as written, lower case, capitalised, capitals.
    assert invented_words("KWAME Oyelaran called.", prompt, reference, house) == []
    assert invented_words("KwAME OyeLARAN called.", prompt, reference, house) == ["KwAME", "OyeLARAN"]
    # Without the house words, "The" would count: the rule above is what keeps it out.
    assert invented_words("The customer Kwame", prompt, "Kwame", frozenset()) == ["The"]


def test_invented_names_per_contender_with_examples():
    examples = [Example(note(i), i + 1) for i in range(3)]
    train = [Example(note(i), i + 1) for i in range(3, 40)]
    samples = [Sample(index=i, line=i + 1, prompt=e.messages[0]["content"], reference=e.reference,
                      answers={"zero-shot": Answer(text="The customer Athena Abhenathy called."),
                               "tuned": Answer(text=e.reference)})
               for i, e in enumerate(examples)]
    found = invented_names(examples, samples, train)
    assert found.answers == {"zero-shot": 3, "tuned": 0}
    assert [e.words for e in found.examples["zero-shot"]] == [["Athena", "Abhenathy"]] * 3
    assert samples[0].answers["tuned"].invented_names == []
    # JSON references are counted as hallucinated values instead.
    assert invented_names([Example([*note(0)[:1], {"role": "assistant", "content": '{"a": "b"}'}], 1)],
                          samples[:1], train) is None


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def recaser_dir(tmp_path_factory, tokenizer):
    """A hand-built bigram model (each token's logits depend on the last token alone) that answers
    any prompt with "Kwame Olenara.", and whose second choice after " O" leads to "Oyelaran":
    unconstrained it invents "Olenara"; constrained to an input with "oyelaran" in it, it copies."""
    def token(text: str) -> int:
        ids = tokenizer.encode(text)
        assert len(ids) == 1, text
        return ids[0]

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = [token("\n"), token("K"), token("w"), token("ame"), token(" O"), token("len"), token("ara"), token("."),
             end]
    others = {token(" O"): [token("y")], token("y"): [token("el")], token("el"): [token("aran")],
              token("aran"): [token(".")]}
    return save_bigram_model(tmp_path_factory.mktemp("recaser"), tokenizer, first, others)


@pytest.fixture(scope="module")
def recase_run(tmp_path_factory, recaser_dir, cli, write_jsonl):
    """A run trained (one step at a negligible learning rate: the model stays the bigram model) on
    call notes whose answers re-case the note's name."""
    folder = tmp_path_factory.mktemp("recase-run")
    data = write_jsonl(folder / "notes.jsonl", [{"messages": note(i)} for i in range(30)])
    result = cli("train", data, "--base", recaser_dir, "--method", "full", "--lr", "1e-12", "--max-steps", "1",
                 "--batch-size", "4", "--out", folder / "run")
    assert result.returncode == 0, result.stderr
    assert "names and numbers in answers are copied from the input in 100% of rows" in result.stdout
    write_jsonl(folder / "kwame.jsonl", [{"prompt": f"kwame oyelaran called re {topic}",
                                          "completion": "Kwame Oyelaran."} for topic in TOPICS])
    return folder / "run"


@pytest.mark.slow
def test_generation_keeps_names_copies_unless_turned_off(recase_run, cli):
    assert TEXT_ANSWER in json.loads((recase_run / "run.json").read_text())["copied_fields"]
    prompt = "kwame oyelaran called re billing"
    constrained = cli("generate", recase_run, "--prompt", prompt)
    assert constrained.returncode == 0, constrained.stderr
    assert constrained.stdout.strip() == "Kwame Oyelaran."
    free = cli("generate", recase_run, "--prompt", prompt, "--no-copy-constraint")
    assert free.stdout.strip() == "Kwame Olenara."
    chat = cli("chat", recase_run, stdin=prompt + "\n")
    assert "model> Kwame Oyelaran." in chat.stdout
    # The Python API, and a sampled row of the loop that serve batches into.
    from tunelab.decoding.generate import Request, generate_rows
    from tunelab.run import Run

    run = Run(recase_run)
    assert run.generate(prompt) == "Kwame Oyelaran." and run.generate(prompt, copy_constraint=False) == "Kwame Olenara."
    conversation = [{"role": "user", "content": prompt}]
    sampled = generate_rows(run.model(), run.template, [Request(run.template.encode_prompt(conversation), 12,
                                                                temperature=1.0, seed=0,
                                                                copy=run.copy_rule().constraint(conversation))])
    assert "Olenara" not in sampled[0].text and sampled[0].text.startswith("Kwame O")


@pytest.mark.slow
def test_eval_counts_invented_names_and_changed_answers(recase_run, cli):
    data = recase_run.parent / "kwame.jsonl"
    result = cli("eval", recase_run, "--data", data, "--no-base", "--no-forgetting")
    assert result.returncode == 0, result.stderr
    assert "copy constraint on the names of text answers" in result.stdout and "tuned 5 of 5" in result.stdout
    results = json.loads((recase_run / "eval.json").read_text())
    assert results["metrics"]["tuned"]["exact_match"]["value"] == 1.0
    assert results["invented_names"]["answers"] == {"tuned": 0}

    free = cli("eval", recase_run, "--data", data, "--no-base", "--no-forgetting", "--no-copy-constraint")
    assert free.returncode == 0, free.stderr
    results = json.loads((recase_run / "eval.json").read_text())
    assert results["metrics"]["tuned"]["exact_match"]["value"] == 0.0
    assert results["invented_names"]["answers"] == {"tuned": 5}
    assert results["samples"][0]["answers"]["tuned"]["invented_names"] == ["Olenara"]
    assert "invented names" in free.stdout and "#0 Olenara" in free.stdout
    report = (recase_run / "report.html").read_text()
    assert "Invented names" in report and "line 1: Olenara" in report


def test_the_token_texts_do_not_keep_a_tokenizer_alive(tokenizer_dir):
    import gc
    import weakref

    from tunelab.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    rule = CopyRule(tokenizer, frozenset({TEXT_ANSWER}), frozenset({tokenizer.eos_token_id}), ())
    token = tokenizer.encode(" Kwame")[0]
    assert rule.texts[token] == tokenizer.decode([token])  # the tokenizer's texts are cached
    gone = weakref.ref(tokenizer)
    del tokenizer, rule
    gc.collect()
    assert gone() is None
