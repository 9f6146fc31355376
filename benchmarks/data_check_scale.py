"""`tunelab data check` at scale: time and peak memory on a generated JSONL of a million lines.

    PYTHONPATH=src python benchmarks/data_check_scale.py                      # 10k, 100k and 1M lines
    PYTHONPATH=src python benchmarks/data_check_scale.py --lines 100000 --token-lines 2000

The file holds booking-extraction examples (tunelab.demo.bookings, in chunks of 50,000 with
different seeds, so chunks repeat some rows: real exact and near duplicates), plus 10 broken
lines. Each check runs in a fresh process, exactly the command a user runs, and reports its own
wall time and peak resident memory (getrusage ru_maxrss). Format and duplicate checks run on
every size; the token-level checks (tokenizer + template per example, with --base) are measured
on the first --token-lines lines, since they cost about a millisecond per example.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 50_000


def write_data(path: Path, lines: int) -> None:
    from tunelab.demo import bookings

    written, seed = 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < lines:
            for row in bookings.make_examples(min(CHUNK, lines - written), seed=seed):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
                if written % (lines // 10 or 1) == 0 and written // (lines // 10 or 1) <= 10:
                    f.write('{"prompt": "broken line", "completion": }\n')
            seed += 1


def head(source: Path, target: Path, lines: int) -> None:
    with source.open(encoding="utf-8") as f, target.open("w", encoding="utf-8") as out:
        for _, line in zip(range(lines), f):
            out.write(line)


def child(argv: list[str]) -> None:
    """Run one `tunelab data check` in this process; print its time and peak memory as JSON."""
    import contextlib
    import io

    from tunelab.cli import main

    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["data", "check", *argv])
    seconds = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(json.dumps({"exit_code": code, "seconds": round(seconds, 1), "peak_mib": round(peak_mib)}))


def measure(data: Path, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", str(data), "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "data_check.json").read_text())
    return {**measured, "rows": report["rows"], "errors": sum(report["error_counts"].values()),
            "exact_duplicates": report["duplicates"]["exact"]["count"],
            "near_duplicate_pairs": report["duplicates"]["near"]["count"],
            "train": report["split"]["train"], "test": report["split"]["test"],
            "mib_file": round(data.stat().st_size / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--token-lines", type=int, default=20_000, help="lines for the token-level run (0: none)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    print(f"{os.cpu_count()} CPUs; {sys.version.split()[0]}")
    print(f"{'lines':>9} {'checks':<24} {'MiB file':>8} {'seconds':>8} {'lines/s':>8} {'peak MiB':>8} "
          f"{'errors':>6} {'exact dup':>9} {'near pairs':>10} {'train/test':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        largest = tmp / "data.jsonl"
        write_data(largest, max(args.lines))
        runs = [(n, "format + duplicates", []) for n in sorted(args.lines)]
        if args.token_lines:
            runs.append((args.token_lines, "+ tokens (--base)", ["--base", args.base, "--max-length", "256"]))
        for n, label, extra in runs:
            data = tmp / f"data-{n}.jsonl"
            head(largest, data, n)
            row = measure(data, tmp / f"report-{n}-{len(extra)}", extra)
            print(f"{n:>9} {label:<24} {row['mib_file']:>8} {row['seconds']:>8} {round(n / row['seconds']):>8} "
                  f"{row['peak_mib']:>8} {row['errors']:>6} {row['exact_duplicates']:>9} "
                  f"{row['near_duplicate_pairs']:>10} {row['train']:>7}/{row['test']:<7}", flush=True)


if __name__ == "__main__":
    main()
