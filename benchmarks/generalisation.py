"""Generalisation: does a fine-tune copy names it has never seen, or recite the ones it trained on?

    PYTHONPATH=src python benchmarks/generalisation.py --out runs/gen --label defaults
    PYTHONPATH=src python benchmarks/generalisation.py --out runs/gen --label lr3e-3 --set lr=3e-3 --tasks people
    PYTHONPATH=src python benchmarks/generalisation.py --out runs/gen --table      # every result so far
    PYTHONPATH=src python benchmarks/generalisation.py --out runs/gen-data --write-only

Four tasks of this script's own making, each a training file (`--train-rows`, 1000 by default)
and a test file in tunelab's prompt/completion shape:

- `people`: a sentence about a person, a city and a date -> {"person", "city", "date"} (the
  date normalised to YYYY-MM-DD);
- `orders`: an order, an email or a support ticket -> {"customer", "product", "quantity", "city"}
  (the quantity written as a word or digits, an integer in the answer);
- `rewrite`: a terse note ("mtg Okafor, Cyrus / Halifax / fri re budget") -> one formal sentence
  that carries the note's names and place verbatim, in a fixed order;
- `notes`: an informal call note, its name mostly in lower case ("kwame oyelaran called re
  budget, call back 3pm") -> one sentence in a fixed style whose name must come out re-cased
  ("Kwame Oyelaran called about the budget and asked to be called back at 3 pm."): the plain-text
  side of the copy constraint (names kept words of the input) is what it measures.

Names, surnames, cities and product brands come from large pools (syllable-built names and
real-looking ones), dealt into entity groups; every row draws its entities from one group and
names it in `metadata.group` (so `--split-by metadata.group` makes a group-held-out split), and
the test file's novel rows come from groups that no training row uses: none of their entity words
occurs anywhere in the training file. The test file also holds `--seen-rows` new sentences about
training entities, the control: a row counts as novel when one of its answer values (JSON string
values, or the entities a rewrite must carry) occurs in no training answer, seen otherwise.

For each task the runner trains with tunelab's Python API (`tunelab.train.loop.train`, TrainConfig
defaults, overridden by `--set key=value`), answers the test prompts greedily through the run
(`Run.generate_batch`, the path of `tunelab generate` and `tunelab eval`), and prints exact match
(`tunelab.evaluate.metrics.exact_match`; for `notes`, the answer equal to the reference as written,
since its point is the casing that exact match ignores) on novel and seen rows, training wall
time and the settings.
Each result is appended to OUT/results.jsonl (misses included); `--table` prints them all.
Answers are decoded as `tunelab generate` decodes them, with the copy constraint on the fields
the run's training data copies, or on the names of plain-text answers where it copies those
(tunelab/decoding/copying.py); `--compare-copy-constraint` answers the test rows a second time
without it and records both, with each one's generation time; `--timing-rounds N` answers N
more times, a batch of TIMING_BATCH at a time with and without the constraint back to back, and
records the median of the batches' time ratios with the load average before and after (on a busy
machine a decode-time cost is only worth a ratio taken so); `--no-train` answers with the run an
earlier invocation trained, to measure a change to decoding alone:

    PYTHONPATH=src python benchmarks/generalisation.py --tasks notes --test-rows 100 --seen-rows 25 \
        --compare-copy-constraint --timing-rounds 2 --no-train --out runs/gen-notes

Answers are computed in the run's precision (bf16
autocast where the CPU or GPU computes bf16 natively, as in training); `--compare-precision`
answers them a second time in fp32 and records both, with each one's generation time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TASKS = ("people", "orders", "rewrite", "notes")
GROUPS = 60
"""Entity groups; the last TEST_GROUPS of them are the test file's novel rows, never trained on."""
TEST_GROUPS = 12
TIMING_BATCH = 16
"""Prompts answered at a time by --timing-rounds (generate_batch's own batch size)."""

# ---------------------------------------------------------------------------------------------
# Entity pools

