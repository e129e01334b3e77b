"""The ingest store: ``segfactory ingest``'s output of unlabeled images, its writer and every reader's API.

Layout (``--out DIR``)::

    DIR/config.yaml                         resolved ingest config (normalization must match across runs)
    DIR/shards/<run>-<chunk>/images.bin     the shard's stored images, concatenated JPEG/PNG files (8-bit
                                            (H, W) gray or (H, W, 3) RGB); one file per shard
    DIR/shards/<run>-<chunk>/manifest.json  written last: the shard's commit mark; per image its byte range
                                            (offset, length, ext) in images.bin, source, hash, sizes, scaling
    DIR/index.json                          summary of all committed shards, data hash, channel statistics
    DIR/rejected.jsonl                      one line per skipped file as last judged (source, kind, reason, the
                                            checks.* limits it was judged under, transient for a read error the
                                            next run retries), plus one per stack whose later slices were
                                            dropped (kind pages_dropped; as its latest look left it)

A shard directory without ``manifest.json`` does not exist (an interrupted write; it is removed on re-run).
Shards are committed with the shared unit protocol of :mod:`segfactory.io`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from segfactory import code_version
from segfactory.errors import UserError
from segfactory.io import (
    MANIFEST_FILE,
    atomic_write_json,
    atomic_write_text,
    canonical_hash,
    check_files,
    commit_unit,
    committed_units,
    new_attempt_dir,
    read_json,
    remove_stale_attempts,
    sha256_bytes,
)

FORMAT = "segfactory-images"
VERSION = 1
SHARDS_DIR = "shards"
PACK_FILE = "images.bin"
INDEX_FILE = "index.json"
REJECTED_FILE = "rejected.jsonl"
CONFIG_FILE = "config.yaml"
# The record kind (in a manifest's ``rejected`` list) of a file whose mtime changed but whose content is the one
# stored from the same path: it is known (later runs skip it), not rejected.
UNCHANGED_KIND = "unchanged"
# The package whose code writes the store (recorded in manifests and index.json).
WRITER_PACKAGE = "pretrain"

__all__ = ["CONFIG_FILE", "FORMAT", "INDEX_FILE", "MANIFEST_FILE", "PACK_FILE", "REJECTED_FILE", "SHARDS_DIR",
           "UNCHANGED_KIND", "CorruptShardError", "ImageEntry", "ImageShardWriter", "IngestedImages", "StoreScan",
           "build_index", "clean_uncommitted",
           "committed_shards", "data_hash", "decode_entry", "iter_manifests", "known_files", "latest_page_notes",
           "latest_rejections", "open_images", "read_stored", "scan_manifests", "shards_dir", "verify_shard",
           "verify_store"]


def shards_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / SHARDS_DIR


def committed_shards(root: str | os.PathLike[str]) -> list[str]:
    return committed_units(shards_dir(root))


def clean_uncommitted(root: str | os.PathLike[str]) -> list[str]:
    """Remove leftovers of interrupted runs (attempt dirs, shard dirs without a manifest)."""
    return remove_stale_attempts(shards_dir(root), uncommitted=True)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class ImageShardWriter:
    """Writes one shard: stored image bytes appended to ``images.bin``, then the manifest, then the commit.

    Use as a context manager; leaving it without :meth:`commit` (an exception) removes the attempt.

    Args:
        root: The store's directory.
        shard_id: ``<run>-<chunk>``.
    """

    def __init__(self, root: str | os.PathLike[str], shard_id: str):
        self.final = shards_dir(root) / shard_id
        self.shard_id = shard_id
        shards_dir(root).mkdir(parents=True, exist_ok=True)
        self.tmp = new_attempt_dir(shards_dir(root), shard_id)
        self._pack = open(self.tmp / PACK_FILE, "wb")  # noqa: SIM115 - closed in commit/abort
        self._pack_hash = hashlib.sha256()
        self._offset = 0
        self.images: list[dict[str, Any]] = []

    def __enter__(self) -> ImageShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is not None:
            self.abort()

    def add(self, data: bytes, ext: str, record: dict[str, Any]) -> None:
        """Append one stored image (encoded bytes) with its manifest record."""
        self._pack.write(data)
        self._pack_hash.update(data)
        self.images.append({"offset": self._offset, "length": len(data), "ext": ext, **record})
        self._offset += len(data)

    def commit(self, run: int, normalize: dict[str, Any], rejected: list[dict[str, Any]]) -> dict[str, Any]:
        """Write the manifest (the commit mark) and move the shard into place. Returns the manifest."""
        self._pack.close()
        manifest = {
            "format": FORMAT, "version": VERSION, "shard_id": self.shard_id, "run": run,
            "created": _now(), "code_version": code_version(WRITER_PACKAGE), "normalize": normalize,
            "normalize_hash": canonical_hash(normalize), "pack_sha256": self._pack_hash.hexdigest(),
            "images": self.images, "rejected": rejected,
        }
        atomic_write_json(self.tmp / MANIFEST_FILE, manifest)
        commit_unit(self.tmp, self.final)
        return manifest

    def abort(self) -> None:
        import shutil

        if not self._pack.closed:
            self._pack.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def verify_shard(root: str | os.PathLike[str], shard_id: str) -> list[str]:
    """Re-hash a committed shard's ``images.bin`` against its manifest (``pack_sha256``; a manifest from before
    it was recorded: only that every image's byte range is inside the file).

    Returns:
        One line per problem; empty when intact.
    """
    d = shards_dir(root) / shard_id
    try:
        manifest = read_json(d / MANIFEST_FILE)
        images = manifest["images"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})"]
    if "pack_sha256" in manifest:
        return check_files(d, {PACK_FILE: manifest["pack_sha256"]})
    try:
        size = (d / PACK_FILE).stat().st_size
    except OSError as e:
        return [f"{PACK_FILE}: missing or unreadable ({e.strerror or e})"]
    end = max((int(r["offset"]) + int(r["length"]) for r in images), default=0)
    return [f"{PACK_FILE}: {size} bytes, but its images need {end} (truncated)"] if size < end else []


def verify_store(root: str | os.PathLike[str], repair: bool) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Re-hash every committed shard of an ingest store (:func:`verify_shard`); with ``repair``, move the corrupt
    ones aside (``.bad-*``, kept for inspection) and rebuild ``index.json`` without them, so that the next ingest
    ingests their images again.

    Returns:
        ``({shard id: problems}, {shard id: where it was moved})``; both empty when the store is intact.
    """
    from segfactory.io import move_aside

    problems: dict[str, list[str]] = {}
    moved: dict[str, Path] = {}
    for sid in committed_shards(root):
        found = verify_shard(root, sid)
        if found:
            problems[sid] = found
            if repair:
                moved[sid] = move_aside(shards_dir(root) / sid)
    if moved:
        build_index(root)
    return problems, moved


