"""Cells-like datasets drawn in NumPy, no Blender: what tests that train, probe, evaluate or predict read.

A scene is a slide twice a frame's size with nuclei (irregular, elongated, textured blobs at random heights, so
the higher one occludes where two overlap), a few bright debris specks and an uneven background haze; each view
is a frame-sized window of the slide turned by a multiple of 90 degrees, then blurred, gamma-corrected and given
Poisson shot noise and Gaussian read noise like a microscope image. Labels come from the same drawing: semantic
(background 0, nucleus 1, debris 2), instance ids stable across a scene's views, depth in nanometres from a
camera 50 um above the slide (the ``cells`` family's geometry). The dataset is written in the real format
through :func:`segfactory.formats.dataset.write_dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from segfactory.formats.dataset import FrameArrays, write_dataset

CELLS_CLASSES = [
    {"id": 0, "name": "background", "color": [0, 0, 0], "thing": False},
    {"id": 1, "name": "nucleus", "color": [0, 200, 255], "thing": True},
    {"id": 2, "name": "debris", "color": [255, 160, 0], "thing": False},
]
CAMERA_HEIGHT_UM = 50.0
SLIDE_Z_UM = -5.0


def _blob(yy: npt.NDArray[np.float64], xx: npt.NDArray[np.float64], rng: np.random.Generator, cy: float, cx: float,
          radius: float, elongation: float, irregularity: float) -> npt.NDArray[np.float64]:
    """Normalised radius (< 1 inside) of an irregular, turned ellipse at every pixel."""
    yaw = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(yaw) + dy * np.sin(yaw)) / elongation
    v = -dx * np.sin(yaw) + dy * np.cos(yaw)
    angle = np.arctan2(v, u)
    edge = np.ones_like(angle)
    for k in (2, 3, 5):  # a few low harmonics of the direction: smooth, star-shaped outlines
        edge += irregularity / k * np.sin(k * angle + rng.uniform(0, 2 * np.pi))
    rho: npt.NDArray[np.float64] = np.hypot(u, v) / (radius * edge)
    return rho


def _window(a: npt.NDArray[np.generic], y0: int, x0: int, size: int, turns: int) -> npt.NDArray[np.generic]:
    return np.ascontiguousarray(np.rot90(a[y0:y0 + size, x0:x0 + size], turns))


def cells_scene(rng: np.random.Generator, views: int, size: int) -> list[FrameArrays]:
    """One slide and ``views`` frames of it: (size, size) gray uint8 images with their label maps."""
    side = 2 * size
    um_per_px = 100.0 / size  # a frame is 100 um wide, like a `cells` field
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    base = rng.uniform(0.35, 1.0)
    light = base * rng.uniform(0.04, 0.14) * (1 + 0.5 * ndimage.gaussian_filter(rng.normal(size=(side, side)), 12))
    chromatin = ndimage.gaussian_filter(rng.normal(size=(side, side)), 1.2 * size / 64)
    chromatin = (chromatin / max(float(np.abs(chromatin).max()), 1e-9) + 1) / 2  # in [0, 1]
    semantic = np.zeros((side, side), np.uint8)
    instance = np.zeros((side, side), np.uint16)
    top = np.full((side, side), SLIDE_Z_UM)  # height of the surface the camera sees (a z-buffer)
    for i in range(int(rng.integers(40, 90))):  # about 10 to 25 per frame
        radius = rng.uniform(2.8, 6.0) * size / 64
        rho = _blob(yy, xx, rng, rng.uniform(0, side), rng.uniform(0, side), radius, rng.uniform(1.0, 1.6),
                    rng.uniform(0.04, 0.2))
        # A flattened dome at a random height: where two nuclei overlap, the higher surface is seen.
        dome = rng.uniform(0.0, 3.0) + 0.35 * radius * um_per_px * np.sqrt(np.clip(1 - rho**2, 0, None))
        seen = (rho < 1) & (dome > top)
        glow = base * rng.lognormal(0.0, 0.3) * (1 - rng.uniform(0.2, 0.6) * chromatin)
        semantic[seen], instance[seen], top[seen], light[seen] = 1, i + 1, dome[seen], glow[seen]
    for _ in range(int(rng.integers(4, 13))):  # debris: small bright specks lying on top
        radius = rng.uniform(1.0, 2.0) * size / 64
        rho = _blob(yy, xx, rng, rng.uniform(0, side), rng.uniform(0, side), radius, 1.0, 0.3)
        dome = 3.5 + 0.5 * radius * um_per_px * np.sqrt(np.clip(1 - rho**2, 0, None))
        seen = (rho < 1) & (dome > top)
        semantic[seen], instance[seen], top[seen] = 2, 0, dome[seen]
        light[seen] = base * rng.uniform(1.2, 2.5)
    depth = np.round((CAMERA_HEIGHT_UM - top) * 1000).astype(np.uint16)  # nanometres from the camera

    frames = []
    for _ in range(views):
        y0, x0 = (int(v) for v in rng.integers(0, side - size + 1, 2))
        turns = int(rng.integers(4))
        img = ndimage.gaussian_filter(_window(light, y0, x0, size, turns).astype(np.float64),
                                      rng.uniform(0.0, 0.8) * size / 64)
        img = np.clip(img * 2 ** rng.uniform(-0.3, 0.3), 0, 1) ** rng.uniform(0.8, 1.2)
        peak = rng.uniform(80.0, 800.0)
        img = rng.poisson(img * peak) / peak + rng.normal(0, rng.uniform(0.002, 0.02), img.shape)
        frames.append(FrameArrays(
            np.round(np.clip(img, 0, 1) * 255).astype(np.uint8),
            _window(semantic, y0, x0, size, turns).astype(np.uint8),
            _window(instance, y0, x0, size, turns).astype(np.uint16),
            _window(depth, y0, x0, size, turns).astype(np.uint16),
            camera={"projection": "orthographic", "window_yx": [y0, x0], "size": size, "quarter_turns": turns},
            post={"poisson_peak": float(peak)}))
    return frames


def write_cells_dataset(root: str | os.PathLike[str], *, scenes: int = 8, views: int = 2, size: int = 64, seed: int = 0,
                        scenes_per_shard: int = 4) -> Path:
    """A cells-like dataset in the real format at ``root``: ``scenes`` x ``views`` frames of ``size`` px, 3 classes.

    Scene ``i`` is drawn from ``SeedSequence([seed, i])``, so a dataset is the same bytes every time.
    """
    frames = [cells_scene(np.random.default_rng(np.random.SeedSequence([seed, i])), views, size)
              for i in range(scenes)]
    write_dataset(root, frames, CELLS_CLASSES, family="cells", seed=seed, scenes_per_shard=scenes_per_shard,
                  unit_m=1e-6, source={"generator": "tests/procedural.py", "scenes": scenes, "views": views,
                                       "size": size, "seed": seed})
    return Path(root)
