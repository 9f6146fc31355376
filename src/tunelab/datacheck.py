"""`tunelab data check`: validate a data file and report what training would see."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from tunelab import data as data_mod


def check(path: Path, args: argparse.Namespace) -> None:
    examples = data_mod.load_examples(path, args.format)
    train, test = data_mod.split(examples, args.test_size, args.seed)
    turns = [sum(m["role"] == "assistant" for m in e.messages) for e in examples]
    print(f"{path}: {len(examples)} valid examples, {len(train)} train / {len(test)} test "
          f"(--test-size {args.test_size}, seed {args.seed}); {sum(turns)} assistant turns")
    if args.base is None:
        return
    from tunelab.batching import encode_examples
    from tunelab.models import load_tokenizer, resolve_base
    from tunelab.template import Template

    template = Template.for_model(load_tokenizer(resolve_base(args.base)), args.template)
    encoded, stats = encode_examples(examples, template, args.max_length, truncation="drop", source=str(path))
    lengths = [len(e.input_ids) for e in encoded]
    trained = [e.trainable for e in encoded]
    print(f"template '{template.name}': tokens per example min {min(lengths)}, median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}; trained tokens per example median {statistics.median(trained):.0f}")
    if stats.dropped:
        print(f"{len(stats.dropped)} example(s) longer than --max-length {args.max_length} would be dropped: "
              f"lines {', '.join(map(str, stats.dropped[:10]))}")
