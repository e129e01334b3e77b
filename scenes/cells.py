"""``cells``: fluorescence-microscopy fields of DNA-stained nuclei, seen top-down through an orthographic camera.

Class map: background, nucleus* (instances), debris. Nuclei are irregular, flattened blobs of varied size,
elongation and brightness that touch and overlap, scattered or packed into dense clusters. Each carries a
texture computed in NumPy (:mod:`scenes.fluorescence`): edge falloff, nuclear-envelope rim, multi-scale
chromatin, nucleoli and chromocentre speckles; all of it is the nucleus' own material, so it is labeled
``nucleus``. Some nuclei are dim, some out of focus (a per-nucleus blur applied after rendering from the
label pass's object index), some mitotic (small, condensed, very bright, irregular). Debris are small bright
specks off the nuclei.

The render is linear light (film ``raw``). Post-processing models the microscope and camera: frame defocus,
uneven illumination, vignetting, background glow, shot and read noise, and optionally an ADC of
``camera_bits`` bits with an offset (12-bit counts plus 32768 in 16-bit PNGs, like sCMOS frames), which clips
bright nuclei at the camera's maximum. Lengths are micrometres; ``pixel_size`` sets how many of them one pixel
covers, so the same nuclei appear at different sizes in pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from scenes import geometry as g
from scenes.camera import look_at
from scenes.fluorescence import NucleusLook, nucleus_texture
from scenes.placement import Footprint, place_footprints
from scenes.randomization import CountRange, PosRange, Range, integers, sample_post, uniform
from scenes.registry import SceneContext, register_scene
from scenes.spec import Camera, ClassDef, Material, Mesh, Part, SceneObject, SceneSpec, World, vec3
from segfactory.config import StrictModel

CLASSES = [
    ClassDef(0, "background", (0, 0, 0)),
    ClassDef(1, "nucleus", (0, 200, 255), thing=True),
    ClassDef(2, "debris", (255, 160, 0)),
]

# Nuclei are rendered at 1/HEADROOM of their signal and post-processing multiplies it back, so that signals up
# to HEADROOM x the camera's full scale fit the renderer's 16-bit image and saturate in the camera, not before.
HEADROOM = 8.0
TEXELS_PER_PIXEL = 1.5  # texture resolution relative to the image's pixels
STYLE_JITTER = 0.25  # per-nucleus log-normal spread around a frame's texture style


class CellsParams(StrictModel):
    """The ``cells`` family's knobs. Ranges are drawn uniformly (``pixel_size`` log-uniformly); the texture
    knobs from ``chromatin_contrast`` on set a frame's style, around which each nucleus varies."""

    pixel_size: PosRange = Field((0.18, 0.75), description="micrometres per pixel, one value per scene (real "
                                 "HeLa frames: 0.645, CHO: 0.202); the view is pixel_size x resolution wide")
    fields: int = Field(2, ge=1, le=8, description="the slide is fields x fields views wide; views pan over it")
    density: PosRange = Field((3.0, 12.0), description="nuclei per 100 x 100 square micrometres")
    nucleus_radius: PosRange = Field((5.0, 9.0), description="micrometres, before elongation")
    elongation: PosRange = (1.0, 1.7)
    irregularity: PosRange = (0.04, 0.2)
    max_overlap: float = Field(0.1, ge=0, lt=1, description="allowed overlap of neighbouring nuclei, as a "
                               "fraction of their summed extents along the line between their centres (0 = only "
                               "touching)")
    brightness: PosRange = Field((0.05, 0.3), description="a frame's typical nucleus signal, fraction of the "
                                 "camera's full scale (before illumination and exposure)")
    brightness_spread: float = Field(0.3, ge=0, le=2, description="nucleus-to-nucleus log-normal spread")
    dim_fraction: PosRange = Field((0.0, 0.25), description="share of nuclei that are dim")
    dim_factor: PosRange = Field((0.1, 0.4), description="brightness of a dim nucleus relative to the others")
    defocus_fraction: PosRange = Field((0.0, 0.3), description="share of nuclei out of focus")
    defocus: PosRange = Field((0.6, 3.0), description="blur of an out-of-focus nucleus, Gaussian sigma in "
                              "micrometres")
    out_of_plane: PosRange = Field((0.0, 0.0), description="out-of-plane nuclei per in-plane nucleus (optical "
                                   "sections of z-stacks: nuclei above or below the focal plane show as dim, "
                                   "blurred glows and are labeled background); 0 = none, the family's default")
    out_of_plane_dim: PosRange = Field((0.1, 0.5), description="brightness of an out-of-plane nucleus relative to "
                                       "the in-plane ones")
    out_of_plane_defocus: PosRange = Field((3.0, 6.0), description="blur of an out-of-plane nucleus, Gaussian "
                                           "sigma in micrometres (beyond most in-plane `defocus`)")
    mitotic_fraction: PosRange = Field((0.0, 0.06), description="share of nuclei that are mitotic: condensed, "
                                       "small, very bright, irregular")
    mitotic_radius: PosRange = Field((2.0, 4.0), description="micrometres, before elongation")
    mitotic_elongation: PosRange = (1.2, 2.8)
    mitotic_brightness: PosRange = Field((2.5, 6.0), description="relative to the frame's typical nucleus")
    clusters_per_field: CountRange = Field((0, 2), description="dense clusters of touching nuclei per view area")
    cluster_share: PosRange = Field((0.1, 0.5), description="share of the nuclei packed into the clusters")
    chromatin_contrast: PosRange = Field((0.05, 0.35), description="spread of the chromatin texture")
    chromatin_scale: PosRange = Field((0.25, 1.5), description="micrometres: the texture's three octaves span "
                                      "this range of feature sizes")
    rim: PosRange = Field((0.0, 0.6), description="extra brightness at the nuclear envelope (0.5 = +50 %)")
    rim_width: PosRange = Field((0.3, 1.0), description="micrometres")
    edge_width: PosRange = Field((0.5, 2.5), description="micrometres over which brightness rises from the "
                                 "outline to the interior")
    nucleoli: CountRange = Field((0, 4), description="nucleoli per nucleus")
    nucleolus_radius: PosRange = Field((0.6, 1.8), description="micrometres")
    nucleolus_contrast: Range = Field((-0.8, 0.3), description="relative brightness change in nucleoli "
                                      "(negative: dark, as in DNA stains)")
    speckle_density: PosRange = Field((0.0, 0.2), description="bright chromocentre speckles per square micrometre")
    speckle_brightness: PosRange = Field((0.3, 1.5), description="speckle peak relative to the nucleus mean")
    debris_per_field: CountRange = (0, 6)


