"""`tunelab data check`, also run at the start of `tunelab train`: find what would silently
spoil a run before it starts, and show the evidence.

One streaming pass over the file keeps a few numbers per row (hashes, lengths, a MinHash
signature), never the rows themselves, so a file of millions of lines is checked in bounded
memory; a large JSONL file is read in parts, one process per core, and the parts' numbers are
joined in file order (`_Scan`): the same report, sooner. It finds:
- format errors, every one with its line and a code (see `data.Problem`), malformed preference
  pairs among them (E_PAIR_MISSING, E_PAIR_IDENTICAL, E_PAIR_ROLE, E_PAIR_ANSWER, E_PAIR_PROMPT);
- with a tokenizer and template, token-level problems: examples with nothing left to train
  after truncation, assistant turns whose end-of-turn token is not trained (the model would
  never learn to stop), a doubled BOS, prompts longer than --max-length, control tokens written
  as text in messages, and what the --truncation policy did to each example;
- exact duplicates (dropped before the split, first copy kept), near duplicates (see dedup.py;
  kept, but each group of them on one side of the split), and any near-duplicate pair that
  still straddles the train/test split;
- with --split-by, rows without that field and a field with one value; and how novel the
  held-out answers are to training (novelty.py), warning when a random split holds out answers
  that mostly repeat training values;
- the answer fields that the training rows copy verbatim from their input (see copied.py):
  decoding keeps those copies of the input unless --no-copy-constraint;
- with --data-extra, the extra file's bad rows, and the held-out rows whose prompt an extra row
  shares, which leave the held-out split (see extra.py).
Errors (codes E_...) stop training; warnings (W_...) are printed and saved.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import DataOptions
from tunelab.cores import usable_cores
from tunelab.data import load as data_mod
from tunelab.data import novelty
from tunelab.data.copied import MIN_ROWS, MIN_SHARE, CopiedField, CopyCounter, constrained, describe
from tunelab.data.extra import prompt_hash, read_extra, replaced_held_out
from tunelab.data.load import Example, Problem
from tunelab.encoding import EncodedExample, encode_one
from tunelab.errors import UserError
from tunelab.template import IGNORE
from tunelab.text import input_text, parse_json_answer

REPORT_FILE = "data_check.json"
HISTOGRAM_FILE = "length_histogram.txt"
HISTOGRAM_PLOT = "length_histogram.png"
MAX_SAVED = 10_000
"""Errors, warnings and pairs kept for the report (all are counted)."""
SHOWN = 20
"""Errors printed; for warnings and pairs, a few examples of each kind."""


@dataclass
class Report:
    path: Path
    options: DataOptions
    """A TrainConfig when training runs the check; the report keeps only the data options."""
    template: str | None = None
    """Name of the template used for the token checks (None: no tokenizer given)."""
    rows: int = 0
    shapes: Counter = field(default_factory=Counter)
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    error_counts: Counter = field(default_factory=Counter)
    warning_counts: Counter = field(default_factory=Counter)
    exact_pairs: list[tuple[int, int]] = field(default_factory=list)
    """(line kept, line of a dropped copy)."""
    exact_count: int = 0
    near_pairs: list[tuple[int, int, float]] = field(default_factory=list)
    """(line, later line, estimated similarity)."""
    near_count: int = 0
    leaked_pairs: list[tuple[int, int]] = field(default_factory=list)
    """Near-duplicate pairs with one line in train and the other in test."""
    leaked_count: int = 0
    train_count: int = 0
    test_count: int = 0
    lengths: dict = field(default_factory=dict)
    trainable: dict = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)
    histogram: list[tuple[int, int, int]] = field(default_factory=list)
    """(from, to, rows) bins of example length, in tokens with a tokenizer, else characters."""
    duplicate_lines: set[int] = field(default_factory=set)
    """Lines dropped as exact copies of an earlier line."""
    groups: dict[int, int] = field(default_factory=dict)
    """Line -> first line of its near-duplicate group, for `data.split`."""
    train_lines: list[int] = field(default_factory=list)
    """Lines of the training split, in file order (an int64 array once checked)."""
    test_lines: list[int] = field(default_factory=list)
    """Lines of the test split, in file order (an int64 array once checked)."""
    copies: CopyCounter = field(default_factory=CopyCounter)
    """Which answer fields each valid row copies from its input."""
    answer_fields: list[CopiedField] = field(default_factory=list)
    """Every string field of the training rows' JSON answers, with how often it is copied."""
    copied: list[CopiedField] = field(default_factory=list)
    """The fields the copy constraint keeps copies of the input (copied.py)."""
    group_counts: dict[str, int] = field(default_factory=dict)
    """With --split-by: the groups on each side, {"train": n, "test": n}."""
    novelty: novelty.Novelty | None = None
    """How many held-out answer values training never showed (None: no split made)."""
    extra: list[Example] | None = None
    """With --data-extra: the extra file's rows, all trained besides the split (None without it)."""
    extra_replaced: list[tuple[int, int]] = field(default_factory=list)
    """(held-out line, extra line): held-out rows that left the split for an extra row with their prompt."""
    examples: list[EncodedExample] | None = None
    """Every valid example with its encoding, in file order, when the caller keeps them
    (training, on a file that fits in memory, so that it is read and encoded once); else None."""

    @property
    def valid(self) -> int:
        return sum(self.shapes.values())

    @property
    def unit(self) -> str:
        return "tokens" if self.template else "characters"

    def error(self, problem: Problem) -> None:
        self.error_counts[problem.code] += 1
        if len(self.errors) < MAX_SAVED:
            self.errors.append(problem)

    def warn(self, problem: Problem) -> None:
        self.warning_counts[problem.code] += 1
        if len(self.warnings) < MAX_SAVED:
            self.warnings.append(problem)

    def raise_for_errors(self, saved_in: Path | None = None) -> None:
        if not self.error_counts:
            return
        total = sum(self.error_counts.values())
        lines = [p.format(self.path) for p in self.errors[:SHOWN]]
        if total > len(lines):
            lines.append(f"... and {total - len(lines)} more" + (f"; all are listed in {saved_in}" if saved_in else ""))
        elif saved_in:
            lines.append(f"report saved in {saved_in}")
        raise UserError(lines[0], lines[1:])

    def to_dict(self) -> dict:
        def problems(items: list[Problem]) -> list[dict]:
            return [{"line": p.line, "code": p.code, "message": p.message} for p in items]

        return {
            "file": str(self.path), "options": self.options.model_dump(include=set(DataOptions.model_fields)),
            "template": self.template,
            "rows": self.rows, "valid": self.valid, "shapes": dict(self.shapes),
            "error_counts": dict(self.error_counts), "warning_counts": dict(self.warning_counts),
            "errors": problems(self.errors), "warnings": problems(self.warnings),
            "duplicates": {
                "exact": {"count": self.exact_count, "pairs": self.exact_pairs,
                          "note": "later copies are dropped before the split"},
                "near": {"count": self.near_count, "pairs": self.near_pairs, "method": near_method(),
                         "note": "kept; each group of near duplicates goes to one side of the split"},
            },
            "split": {"train": self.train_count, "test": self.test_count, "test_size": self.options.test_size,
                      "seed": self.options.seed, "leaked_count": self.leaked_count,
                      "leaked_pairs": self.leaked_pairs, "split_by": self.options.split_by,
                      "groups": self.group_counts or None},
            "novelty": self.novelty.to_dict() if self.novelty else None,
            "extra": {"file": self.options.data_extra, "rows": len(self.extra),
                      "replaced_held_out": self.extra_replaced} if self.extra is not None else None,
            "lengths": {"unit": self.unit, **self.lengths, "histogram": self.histogram},
            "trainable_tokens": self.trainable, "truncation": {"policy": self.options.truncation, **self.outcomes},
            "copying": {"min_share": MIN_SHARE, "min_rows": MIN_ROWS, "copied_fields": [f.path for f in self.copied],
                        "answer_fields": [{"path": f.path, "rows": f.rows, "copied": f.copied,
                                           "share": round(f.share, 4)} for f in self.answer_fields]},
        }

    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False))
        (folder / HISTOGRAM_FILE).write_text(histogram_text(self.histogram, self.unit, self.limit) + "\n")
        plot_histogram(self.histogram, self.unit, folder / HISTOGRAM_PLOT)
        return folder / REPORT_FILE

    @property
    def limit(self) -> int | None:
        return self.options.max_length if self.template else None

    def _groups_text(self) -> str:
        if not self.group_counts:
            return ""
        return (f" (--split-by {self.options.split_by}: {self.group_counts['train']} / {self.group_counts['test']} "
                "groups)")

    def table(self) -> str:
        """The short summary printed by `tunelab data check` and `tunelab train`."""
        def shape_counts(shapes: Counter) -> str:
            # Every row with answers becomes a conversation, whatever its keys; raw text stays documents.
            names = {"chat": ("conversation", "conversations"), "text": ("raw-text document", "raw-text documents"),
                     "pair": ("preference pair", "preference pairs")}
            return "".join(f", {n} {names[shape][n != 1]}" for shape, n in sorted(shapes.items()))

        def counts(counter: Counter) -> str:
            return ", ".join(f"{code} {n}" for code, n in sorted(counter.items()))

        rows = [
            ("rows", f"{self.rows} read, {self.valid} valid{shape_counts(self.shapes)}"),
            ("errors", f"{sum(self.error_counts.values())}  {counts(self.error_counts)}".rstrip()),
            ("warnings", f"{sum(self.warning_counts.values())}  {counts(self.warning_counts)}".rstrip()),
            ("exact duplicates", f"{self.exact_count} (dropped before the split)"),
            ("near duplicates", f"{self.near_count} pairs ({near_method()})"),
            ("split", f"train {self.train_count} / test {self.test_count}{self._groups_text()}, "
                      f"{self.leaked_count} near-duplicate pairs across it"),
        ]
        if self.extra is not None:
            moved = len(self.extra_replaced)
            rows.append(("extra rows", f"{len(self.extra)} from {self.options.data_extra}, trained, never held out"
                         + (f"; {moved} held-out row(s) with their prompt left the held-out split (W_EXTRA_HELD_OUT)"
                            if moved else "")))
        if self.novelty:
            rows.append(("novelty", self.novelty.describe()))
        if self.lengths:
            lengths = self.lengths
            rows.append((f"length ({self.unit})", f"min {lengths['min']}, median {lengths['median']}, "
                                                  f"p95 {lengths['p95']}, max {lengths['max']}"))
        if self.trainable:
            rows.append(("trained tokens", f"min {self.trainable['min']}, median {self.trainable['median']}, "
                                           f"total {self.trainable['total']} (template '{self.template}')"))
        if self.template:
            rows.append((f"--truncation {self.options.truncation}",
                         ", ".join(f"{k} {self.outcomes[k]}" for k in self.outcomes) +
                         f" (--max-length {self.options.max_length})"))
        if self.copied:
            rows.append(("copied fields", describe(self.copied)))
        lines = [f"Data check of {self.path}"] + [f"  {name:<20} {value}" for name, value in rows]
        for code in sorted(self.warning_counts):
            examples = [p for p in self.warnings if p.code == code][:3]
            lines += [f"  {p.format(self.path)}" for p in examples]
        return "\n".join(lines)


