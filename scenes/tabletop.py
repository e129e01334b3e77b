"""``tabletop``: household objects on a table, seen from above at an angle.

Class map: background (floor, walls), table, mug*, bottle*, box*, can*, fruit*, distractor* (* = things).
User meshes (OBJ/PLY/GLB/STL) can be added with ``scene.params.user_meshes`` and mapped to any class; new
class names must be declared in ``scene.params.extra_classes``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from scenes import geometry as g
from scenes.camera import look_at, visible_mask
from scenes.placement import place_circles
from scenes.randomization import (
    CountRange,
    MaterialKnobs,
    PosRange,
    integers,
    sample_lights,
    sample_material,
    sample_post,
    sample_world,
    uniform,
)
from scenes.registry import SceneContext, register_scene
from scenes.spec import (
    Camera,
    ClassDef,
    FloatArray,
    Mesh,
    Part,
    SceneObject,
    SceneSpec,
    Vec3,
    footprint_radius,
    vec3,
)
from segfactory.config import StrictModel
from segfactory.io import sha256_file

CLASSES = [
    ClassDef(0, "background", (0, 0, 0)),
    ClassDef(1, "table", (140, 90, 40)),
    ClassDef(2, "mug", (230, 25, 75), thing=True),
    ClassDef(3, "bottle", (60, 180, 75), thing=True),
    ClassDef(4, "box", (255, 225, 25), thing=True),
    ClassDef(5, "can", (0, 130, 200), thing=True),
    ClassDef(6, "fruit", (245, 130, 48), thing=True),
    ClassDef(7, "distractor", (145, 30, 180), thing=True),
]
BUILTIN = {c.name for c in CLASSES}
MESH_SUFFIXES = {".obj", ".ply", ".glb", ".gltf", ".stl", ".off"}


class UserMesh(StrictModel):
    """A user-supplied mesh placed on the table like the built-in objects."""

    path: str = Field(description="OBJ/PLY/GLB/STL file (a relative path is relative to the working directory)")
    class_name: str = Field(description="class it is labeled as (built-in or listed in extra_classes)")
    count: CountRange = (1, 2)
    size: PosRange = Field((0.08, 0.2), description="longest side in metres after scaling")
    sha256: str | None = Field(None, validate_default=True,
                               description="the file's sha256, filled in when the config is resolved (so the "
                               "dataset's config hash changes with the mesh); a file that no longer matches is an "
                               "error")

    @field_validator("path")
    @classmethod
    def _exists_and_loads(cls, v: str) -> str:
        load_user_mesh(v)  # raises ValueError with the reason; cached for sampling
        return v

    @field_validator("sha256")
    @classmethod
    def _pin_contents(cls, v: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("path")
        if path is None:  # the path itself is invalid and reported
            return v
        actual = user_mesh_sha256(path)
        if v is not None and v != actual:
            raise ValueError(f"user mesh '{path}' has changed since this config was resolved (its sha256 is now "
                             f"{actual[:12]}..., the config has {v[:12]}...); restore the file, or remove the "
                             "sha256 entry to render the new one")
        return actual


class TabletopParams(StrictModel):
    table_size: tuple[PosRange, PosRange] = ((1.0, 1.8), (0.7, 1.1))
    mugs: CountRange = (0, 2)
    bottles: CountRange = (0, 2)
    boxes: CountRange = (0, 2)
    cans: CountRange = (0, 2)
    fruits: CountRange = (0, 3)
    distractors: CountRange = (0, 3)
    user_meshes: list[UserMesh] = Field(default_factory=list)
    extra_classes: list[str] = Field(default_factory=list, description="class names added after the built-ins")

    @model_validator(mode="after")
    def _classes_known(self) -> TabletopParams:
        known = BUILTIN | set(self.extra_classes)
        for i, m in enumerate(self.user_meshes):
            if m.class_name not in known:
                raise ValueError(f"user_meshes[{i}].class_name '{m.class_name}' is not a known class "
                                 f"({', '.join(sorted(known))}); add it to scene.params.extra_classes")
        return self


def user_mesh_sha256(path: str) -> str:
    """sha256 of a user mesh file (ValueError naming the path if it is not a file)."""
    if not Path(path).is_file():
        raise ValueError(f"user mesh '{path}' does not exist")
    return sha256_file(path)


def load_user_mesh(path: str, sha256: str | None = None) -> Mesh:
    """Load a mesh file with trimesh, centred on x/y with its base at z=0 and longest side 1.

    Cached by path and contents (``sha256``, hashed here if not given), so an edited file is read again.
    """
    return _load_user_mesh(path, sha256 or user_mesh_sha256(path))


@functools.lru_cache(maxsize=64)
def _load_user_mesh(path: str, sha256: str) -> Mesh:
    # ``sha256`` is only part of the cache key.
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"user mesh '{path}' does not exist")
    if p.suffix.lower() not in MESH_SUFFIXES:
        kinds = ", ".join(sorted(MESH_SUFFIXES))
        raise ValueError(f"user mesh '{path}' has unsupported type '{p.suffix}' (use {kinds})")
    try:
        loaded = trimesh.load(p, force="mesh")
    except Exception as e:  # trimesh raises many types on bad files
        raise ValueError(f"user mesh '{path}' cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0 or not np.isfinite(loaded.vertices).all():
        raise ValueError(f"user mesh '{path}' has no usable triangles")
    v = np.asarray(loaded.vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError(f"user mesh '{path}' is degenerate (zero size)")
    v = (v - np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]])) / extent
    return Mesh(v.astype(np.float32), np.asarray(loaded.faces, dtype=np.int32), smooth=True)


def _mug(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    r, h, t = uniform(rng, (0.035, 0.05)), uniform(rng, (0.08, 0.11)), 0.005
    body = g.lathe([r, r, r - t, r - t], [0, h, h, 0.01], 24)  # open cup: outer wall, rim, inner wall, floor
    handle = g.transform(g.torus(h * 0.3, 0.007, 16, 8), (r + 0.005, 0, h * 0.5))
    mat = sample_material(rng, vec3(rng.uniform(0.05, 0.8, 3)), k, roughness=(0.1, 0.5))
    return [Part(g.merge([body, handle]), mat)]


def _bottle(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    r, h = uniform(rng, (0.03, 0.045)), uniform(rng, (0.18, 0.3))
    prof_r = [r, r, r * 0.95, r * 0.45, r * 0.32, r * 0.32, r * 0.36]
    prof_h = [0, 0.005, h * 0.62, h * 0.75, h * 0.85, h * 0.97, h]
    glassy = rng.random() < 0.5
    color = (0.02, 0.15, 0.05) if glassy else vec3(rng.uniform(0.05, 0.8, 3))
    return [Part(g.lathe(prof_r, prof_h, 24), sample_material(rng, color, k, roughness=(0.05, 0.3)))]


def _box(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    sx, sy, sz = (uniform(rng, (0.05, 0.2)) for _ in range(3))
    return [Part(g.box(sx, sy, sz), sample_material(rng, vec3(rng.uniform(0.05, 0.9, 3)), k))]


def _can(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    r, h = uniform(rng, (0.028, 0.035)), uniform(rng, (0.09, 0.125))
    can = g.lathe([r * 0.9, r, r, r * 0.9, r * 0.85], [0, 0.006, h - 0.008, h - 0.002, h], 24)
    mat = sample_material(rng, vec3(rng.uniform(0.05, 0.9, 3)), k, roughness=(0.15, 0.4))
    mat.metallic = 1.0 if rng.random() < 0.6 else 0.0
    return [Part(can, mat)]


def _fruit(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    r = uniform(rng, (0.03, 0.05))
    elong = 1.0 if rng.random() < 0.6 else uniform(rng, (1.3, 2.2))
    mesh = g.transform(g.blob(rng, r, 0.08), (0, 0, r * 0.95), scale=(elong, 1, 1))
    color = [(0.6, 0.05, 0.02), (0.8, 0.35, 0.0), (0.6, 0.55, 0.02), (0.15, 0.4, 0.03)][int(rng.integers(4))]
    return [Part(mesh, sample_material(rng, color, k, roughness=(0.3, 0.7)))]


def _distractor(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    kind = int(rng.integers(3))
    s = uniform(rng, (0.03, 0.08))
    if kind == 0:
        mesh = g.transform(g.torus(s, s * 0.3, 20, 10), (0, 0, s * 0.3), rotation=g.rot_x(np.pi / 2))
    elif kind == 1:
        mesh = g.lathe([s, 0.001], [0, s * 2.5], 16, cap_top=False)
    else:
        mesh = g.transform(g.blob(rng, s, 0.3), (0, 0, s * 0.8))
    return [Part(mesh, sample_material(rng, vec3(rng.uniform(0.05, 0.9, 3)), k))]


BUILDERS = {"mug": (_mug, "mugs"), "bottle": (_bottle, "bottles"), "box": (_box, "boxes"), "can": (_can, "cans"),
            "fruit": (_fruit, "fruits"), "distractor": (_distractor, "distractors")}


@register_scene(
    "tabletop",
    description="household objects (mug, bottle, box, can, fruit, distractors, user meshes) on a table",
    classes=CLASSES,
    background="background",
    params=TabletopParams,
    randomization={
        "lights": {"count": [1, 3], "types": ["POINT", "AREA"], "point_energy": [100, 600], "distance": [1.5, 3.0]},
        "world": {"strength": [0.2, 0.8], "saturation": [0.0, 0.2]},
        "camera": {"fov_deg": [40, 65], "distance": [0.6, 1.4], "elevation_deg": [30, 75], "min_visible_objects": 2},
    },
    extra_classes=lambda p: list(p.extra_classes),
)
def sample_tabletop(ctx: SceneContext) -> SceneSpec:
    rng, p, r = ctx.rng, ctx.params, ctx.randomization
    k = r.materials
    cid = ctx.class_id
    tw, td = uniform(rng, p.table_size[0]), uniform(rng, p.table_size[1])
    objects: list[SceneObject] = []

    def add(name: str, cls: str, parts: list[Part], loc: Vec3 | FloatArray = (0.0, 0.0, 0.0), yaw: float = 0.0
            ) -> None:
        objects.append(SceneObject(f"{name}_{len(objects)}", cid(cls), parts, vec3(loc), (0.0, 0.0, float(yaw))))

    wood = sample_material(rng, (0.35, 0.2, 0.08), k)
    if rng.random() < 0.7:
        wood.texture, wood.color2 = "wave", (0.2, 0.1, 0.04)
    top = g.transform(g.box(tw, td, 0.04), (0, 0, -0.04))
    legs = g.merge([g.transform(g.cylinder(0.03, 0.71, 12), (sx * (tw / 2 - 0.08), sy * (td / 2 - 0.08), -0.75))
                    for sx in (-1, 1) for sy in (-1, 1)])
    add("table", "table", [Part(top, wood), Part(legs, wood)])
    add("floor", "background", [Part(g.plane(12, 12, -0.75), sample_material(rng, (0.3, 0.28, 0.25), k))])
    wall = g.transform(g.plane(12, 4), (0, 0, 0), rotation=g.rot_x(np.pi / 2))
    for i, yaw in enumerate(rng.permutation([0.0, np.pi / 2, np.pi, 3 * np.pi / 2])[:2]):
        add(f"wall{i}", "background", [Part(wall, sample_material(rng, (0.6, 0.58, 0.55), k))],
            (3 * np.sin(yaw), -3 * np.cos(yaw), 1.25), yaw)

    todo: list[tuple[str, list[Part], float]] = []
    for cls, (builder, field) in BUILDERS.items():
        for _ in range(integers(rng, getattr(p, field))):
            parts = builder(rng, k)
            todo.append((cls, parts, footprint_radius(parts)))
    for um in p.user_meshes:
        base = load_user_mesh(um.path, um.sha256)
        for _ in range(integers(rng, um.count)):
            size = uniform(rng, um.size)
            mesh = g.transform(base, scale=(size, size, size))
            parts = [Part(mesh, sample_material(rng, tuple(rng.uniform(0.05, 0.9, 3)), k))]
            todo.append((um.class_name, parts, footprint_radius(parts)))
    spots = place_circles(rng, [t[2] for t in todo], (-tw / 2 + 0.05, tw / 2 - 0.05), (-td / 2 + 0.05, td / 2 - 0.05))
    for (cls, parts, _), spot in zip(todo, spots, strict=True):
        if spot is not None:  # no free spot left on the table: drop the object rather than interpenetrate
            add(cls, cls, parts, (spot[0], spot[1], 0.0), rng.uniform(0, 2 * np.pi))

    thing_ids = {c.id for c in ctx.classes if c.thing}
    targets = np.array([o.location for o in objects if o.class_id in thing_ids] or [(0.0, 0.0, 0.0)])
    targets = targets + np.array([0.0, 0.0, 0.04])  # aim above the base
    cameras = [_orbit_camera(rng, ctx, targets) for _ in range(ctx.views)]
    return SceneSpec("tabletop", ctx.classes, cid("background"), objects,
                     sample_lights(rng, r.lights, np.zeros(3), min_height=0.8), sample_world(rng, r.world), cameras,
                     [sample_post(rng, r.post) for _ in range(ctx.views)])


def _orbit_camera(rng: np.random.Generator, ctx: SceneContext, targets: FloatArray) -> Camera:
    """Camera on a sphere around the objects' centroid, retried until enough objects are in frame (else the
    attempt that saw most, marked with ``min_visible_met=False``)."""
    kc = ctx.randomization.camera
    center = targets.mean(axis=0)
    best, best_n = None, -1
    for _ in range(kc.max_tries):
        az = rng.uniform(0, 2 * np.pi)
        el = np.radians(uniform(rng, kc.elevation_deg))
        d = uniform(rng, kc.distance)
        loc = center + d * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        target = center + rng.normal(0, kc.look_at_jitter / 3, 3)
        cam = Camera(vec3(loc), look_at(loc, target), fov=np.radians(uniform(rng, kc.fov_deg)),
                     clip_start=0.02, clip_end=50.0)
        n = int(visible_mask(cam, targets, margin=0.05).sum())
        if n > best_n:
            best, best_n = cam, n
        if n >= min(kc.min_visible_objects, len(targets)):
            break
    assert best is not None
    best.visible_objects, best.min_visible_met = best_n, best_n >= min(kc.min_visible_objects, len(targets))
    return best
