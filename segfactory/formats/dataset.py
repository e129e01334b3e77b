"""The rendered dataset format (no Blender): its layout, reader and writer, used by ``synth`` and every reader.

Layout::

    DATASET/dataset.json                       classes [{id, name, color, thing}], ignore_index, shards,
                                               frame counts, image format, depth scale, config hash, code version
    DATASET/config.yaml                        resolved render config
    DATASET/shards/<shard_id>/rgb/<frame>.png|.jpg      RGB (3 channels) or gray (1 channel), 8 or 16 bit
    DATASET/shards/<shard_id>/semantic/<frame>.png      uint8 class ids, 255 = ignore
    DATASET/shards/<shard_id>/instance/<frame>.png      uint16 instance ids, 0 = none
    DATASET/shards/<shard_id>/depth/<frame>.png         uint16 depth in millimetres, 0 = no surface (sky)
    DATASET/shards/<shard_id>/coco.json                 COCO instances, RLE masks
    DATASET/shards/<shard_id>/manifest.json             written last: the shard's commit mark
    DATASET/.readers.lock                      held shared by processes that read frames over time (fine-tuning,
                                               evaluation, probing, `segfactory show` and `stats`): a refresh's
                                               prune deletes no shard while one does

A shard directory without ``manifest.json`` does not exist (it is an interrupted write). Shards are committed
with the shared unit protocol of :mod:`segfactory.io` (attempt directory, manifest last, fsync, rename).

Renders write shards one by one (:class:`ShardWriter`, :func:`commit_shard`, :func:`write_dataset_meta`);
:func:`write_dataset` writes a whole small dataset from NumPy arrays through the same calls (test fixtures,
converted label sets).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from segfactory import code_version
from segfactory.errors import UserError
from segfactory.formats.coco import coco_document, frame_annotations
from segfactory.formats.imagefile import ImageArray, read_image, write_image
from segfactory.io import (
    MANIFEST_FILE,
    atomic_write_json,
    canonical_hash,
    check_files,
    commit_unit,
    committed_units,
    is_committed,
    new_attempt_dir,
    read_json,
    remove_stale_attempts,
    sha256_file,
)

FORMAT = "segfactory-dataset"
SHARD_FORMAT = "segfactory-shard"
FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
SHARDS_DIR = "shards"
FRAME_KINDS = ("rgb", "semantic", "instance", "depth")
IGNORE_INDEX = 255
DEPTH_SCALE_M = 0.001  # one depth unit in metres (uint16 millimetres)
DEPTH_UNITS_PER_SCENE_UNIT = 1000.0  # depth PNGs hold 1/1000 scene units (mm for metre scenes)
DEPTH_MAX = 65535

__all__ = ["DATASET_FILE", "IGNORE_INDEX", "MANIFEST_FILE", "SHARDS_DIR", "Dataset", "FrameArrays", "FrameRef",
           "ShardWriter", "commit_shard", "committed_shards", "is_committed", "load_frame", "new_shard_attempt",
           "open_dataset", "remove_stale_shard_writes", "shard_dir", "verify_shard", "write_dataset",
           "write_dataset_meta"]


@dataclass(frozen=True)
class FrameRef:
    """Paths of one frame's files."""

    shard_id: str
    name: str
    rgb: Path
    semantic: Path
    instance: Path
    depth: Path