def near_method() -> str:
    from tunelab.data import dedup

    return (f"estimated Jaccard >= {dedup.THRESHOLD} of character {dedup.SHINGLE}-grams of normalised text, "
            f"MinHash {dedup.PERMUTATIONS} x LSH bands of {dedup.BAND_ROWS}")


def check(path: Path, options: DataOptions, template=None, keep_examples: bool = False) -> Report:
    """Check every row of `path`; with a Template, also the token-level checks (and with
    `keep_examples`, the examples and their encodings in `report.examples`)."""
    import numpy as np

    from tunelab.data import dedup

    path = Path(path)
    report = Report(path, options, template.name if template else None)
    report.examples = [] if keep_examples and template is not None else None
    report.extra = read_extra(Path(options.data_extra)) if options.data_extra else None  # its errors first
    scan = _Scan(options)
    workers = _workers(path) if template is None else 1
    if workers > 1:
        for rows, problems, part in _scan_in_parallel(path, options, workers):
            report.rows += rows
            for problem in problems:
                report.error(problem)
            scan.extend(part)
    else:
        for item in data_mod.iter_examples(path, options.format, split_by=options.split_by):
            report.rows += 1
            if isinstance(item, Problem):
                report.error(item)
                continue
            scan.add(item)
            if template is None:
                scan.lengths.append(_characters(item))
            else:
                length, trained = _check_tokens(item, template, options, report)
                scan.lengths.append(length)
                scan.trainable.append(trained)
    report.shapes, report.copies = scan.shapes, scan.copies
    lines, keys, ranks, lengths, trainable = scan.lines, scan.keys, scan.ranks, scan.lengths, scan.trainable
    groups, values, value_ends, near = scan.groups, scan.values, scan.value_ends, scan.near
    prompts = scan.prompts
    trained = sum(report.outcomes[k] for k in ("kept", "truncated", "chunked"))
    if template is not None and lines and not trained:
        report.error(Problem(0, "E_ALL_DROPPED", f"every example is longer than --max-length {options.max_length}; "
                             "raise it"))
    if not lines and not report.error_counts:
        report.error(Problem(0, "E_EMPTY", "no examples found; the file is empty"))
    if not lines:
        return report
    if groups and groups.missing:
        report.error(Problem(groups.first_missing, "E_SPLIT_BY",
                             data_mod.missing_group_message(options.split_by, groups.missing)))

    line_of = np.frombuffer(lines, np.int64)
    first, copy = dedup.exact_duplicates(np.frombuffer(keys, np.uint64))
    report.exact_count = len(copy)
    report.exact_pairs = [(int(line_of[a]), int(line_of[b])) for a, b in zip(first[:MAX_SAVED], copy[:MAX_SAVED])]
    report.duplicate_lines = {int(x) for x in line_of[copy]}
    _warn_pairs(report, "W_DUPLICATE", report.exact_count,
                [(b, f"same example as line {a}; dropped") for a, b in report.exact_pairs])
    is_copy = np.zeros(len(line_of), bool)
    is_copy[copy] = True
    near_first, near_later, similarity = near.pairs(skip=is_copy, threads=usable_cores())
    report.near_count = len(near_first)
    report.near_pairs = [(int(line_of[a]), int(line_of[b]), round(float(s), 3))
                         for a, b, s in zip(near_first[:MAX_SAVED], near_later[:MAX_SAVED], similarity[:MAX_SAVED])]
    _warn_pairs(report, "W_NEAR_DUPLICATE", report.near_count,
                [(b, f"near duplicate of line {a} (similarity {sim:.2f})") for a, b, sim in report.near_pairs])
    training = np.zeros(len(line_of), bool)  # the rows of report.train_lines (none when the split is refused)
    if not (groups and groups.missing):
        group_ranks = np.frombuffer(groups.ranks, np.uint64) if groups else None
        in_test = _split(report, line_of, np.frombuffer(ranks, np.uint64), is_copy, near_first, near_later, group_ranks)
        if in_test is not None:
            training, untrained = ~is_copy & ~in_test, is_copy
            if report.extra is not None:
                moved = _replace_held_out(report, line_of, in_test, np.frombuffer(prompts, np.uint64))
                in_test, untrained = in_test & ~moved, is_copy | moved
            _novelty(report, in_test, untrained, np.frombuffer(values, np.uint64),
                     np.frombuffer(value_ends, np.int64))
    report.answer_fields = report.copies.fields(training)
    report.copied = constrained(report.answer_fields)
    _length_stats(report, np.frombuffer(lengths, np.int64)[~is_copy],
                  np.frombuffer(trainable, np.int64)[~is_copy] if template else None)
    return report


