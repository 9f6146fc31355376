"""The one prompt template: training, evaluation, generation, chat and serving all render
and tokenize conversations through a `Template`, and the run folder keeps its source so every
later command uses exactly the same one.

A template is a Jinja chat template (the Hugging Face format). By default it is the base
model's own; named templates exist for base models that ship none.

Control tokens written as text inside a message (a user pasting `<|im_end|>`) are tokenized
as the plain characters they are, never as the control token, here and so in training,
evaluation, generation and chat alike: otherwise one message could end a turn, or forge
another role's turn, in the middle of a conversation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError

IGNORE = -100
"""Label of a token that is not trained (the cross-entropy ignore index)."""

_ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. '"
    " + 'Write a response that appropriately completes the request.\\n\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
_PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED = {"alpaca": _ALPACA, "plain": _PLAIN, "chatml": _CHATML}

# Stand-ins for control-token text inside messages while a conversation is tokenized
# (Unicode private-use characters, which no template or tokenizer gives a meaning).
_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARKER = re.compile(f"{_MARK_OPEN}(\\d+){_MARK_CLOSE}")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(label != IGNORE for label in self.labels)


class Template:
    def __init__(self, tokenizer, name: str, source: str):
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        self.stop_token_ids = self._find_stop_tokens()

    @classmethod
    def for_model(cls, tokenizer, name: str = "auto") -> Template:
        if name == "auto":
            if tokenizer.chat_template:
                return cls(tokenizer, "model", tokenizer.chat_template)
            name = "alpaca"
        if name not in NAMED:
            raise UserError(f"unknown template '{name}'; choose auto, {', '.join(NAMED)}")
        source = NAMED[name]
        if adds_bos(tokenizer):
            source = "{{ bos_token }}" + source
        return cls(tokenizer, name, source)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, chat_template=self.source, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as e:  # e.g. a template that allows no system message, or needs alternation
            raise UserError(f"template '{self.name}' cannot render this conversation: {e}") from None

    def encode(self, messages: list[dict[str, str]], train_on_prompt: bool = False) -> Encoded:
        """Token ids of the whole conversation, with labels on every assistant turn
        (its end-of-turn token included) and IGNORE on everything else."""
        text = self.render(messages)
        spans = self._assistant_spans(messages, text)
        if spans is None:
            raise UserError(
                f"template '{self.name}' renders earlier turns differently as a conversation grows; "
                "pick another with --template"
            )
        input_ids, offsets = self._tokenize(messages, text, cuts=[lo for lo, _ in spans])
        labels = []
        for token_id, (start, _end) in zip(input_ids, offsets):
            trained = train_on_prompt or any(lo <= start < hi for lo, hi in spans)
            labels.append(token_id if trained else IGNORE)
        return Encoded(input_ids, labels)

    def encode_prompt(self, messages: list[dict[str, str]], cut_turns: bool = True) -> list[int]:
        """Token ids that ask the model for the next assistant turn: exactly the tokens that
        precede that turn in `encode` of the conversation once it is answered.

        `cut_turns=False` renders the conversation once and tokenizes it whole, in time linear
        in its length: finding where each earlier assistant turn starts costs two renderings of
        everything before it (1,600 short messages took 15 s). The tokens are the same unless
        the tokenizer merges characters across the start of an earlier assistant turn."""
        text = self.render(messages, add_generation_prompt=True)
        spans = (self._assistant_spans(messages, text) or []) if cut_turns else []
        return self._tokenize(messages, text, add_generation_prompt=True, cuts=[lo for lo, _ in spans])[0]

    def _assistant_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]] | None:
        """Character spans of the assistant turns in `text` (from the end of the generation
        prompt through the end-of-turn), or None if the template renders a turn differently
        once the conversation goes on (so no prompt would match what was trained)."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            if i == 0:  # data/load.py refuses such rows (E_ASSISTANT_FIRST); this guards other callers
                raise UserError("the conversation starts with an assistant message, which nothing asks for; "
                                "start it with a system or user message")
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                return None
            spans.append((len(before), len(through)))
        return spans

    def encode_text(self, text: str) -> Encoded:
        """A raw-text document for continued pretraining: the tokenizer's own BOS if it adds
        one, the text (control tokens in it as plain text), EOS; every token trained."""
        ids = list(self.tokenizer(text, split_special_tokens=True)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        return Encoded(ids, list(ids))

    def control_tokens_in(self, text: str) -> list[str]:
        """The special-token strings written inside `text` (tokenized as plain text)."""
        return self._special_pattern.findall(text) if self._special_pattern else []

    def _tokenize(
        self, messages: list[dict[str, str]], text: str, add_generation_prompt: bool = False, cuts: Sequence[int] = ()
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text`, the rendering of `messages`.

        The text is tokenized in pieces cut where each assistant turn starts, so the tokens
        before a turn are exactly those of the generation prompt that asks for it: a tokenizer
        could otherwise merge the prompt's last characters with the answer's first ones, and
        train on a prompt that inference never sends. Where no merge happens (the usual case,
        a template's own tokenizer), this is token for token `apply_chat_template`.

        When a message holds a control token's text, the conversation is rendered again with
        those strings hidden behind markers, so every special token left in the rendering is
        the template's own; the text between them is tokenized with special tokens split, as
        the tokenizer itself tokenizes the text between special tokens.
        """
        hidden: list[str] = []
        if self._special_pattern is not None:
            def hide(match: re.Match) -> str:
                hidden.append(match.group(0))
                return f"{_MARK_OPEN}{len(hidden) - 1}{_MARK_CLOSE}"

            masked = [{**m, "content": self._special_pattern.sub(hide, m["content"])} for m in messages]
        if hidden and self._special_pattern is not None:
            rendered = self.render(masked, add_generation_prompt=add_generation_prompt)
            pieces = [(piece if k % 2 else _MARKER.sub(lambda m: hidden[int(m.group(1))], piece), bool(k % 2))
                      for k, piece in enumerate(self._special_pattern.split(rendered))]
            if "".join(piece for piece, _ in pieces) != text:  # the template altered the text around a marker
                raise UserError(f"template '{self.name}' changes message text that holds control tokens; "
                                "remove them from the data or pick another template with --template")
        else:
            pieces = [(text, False)]
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        position = 0
        for piece, control in pieces:
            end = position + len(piece)
            if control:  # the template's own control token
                ids.append(self.tokenizer.convert_tokens_to_ids(piece))
                offsets.append((position, end))
            else:
                bounds = [position, *(c for c in cuts if position < c < end), end]
                for lo, hi in zip(bounds, bounds[1:]):
                    if lo == hi:
                        continue
                    tokens = self.tokenizer(text[lo:hi], add_special_tokens=False, split_special_tokens=bool(hidden),
                                            return_offsets_mapping=True)
                    ids += tokens["input_ids"]
                    offsets += [(lo + a, lo + b) for a, b in tokens["offset_mapping"]]
            position = end
        return ids, offsets

    @property
    def _special_pattern(self) -> re.Pattern | None:
        if not hasattr(self, "_special_regex"):
            special = sorted({t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
                             | set(self.tokenizer.all_special_tokens), key=len, reverse=True)
            special = [t for t in special if t]
            self._special_regex = re.compile("(" + "|".join(map(re.escape, special)) + ")") if special else None
        return self._special_regex

    def _find_stop_tokens(self) -> list[int]:
        """EOS plus the token the template closes an assistant turn with (e.g. <|im_end|>)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            before = self.render(probe[:1], add_generation_prompt=True)
            through = self.render(probe)
        except UserError as e:  # a Jinja error in a user's template
            raise UserError(f"template '{self.name}' does not render: {str(e).split(': ', 1)[-1]}") from None
        closing = through[len(before) + len("Hello"):]
        ids = self.tokenizer(closing, add_special_tokens=False)["input_ids"] if closing else []
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        stops = [ids[0]] if ids and ids[0] in special else []
        if not stops:
            raise UserError(
                f"template '{self.name}' does not end an assistant turn with a special token, "
                "so a model would never learn to stop; pick another with --template"
            )
        eos = self.tokenizer.eos_token_id
        return stops + ([eos] if eos is not None and eos not in stops else [])

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"name": self.name, "source": self.source}, indent=2))

    @classmethod
    def load(cls, path: Path, tokenizer) -> Template:
        data = json.loads(Path(path).read_text())
        return cls(tokenizer, data["name"], data["source"])


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS before a text. A named template then writes it too
    (as the model's own templates do), and an export tells llama.cpp to add it (export/gguf.py)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