REAL_FIRST = """Cyrus Priya Tomas Ana Liam Mei Omar Sofia Kenji Amara Lukas Fatima Diego Ingrid Raj
Chloe Mateo Aisha Noah Yuki Elena Kwame Hannah Arjun Zoe Ivan Leila Samuel Nadia Finn Lucia Tariq Emma
Hiroshi Grace Pablo Anika Oscar Mariam Jonas Rosa Isla Dmitri Felix Sara Rahul Nora Emeka Clara
Julia Tenzin Ruth Andrei Maya Kofi Ines Leah Beatriz Caspar Dagny Eamon Farida Gideon Hedda Idris
Jarrah Keziah Lorcan Marisol Niamh Odile Pavel Quentin Rosalind Soren Thandiwe Ulrich Valentina
Wendell Xiomara Yannick Zainab Agnieszka Bruno Cormac Delphine Esme Florian Greta Hamid Ilse Joaquin
Katya Lionel Mirela Nikolai Orla Petra Rufus Selma Teodor Una Viggo Wilhelmina Yusuf Zora Anselm
Birgit Cosimo Dolores Evander Fenella Gunnar Honora Ignatius Jolene Kasimir Ludmila Magnus Nerys
Osric Philippa Radomir Sunniva Thaddeus Ulla Vasco Winifred Xavier Ysolde Zeno""".split()
REAL_SURNAMES = """Patel Becker Souza Murphy Wong Haddad Rossi Tanaka Okafor Schmidt Khan Garcia Larsen
Sharma Dubois Fernandez Bello Sato Petrova Mensah Cohen Iyer Nguyen Ivanov Rahimi Adeyemi Novak Walsh
Moreno Aziz Johansson Yamamoto Ortiz Kowalski Eriksen Hassan Weber Silva Campbell Popescu Asante
Fischer Costa Gupta Byrne Eze Lopez Dorji Horvat Reyes Boateng Almeida Clarke Stein Abernathy
Blackwood Castellanos Drummond Eastwick Fairbanks Galbraith Holloway Iversen Jankowski Kirkpatrick
Lindqvist Marchetti Nakamura Oyelaran Pemberton Quarshie Radcliffe Strickland Thorvaldsen Underhill
Vasquez Whitcombe Yardley Zielinski Ashdown Brannigan Cardenas Delacroix Ellingham Fitzgerald
Gallagher Hargreaves Ibarra Jessop Kavanagh Lisowski Montague Nightingale Oduya Prendergast Quillan
Rutherford Sandoval Trevelyan Urquhart Villanueva Wainwright Yeboah Zamora Achterberg Bexley
Crowther Dunleavy Endicott Fothergill Grimshaw Hatherley""".split()
REAL_CITIES = """Halifax Lisbon Porto Bergen Tromso Tampere Turku Gdansk Krakow Brno Graz Linz Lyon
Nantes Bordeaux Seville Valencia Bilbao Genoa Turin Bologna Trieste Zagreb Split Ljubljana Sarajevo
Varna Plovdiv Cluj Timisoara Debrecen Szeged Kaunas Tartu Riga Aarhus Odense Malmo Uppsala Leiden
Utrecht Ghent Bruges Liege Basel Lucerne Innsbruck Salzburg Dresden Leipzig Bremen Kiel Rostock
Freiburg Regensburg Nagoya Sendai Kobe Fukuoka Busan Daegu Hue Cebu Davao Medan Surabaya Chennai
Pune Jaipur Kochi Mysore Lahore Quetta Shiraz Tabriz Izmir Bursa Haifa Aqaba Tangier Fez Oran Sfax
Kumasi Tamale Enugu Mombasa Kisumu Arusha Durban Gqeberha Windhoek Recife Belem Curitiba Cusco
Arequipa Rosario Mendoza Valparaiso Medellin Cali Oaxaca Puebla Merida Tampico Winnipeg Regina
Saskatoon Moncton Fresno Tulsa Boise Spokane Tacoma Eugene Duluth Akron Dayton Savannah Mobile
Hobart Darwin Cairns Geelong Dunedin Nelson Napier""".split()
CITY_PREFIXES = ["Port", "New", "Lake", "Fort", "Saint"]
CITY_SUFFIXES = ["ford", "haven", "by", "mouth", "stead", "wick", "bury", "dale", "holm", "field"]
ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "br", "dr", "gr", "kr", "tr", "st", "th", "sh", "ch", "bl", "fl", "y", ""]
VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ia"]
CODAS = ["", "", "", "", "", "n", "r", "l", "s", "th", "m", "nd", "x"]


