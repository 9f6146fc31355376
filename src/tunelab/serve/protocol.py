"""The OpenAI API as `tunelab serve` speaks it: the request bodies it accepts, the limits it
checks them against, and the response objects and errors it answers with.

Every field is checked at the door, so a request the generation loop could not answer (a seed
beyond 64 bits, a NaN temperature, a thousand stop strings) is a 400 naming the field and its
limit, never a failure half-way through a batch that other requests share. Fields OpenAI
defines and tunelab does not honour are refused, never ignored (`Sampling.refuse_unsupported`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_BODY_BYTES = 1 << 20
"""Largest request body accepted (413 beyond)."""
MAX_MESSAGES = 1024
"""Most messages one chat request may hold."""
MAX_CHARACTERS = 200_000
"""Most characters the messages (or the prompt) of one request may hold in all; far more than
any served context holds, and bounds the work of rendering and tokenizing a request."""
MAX_TOKENS = 2048
"""Largest max_tokens a request may ask for."""
DEFAULT_MAX_TOKENS = 256
"""max_tokens of a request that gives none (less where the context has less room)."""
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 200
"""Longest stop string, in characters."""
SEEDS = (-(2**63), 2**64 - 1)
"""The seeds a random generator takes (torch's Generator.manual_seed)."""


class Refused(Exception):
    """A request the server answers with an OpenAI-shaped error instead of generating."""

    def __init__(self, message: str, status: int = 400, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.code, self.param, self.kind = message, status, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)


class Message(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise Refused(f"message content of type {part.get('type')!r} is not supported; send text")
            parts.append(part["text"])
        return "".join(parts)


NEUTRAL = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
           "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
           "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}
"""OpenAI's fields that tunelab does not honour, with the values that ask for nothing."""


class Sampling(BaseModel):
    """What chat and completion requests share."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1])
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise Refused(f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise Refused(f"stop: a stop string is at most {MAX_STOP_LENGTH} characters", param="stop")
        return tuple(s for s in stop if s)

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise Refused(f"n={self.n}: this server returns one choice per request; send n=1 (or leave it out)",
                          param="n")
        extra = self.model_extra or {}
        response_format = extra.get("response_format")
        kind = response_format.get("type", "text") if isinstance(response_format, dict) else response_format
        if response_format is not None and kind != "text":
            raise Refused(f"response_format {kind!r} is not supported: this server does not constrain "
                          "generation to JSON; leave response_format out and validate the answer",
                          param="response_format")
        for name, neutral in NEUTRAL.items():
            if name in extra and extra[name] not in neutral:
                raise Refused(f"{name} is not supported by this server; leave it out", param=name)

    def conversation(self) -> list[dict[str, str]]:
        """The request as the template renders it, within the server's size limits."""
        raise NotImplementedError


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)

    def conversation(self) -> list[dict[str, str]]:
        found = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
        if (size := sum(len(m["content"]) for m in found)) > MAX_CHARACTERS:
            raise Refused(f"messages: {size} characters in all, over this server's limit of {MAX_CHARACTERS}",
                          param="messages")
        return found


class CompletionRequest(Sampling):
    prompt: str | list[str]

    def conversation(self) -> list[dict[str, str]]:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise Refused("prompt: send one prompt per request", param="prompt")
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        if len(text) > MAX_CHARACTERS:
            raise Refused(f"prompt: {len(text)} characters, over this server's limit of {MAX_CHARACTERS}",
                          param="prompt")
        return [{"role": "user", "content": text}]


def parse(body: bytes, kind: type[Sampling]) -> Sampling:
    """The request body as `kind`, or a 400 naming the first field that is wrong."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise Refused(f"{where}: {first['msg']}", param=where) from None


@dataclass
class Reply:
    """OpenAI's response objects for one request."""

    chat: bool
    id: str
    model: str
    prompt_tokens: int
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self, answer) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": answer.generated_tokens,
                "total_tokens": self.prompt_tokens + answer.generated_tokens}

    def whole(self, answer) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": answer.text},
                      "finish_reason": answer.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": answer.text, "finish_reason": answer.finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": self.usage(answer)}

    def chunk(self, text: str, finish_reason: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}