@dataclass
class Dataset:
    """An opened dataset: its ``dataset.json`` plus the committed shards found on disk.

    Attributes:
        root: Dataset directory.
        meta: Parsed ``dataset.json``.
        shard_ids: The shards dataset.json lists that are committed (have a manifest), sorted.
    """

    root: Path
    meta: dict[str, Any]
    shard_ids: list[str]

    @property
    def classes(self) -> list[dict[str, Any]]:
        classes: list[dict[str, Any]] = self.meta["classes"]
        return classes

    @property
    def num_classes(self) -> int:
        return max(int(c["id"]) for c in self.classes) + 1

    @property
    def ignore_index(self) -> int:
        return int(self.meta.get("ignore_index", IGNORE_INDEX))

    @property
    def class_names(self) -> list[str]:
        names = [f"class_{i}" for i in range(self.num_classes)]
        for c in self.classes:
            names[c["id"]] = c["name"]
        return names

    def shard_dir(self, shard_id: str) -> Path:
        return self.root / SHARDS_DIR / shard_id

    def manifest(self, shard_id: str) -> dict[str, Any]:
        manifest: dict[str, Any] = read_json(self.shard_dir(shard_id) / MANIFEST_FILE)
        return manifest

    def frames(self) -> Iterator[FrameRef]:
        """All frames of all committed shards, in shard then manifest order."""
        for sid in self.shard_ids:
            d = self.shard_dir(sid)
            for fr in self.manifest(sid)["frames"]:
                files = fr["files"]
                yield FrameRef(sid, fr["name"], d / files["rgb"]["path"], d / files["semantic"]["path"],
                               d / files["instance"]["path"], d / files["depth"]["path"])

    def __len__(self) -> int:
        return sum(len(self.manifest(s)["frames"]) for s in self.shard_ids)


def shard_dir(root: str | os.PathLike[str], shard_id: str) -> Path:
    return Path(root) / SHARDS_DIR / shard_id


def committed_shards(root: str | os.PathLike[str]) -> list[str]:
    """Every committed shard on disk, listed in dataset.json or not."""
    return committed_units(Path(root) / SHARDS_DIR)


def open_dataset(root: str | os.PathLike[str]) -> Dataset:
    """Open a rendered dataset, or raise a UserError saying why it is not one."""
    root = Path(root)
    meta_path = root / DATASET_FILE
    if not root.is_dir():
        raise UserError(f"dataset '{root}' does not exist", fix="pass the --out directory of `segfactory render`")
    if not meta_path.is_file():
        raise UserError(f"'{root}' is not a segfactory dataset (no {DATASET_FILE})",
                        fix="pass the --out directory of `segfactory render`")
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError) as e:
        raise UserError(f"'{meta_path}' is unreadable: {e}", fix="re-render the dataset") from None
    listed = {s["id"] for s in meta.get("shards", [])}
    # Only the shards dataset.json lists make up the dataset: a directory can also hold committed shards of
    # another size, seed or shard size of the same config (kept for re-use, not part of this dataset).
    return Dataset(root, meta, [sid for sid in committed_shards(root) if sid in listed])


READERS_LOCK = ".readers.lock"
READERS_WAIT_S = 120.0
"""How long a reader waits for a prune that is deleting shards of its dataset."""
_READING: dict[str, int] = {}  # dataset (real path) -> the fd of its readers' lock, held by this process


def _open_readers_lock(root: Path) -> int | None:
    lock = root / READERS_LOCK
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        try:
            return os.open(lock, os.O_RDONLY)  # a dataset this user may read but not write: lock it if it is there
        except OSError:
            return None


def hold_for_reading(root: str | os.PathLike[str]) -> None:
    """Hold a shared lock on ``DATASET/.readers.lock`` for the rest of this process (released when it exits,
    however it ends).

    A process that reads a dataset's frames over time (fine-tuning, evaluation, ``segfactory show`` and ``stats``)
    calls this before reading ``dataset.json``: a refresh's prune that retires shards rewrites ``dataset.json`` at
    once but deletes the retired shards only when no process holds the lock (:func:`no_readers`), so every shard
    of the listing a reader started from stays until it is done. A dataset whose lock cannot be opened (read-only,
    no lock file) is read without it.

    Raises:
        UserError: a prune has been deleting shards of the dataset for ``READERS_WAIT_S`` (exit code 4).
    """
    from segfactory.errors import EXIT_BUSY

    key = os.path.realpath(root)
    if key in _READING or not os.path.isfile(os.path.join(key, DATASET_FILE)):
        return  # not a dataset (open_dataset says why): no lock file left in a wrong folder
    fd = _open_readers_lock(Path(key))
    if fd is None:
        return
    deadline = time.monotonic() + READERS_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise UserError(f"dataset '{root}' has had shards deleted by another process (a refresh's prune) "
                                f"for over {READERS_WAIT_S:g} s", fix="wait for that refresh to finish, then re-run",
                                exit_code=EXIT_BUSY) from None
            time.sleep(0.1)
        except OSError:  # a filesystem without flock: read as before
            os.close(fd)
            return
    _READING[key] = fd


