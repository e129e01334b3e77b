"""``cells``: fluorescence-microscopy-like fields of nuclei, seen top-down through an orthographic camera.

Class map: background, nucleus* (instances), debris. Nuclei are irregular, flattened blobs of varied size,
brightness and chromatin texture that may touch and overlap; debris are small bright specks. The image is
single-channel; defocus, uneven background haze and Poisson-Gaussian sensor noise are applied per frame.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from scenes import geometry as g
from scenes.camera import look_at
from scenes.placement import Footprint, place_footprints
from scenes.randomization import CountRange, PosRange, integers, sample_post, uniform
from scenes.registry import SceneContext, register_scene
from scenes.spec import Camera, ClassDef, Material, Part, SceneObject, SceneSpec, World
from segfactory.config import StrictModel

CLASSES = [
    ClassDef(0, "background", (0, 0, 0)),
    ClassDef(1, "nucleus", (0, 200, 255), thing=True),
    ClassDef(2, "debris", (255, 160, 0)),
]


class CellsParams(StrictModel):
    field_size: float = Field(100.0, gt=0, description="width of one view in micrometres")
    fields: int = Field(2, ge=1, le=8, description="the slide is fields x fields views wide; views pan over it")
    nuclei_per_field: CountRange = (12, 35)
    nucleus_radius: PosRange = (3.5, 8.0)
    elongation: PosRange = (1.0, 1.7)
    irregularity: PosRange = (0.04, 0.22)
    max_overlap: float = Field(0.2, ge=0, lt=1, description="allowed overlap of neighbouring nuclei, as a fraction "
                               "of their summed extents along the line between their centres (0 = only touching)")
    brightness: PosRange = (0.25, 1.0)
    chromatin_contrast: PosRange = (0.3, 0.75)
    debris_per_field: CountRange = (0, 10)
    haze: PosRange = Field((0.01, 0.08), description="background glow, fraction of nucleus brightness")


@register_scene(
    "cells",
    description="fluorescence microscopy: irregular touching/overlapping nuclei, debris, haze, defocus, noise",
    classes=CLASSES,
    background="background",
    params=CellsParams,
    channels=1,
    unit_m=1e-6,
    randomization={
        "lights": {"count": [0, 0]},
        "post": {"exposure": [-0.3, 0.3], "blur_sigma": [0.0, 1.5], "noise_std": [0.002, 0.02],
                 "poisson_peak": [80.0, 800.0], "gamma": [0.8, 1.2]},
        "materials": {"texture_prob": 1.0, "textures": ["noise", "voronoi"], "texture_scale": [0.5, 1.5]},
    },
)
def sample_cells(ctx: SceneContext) -> SceneSpec:
    rng, p, r = ctx.rng, ctx.params, ctx.randomization
    cid = ctx.class_id
    slide = p.field_size * p.fields
    area = p.fields**2
    objects: list[SceneObject] = []
    base = uniform(rng, p.brightness)

    haze = Material((1.0, 1.0, 1.0), shader="emission", emission=base * uniform(rng, p.haze),
                    texture="noise", color2=(0.3, 0.3, 0.3), texture_scale=0.01, texture_w=float(rng.uniform(0, 100)),
                    texture_detail=1.0)
    objects.append(SceneObject("slide", cid("background"), [Part(g.plane(slide * 2, slide * 2, -5.0), haze)]))

    n = sum(integers(rng, p.nuclei_per_field) for _ in range(area))
    # Build every nucleus first and place it by its final outline (stretched, irregular, turned), so that
    # max_overlap bounds how far the real shapes overlap, not how far some idealised circles do.
    nuclei = []
    for _ in range(n):
        radius, elong = uniform(rng, p.nucleus_radius), uniform(rng, p.elongation)
        mesh = g.blob(rng, radius, uniform(rng, p.irregularity), rings=8, segments=20)
        # Flatten to a disc-like nucleus; a random height per nucleus decides who occludes whom where they overlap.
        mesh = g.transform(mesh, scale=(elong, 1.0, 0.35))
        yaw = float(rng.uniform(0, 2 * np.pi))
        nuclei.append((mesh, yaw, Footprint.of_points(mesh.vertices[:, :2], yaw)))
    spots = place_footprints(rng, [fp for *_, fp in nuclei], (-slide / 2, slide / 2), (-slide / 2, slide / 2),
                             max_overlap=p.max_overlap, tries=60)
    tex = r.materials
    for i, ((mesh, yaw, _), spot) in enumerate(zip(nuclei, spots, strict=True)):
        if spot is None:
            continue
        brightness = base * float(rng.lognormal(0.0, 0.35))
        contrast = uniform(rng, p.chromatin_contrast)
        mat = Material((1.0, 1.0, 1.0), shader="emission", emission=brightness,
                       texture=str(rng.choice(tex.textures)), color2=(1 - contrast,) * 3,  # type: ignore[arg-type]
                       texture_scale=uniform(rng, tex.texture_scale), texture_w=float(rng.uniform(0, 100)))
        objects.append(SceneObject(f"nucleus_{i}", cid("nucleus"), [Part(mesh, mat)],
                                   (spot[0], spot[1], float(rng.uniform(0.0, 3.0))), (0.0, 0.0, yaw)))
    for i in range(sum(integers(rng, p.debris_per_field) for _ in range(area))):
        size = float(rng.uniform(0.4, 1.5))
        mesh = g.transform(g.blob(rng, size, 0.4, rings=6, segments=10), scale=(1.0, 1.0, 0.5))
        mat = Material((1.0, 1.0, 1.0), shader="emission", emission=base * float(rng.uniform(0.8, 3.0)))
        xy = rng.uniform(-slide / 2, slide / 2, 2)
        objects.append(SceneObject(f"debris_{i}", cid("debris"), [Part(mesh, mat)],
                                   (float(xy[0]), float(xy[1]), 3.5)))

    cameras = []
    for _ in range(ctx.views):
        half = (slide - p.field_size) / 2
        xy = rng.uniform(-half, half, 2) if half > 0 else np.zeros(2)
        loc = np.array([xy[0], xy[1], 50.0])
        # Look straight down with a random in-plane rotation (the 'up' vector sets the image orientation).
        angle = rng.uniform(0, 2 * np.pi)
        rot = look_at(loc, loc - [0, 0, 1], up=np.array([np.cos(angle), np.sin(angle), 0.0]))
        cameras.append(Camera(tuple(loc), rot, projection="orthographic", ortho_scale=p.field_size,  # type: ignore[arg-type]
                              clip_start=1.0, clip_end=100.0))
    return SceneSpec("cells", ctx.classes, cid("background"), objects, [], World((0, 0, 0), (0, 0, 0), 0.0),
                     cameras, [sample_post(rng, r.post) for _ in range(ctx.views)], film="standard")
