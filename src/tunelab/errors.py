"""Errors a user can cause. The CLI prints them as one line each and exits with code 2.

The checks below look at output paths before any long work (a model load, a data check,
training, generation) starts, so a bad path never costs the time already spent. Library
warnings that no user can act on are hidden where they arise (`known_warnings_hidden`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

KNOWN_HARMLESS_WARNINGS = [
    # peft asks each model whether gradient checkpointing is on through the property name that
    # transformers 5 deprecated; nothing for a tunelab user to change.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    # transformers 5 renamed gradient_checkpointing_enable; the new name is not in every 5.x that
    # tunelab accepts, so the old one is called and its notice dropped.
    (FutureWarning, r"`gradient_checkpointing_enable` is deprecated", r"transformers\.modeling_utils"),
]
"""(category, message regex, module regex) of library warnings that tunelab does not show."""


def hide_known_warnings() -> None:
    """Drop the known harmless warnings for the rest of the process (the CLI's own process)."""
    for category, message, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


@contextlib.contextmanager
def known_warnings_hidden() -> Iterator[None]:
    """Drop the known harmless warnings inside the block only: the Python API calls libraries
    within it and leaves the caller's warning filters, and the caller's own warnings, as they were."""
    with warnings.catch_warnings():
        hide_known_warnings()
        yield


class UserError(Exception):
    """A mistake in the user's data, paths or flags: shown without a traceback."""

    def __init__(self, message: str, details: list[str] | None = None):
        super().__init__(message)
        self.details = details or []

    def lines(self) -> list[str]:
        return [str(self), *self.details]


def check_not_broken_link(path: Path | str) -> None:
    """A path that does not exist because it is a link to nothing is said so, not "not found":
    the user sees a name that is there (`ls` lists it)."""
    if Path(path).is_symlink() and not Path(path).exists():
        raise UserError(f"{path}: a link to nothing (its target is missing, or links loop)")


def check_output_folder(folder: Path | str, flag: str) -> None:
    """Refuse a folder that cannot be created or written to: a file in its place, a file above
    it, or a folder the user may not write in."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: is a file, not a folder; choose another {flag}")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is a file, so no folder can be made under it; "
                        f"choose another {flag}")
    _check_writable(existing, f"{flag} {folder}")


def check_output_file(path: Path | str, flag: str) -> None:
    """Refuse a file that cannot be written: a folder in its place, a missing or read-only
    folder around it. The file itself is not created or truncated here."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name a file inside it")
    parent = path.parent
    if not parent.exists():
        raise UserError(f"{flag} {path}: folder {parent} does not exist; create it (mkdir -p {parent}) "
                        f"or choose another {flag}")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the file is read-only; choose another {flag}")
    _check_writable(parent, f"{flag} {path}")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_writable(folder: Path, what: str) -> None:
    # Creating a file is the only reliable test: permission bits, ACLs, read-only mounts and
    # full disks all show up here, where os.access would miss some of them.
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".tunelab-write-test-"):
            pass
    except OSError as e:
        reason = e.strerror.lower() if e.strerror else type(e).__name__
        raise UserError(f"{what}: cannot write in {folder} ({reason}); choose a folder you can write to") from None


KERNEL_FOLDERS = (Path("/proc"), Path("/sys"))
"""Views of the kernel, not folders for files: writing there fails or, worse, changes a setting."""


def check_not_kernel_folder(path: Path | str, flag: str) -> None:
    """Refuse an output path in /proc or /sys before any other check (their errors say little)."""
    path = Path(path).absolute()
    for folder in KERNEL_FOLDERS:
        if path == folder or folder in path.parents:
            raise UserError(f"{flag} {path}: {folder} is the kernel's view of the system, not a folder for files; "
                            f"choose a folder on disk")


def check_output_beside(path: Path, flag: str, value: Path | str, role: str, folder: bool = False) -> None:
    """Refuse a file (or, with `folder`, a folder) that a command writes beside its output
    `flag value` (a cache, a decisions file) when a folder (a file) stands in its place or it
    cannot be written; the message names the flag to change."""
    where = f"{flag} {value}: {role} {path}"
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{where} is a file; move it away or choose another {flag}")
    if not folder and path.is_dir():
        raise UserError(f"{where} is a folder; move it away or choose another {flag}")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{where} is read-only; make it writable or choose another {flag}")
    container = path if folder and path.is_dir() else path.parent
    if container.is_dir():
        _check_writable(container, where)
