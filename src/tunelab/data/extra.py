"""`--data-extra FILE`: rows trained besides the data file's training split, never held out.

The file is any data file the loader reads (a run's corrections.jsonl, more pairs). Its rows are
not split: all of them train, none is tested, and they take no part in the duplicate search.

Corrections are made on held-out rows (`tunelab data review --run RUN` reviews the wrong answers
of the held-out split), so trained as they are, with the same data and split, they would put the
answer of a held-out question into training, and the next eval would score recall of it. Three
ways out were weighed:
- drop the extra rows that share a prompt with a held-out row: no leak, but then corrections of
  a run's own held-out rows never train, which is what they are for;
- refuse the run: the same, as an error;
- take the held-out row out of the held-out split and let the extra row train in its place
  (the row's original answer does not train either: the user replaced it, and a reference marked
  wrong must not teach).
tunelab does the last: the held-out split then holds only rows no training saw, and each moved
row is a warning (W_EXTRA_HELD_OUT) naming both lines. Its cost is said with it: the held-out
split loses rows the earlier model got wrong, so the new run's eval is not comparable with the
earlier run's; compare them on the same rows (`tunelab eval OLD_RUN --data NEW_RUN/test.jsonl`).
A row "shares a prompt" when its messages before the last assistant turn, system included, are
equal: what a correction copies from its held-out row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunelab.data.load import MAX_LISTED_PROBLEMS, Example, Problem, iter_examples
from tunelab.errors import UserError


def prompt_hash(example: Example) -> int:
    """A 64-bit hash of what the model is asked (0 for a raw-text row, which asks nothing)."""
    if example.is_raw:
        return 0
    content = json.dumps(example.prompt_messages(), sort_keys=True, ensure_ascii=False)
    return int(hashlib.sha256(content.encode()).hexdigest()[:16], 16)


def read_extra(path: Path) -> list[Example]:
    """Every row of the extra file, its shape detected row by row; one UserError listing the bad
    lines of the file, as for the data file. An empty file is no rows (every correction skipped)."""
    path = Path(path)
    examples, problems = [], []
    for item in iter_examples(path):
        if isinstance(item, Problem):
            problems.append(f"--data-extra {item.format(path)}")
        else:
            examples.append(item)
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        raise UserError(problems[0], problems[1:MAX_LISTED_PROBLEMS] + ([f"... and {more} more"] if more > 0 else []))
    return examples


def replaced_held_out(extra: list[Example], held_out: dict[int, list[int]]) -> list[tuple[int, int]]:
    """(held-out line, extra line) for each held-out row whose prompt an extra row shares;
    `held_out` maps a prompt hash to the held-out lines with that prompt. Each held-out line once,
    with the first extra row that shares its prompt, in held-out order."""
    found: dict[int, int] = {}
    for example in extra:
        for line in held_out.get(prompt_hash(example), ()) if not example.is_raw else ():
            found.setdefault(line, example.line)
    return sorted(found.items())
