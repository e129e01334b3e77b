"""Ingestion core: raw image dump -> validated, deduplicated, normalized image shards.

Pure functions over one unit of work (a list of files, one shard); ``pipelines/ingest.py`` runs them on Dask.
The output layout, its writer and readers are the ingest store format, :mod:`segfactory.formats.images`.
"""

from __future__ import annotations

import errno
import importlib
import io
import math
import os
import re
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segfactory.errors import UserError
from segfactory.formats.imagefile import apply_orientation, exif_orientation, stretch_range
from segfactory.formats.images import MANIFEST_FILE, UNCHANGED_KIND, ImageShardWriter, shards_dir
from segfactory.io import is_committed, read_json, sha256_bytes

LIST_SUFFIXES = (".txt", ".lst", ".list")
# Read errors that may be gone by the next run (permissions fixed, a flaky disk or network filesystem back):
# the file is reported, and re-examined by the next run instead of being rejected forever. The second line is what
# network filesystems return while their server or daemon is away: ENOTCONN from a FUSE mount (sshfs, s3fs,
# gcsfuse, rclone) whose daemon died, connection errors from CIFS/SMB, ENOLINK/ECOMM/EREMOTEIO from NFS and CIFS,
# ENOMEDIUM from removed media.
TRANSIENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT,
                              errno.ESTALE, errno.ENOENT, errno.EINTR, errno.ENXIO, errno.EHOSTDOWN,
                              errno.ENOTCONN, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                              errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENOLINK, errno.ECOMM,
                              errno.EREMOTEIO, errno.ENOMEDIUM, errno.ESHUTDOWN})
# Rejection kinds that depend on ``checks.*`` limits: a re-run re-examines such a file when one of these changed.
LIMITS_OF_KIND: dict[str, tuple[str, ...]] = {
    "too_large": ("max_file_mb",), "bomb": ("max_pixels", "max_file_pixels"), "too_small": ("min_side",),
    "timeout": ("decode_timeout_s",), "memory": ("decode_memory_mb",), "crashed": ("decode_memory_mb",),
}
# The limits that cut a TIFF stack short (a ``pages_dropped`` note): raising one re-examines the stack.
PAGE_LIMITS = ("max_pages", "max_file_pixels")
# Rejection kinds that depend on which decoders there are (:func:`decoder_set`): a re-run re-examines such a file
# when the decoder set changed (a ``decode.plugins`` module added, removed or upgraded).
DECODER_KINDS = frozenset({"not_image"})
# The formats :func:`sniff` recognises without plugins (part of :func:`decoder_set`: add one here with its sniff).
BUILTIN_FORMATS = ("jpeg", "png", "tiff", "webp", "bmp", "gif")


class Rejected(Exception):
    """A file that is skipped (and reported) rather than ingested.

    Args:
        kind: Short category: empty, not_image, unsupported, corrupt, bomb, too_small, too_large, unreadable,
            timeout, memory, crashed; pages_dropped (a stack re-examined under raised limits takes no more slices).
        reason: Human-readable detail.
        transient: The cause may be gone by the next run (a read error such as EACCES or EIO): the next run
            tries the file again.
    """

    def __init__(self, kind: str, reason: str, transient: bool = False):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.transient = transient


def read_error(e: OSError, what: str = "cannot read") -> Rejected:
    """An ``unreadable`` rejection for an OS error, transient for EACCES, EIO and the like."""
    code = e.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else None
    transient = code in TRANSIENT_ERRNOS
    tail = f" [{name}]" if name else ""
    retry = "; the next run tries again" if transient else ""
    return Rejected("unreadable", f"{what}: {e.strerror or e}{tail}{retry}", transient=transient)


def needs_reexamination(rec: dict[str, Any], checks: dict[str, Any], decoders: list[str] | None = None) -> bool:
    """Whether a re-run looks at a rejected file again: its error was transient, or it was judged under
    ``checks.*`` limits that have changed since (records without limits predate this and are re-examined), or,
    given ``decoders`` (this run's :func:`decoder_set`), a ``not_image`` was judged under another decoder set
    (a plugin for its format has been added since; records without one predate this and are re-examined).

    A ``pages_dropped`` note (a stack ingested without its later slices) is re-examined when ``max_pages`` or
    ``max_file_pixels`` was raised since: the slices not taken yet are then offered again (lowering them never
    removes slices already stored).
    """
    if rec.get("transient"):
        return True
    if rec.get("kind") in DECODER_KINDS:
        return decoders is not None and rec.get("decoders") != decoders
    if rec.get("kind") == "pages_dropped":
        judged = rec.get("checks")
        if not isinstance(judged, dict):
            return True
        return any(checks.get(f, 0) > judged.get(f, 0) for f in PAGE_LIMITS)
    fields = LIMITS_OF_KIND.get(rec.get("kind", ""))
    if not fields:
        return False
    judged = rec.get("checks")
    if not isinstance(judged, dict):
        return True
    return any(judged.get(f) != checks.get(f) for f in fields)


def decoder_set(plugins: list[str]) -> list[str]:
    """What decides whether a file is an image at all, recorded with each ``not_image`` rejection: the built-in
    formats, then each ``decode.plugins`` module with the version of the installed distribution that provides it
    (``pillow_heif.HeifImagePlugin==0.18.0``; a module of no distribution is named alone).

    Args:
        plugins: ``decode.plugins``.

    Returns:
        E.g. ``["builtin:jpeg,png,tiff,webp,bmp,gif", "pillow_heif.HeifImagePlugin==0.18.0"]``.
    """
    out = ["builtin:" + ",".join(BUILTIN_FORMATS)]
    if plugins:
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        dists = packages_distributions()
        for name in plugins:
            versions = []
            for dist in sorted(set(dists.get(name.partition(".")[0], []))):
                try:
                    versions.append(f"{dist}-{version(dist)}")
                except PackageNotFoundError:
                    continue
            out.append(name + ("==" + ",".join(versions) if versions else ""))
    return out