def read_stored(shard_dir: str | os.PathLike[str], rec: dict[str, Any]) -> bytes:
    """The stored file bytes of one manifest image record."""
    with open(Path(shard_dir) / PACK_FILE, "rb") as f:
        f.seek(rec["offset"])
        data = f.read(rec["length"])
    if len(data) != rec["length"]:
        raise OSError(f"'{Path(shard_dir) / PACK_FILE}' is truncated (image at offset {rec['offset']})")
    return data



# ------------------------------------------------------------------------------------ reading the output


def iter_manifests(root: str | os.PathLike[str]) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(shard_id, manifest, manifest_sha256)`` of every committed shard, in shard order."""
    for sid in committed_shards(root):
        raw = (shards_dir(root) / sid / MANIFEST_FILE).read_bytes()
        yield sid, json.loads(raw), sha256_bytes(raw)


Key = tuple[str, int, int]  # a source file's (path, size, mtime_ns): its identity for incremental runs


class StoreScan:
    """What the committed shards say about the source files, gathered in one read of the manifests (shard
    order); :func:`scan_manifests` fills it, :func:`build_index` feeds it while it reads them for the index.

    Attributes:
        ingested: Key of every file a shard stored.
        shas: Content hash -> first source path of every ingested file (empty unless ``with_shas``).
        last_run: The highest run number (0 for an empty store).
        rejections: See :func:`latest_rejections`.
        page_notes: See :func:`latest_page_notes`.
    """

    def __init__(self, with_shas: bool = True) -> None:
        self.ingested: set[Key] = set()
        self.shas: dict[str, str] = {}
        self._with_shas = with_shas
        self.last_run = 0
        self._rejected: dict[Key, dict[str, Any]] = {}
        self.page_notes: dict[Key, dict[str, Any]] = {}

    def add(self, sid: str, man: dict[str, Any]) -> None:
        """Take in one manifest (in shard order)."""
        self.last_run = max(self.last_run, int(man["run"]))
        notes = self.page_notes
        for rec in man["images"]:
            key = (rec["source"], rec["size"], rec["mtime_ns"])
            self.ingested.add(key)
            if self._with_shas:
                self.shas.setdefault(rec["sha256"], rec["source"])
            if notes:  # this shard looked at the file again: its notes replace earlier ones
                notes.pop(key, None)
        rejected = man["rejected"]
        if notes:
            for rec in rejected:
                notes.pop((rec["source"], rec["size"], rec["mtime_ns"]), None)
        for rec in rejected:
            key = (rec["source"], rec["size"], rec["mtime_ns"])
            if rec.get("kind") == UNCHANGED_KIND:  # its content is stored (from the same path)
                self.ingested.add(key)
            elif rec.get("kind") == "pages_dropped":
                notes[key] = {"shard": sid, **rec}
            else:
                self._rejected[key] = {"shard": sid, **rec}

    @property
    def rejections(self) -> dict[Key, dict[str, Any]]:
        return {k: v for k, v in self._rejected.items() if k not in self.ingested}

    def known(self, reexamine: Callable[[dict[str, Any]], bool] | None = None) -> set[Key]:
        """Keys of every file seen (ingested or rejected), less the rejected ones ``reexamine`` picks: see
        :func:`known_files`."""
        keys = set(self.ingested)
        for key, rec in self._rejected.items():
            if key not in keys and not (reexamine is not None and reexamine(rec)):
                keys.add(key)
        return keys


def scan_manifests(root: str | os.PathLike[str]) -> StoreScan:
    """One read of every committed manifest: what :func:`known_files`, :func:`latest_rejections` and
    :func:`latest_page_notes` return, without reading the store three times."""
    scan = StoreScan()
    for sid, man, _ in iter_manifests(root):
        scan.add(sid, man)
    return scan


def known_files(root: str | os.PathLike[str], reexamine: Callable[[dict[str, Any]], bool] | None = None
                ) -> tuple[set[Key], dict[str, str], int]:
    """What earlier runs already handled.

    Args:
        root: The store.
        reexamine: Called with each rejected record of the latest look at a file: True leaves the file out of
            the known keys, so that this run looks at it again (a transient read error, changed limits).

    Returns:
        ``(keys, sha_to_source, last_run)``: (path, size, mtime_ns) of every file seen (ingested or
        rejected), the content hash -> first source path of every ingested file, and the highest run number.
    """
    scan = scan_manifests(root)
    return scan.known(reexamine), scan.shas, scan.last_run


def latest_rejections(root: str | os.PathLike[str]) -> dict[Key, dict[str, Any]]:
    """The newest rejected record of each file (path, size, mtime_ns) that no shard ingested, with its
    ``shard``: a file re-examined by a later run (a transient error, changed limits) counts as it was judged
    last. ``pages_dropped`` notes are about ingested files and not listed."""
    return scan_manifests(root).rejections


def latest_page_notes(root: str | os.PathLike[str]) -> dict[Key, dict[str, Any]]:
    """The ``pages_dropped`` note (with its ``shard``) of each ingested stack whose later slices are not stored,
    as its latest look left it: a later shard that looked at the file again (a stack re-examined under raised
    limits) replaces the note with its own, or removes it when it took every remaining slice."""
    return scan_manifests(root).page_notes


def build_index(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Rebuild ``index.json`` and ``rejected.jsonl`` from the committed manifests (the source of truth), in one
    read of them."""
    shards = []
    scan = StoreScan(with_shas=False)
    n_gray = n_rgb = 0
    acc = {1: _StatAcc(1), 3: _StatAcc(3)}
    min_short = max_short = None
    for sid, man, digest in iter_manifests(root):
        scan.add(sid, man)
        shards.append({"id": sid, "images": len(man["images"]),
                       "rejected": sum(r.get("kind") != UNCHANGED_KIND for r in man["rejected"]),
                       "manifest_sha256": digest, "run": man["run"]})
        for rec in man["images"]:
            pixels = rec["height"] * rec["width"]
            s = min(rec["height"], rec["width"])
            min_short = s if min_short is None else min(min_short, s)
            max_short = s if max_short is None else max(max_short, s)
            if rec["channels"] == 1:
                n_gray += 1
                acc[1].add(pixels, rec["mean"], rec["std"])
                acc[3].add(pixels, rec["mean"] * 3, rec["std"] * 3)  # expanded to RGB at load
            else:
                n_rgb += 1
                acc[3].add(pixels, rec["mean"], rec["std"])
                acc[1].add(pixels, [rec["luma_mean"]], [rec["luma_std"]])  # converted to gray at load
    # one line per file as it was last judged, plus the slices dropped from ingested stacks
    latest = scan.rejections
    rejected_lines = [json.dumps(r) for r in latest.values()]
    rejected_lines += [json.dumps(r) for r in scan.page_notes.values()]
    index = {
        "format": FORMAT, "version": VERSION, "created": _now(), "code_version": code_version(WRITER_PACKAGE),
        "num_images": n_gray + n_rgb, "num_gray": n_gray, "num_rgb": n_rgb,
        "num_rejected": len(latest), "min_short_side": min_short, "max_short_side": max_short,
        "data_hash": data_hash([(s["id"], s["manifest_sha256"]) for s in shards]),
        "stats": {str(c): a.result() for c, a in acc.items() if a.n},
        "shards": shards,
    }
    atomic_write_text(Path(root) / REJECTED_FILE, "".join(line + "\n" for line in rejected_lines))
    atomic_write_json(Path(root) / INDEX_FILE, index)
    return index


