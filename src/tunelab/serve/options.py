"""The options of `tunelab serve`, apart from the server so that `tunelab --help` builds its
flags without importing starlette or torch. Each field's docstring is its flag's `--help` line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from tunelab.config import Arg, GenerationOptions


class ServeOptions(GenerationOptions):
    """The options of `tunelab serve` (serve/app.py). Without `api_key`, the key is read from
    `api_key_file`, else from $TUNELAB_API_KEY; every request but /health and the page must send
    it. A page of an origin not in `cors_origin` that calls the API is refused with 403."""

    runs: Annotated[list[Path], Arg(positional=True, metavar="RUN")]
    """run folders; each is served as the model named by its folder"""
    host: str = "127.0.0.1"
    """address to bind (any but loopback needs --api-key)"""
    port: int = Field(8000, ge=0, le=65535)
    """port (0 picks a free one)"""
    api_key: str | None = Field(None, min_length=1)
    """key clients send as `Authorization: Bearer KEY` (visible in ps: prefer --api-key-file or $TUNELAB_API_KEY)"""
    api_key_file: Annotated[Path | None, Arg(metavar="FILE")] = None
    """file whose first line is the API key"""
    cors_origin: Annotated[list[str], Arg(metavar="ORIGIN")] = []
    """let web pages of this origin (https://app.example.com) call the API; repeatable"""
    max_queue: int = Field(32, ge=1)
    """requests waiting or answered at once; more get 429"""
    batch_size: int = Field(8, ge=1)
    """most requests answered by one batched generation"""
    rules: Path | None = None
    """YAML moderation rules: input/output words and patterns"""
