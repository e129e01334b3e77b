"""Label/RGB alignment check: ``python -m synth.alignment [--resolution PX] [--views V] [--defaults]``.

Renders a scene of flat emission colors (black background, pure red/green/blue objects: boxes, spheres,
thin poles, tori, overlapping at several depths) through the normal two-pass renderer, classifies every RGB
pixel by its nearest palette color in linear light, and reports how often that agrees with the label map.
With pixel-centre labels, an anti-aliased edge pixel's nearest color is the surface covering most of its
filter footprint, i.e. the one at its centre, so agreement should be ~100%. As a sensitivity check it also
reports the agreement of the same labels shifted by one pixel: what a one-pixel misalignment would score.
Prints one ``SEGFACTORY-RESULT`` JSON line. Runs Blender, so call it in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"

import numpy as np

from scenes import geometry as g
from scenes.camera import look_at
from scenes.spec import Camera, ClassDef, Material, Part, PostFX, SceneObject, SceneSpec, World
from synth.bproc_boot import purge_blender_tempdir

PALETTE = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def flat_scene(rng: np.random.Generator, views: int) -> SceneSpec:
    classes = [ClassDef(0, "background", (0, 0, 0)), ClassDef(1, "red", (255, 0, 0), True),
               ClassDef(2, "green", (0, 255, 0), True), ClassDef(3, "blue", (0, 0, 255), True)]
    objects = []
    for i in range(14):
        cls = 1 + i % 3
        kind = i % 4
        if kind == 0:
            mesh = g.box(*rng.uniform(0.3, 1.2, 3), center_z=True)
        elif kind == 1:
            mesh = g.uv_sphere(float(rng.uniform(0.2, 0.6)), 16, 32)
        elif kind == 2:
            mesh = g.transform(g.cylinder(float(rng.uniform(0.03, 0.08)), 2.0, 16), (0, 0, -1.0))  # thin pole
        else:
            mesh = g.transform(g.torus(0.4, 0.1, 32, 12), rotation=g.rot_x(rng.uniform(0, np.pi)))
        mat = Material(tuple(PALETTE[cls]), shader="emission", emission=1.0)  # type: ignore[arg-type]
        loc = tuple(float(c) for c in rng.uniform(-1.5, 1.5, 3))
        objects.append(SceneObject(f"o{i}", cls, [Part(mesh, mat)], loc, tuple(rng.uniform(0, np.pi, 3))))
    cameras = []
    for _ in range(views):
        loc = rng.normal(size=3)
        loc = 6.0 * loc / np.linalg.norm(loc)
        cameras.append(Camera(tuple(loc), look_at(loc, np.zeros(3)), fov=0.9))  # type: ignore[arg-type]
    return SceneSpec("alignment", classes, 0, objects, [], World((0, 0, 0), (0, 0, 0), 0.0), cameras,
                     [PostFX() for _ in range(views)], film="standard")


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def color_classes(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W) index of the nearest palette color in linear light."""
    lin = srgb_to_linear(rgb.astype(np.float64) / 255.0)
    d = ((lin[..., None, :] - PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def run(resolution: int, views: int, samples: int | None, seed: int) -> dict:
    """Render the flat scene and score label/RGB agreement. ``samples=None`` uses segfactory's default color
    settings (few adaptive samples plus denoising); a number renders that many samples, no adaptivity, no
    denoiser (a clean reference)."""
    from synth.blender import BlenderRenderer
    from synth.config import OutputSettings, RenderSettings
    from synth.shard import labels_from_index, scratch_root

    render = (RenderSettings(resolution=resolution, views=views) if samples is None else
              RenderSettings(resolution=resolution, views=views, samples=samples, noise_threshold=0, denoise=False))
    with tempfile.TemporaryDirectory(prefix="segfactory-alignment-", dir=scratch_root()) as scratch:
        renderer = BlenderRenderer(render, OutputSettings(), scratch)
        spec = flat_scene(np.random.default_rng(seed), views)
        views_out, _ = renderer.render(spec)
        agree, agree_shifted, total, edge_px = 0, 0, 0, 0
        for view in views_out:
            semantic, _ = labels_from_index(view.index, spec)
            colors = color_classes(view.rgb)
            ok = colors == semantic
            agree += int(ok.sum())
            agree_shifted += (int((colors[:, 1:] == semantic[:, :-1]).sum())
                              + int((colors[:, 0] == semantic[:, 0]).sum()))
            total += ok.size
            edge = np.zeros_like(semantic, dtype=bool)  # pixels with a differently labeled 4-neighbour
            edge[:, 1:] |= semantic[:, 1:] != semantic[:, :-1]
            edge[1:] |= semantic[1:] != semantic[:-1]
            edge_px += int(edge.sum())
    return {"resolution": resolution, "views": views, "pixels": total, "edge_pixels": edge_px,
            "agreement": agree / total, "disagreeing_pixels": total - agree,
            "agreement_if_shifted_1px": agree_shifted / total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--samples", type=int, default=256, help="samples, no adaptivity, no denoiser")
    ap.add_argument("--defaults", action="store_true", help="segfactory's default color settings instead")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    result = run(a.resolution, a.views, None if a.defaults else a.samples, a.seed)
    print("SEGFACTORY-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    purge_blender_tempdir()  # os._exit skips Blender's own removal of it
    os._exit(code)  # skip bpy's teardown (it can segfault after all work is done)
