"""`tunelab data synth`: grow a handful of example inputs into N new ones with the teacher, drop
near duplicates (as the data check finds them), then label them as `tunelab data label` does.

Each request shows a random sample of the examples and asks for a JSON array of new inputs.
The sample depends only on the round's number and the seed, so a restarted run asks exactly
the same requests again and finds their answers in the cache.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

from tunelab.client import Failure
from tunelab.errors import UserError
from tunelab.teacher.ask import Teacher, TeacherClient, run_pool
from tunelab.teacher.label import label, prepare, read_inputs, read_shots, say_interrupted
from tunelab.teacher.schema import strip_fence

SYNTH_PER_ROUND = 10
"""New inputs asked for in one request."""
SYNTH_SHOWN = 5
"""Examples shown (a random sample of them) in one request."""
SYNTH_SYSTEM = ("You write inputs for a dataset. Given examples of inputs, you write new ones in the same style, "
                "format, language and length, on varied subjects, each clearly different from the examples and "
                "from each other. Answer with a JSON array of strings and nothing else.")


def synth_round(client: TeacherClient, examples: list[str], round_number: int, seed: int) -> list[str]:
    """New inputs from one request showing a random sample of the examples."""
    rng = random.Random(f"{seed}:{round_number}")
    shown = rng.sample(examples, min(SYNTH_SHOWN, len(examples)))
    listing = "\n\n".join(f"<example>\n{text}\n</example>" for text in shown)
    prompt = f"Examples:\n\n{listing}\n\nWrite {SYNTH_PER_ROUND} new inputs (batch {round_number})."
    messages = [{"role": "system", "content": SYNTH_SYSTEM}, {"role": "user", "content": prompt}]
    answer, _ = client.ask(messages, temperature=1.0)
    try:
        value = json.loads(strip_fence(answer))
    except json.JSONDecodeError:
        raise Failure("unparsable_inputs", f"not a JSON array: {answer[:80]!r}") from None
    if isinstance(value, dict) and len(value) == 1:  # {"inputs": [...]}, a common wrapping
        value = next(iter(value.values()))
    if not isinstance(value, list):
        raise Failure("unparsable_inputs", f"not a JSON array: {answer[:80]!r}")
    return [item.strip() for item in value if isinstance(item, str) and item.strip()]


def synthesize(client: TeacherClient, examples: list[str], n: int, seed: int) -> tuple[list[str], Counter]:
    """N new inputs, none a near duplicate of another or of an example; failed rounds by reason."""
    import numpy as np

    from tunelab.data.dedup import NearDuplicates

    near = NearDuplicates(seed=seed)
    for text in examples:
        near.add(text)
    kept: list[str] = []
    rejected: list[bool] = [False] * len(examples)
    failures: Counter = Counter()
    # A teacher that keeps repeating itself must not loop for ever.
    max_rounds = 3 * -(-n // SYNTH_PER_ROUND) + 10
    next_round = 0
    while len(kept) < n and next_round < max_rounds:
        wave = list(range(next_round, min(next_round + client.teacher.concurrency, max_rounds)))
        next_round = wave[-1] + 1
        results = run_pool(client, wave, lambda r: synth_round(client, examples, r, seed))
        for result in results:
            if isinstance(result, Failure):
                failures[result.reason] += 1
                continue
            first_new = len(rejected)
            for text in result:
                near.add(text)
                rejected.append(False)
            first, later, _ = near.pairs(skip=np.array(rejected))
            # A new text is dropped for a near duplicate that is kept, not for one dropped itself.
            partners: dict[int, list[int]] = {}
            for a, b in zip(first.tolist(), later.tolist()):
                partners.setdefault(b, []).append(a)
            for index in range(first_new, len(rejected)):
                if any(not rejected[a] for a in partners.get(index, [])):
                    rejected[index] = True
                    failures["near_duplicate"] += 1
                else:
                    kept.append(result[index - first_new])
    return kept[:n], failures


def cli_synth(examples_path: Path, n: int, teacher: Teacher, out: Path, allow_remote: bool, seed: int,
              api_key: str | None = None) -> Counter:
    """`tunelab data synth --examples FILE --n N --teacher URL --model NAME ... --out FILE`"""
    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    examples = [conversation[-1]["content"] for _, conversation in read_inputs(examples_path)]
    if not teacher.shots and Path(examples_path).suffix.lower() != ".txt":
        # Examples that carry answers also show the teacher how to answer.
        try:
            teacher.shots = read_shots(examples_path)
        except UserError:
            pass
    paths, client = prepare(teacher, out, allow_remote, api_key)
    try:
        texts, dropped = synthesize(client, examples, n, seed)
        if dropped:
            counts = ", ".join(f"{reason} {count}" for reason, count in dropped.most_common())
            print(f"tunelab: dropped while writing inputs: {counts}", file=sys.stderr)
        if len(texts) < n:
            print(f"tunelab: the teacher gave only {len(texts)} distinct new inputs of the {n} asked for; "
                  "labelling those", file=sys.stderr)
        if not texts:
            raise UserError(f"--teacher {teacher.url}: no usable new inputs came back; see the reasons above")
        inputs = [(i + 1, [{"role": "user", "content": text}]) for i, text in enumerate(texts)]
        return label(inputs, client, paths, extra={"synthesized": True})
    except KeyboardInterrupt:
        say_interrupted(client, paths)
        raise
    finally:
        client.close()
