"""The options of `tunelab ui`, apart from the app so that `tunelab --help` builds its flags
without importing starlette or jinja2. Each field's docstring is its flag's `--help` line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field

from tunelab.config import Arg, Options


class UIOptions(Options):
    """The options of `tunelab ui` (ui/app.py). The runs folder is made if missing, and its jobs
    live in RUNS/.jobs; uploads go to the data folder."""

    runs: Annotated[Path, Arg(metavar="DIR")] = Path("runs")
    """folder of run folders"""
    data: Annotated[Path, Arg(metavar="DIR")] = Path("data")
    """folder of data files"""
    host: str = "127.0.0.1"
    """address to bind (any other needs a key: --api-key, or one printed at start)"""
    port: int = Field(7860, ge=0, le=65535)
    """port (0 picks a free one)"""
    jobs: int = Field(1, ge=1)
    """trainings and evaluations run at once; the rest wait in order"""
    api_key: str | None = Field(None, min_length=1)
    """key to log in with off loopback (open /?key=KEY once)"""
    cwd: Annotated[Path, Arg(flag=False)] = Field(default_factory=Path.cwd)
    """where jobs run: the folder the relative paths above are relative to (the current one)"""