PARALLEL_BYTES = 64 << 20
"""Files larger than this are checked by several processes (without --base), one part each."""
PART_BYTES = 8 << 20
"""The size of a part: its rows' numbers are a few MiB, and a few parts are in flight at once."""


class _Scan:
    """What the check keeps of each valid row, in file order: its line, content hash, split rank,
    length, answer value hashes, --split-by group, MinHash signature, and copied fields. One
    scan reads the whole file, or each process scans a part and the parts are joined in order
    (`extend`), which gives the same numbers."""

    def __init__(self, options: DataOptions):
        from tunelab.data import dedup

        self.seed = options.seed
        self.shapes: Counter = Counter()
        self.copies = CopyCounter()
        self.lines, self.keys, self.ranks = array("q"), array("Q"), array("Q")
        self.lengths, self.trainable = array("q"), array("q")
        self.groups = _Groups() if options.split_by else None
        self.values, self.value_ends = array("Q"), array("q")  # each row's answer value hashes, back to back
        self.near = dedup.NearDuplicates(seed=options.seed)
        self.prompts = array("Q")  # with --data-extra: each row's prompt_hash, to find held-out rows it replaces
        self.with_prompts = bool(options.data_extra)

    def add(self, item: Example) -> None:
        self.shapes["text" if item.is_raw else "pair" if item.rejected is not None else "chat"] += 1
        if not item.is_raw:  # the answer parsed once, for the copied fields and the novelty's values
            answer = item.reference
            parsed = parse_json_answer(answer)
            self.copies.add_answer(len(self.lines), answer, parsed, input_text(item.messages))
            self.values.extend(novelty.parsed_value_hashes(answer, parsed))
        key = item.key
        self.lines.append(item.line)
        self.keys.append(int(key[:16], 16))
        self.ranks.append(data_mod.split_rank(key, self.seed))
        if self.groups:
            self.groups.add(item, self.seed)
        self.value_ends.append(len(self.values))
        if self.with_prompts:
            self.prompts.append(prompt_hash(item))
        self.near.add(_visible_text(item))

    def extend(self, part: _Scan) -> None:
        """Append the rows of `part`, the scan of the lines that follow this one's."""
        import numpy as np

        self.shapes += part.shapes
        self.copies.extend(part.copies, len(self.lines))
        self.value_ends.frombytes((np.frombuffer(part.value_ends, np.int64) + len(self.values)).tobytes())
        self.values.extend(part.values)
        for name in ("lines", "keys", "ranks", "lengths", "trainable", "prompts"):
            getattr(self, name).extend(getattr(part, name))
        if self.groups and part.groups:
            self.groups.ranks.extend(part.groups.ranks)
            self.groups.first_missing = self.groups.first_missing or part.groups.first_missing
            self.groups.missing += part.groups.missing
        self.near.extend(part.near)