# ------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One input file as seen when listing the source (its identity for incremental runs); slots keep a
    million of them small."""

    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


@dataclass
class Discovery:
    """What listing a source found.

    Attributes:
        files: The files, absolute paths, sorted.
        skipped_links: ``(path, why)`` of symbolic links that were not followed (loops, links out of the source
            folder, broken links) and folders that could not be listed.
    """

    files: list[SourceFile]
    skipped_links: list[tuple[str, str]] = field(default_factory=list)


class _WalkProgress:
    """What the walk is doing now, for the watchdog of :func:`discover`: the folder (or listed file) it is at and
    a count of the system calls it finished. Written by the walking thread, read by the watching one."""

    __slots__ = ("base", "entries", "ops", "where")

    def __init__(self, where: str) -> None:
        self.where = where
        self.ops = 0
        self.entries: list[os.DirEntry[str]] | None = None  # the folder's entries being stat'ed, from ops = base
        self.base = 0

    def current(self) -> str:
        """The path the walk is stuck at: the entry being stat'ed (a mount point below the folder: its ``stat``
        is what hangs on a dead share), else the folder or link. Derived from the per-entry count, so that the
        walk pays no extra store per file."""
        entries, i = self.entries, self.ops - self.base - 1
        if entries is not None and 0 <= i < len(entries):
            return entries[i].path
        return self.where


def discover(src: str, extensions: list[str] | None = None, follow_symlinks: str = "inside",
             max_files: int = 10_000_000, walk_timeout_s: float | None = None) -> Discovery:
    """List the files of a source: a folder (recursive), a glob, or a text file with one path per line.

    Hidden files and folders (``.name``) are skipped. Paths are absolute and sorted. Folder and glob sources are
    walked once each (a link loop, or a link to a folder already walked, is skipped) and links are followed per
    ``follow_symlinks``: ``inside`` (links that resolve into the source folder), ``always`` or ``never``.

    A folder is listed with ``os.scandir`` and each file's size and mtime come from the one ``lstat`` of the
    walk (the target's ``stat`` for a followed link): one system call per file, no ``Path`` objects, so that a
    million files list in seconds (``segfactory bench ingest --files N``).

    With ``walk_timeout_s``, the listing runs in a worker thread under a watchdog: when no system call of it (a
    folder's listing, a file's ``stat``) returns for that long, as on a network filesystem whose server is gone
    (a hard NFS mount blocks ``stat`` forever), the run stops with one line naming the folder, so that the
    caller's locks are released instead of being held forever; the stuck thread is left behind (a daemon).

    Raises:
        UserError: if the source does not exist, holds no files, or more than ``max_files`` (folder, glob);
            or the listing made no progress for ``walk_timeout_s`` seconds.
    """
    if walk_timeout_s is None:
        return _discover(src, extensions, follow_symlinks, max_files, _WalkProgress(src))
    return _watched(src, walk_timeout_s, lambda progress: _discover(src, extensions, follow_symlinks, max_files,
                                                                    progress))


def _watched(src: str, timeout_s: float, listing: Callable[[_WalkProgress], Discovery]) -> Discovery:
    """Run ``listing`` in a daemon thread; raise when its progress stands still for ``timeout_s`` seconds."""
    progress = _WalkProgress(src)
    result: list[Discovery] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(listing(progress))
        except BaseException as e:  # re-raised in the calling thread
            error.append(e)

    worker = threading.Thread(target=work, name=f"walk {src}", daemon=True)
    worker.start()
    seen, since = (progress.where, progress.ops), time.monotonic()
    poll = min(0.5, timeout_s / 4)
    while True:
        worker.join(poll)
        if not worker.is_alive():
            break
        now_at = (progress.where, progress.ops)
        if now_at != seen:
            seen, since = now_at, time.monotonic()
        elif time.monotonic() - since > timeout_s:
            raise UserError(f"listing the source '{src}' hung: '{progress.current()}' did not answer for "
                            f"walk_timeout_s={timeout_s:g} s (a network filesystem whose server is gone?); nothing "
                            "was ingested",
                            fix="check that mount and re-run (this run's lock is released), or raise walk_timeout_s")
    if error:
        raise error[0]
    return result[0]


def _discover(src: str, extensions: list[str] | None, follow_symlinks: str, max_files: int,
              progress: _WalkProgress) -> Discovery:
    p = Path(src).expanduser()
    skipped: list[tuple[str, str]] = []
    if p.is_dir():
        files, skipped = _walk(str(p), follow_symlinks, max_files, progress)
        what = f"folder '{p}'"
    elif any(ch in src for ch in "*?["):
        files, skipped = _glob(os.path.expanduser(src), follow_symlinks, max_files, progress)
        what = f"glob '{src}'"
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        listed: dict[str, None] = {}  # absolute path -> None: each entry once, in order
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line).expanduser()
                listed[os.path.abspath(q if q.is_absolute() else p.parent / q)] = None
        files = [_stat_file(ap, progress) for ap in listed]
        what = f"list '{p}'"
        extensions = None  # an explicit list is taken as given: every entry is read and reported
    elif p.is_file():
        files, what = [_stat_file(os.path.abspath(p))], f"file '{p}'"
    else:
        check_source_exists(src)
        raise UserError(f"source '{src}' is not a folder, a file or a glob", fix="pass a folder, a glob like "
                        "'dump/**/*.jpg' (quoted), or a .txt file with one path per line")
    if extensions is not None:
        files = [f for f in files if _suffix(f.path) in extensions]
    if not files:
        filt = f" with suffix {', '.join(extensions)}" if extensions else ""
        raise UserError(f"no files{filt} found in {what}", fix="check the path (an empty dump has nothing to ingest)")
    files.sort(key=_path_of)
    return Discovery(files, skipped)


def check_source_exists(src: str) -> None:
    """Stop with one line when ``src`` (a folder, file or list file; a glob counts as there until it is listed)
    does not exist, or is segfactory's own output (a rendered dataset: its label maps are no photos; an ingest
    store: its packs are no image files).

    Raises:
        UserError: naming the source.
    """
    from segfactory.formats import output_kind

    if not any(ch in src for ch in "*?[") and not Path(src).expanduser().exists():
        raise UserError(f"source '{src}' does not exist", fix="pass a folder, a glob like 'dump/**/*.jpg' "
                        "(quoted), or a .txt file with one path per line")
    kind = output_kind(Path(src).expanduser())
    if kind == "a rendered dataset":
        raise UserError(f"source '{src}' is a rendered dataset (frames with their label maps), not raw real images",
                        fix="pass a folder of real photos or micrographs; rendered frames are fine-tuning data "
                            "(`segfactory finetune --synthetic`)")
    if kind == "an ingest store":
        raise UserError(f"source '{src}' is an ingest store (already ingested images, packed), not raw images",
                        fix=f"pass it to `segfactory pretrain --images {src}` as it is, or ingest the raw folder "
                            "it was made from")


def _path_of(f: SourceFile) -> str:
    return f.path


def _suffix(path: str) -> str:
    """``Path(path).suffix.lower()`` without building a ``Path``."""
    name = path[path.rfind(os.sep) + 1:]
    i = name.rfind(".")
    return name[i:].lower() if 0 < i < len(name) - 1 else ""


def _stat_file(path: str, progress: _WalkProgress | None = None) -> SourceFile:
    """A listed file as it is now; one that is missing or cannot be stat'ed is kept (size -1), so that the
    report says so."""
    if progress is not None:
        progress.where = path
    try:
        st = os.stat(path)
    except OSError:
        return SourceFile(path, -1, -1)
    return SourceFile(path, st.st_size, st.st_mtime_ns)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(top: str, follow: str, max_files: int, progress: _WalkProgress | None = None
          ) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Every non-hidden file under ``top`` (absolute paths, in walk order); each real folder is walked at most
    once, so the walk ends.

    The real tree is walked first and links only after it, so that a file reached both ways is listed under its
    real path, and a link to a folder already walked (a loop, an alias) is skipped. ``progress`` is told each
    folder (or link) before it is listed (followed) and counts each entry stat'ed.
    """
    progress = progress or _WalkProgress(top)
    root = os.path.abspath(top)
    root_real = os.path.realpath(root)
    st = os.stat(root_real)
    walked = {(st.st_dev, st.st_ino)}
    found: list[SourceFile] = []
    skipped: list[tuple[str, str]] = []
    links: deque[str] = deque()
    folders = [root]
    while folders or links:
        if not folders:  # the real tree is done: follow the next link
            link = links.popleft()
            progress.where, progress.entries = link, None
            target = _follow(link, follow, root_real, skipped)
            if target is None:
                continue
            if stat.S_ISREG(target.st_mode):
                found.append(SourceFile(link, target.st_size, target.st_mtime_ns))
            elif stat.S_ISDIR(target.st_mode):
                if (target.st_dev, target.st_ino) in walked:
                    skipped.append((link, "link loop or a folder already walked under another path"))
                    continue
                walked.add((target.st_dev, target.st_ino))
                folders.append(link)
        else:
            folder = folders.pop()
            progress.where, progress.entries = folder, None
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=_name_of)
            except OSError as e:
                skipped.append((folder, f"cannot list: {e.strerror or e}"))
                continue
            progress.entries, progress.base = entries, progress.ops
            subfolders = []
            for e in entries:
                progress.ops += 1
                if e.name.startswith("."):
                    continue
                try:
                    if e.is_symlink():
                        links.append(e.path)
                        continue
                    info = e.stat(follow_symlinks=False)
                except OSError as err:
                    skipped.append((e.path, f"cannot stat: {err.strerror or err}"))
                    continue
                mode = info.st_mode
                if stat.S_ISREG(mode):
                    found.append(SourceFile(e.path, info.st_size, info.st_mtime_ns))
                elif stat.S_ISDIR(mode) and (info.st_dev, info.st_ino) not in walked:
                    walked.add((info.st_dev, info.st_ino))
                    subfolders.append(e.path)
            progress.entries = None
            del entries
            folders.extend(reversed(subfolders))
        if len(found) > max_files:
            raise UserError(f"source '{top}' holds more than max_files={max_files} files",
                            fix="ingest its subfolders one by one, or raise max_files")
    return found, skipped