def syllable_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
    return word.capitalize()


def synthetic_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """`count` new syllable-built words, none equal to a word in `taken` (which grows)."""
    words = []
    while len(words) < count:
        word = syllable_word(rng, rng.choice([2, 2, 3]))
        if 4 <= len(word) <= 9 and word.lower() not in taken:
            taken.add(word.lower())
            words.append(word)
    return words


def real_words(words: list[str], taken: set[str]) -> list[str]:
    kept = [w for w in dict.fromkeys(words) if w.lower() not in taken]
    taken.update(w.lower() for w in kept)
    return kept


def entity_groups(seed: int) -> list[dict[str, list[str]]]:
    """GROUPS groups of first names, surnames, cities and product brands; no word in two groups
    or two roles, so a test group's entities occur nowhere in a training row."""
    rng = random.Random(f"pools-{seed}")
    taken = {w.lower() for w in TEMPLATE_WORDS.split()}
    pools = {
        "first": real_words(REAL_FIRST, taken) + synthetic_words(rng, 540, taken),
        "surname": real_words(REAL_SURNAMES, taken) + synthetic_words(rng, 540, taken),
        "city": real_words(REAL_CITIES, taken) + [
            # a few two-word cities; the prefix is shared, the distinctive word never is
            f"{rng.choice(CITY_PREFIXES)} {w}" if i % 4 == 0 else f"{w}{rng.choice(CITY_SUFFIXES)}" if i % 4 == 1 else w
            for i, w in enumerate(synthetic_words(rng, 300, taken))],
        "brand": synthetic_words(rng, 420, taken),
    }
    groups = [{kind: [] for kind in pools} for _ in range(GROUPS)]
    for kind, words in pools.items():
        rng.shuffle(words)
        for i, word in enumerate(words):
            groups[i % GROUPS][kind].append(word)
    return groups


# ---------------------------------------------------------------------------------------------
# Tasks: each turns a group (and a random source) into one (prompt, answer, entities) row

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
ITEMS = ["kettle", "desk lamp", "office chair", "backpack", "water bottle", "toaster", "blender",
         "headset", "keyboard", "monitor stand", "rain jacket", "yoga mat", "coffee grinder", "table fan",
         "bike helmet", "phone case", "notebook set", "travel mug"]
TOPICS = [("budget", "the budget"), ("q3 plan", "the third-quarter plan"), ("new contract", "the new contract"),
          ("hiring", "the hiring plan"), ("launch", "the product launch"), ("audit", "the annual audit"),
          ("office move", "the office move"), ("pricing", "the new pricing"), ("training", "the staff training"),
          ("roadmap", "the product roadmap"), ("merger", "the merger"), ("site visit", "the site visit")]

PEOPLE_INSTRUCTION = "Extract the person, city and date as JSON with keys person, city, date (YYYY-MM-DD)."
PEOPLE_TEMPLATES = [
    "{person} flew into {city} on {date}.",
    "On {date}, {person} gave a talk in {city}.",
    "Arrival: {person} ({city}), {date}.",
    "{city} welcomed {person} on {date} for the annual conference.",
    "We expect {person} to reach {city} by {date}.",
    "{person} signed the lease for a flat in {city} on {date}.",
    "Reminder - {person} is speaking in {city} on {date}, please book the hall.",
    "The museum in {city} hosted {person} on {date}.",
    "{date}: {person} opened the new branch in {city}.",
    "Visitor log: {person}, from {city}, checked in on {date}.",
    "It was on {date} that {person} first arrived in {city}.",
    "Please note that {person} will be in {city} on {date}.",
    "{person} ({city}) has an appointment on {date}.",
    "Can you confirm that {person} travels to {city} on {date}?",
]
PEOPLE_NOISE = ["The weather was mild.", "Coffee will be served.", "Parking is limited.",
                "Bring your badge.", "The train was late again.", "Lunch is included."]