@contextlib.contextmanager
def no_readers(root: str | os.PathLike[str]) -> Iterator[bool]:
    """Inside the block, whether no process reads the dataset (:func:`hold_for_reading`): True with its readers'
    lock held exclusively (a reader that starts meanwhile waits, then reads the ``dataset.json`` written before),
    False when one does (nothing is held; deleting shards must wait for a later prune)."""
    fd = _open_readers_lock(Path(root))
    if fd is None:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        except OSError:  # no flock on this filesystem: no reader can be known
            yield True
            return
        yield True
    finally:
        os.close(fd)


def verify_shard(root: str | os.PathLike[str], shard_id: str) -> list[str]:
    """Re-hash every file of a committed shard against its manifest (frames and ``coco.json``).

    Returns:
        One line per problem (a missing, unreadable or changed file, an unreadable manifest); empty when intact.
    """
    d = shard_dir(root, shard_id)
    try:
        manifest = read_json(d / MANIFEST_FILE)
        expected = {e["path"]: e["sha256"] for fr in manifest["frames"] for e in fr["files"].values()}
        expected["coco.json"] = manifest["coco_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})"]
    return check_files(d, expected)


def load_frame(ref: FrameRef) -> dict[str, ImageArray]:
    """Load one frame.

    Returns:
        ``rgb`` (H, W, 3) or (H, W) uint8/uint16, ``semantic`` (H, W) uint8, ``instance`` (H, W) uint16,
        ``depth`` (H, W) uint16 millimetres.
    """
    return {"rgb": read_image(ref.rgb), "semantic": read_image(ref.semantic),
            "instance": read_image(ref.instance), "depth": read_image(ref.depth)}


# --------------------------------------------------------------------------------------------------- writing


def new_shard_attempt(root: str | os.PathLike[str], shard_id: str) -> Path:
    """A fresh attempt directory (with the frame subfolders) next to where the shard will be committed."""
    tmp = new_attempt_dir(Path(root) / SHARDS_DIR, shard_id)
    for sub in FRAME_KINDS:
        (tmp / sub).mkdir()
    return tmp


def remove_stale_shard_writes(root: str | os.PathLike[str], shard_id: str | None = None) -> int:
    """Delete leftovers of interrupted shard writes (all, or those of one shard). Returns how many."""
    return len(remove_stale_attempts(Path(root) / SHARDS_DIR, shard_id))


def commit_shard(tmp: Path, final: Path) -> bool:
    """Commit a complete shard (manifest written last); False if another attempt already committed it."""
    return commit_unit(tmp, final)


