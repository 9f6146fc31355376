"""`tunelab export RUN --format ollama`: the GGUF (gguf.py) and a Modelfile whose TEMPLATE, SYSTEM
and stop parameters render the run's template.

Ollama templates are Go templates, not Jinja: the run's template is learned as fixed text around
each message (`turn_format`), from renderings of marker conversations, and checked on sample
conversations; a template that does not work that way is refused (export it as gguf, whose
metadata holds the Jinja source).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.export.gguf import GGUF_FILE
from tunelab.template import Template, adds_bos


def ollama_name(out: Path) -> str:
    """A model name Ollama accepts, from the export folder's name."""
    return re.sub(r"[^a-z0-9._-]+", "-", Path(out).resolve().name.lower()).strip("-._") or "tunelab-model"


@dataclass
class TurnFormat:
    """How a template writes a conversation, when it writes each message as fixed text around its
    content (ChatML, Llama 3, Alpaca and most others); learned from renderings of marker messages."""

    head: str
    """Text before the first message: the BOS token, when the tokenizer adds one itself."""
    wrap: dict[str, tuple[str, str]]
    """Text before and after the content of a system, user and assistant message."""
    generation: str
    """Text after the last message that asks for the next assistant turn."""
    default_system: str | None
    """The system prompt the template writes when a conversation has none."""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What the Modelfile's TEMPLATE renders (Ollama sends SYSTEM as a first system message)."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = self.head
        for message in messages:
            before, after = self.wrap[message["role"]]
            text += before + message["content"] + after
        if add_generation_prompt and messages[-1]["role"] != "assistant":
            text += self.generation
        return text

    def go_template(self) -> str:
        """The same as a Go template over Ollama's `.Messages`. The head is left out: llama.cpp
        adds the BOS token itself when the GGUF says the tokenizer does."""
        def literal(text: str) -> str:
            return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

        parts = ["{{ range $i, $m := .Messages }}"]
        for k, role in enumerate(("system", "user", "assistant")):
            before, after = self.wrap[role]
            parts.append(("{{ if" if k == 0 else "{{ else if") + f' eq $m.Role "{role}" }}}}'
                         + literal(before) + "{{ $m.Content }}" + literal(after))
        parts.append("{{ end }}")
        parts.append('{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}'
                     + literal(self.generation) + "{{ end }}")
        parts.append("{{ end }}")
        return "".join(parts)


_MARKERS = {"system": "xSYSTEMx", "user": "xUSER1x", "assistant": "xASSISTANT1x"}
_SAMPLES = [
    ([{"role": "user", "content": "Hello"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Say yes.\nThen stop."}], True),
    ([{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "{\"b\": 1}"}], False),
]


def turn_format(template: Template) -> TurnFormat:
    """Learn how `template` wraps each message from its renderings of marker conversations, and
    check the result on sample conversations; a UserError if it does not render that way."""
    refusal = UserError(f"template '{template.name}' cannot be written as an Ollama TEMPLATE (it does not wrap "
                        "each message in fixed text); export with --format gguf, whose metadata holds the template")
    s, u, a = ({"role": role, "content": marker} for role, marker in _MARKERS.items())
    u2, a2 = {"role": "user", "content": "xUSER2x"}, {"role": "assistant", "content": "xASSISTANT2x"}

    def pieces(text: str, *markers: str) -> list[str]:
        found = re.split("|".join(markers), text)
        if len(found) != len(markers) + 1 or any(text.count(m) != 1 for m in markers):
            raise refusal
        return found

    def after(text: str, prefix: str) -> str:
        if not text.startswith(prefix):
            raise refusal
        return text[len(prefix):]

    try:
        whole = pieces(template.render([s, u, a, u2, a2]), *(m["content"] for m in (s, u, a, u2, a2)))
        user_after = pieces(template.render([s, u]), s["content"], u["content"])[2]
        asked = pieces(template.render([s, u], add_generation_prompt=True), s["content"], u["content"])[2]
        no_system = pieces(template.render([u], add_generation_prompt=True), u["content"])[0]
    except UserError:  # e.g. a template that refuses system messages
        raise refusal from None
    assistant_after = whole[5]
    user_before = after(whole[3], assistant_after)
    assistant_before = after(whole[2], user_after)
    if not whole[1].endswith(user_before):
        raise refusal
    system_after = whole[1][: len(whole[1]) - len(user_before)]
    bos = template.tokenizer.bos_token
    head = bos if adds_bos(template.tokenizer) and bos and whole[0].startswith(bos) else ""
    system_before = whole[0][len(head):]
    default_system = None
    if no_system != head + user_before:
        inner = after(no_system, head + system_before)
        if not inner.endswith(system_after + user_before):
            raise refusal
        default_system = inner[: len(inner) - len(system_after + user_before)]
    found = TurnFormat(head=head, generation=after(asked, user_after), default_system=default_system,
                       wrap={"system": (system_before, system_after), "user": (user_before, user_after),
                             "assistant": (assistant_before, assistant_after)})
    for messages, add_generation_prompt in _SAMPLES:
        if found.render(messages, add_generation_prompt) != template.render(messages, add_generation_prompt):
            raise refusal
    return found


def ollama_modelfile(template: Template) -> str:
    turns = turn_format(template)
    tokenizer = template.tokenizer
    stops = dict.fromkeys(tokenizer.convert_ids_to_tokens(template.stop_token_ids))
    lines = [
        "# Written by tunelab export: the run's prompt template, stop tokens and default system prompt.",
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{turns.go_template()}"""',
    ]
    if turns.default_system is not None:
        if '"""' in turns.default_system:
            raise UserError(f"template '{template.name}': its default system prompt holds '\"\"\"', "
                            "which a Modelfile cannot quote; export with --format gguf")
        lines.append(f'SYSTEM """{turns.default_system}"""')
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    lines.append("# Greedy decoding, as `tunelab generate` answers.")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
