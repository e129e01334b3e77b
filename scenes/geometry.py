"""Procedural triangle meshes in NumPy (no Blender): boxes, cylinders, lathes, tori, irregular blobs.

All builders return a :class:`~scenes.spec.Mesh` whose base sits on z=0 unless noted, so objects can be
placed on a surface by their location alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from scenes.spec import FloatArray, Mesh, Vec3


def _mesh(vertices: npt.ArrayLike, faces: npt.ArrayLike, smooth: bool = False) -> Mesh:
    return Mesh(np.asarray(vertices, dtype=np.float32).reshape(-1, 3),
                np.asarray(faces, dtype=np.int32).reshape(-1, 3), smooth)


def box(sx: float, sy: float, sz: float, center_z: bool = False) -> Mesh:
    """Axis-aligned box of size (sx, sy, sz), centred in x/y, base at z=0 (or centred if ``center_z``)."""
    x, y = sx / 2, sy / 2
    z0, z1 = (-sz / 2, sz / 2) if center_z else (0.0, sz)
    v = [(-x, -y, z0), (x, -y, z0), (x, y, z0), (-x, y, z0), (-x, -y, z1), (x, -y, z1), (x, y, z1), (-x, y, z1)]
    quads = [(0, 3, 2, 1), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    return _mesh(v, _quads_to_tris(quads))


def plane(sx: float, sy: float, z: float = 0.0) -> Mesh:
    x, y = sx / 2, sy / 2
    return _mesh([(-x, -y, z), (x, -y, z), (x, y, z), (-x, y, z)], [(0, 1, 2), (0, 2, 3)])


def lathe(radii: FloatArray | Sequence[float], heights: FloatArray | Sequence[float], segments: int = 24,
          cap_bottom: bool = True, cap_top: bool = True, bottom_apex: float | None = None,
          top_apex: float | None = None) -> Mesh:
    """Surface of revolution of the profile (radius, height) around the z axis (bottles, cans, mugs).

    Caps are flat unless ``bottom_apex``/``top_apex`` give the height of the cap's centre vertex (poles).
    """
    r = np.asarray(radii, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    n_rings = len(r)
    theta = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    ring = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    verts = [np.column_stack([ring * ri, np.full(segments, hi)]) for ri, hi in zip(r, h, strict=True)]
    v = np.concatenate(verts)
    faces = []
    for i in range(n_rings - 1):
        a, b = i * segments, (i + 1) * segments
        for j in range(segments):
            k = (j + 1) % segments
            faces += [(a + j, a + k, b + k), (a + j, b + k, b + j)]
    extra: list[Vec3] = []
    if cap_bottom:
        c = len(v) + len(extra)
        extra.append((0.0, 0.0, float(h[0]) if bottom_apex is None else bottom_apex))
        faces += [(c, (j + 1) % segments, j) for j in range(segments)]
    if cap_top:
        c = len(v) + len(extra)
        extra.append((0.0, 0.0, float(h[-1]) if top_apex is None else top_apex))
        top = (n_rings - 1) * segments
        faces += [(c, top + j, top + (j + 1) % segments) for j in range(segments)]
    if extra:
        v = np.concatenate([v, np.asarray(extra)])
    return _mesh(v, faces, smooth=True)


def cylinder(radius: float, height: float, segments: int = 24) -> Mesh:
    return lathe([radius, radius], [0.0, height], segments)


def uv_sphere(radius: float, rings: int = 12, segments: int = 24) -> Mesh:
    """Sphere centred at the origin."""
    phi = np.linspace(0, np.pi, max(rings, 2) + 1)[1:-1]
    return lathe(radius * np.sin(phi), -radius * np.cos(phi), segments, bottom_apex=-radius, top_apex=radius)


def torus(major: float, minor: float, segments: int = 24, sides: int = 10) -> Mesh:
    """Torus in the x/z plane (a mug handle), centred at the origin."""
    u = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    w = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    uu, ww = np.meshgrid(u, w, indexing="ij")
    x = (major + minor * np.cos(ww)) * np.cos(uu)
    z = (major + minor * np.cos(ww)) * np.sin(uu)
    y = minor * np.sin(ww)
    v = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    faces = []
    for i in range(segments):
        for j in range(sides):
            a, b = i * sides + j, ((i + 1) % segments) * sides + j
            c, d = ((i + 1) % segments) * sides + (j + 1) % sides, i * sides + (j + 1) % sides
            faces += [(a, b, c), (a, c, d)]
    return _mesh(v, faces, smooth=True)


def blob(rng: np.random.Generator, radius: float, irregularity: float = 0.15, rings: int = 10,
         segments: int = 20, octaves: int = 3) -> Mesh:
    """Irregular closed blob (nucleus, fruit, bush) centred at the origin.

    The radius is modulated by a few random low-frequency harmonics of the direction, so the surface is
    smooth, star-shaped and never self-intersecting.
    """
    sphere = uv_sphere(1.0, rings, segments)
    d = sphere.vertices.astype(np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    r = np.ones(len(d))
    for k in range(1, octaves + 1):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        phase = rng.uniform(0, 2 * np.pi)
        r += irregularity / k * np.sin(k * 2.0 * (d @ axis) + phase)
    r = np.clip(r, 0.4, None) * radius
    return Mesh((d * r[:, None]).astype(np.float32), sphere.faces, smooth=True)


def transform(mesh: Mesh, location: Vec3 | FloatArray = (0.0, 0.0, 0.0), rotation_z: float = 0.0,
              scale: Vec3 | FloatArray = (1.0, 1.0, 1.0), rotation: FloatArray | None = None) -> Mesh:
    """Scale, then rotate (about z, or by a 3x3 ``rotation``), then translate a mesh's vertices."""
    v = mesh.vertices.astype(np.float64) * np.asarray(scale, dtype=np.float64)
    rot = rotation if rotation is not None else rot_z(rotation_z)
    v = v @ rot.T + np.asarray(location, dtype=np.float64)
    return Mesh(v.astype(np.float32), mesh.faces.copy(), mesh.smooth)


def merge(meshes: list[Mesh]) -> Mesh:
    """Concatenate meshes of the same material into one."""
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    v = np.concatenate([m.vertices for m in meshes])
    f = np.concatenate([m.faces + o for m, o in zip(meshes, offsets, strict=True)])
    return Mesh(v, f, any(m.smooth for m in meshes))


def rot_z(angle: float) -> FloatArray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rot_y(angle: float) -> FloatArray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def rot_x(angle: float) -> FloatArray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _quads_to_tris(quads: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    tris = []
    for a, b, c, d in quads:
        tris += [(a, b, c), (a, c, d)]
    return tris