def _name_of(e: os.DirEntry[str]) -> str:
    return e.name


def _follow(link: str, follow: str, root_real: str, skipped: list[tuple[str, str]]) -> os.stat_result | None:
    """The ``stat`` of what a link leads to, or None (recorded in ``skipped``) when it is not followed."""
    if follow == "never":
        skipped.append((link, "symbolic link (follow_symlinks=never)"))
        return None
    try:
        target = os.stat(link)  # follows the link; ELOOP for a loop of links
    except OSError as err:
        skipped.append((link, f"broken link or link loop ({err.strerror or err})"))
        return None
    real = os.path.realpath(link)
    if follow == "inside" and not _inside(real, root_real):
        skipped.append((link, f"link to '{real}' outside the source folder (follow_symlinks=always follows it)"))
        return None
    return target


def _glob(pattern: str, follow: str, max_files: int, progress: _WalkProgress | None = None
          ) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """A glob source, walked like a folder (bounded, links per ``follow``) from its fixed leading folders."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    base = Path(*parts[:fixed]) if fixed else Path(".")
    if not base.is_dir():
        return [], []
    regex = _glob_regex(os.path.join(os.path.abspath(base), *parts[fixed:]))
    files, skipped = _walk(str(base), follow, max_files, progress)  # absolute paths, as the pattern is made
    return [f for f in files if regex.fullmatch(f.path)], skipped


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` any folders (zero or more), ``*`` / ``?`` / ``[..]`` within one path component."""
    out, i, sep = "", 0, re.escape(os.sep)
    while i < len(pattern):
        if pattern.startswith("**" + os.sep, i):
            out, i = out + f"(?:[^{sep}]*{sep})*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + f"[^{sep}]*", i + 1
        elif pattern[i] == "?":
            out, i = out + f"[^{sep}]", i + 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1:j]
            out, i = out + "[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]", j + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


# --------------------------------------------------------------------------------------------- hashing


