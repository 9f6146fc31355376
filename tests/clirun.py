"""`run_cli(...)`: a `tunelab ...` command run inside the test process, as a shell would run it in
a new one.

A new Python process spends seconds importing torch and transformers before the command starts;
calling `tunelab.cli.main` spends nothing. The result is the `subprocess.CompletedProcess` that
`subprocess.run(..., capture_output=True, text=True)` gives, so a test reads the same either way.
Tests about a separate process (Ctrl-C, a killed and resumed run, `accelerate launch`, the console
script itself, a process without network) still start one.

What a new process would have fresh is made fresh for the call and put back after it: standard
input (empty unless given, as under pytest), output and error streams, the working directory,
environment variables, and the warning filters (pytest records warnings instead of printing them;
a command's warnings belong on its standard error, where the tests look for them or their absence).
What cannot be made fresh: a library's once-per-process messages (transformers' `warning_once`) show
only in the first command that meets them, so a test that a command prints no warning starts a
new process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock


def run_cli(*args, stdin: str | None = None, cwd: Path | str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`tunelab ARGS...` (each argument is turned into a string): its exit code, standard output and
    standard error. A bug's traceback goes to standard error with exit code 1, as in a process."""
    from tunelab.cli import main

    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    with _fresh_process(io.StringIO(stdin or ""), out, err, cwd, env):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse: exit 2 after a usage error, 0 after --help
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except Exception:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(["tunelab", *argv], code, out.getvalue(), err.getvalue())


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _fresh_process(stdin: io.StringIO, out: io.StringIO, err: io.StringIO, cwd, env) -> Iterator[None]:
    # Library loggers (transformers') keep the stream that was standard error when they were made.
    handlers = _stream_handlers()
    streams = [handler.stream for handler in handlers]
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            # A new interpreter's filters; catch_warnings also forgets which warnings were shown.
            warnings.resetwarnings()
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _show_warning
            if cwd is not None:
                stack.enter_context(contextlib.chdir(cwd))
            stack.enter_context(mock.patch.multiple(sys, stdin=stdin, stdout=out, stderr=err))
            stack.enter_context(mock.patch.dict(os.environ, env or {}))
            for handler in handlers:
                handler.setStream(err)
            yield
    finally:
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)
        for handler in _stream_handlers():  # made during the command: standard error from now on
            if handler.stream is err:
                handler.setStream(sys.stderr)


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [handler for logger in loggers for handler in getattr(logger, "handlers", ())
            if type(handler) is logging.StreamHandler]


def refuses_bad_data_as_train(cli, command: str, data, extra, flags: list, tmp_path) -> None:
    """A missing data file, a folder as the data and a missing --data-extra file: `command` says
    each in one line, exit 2, exactly as `tunelab train` does (flags[4:] are the training flags),
    never as "trained on other data"."""
    for given, extra_flags, wrong in ((tmp_path / "dta.jsonl", ["--data-extra", extra], tmp_path / "dta.jsonl"),
                                      (tmp_path, ["--data-extra", extra], tmp_path),
                                      (data, ["--data-extra", tmp_path / "gone.jsonl"], tmp_path / "gone.jsonl")):
        result = cli(command, given, *flags, *extra_flags)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
        assert result.stderr.startswith(f"tunelab: error: {wrong}: ") and "other data" not in result.stderr
        trained = cli("train", given, *flags[4:], *extra_flags, "--out", tmp_path / "run")
        assert trained.returncode == 2 and trained.stderr == result.stderr
