"""Render one shard in this process: ``python -m synth.worker JOB.json``.

Started by the render pipeline as a subprocess (own process group, timeout) so that a Blender crash or hang
costs a retry, not a Dask worker. Writes into a temporary directory and commits the shard by renaming it
once its manifest (written last) is complete. Prints ``SEGFACTORY-PROGRESS <shard> <frames>`` lines.
"""

from __future__ import annotations

import os

os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"  # before cv2 is imported anywhere

import ctypes
import ctypes.util
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from scenes import resolve_scene, sample_scene, scene_rng
from scenes.spec import Camera, SceneSpec
from segfactory.formats.dataset import ShardWriter, commit_shard, is_committed, new_shard_attempt, shard_dir
from segfactory.io import read_json
from segfactory.seeds import postprocess_rng
from synth.bproc_boot import purge_blender_tempdir
from synth.postfx import apply_lens, apply_post
from synth.shard import (
    PROGRESS_PREFIX,
    SCRATCH_ENV,
    SCRATCH_PREFIX,
    ShardPlan,
    depth_to_png,
    labels_from_index,
    scratch_root,
)

FAULT_ENV = "SEGFACTORY_FAULT"


def release_freed_memory() -> bool:
    """Hand the heap memory freed since the last call back to the OS (glibc's ``malloc_trim(0)``).

    Between scenes BlenderProc's clean-up removes every data block (no mesh, material, image or node tree of a
    scene outlives it: ``bpy.data`` holds only the current scene's few hundred blocks after each street scene), but
    glibc's malloc keeps the freed pages of Blender's and Cycles' many small allocations in its arenas, and the next
    scene's allocations reuse them only in part. With Cycles' session dropped between scenes as well
    (:meth:`synth.blender.SceneBuilder.build`), a 12-scene street shard's RSS stayed flat (README, "memory growth").

    Returns:
        Whether memory could be trimmed (False where the C library has no ``malloc_trim``, e.g. musl or macOS).
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def camera_record(cam: Camera) -> dict[str, Any]:
    rec: dict[str, Any] = {"location": list(cam.location), "rotation": np.asarray(cam.rotation).tolist(),
                           "projection": cam.projection}
    rec.update({"fov_rad": cam.fov} if cam.projection == "perspective" else {"ortho_scale": cam.ortho_scale})
    # Whether the sampler met camera.min_visible_objects, so sparse frames can be found and filtered.
    rec.update({"visible_objects": cam.visible_objects, "min_visible_met": cam.min_visible_met})
    if cam.kind is not None:  # which sort of camera (street: dashcam, pedestrian, surveillance), to filter by
        rec["kind"] = cam.kind
    return rec


def object_blur_px(spec: SceneSpec, view: int, index: np.ndarray) -> np.ndarray | None:
    """(N + 1,) per-object defocus sigma in px for one view (index 0: nothing), or None when no object has one.

    Orthographic views have a fixed scale (``ortho_scale`` units across the image); perspective views use each
    object's distance from the camera.
    """
    if not any(o.defocus > 0 for o in spec.objects):
        return None
    cam = spec.cameras[view]
    width = index.shape[1]
    sigma = np.zeros(len(spec.objects) + 1)
    for i, o in enumerate(spec.objects, start=1):
        if o.defocus <= 0:
            continue
        if cam.projection == "orthographic":
            sigma[i] = o.defocus * width / cam.ortho_scale
        else:
            dist = float(np.linalg.norm(np.subtract(o.location, cam.location)))
            sigma[i] = o.defocus * width / (2 * dist * np.tan(cam.fov / 2))
    return sigma


def ray_distance(depth: np.ndarray, cam: Camera) -> np.ndarray:
    """(H, W) distance from the camera along each pixel's ray, from the depth pass's distance along the view
    axis (what fog attenuates with). Orthographic rays are parallel to the axis: unchanged."""
    if cam.projection != "perspective":
        return depth
    h, w = depth.shape
    half = np.tan(cam.fov / 2)  # Blender's sensor fit AUTO: the fov spans the longer side
    scale = half / (max(h, w) / 2)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    tx, ty = (xx - (w - 1) / 2) * scale, (yy - (h - 1) / 2) * scale
    return depth * np.sqrt(1 + tx**2 + ty**2)


def _maybe_fault(root: Path, plan: ShardPlan) -> None:
    """Test hook: ``SEGFACTORY_FAULT=crash@2,hang-once@0`` crashes/hangs the shard with that index after its
    first frame (``-once``: only on the first attempt, so the retry succeeds). A hang first starts a child
    process and records its pid as ``.logs/<shard>.hang-child-<pid>``."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        kind, _, idx = item.partition("@")
        if idx != str(plan.index):
            continue
        if kind.endswith("-once"):
            marker = root / ".logs" / f"{plan.shard_id}.{kind}"
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            kind = kind.removesuffix("-once")
        if kind == "crash":
            os.abort()
        if kind == "hang":
            # Blender can start helper processes: a timeout must kill the render's whole process group, and this
            # child (its pid recorded for the tests) stands for them.
            child = subprocess.Popen(["sleep", str(10**6)])
            (root / ".logs" / f"{plan.shard_id}.hang-child-{child.pid}").touch()
            time.sleep(10**6)


