"""Synthetic restaurant-booking extraction dataset for ``tunelab demo``.

Each row asks the model to turn one free-form booking sentence into a fixed
JSON object.  The fields are easy to spot but must be *normalised* (number
words, "me and three friends", "quarter to nine pm", "on Fri"), which a tiny
base model gets wrong and a short fine-tune learns reliably.
"""

from __future__ import annotations

import json
import random
import re

INSTRUCTION = "Extract the booking as JSON with keys name, guests, day, time."

WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six",
                "seven", "eight", "nine", "ten", "eleven", "twelve"]

FIRST_NAMES = [
    "Priya", "Tom", "Ana", "Liam", "Mei", "Omar", "Sofia", "Kenji", "Amara", "Lukas",
    "Fatima", "Diego", "Ingrid", "Raj", "Chloe", "Mateo", "Aisha", "Noah", "Yuki", "Elena",
    "Kwame", "Hannah", "Arjun", "Zoe", "Ivan", "Leila", "Samuel", "Nadia", "Finn", "Lucia",
    "Tariq", "Emma", "Hiroshi", "Grace", "Pablo", "Anika", "Oscar", "Mariam", "Jonas", "Rosa",
    "Chen", "Isla", "Dmitri", "Ama", "Felix", "Sara", "Rahul", "Nora", "Emeka", "Clara",
    "Mohammed", "Julia", "Tenzin", "Ruth", "Andrei", "Maya", "Kofi", "Ines", "Ben", "Leah",
    "Astrid", "Bilal", "Carmen", "Darius", "Esther", "Farid", "Gemma", "Hamza", "Ilse", "Joaquin",
    "Katya", "Lorenzo", "Mirela", "Nikhil", "Olga", "Pedro", "Quentin", "Rania", "Stellan", "Thandiwe",
]
SURNAMES = [
    "Patel", "Becker", "Souza", "Murphy", "Wong", "Haddad", "Rossi", "Tanaka", "Okafor", "Schmidt",
    "Khan", "Garcia", "Larsen", "Sharma", "Dubois", "Fernandez", "Bello", "Smith", "Sato", "Petrova",
    "Mensah", "Cohen", "Iyer", "Nguyen", "Ivanov", "Rahimi", "Adeyemi", "Novak", "Walsh", "Moreno",
    "Aziz", "Johansson", "Yamamoto", "Kim", "Ortiz", "Kowalski", "Eriksen", "Hassan", "Weber", "Silva",
    "Li", "Campbell", "Popescu", "Asante", "Fischer", "Costa", "Gupta", "Byrne", "Eze", "Martin",
    "Ali", "Lopez", "Dorji", "Taylor", "Horvat", "Reyes", "Boateng", "Almeida", "Clarke", "Stein",
    "Andersson", "Bianchi", "Chowdhury", "Dimitrov", "Engel", "Fujita", "Grant", "Hoang", "Ibrahim", "Jensen",
    "Kaur", "Lindqvist", "Mwangi", "Nakamura", "Oyelaran", "Pereira", "Quinn", "Rasmussen", "Szabo", "Toure",
]
NAME_POOLS = 10
"""Each first name and surname belongs to one pool (by its position in its list), and a name
joins a first name and a surname of the same pool; each row's metadata names its pool, so that
a split by it (`--split-by metadata.name_pool`, as `tunelab demo` does) holds out names whose
parts training never saw."""

# (minimum guests, template).  The minimum exists because phrasings like
# "party of {num}" or "{company}" read wrongly for a party of one.
TEMPLATES = [
    (1, "Hi, this is {name}, could I get a table for {for_n} {day} at {time}?"),
    (1, "Table for {for_n}, {day}, {time}, under the name {name}."),
    (1, "Please reserve for {for_n} {day} around {time} - the name is {name}."),
    (1, "{name} here. I'd like to book a table for {for_n} {day} at {time}."),
    (1, "I need a table {day} at {time} for {for_n}. My name is {name}."),
    (1, "Hello, do you have space for {for_n} {day} at {time}? It's {name}."),
    (1, "Could {name} get a reservation for {for_n} at {time} {day}?"),
    (1, "At {time} {day}, table for {for_n}, please. Name: {name}."),
    (1, "{day} at {time}: table for {for_n}, name {name}."),
    (1, "Hey! {name} wants to book for {for_n} {day} at {time}, if possible."),
    (1, "Put me down for {for_n} at {time} {day}, please - {name}."),
    (1, "I'm calling to reserve a table for {for_n} under {name}, {day} at {time}."),
    (1, "Is a table for {for_n} available {day} at {time}? Booking name {name}."),
    (1, "Good evening, I'd like a reservation {day} at {time} for {for_n}, name of {name}."),
    (1, "Name: {name}. Guests: {num}. When: {day} at {time}."),
    (1, "{name} would like to reserve for {for_n} {day}, ideally around {time}."),
    (1, "Any chance of a table for {for_n} {day} at {time}? Please put it under {name}."),
    (1, "Book me in {day} at {time} for {for_n} - name's {name}."),
    (2, "Booking request: {name}, party of {num}, {day} at {time}."),
    (2, "Reservation for {name}, {num} guests, {day} at {time}."),
    (2, "We're a group of {num} and would love a table {day} at {time}. Name is {name}."),
    (2, "{name}, {num} people, {day}, {time}."),
    (2, "We'd like to book {day} at {time}. There will be {num} of us and the name is {name}."),
    (2, "Can you fit {company} in {day} at {time}? Name: {name}."),
    (2, "{company} would like to come {day} at {time} - could you hold a table under {name}?"),
    (2, "My name's {name} and it'll be {company} {day}. Could we come at {time}?"),
    (2, "Could you book a table at {time} {day}? It's for {company}, name {name}."),
]

