"""RUN/eval.json as a typed model: `tunelab eval` builds and writes an `EvalResults`, the report,
the export's model card and the Python API read one.

The JSON keys are the file's format (other tools and old runs read them), so every field below
is named as its key, and the models are dumped by alias where a key would shadow a pydantic
name (`schema`). Rates are shares in [0, 1]; low/high are 95% bootstrap intervals
(metrics.bootstrap_interval); "right" means an exact match. Reading is lenient about what is
missing (an older tunelab wrote fewer sections, and they default to empty or None) and strict
about what is there (a value of the wrong type is an error, not a silently empty report).

The first shape of eval.json (no `schema`; `base` and `tuned` at the top level with plain
numbers, each sample holding the answers under the contenders' names) is converted on reading,
by `EvalResults`'s own validator, so a run evaluated by an older tunelab still shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import UserError
from tunelab.files import write_text_atomic

SCHEMA = 2
"""The shape `tunelab eval` writes; 1 marks a file converted from the first shape."""


class Part(BaseModel):
    """A part of eval.json."""

    # NaN stays NaN in the file (json.dumps wrote it so before): a bootstrap interval of no
    # values is NaN, and pydantic's default would write null, which a float field then refuses.
    model_config = ConfigDict(ser_json_inf_nan="constants", serialize_by_alias=True, validate_by_name=True)


class Interval(Part):
    """A metric's value, with its 95% bootstrap interval where it has one."""

    value: float
    low: float | None = None
    high: float | None = None


class Contender(Part):
    """One column of the comparison."""

    name: str
    """zero-shot, few-shot, retrieval, tuned, or an endpoint's NAME (`--contender NAME=URL`)."""
    kind: Literal["local", "endpoint"] | None = None
    """None in files of the first shape."""
    model: str | None = None
    """The model's path or name."""
    prompt: str | None = None
    """How it was prompted: zero-shot, few-shot, retrieval, fine-tuned or endpoint."""


class Difference(Part):
    """The tuned model minus another contender on one metric, paired per example."""

    contender: str
    metric: str
    difference: float
    low: float
    high: float
    tuned_only_right: list[int] = []
    """Sample indices the tuned model gets right and the other does not."""
    contender_only_right: list[int] = []


class Cost(Part):
    """Means per request, timed after one uncounted warm-up request."""

    prompt_tokens: float
    generated_tokens: float
    seconds_per_request: float
    requests_per_second: float
    seconds: float
    """Wall time of all the contender's answers."""


class RuleResults(Part):
    """How one contender's answers fared against the user's assertions."""

    rules: dict[str, int]
    """Rule name -> answers that pass it."""
    answers: int
    all_passed: int
    """Answers passing every rule."""


class Assertions(Part):
    file: str
    results: dict[str, RuleResults]


class Judge(Part):
    url: str
    model: str
    ungraded: dict[str, int] = {}
    """Per contender, answers the judge's reply gave no grade for."""
    failed: str | None = None
    """Why the judge stopped answering, when it did: then no answer has a grade (a column graded
    in part would not compare), and everything else in the file stands."""


class ForgettingScore(Part):
    accuracy: float
    """Multiple-choice accuracy by summed log-likelihood."""
    accuracy_per_token: float
    """By mean log-likelihood per token (does not favour short choices)."""


class Forgetting(Part):
    file: str
    questions: int
    results: dict[str, ForgettingScore]
    """"zero-shot" (the base model) and "tuned"."""


class CopyConstraint(Part):
    fields: list[str]
    """The answer fields decoding kept substrings of the input (copying.py)."""
    changed: dict[str, int]
    """Per local contender, answers the constraint changed."""


class InventedExample(Part):
    index: int
    """The sample."""
    words: list[str]
    """Its answer's invented names."""


class InventedNames(Part):
    """Plain-text answers holding a capitalised word or a number that is a word of neither the
    input, nor the reference, nor the training answers' house words (evaluate/names.py)."""

    answers: dict[str, int]
    """Per contender, answers holding one."""
    examples: dict[str, list[InventedExample]]
    """Per contender, the first few."""


class KindAccuracy(Interval):
    rows: int


class Novelty(Part):
    """How new the evaluated answers' values are to the run's training answers (data/novelty.py)."""

    training_file: str
    values: int
    novel_values: int
    share: float | None
    """novel_values / values; None without values."""
    novel_rows: int
    seen_rows: int
    rows_without_values: int
    training_values: int
    accuracy: dict[str, dict[Literal["novel", "seen"], KindAccuracy | None]] = {}
    """Per contender, exact match on rows holding a novel value and on rows holding only seen ones."""


class Answer(Part):
    """One contender's answer to one sample; files of the first shape hold only the text."""

    text: str
    bucket: str | None = None
    """One of metrics.BUCKETS."""
    exact_match: float | None = None
    token_f1: float | None = None
    rouge_l: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    stopped: bool | None = None
    """False when the answer ran into the token limit."""
    copy_changed: bool | None = None
    invented_names: list[str] = []
    """Words of a plain-text answer that look like names or numbers and that neither the input nor
    the reference holds (evaluate/names.py)."""
    assertions_failed: list[str] = []
    """"rule: reason" per failed assertion."""
    judge: float | None = None
    """1 correct, 0.5 partial, 0 incorrect, None ungraded or not judged."""


