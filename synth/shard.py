"""Shards: planning, content-addressed ids and turning render passes into label maps (no Blender here).

A shard is ``scenes_per_shard`` consecutive scenes rendered by one Blender process. Its id is a hash of what
determines its pixels (the dataset's config hash, base seed, scene range, code version), so a finished shard
is never rendered twice and a changed config never reuses one. Writing and committing shards is the dataset
format's job (:mod:`segfactory.formats.dataset`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import segfactory
from scenes.spec import SceneSpec
from segfactory.formats.dataset import DEPTH_MAX, DEPTH_UNITS_PER_SCENE_UNIT
from segfactory.io import canonical_hash

RENDER_PACKAGES = ("scenes", "synth", "segfactory.seeds")  # the code that decides a frame's pixels
# A render process prints `PROGRESS_PREFIX <shard id> <frames written>` after each frame.
PROGRESS_PREFIX = "SEGFACTORY-PROGRESS"
# The per-attempt scratch directory a render process's parent made for it (``pipelines.render.render_scratch``):
# Blender's intermediate passes and its session temp dir go there, and the parent removes it whatever the child did.
SCRATCH_ENV = "SEGFACTORY_RENDER_SCRATCH"
SCRATCH_PREFIX = "segfactory-blender-"
SCRATCH_ROOT_ENV = "SEGFACTORY_SCRATCH_ROOT"


def scratch_root() -> str | None:
    """Where render scratch directories go: ``$SEGFACTORY_SCRATCH_ROOT`` if set (e.g. a disk folder where
    ``/dev/shm`` is small: Docker's default is 64 MB), else ``/dev/shm`` (memory: Blender writes every pass as an
    EXR file and reads it back) where there is one, else the system's temp dir (None)."""
    root = os.environ.get(SCRATCH_ROOT_ENV)
    if root:
        return root
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


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