def _characters(example: Example) -> int:
    return len(example.text) if example.is_raw else sum(len(m["content"]) for m in example.messages)


def _workers(path: Path) -> int:
    """Processes for checking `path`: one per usable core for a large JSONL file, else one."""
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson") or not path.is_file():
        return 1
    if path.stat().st_size <= PARALLEL_BYTES:
        return 1
    return usable_cores()


def _spans(path: Path):
    """The file cut into parts of about PART_BYTES, each of whole lines, with its first line's number."""
    start, line, size = 0, 1, path.stat().st_size
    with path.open("rb") as f:
        while start < size:
            f.seek(min(start + PART_BYTES, size))
            f.readline()  # on to the end of the line
            end = min(f.tell(), size)
            f.seek(start)
            lines = f.read(end - start).count(b"\n")
            yield data_mod.Span(start, end, line)
            start, line = end, line + lines


def _scan_span(path: Path, options: DataOptions, span) -> tuple[int, list[Problem], _Scan]:
    """Scan the lines of `span` (in a worker process): rows read, their problems, the scan."""
    scan, rows, problems = _Scan(options), 0, []
    for item in data_mod.iter_examples(path, options.format, split_by=options.split_by, span=span):
        rows += 1
        if isinstance(item, Problem):
            problems.append(item)
            continue
        scan.add(item)
        scan.lengths.append(_characters(item))
    scan.near.signatures()  # computed here, in parallel
    return rows, problems, scan