@register_scene(
    "cells",
    description="fluorescence microscopy: textured nuclei with nucleoli and rims, dim, defocused, mitotic and "
                "clustered nuclei, debris, uneven illumination, camera model",
    classes=CLASSES,
    background="background",
    params=CellsParams,
    channels=1,
    unit_m=1e-6,
    randomization={
        "lights": {"count": [0, 0]},
        "post": {"exposure": [-0.2, 0.2], "blur_sigma": [0.0, 1.0], "noise_std": [0.001, 0.008],
                 "poisson_peak": [300.0, 4000.0], "gamma": [1.0, 1.0], "illumination": [0.0, 0.25],
                 "vignetting": [0.0, 0.3], "background": [0.01, 0.1]},
    },
)
def sample_cells(ctx: SceneContext) -> SceneSpec:
    rng, p, r = ctx.rng, ctx.params, ctx.randomization
    cid = ctx.class_id
    pixel = float(np.exp(uniform(rng, (np.log(p.pixel_size[0]), np.log(p.pixel_size[1])))))
    field = pixel * ctx.resolution
    slide = field * p.fields
    areas = p.fields**2
    objects: list[SceneObject] = []
    # A black slide: the background glow is added in post-processing, where it adds to the nuclei's light.
    objects.append(SceneObject("slide", cid("background"), [Part(g.plane(slide * 2, slide * 2, -5.0),
                                                                 Material((0.0, 0.0, 0.0), shader="emission"))]))

    typical = uniform(rng, p.brightness)
    share = {k: uniform(rng, getattr(p, k)) for k in ("dim_fraction", "defocus_fraction", "mitotic_fraction")}
    style = _frame_style(rng, p)
    n = round(uniform(rng, p.density) * slide**2 / 1e4)
    nuclei = []
    for _ in range(n):
        mitotic = rng.random() < share["mitotic_fraction"]
        if mitotic:
            radius, elong, irr = uniform(rng, p.mitotic_radius), uniform(rng, p.mitotic_elongation), 0.35
        else:
            radius, elong = uniform(rng, p.nucleus_radius), uniform(rng, p.elongation)
            irr = uniform(rng, p.irregularity)
        # Flattened to a disc-like nucleus; a random height per nucleus decides who occludes whom where they overlap.
        mesh = _nucleus_mesh(rng, radius, elong, irr, pixel, 0.35)
        yaw = float(rng.uniform(0, 2 * np.pi))
        nuclei.append((mesh, yaw, Footprint.of_points(mesh.vertices[:, :2], yaw), mitotic))
    spots = _place_nuclei(rng, p, [fp for *_, fp, _ in nuclei], slide, areas)

    for i, ((mesh, yaw, _, mitotic), spot) in enumerate(zip(nuclei, spots, strict=True)):
        if spot is None:
            continue
        look = _mitotic_look(rng) if mitotic else _nucleus_look(rng, p, style)
        tex, bounds = nucleus_texture(rng, mesh, look, pixel / TEXELS_PER_PIXEL)
        signal = typical * float(rng.lognormal(0.0, p.brightness_spread))
        if mitotic:
            signal *= uniform(rng, p.mitotic_brightness)
        elif rng.random() < share["dim_fraction"]:
            signal *= uniform(rng, p.dim_factor)
        defocus = uniform(rng, p.defocus) if rng.random() < share["defocus_fraction"] else 0.0
        mat = Material((1.0, 1.0, 1.0), shader="emission", emission=signal / HEADROOM, image=tex, image_bounds=bounds)
        objects.append(SceneObject(f"{'mitotic' if mitotic else 'nucleus'}_{i}", cid("nucleus"), [Part(mesh, mat)],
                                   (spot[0], spot[1], float(rng.uniform(0.0, 3.0))), (0.0, 0.0, yaw),
                                   defocus=defocus))

    placed = [((o.location[0], o.location[1]), Footprint.of_points(o.parts[0].mesh.vertices[:, :2], o.rotation[2]))
              for o in objects[1:]]
    debris = []
    for _ in range(sum(integers(rng, p.debris_per_field) for _ in range(areas))):
        size = float(rng.uniform(0.3, 1.2))
        debris.append(g.transform(g.blob(rng, size, 0.4, rings=6, segments=10), scale=(1.0, 1.0, 0.5)))
    where = place_footprints(rng, [Footprint.of_points(m.vertices[:, :2]) for m in debris], (-slide / 2, slide / 2),
                             (-slide / 2, slide / 2), tries=30, occupied=placed)
    for i, (mesh, xy) in enumerate(zip(debris, where, strict=True)):
        if xy is None:
            continue
        mat = Material((1.0, 1.0, 1.0), shader="emission", emission=typical * float(rng.uniform(0.8, 4.0)) / HEADROOM)
        objects.append(SceneObject(f"debris_{i}", cid("debris"), [Part(mesh, mat)], (xy[0], xy[1], 3.5)))

    cameras = []
    for _ in range(ctx.views):
        half = (slide - field) / 2
        pan = rng.uniform(-half, half, 2) if half > 0 else np.zeros(2)
        loc = np.array([pan[0], pan[1], 50.0])
        # Look straight down with a random in-plane rotation (the 'up' vector sets the image orientation).
        angle = rng.uniform(0, 2 * np.pi)
        rot = look_at(loc, loc - [0, 0, 1], up=np.array([np.cos(angle), np.sin(angle), 0.0]))
        cameras.append(Camera(vec3(loc), rot, projection="orthographic", ortho_scale=field,
                              clip_start=1.0, clip_end=100.0))
    post = [sample_post(rng, r.post, linear=True, gain=HEADROOM) for _ in range(ctx.views)]
    # Drawn last, so that turning them on adds them to the same scenes, views and noise.
    in_plane = sum(o.class_id == cid("nucleus") for o in objects)
    objects += _out_of_plane_nuclei(rng, p, style, in_plane, typical, slide, pixel, cid("background"))
    return SceneSpec("cells", ctx.classes, cid("background"), objects, [], World((0, 0, 0), (0, 0, 0), 0.0),
                     cameras, post, film="raw")


