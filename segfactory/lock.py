"""Exclusive, non-blocking run locks on an output directory (``flock``): the one home of the lock every writing
command takes (``render``, ``ingest``, ``run``, ``refresh`` through ``pipelines``; ``pretrain`` and ``finetune``
through :func:`run_dir_lock`). A second run into the same directory stops with exit code 4 (``EXIT_BUSY``).

The kernel drops an ``flock`` when its holder exits, however it exits (crash, SIGKILL), so a stale lock file
never blocks the next run; the file only records who holds it, for the error message.

Network filesystems: on NFS (v4, or v3 with lockd) an ``flock`` is a lock the server holds for every client, so
two drivers on two hosts exclude each other. Mounted with ``nolock`` or ``local_lock=flock|all`` (NFS), or with
``localflock`` (Lustre), the lock only excludes processes of the same host: :func:`exclusive_lock` then warns with
the fix (remount, or run every driver of that output from one host). Lustre mounted without ``flock`` refuses
``flock`` altogether: that stops with one line and the fix instead of a traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from segfactory.console import console
from segfactory.errors import EXIT_BUSY, UserError

MOUNTINFO = Path("/proc/self/mountinfo")
# Lock files (realpaths, os.pathsep-separated) that a launcher holds for its children: `segfactory pretrain` /
# `finetune` with train.devices > 1 take the run lock, then re-run themselves as torchrun ranks, which inherit this
# and so do not try to take the lock their parent holds.
HELD_LOCKS_ENV = "SEGFACTORY_HELD_LOCKS"
# A job SLURM requeued (SLURM_RESTART_COUNT > 0) waits this long for the lock of its previous incarnation: on NFS,
# the lock of a node that died is only freed when its lease runs out (90 s by default).
REQUEUE_WAIT_S = 120.0


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: str, fix: str, wait_s: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created, with its folder) for the duration of the block.

    Args:
        path: Lock file, e.g. ``ROOT/.refresh.lock``.
        busy: What is running when the lock is taken, e.g. ``"another refresh of 'ROOT'"``; the error reads
            ``<busy> is running (pid N on HOST since T); nothing was done``.
        fix: The error's fix line.
        wait_s: Try again for this long (every 0.5 s) before giving up; 0: give up at once.

    Raises:
        UserError: with exit code ``EXIT_BUSY`` if another process (or another open of the file) holds it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file '{path}' ({e.strerror or e})",
                        fix=f"make '{path.parent}' a writable directory") from None
    try:
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise
                    time.sleep(0.5)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{busy} is running ({holder}); nothing was done", fix=fix, exit_code=EXIT_BUSY) from None
        except OSError as e:  # Lustre without -o flock: ENOSYS; some FUSE filesystems: EINVAL/ENOLCK
            raise UserError(f"the filesystem of '{path}' does not support locks ({e.strerror or e})",
                            fix="mount it with -o flock (Lustre) or with locking on (NFS: no 'nolock'), or put the "
                                "output on a filesystem with locks") from None
        local = local_only_locking(path)
        if local:
            console.print(f"[yellow]warning:[/] '{path.parent}' is on {local}: its locks exclude only runs on this "
                          f"host ({os.uname().nodename}); run every driver of this output from this host, or remount "
                          "with cluster-wide locks (NFS: without nolock/local_lock; Lustre: -o flock)", soft_wrap=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename} since "
                      f"{datetime.now(UTC).isoformat(timespec='seconds')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def run_dir_lock(out: Path, command: str, fix: str) -> Iterator[None]:
    """The run lock of a training command (``OUT/.<command>.lock``) for the duration of the block.

    Under ``torchrun`` only one process takes it: the launcher that re-ran itself as ranks (they find its lock in
    ``HELD_LOCKS_ENV``), or else global rank 0 (``torchrun`` started by hand or by SLURM); the other ranks run
    inside rank 0's lock. While it is held, ``HELD_LOCKS_ENV`` names it, so the ranks a launcher starts inherit it.
    A job SLURM requeued waits up to ``REQUEUE_WAIT_S`` for its previous incarnation's lock to go.

    Args:
        out: The run directory (created if missing).
        command: The command, e.g. ``"pretrain"``: names the lock file and the error.
        fix: The error's fix line.

    Raises:
        UserError: exit code ``EXIT_BUSY`` while another run holds it.
    """
    path = out / f".{command}.lock"
    key = os.path.realpath(path)
    held = [p for p in os.environ.get(HELD_LOCKS_ENV, "").split(os.pathsep) if p]
    if key in held or os.environ.get("RANK", "0") != "0":
        yield  # the launcher or rank 0 holds it
        return
    wait = REQUEUE_WAIT_S if os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0") else 0.0
    with exclusive_lock(path, f"another {command} into '{out}'", fix=fix, wait_s=wait):
        before = os.environ.get(HELD_LOCKS_ENV)
        os.environ[HELD_LOCKS_ENV] = os.pathsep.join([*held, key])
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(HELD_LOCKS_ENV, None)
            else:
                os.environ[HELD_LOCKS_ENV] = before


def local_only_locking(path: Path, mountinfo: str | None = None) -> str | None:
    """Whether ``path`` is on a network filesystem whose locks only work within one host.

    Args:
        path: A path on the filesystem (it must exist).
        mountinfo: The text of ``/proc/self/mountinfo`` (default: read it).

    Returns:
        ``"<fstype> mounted with <option>"`` for NFS mounted ``nolock`` or ``local_lock=flock|all`` and Lustre
        mounted ``localflock``; None otherwise (local filesystems, cluster-wide locks, or no mount table).
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[str, str, set[str]] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 6:
            continue
        head, tail = line.split(" - ", 1)
        point = head.split()[4].replace("\\040", " ")
        fstype, _source, *rest = tail.split()
        opts = set(head.split()[5].split(",")) | set(rest[0].split(",") if rest else [])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype, opts)
    if best is None:
        return None
    _, fstype, opts = best
    if fstype.startswith("nfs"):
        for opt in ("nolock", "local_lock=flock", "local_lock=all"):
            if opt in opts:
                return f"{fstype} mounted with {opt}"
    if fstype == "lustre" and "localflock" in opts:
        return "lustre mounted with localflock"
    return None