class ShardWriter:
    """Accumulates a shard's frames in its attempt directory; :meth:`finish` writes COCO and the manifest.

    Args:
        tmp: The attempt directory (:func:`new_shard_attempt`).
        shard_id: The shard's id.
        shard_index: Its position in the dataset's plan.
        seed: The dataset's base seed.
        scenes: ``(first, stop)`` scene indices the shard holds.
        classes: ``[{id, name, color, thing}]`` of the dataset.
        image_format: ``png`` or ``jpg`` for the RGB.
        jpeg_quality: JPEG quality.
    """

    def __init__(self, tmp: Path, shard_id: str, shard_index: int, seed: int, scenes: tuple[int, int],
                 classes: list[dict[str, Any]], image_format: str, jpeg_quality: int):
        self.tmp = tmp
        self.shard_id = shard_id
        self.shard_index = shard_index
        self.seed = seed
        self.scenes = [int(scenes[0]), int(scenes[1])]
        self.classes = classes
        self.ext = "jpg" if image_format == "jpg" else "png"
        self.jpeg_quality = jpeg_quality
        self.frames: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, scene_index: int, view: int, rgb: ImageArray, semantic: npt.NDArray[np.uint8],
            instance: npt.NDArray[np.uint16], depth: npt.NDArray[np.uint16], camera: dict[str, Any],
            post: dict[str, Any]) -> None:
        """Write one frame's files.

        Args:
            rgb: (H, W, 3) or (H, W) uint8/uint16.
            semantic: (H, W) uint8 class ids.
            instance: (H, W) uint16 instance ids.
            depth: (H, W) uint16 depth (:data:`DEPTH_UNITS_PER_SCENE_UNIT`).
            camera: The view's camera record.
            post: The view's post-processing parameters.
        """
        name = f"s{scene_index:06d}_v{view:02d}"
        files = {"rgb": f"rgb/{name}.{self.ext}", "semantic": f"semantic/{name}.png",
                 "instance": f"instance/{name}.png", "depth": f"depth/{name}.png"}
        for key, arr in (("rgb", rgb), ("semantic", semantic), ("instance", instance), ("depth", depth)):
            write_image(self.tmp / files[key], arr, self.jpeg_quality)
        image_id = len(self.images) + 1
        h, w = semantic.shape
        self.images.append({"id": image_id, "file_name": files["rgb"], "height": h, "width": w, "frame": name})
        self.annotations += frame_annotations(instance, semantic, image_id, len(self.annotations) + 1)
        self.frames.append({
            "name": name,
            "scene_index": scene_index,
            "view": view,
            "seed": [self.seed, scene_index],
            "files": {k: {"path": v, "sha256": sha256_file(self.tmp / v)} for k, v in files.items()},
            "camera": camera,
            "post": post,
            "ignore_pixels": int((semantic == IGNORE_INDEX).sum()),
        })

    def finish(self, manifest_extra: dict[str, Any]) -> None:
        """Write ``coco.json`` and, last, ``manifest.json`` (the commit mark)."""
        coco = coco_document(self.images, self.annotations, self.classes, f"segfactory shard {self.shard_id}")
        atomic_write_json(self.tmp / "coco.json", coco)
        manifest = {
            "format": SHARD_FORMAT,
            "format_version": FORMAT_VERSION,
            "shard_id": self.shard_id,
            "shard_index": self.shard_index,
            "seed": self.seed,
            "scenes": self.scenes,
            "num_frames": len(self.frames),
            "num_instances": len(self.annotations),
            "coco_sha256": sha256_file(self.tmp / "coco.json"),
            "frames": self.frames,
            **manifest_extra,
        }
        atomic_write_json(self.tmp / MANIFEST_FILE, manifest)  # last: the commit mark


def write_dataset_meta(root: str | os.PathLike[str], meta: dict[str, Any], shard_ids: list[str]) -> dict[str, Any]:
    """Rewrite ``dataset.json`` listing those of ``shard_ids`` that are committed on disk.

    Only listed shards are part of the dataset (:func:`open_dataset`). Committed shards of another plan (a render
    of another size, seed or shard size into the same directory) stay on disk unlisted, so a dataset never holds
    a scene twice and switching back re-uses them.

    Args:
        root: Dataset directory.
        meta: Everything of dataset.json but the shard list (classes, image format, config hash, ...).
        shard_ids: The shards of the dataset's plan.

    Returns:
        The written dataset.json.
    """
    root = Path(root)
    shards = []
    on_disk = set(committed_shards(root))
    for sid in sorted(set(shard_ids) & on_disk):
        m = read_json(shard_dir(root, sid) / MANIFEST_FILE)
        shards.append({"id": sid, "frames": m["num_frames"], "instances": m["num_instances"], "scenes": m["scenes"],
                       "seed": m["seed"]})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "shards": shards,
            "num_shards": len(shards), "num_frames": sum(s["frames"] for s in shards)}
    atomic_write_json(root / DATASET_FILE, meta)
    return meta


# ------------------------------------------------------------------------------------------ from arrays