def _nucleus_mesh(rng: np.random.Generator, radius: float, elong: float, irregularity: float, pixel: float,
                  flatness: float) -> Mesh:
    """An irregular blob ``radius`` micrometres wide, stretched by ``elong`` and flattened to ``flatness`` of its
    width; more segments for nuclei many pixels wide, so that their outline stays smooth."""
    segments = int(np.clip(2 * np.pi * radius * elong / pixel / 6, 20, 48))
    mesh = g.blob(rng, radius, irregularity, rings=max(8, segments // 3), segments=segments)
    return g.transform(mesh, scale=(elong, 1.0, flatness))


def _out_of_plane_nuclei(rng: np.random.Generator, p: CellsParams, style: dict[str, Any], in_plane: int,
                         typical: float, slide: float, pixel: float, background: int) -> list[SceneObject]:
    """Nuclei above or below the optical section: their light reaches the frame as a dim, blurred glow, but they
    are not in this plane, so they are labeled background (as z-stack segmentations label them). They are thin
    sheets between the slide (z -5) and the in-plane nuclei (whose outlines are at z >= 0), so every in-plane
    nucleus occludes them and the class and instance maps are those of the scene without them; anywhere on the
    slide, with light of their own (the texture of an in-plane nucleus, dimmed and blurred)."""
    if p.out_of_plane[1] <= 0:
        return []  # draws nothing: datasets without out-of-plane nuclei stay as they were
    out = []
    for i in range(round(uniform(rng, p.out_of_plane) * in_plane)):
        radius, elong = uniform(rng, p.nucleus_radius), uniform(rng, p.elongation)
        mesh = _nucleus_mesh(rng, radius, elong, uniform(rng, p.irregularity), pixel, 0.05)  # thin: stays below
        tex, bounds = nucleus_texture(rng, mesh, _nucleus_look(rng, p, style), pixel / TEXELS_PER_PIXEL)
        signal = typical * float(rng.lognormal(0.0, p.brightness_spread)) * uniform(rng, p.out_of_plane_dim)
        mat = Material((1.0, 1.0, 1.0), shader="emission", emission=signal / HEADROOM, image=tex, image_bounds=bounds)
        xy = rng.uniform(-slide / 2, slide / 2, 2)
        out.append(SceneObject(f"out_of_plane_{i}", background, [Part(mesh, mat)],
                               (float(xy[0]), float(xy[1]), float(rng.uniform(-4.0, -1.5))),
                               (0.0, 0.0, float(rng.uniform(0, 2 * np.pi))),
                               defocus=uniform(rng, p.out_of_plane_defocus), emits=True))
    return out


def _frame_style(rng: np.random.Generator, p: CellsParams) -> dict[str, Any]:
    """One frame's staining and optics: all its nuclei vary around these."""
    keys = ("chromatin_contrast", "rim", "rim_width", "edge_width", "nucleolus_contrast", "speckle_density",
            "speckle_brightness")
    style: dict[str, Any] = {k: uniform(rng, getattr(p, k)) for k in keys}
    lo, hi = p.chromatin_scale
    style["scales"] = tuple(float(s) for s in np.geomspace(max(lo, 1e-3), max(hi, 1e-3), 3))
    return style


def _nucleus_look(rng: np.random.Generator, p: CellsParams, style: dict[str, Any]) -> NucleusLook:
    def jit(v: float) -> float:
        return v * float(rng.lognormal(0.0, STYLE_JITTER))

    return NucleusLook(chromatin_contrast=jit(style["chromatin_contrast"]), chromatin_scales=style["scales"],
                       rim=jit(style["rim"]), rim_width=jit(style["rim_width"]), edge_width=jit(style["edge_width"]),
                       nucleoli=integers(rng, p.nucleoli), nucleolus_radius=p.nucleolus_radius,
                       nucleolus_contrast=style["nucleolus_contrast"], speckle_density=jit(style["speckle_density"]),
                       speckle_brightness=jit(style["speckle_brightness"]))


def _mitotic_look(rng: np.random.Generator) -> NucleusLook:
    """Condensed chromosomes: coarse, high-contrast granules, a sharp edge, no nucleoli."""
    return NucleusLook(chromatin_contrast=float(rng.uniform(0.35, 0.6)), chromatin_scales=(0.3, 0.6),
                       edge_width=float(rng.uniform(0.2, 0.5)))


def _place_nuclei(rng: np.random.Generator, p: CellsParams, footprints: list[Footprint], slide: float,
                  areas: int) -> list[tuple[float, float] | None]:
    """Centres for the nuclei: a share packed into dense clusters of touching neighbours, the rest scattered."""
    n = len(footprints)
    spots: list[tuple[float, float] | None] = [None] * n
    clusters = sum(integers(rng, p.clusters_per_field) for _ in range(areas))
    order = rng.permutation(n)
    in_clusters = round(uniform(rng, p.cluster_share) * n) if clusters else 0
    placed: list[tuple[tuple[float, float], Footprint]] = []
    for members in np.array_split(order[:in_clusters], max(clusters, 1)) if in_clusters else []:
        if not len(members):
            continue
        centre = tuple(float(c) for c in rng.uniform(-slide / 2, slide / 2, 2))
        reach = float(np.sqrt(len(members)) * np.mean([footprints[i].radius for i in members]) * 1.6)
        box = (max(centre[0] - reach, -slide / 2), min(centre[0] + reach, slide / 2))
        boy = (max(centre[1] - reach, -slide / 2), min(centre[1] + reach, slide / 2))
        got = place_footprints(rng, [footprints[i] for i in members], box, boy, max_overlap=p.max_overlap, tries=80,
                               occupied=placed, attract_to=centre)  # type: ignore[arg-type]
        for i, xy in zip(members, got, strict=True):
            spots[i] = xy
            if xy is not None:
                placed.append((xy, footprints[i]))
    # Cluster members that found no room are scattered with the rest.
    rest = [int(i) for i in order[in_clusters:]] + [int(i) for i in order[:in_clusters] if spots[i] is None]
    got = place_footprints(rng, [footprints[i] for i in rest], (-slide / 2, slide / 2), (-slide / 2, slide / 2),
                           max_overlap=p.max_overlap, tries=60, occupied=placed)
    for i, xy in zip(rest, got, strict=True):
        spots[i] = xy
    return spots
