"""Exclusive, non-blocking run locks on an output directory (``flock``), shared by ``refresh`` and ``ingest``.

The kernel drops an ``flock`` when its holder exits, however it exits (crash, SIGKILL), so a stale lock file
never blocks the next run; the file only records who holds it, for the error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from segfactory.errors import EXIT_BUSY, UserError


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str, fix: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder) for the duration of the block.

    Args:
        path: Lock file, e.g. ``ROOT/.refresh.lock``.
        busy: What is running when the lock is taken, e.g. ``"another refresh of 'ROOT'"``; the error reads
            ``<busy> is running (pid N on HOST since T); nothing was done``.
        fix: The error's fix line.

    Raises:
        UserError: with exit code ``EXIT_BUSY`` if another process (or another open of the file) holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{busy} is running ({holder}); nothing was done", fix=fix, exit_code=EXIT_BUSY) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since "
                      f"{datetime.now(UTC).isoformat(timespec='seconds')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