def date_phrase(rng: random.Random, year: int, month: int, day: int) -> str:
    name = MONTHS[month - 1]
    ordinal = f"{day}{'th' if 11 <= day <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th')}"
    return rng.choice([f"{name} {day}, {year}", f"{day} {name} {year}", f"{year}-{month:02d}-{day:02d}",
                       f"the {ordinal} of {name} {year}", f"{name[:3]} {day} {year}", f"{day} {name[:3]}. {year}"])


def draw(rng: random.Random, group: dict[str, list[str]]) -> dict[str, str]:
    """One row's entities: a first name, a surname, a city and a product brand of `group`, and
    a product kind."""
    return {"item": rng.choice(ITEMS), **{kind: rng.choice(words) for kind, words in group.items()}}


def make_people(rng: random.Random, parts: dict[str, str]) -> tuple[str, str, list[str]]:
    person, city = f"{parts['first']} {parts['surname']}", parts["city"]
    year, month, day = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
    sentence = rng.choice(PEOPLE_TEMPLATES).format(person=person, city=city,
                                                   date=date_phrase(rng, year, month, day))
    if rng.random() < 0.3:
        sentence += " " + rng.choice(PEOPLE_NOISE)
    answer = {"person": person, "city": city, "date": f"{year}-{month:02d}-{day:02d}"}
    return f"{PEOPLE_INSTRUCTION}\nText: {sentence}", json.dumps(answer), [person, city]


ORDERS_INSTRUCTION = "Extract the order as JSON with keys customer, product, quantity (a number), city."
ORDERS_TEMPLATES = [
    "Hi, this is {customer} in {city}. Please send {qty} x {product}.",
    "Order from {customer} ({city}): {product}, quantity {qty}.",
    "Ticket #{ticket}: {customer} from {city} says the {qty} units of {product} have not arrived.",
    "{customer} would like to order {qty} of the {product}, delivered to {city}.",
    "Ship to {city}. Customer: {customer}. Item: {product}. Qty: {qty}.",
    "Hello, I ordered {qty} x {product} last week and I live in {city}. Regards, {customer}",
    "Support request - {customer}, {city}: one of my {qty} x {product} is broken, can you replace it?",
    "Please add {qty} x {product} to the standing order for {customer} in {city}.",
    "{product} x {qty} for {customer}, {city} branch.",
    "Dear team, could you deliver {qty} x {product} to our {city} office? Thanks, {customer}",
    "New order: customer {customer}, {qty} x {product}, deliver to {city}.",
    "Return request from {customer} ({city}) for {qty} x {product}.",
]


def make_orders(rng: random.Random, parts: dict[str, str]) -> tuple[str, str, list[str]]:
    customer, city = f"{parts['first']} {parts['surname']}", parts["city"]
    product = f"{parts['brand']} {parts['item']}"
    quantity = rng.randint(1, 12)
    qty = rng.choice([str(quantity), NUMBER_WORDS[quantity]])
    text = rng.choice(ORDERS_TEMPLATES).format(customer=customer, city=city, product=product, qty=qty,
                                               ticket=rng.randint(1000, 9999))
    answer = {"customer": customer, "product": product, "quantity": quantity, "city": city}
    return f"{ORDERS_INSTRUCTION}\nMessage: {text}", json.dumps(answer), [customer, product, city]


REWRITE_INSTRUCTION = "Rewrite the note as one formal sentence."
REWRITE_TEMPLATES = [
    "mtg {first} {last} / {city} / {day} re {topic}",
    "{city}, {day}: meet {first} {last} ({topic})",
    "{last}, {first} - {topic} - {city} - {day}",
    "{day} {city} w/ {first} {last}, topic: {topic}",
    "meeting: {first} {last}; where: {city}; when: {day}; about: {topic}",
    "{topic} w/ {last} ({first}) in {city}, {day}",
    "see {first} {last} {day} in {city} abt {topic}",
]