def _scan_in_parallel(path: Path, options: DataOptions, workers: int):
    """The scans of the file's parts, in file order, made by `workers` processes; at most a few
    parts wait at once, so memory stays bounded. Fresh processes (spawned, not forked): the
    caller may have threads of its own (the UI)."""
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        waiting: collections.deque = collections.deque()
        for span in _spans(path):
            waiting.append(pool.submit(_scan_span, path, options, span))
            if len(waiting) > workers:
                yield waiting.popleft().result()
        while waiting:
            yield waiting.popleft().result()


def _visible_text(example: Example) -> str:
    """What near duplicates are judged on: the text, or the user and assistant turns (a system
    prompt shared by every row would make them all look alike)."""
    if example.is_raw:
        return example.text
    return "\n".join(m["content"] for m in example.messages if m["role"] != "system")


def _check_tokens(example: Example, template, options: DataOptions, report: Report) -> tuple[int, int]:
    """Encode one example as training will; record problems; return (tokens, trained tokens)."""
    line, limit = example.line, options.max_length
    for i, message in enumerate(example.messages):
        found = template.control_tokens_in(message["content"])
        if found:
            report.warn(Problem(line, "W_CONTROL_TEXT", f"message {i} contains {', '.join(sorted(set(found)))} "
                                "as text; it is trained and served as plain text, not as the control token"))
    if example.is_raw:
        found = template.control_tokens_in(example.text)
        if found:
            report.warn(Problem(line, "W_CONTROL_TEXT", f"text contains {', '.join(sorted(set(found)))}; "
                                "it is trained as plain text, not as the control token"))
    try:
        full, pieces, outcome = encode_one(example, template, limit, options.truncation, options.train_on_prompt)
    except UserError as e:
        report.error(Problem(line, "E_TEMPLATE", str(e)))
        return 0, 0
    report.outcomes[outcome] += 1
    if report.examples is not None:
        report.examples.append(EncodedExample(example, full, pieces, outcome))
    tokens = len(full.input_ids)
    trained = sum(p.trainable for p in pieces)
    prompt = next((i for i, label in enumerate(full.labels) if label != IGNORE), tokens)
    if prompt >= limit and not example.is_raw:
        report.outcomes["prompt_over_max_length"] += 1
    if outcome == "too_long":
        report.error(Problem(line, "E_TOO_LONG", f"{tokens} tokens, over --max-length {limit} "
                             "(--truncation error); raise --max-length or pass --truncation drop/truncate"))
    elif outcome == "no_trainable":
        why = (f"the prompt alone is {prompt} tokens, --max-length {limit}" if prompt >= limit
               else "the template trains no token of it")
        report.error(Problem(line, "E_NO_TRAINABLE", f"no token left to train ({why}); raise --max-length "
                             "or shorten the prompt"))
    elif outcome == "dropped":
        report.warn(Problem(line, "W_DROPPED", f"{tokens} tokens, over --max-length {limit}; dropped"
                            + (f" (the prompt alone is {prompt})" if prompt >= limit else "")))
    elif outcome == "truncated":
        report.warn(Problem(line, "W_TRUNCATED", f"{tokens} tokens cut to --max-length {limit}; "
                            f"{trained} trained tokens left, the end of the answer and its end-of-turn token lost"))
    bos = template.tokenizer.bos_token_id
    if bos is not None and full.input_ids[:2] == [bos, bos]:
        report.warn(Problem(line, "W_DOUBLE_BOS", "starts with two BOS tokens; the template adds one "
                            "and so does something else (a BOS written in the text or the template)"))
    if outcome == "kept" and not example.is_raw:
        stops = set(template.stop_token_ids)
        closed = sum(label in stops for label in full.labels)
        turns = sum(m["role"] == "assistant" for m in example.messages)
        if closed < turns:
            report.error(Problem(line, "E_NO_EOS", f"{turns - closed} of {turns} assistant turns have no trained "
                                 "end-of-turn token, so the model would not learn to stop; fix the template"))
    return tokens, trained if pieces else -1  # -1: not trained at all (dropped or refused)


