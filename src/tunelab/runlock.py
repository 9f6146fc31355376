"""The run-folder lock: one training writes a run folder at a time, and no command reads one
while it is being written.

    RUN/training.lock   "PID HOST" of the training that holds it

Training takes an exclusive `flock` on this file for as long as it runs, so a second training
into the same folder is refused before it writes anything, and `tunelab eval`, `generate`,
`export` and `report` refuse a run whose training is still going. The operating system releases
a flock when its process dies, however it dies: a lock file left by a killed training is stale,
and the next training takes it over with a note. The pid and host in the file are for the
messages only; the flock decides.

Under `accelerate launch` only the main process locks (every process writes into the same folder
through it, see train/loop.py).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from tunelab.errors import UserError

LOCK_FILE = "training.lock"
RETRY_S = 0.5
"""How long training retries a held lock before refusing: a reading command holds it shared for
an instant to look, and a training started at that instant should not be refused for it."""


def _holder(path: Path) -> str:
    """'process PID on HOST', as the lock file says, or a plainer phrase for a file cut short."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"


class RunLock:
    """The exclusive lock of a training on its run folder. `with RunLock(folder):` creates the
    folder if needed, takes the lock or refuses (UserError), and releases it at the end, removing
    the lock file and the folder too if the training left nothing else in it."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> RunLock:
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + RETRY_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._forget_folder()
                raise UserError(f"{self.folder}: {_holder(self.path)} is training into this run folder; wait for it "
                                f"to finish, or choose another --out") from None
            # A releasing training removes the file: a lock on a file no longer at the path guards nothing.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = os.read(fd, 200).decode("utf-8", "replace").split()
        if left:
            print(f"tunelab: note: {self.path}: left by {_holder(self.path)}, which has stopped; taking it over",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        # Removed while still held, so no other training can lock the old file in between.
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._forget_folder()

    def _forget_folder(self) -> None:
        """Remove the folder this lock created if nothing else was written in it."""
        if self.created:
            try:
                self.folder.rmdir()
            except OSError:
                pass


def check_not_training(folder: Path | str) -> None:
    """Refuse (UserError) a run folder that a training is writing now; a stale lock file is no
    obstacle."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{folder}: {_holder(path)} is still training this run; wait for it to finish "
                        "(its weights and files are not complete yet)") from None
    finally:
        os.close(fd)
