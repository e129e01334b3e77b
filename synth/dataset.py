"""Reading the segfactory dataset layout (no Blender): what other stages and outside tools rely on.

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

A shard directory without ``manifest.json`` does not exist (it is an interrupted write).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segfactory.errors import UserError
from segfactory.io import read_json

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
IGNORE_INDEX = 255
DEPTH_SCALE_M = 0.001  # one depth unit in metres (uint16 millimetres)


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
        return self.meta["classes"]

    @property
    def num_classes(self) -> int:
        return max(c["id"] for c in self.classes) + 1

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
        return read_json(self.shard_dir(shard_id) / MANIFEST_FILE)

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


def is_committed(shard_dir: str | os.PathLike) -> bool:
    return (Path(shard_dir) / MANIFEST_FILE).is_file()


def committed_shards(root: str | os.PathLike) -> list[str]:
    d = Path(root) / SHARDS_DIR
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and is_committed(p))


def open_dataset(root: str | os.PathLike) -> Dataset:
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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image keeping bit depth and channel count: (H, W) gray or (H, W, 3) RGB, uint8/uint16."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UserError(f"cannot read image '{path}' (missing or corrupt)", fix="re-render or remove the file")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return img


def load_frame(ref: FrameRef) -> dict[str, np.ndarray]:
    """Load one frame.

    Returns:
        ``rgb`` (H, W, 3) or (H, W) uint8/uint16, ``semantic`` (H, W) uint8, ``instance`` (H, W) uint16,
        ``depth`` (H, W) uint16 millimetres.
    """
    return {"rgb": read_image(ref.rgb), "semantic": read_image(ref.semantic),
            "instance": read_image(ref.instance), "depth": read_image(ref.depth)}