class Sample(Part):
    index: int
    line: int | None = None
    """The row's line in the evaluated file."""
    prompt: str = ""
    """The user's text of the prompt."""
    reference: str = ""
    answers: dict[str, Answer] = {}
    novelty: Literal["novel", "seen", "none"] | None = None


class EvalResults(Part):
    """The whole of eval.json, in the order of its keys in the file (samples last: the long part)."""

    schema_version: int = Field(SCHEMA, alias="schema")
    """`schema` in the file (the name is pydantic's own): 2, or 1 once the first shape is converted."""
    run: str | None = None
    """The run folder, as it was given to `tunelab eval`."""
    data: str | None = None
    """The evaluated file (the run's test.jsonl by default)."""
    examples_evaluated: int
    max_new_tokens: int | None = None
    shots: int | None = None
    precision: Literal["bf16", "fp32"] | None = None
    """The arithmetic of the local contenders' answers and held-out losses (older files: None)."""
    device: Literal["cuda", "mps", "cpu"] | None = None
    """Where the local contenders answered (`--device`; older files: None)."""
    threads: int | None = None
    """The CPU threads torch computed with (`--threads`; older files: None)."""
    contenders: list[Contender] = []
    metrics: dict[str, dict[str, Interval]] = {}
    """{contender: {metric: value}}: exact_match, token_f1, rouge_l; valid_json and field_accuracy
    for JSON references; hallucinated_values for extraction tasks; assertions_passed; judge; and for
    the base and tuned models heldout_loss and perplexity (value only)."""
    fields: dict[str, dict[str, float]] = {}
    """{contender: {JSON field path: accuracy}} for JSON references."""
    extractive_fields: list[str] = []
    """The answer fields checked for hallucinated values."""
    buckets: dict[str, dict[str, int]] = {}
    """{contender: {bucket: answers}}."""
    bucket_examples: dict[str, dict[str, list[int]]] = {}
    """{contender: {bucket: [sample index, ...]}}, up to 5 each."""
    differences: list[Difference] = []
    """The tuned model against each other contender, per metric."""
    cost: dict[str, Cost] = {}
    assertions: Assertions | None = None
    """With --assertions FILE."""
    judge: Judge | None = None
    """With --judge URL; the grades are the metric `judge` and each answer's `judge`."""
    forgetting: Forgetting | None = None
    """The multiple-choice check, unless --no-forgetting (computed in fp32 whatever --precision)."""
    copy_constraint: CopyConstraint | None = None
    """None when the run has no copied fields or with --no-copy-constraint."""
    invented_names: InventedNames | None = None
    """None for JSON references (their values are checked as hallucinated values) and older files."""
    novelty: Novelty | None = None
    samples: list[Sample] = []
    """Every evaluated example with each contender's answer, in the file's order."""

    @model_validator(mode="before")
    @classmethod
    def upgrade(cls, data):
        """The first shape of eval.json converted to this one (schema 1)."""
        names = [name for name in ("base", "tuned") if isinstance(data, dict) and isinstance(data.get(name), dict)]
        if not names or "schema" in data:  # only the first shape has the contenders at the top level
            return data
        renamed = {"loss": "heldout_loss"}
        samples = data.get("samples") if isinstance(data.get("samples"), list) else []
        return {
            "schema": 1, "examples_evaluated": data.get("examples_evaluated"),
            "max_new_tokens": data.get("max_new_tokens"),
            "contenders": [{"name": name} for name in names],
            "metrics": {name: {renamed.get(key, key): {"value": value} for key, value in data[name].items()
                               if key != "seconds" and isinstance(value, (int, float))} for name in names},
            "samples": [{**{k: v for k, v in sample.items() if k not in names}, "index": sample.get("index", i),
                         "answers": {name: {"text": sample[name]} for name in names
                                     if isinstance(sample.get(name), str)}}
                        if isinstance(sample, dict) else sample for i, sample in enumerate(samples)],
        }

    @property
    def names(self) -> list[str]:
        """The contenders' names, in column order."""
        return [c.name for c in self.contenders]

    def tuned_metrics(self) -> dict[str, Interval]:
        """The fine-tuned model's metrics (the last contender's in a file without `tuned`)."""
        name = "tuned" if "tuned" in self.metrics else (self.names[-1] if self.names else None)
        return self.metrics.get(name, {}) if name else {}

    @classmethod
    def read(cls, path: Path) -> EvalResults:
        """eval.json as written by `tunelab eval` (either shape); a file of another structure is a
        one-line error naming it and the first thing wrong."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as e:
            error = e.errors()[0]
            where, message = ".".join(map(str, error["loc"])) or "the top level", error["msg"]
            if error["type"] == "json_invalid":
                problem = f"not valid JSON ({message.removeprefix('Invalid JSON: ')})"
            else:
                problem = f"not the eval.json `tunelab eval` writes ({where}: {message[0].lower()}{message[1:]})"
            raise UserError(f"{path}: {problem}; run `tunelab eval {path.parent}` again to rewrite it") from None

    def write(self, path: Path) -> None:
        """Write beside and rename: a crash or Ctrl-C leaves the old file or none, never half of one."""
        write_text_atomic(Path(path), self.model_dump_json(indent=2))


def as_results(results: EvalResults | dict) -> EvalResults:
    """An `EvalResults` from itself or from eval.json's dict (json.loads of the file)."""
    return results if isinstance(results, EvalResults) else EvalResults.model_validate(results)