def hash_files(files: list[SourceFile], max_file_mb: float, cfg: dict[str, Any] | None = None
               ) -> list[dict[str, Any]]:
    """Content hashes of a chunk of files (the dedup key).

    Args:
        files: The chunk.
        max_file_mb: Larger files are rejected (``too_large``) without reading them.
        cfg: ``IngestConfig.model_dump()``: with it (and ``decode.isolate``), each file is read and hashed in a
            decoder process (:mod:`pretrain.decoder`) under ``checks.decode_timeout_s``, so that a read stuck on
            a dead network filesystem costs that file (``timeout``, transient: the next run tries again), never
            the run and its lock; without it, in this process (tests, benchmarks).

    Returns:
        One dict per file: ``path, size, mtime_ns`` and either ``sha256`` or ``kind``/``reason`` (and
        ``transient`` for a read error the next run retries).
    """
    from pretrain.decoder import DecoderDied, DecoderProcess

    isolate = cfg is not None and cfg["decode"]["isolate"]
    reader: Any = (DecoderProcess(cfg, handler="pretrain.ingest:hash_file", setup="pretrain.ingest:setup_reader")
                   if isolate and cfg is not None else _InProcess(cfg or {}, hash_file))
    out = []
    with reader:
        for f in files:
            rec: dict[str, Any] = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
            try:
                if f.size < 0:
                    raise Rejected("unreadable", "file is missing or cannot be stat'ed; the next run tries again",
                                   transient=True)
                if f.size == 0:
                    raise Rejected("empty", "empty file (0 bytes)")
                if f.size > max_file_mb * 2**20:
                    raise Rejected("too_large", f"file is {f.size / 2**20:.0f} MiB > checks.max_file_mb="
                                   f"{max_file_mb}")
                try:
                    answer = reader.call({"path": f.path}, what="reading")
                except DecoderDied as d:
                    # a read that hangs is a filesystem's doing (a dead NFS server) more often than the file's
                    raise Rejected(d.kind, d.reason + ("; the next run tries again" if d.kind == "timeout" else ""),
                                   transient=d.kind == "timeout") from None
                if answer[0] == "rejected":
                    raise Rejected(*answer[1:])
                rec["sha256"] = answer[1]
            except Rejected as r:
                rec.update(kind=r.kind, reason=r.reason, transient=r.transient)
            out.append(rec)
    return out


def hash_file(request: dict[str, Any], cfg: dict[str, Any]) -> tuple[Any, ...]:
    """One file's content hash, as a decoder process runs it for :func:`hash_files`.

    Args:
        request: ``{"path"}``.
        cfg: ``IngestConfig.model_dump()`` (unused: the signature of every decoder handler).

    Returns:
        ``("ok", sha256 hex)`` or ``("rejected", kind, reason, transient)``.
    """
    try:
        return ("ok", _sha256_path(request["path"]))
    except OSError as e:
        r = read_error(e)
        return ("rejected", r.kind, r.reason, r.transient)


def setup_reader(cfg: dict[str, Any]) -> None:
    """A hashing decoder process's start-up: nothing to load (it only reads files)."""


