"""`tunelab data check` at scale: time and peak memory on a generated JSONL of a million lines.

    PYTHONPATH=src python benchmarks/data_check_scale.py                      # 10k, 100k and 1M lines
    PYTHONPATH=src python benchmarks/data_check_scale.py --lines 100000 --token-lines 2000
    git archive COMMIT src | tar -x -C /tmp/old   # then, the same files checked by both, in turns:
    PYTHONPATH=src python benchmarks/data_check_scale.py --lines 1000000 --token-lines 0 --compare-src /tmp/old/src

The file holds booking-extraction examples (tunelab.demo.bookings, in chunks of 50,000 with
different seeds, so chunks repeat some rows: real exact and near duplicates), plus 10 broken
lines. Each check runs in a fresh process, exactly the command a user runs, and reports its own
wall time, CPU time and peak resident memory (getrusage): `cpu s` the checking process's CPU
seconds (user + system) and `worker` its worker processes' together, `peak MiB` the checking
process's resident peak and `worker` the largest worker's (a file of over 64 MiB is checked in
parts, one process per usable core; 0: the check ran in one process). On a machine shared with
other work the wall time depends on the load; the CPU time less (it grows too where cores and
caches are shared): on an idle machine a single process takes about its CPU time, and a check in
parts about the workers' CPU time (with the checking process's until the last part is joined)
shared by the cores, plus the checking process's CPU time after it: the line under each such
check prints that estimate. Format and duplicate checks run on
every size; the token-level checks (tokenizer + template per example, with --base) are measured
on the first --token-lines lines, since they cost about a millisecond per example. With
--compare-src, each check runs again right after with tunelab from another source tree (an
older commit), and the ratio of their times is printed.
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
    from tunelab.data import check

    def cpu() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        return own.ru_utime + own.ru_stime

    # When the workers' last part is joined: what the checking process does before overlaps them,
    # what it does after does not.
    joined = {}
    in_parts = check._scan_in_parallel

    def marked(*args, **kwargs):
        yield from in_parts(*args, **kwargs)
        joined.update(seconds=time.perf_counter() - started, cpu=cpu() - cpu_before)

    check._scan_in_parallel = marked
    cpu_before = cpu()  # the imports are not the check's
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["data", "check", *argv])
    seconds = time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"exit_code": code, "seconds": round(seconds, 2), "peak_mib": round(own.ru_maxrss / 1024),
                      "worker_mib": round(workers.ru_maxrss / 1024),  # Linux reports KiB; the largest worker's
                      "cpu": round(own.ru_utime + own.ru_stime - cpu_before, 2),
                      "worker_cpu": round(workers.ru_utime + workers.ru_stime, 2),
                      "joined_seconds": round(joined.get("seconds", 0), 2),
                      "joined_cpu": round(joined.get("cpu", 0), 2)}))


def measure(data: Path, out: Path, extra: list[str], src: str | None = None) -> dict:
    command = [sys.executable, __file__, "--child", str(data), "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": src} if src else None
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    report = json.loads((out / "data_check.json").read_text())
    return {**measured, "rows": report["rows"], "errors": sum(report["error_counts"].values()),
            "exact_duplicates": report["duplicates"]["exact"]["count"],
            "near_duplicate_pairs": report["duplicates"]["near"]["count"],
            "train": report["split"]["train"], "test": report["split"]["test"],
            "mib_file": round(data.stat().st_size / 2**20)}


def idle_estimate(row: dict, lines: int) -> str:
    """The parts' phase and what follows it, and the time on idle cores they add up to: the
    workers' CPU seconds and the checking process's until the last part is joined shared by the
    usable cores, then the checking process's own (an estimate, for a machine shared with other
    work, where the wall time says little)."""
    cores = len(os.sched_getaffinity(0))
    after = row["cpu"] - row["joined_cpu"]
    estimate = (row["worker_cpu"] + row["joined_cpu"]) / cores + after
    return (f"parts joined at {row['joined_seconds']} s ({row['joined_cpu']} CPU s here), then {after:.2f} CPU s; "
            f"on {cores} idle cores ~{estimate:.1f} s, ~{round(lines / estimate, -3):,.0f} lines/s (estimated)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--token-lines", type=int, default=20_000, help="lines for the token-level run (0: none)")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--compare-src", default=None, help="also check with tunelab from this src folder")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs; {sys.version.split()[0]}; load average {load}")
    print(f"{'lines':>9} {'checks':<24} {'MiB file':>8} {'seconds':>8} {'lines/s':>8} {'cpu s':>6} {'worker':>6} "
          f"{'peak MiB':>8} {'worker':>6} {'errors':>6} {'exact dup':>9} {'near pairs':>10} {'train/test':>15}")
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
            sources = [("", None), (" (compared)", args.compare_src)] if args.compare_src else [("", None)]
            seconds, cpu = [], []
            for tag, src in sources:
                row = measure(data, tmp / f"report-{n}-{len(extra)}{tag.strip(' ()')}", extra, src)
                seconds.append(row["seconds"])
                cpu.append(row["cpu"] + row["worker_cpu"])
                print(f"{n:>9} {label + tag:<24} {row['mib_file']:>8} {row['seconds']:>8} "
                      f"{round(n / row['seconds']):>8} {row['cpu']:>6} {row['worker_cpu']:>6} "
                      f"{row['peak_mib']:>8} {row['worker_mib']:>6} {row['errors']:>6} {row['exact_duplicates']:>9} "
                      f"{row['near_duplicate_pairs']:>10} {row['train']:>7}/{row['test']:<7}", flush=True)
                if row.get("joined_seconds"):  # checked in parts
                    print(f"{'':>9} {'':<24} {idle_estimate(row, n)}", flush=True)
            if len(seconds) == 2:
                print(f"{'':>9} {'compared / this':<24} {seconds[1] / seconds[0]:.2f}x the time, "
                      f"{cpu[1] / cpu[0]:.2f}x the CPU time", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