# Distractors the model must learn to ignore; deliberately free of numbers so
# they can never contradict the guest count.
NOISE = [
    "It's for a birthday.", "We're celebrating an anniversary.", "A window seat if possible.",
    "Someone in our party has a nut allergy.", "Outdoor seating would be lovely.",
    "We might be a few minutes late.", "Gluten-free options would be great.",
    "Thanks so much!", "Is there parking nearby?", "A quiet corner, please.",
    "We'll need a high chair.", "Cheers!",
]

GUEST_WEIGHTS = [3, 10, 8, 10, 6, 6, 3, 3, 2, 2, 1, 1]  # guests 1..12; small parties dominate
HOUR_WEIGHTS = {8: 1, 9: 1, 10: 2, 11: 3, 12: 5, 13: 5, 14: 2, 15: 1, 16: 1,
                17: 3, 18: 5, 19: 6, 20: 6, 21: 4, 22: 2}


def _period(h: int, words: bool) -> str:
    if h < 12:
        return "in the morning" if words else "am"
    if h < 17:
        return "in the afternoon" if words else "pm"
    return "in the evening" if words else "pm"


def time_phrases(h: int, m: int) -> list[str]:
    """Every way the generator may say the 24h time h:m (m in 0/15/30/45)."""
    h12 = h % 12 or 12
    out = [f"{h12}:{m:02d}pm" if h >= 12 else f"{h12}:{m:02d}am", f"{h12}:{m:02d} {_period(h, False)}"]
    # Bare digits only where a 24h reading is unambiguous to a human too.
    if h >= 12:
        out.append(f"{h}:{m:02d}")
    elif h < 10:
        out.append(f"{h:02d}:{m:02d}")
    if h == 12 and m == 0:
        return out + ["12pm", "12 pm", "noon", "midday", "12 noon"]
    w = NUMBER_WORDS[h12]
    minute_word = {15: "fifteen", 30: "thirty", 45: "forty-five"}
    for words in (True, False):
        p = _period(h, words)
        if m == 0:
            out += [f"{h12}{p}" if not words else f"{w} o'clock {p}", f"{w} {p}"]
        else:
            out.append(f"{w} {minute_word[m]} {p}")
            if m == 30:
                out.append(f"half past {w} {p}")
            elif m == 15:
                out.append(f"quarter past {w} {p}")
            elif words or h != 11:  # "quarter to twelve am" would suggest midnight
                out.append(f"quarter to {NUMBER_WORDS[h12 % 12 + 1]} {p}")
    return out


def to_24h(phrase: str) -> str:
    """Normalise a time phrase ("quarter to nine pm", "7:30 pm", "noon") to "HH:MM"."""
    s = phrase.lower().strip()
    s = re.sub(r"^(at|around)\s+", "", s)
    if s in ("noon", "midday", "12 noon"):
        return "12:00"
    match = re.fullmatch(r"(\d{1,2})(?::(\d{2}))?\s*(am|pm)?", s)
    if match:
        h, m = int(match[1]), int(match[2] or 0)
        if match[3] is None and match[2] is None:
            raise ValueError(f"ambiguous time: {phrase!r}")
        if match[3]:
            h = h % 12 + (12 if match[3] == "pm" else 0)
        return f"{h:02d}:{m:02d}"
    match = re.fullmatch(r"(.+?)\s+(am|pm|in the morning|in the afternoon|in the evening)", s)
    if not match:
        raise ValueError(f"unrecognised time: {phrase!r}")
    body, pm = match[1].replace(" o'clock", ""), match[2] != "am" and match[2] != "in the morning"
    parts = body.split()
    minute = 0
    if parts[0] in ("half", "quarter") and parts[1] in ("past", "to"):
        h12 = NUMBER_WORDS.index(parts[2])
        minute = 30 if parts[0] == "half" else 15
        if parts[1] == "to":
            # The period describes the resulting time, so step back an hour first.
            h12, minute = (h12 - 2) % 12 + 1, 45
    else:
        h12 = NUMBER_WORDS.index(parts[0])
        if len(parts) > 1:
            minute = {"fifteen": 15, "thirty": 30, "forty-five": 45}[parts[1]]
    h = h12 % 12 + (12 if pm else 0)
    return f"{h:02d}:{minute:02d}"