def _sha256_path(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- decoding


def sniff(data: bytes) -> str | None:
    """Image format from the leading bytes (extensions lie), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


# Pillow formats registered by ``decode.plugins`` in this process (see :func:`load_plugins`).
_PLUGIN_FORMATS: list[str] = []


def load_plugins(modules: list[str]) -> list[str]:
    """Import ``decode.plugins`` (Pillow plugins) and return the formats they registered; files that none of the
    built-in formats recognises are then offered to these."""
    from PIL import Image

    Image.init()
    before = set(Image.OPEN)
    for name in modules:
        importlib.import_module(name)
    added = [f for f in Image.OPEN if f not in before]
    _PLUGIN_FORMATS[:] = [f for f in _PLUGIN_FORMATS if f not in added] + added
    return added


@dataclass
class Decoded:
    """One decoded image (a TIFF stack yields one per slice).

    Attributes:
        array: (H, W) gray or (H, W, 3) RGB; uint8, uint16, other ints or float.
        orig_shape: (H, W) at full resolution (before any reduced-size decode).
        page: Slice index in a stack, else None.
        passthrough: The source bytes are stored as they are (8-bit JPEG stored as JPEG, no resize, no
            rotation); ``array`` is then a reduced-scale (1/8) validation decode, not the stored size.
        dropped_pages: Set on a stack's first slice when slices were left out: ``{"from": the first page index
            not taken (it and every later page were dropped; the IFD chain is not walked further), "why": the
            limit}``.
    """

    array: np.ndarray
    orig_shape: tuple[int, int]
    page: int | None = None
    passthrough: bool = False
    dropped_pages: dict[str, Any] | None = None


def decode(data: bytes, checks: dict[str, Any], max_short_side: int | None,
           store: str = "auto", from_page: int = 0) -> tuple[str, Iterator[Decoded]]:
    """Decode and validate one file's bytes; a stack's slices are decoded one at a time, as they are consumed.

    Args:
        data: The file's content.
        checks: ``IngestConfig.checks``: ``max_pixels`` (larger images, or one stack slice, are rejected as
            decompression bombs before any pixel is decoded), ``min_side``, ``max_pages`` and ``max_file_pixels``
            (TIFF stacks: slices taken, checked from the page headers before decoding).
        max_short_side: Target short side; JPEGs are decoded at the smallest DCT scale that still covers it.
        store: ``normalize.store`` (auto, png, jpeg): a JPEG is only passed through (and then validated at 1/8
            scale) when it is stored as JPEG; otherwise its pixels are re-encoded and must be decoded in full.
        from_page: TIFF stacks: the slices before it are stored already (a stack re-examined under raised
            limits); they count towards the limits as before but are not decoded again.

    Returns:
        ``(format, images)``: ``images`` raises :class:`Rejected` when a slice turns out to be damaged.

    Raises:
        Rejected: with the reason the file cannot be ingested.
    """
    fmt = sniff(data)
    if fmt is None and _PLUGIN_FORMATS:
        fmt = _plugin_format(data)
    if fmt is None:
        head = data[:8].hex(" ")
        raise Rejected("not_image", f"not an image (unrecognised leading bytes {head})")
    if fmt == "gif":
        raise Rejected("unsupported", "GIF is not supported (convert it to PNG)")
    max_pixels, min_side = checks["max_pixels"], checks["min_side"]
    with _as_rejection(fmt, checks.get("decode_memory_mb")):
        if fmt == "tiff":
            return fmt, _decode_tiff(data, checks, from_page)
        if fmt == "png" and len(data) >= 26 and data[24] == 16 and data[25] in (2, 6):
            return fmt, iter([_decode_png16_rgb(data, max_pixels, min_side)])
        return fmt, iter([_decode_pil(data, fmt, max_pixels, min_side, max_short_side, stored_ext(fmt, store))])
    raise AssertionError("unreachable")  # _as_rejection re-raises


def _plugin_format(data: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=_PLUGIN_FORMATS) as im:
            return str(im.format).lower()
    except Exception:  # not one of the plugins' formats either
        return None


class _as_rejection:
    """Turn a decoder's exception into a :class:`Rejected` (decoders signal damage with many exception types:
    OSError, ValueError, struct.error, TiffFileError, zlib.error, ...; a bad file must be reported, never crash
    the run), and running out of the decoder's memory cap into a ``memory`` rejection."""

    def __init__(self, fmt: str, memory_mb: int | None = None):
        self.fmt = fmt
        self.memory_mb = memory_mb

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, e: BaseException | None, tb: Any) -> bool:
        if e is None or isinstance(e, Rejected) or not isinstance(e, Exception):
            return False
        if isinstance(e, MemoryError) or (isinstance(e, cv2.error) and "alloc" in str(e).lower()):
            raise Rejected("memory", f"decoding needs more memory than checks.decode_memory_mb={self.memory_mb} "
                           f"MiB allows: {_short(e)}") from None
        raise Rejected("corrupt", f"truncated or corrupt {self.fmt.upper()}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    text = str(e).strip()
    msg = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    return msg[:200]


def _check_size(w: int, h: int, max_pixels: int, min_side: int) -> None:
    if w * h > max_pixels:
        raise Rejected("bomb", f"decompression bomb: {w}x{h} = {w * h} pixels > checks.max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h} is smaller than checks.min_side={min_side}")


def stored_ext(fmt: str, store: str) -> str:
    """Extension an image of source format ``fmt`` is stored with under ``normalize.store``."""
    if store == "auto":
        return ".jpg" if fmt == "jpeg" else ".png"
    return ".jpg" if store == "jpeg" else ".png"


def _decode_pil(data: bytes, fmt: str, max_pixels: int, min_side: int, max_short_side: int | None,
                ext: str) -> Decoded:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # our own size check below is the authority; Pillow's would only warn up to 2x its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt.upper()] if fmt.upper() in _PLUGIN_FORMATS else None)
    except Image.DecompressionBombError as e:
        raise Rejected("bomb", f"decompression bomb: {_short(e)}") from None
    passthrough = False
    with im:
        w, h = im.size
        _check_size(w, h, max_pixels, min_side)
        # the one orientation rule (segfactory.formats.imagefile): a JPEG's EXIF orientation is applied, as
        # read_image does for fine-tuning, so an ingested photo and a labeled one are both upright
        orientation = exif_orientation(im)
        if fmt == "jpeg" and im.mode in ("L", "RGB", "CMYK", "YCbCr"):  # 8-bit modes: decoded to uint8
            # decided before decoding: only bytes that are copied as they are may be validated at 1/8 scale;
            # a rotated or re-encoded (store=png) JPEG needs its pixels at the stored size
            passthrough = (orientation == 1 and ext == ".jpg"
                           and (max_short_side is None or min(w, h) <= max_short_side))
            target = _draft_target(w, h, max_short_side, passthrough)
            if target is not None:
                # DCT-domain downscaling: decoding at 1/2..1/8 size skips most of the IDCT work, and still
                # runs the entropy decoder over the whole file, so truncation/corruption is still detected
                im.draft("L" if im.mode == "L" else "RGB", target)
        im.load()
        arr = _pil_to_array(im)
    passthrough = passthrough and arr.dtype == np.uint8
    if orientation != 1:
        arr = apply_orientation(arr, orientation)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
    return Decoded(arr, (h, w), None, passthrough)


def _draft_target(w: int, h: int, max_short_side: int | None, passthrough: bool) -> tuple[int, int] | None:
    """Smallest size a JPEG may be decoded at (Pillow picks the DCT scale covering it); None for full size."""
    if passthrough:
        # stored as the original bytes: validation still decodes every coefficient, but at 1/8 scale (the
        # channel statistics are from it)
        return (max(1, w // 8), max(1, h // 8))
    if max_short_side is None or min(w, h) <= max_short_side:
        return None  # re-encoded at full size
    r = max_short_side / min(w, h)
    return (max(1, math.ceil(w * r)), max(1, math.ceil(h * r)))


def _pil_to_array(im: Any) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "LA", "La"):
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode in ("CMYK", "YCbCr", "RGBa", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "F":
        return np.asarray(im, dtype=np.float32)
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)
    elif mode == "I":
        return np.asarray(im, dtype=np.int32)
    arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha is not image content for pretraining
    if arr.ndim == 3 and arr.shape[2] == 2:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr)


def _decode_png16_rgb(data: bytes, max_pixels: int, min_side: int) -> Decoded:
    # Pillow reads 16-bit colour PNGs as 8-bit RGB (dropping the low byte); OpenCV keeps all 16 bits
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _check_size(w, h, max_pixels, min_side)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (h, w):
        raise Rejected("corrupt", "truncated or corrupt PNG (16-bit colour data does not decode)")
    arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return Decoded(arr, (h, w))


def _decode_tiff(data: bytes, checks: dict[str, Any], from_page: int = 0) -> Iterator[Decoded]:
    """Plan a stack from its page headers (at most ``max_pages + 1`` IFDs are read, never the whole chain), then
    decode the planned slices from ``from_page`` on one at a time: only one slice's pixels are held at once.

    Raises:
        Rejected: ``pages_dropped`` when ``from_page`` > 0 and the limits take no slice from it on.
    """
    import tifffile

    tf = tifffile.TiffFile(io.BytesIO(data))
    try:
        tf.pages.cache = False  # a long stack must not keep every page object it has passed
        take, dropped = _plan_tiff(tf, checks)
        if from_page:
            take = [t for t in take if t[0] >= from_page]
            if not take:
                why = dropped["why"] if dropped is not None else "the stack has no more pages"
                raise Rejected("pages_dropped", f"no slice from page {from_page} on is taken: {why}")
    except BaseException:
        tf.close()
        raise
    return _tiff_slices(tf, take, dropped, checks.get("decode_memory_mb"))


def _plan_tiff(tf: Any, checks: dict[str, Any]) -> tuple[list[tuple[int, tuple[int, ...]]], dict[str, Any] | None]:
    max_pages, budget = checks["max_pages"], checks["max_file_pixels"]
    take: list[tuple[int, tuple[int, ...]]] = []
    total = 0
    dropped: dict[str, Any] | None = None
    i = 0
    while True:
        try:
            page = tf.pages[i]
        except IndexError:
            break  # end of the IFD chain
        if i >= max_pages:  # one page past the limit: there are more, the chain is not walked further
            dropped = {"from": i, "why": f"checks.max_pages={max_pages}"}
            break
        shape = tuple(int(x) for x in page.shape)
        h, w = _tiff_hw(shape)
        _check_size(w, h, checks["max_pixels"], checks["min_side"])
        if take and total + w * h > budget:
            dropped = {"from": i, "why": f"checks.max_file_pixels={budget} ({total} pixels taken)"}
            break
        if not take and w * h > budget:
            raise Rejected("bomb", f"decompression bomb: {w}x{h} = {w * h} pixels > checks.max_file_pixels={budget}")
        total += w * h
        take.append((i, shape))
        i += 1
    if not take:
        raise Rejected("corrupt", "TIFF has no pages")
    return take, dropped


def _tiff_slices(tf: Any, take: list[tuple[int, tuple[int, ...]]], dropped: dict[str, Any] | None,
                 memory_mb: int | None) -> Iterator[Decoded]:
    with tf, _as_rejection("tiff", memory_mb):
        stack = len(take) > 1 or dropped is not None or take[0][0] > 0
        for n, (i, shape) in enumerate(take):
            h, w = _tiff_hw(shape)
            arr = _tiff_layout(tf.pages[i].asarray(), shape)
            yield Decoded(arr, (h, w), i if stack else None, dropped_pages=dropped if n == 0 else None)
            del arr


def _tiff_hw(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (1, 2, 3, 4):
        return shape[1], shape[2]
    raise Rejected("unsupported", f"TIFF page layout {shape} is not (H, W), (H, W, C) or (C, H, W)")


def _tiff_layout(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) -> (H, W) or (H, W, 3)."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3:
        c = arr.shape[-1]
        arr = arr[:, :, 0] if c in (1, 2) else arr[:, :, :3]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ normalizing


def to_uint8(arr: np.ndarray, low_pct: float, high_pct: float) -> tuple[np.ndarray, list[float] | None]:
    """Map any bit depth to uint8; 8-bit input is returned unchanged.

    16-bit (and int/float) data is scaled robustly: the ``low_pct`` percentile maps to 0 and ``high_pct`` to
    255 over all channels, so a few hot pixels do not squash the range (microscopy, scientific cameras); the range
    is :func:`segfactory.formats.imagefile.stretch_range`'s, the rule fine-tuning and prediction scale with.

    Returns:
        ``(image, [lo, hi])``; ``None`` instead of the range for 8-bit input.
    """
    if arr.dtype == np.uint8:
        return arr, None
    # the one stretch rule, shared with read_image's readers (fine-tuning, predict, evaluate)
    lo, hi = stretch_range(arr, low_pct, high_pct)
    # in blocks of rows: a float32 copy of a whole 16-bit slice would be twice its size again
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, (1 << 22) // max(1, arr[0].size))
    for y in range(0, arr.shape[0], rows):
        a = arr[y:y + rows].astype(np.float32)
        if not np.isfinite(a).all():
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        out[y:y + rows] = np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255)
    return out, [lo, hi]


def resize_short_side(arr: np.ndarray, max_short_side: int | None) -> np.ndarray:
    """Downscale (area interpolation) so that the short side is at most ``max_short_side``."""
    h, w = arr.shape[:2]
    if max_short_side is None or min(h, w) <= max_short_side:
        return arr
    r = max_short_side / min(h, w)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    if min(size) != max_short_side:  # rounding must land exactly on the target short side
        size = (max_short_side, size[1]) if w <= h else (size[0], max_short_side)
    # area averaging is needed against aliasing from 2x down; below that (the usual case after a reduced-scale
    # JPEG decode) bilinear is as good and several times faster than OpenCV's fractional INTER_AREA
    interp = cv2.INTER_AREA if r <= 0.5 else cv2.INTER_LINEAR
    return cv2.resize(arr, size, interpolation=interp)


def channel_stats(arr: np.ndarray) -> dict[str, list[float] | float]:
    """Per-channel mean/std (of values scaled to [0, 1]) plus luma mean/std, for input normalization.

    Args:
        arr: (H, W) or (H, W, 3) uint8.
    """
    m, s = cv2.meanStdDev(arr)  # uint8 in, float64 out: no float copy of the image
    mean, std = (m.ravel() / 255.0).tolist(), (s.ravel() / 255.0).tolist()
    if arr.ndim == 2:
        return {"mean": mean, "std": std, "luma_mean": mean[0], "luma_std": std[0]}
    lm, ls = cv2.meanStdDev(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY))  # BT.601, as gray loading does
    return {"mean": mean, "std": std, "luma_mean": float(lm[0, 0]) / 255.0, "luma_std": float(ls[0, 0]) / 255.0}