def make_rewrite(rng: random.Random, parts: dict[str, str]) -> tuple[str, str, list[str]]:
    first, last, city = parts["first"], parts["surname"], parts["city"]
    day = rng.choice(WEEKDAYS)
    short, formal = rng.choice(TOPICS)
    note = rng.choice(REWRITE_TEMPLATES).format(first=first, last=last, city=city, topic=short,
                                                day=rng.choice([day, day[:3].lower(), day.lower()]))
    answer = f"On {day}, {first} {last} will meet us in {city} to discuss {formal}."
    return f"{REWRITE_INSTRUCTION}\nNote: {note}", answer, [f"{first} {last}", city]


NOTES_INSTRUCTION = "Write the call note up in the house style."
NOTES_TEMPLATES = [
    "{first} {last} called re {topic}, call back {time}",
    "call from {first} {last} abt {topic} - wants callback {time}",
    "{last}, {first} rang about {topic}; pls ring back {time}",
    "missed call: {first} {last} ({topic}) cb {time}",
    "{first} {last} phoned, topic {topic}, back to them {time}",
    "vm from {first} {last} re {topic}. callback {time}",
    "{first} {last} on the phone about {topic}, said ring {time}",
]


def make_notes(rng: random.Random, parts: dict[str, str]) -> tuple[str, str, list[str]]:
    """A call note, its name mostly in lower case (sometimes as written, sometimes in capitals),
    -> one sentence in a fixed style with the name re-cased and the hour copied."""
    first, last = parts["first"], parts["surname"]
    written = rng.choice([str.lower, str.lower, str.lower, str, str.upper])
    short, formal = rng.choice(TOPICS)
    hour = rng.randint(1, 11)
    time = rng.choice([f"{hour}pm", f"at {hour} pm", f"{hour}:00", f"after {hour}pm"])
    note = rng.choice(NOTES_TEMPLATES).format(first=written(first), last=written(last), topic=short, time=time)
    answer = f"{first} {last} called about {formal} and asked to be called back at {hour} pm."
    return f"{NOTES_INSTRUCTION}\nNote: {note}", answer, [f"{first} {last}"]


MAKERS = {"people": make_people, "orders": make_orders, "rewrite": make_rewrite, "notes": make_notes}
TEMPLATE_WORDS = " ".join([PEOPLE_INSTRUCTION, *PEOPLE_TEMPLATES, *PEOPLE_NOISE, ORDERS_INSTRUCTION, *ORDERS_TEMPLATES,
                           REWRITE_INSTRUCTION, *REWRITE_TEMPLATES, *ITEMS, *MONTHS, *WEEKDAYS, *NUMBER_WORDS,
                           *CITY_PREFIXES, *(w for pair in TOPICS for w in pair)]).replace(",", " ").replace(".", " ")
"""Words of the tasks' own wording: no entity may be one of them (a test name that is also a
template word would occur in training). The `notes` task's wording is left out, so the entity
pools (and the other tasks' rows) stay those measured before it; tests/test_generalisation_bench.py
checks that no entity is a word of it."""


def make_rows(task: str, sources: list[tuple[int, dict[str, list[str]]]], n: int, rng: random.Random,
              seen_prompts: set[str]) -> tuple[list[dict], list[dict[str, str]]]:
    """`n` rows, each from a (group number, entity pools) source picked at random, and the
    entities each row drew."""
    rows, drawn = [], []
    while len(rows) < n:
        g, pools = rng.choice(sources)
        parts = draw(rng, pools)
        prompt, answer, entities = MAKERS[task](rng, parts)
        if prompt in seen_prompts:
            continue
        seen_prompts.add(prompt)
        rows.append({"prompt": prompt, "completion": answer,
                     "metadata": {"group": f"g{g:02d}", "entities": entities}})
        drawn.append(parts)
    return rows, drawn


