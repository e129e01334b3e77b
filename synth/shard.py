"""Shards: planning, content-addressed ids, writing frames, and committing (no Blender here).

A shard is ``scenes_per_shard`` consecutive scenes rendered by one Blender process. Its id is a hash of what
determines its pixels (the dataset's config hash, base seed, scene range, code version), so a finished shard
is never rendered twice and a changed config never reuses one.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import segfactory
from scenes.spec import ClassDef, PostFX, SceneSpec
from segfactory.io import atomic_write_json, canonical_hash, commit_dir, sha256_file
from synth.coco import coco_document, frame_annotations
from synth.dataset import IGNORE_INDEX, MANIFEST_FILE, SHARDS_DIR, is_committed

DEPTH_UNITS_PER_SCENE_UNIT = 1000.0  # depth PNGs hold 1/1000 scene units (mm for metre scenes)
DEPTH_MAX = 65535
RENDER_PACKAGES = ("scenes", "synth")  # the code that decides a frame's pixels


def render_code_version() -> str:
    """Code version that shard ids hash: a change to scene sampling or rendering re-renders, others do not."""
    return segfactory.code_version(*RENDER_PACKAGES)


@dataclass(frozen=True)
class ShardPlan:
    index: int
    shard_id: str
    scene_start: int
    scene_stop: int
    seed: int


def plan_shards(family: str, config_hash: str, seed: int, scenes: int, scenes_per_shard: int, code_version: str
                ) -> list[ShardPlan]:
    """Split ``scenes`` scenes into shards with content-addressed ids."""
    plans = []
    for index, start in enumerate(range(0, scenes, scenes_per_shard)):
        stop = min(start + scenes_per_shard, scenes)
        key = {"config": config_hash, "seed": seed, "scenes": [start, stop], "code": code_version}
        digest = canonical_hash(key, 10)
        plans.append(ShardPlan(index, f"{family}-{start:06d}-{digest}", start, stop, seed))
    return plans


def shard_dir(root: str | os.PathLike, shard_id: str) -> Path:
    return Path(root) / SHARDS_DIR / shard_id


def new_tmp_dir(root: str | os.PathLike, shard_id: str) -> Path:
    """A fresh temporary directory next to where the shard will be committed (same filesystem)."""
    tmp = Path(root) / SHARDS_DIR / f".tmp-{shard_id}-{uuid.uuid4().hex[:8]}"
    for sub in ("rgb", "semantic", "instance", "depth"):
        (tmp / sub).mkdir(parents=True)
    return tmp


def remove_stale_tmp(root: str | os.PathLike, shard_id: str | None = None) -> int:
    """Delete leftovers of interrupted shard writes (all, or those of one shard). Returns how many."""
    d = Path(root) / SHARDS_DIR
    if not d.is_dir():
        return 0
    pattern = f".tmp-{shard_id}-*" if shard_id else ".tmp-*"
    stale = list(d.glob(pattern))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def commit_shard(tmp: Path, final: Path) -> bool:
    """Move a complete shard (manifest written last) into place. Returns False if another process already
    committed the same shard (a retried task racing a straggler): ours is then discarded."""
    if not is_committed(tmp):
        raise RuntimeError(f"refusing to commit {tmp}: no {MANIFEST_FILE}")
    if final.exists():
        if is_committed(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        shutil.rmtree(final)  # not a shard: an interrupted copy by hand or a foreign directory
    try:
        commit_dir(tmp, final)
    except OSError:
        if is_committed(final):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    return True


def labels_from_index(index: np.ndarray, spec: SceneSpec) -> tuple[np.ndarray, np.ndarray]:
    """Object-index map -> (semantic uint8, instance uint16).

    Instance ids are the object's index in the scene (stable across the scene's views); stuff classes get 0.
    """
    n = len(spec.objects)
    if index.min() < 0 or index.max() > n:
        raise RuntimeError(f"label pass returned object index {int(index.max())} outside 0..{n}")
    thing = {c.id for c in spec.classes if c.thing}
    cls = spec.class_of_object()
    inst = np.array([0] + [i + 1 if o.class_id in thing else 0 for i, o in enumerate(spec.objects)], dtype=np.uint16)
    return cls[index].astype(np.uint8), inst[index]


def depth_to_png(depth: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Depth in scene units -> uint16 in 1/1000 scene units; 0 = no surface, 65535 = at or beyond the range."""
    d = np.rint(depth.astype(np.float64) * DEPTH_UNITS_PER_SCENE_UNIT)
    d = np.clip(np.nan_to_num(d, nan=0.0, posinf=DEPTH_MAX), 1, DEPTH_MAX)
    d[index == 0] = 0
    return d.astype(np.uint16)


def write_image(path: Path, img: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write PNG/JPEG (RGB in, OpenCV's BGR on disk), failing loudly instead of silently."""
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(str(path), img, params):
        raise OSError(f"could not write {path}")


class ShardWriter:
    """Accumulates a shard's frames in its temporary directory; :meth:`finish` writes COCO and the manifest."""

    def __init__(self, tmp: Path, plan: ShardPlan, classes: list[ClassDef], image_format: str, jpeg_quality: int):
        self.tmp = tmp
        self.plan = plan
        self.classes = [asdict(c) for c in classes]
        self.ext = "jpg" if image_format == "jpg" else "png"
        self.jpeg_quality = jpeg_quality
        self.frames: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, scene_index: int, view: int, rgb: np.ndarray, semantic: np.ndarray, instance: np.ndarray,
            depth: np.ndarray, camera: dict[str, Any], post: PostFX) -> None:
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
            "seed": [self.plan.seed, scene_index],
            "files": {k: {"path": v, "sha256": sha256_file(self.tmp / v)} for k, v in files.items()},
            "camera": camera,
            "post": asdict(post),
            "ignore_pixels": int((semantic == IGNORE_INDEX).sum()),
        })

    def finish(self, manifest_extra: dict[str, Any]) -> None:
        coco = coco_document(self.images, self.annotations, self.classes, f"segfactory shard {self.plan.shard_id}")
        atomic_write_json(self.tmp / "coco.json", coco)
        manifest = {
            "format": "segfactory-shard",
            "format_version": 1,
            "shard_id": self.plan.shard_id,
            "shard_index": self.plan.index,
            "seed": self.plan.seed,
            "scenes": [self.plan.scene_start, self.plan.scene_stop],
            "num_frames": len(self.frames),
            "num_instances": len(self.annotations),
            "coco_sha256": sha256_file(self.tmp / "coco.json"),
            "frames": self.frames,
            **manifest_extra,
        }
        atomic_write_json(self.tmp / MANIFEST_FILE, manifest)  # last: the commit mark
