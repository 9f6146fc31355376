"""Files the pages follow as they grow, and the small readings the pages make of files.

A run's metrics.jsonl and a job's log are read from a byte offset on, so a page's event stream
sends each row once; only complete lines count (training may be writing the next one). Events
go out as server-sent events, which a browser's EventSource reconnects by itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import UserError


def event(kind: str, data: Any) -> str:
    """One server-sent event; JSON never holds a raw newline, so it is one data line."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


def event_stream(events):
    """A stream of server-sent events; a user error on the way (a run deleted while shown) is
    its last event, as the page's message."""
    from starlette.responses import StreamingResponse

    async def guarded():
        try:
            async for item in events:
                yield item
        except UserError as e:
            yield event("error", {"error": str(e)})

    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


def read_rows(path: Path) -> list[dict[str, Any]]:
    rows, _, _ = read_new_rows(path, 0)
    return rows


def read_new_rows(path: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The complete JSON lines of `path` after byte `offset`: (rows, new offset, whether the
    file was replaced, e.g. by a run trained again with --overwrite, and is read from its start)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0, offset > 0
    reset = size < offset
    offset = 0 if reset else offset
    with path.open("rb") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind(b"\n") + 1]
    rows = []
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + len(complete), reset


def read_new_text(path: Path, offset: int) -> tuple[str, int]:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            chunk = f.read(1 << 20)
    except FileNotFoundError:
        return "", offset
    return chunk.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n"), offset + len(chunk)


def source_lines(path: Path, wanted: set[int], max_chars: int = 400) -> dict[int, str]:
    """The text of the given 1-based lines of a text data file (none for Parquet), each cut to
    `max_chars`: the rows the data check's errors point at."""
    if path.suffix.lower() == ".parquet" or not wanted or not path.is_file():
        return {}
    found = {}
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number in wanted:
                text = line.rstrip("\n")
                found[number] = text if len(text) <= max_chars else text[:max_chars] + " ..."
            if number >= max(wanted):
                break
    return found


def histogram_bars(bins: list, width: int = 600, height: int = 160) -> list[dict[str, Any]]:
    """SVG rectangles of the data check's length histogram ([low, high, count] bins)."""
    if not bins:
        return []
    top = max(count for _, _, count in bins) or 1
    step = width / len(bins)
    return [{"x": round(i * step, 1), "w": round(step - 2, 1), "h": round(count / top * height, 1),
             "y": round(height - count / top * height, 1), "low": low, "high": high, "count": count}
            for i, (low, high, count) in enumerate(bins)]


def free_name(path: Path) -> Path:
    """`path`, or `stem-2.suffix`, `stem-3.suffix`, ... : the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