def make_task(task: str, train_rows: int = 1000, test_rows: int = 150, seen_rows: int = 50,
              seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training rows, test rows). Training rows come from the first GROUPS - TEST_GROUPS
    groups; the test's first `test_rows` rows from the others (novel entities), the last
    `seen_rows` reuse the entities of training rows in new sentences. Deterministic."""
    groups = entity_groups(seed)
    rng = random.Random(f"{task}-{seed}")
    prompts: set[str] = set()
    train, drawn = make_rows(task, list(enumerate(groups))[: GROUPS - TEST_GROUPS], train_rows, rng, prompts)
    test, _ = make_rows(task, list(enumerate(groups))[GROUPS - TEST_GROUPS:], test_rows, rng, prompts)
    if seen_rows:
        trained = [(int(row["metadata"]["group"][1:]), {kind: [word] for kind, word in parts.items()})
                   for row, parts in zip(train, drawn)]
        test += make_rows(task, trained, seen_rows, rng, prompts)[0]
    return train, test


def novel_rows(train: list[dict], test: list[dict]) -> list[bool]:
    """Per test row: does one of the entities its answer must copy (names, places, products;
    not dates or counts, which every row shares) occur in no training answer?"""
    answers = [row["completion"] for row in train]
    return [any(all(entity not in a for a in answers) for entity in row["metadata"]["entities"]) for row in test]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Runner


def parse_settings(pairs: list[str]) -> dict:
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--set {pair}: expected key=value, e.g. --set lr=3e-3")
        settings[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return settings


def run_task(task: str, args, settings: dict) -> dict:
    from tunelab.config import TrainConfig
    from tunelab.device import computes_bf16
    from tunelab.evaluate.metrics import exact_match
    from tunelab.run import Run
    from tunelab.train.loop import train as train_run

    folder = Path(args.out) / args.label / task
    train_rows, test_rows = make_task(task, args.train_rows, args.test_rows, args.seen_rows, args.data_seed)
    data = write_jsonl(folder / "train.jsonl", train_rows)
    write_jsonl(folder / "test.jsonl", test_rows)
    novel = novel_rows(train_rows, test_rows)
    load = [round(os.getloadavg()[0], 2)]
    train_s = None
    if not (args.no_train and (folder / "run" / "run.json").exists()):
        config = TrainConfig.build(flags=settings, **settings)
        started = time.perf_counter()
        train_run(config, data, folder / "run", overwrite=True, quiet=True)
        train_s = time.perf_counter() - started
    run = Run(folder / "run")
    prompts = [row["prompt"] for row in test_rows]
    started = time.perf_counter()
    answers = run.generate_batch(prompts, max_new_tokens=args.max_new_tokens)
    generate_s = time.perf_counter() - started
    def same(answer: str, reference: str) -> float:
        return float(answer.strip() == reference.strip()) if task == "notes" else exact_match(answer, reference)

    correct = [same(a, row["completion"]) for a, row in zip(answers, test_rows)]
    fp32 = None
    if args.compare_precision:
        started = time.perf_counter()
        exact = Run(folder / "run", precision="fp32").generate_batch([row["prompt"] for row in test_rows],
                                                                     max_new_tokens=args.max_new_tokens)
        fp32_s = time.perf_counter() - started
        fp32 = [same(a, row["completion"]) for a, row in zip(exact, test_rows)]
    free = None
    if args.compare_copy_constraint and run.copied_fields:
        started = time.perf_counter()
        unconstrained = run.generate_batch(prompts, max_new_tokens=args.max_new_tokens, copy_constraint=False)
        free_s = time.perf_counter() - started
        free = [same(a, row["completion"]) for a, row in zip(unconstrained, test_rows)]
        # The cost in decode time: each timing round answers the prompts again a batch at a time,
        # with and without the constraint back to back (which goes first in turns), so that the
        # load of the moment weighs on both sides of each ratio.
        ratios = []
        for _ in range(args.timing_rounds):
            for start in range(0, len(prompts), TIMING_BATCH):
                seconds = {}
                for constrained in (True, False) if len(ratios) % 2 == 0 else (False, True):
                    began = time.perf_counter()
                    again = run.generate_batch(prompts[start:start + TIMING_BATCH], copy_constraint=constrained,
                                               max_new_tokens=args.max_new_tokens)
                    seconds[constrained] = time.perf_counter() - began
                    if again != (answers if constrained else unconstrained)[start:start + TIMING_BATCH]:
                        sys.exit(f"{task}: greedy answers differ from one round to the next")
                ratios.append(seconds[True] / seconds[False])
    metrics = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = max((m["step"] for m in metrics if "loss" in m), default=0)
    eval_losses = [m["eval_loss"] for m in metrics if "eval_loss" in m]

    def rate(picked: list[bool], scores: list[float] = correct) -> float | None:
        chosen = [c for c, p in zip(scores, picked) if p]
        return round(sum(chosen) / len(chosen), 4) if chosen else None

    result = {
        "label": args.label, "task": task, "settings": settings, "when": time.strftime("%Y-%m-%d %H:%M"),
        "em_novel": rate(novel), "em_seen": rate([not n for n in novel]), "em_all": rate([True] * len(novel)),
        "n_novel": sum(novel), "n_seen": len(novel) - sum(novel), "train_rows": args.train_rows,
        "steps": steps, "train_s": None if train_s is None else round(train_s, 1), "generate_s": round(generate_s, 1),
        "final_eval_loss": eval_losses[-1] if eval_losses else None,
        "copied_fields": run.copied_fields, "precision": run.precision,
        "computes": "bf16" if computes_bf16(run.precision, run.model().device) else "fp32",
        "fp32": None if fp32 is None else {
            "em_novel": rate(novel, fp32), "em_seen": rate([not n for n in novel], fp32),
            "em_all": rate([True] * len(novel), fp32), "answers_changed": sum(a != b for a, b in zip(answers, exact)),
            "generate_s": round(fp32_s, 1)},
        "without_copy_constraint": None if free is None else {
            "em_novel": rate(novel, free), "em_seen": rate([not n for n in novel], free),
            "em_all": rate([True] * len(novel), free),
            "answers_changed": sum(a != b for a, b in zip(answers, unconstrained)), "generate_s": round(free_s, 1),
            "batch_ratios": [round(x, 4) for x in ratios],
            "slowdown": round(statistics.median(ratios) - 1, 4) if ratios else None},
        "load": [*load, round(os.getloadavg()[0], 2)],
        "misses": [{"prompt": row["prompt"].split("\n", 1)[1], "reference": row["completion"], "answer": a,
                    "novel": n} for a, row, c, n in zip(answers, test_rows, correct, novel) if not c][:12],
    }
    with (Path(args.out) / "results.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(result, ensure_ascii=False) + "\n")
    return result


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(results: list[dict]) -> str:
    lines = ["| label | task | EM novel | EM seen | novel/seen rows | steps | train s | held-out loss | settings |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        settings = " ".join(f"{k}={v}" for k, v in r["settings"].items()) or "(defaults)"
        loss = "-" if r["final_eval_loss"] is None else f"{r['final_eval_loss']:.4f}"
        trained = "-" if r["train_s"] is None else f"{r['train_s']:.0f}"
        lines.append(f"| {r['label']} | {r['task']} | {percent(r['em_novel'])} | {percent(r['em_seen'])} | "
                     f"{r['n_novel']}/{r['n_seen']} | {r['steps']} | {trained} | {loss} | {settings} |")
    return "\n".join(lines)


def format_precision_table(results: list[dict]) -> str:
    """Exact match and generation time in the run's precision and in fp32, for results measured both ways."""
    compared = [r for r in results if r.get("fp32")]
    if not compared:
        return ""
    lines = ["| label | task | precision | EM novel, it / fp32 | EM seen, it / fp32 | answers changed | "
             "generation s, it / fp32 |", "|---|---|---|---|---|---|---|"]
    for r in compared:
        fp32 = r["fp32"]
        lines.append(f"| {r['label']} | {r['task']} | {r['precision']} ({r.get('computes', '?')}) | "
                     f"{percent(r['em_novel'])} / "
                     f"{percent(fp32['em_novel'])} | {percent(r['em_seen'])} / {percent(fp32['em_seen'])} | "
                     f"{fp32['answers_changed']} | {r['generate_s']:.0f} / {fp32['generate_s']:.0f} |")
    return "\n".join(lines)