def _split(report: Report, line_of, ranks, is_copy, near_first, near_later, group_ranks=None):
    """The split training makes (`data.split_rows` on the rows left after dropping copies, each
    near-duplicate group ranked as its first row; with --split-by, `data.split_groups` on the
    `group_ranks` of those rows), and the near-duplicate pairs that straddle it. Returns which
    rows are held out (None when the split is refused)."""
    import numpy as np

    from tunelab.data import dedup

    kept = np.flatnonzero(~is_copy)
    options = report.options
    n_test = data_mod.held_out_count(len(kept), options.test_size)
    group = dedup.components(len(line_of), near_first, near_later)
    sizes = np.bincount(group, minlength=len(line_of))
    # A group larger than a tenth of the test split would unbalance it; its rows are then
    # split one by one and the report shows the pairs that end up on both sides.
    too_big = (sizes[group] > max(2, n_test // 10)) & (n_test > 0) & (group_ranks is None)
    for g in np.unique(group[too_big])[:SHOWN]:
        report.warn(Problem(int(line_of[g]), "W_LARGE_GROUP",
                            f"starts a group of {int(sizes[g])} near duplicates, too many to keep on one side "
                            "of the split; they are split one by one"))
    group = np.where(too_big, np.arange(len(line_of)), group)
    report.groups = {int(line_of[i]): int(line_of[group[i]]) for i in np.flatnonzero(group != np.arange(len(group)))}
    # Copies take no part in near pairs, so a group's first row is always a kept row.
    kept_row = np.cumsum(~is_copy) - 1
    try:
        if group_ranks is None:
            kept_in_test = data_mod.split_rows(ranks[kept], kept_row[group[kept]], options.test_size)
        else:  # --split-by: its groups, not the near duplicates', go to one side
            kept_in_test = data_mod.split_groups(group_ranks[kept], options.test_size, options.split_by)
            test_groups = len(np.unique(group_ranks[kept][kept_in_test]))
            report.group_counts = {"train": len(np.unique(group_ranks[kept])) - test_groups, "test": test_groups}
    except UserError as e:
        report.error(Problem(0, "E_SPLIT", str(e)))
        return None
    in_test = np.zeros(len(line_of), bool)
    in_test[kept[kept_in_test]] = True
    report.test_lines = line_of[kept[kept_in_test]]
    report.train_lines = line_of[kept[~kept_in_test]]
    report.test_count = len(report.test_lines)
    report.train_count = len(report.train_lines)
    crossing = in_test[near_first] != in_test[near_later]
    report.leaked_count = int(crossing.sum())
    report.leaked_pairs = [(int(line_of[a]), int(line_of[b]))
                           for a, b in zip(near_first[crossing][:MAX_SAVED], near_later[crossing][:MAX_SAVED])]
    _warn_pairs(report, "W_LEAK", report.leaked_count,
                [(b, f"near duplicate of line {a}, on the other side of the train/test split")
                 for a, b in report.leaked_pairs])
    return in_test


def _replace_held_out(report: Report, line_of, in_test, prompts):
    """Take out of the held-out split each row whose prompt an extra row shares (extra.py says
    why); returns which rows left it. They are trained as the extra rows, not as themselves."""
    import numpy as np

    held_out: dict[int, list[int]] = {}
    for i in np.flatnonzero(in_test):
        held_out.setdefault(int(prompts[i]), []).append(int(line_of[i]))
    report.extra_replaced = replaced_held_out(report.extra, held_out)
    moved = in_test & np.isin(line_of, [held for held, _ in report.extra_replaced])
    report.test_lines = line_of[in_test & ~moved]
    report.test_count = len(report.test_lines)
    for held, line in report.extra_replaced:
        report.warn(Problem(held, "W_EXTRA_HELD_OUT", f"held out, and {report.options.data_extra}:{line} has the same "
                            "prompt: the row leaves the held-out split and the extra row trains in its place, so the "
                            "next eval is not comparable with one of the earlier split (compare runs on the same "
                            "rows: tunelab eval OLD_RUN --data NEW_RUN/test.jsonl)"))
    return moved


class _Groups:
    """Each row's --split-by group, as the rank of its value (what the split needs), and the
    rows that lack the field."""

    def __init__(self):
        self.ranks = array("Q")
        self.missing = 0
        self.first_missing = 0

    def add(self, example: Example, seed: int) -> None:
        if example.group is None:
            self.missing += 1
            self.first_missing = self.first_missing or example.line
        self.ranks.append(data_mod.group_rank(example.group or "", seed))


def _novelty(report: Report, in_test, untrained, values, value_ends) -> None:
    """How many held-out answer values no training answer holds; a warning when a random split
    holds out answers that mostly repeat what training shows. `untrained`: the rows outside the
    test split that do not train either (copies, held-out rows an extra row replaced)."""
    measured = novelty.measure_packed(values, value_ends, ~in_test & ~untrained, in_test)
    report.novelty = measured
    if not report.options.split_by and measured.looks_familiar():
        rows = measured.novel_rows + measured.seen_rows
        report.warn(Problem(0, "W_SEEN_VALUES", f"{measured.seen_rows} of {rows} held-out rows hold only answer "
                            "values that training answers hold too, so the held-out loss will flatter the model on "
                            "new values; split by a field that groups them, e.g. --split-by metadata.customer"))


def _warn_pairs(report: Report, code: str, total: int, items: list[tuple[int, str]]) -> None:
    for line, message in items:
        report.warn(Problem(line, code, message))
    if total:
        report.warning_counts[code] = total


def _length_stats(report: Report, lengths, trainable) -> None:
    import numpy as np

    def stats(values) -> dict:
        if not len(values):
            return {}
        return {"min": int(values.min()), "median": float(np.median(values)),
                "mean": round(float(values.mean()), 1), "p95": float(np.percentile(values, 95)),
                "max": int(values.max()), "total": int(values.sum())}

    report.lengths = stats(lengths)
    if trainable is not None:
        report.trainable = stats(trainable[trainable >= 0])
    report.histogram = histogram(lengths, report.limit)


def histogram(values, limit: int | None = None, bins: int = 16) -> list[tuple[int, int, int]]:
    """Equal-width bins from 0 to the longest value (and past `limit`, so its line shows)."""
    import numpy as np

    top = max(int(values.max()) if len(values) else 1, limit or 0, 1)
    width = max(1, -(-(top + 1) // bins))
    counts = np.bincount(np.asarray(values) // width, minlength=bins)
    return [(i * width, (i + 1) * width - 1, int(c)) for i, c in enumerate(counts)]


def histogram_text(bins: list[tuple[int, int, int]], unit: str, limit: int | None = None, width: int = 50) -> str:
    most = max((c for _, _, c in bins), default=0) or 1
    lines = [f"Example length in {unit}" + (f" (--max-length {limit})" if limit else "")]
    for lo, hi, count in bins:
        bar = "#" * round(width * count / most) or ("." if count else "")
        mark = "  <- --max-length" if limit is not None and lo <= limit <= hi else ""
        lines.append(f"{lo:>8}-{hi:<8} {count:>9} {bar}{mark}")
    return "\n".join(lines)


def plot_histogram(bins: list[tuple[int, int, int]], unit: str, path: Path) -> bool:
    """A PNG when matplotlib is installed (it is not a dependency); the text histogram always."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([lo for lo, _, _ in bins], [c for _, _, c in bins], width=[hi - lo + 1 for lo, hi, _ in bins], align="edge")
    ax.set_xlabel(f"example length ({unit})")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_check(path: Path, options: DataOptions, template=None, out: Path | None = None,
              keep_examples: bool = False, show: bool = True) -> Report:
    """Check, print the table (unless not `show`: training's other processes), save the report
    in `out` if given, raise on errors."""
    report = check(path, options, template, keep_examples)
    if show:
        print(report.table())
    saved = report.save(out) if out is not None else None
    if saved:
        print(f"Report saved in {saved}")
    report.raise_for_errors(saved)
    return report


def cli_check(path: Path, options: DataOptions, base: str | None = None, out: Path | None = None) -> Report:
    """`tunelab data check DATA [--base MODEL] ...`"""
    template = None
    if base is not None:
        from tunelab.models import load_tokenizer, resolve_base
        from tunelab.template import Template

        template = Template.for_model(load_tokenizer(resolve_base(base)), options.template)
    return run_check(path, options, template, out)