def encode(arr: np.ndarray, ext: str, jpeg_quality: int) -> bytes:
    """(H, W) or (H, W, 3) uint8 RGB -> file bytes."""
    bgr = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {arr.shape} image as {ext}")
    return buf.tobytes()


@dataclass
class Stored:
    """One image ready to be written into a shard."""

    data: bytes
    ext: str
    record: dict[str, Any]


def process_bytes(data: bytes, cfg: dict[str, Any], from_page: int = 0) -> list[Stored]:
    """Decode, validate and normalize one file's bytes (the whole per-file work of ingestion).

    A stack's slices are decoded, normalized and encoded one at a time. When slices were dropped (``max_pages``,
    ``max_file_pixels``), the first stored slice's record says so under ``dropped_pages``.

    Args:
        data: File content.
        cfg: ``IngestConfig.model_dump()`` (plain dict so it travels to Dask workers cheaply).
        from_page: TIFF stacks: the first slice to store (see :func:`decode`).

    Returns:
        One :class:`Stored` per image (several for TIFF stacks).

    Raises:
        Rejected: if the file is not a usable image.
    """
    norm, checks = cfg["normalize"], cfg["checks"]
    with _as_rejection("file", checks.get("decode_memory_mb")):
        fmt, images = decode(data, checks, norm["max_short_side"], norm["store"], from_page)
    ext = stored_ext(fmt, norm["store"])
    out = []
    with _as_rejection(fmt, checks.get("decode_memory_mb")):
        for img in images:
            arr8, scale = to_uint8(img.array, norm["low_percentile"], norm["high_percentile"])
            if img.passthrough:  # only set for a JPEG stored as .jpg, unrotated and needing no resize
                # validated at reduced size; the original bytes are the best copy of this image
                blob, h, w, how = data, img.orig_shape[0], img.orig_shape[1], "copied"
            else:
                arr8 = resize_short_side(arr8, norm["max_short_side"])
                blob, (h, w), how = encode(arr8, ext, norm["jpeg_quality"]), arr8.shape[:2], "encoded"
            rec = {"format": fmt, "page": img.page, "orig_height": img.orig_shape[0],
                   "orig_width": img.orig_shape[1], "orig_dtype": str(img.array.dtype), "height": int(h),
                   "width": int(w), "channels": 1 if arr8.ndim == 2 else 3, "scale": scale, "stored": how,
                   **channel_stats(arr8)}
            if img.dropped_pages is not None:
                rec["dropped_pages"] = img.dropped_pages
            out.append(Stored(blob, ext, rec))
            del img, arr8
    return out