def format_copy_table(results: list[dict]) -> str:
    """Exact match with and without the copy constraint, for results measured both ways."""
    compared = [r for r in results if r.get("without_copy_constraint")]
    if not compared:
        return ""
    lines = ["| label | task | copied fields | EM novel on / off | EM seen on / off | answers changed | "
             "generation s on / off | decode slower | load |", "|---|---|---|---|---|---|---|---|---|"]
    for r in compared:
        off = r["without_copy_constraint"]
        seconds = f"{r['generate_s']:.1f} / {off['generate_s']:.1f}" if "generate_s" in off else "-"
        ratios = off.get("batch_ratios")
        slowdown = f"{100 * off['slowdown']:+.1f}% ({len(ratios)} batches)" if ratios else "-"
        load = " -> ".join(str(x) for x in r.get("load", [])) or "-"
        lines.append(f"| {r['label']} | {r['task']} | {', '.join(r['copied_fields'])} | "
                     f"{percent(r['em_novel'])} / {percent(off['em_novel'])} | "
                     f"{percent(r['em_seen'])} / {percent(off['em_seen'])} | {off['answers_changed']} | {seconds} | "
                     f"{slowdown} | {load} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gen", help="folder for data, runs and results.jsonl")
    parser.add_argument("--label", default="defaults", help="name of this experiment in the results")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a TrainConfig option (repeatable): --set lr=3e-3 --set max_steps=60")
    parser.add_argument("--train-rows", type=int, default=1000)
    parser.add_argument("--test-rows", type=int, default=150, help="novel (entity-disjoint) test rows per task")
    parser.add_argument("--seen-rows", type=int, default=50, help="test rows about trained entities per task")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--compare-copy-constraint", action="store_true",
                        help="also answer without the copy constraint and record both")
    parser.add_argument("--timing-rounds", type=int, default=0, metavar="N",
                        help="with --compare-copy-constraint: answer N more times, a batch at a time with and "
                             "without the constraint back to back, and record the median decode slowdown")
    parser.add_argument("--no-train", action="store_true",
                        help="answer with the run trained before in OUT/LABEL/TASK/run where there is one "
                             "(to measure a change to decoding)")
    parser.add_argument("--compare-precision", action="store_true",
                        help="also answer in fp32 and record both (answers are in the run's precision)")
    parser.add_argument("--write-only", action="store_true", help="write each task's train/test files and stop")
    parser.add_argument("--table", action="store_true", help="print every result in OUT/results.jsonl and stop")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    out = Path(args.out)
    if args.table:
        path = out / "results.jsonl"
        if not path.exists():
            sys.exit(f"{path}: no results yet")
        results = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        print(format_table(results))
        print_comparisons(results)
        return
    if args.write_only:
        for task in tasks:
            train_rows, test_rows = make_task(task, args.train_rows, args.test_rows, args.seen_rows, args.data_seed)
            write_jsonl(out / task / "train.jsonl", train_rows)
            write_jsonl(out / task / "test.jsonl", test_rows)
            novel = sum(novel_rows(train_rows, test_rows))
            print(f"{task}: {len(train_rows)} training rows, {len(test_rows)} test rows ({novel} novel) "
                  f"in {out / task}")
        return
    settings = parse_settings(args.set)
    results = []
    for task in tasks:
        result = run_task(task, args, settings)
        results.append(result)
        print(format_table([result]).splitlines()[-1], flush=True)
        for miss in result["misses"][:3]:
            print(f"    miss ({'novel' if miss['novel'] else 'seen'}): {miss['answer']!r} != {miss['reference']!r}")
    print()
    print(format_table(results))
    print_comparisons(results)


def print_comparisons(results: list[dict]) -> None:
    for title, table in (("With and without the copy constraint", format_copy_table(results)),
                         ("In the run's precision and in fp32", format_precision_table(results))):
        if table:
            print(f"\n{title}:\n{table}")


if __name__ == "__main__":
    main()