def render_shard(job: dict[str, Any]) -> dict[str, Any]:
    """Render and commit one shard described by ``job`` (see ``pipelines.render``). Returns its summary."""
    from synth.blender import BlenderRenderer
    from synth.config import RenderConfig

    t_start = time.perf_counter()
    cfg = RenderConfig.model_validate(job["config"])
    resolved = resolve_scene(cfg.scene)
    plan = ShardPlan(**job["plan"])
    root = Path(job["root"])
    final = shard_dir(root, plan.shard_id)
    if is_committed(final):
        return {"shard_id": plan.shard_id, "skipped": True}
    tmp = new_shard_attempt(root, plan.shard_id)
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=os.environ.get(SCRATCH_ENV) or scratch_root())
    proc = psutil.Process()
    try:
        renderer = BlenderRenderer(cfg.render, cfg.output, scratch, threads=int(job.get("threads", 0)))
        writer = ShardWriter(tmp, plan.shard_id, plan.index, plan.seed, (plan.scene_start, plan.scene_stop),
                             [asdict(c) for c in resolved.classes], cfg.output.image_format, cfg.output.jpeg_quality)
        timings = {"startup_s": renderer.startup_s, "sample_s": 0.0, "build_s": 0.0, "color_s": 0.0,
                   "labels_s": 0.0, "write_s": 0.0}
        rss_mb = []
        out_dtype = np.uint16 if cfg.output.bit_depth == 16 else np.uint8
        for scene_index in range(plan.scene_start, plan.scene_stop):
            t0 = time.perf_counter()
            spec = sample_scene(resolved, scene_rng(plan.seed, scene_index), cfg.render.views, cfg.render.resolution)
            timings["sample_s"] += time.perf_counter() - t0
            views, t = renderer.render(spec)
            for k in ("build_s", "color_s", "labels_s"):
                timings[k] += t[k]
            t0 = time.perf_counter()
            # Objects without light of their own (a black slide) where a defocused object's blur needs to know it.
            dark = spec.dark_objects()
            for v, view in enumerate(views):
                fx = spec.post[v]
                # Lens distortion moves pixels: the image, object index and depth take the same warp.
                rgb, index, depth = apply_lens(view.rgb, fx.lens_k1, view.index, view.depth)
                semantic, instance = labels_from_index(index, spec)
                # One generator per view, so any single frame's noise can be reproduced from its record alone.
                post_rng = postprocess_rng(plan.seed, scene_index, v)
                rgb = apply_post(rgb, fx, post_rng, index, object_blur_px(spec, v, index), out_dtype, dark,
                                 ray_distance(depth, spec.cameras[v]) if fx.fog_density > 0 else None)
                writer.add(scene_index, v, rgb, semantic, instance, depth_to_png(depth, index),
                           camera_record(spec.cameras[v]), asdict(fx))
                print(f"{PROGRESS_PREFIX} {plan.shard_id} {len(writer.frames)}", flush=True)
                _maybe_fault(root, plan)
            timings["write_s"] += time.perf_counter() - t0 + t["read_s"]
            rss_mb.append(round(proc.memory_info().rss / 2**20, 1))  # before the trim: what the scene left held
            del spec, views
            release_freed_memory()
        import bpy

        timings["total_s"] = time.perf_counter() - t_start
        writer.finish({
            "config_hash": job["config_hash"],
            "code_version": job["code_version"],
            "family": resolved.family.name,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "blender": bpy.app.version_string,
            "blenderproc": renderer.bproc.__version__,
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "rss_mb_per_scene": rss_mb,
            "host": os.uname().nodename,
            "render": asdict(plan) | {"threads": int(job.get("threads", 0))},
        })
        committed = commit_shard(tmp, final)
        return {"shard_id": plan.shard_id, "skipped": not committed, "frames": len(writer.frames),
                "timings": timings}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m synth.worker JOB.json", file=sys.stderr)
        return 2
    summary = render_shard(read_json(argv[0]))
    print(f"SEGFACTORY-DONE {summary['shard_id']} frames={summary.get('frames', 0)}", flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # bpy 4.2 can segfault while the interpreter tears the module down; the shard is committed by now. Skipping
    # the teardown also skips Blender's removal of its session temp dir: done here.
    purge_blender_tempdir()
    os._exit(code)