def handle_file(request: dict[str, Any], cfg: dict[str, Any]) -> tuple[Any, ...]:
    """One file's whole work, as a decoder process runs it: read, check the hash, decode, normalize.

    Args:
        request: ``{"path", "sha256"}`` and ``from_page`` for a stack re-examined under raised limits.
        cfg: ``IngestConfig.model_dump()``.

    Returns:
        ``("ok", [(data, ext, record), ...])`` or ``("rejected", kind, reason, transient)``; plain tuples, so
        that the answer pickles cheaply between processes.
    """
    try:
        try:
            data = Path(request["path"]).read_bytes()
        except OSError as e:
            raise read_error(e) from None
        if sha256_bytes(data) != request["sha256"]:
            raise Rejected("unreadable", "file changed while being ingested; the next run picks it up",
                           transient=True)
        stored = process_bytes(data, cfg, request.get("from_page", 0))
    except Rejected as r:
        return ("rejected", r.kind, r.reason, r.transient)
    except MemoryError:  # reading the file, hashing it: past the decoder's cap
        return ("rejected", "memory", "reading the file needs more memory than checks.decode_memory_mb="
                f"{cfg['checks']['decode_memory_mb']} MiB", False)
    return ("ok", [(s.data, s.ext, s.record) for s in stored])


def setup_decoder(cfg: dict[str, Any]) -> None:
    """A decoder process's start-up (:class:`pretrain.decoder.DecoderProcess`): plugins, one OpenCV thread."""
    load_plugins(cfg["decode"]["plugins"])
    cv2.setNumThreads(1)  # one decode at a time per process; a thread pool would only reserve memory


class _InProcess:
    """``decode.isolate=false``: files are handled in the calling process (no timeout, no memory cap)."""

    def __init__(self, cfg: dict[str, Any], handler: Callable[[dict[str, Any], dict[str, Any]], tuple[Any, ...]]
                 = handle_file):
        self.cfg = cfg
        self.handler = handler
        if handler is handle_file:
            load_plugins(cfg["decode"]["plugins"])

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def call(self, request: dict[str, Any], what: str = "decoding") -> tuple[Any, ...]:
        return self.handler(request, self.cfg)