@dataclass(frozen=True)
class FrameArrays:
    """One view of a scene in the dataset's pixel formats (the arrays :meth:`ShardWriter.add` writes).

    Attributes:
        rgb: (H, W, 3) RGB or (H, W) gray, uint8 or uint16.
        semantic: (H, W) uint8 class ids, :data:`IGNORE_INDEX` = ignore.
        instance: (H, W) uint16 instance ids, 0 = none; the same object keeps its id in every view of its scene.
        depth: (H, W) uint16 in 1/1000 scene units, 0 = no surface, :data:`DEPTH_MAX` = at or beyond 65.535 units.
        camera: The view's camera record (stored in the manifest).
        post: The view's post-processing parameters (stored in the manifest).
    """

    rgb: ImageArray
    semantic: npt.NDArray[np.uint8]
    instance: npt.NDArray[np.uint16]
    depth: npt.NDArray[np.uint16]
    camera: dict[str, Any] = field(default_factory=dict)
    post: dict[str, Any] = field(default_factory=dict)


def _check_frame(frame: FrameArrays, first: FrameArrays, class_ids: set[int], where: str) -> None:
    """Raise a ValueError unless ``frame`` has the dataset's dtypes and shapes and only known class ids."""
    if frame.semantic.ndim != 2:
        raise ValueError(f"{where}: semantic has shape {frame.semantic.shape}, expected (H, W)")
    shape = first.semantic.shape
    for name, arr, dtypes in (("rgb", frame.rgb, (np.uint8, np.uint16)), ("semantic", frame.semantic, (np.uint8,)),
                              ("instance", frame.instance, (np.uint16,)), ("depth", frame.depth, (np.uint16,))):
        if arr.dtype not in dtypes or arr.shape[:2] != shape or (name != "rgb" and arr.ndim != 2):
            raise ValueError(f"{where}: {name} is {arr.dtype} {arr.shape}, expected "
                             f"{' or '.join(np.dtype(d).name for d in dtypes)} of {shape[0]}x{shape[1]} pixels")
    if frame.rgb.ndim == 3 and frame.rgb.shape[2] != 3:
        raise ValueError(f"{where}: rgb has {frame.rgb.shape[2]} channels, expected 3 (RGB) or an (H, W) gray image")
    if frame.rgb.dtype != first.rgb.dtype or frame.rgb.shape != first.rgb.shape:
        raise ValueError(f"{where}: rgb is {frame.rgb.dtype} {frame.rgb.shape} but the first frame's is "
                         f"{first.rgb.dtype} {first.rgb.shape} (one dataset, one image format)")
    unknown = {int(v) for v in np.unique(frame.semantic)} - class_ids - {IGNORE_INDEX}
    if unknown:
        raise ValueError(f"{where}: semantic holds class id(s) {sorted(unknown)} that are not in the classes")


def _scene_digest(frames: Sequence[FrameArrays]) -> str:
    h = hashlib.sha256()
    for f in frames:
        for arr in (f.rgb, f.semantic, f.instance, f.depth):
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(canonical_hash([f.camera, f.post]).encode())
    return h.hexdigest()


