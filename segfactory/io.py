"""Crash-safe file output: write to a temporary name, fsync, rename into place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make outputs unreadable to the group
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_hash(obj: Any, length: int = 16) -> str:
    """Stable hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def commit_dir(tmp_dir: str | os.PathLike[str], final_dir: str | os.PathLike[str]) -> None:
    """Atomically move a fully written directory into place (and make the rename durable).

    ``final_dir`` must not exist with content: a committed unit is never overwritten. A leftover
    ``final_dir`` without its commit mark is the caller's to remove first.
    """
    os.replace(tmp_dir, final_dir)
    _fsync_dir(Path(final_dir).parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory below ``root`` (what a commit must do before its mark is trusted)."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


# ------------------------------------------------------------------------------------------ committed units
# One protocol for every directory-shaped output that readers trust (render shards, ingest shards, pipeline
# stages): a unit is written into a fresh attempt directory ``PARENT/.tmp-<id>-<random>`` next to its final place,
# its commit mark (``manifest.json``; ``stage.json`` for pipeline stages) is written last, everything is fsynced,
# and the directory is renamed to ``PARENT/<id>``. A directory without its mark is not a unit: readers skip it and
# writers remove it. A unit is deleted by renaming it to ``PARENT/.trash-<id>-<random>`` first (atomic: the unit
# is gone at once, never half there), then deleting the trash; a kill in between leaves only trash, which the next
# writer empties (:func:`empty_trash`). A unit found corrupt is moved aside to ``PARENT/.bad-<id>-<random>``
# (kept for inspection, never read), so a re-run rebuilds it.

MANIFEST_FILE = "manifest.json"
ATTEMPT_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
BAD_PREFIX = ".bad-"


def is_committed(unit_dir: str | os.PathLike[str], mark: str = MANIFEST_FILE) -> bool:
    """Whether ``unit_dir`` holds its commit mark (``mark``, by default its manifest)."""
    return (Path(unit_dir) / mark).is_file()


def committed_units(parent: str | os.PathLike[str], mark: str = MANIFEST_FILE) -> list[str]:
    """Sorted names of the committed units in ``parent`` (hidden attempt, trash and bad directories never are)."""
    d = Path(parent)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and is_committed(p, mark))


def new_attempt_dir(parent: str | os.PathLike[str], unit_id: str) -> Path:
    """A fresh, empty attempt directory for ``unit_id`` on the same filesystem as its final place."""
    import uuid

    tmp = Path(parent) / f"{ATTEMPT_PREFIX}{unit_id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def remove_stale_attempts(parent: str | os.PathLike[str], unit_id: str | None = None,
                          uncommitted: bool = False) -> list[str]:
    """Delete leftovers of interrupted writes: attempt directories (all, or those of one unit), with all of them
    the trash of interrupted deletions, and, with ``uncommitted``, unit directories that lack their manifest.
    Returns the names removed."""
    d = Path(parent)
    if not d.is_dir():
        return []
    prefix = f"{ATTEMPT_PREFIX}{unit_id}-" if unit_id else ATTEMPT_PREFIX
    removed = [] if unit_id else empty_trash(d)
    for p in sorted(d.iterdir()):
        stale = p.name.startswith(prefix) or (uncommitted and unit_id is None and p.is_dir()
                                              and not p.name.startswith(".") and not is_committed(p))
        if stale and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def commit_unit(tmp: str | os.PathLike[str], final: str | os.PathLike[str], mark: str = MANIFEST_FILE) -> bool:
    """Commit a fully written attempt directory (its commit mark ``mark`` written last) as ``final``.

    Everything below ``tmp`` is fsynced first, so a committed unit survives a power loss. A ``final`` that
    exists without its mark (an interrupted copy by hand, a foreign directory) is moved to the trash first.

    Returns:
        False if another attempt already committed the same unit (a retried task racing a straggler): this
        attempt is then discarded.
    """
    tmp, final = Path(tmp), Path(final)
    if not is_committed(tmp, mark):
        raise RuntimeError(f"refusing to commit {tmp}: no {mark}")
    if final.exists():
        if is_committed(final, mark):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        discard_unit(final)
    fsync_tree(tmp)
    try:
        commit_dir(tmp, final)
    except OSError:
        if is_committed(final, mark):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    return True


def _aside_name(path: Path, prefix: str) -> Path:
    import uuid

    return path.parent / f"{prefix}{path.name}-{uuid.uuid4().hex[:8]}"


def move_to_trash(path: str | os.PathLike[str]) -> Path:
    """Rename ``path`` (a unit, or any file or directory) to a trash name next to it, durably; returns the new
    name. From this moment the unit does not exist for any reader; :func:`empty_trash` deletes it."""
    path = Path(path)
    trash = _aside_name(path, TRASH_PREFIX)
    os.replace(path, trash)
    _fsync_dir(path.parent)
    return trash


def discard_unit(path: str | os.PathLike[str]) -> None:
    """Delete a unit crash-safely: rename it to the trash (atomic), then delete the trash. A kill during the
    deletion leaves only a ``.trash-`` directory, never a unit with its mark but without its files."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    remove_tree(move_to_trash(path))


def empty_trash(parent: str | os.PathLike[str]) -> list[str]:
    """Finish deletions a kill interrupted: delete every ``.trash-`` entry in ``parent``. Returns their names."""
    d = Path(parent)
    if not d.is_dir():
        return []
    removed = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(TRASH_PREFIX):
            remove_tree(p)
            removed.append(p.name)
    return removed


def move_aside(path: str | os.PathLike[str]) -> Path:
    """Rename a corrupt unit to ``.bad-<name>-<random>`` next to it (kept for inspection; no reader or writer
    treats it as a unit, so a re-run rebuilds the unit). Returns the new path."""
    path = Path(path)
    bad = _aside_name(path, BAD_PREFIX)
    os.replace(path, bad)
    _fsync_dir(path.parent)
    return bad


def check_files(unit_dir: str | os.PathLike[str], expected: dict[str, str]) -> list[str]:
    """Re-hash a unit's files against the sha256 its commit mark recorded.

    Args:
        unit_dir: The unit's directory.
        expected: ``{path relative to unit_dir: sha256}``.

    Returns:
        One line per file that is missing, unreadable or differs (empty: the unit is intact).
    """
    problems = []
    for rel, digest in expected.items():
        path = Path(unit_dir) / rel
        try:
            actual = sha256_file(path)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        except OSError as e:
            problems.append(f"{rel}: unreadable ({e.strerror or e})")
            continue
        if actual != digest:
            problems.append(f"{rel}: sha256 {actual[:12]} differs from the recorded {digest[:12]} (corrupt)")
    return problems


def file_checksums(root: str | os.PathLike[str], exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``root`` (sorted), except the names in ``exclude``."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() not in exclude}


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Delete a file or directory tree, ignoring what is already gone (use :func:`discard_unit` for units)."""
    p = Path(path)
    if p.is_symlink() or p.is_file():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove it is writable, or raise a UserError naming it."""
    from segfactory.errors import UserError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"output directory '{path}' is not writable ({e.strerror or e})",
            fix="choose another --out or fix its permissions",
        ) from None
    return path


@contextlib.contextmanager
def waiting_lock(path: Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed), waiting as long as another process holds it,
    and yield its file descriptor (a caller may hand it down to a child process, which then holds it too).

    For one writer at a time where waiting is the right answer (a pipeline stage's attempts, the sample cache's
    splits); :func:`segfactory.lock.exclusive_lock` is the one that refuses at once with exit code 4. Standard
    library only (the sample cache uses it without the CLI's packages).
    """
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the flock (once every process holding the descriptor has closed it)