def ingest_shard(spec: dict[str, Any], out_root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ingest one chunk of files into one committed shard.

    Each file is decoded in an isolated decoder process (:mod:`pretrain.decoder`, unless ``decode.isolate`` is
    false): a file that hangs its decoder past ``checks.decode_timeout_s``, needs more than
    ``checks.decode_memory_mb`` or kills it is rejected (``timeout``, ``memory``, ``crashed``) and the chunk goes
    on with a fresh decoder. Every rejection records the ``checks`` it was judged under, a ``not_image`` also the
    decoder set (``spec["decoders"]``, else :func:`decoder_set` of ``decode.plugins``).

    A stack re-examined under raised limits (a hash record with ``from_page``) stores only its slices from that
    page on; whatever stops it now is recorded as its new ``pages_dropped`` note, never as a rejection of a file
    that is ingested.

    Args:
        spec: ``{"shard_id", "run", "files": [hash records], "rejected": [records decided before decoding
            (duplicates, unreadable)]}`` and optionally ``"decoders"`` (the driver's :func:`decoder_set`); the files
            may be packed tuples (:func:`pack_spec`).
        out_root: Output directory.
        cfg: ``IngestConfig.model_dump()``.

    Returns:
        ``{"shard_id", "images", "rejected", "rejected_kinds"}`` counts for the summary.
    """
    from pretrain.decoder import DecoderDied, DecoderProcess

    final = shards_dir(out_root) / spec["shard_id"]
    if is_committed(final):  # committed by an earlier attempt of this task
        return _shard_summary(read_json(final / MANIFEST_FILE))
    checks = dict(cfg["checks"])
    decoders = spec.get("decoders") or decoder_set(cfg["decode"]["plugins"])
    rejected: list[dict[str, Any]] = [{**r, "checks": checks} for r in spec.get("rejected", [])]
    decoder: Any = DecoderProcess(cfg) if cfg["decode"]["isolate"] else _InProcess(cfg)
    with ImageShardWriter(out_root, spec["shard_id"]) as writer, decoder:
        for f in map(_file_record, spec["files"]):
            src = {"source": f["path"], "size": f["size"], "mtime_ns": f["mtime_ns"], "sha256": f["sha256"]}
            request = {"path": f["path"], "sha256": f["sha256"]}
            if f.get("from_page"):
                request["from_page"] = f["from_page"]
            try:
                answer = decoder.call(request)
            except DecoderDied as d:
                answer = ("rejected", d.kind, d.reason, False)
            if answer[0] == "rejected":
                _, kind, reason, transient = answer
                rec = {**src, "kind": kind, "reason": reason, "checks": checks}
                if kind in DECODER_KINDS:
                    rec["decoders"] = decoders
                if f.get("from_page"):
                    rec = pages_dropped_note(src, f["from_page"], reason if kind == "pages_dropped"
                                             else f"{kind}: {reason}", checks)
                rejected.append({**rec, "transient": True} if transient else rec)
                continue
            for data, ext, record in answer[1]:
                if "dropped_pages" in record:
                    d = record["dropped_pages"]
                    rejected.append(pages_dropped_note(src, d["from"], d["why"], checks))
                writer.add(data, ext, {**src, **record})
        manifest = writer.commit(spec["run"], cfg["normalize"], rejected)
    return _shard_summary(manifest)


def pack_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A shard spec with its files as ``(path, size, mtime_ns, sha256, from_page)`` tuples: a third of the
    memory of the hash records, in the driver and in the Dask scheduler that holds every shard task's spec
    until it ran (a million files are a million records)."""
    files = [(f["path"], f["size"], f["mtime_ns"], f["sha256"], f.get("from_page", 0)) for f in spec["files"]]
    return {**spec, "files": files}


def _file_record(f: dict[str, Any] | tuple[Any, ...]) -> dict[str, Any]:
    """A spec's file as a hash record, packed (:func:`pack_spec`) or not."""
    if isinstance(f, dict):
        return f
    path, size, mtime_ns, sha, from_page = f
    rec = {"path": path, "size": size, "mtime_ns": mtime_ns, "sha256": sha}
    return {**rec, "from_page": from_page} if from_page else rec


def pages_dropped_note(src: dict[str, Any], dropped_from: int, why: str, checks: dict[str, Any]) -> dict[str, Any]:
    """The ``pages_dropped`` record of a stack whose slices from ``dropped_from`` on are not stored."""
    return {**src, "kind": "pages_dropped", "checks": checks, "dropped_from": dropped_from,
            "reason": f"slices from page {dropped_from} on were not taken: {why}"}


def _shard_summary(man: dict[str, Any]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for r in man["rejected"]:
        if r["kind"] != UNCHANGED_KIND:  # a note, no rejection
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"shard_id": man["shard_id"], "images": len(man["images"]), "rejected": sum(kinds.values()),
            "rejected_kinds": kinds}


def plan_shards(hashed: list[dict[str, Any]], known_shas: dict[str, str], run: int,
                files_per_shard: int, resume: dict[tuple[str, int, int], int] | None = None) -> list[dict[str, Any]]:
    """Drop exact duplicates (by content hash) and cut the remaining files into shard specs.

    Duplicates and files that failed hashing are recorded as rejected in the last shard (a shard with no
    images is written if nothing else is new), so that re-runs do not look at them again.

    Args:
        hashed: :func:`hash_files` records.
        known_shas: Content hash -> source of every file ingested before.
        run: This run's number.
        files_per_shard: Files per shard.
        resume: ``(path, size, mtime_ns)`` -> first slice not stored yet, of the stacks re-examined under raised
            limits: they are ingested from that slice on (not duplicates of themselves); one whose read fails
            gets a new ``pages_dropped`` note instead of a rejection.
    """
    resume = resume or {}
    seen = dict(known_shas)
    unique: list[dict[str, Any]] = []
    pre_rejected: list[dict[str, Any]] = []
    for rec in sorted(hashed, key=lambda r: r["path"]):
        base = {"source": rec["path"], "size": rec["size"], "mtime_ns": rec["mtime_ns"]}
        from_page = resume.get((rec["path"], rec["size"], rec["mtime_ns"]))
        if from_page is not None and "sha256" not in rec:
            # the checks are added with the other records' by ingest_shard
            note = pages_dropped_note({**base, "sha256": None}, from_page, f"{rec['kind']}: {rec['reason']}", {})
            pre_rejected.append({**note, **({"transient": True} if rec.get("transient") else {})})
        elif from_page is not None and seen.get(rec["sha256"]) == rec["path"]:
            unique.append({**rec, "from_page": from_page})
        elif "sha256" not in rec:
            pre_rejected.append({**base, "sha256": None, "kind": rec["kind"], "reason": rec["reason"],
                                 **({"transient": True} if rec.get("transient") else {})})
        elif seen.get(rec["sha256"]) == rec["path"]:
            # the same file with a new mtime (touched, copied without its times): its content is stored already;
            # recorded so that later runs know it, never as a rejection
            pre_rejected.append({**base, "sha256": rec["sha256"], "kind": UNCHANGED_KIND,
                                 "reason": "the same content is stored already (only its mtime changed)"})
        elif rec["sha256"] in seen:
            pre_rejected.append({**base, "sha256": rec["sha256"], "kind": "duplicate",
                                 "reason": f"exact duplicate of {seen[rec['sha256']]}",
                                 "duplicate_of": seen[rec["sha256"]]})
        else:
            seen[rec["sha256"]] = rec["path"]
            unique.append(rec)
    chunks = [unique[i:i + files_per_shard] for i in range(0, len(unique), files_per_shard)] or [[]]
    specs = [{"shard_id": f"{run:04d}-{i:05d}", "run": run, "files": c, "rejected": []}
             for i, c in enumerate(chunks)]
    specs[-1]["rejected"] = pre_rejected
    if not unique and not pre_rejected:
        return []
    return specs


