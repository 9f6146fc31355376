"""The models the server answers with itself: chat and the arena.

The arena asks one prompt of several columns side by side: the base model as `tunelab eval`
prompts it (zero-shot, and few-shot with the same K training examples eval puts before every
question, evaluate/baselines.py) and one or more tuned runs, each answering as `tunelab
generate RUN` does (the run's own template, stop strings and copy constraint). The page asks
for one column per request, so each answer shows as soon as it is made; a streamed column
would need a second decode loop beside decoding/generate.py.

Loaded models are kept, the last few used (a base model and a run or two), so the next prompt
does not load them again; one lock makes the answers one at a time, as on a CPU they would be
anyway.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Literal

Column = Literal["zero-shot", "few-shot", "tuned"]
SHOTS = 3
"""Training examples before the question in the few-shot column: `tunelab eval`'s --shots default."""
KEEP = 3
"""Models kept loaded (tuned runs and base models together)."""


class Models:
    """The runs and base models the server has loaded, the last KEEP used."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self.lock = threading.Lock()
        self.loaded: OrderedDict[tuple[str, Path], object] = OrderedDict()

    def _get(self, key: tuple[str, Path], load):
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        while len(self.loaded) >= self.keep:  # freed before the next one loads
            self.loaded.popitem(last=False)
        self.loaded[key] = value = load()
        return value

    def run(self, folder: Path):
        from tunelab.run import Run

        return self._get(("run", folder), lambda: Run(folder))

    def reply(self, folder: Path, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        """One chat reply, as `tunelab chat RUN` makes it."""
        with self.lock:
            return self.run(folder).generate(messages, max_new_tokens=max_new_tokens)

    def answer(self, folder: Path, column: Column, prompt: str, max_new_tokens: int) -> tuple[str, int]:
        """One column's answer to `prompt` (a user message); with it, how many training examples
        were put before the question (0 but in the few-shot column)."""
        from tunelab.decoding.generate import generate_batch

        messages = [{"role": "user", "content": prompt}]
        with self.lock:
            if column == "tuned":
                return self.run(folder).generate(messages, max_new_tokens=max_new_tokens), 0
            run = self.run(folder)  # its template and base; its own weights load only if it answers
            shots = 0
            if column == "few-shot":
                messages, shots = few_shot(run, messages)
            base = self._get(("base", run.base_path()), run.base_model)
            answer = generate_batch(base, run.template, [messages], max_new_tokens, copying=run.copy_rule(),
                                    precision=run.precision)[0]
            return answer, shots


def few_shot(run, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """The question with the run's K fixed training examples before it, as eval's few-shot column."""
    from tunelab.data.load import read_jsonl
    from tunelab.evaluate.baselines import few_shot_prompts

    train = read_jsonl(run.files.train) if run.files.train.exists() else []
    prompt = few_shot_prompts([messages], train, SHOTS)[0]
    return prompt, (len(prompt) - len(messages)) // 2