def words_to_int(word: str) -> int:
    """"four" -> 4, "4" -> 4."""
    word = word.lower().strip()
    return int(word) if word.isdigit() else NUMBER_WORDS.index(word)


def _num(n: int, rng: random.Random) -> str:
    return rng.choice([str(n), NUMBER_WORDS[n]])


def _for_n(n: int, rng: random.Random) -> str:
    """A guest count that reads naturally after "for"."""
    if n == 1:
        return rng.choice(["one", "one person", "1 person", "just one"])
    options = [_num(n, rng), f"{_num(n, rng)} people", f"{_num(n, rng)} guests", f"a party of {_num(n, rng)}"]
    if n <= 6:
        options.append(f"the {NUMBER_WORDS[n]} of us")
    return rng.choice(options)


def _company(n: int, rng: random.Random) -> str:
    """A guest count the model must add up: the speaker plus n - 1 others."""
    if n == 2 and rng.random() < 0.5:
        return rng.choice(["me and a friend", "my partner and me", "me and my partner"])
    if n == 2:
        return f"me and {_num(1, rng)} friend"
    return f"me and {_num(n - 1, rng)} {rng.choice(['friends', 'colleagues'])}"


def _day(day: str, rng: random.Random) -> str:
    cap = day.capitalize()
    return rng.choice([f"on {cap}", f"on {day}", f"this {cap}", f"next {cap}", f"on {cap[:3]}", cap])


def make_examples(n: int = 1200, seed: int = 0) -> list[dict]:
    """Deterministic: same (n, seed) -> identical list, on any machine/Python version. Each row
    is {"prompt", "completion", "metadata": {"name_pool"}} (see NAME_POOLS)."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()  # membership only; never iterated, so order stays deterministic
    while len(rows) < n:
        pool = rng.randrange(NAME_POOLS)
        name = f"{rng.choice(FIRST_NAMES[pool::NAME_POOLS])} {rng.choice(SURNAMES[pool::NAME_POOLS])}"
        guests = rng.choices(range(1, 13), weights=GUEST_WEIGHTS)[0]
        day = rng.choice(WEEKDAYS)
        hour = rng.choices(list(HOUR_WEIGHTS), weights=list(HOUR_WEIGHTS.values()))[0]
        minute = rng.choice([0, 15, 30, 45])
        template = rng.choice([t for lo, t in TEMPLATES if guests >= lo])
        sentence = template.format(
            name=name, day=_day(day, rng), time=rng.choice(time_phrases(hour, minute)),
            for_n=_for_n(guests, rng), num=_num(guests, rng), company=_company(guests, rng),
        )
        sentence = sentence[0].upper() + sentence[1:]
        if rng.random() < 0.3:
            sentence += " " + rng.choice(NOISE)
        prompt = f"{INSTRUCTION}\nRequest: {sentence}"
        if prompt in seen:
            continue
        seen.add(prompt)
        fields = {"name": name, "guests": guests, "day": day, "time": f"{hour:02d}:{minute:02d}"}
        rows.append({"prompt": prompt, "completion": json.dumps(fields, separators=(", ", ": ")),
                     "metadata": {"name_pool": pool}})
    return rows


def describe() -> str:
    return (
        "Restaurant booking extraction: each prompt is a one-sentence booking request "
        "and the answer is a compact JSON object with keys name, guests, day and time. "
        "The values must be normalised - guest counts written as words or as "
        "'me and three friends' become integers, days like 'on Fri' or 'next Tuesday' "
        "become lowercase weekday names, and times like 'quarter to nine pm' or 'noon' "
        "become 24-hour HH:MM. Small base models tend to answer with prose, wrong keys "
        "or un-normalised values; a short fine-tune teaches the exact format."
    )