def write_dataset(root: str | os.PathLike[str], scenes: Sequence[Sequence[FrameArrays]],
                  classes: Sequence[Mapping[str, Any]], *, family: str, seed: int = 0, scenes_per_shard: int = 4,
                  image_format: Literal["png", "jpg"] = "png", jpeg_quality: int = 95, background_class: int = 0,
                  unit_m: float = 1.0, source: Mapping[str, Any] | None = None) -> Dataset:
    """Write a complete dataset from NumPy arrays, through the same writer and commit protocol as a render.

    Frame ``s<scene>_v<view>`` is ``scenes[scene][view]``. Scenes are split into shards of ``scenes_per_shard``
    like a render's plan; each shard gets its files, ``coco.json`` and, last, ``manifest.json`` in an attempt
    directory that is then committed, and ``dataset.json`` lists them. Shard ids have a render's form,
    ``<family>-<first scene>-<hash>``, the hash covering the pixels, so other pixels never reuse a shard id.
    There is no ``config.yaml`` (no render config made the frames); ``dataset.json`` says ``"generator":
    "arrays"`` and carries ``source``. Everything is held in memory: this is for small datasets.

    Args:
        root: New or empty dataset directory.
        scenes: Per scene, its views (at least one scene with one view).
        classes: ``[{id, name, color, thing}]``; ``thing`` classes get COCO instances.
        family: Name for the shard ids and ``dataset.json`` (like a scene family's).
        seed: Recorded as the dataset's seed (frame records hold ``[seed, scene]``).
        scenes_per_shard: Scenes per shard.
        image_format: ``png`` (lossless) or ``jpg`` for the RGB files.
        jpeg_quality: JPEG quality.
        background_class: Class of pixels where no object is (``dataset.json``'s ``background_class``).
        unit_m: Length of one scene unit in metres (depth scale: ``DEPTH_SCALE_M * unit_m`` per depth unit).
        source: JSON-able description of where the arrays came from (written into ``dataset.json``).

    Returns:
        The opened dataset.

    Raises:
        UserError: ``root`` is a file or a non-empty directory.
        ValueError: no frames, frames of another dtype or shape than the first, unknown class ids, or classes
            without ``id``, ``name``, ``color`` or ``thing``.
    """
    root = Path(root)
    if root.is_file() or (root.is_dir() and any(root.iterdir())):
        raise UserError(f"'{root}' is not a new or empty directory", fix="write the dataset into a new directory")
    if not scenes or not all(scenes):
        raise ValueError("write_dataset needs at least one scene, and every scene at least one view")
    if scenes_per_shard < 1:
        raise ValueError(f"scenes_per_shard must be >= 1, got {scenes_per_shard}")
    class_list: list[dict[str, Any]] = [
        {"id": int(c["id"]), "name": str(c["name"]), "color": [int(v) for v in c["color"]], "thing": bool(c["thing"])}
        for c in classes]
    first = scenes[0][0]
    for s, views in enumerate(scenes):
        for v, frame in enumerate(views):
            _check_frame(frame, first, {c["id"] for c in class_list}, f"scene {s} view {v}")
    config_hash = canonical_hash({"family": family, "seed": seed, "classes": class_list, "unit_m": unit_m,
                                  "image_format": image_format, "scenes": [_scene_digest(v) for v in scenes]})
    version = code_version("segfactory")
    root.mkdir(parents=True, exist_ok=True)
    shard_ids = []
    for index, start in enumerate(range(0, len(scenes), scenes_per_shard)):
        stop = min(start + scenes_per_shard, len(scenes))
        shard_id = f"{family}-{start:06d}-{canonical_hash({'config': config_hash, 'scenes': [start, stop]}, 10)}"
        tmp = new_shard_attempt(root, shard_id)
        try:
            writer = ShardWriter(tmp, shard_id, index, seed, (start, stop), class_list, image_format, jpeg_quality)
            for s in range(start, stop):
                for v, frame in enumerate(scenes[s]):
                    writer.add(s, v, frame.rgb, frame.semantic, frame.instance, frame.depth, frame.camera,
                               frame.post)
            writer.finish({"config_hash": config_hash, "code_version": version, "family": family,
                           "generator": "arrays",
                           "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")})
            commit_shard(tmp, shard_dir(root, shard_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shard_ids.append(shard_id)
    h, w = first.semantic.shape
    meta = {
        "family": family,
        "generator": "arrays",
        "source": dict(source or {}),
        "classes": class_list,
        "ignore_index": IGNORE_INDEX,
        "background_class": background_class,
        # A render's resolution is the side of its square frames; [width, height] says a frame is not square.
        "image": {"format": image_format, "bit_depth": 16 if first.rgb.dtype == np.uint16 else 8,
                  "channels": 1 if first.rgb.ndim == 2 else 3, "resolution": w if w == h else [w, h]},
        "depth": {"dtype": "uint16", "scale_m": DEPTH_SCALE_M * unit_m, "invalid": 0, "saturated": DEPTH_MAX},
        "config_hash": config_hash,
        "code_version": version,
    }
    write_dataset_meta(root, meta, shard_ids)
    return open_dataset(root)