def data_hash(shard_digests: Iterable[tuple[str, str]]) -> str:
    """Hash identifying the ingested data: the list of committed shards and their manifests' sha256."""
    return canonical_hash(sorted(shard_digests), length=32)


class _StatAcc:
    """Pixel-weighted pooling of per-image channel means/stds into dataset mean/std."""

    def __init__(self, channels: int):
        self.n = 0
        # plain floats: one numpy call per image costs more than the sums (the same float64 arithmetic)
        self.s1 = [0.0] * channels
        self.s2 = [0.0] * channels

    def add(self, pixels: int, mean: list[float], std: list[float]) -> None:
        self.n += pixels
        for c, (m, s) in enumerate(zip(mean, std, strict=True)):
            self.s1[c] += pixels * m
            self.s2[c] += pixels * (s**2 + m**2)

    def result(self) -> dict[str, list[float]]:
        mean = np.asarray(self.s1) / self.n
        std = np.sqrt(np.maximum(np.asarray(self.s2) / self.n - mean**2, 1e-12))
        return {"mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std]}


# ------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ImageEntry:
    """One stored image: a byte range of a shard's ``images.bin``."""

    path: str
    offset: int
    length: int
    ext: str
    height: int
    width: int
    channels: int


@dataclass
class IngestedImages:
    """An opened ingest store.

    Attributes:
        root: The directory.
        entries: Every stored image of every committed shard, in shard order.
        data_hash: Identity of the data (recorded in checkpoints and ``encoder.json``).
        stats: ``{"1": {"mean", "std"}, "3": {...}}`` channel statistics for either input channel count.
    """

    root: Path
    entries: list[ImageEntry]
    data_hash: str
    stats: dict[str, dict[str, list[float]]]

    @property
    def num_gray(self) -> int:
        return sum(e.channels == 1 for e in self.entries)


def open_images(root: str | os.PathLike[str]) -> IngestedImages:
    """Open the output of ``segfactory ingest`` (reading the committed shard manifests).

    Raises:
        UserError: if it is not an ingest output or holds no images.
    """
    from segfactory.formats.dataset import DATASET_FILE

    root = Path(root)
    fix = "pass the --out directory of `segfactory ingest`"
    if not root.is_dir():
        raise UserError(f"images directory '{root}' does not exist", fix=fix)
    if (root / DATASET_FILE).is_file():  # it has shards/ too, of frames, not packed images
        raise UserError(f"'{root}' is a rendered dataset, not an ingested image set",
                        fix=f"{fix} (real unlabeled images; rendered frames are fine-tuning data)")
    if not shards_dir(root).is_dir():
        raise UserError(f"'{root}' is not an ingested image set (no {SHARDS_DIR}/ folder)", fix=fix)
    entries: list[ImageEntry] = []
    digests = []
    for sid, man, digest in iter_manifests(root):
        if man.get("format") != FORMAT or not isinstance(man.get("images"), list):
            raise UserError(f"'{root}' is not an ingested image set ({SHARDS_DIR}/{sid}/{MANIFEST_FILE} is not an "
                            "ingest shard's manifest)", fix=fix)
        digests.append((sid, digest))
        pack = str(shards_dir(root) / sid / PACK_FILE)
        entries.extend(ImageEntry(pack, r["offset"], r["length"], r["ext"], r["height"], r["width"], r["channels"])
                       for r in man["images"])
    if not entries:
        raise UserError(f"'{root}' holds no ingested images (every file was rejected or ingest never finished)",
                        fix=f"see {root / REJECTED_FILE}, then re-run `segfactory ingest`")
    index_path = root / INDEX_FILE
    stats = read_json(index_path)["stats"] if index_path.is_file() else {}
    dh = data_hash(digests)
    if not stats or (index_path.is_file() and read_json(index_path).get("data_hash") != dh):
        stats = build_index(root)["stats"]  # index.json is derived; rebuild it when stale
    return IngestedImages(root, entries, dh, stats)


def read_entry_bytes(entry: ImageEntry) -> bytes:
    """The stored (encoded) bytes of one entry."""
    with open(entry.path, "rb") as f:
        f.seek(entry.offset)
        data = f.read(entry.length)
    if len(data) != entry.length:
        raise CorruptShardError.of(entry, f"its {PACK_FILE} is truncated (image at offset {entry.offset})")
    return data


class CorruptShardError(UserError, OSError):
    """A stored image that cannot be read back: its shard is corrupt (changed on disk since it was committed).

    One line naming the shard and the fix; an ``OSError`` too, so that readers that skip an unreadable image
    still catch it. Raised inside a DataLoader worker, it reaches the main process re-built by torch from its
    text (``Caught ... Original Traceback ...``): the constructor keeps only the original line.
    """

    def __init__(self, message: str, fix: str | None = None):
        tail = f"{type(self).__module__}.{type(self).__name__}: "
        if fix is None and tail in message:  # re-built from a worker's traceback text
            message = message.rsplit(tail, 1)[1].strip()
            if message.endswith(")") and " (fix: " in message:
                message, fix = message[:-1].split(" (fix: ", 1)
        UserError.__init__(self, message, fix=fix)

    @classmethod
    def of(cls, entry: ImageEntry, why: str) -> CorruptShardError:
        shard = Path(entry.path).parent
        store = shard.parent.parent
        return cls(f"ingest shard '{shard}' is corrupt: {why}",
                   fix=f"run `segfactory verify --repair {store}` (moves the shard aside), then re-run "
                       f"`segfactory ingest` into '{store}' (it ingests the shard's images again)")


def decode_entry(entry: ImageEntry, flag: int | None = None, data: bytes | None = None) -> npt.NDArray[np.uint8]:
    """Decode one stored image with OpenCV: (H, W) gray or (H, W, 3) RGB uint8 (``flag``: an ``IMREAD_*``
    flag, e.g. a reduced-size JPEG decode; default: as stored). ``data``: its stored bytes when already read
    (a streaming reader's window read, :func:`segfactory.streaming.read_window`); default: read them."""
    import cv2

    img = cv2.imdecode(np.frombuffer(read_entry_bytes(entry) if data is None else data, np.uint8),
                       cv2.IMREAD_UNCHANGED if flag is None else flag)
    if img is None:
        raise CorruptShardError.of(entry, f"cannot decode its image at offset {entry.offset} of {PACK_FILE}")
    if img.dtype != np.uint8:  # ingest stores 8-bit images only
        raise CorruptShardError.of(entry, f"its image at offset {entry.offset} of {PACK_FILE} is {img.dtype}, "
                                   "not 8-bit")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.asarray(img, dtype=np.uint8)  # no copy: only gives the checked dtype its type


