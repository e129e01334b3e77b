"""The naive BlenderProc baseline of ``segfactory bench render``: one fresh process per scene.

``python -m synth.bench_baseline JOB.json SCENE_INDEX`` builds the same scene segfactory renders, with
BlenderProc's default render settings (1024 max samples, noise threshold 0.01, Intel denoiser in the
compositor) and its usual outputs (depth and segmentation from the color render, written to HDF5), and prints
a ``SEGFACTORY-RESULT`` JSON line with the time split. Its RGB frames double as the high-sample reference.
"""

from __future__ import annotations

import os
import time

T_PROCESS = time.perf_counter()
os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402


def main(job_path: str, scene_index: int, scratch: str) -> dict:
    import cv2

    from scenes import resolve_scene, sample_scene, scene_rng
    from segfactory.io import read_json
    from synth.blender import SceneBuilder
    from synth.bproc_boot import import_blenderproc
    from synth.config import RenderConfig

    job = read_json(job_path)
    cfg = RenderConfig.model_validate(job["config"])
    out = Path(job["out"])
    bproc = import_blenderproc(scratch)  # BlenderProc defaults
    bproc.camera.set_resolution(cfg.render.resolution, cfg.render.resolution)
    t_start = time.perf_counter()
    spec = sample_scene(resolve_scene(cfg.scene), scene_rng(cfg.dataset.seed, scene_index), cfg.render.views,
                        cfg.render.resolution)
    SceneBuilder(bproc).build(spec)
    # BlenderProc loads every colour output as 3 channels, so a grayscale family's one-channel PNG fails to load
    # (IndexError): the baseline renders RGB and keeps one channel. Linear light (film raw) stays 16-bit.
    import bpy

    bpy.context.scene.render.image_settings.color_mode = "RGB"
    for index, obj in enumerate(bproc.object.get_all_mesh_objects(), start=1):
        obj.set_cp("category_id", index)
    bproc.renderer.enable_depth_output(activate_antialiasing=False)
    bproc.renderer.enable_segmentation_output(map_by=["category_id", "instance", "name"],
                                              default_values={"category_id": 0})
    t_built = time.perf_counter()
    data = bproc.renderer.render()
    t_rendered = time.perf_counter()
    bproc.writer.write_hdf5(str(out / f"baseline_s{scene_index:06d}"), data)
    for v, rgb in enumerate(data["colors"]):
        frame = rgb[..., 0] if spec.grayscale else cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(out / f"baseline_s{scene_index:06d}_v{v:02d}.png"), frame)
    t_done = time.perf_counter()
    return {"scene_index": scene_index, "frames": len(data["colors"]), "startup_s": t_start - T_PROCESS,
            "build_s": t_built - t_start, "render_s": t_rendered - t_built, "write_s": t_done - t_rendered}


if __name__ == "__main__":
    from synth.bproc_boot import purge_blender_tempdir
    from synth.shard import scratch_root

    with tempfile.TemporaryDirectory(prefix="segfactory-baseline-", dir=scratch_root()) as scratch:
        result = main(sys.argv[1], int(sys.argv[2]), scratch)
    print("SEGFACTORY-RESULT " + json.dumps(result), flush=True)
    purge_blender_tempdir()  # os._exit skips Blender's own removal of it
    os._exit(0)  # skip bpy's teardown (it can segfault after all work is done)
