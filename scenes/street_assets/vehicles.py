"""Procedural vehicles of the ``street`` family: sedans, hatchbacks, SUVs, vans, box trucks, buses, bicycles.

Every generator returns the ``Part`` list of one object in object-local coordinates: origin at the centre of its
footprint on the ground (the tyres touch ``z = 0``), length along ``y``, front towards ``+y``.

How a body is built: a side silhouette (bumper, hood, windscreen, roof, rear window, boot) gives the height of
the body at every station along the length; at each station a rounded cross-section (flat floor, wheel-arch
notch, rounded sill, slightly bulging flank, shoulder at the belt line, a greenhouse leaning inwards by the
tumblehome, rounded roof edges and a crowned roof) is lofted into one closed quad mesh shaded smooth; the
sections shrink to a vertical line at both ends along a superellipse, which rounds the nose and the tail in plan
view. Stations follow the silhouette's arc length, so steep windscreens and hatches get as many as flat roofs,
plus extra stations around the wheel arches. Glass (side windows following the A/C pillars and the roof line,
windscreen, rear window), lights, grilles and number plates are separate thin parts lying on that surface
(sampled from the same sections, or projected onto the mesh along an axis), so they read as windows and lights;
tyres and rims are lathed. All meshes are quads.

Classes: every generator here draws a ``vehicle``; the bicycle is a ``vehicle`` too (Cityscapes counts bicycles
among its vehicle group; as with parked cars, a bicycle without a rider is a vehicle).

Body colours follow the distribution of cars on European/US streets (white ~25 %, black ~20 %, grey ~18 %,
silver ~12 %, blue ~9 %, red ~8 %, the rest green, beige, yellow, orange, dark red) in metallic paint; buses
and trucks have liveries of their own (white, red, yellow, blue, green; cargo boxes mostly white or aluminium).
Kinds are drawn with urban frequencies (:data:`KIND_WEIGHTS`: mostly cars, vans, trucks and buses rarer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from scenes.randomization import MaterialKnobs, jitter_color, uniform
from scenes.spec import FloatArray, Material, Mesh, Part, Vec3

IntArray = npt.NDArray[np.int64]

VEHICLE_KINDS: tuple[str, ...] = ("sedan", "hatchback", "suv", "van", "truck", "bus")
KIND_WEIGHTS: tuple[float, ...] = (0.30, 0.26, 0.24, 0.10, 0.06, 0.04)
"""Share of each kind in :data:`VEHICLE_KINDS` when no kind is asked for (cars 80 %)."""

# (name, linear RGB, share, metallic range): car paint as seen on streets.
CAR_PAINTS: tuple[tuple[str, Vec3, float, tuple[float, float]], ...] = (
    ("white", (0.80, 0.80, 0.78), 0.25, (0.1, 0.5)),
    ("black", (0.012, 0.012, 0.014), 0.20, (0.4, 0.8)),
    ("grey", (0.13, 0.135, 0.14), 0.18, (0.5, 0.85)),
    ("silver", (0.50, 0.51, 0.53), 0.12, (0.7, 0.9)),
    ("blue", (0.015, 0.05, 0.22), 0.09, (0.4, 0.8)),
    ("red", (0.45, 0.02, 0.015), 0.08, (0.3, 0.7)),
    ("green", (0.03, 0.12, 0.05), 0.025, (0.3, 0.7)),
    ("beige", (0.35, 0.26, 0.16), 0.02, (0.3, 0.6)),
    ("yellow", (0.75, 0.52, 0.02), 0.01, (0.2, 0.5)),
    ("orange", (0.65, 0.18, 0.02), 0.01, (0.3, 0.6)),
    ("dark red", (0.14, 0.01, 0.01), 0.015, (0.4, 0.8)),
)
LIVERIES: tuple[tuple[str, Vec3, float], ...] = (
    ("white", (0.78, 0.78, 0.76), 0.32), ("red", (0.5, 0.03, 0.02), 0.18), ("yellow", (0.8, 0.55, 0.03), 0.1),
    ("blue", (0.03, 0.1, 0.4), 0.15), ("green", (0.05, 0.25, 0.08), 0.1), ("silver", (0.45, 0.46, 0.48), 0.1),
    ("orange", (0.7, 0.22, 0.02), 0.05),
)
_NEUTRAL = {"white", "black", "grey", "silver"}


# ----------------------------------------------------------------------------------------------- mesh helpers
def _mesh(vertices: npt.ArrayLike, faces: npt.ArrayLike, smooth: bool = True) -> Mesh:
    return Mesh(np.asarray(vertices, dtype=np.float32).reshape(-1, 3),
                np.asarray(faces, dtype=np.int32).reshape(-1, 4), smooth)


def _merge(meshes: Sequence[Mesh | None]) -> Mesh:
    """Concatenate quad meshes (``None`` entries skipped) into one."""
    ms = [m for m in meshes if m is not None and len(m.faces)]
    if not ms:
        return _mesh(np.zeros((0, 3)), np.zeros((0, 4)))
    offsets = np.cumsum([0] + [len(m.vertices) for m in ms[:-1]])
    return Mesh(np.concatenate([m.vertices for m in ms]),
                np.concatenate([m.faces + o for m, o in zip(ms, offsets, strict=True)]).astype(np.int32),
                any(m.smooth for m in ms))


def _grid_faces(rows: int, cols: int, wrap: bool = False) -> IntArray:
    """Quads of a (rows, cols) vertex grid; normal = d(row) x d(col) (right-handed)."""
    n_c = cols if wrap else cols - 1
    r = np.arange(rows - 1)[:, None]
    c = np.arange(n_c)[None, :]
    a, b = r * cols + c, r * cols + (c + 1) % cols
    d, e = (r + 1) * cols + c, (r + 1) * cols + (c + 1) % cols
    return np.stack([a, d, e, b], axis=-1).reshape(-1, 4)


def _grid_mesh(grid: FloatArray, smooth: bool = True, flip: bool = False) -> Mesh:
    rows, cols = grid.shape[:2]
    f = _grid_faces(rows, cols)
    return _mesh(grid.reshape(-1, 3), f[:, ::-1] if flip else f, smooth)


def _compact(vertices: FloatArray, faces: IntArray) -> tuple[FloatArray, IntArray]:
    used = np.unique(faces)
    remap = np.full(len(vertices), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces]


def _qbox(size: Sequence[float], center: Sequence[float], taper: float = 1.0) -> Mesh:
    """Box of ``size`` (x, y, z) centred at ``center``, 6 outward quads; ``taper`` scales the top face's x."""
    sx, sy, sz = (s / 2 for s in size)
    v = np.array([(-sx, -sy, -sz), (sx, -sy, -sz), (sx, sy, -sz), (-sx, sy, -sz),
                  (-sx * taper, -sy, sz), (sx * taper, -sy, sz), (sx * taper, sy, sz), (-sx * taper, sy, sz)])
    quads = [(0, 3, 2, 1), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    return _mesh(v + np.asarray(center, dtype=np.float64), quads, smooth=False)


def _tube(p: Sequence[float], q: Sequence[float], radius: float, sides: int = 6) -> Mesh:
    """Open cylinder of ``radius`` from point ``p`` to ``q`` (frame tubes, spokes, rails)."""
    a, b = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    axis = b - a
    axis /= np.linalg.norm(axis)
    helper = np.array([1.0, 0, 0]) if abs(axis[0]) < 0.9 else np.array([0, 1.0, 0])
    u = np.cross(axis, helper)
    u /= np.linalg.norm(u)
    w = np.cross(axis, u)
    th = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    ring = radius * (np.cos(th)[:, None] * u + np.sin(th)[:, None] * w)
    grid = np.stack([a + ring, b + ring])
    return _mesh(grid.reshape(-1, 3), _grid_faces(2, sides, wrap=True)[:, ::-1])  # outward


def _revolve(profile: FloatArray, segments: int, closed: bool, arc: tuple[float, float] | None = None
             ) -> Mesh:
    """Revolve a (P, 2) profile of (radius, axial offset) about the x axis (an axle).

    The profile is closed (a tyre's section) or open (a rim's face). ``arc`` = (start, end) angles in the
    y/z plane gives an open partial surface (a wheel-arch liner); else a full turn whose angles include
    straight down when ``segments`` is a multiple of 4.
    """
    if arc is None:
        th = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    else:
        th = np.linspace(arc[0], arc[1], segments + 1)
    r, w = profile[:, 0], profile[:, 1]
    grid = np.stack([np.broadcast_to(w, (len(th), len(w))), np.outer(np.cos(th), r), np.outer(np.sin(th), r)],
                    axis=-1)  # (angles, profile, 3)
    rows, cols = grid.shape[:2]
    r_idx = np.arange(rows if arc is None else rows - 1)[:, None]
    c_idx = np.arange(cols if closed else cols - 1)[None, :]
    a, b = r_idx * cols + c_idx, r_idx * cols + (c_idx + 1) % cols
    d, e = ((r_idx + 1) % rows) * cols + c_idx, ((r_idx + 1) % rows) * cols + (c_idx + 1) % cols
    return _mesh(grid.reshape(-1, 3), np.stack([a, b, e, d], axis=-1).reshape(-1, 4))


def _move(mesh: Mesh, offset: Sequence[float] | FloatArray, mirror_x: bool = False) -> Mesh:
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces
    if mirror_x:
        v = v * np.array([-1.0, 1.0, 1.0])
        f = f[:, ::-1]  # mirroring flips the winding
    return Mesh((v + np.asarray(offset, dtype=np.float64)).astype(np.float32), f.copy(), mesh.smooth)


def _triangles(mesh: Mesh) -> FloatArray:
    """(2F, 3, 3) corner positions of a quad mesh split into triangles (for ray casts)."""
    v, f = mesh.vertices.astype(np.float64), mesh.faces
    return np.concatenate([v[f[:, [0, 1, 2]]], v[f[:, [0, 2, 3]]]])


def _raycast(tris: FloatArray, origins: FloatArray, direction: FloatArray) -> FloatArray:
    """Distance along ``direction`` from each of the (N, 3) origins to the nearest triangle (NaN: a miss).

    Möller-Trumbore, vectorised over rays and triangles. The rays are nudged by 0.1 mm sideways: a ray exactly
    along a shared edge (a body's welded centre line at x = 0) could slip between its two triangles.
    """
    origins = origins + 1e-4 * (np.array([0.71, 0.53, 0.46]) - np.abs(direction))
    v0 = tris[:, 0]
    e1, e2 = tris[:, 1] - v0, tris[:, 2] - v0
    p = np.cross(direction, e2)
    det = (e1 * p).sum(1)
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origins[:, None, :] - v0[None]
    u = (s * p[None]).sum(-1) * inv
    q = np.cross(s, e1[None])
    v = (q @ direction) * inv
    t = (q * e2[None]).sum(-1) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 1e-6)
    t = np.where(hit, t, np.inf).min(1)
    return np.where(np.isfinite(t), t, np.nan)


def _decal(tris: FloatArray, axis: str, center: tuple[float, float], size: tuple[float, float],
           n: tuple[int, int] = (2, 1), offset: float = 0.01, max_depth: float = 0.25, flat: bool = False
           ) -> Mesh | None:
    """A thin panel lying on a body: a (u, v) grid projected onto the mesh ``tris`` along an axis.

    Args:
        tris: (T, 3, 3) triangles of the surface.
        axis: "-y" (onto the front, from ahead), "+y" (onto the rear), "-x" (the right flank) or "+x" (left).
        center: (u, v) centre of the panel: (x, z) for the y axes, (y, z) for the x axes.
        size: (width, height) of the panel in u and v.
        n: quads along u and v.
        offset: distance in front of the surface (against the projection direction).
        max_depth: vertices whose ray reaches further behind the panel's nearest hit than this are held there
            (a ray that passes over an edge does not drag the panel onto a surface far behind).
        flat: A plane in front of the nearest hit (a number plate) instead of following the surface; the
            surface is sampled on a 5 x 3 grid so a bulge between the corners stays behind the plane.

    Returns:
        The panel (facing against the projection direction), or ``None`` if no ray hit the surface.
    """
    sign = 1.0 if axis[0] == "+" else -1.0
    ax = "xyz".index(axis[1])
    uu = center[0] + np.linspace(-size[0] / 2, size[0] / 2, n[0] + 1)
    vv = center[1] + np.linspace(-size[1] / 2, size[1] / 2, n[1] + 1)
    gu, gv = np.meshgrid(uu, vv, indexing="ij")
    origins = np.zeros((gu.size, 3))
    other = [i for i in range(3) if i != ax]
    # Only triangles whose extent overlaps the panel's rectangle can be hit (a ~10x cheaper cast).
    lo, hi = tris.min(axis=1), tris.max(axis=1)
    tris = tris[(hi[:, other[0]] >= uu[0] - 1e-6) & (lo[:, other[0]] <= uu[-1] + 1e-6)
                & (hi[:, other[1]] >= vv[0] - 1e-6) & (lo[:, other[1]] <= vv[-1] + 1e-6)]
    origins[:, other[0]], origins[:, other[1]] = gu.ravel(), gv.ravel()
    origins[:, ax] = -sign * 100.0
    direction = np.zeros(3)
    direction[ax] = sign
    t = _raycast(tris, origins, direction)
    if np.all(np.isnan(t)):
        return None
    t0 = float(np.nanmin(t))
    if flat:
        su, sv = np.meshgrid(np.linspace(-size[0] / 2, size[0] / 2, 5), np.linspace(-size[1] / 2, size[1] / 2, 3))
        probe = np.zeros((su.size, 3))
        probe[:, other[0]], probe[:, other[1]] = center[0] + su.ravel(), center[1] + sv.ravel()
        probe[:, ax] = -sign * 100.0
        t0 = float(np.nanmin(np.concatenate([[t0], _raycast(tris, probe, direction)])))
        t = np.full_like(t, t0)
    t = np.clip(np.where(np.isnan(t), t0, t), t0, t0 + max_depth)
    if not flat:  # a curved surface bulges between the vertices: move the panel out by the deepest bulge
        tg = t.reshape(n[0] + 1, n[1] + 1)
        mu, mv = 0.5 * (gu[:-1, :-1] + gu[1:, 1:]), 0.5 * (gv[:-1, :-1] + gv[1:, 1:])
        chord = 0.25 * (tg[:-1, :-1] + tg[1:, :-1] + tg[:-1, 1:] + tg[1:, 1:])
        edges = [(mu, gv[:-1, :-1], 0.5 * (tg[:-1, :-1] + tg[1:, :-1])),  # mid-points of the u edges
                 (gu[:-1, :-1], mv, 0.5 * (tg[:-1, :-1] + tg[:-1, 1:])), (mu, mv, chord)]
        probe = np.zeros((sum(e[0].size for e in edges), 3))
        probe[:, other[0]] = np.concatenate([e[0].ravel() for e in edges])
        probe[:, other[1]] = np.concatenate([e[1].ravel() for e in edges])
        probe[:, ax] = -sign * 100.0
        surface = _raycast(tris, probe, direction)
        lin = np.concatenate([e[2].ravel() for e in edges])
        bulge = np.nan_to_num(np.clip(lin - surface, 0.0, max_depth), nan=0.0)
        t = t - float(bulge.max(initial=0.0))
    pts = origins + direction * (t - offset)[:, None]
    grid = pts.reshape(n[0] + 1, n[1] + 1, 3)
    # Facing against the projection: the grid's (u, v) normal is u x v, flip when it points along the ray.
    du, dv = np.zeros(3), np.zeros(3)
    du[other[0]], dv[other[1]] = 1.0, 1.0
    flip = float(np.cross(du, dv) @ direction) > 0
    return _grid_mesh(grid, smooth=True, flip=flip)


# ------------------------------------------------------------------------------------------------- the loft
def _curve(points: Sequence[tuple[float, float]], length: float, sigma: float
           ) -> Callable[[FloatArray], FloatArray]:
    """A smooth function of the distance from the front: the polyline through ``points``, Gaussian-smoothed."""
    pts = np.asarray(points, dtype=np.float64)
    fine = np.linspace(0.0, length, max(int(length / 0.01), 2) + 1)
    z = np.interp(fine, pts[:, 0], pts[:, 1])
    if sigma > 0:
        half = int(3 * sigma / 0.01) + 1
        x = np.arange(-half, half + 1) * 0.01
        kern = np.exp(-0.5 * (x / sigma) ** 2)
        kern /= kern.sum()
        zp = np.concatenate([np.full(half, z[0]), z, np.full(half, z[-1])])
        z = np.convolve(zp, kern, mode="valid")

    def f(d: FloatArray) -> FloatArray:
        return np.asarray(np.interp(d, fine, z), dtype=np.float64)

    return f


@dataclass
class _Profile:
    """Shape of one lofted body. Distances ``d`` run from the front tip (0) to the rear tip (``length``)."""

    length: float
    half_width: float
    top: list[tuple[float, float]]  # side silhouette: roof/hood/boot height (d, z)
    bottom: list[tuple[float, float]]  # underside height (d, z)
    belt: list[tuple[float, float]]  # belt line: bottom edge of the side windows (d, z)
    y_front: float = 0.0  # y of the front tip (defaults to length / 2)
    tumble: float = 0.3  # inward lean of the greenhouse per metre of height
    shoulder: float = 0.03  # inward step at the belt line
    bottom_radius: float = 0.06
    roof_radius: tuple[float, float] = (0.12, 0.08)  # roof edge rounding (x, z)
    crown: float = 0.04  # roof/hood centre above its edges
    bulge: float = 0.015  # flank bulge below the belt
    nose: tuple[float, float] = (0.3, 2.5)  # plan rounding of the front: (length, superellipse exponent)
    tail: tuple[float, float] = (0.25, 2.5)
    wheels: list[tuple[float, float, float]] = field(default_factory=list)  # (d, axle height, arch radius)
    arch_depth: float = 0.3  # how far the arch notch reaches in from the flank
    spacing: float = 0.12  # arc length between stations along the silhouette
    smooth: float = 0.04  # Gaussian smoothing of the silhouette curves (m)
    f_top: Callable[[FloatArray], FloatArray] = field(init=False, repr=False)
    f_bottom: Callable[[FloatArray], FloatArray] = field(init=False, repr=False)
    f_belt: Callable[[FloatArray], FloatArray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.y_front == 0.0:
            self.y_front = self.length / 2
        self.f_top = _curve(self.top, self.length, self.smooth)
        self.f_bottom = _curve(self.bottom, self.length, self.smooth)
        self.f_belt = _curve(self.belt, self.length, self.smooth)


# Plan-view width factors of the stations rounding each end (0 = the tip, a vertical line).
_PINCH = np.array([0.0, 0.25, 0.5, 0.7, 0.85, 0.94, 0.985])


def _plan(p: _Profile, d: FloatArray) -> FloatArray:
    out = np.ones_like(d)
    for dist, (r, e) in ((d, p.nose), (p.length - d, p.tail)):
        inside = dist < r
        x = np.clip(1 - dist[inside] / r, 0, 1)
        out[inside] = np.minimum(out[inside], (1 - x**e) ** (1 / e))
    out[(d <= 1e-6) | (d >= p.length - 1e-6)] = 0.0  # the tips: exactly a vertical line
    return out


def _arch_height(p: _Profile, d: FloatArray, z0: FloatArray) -> FloatArray:
    zl = z0.copy()
    for dw, zw, ra in p.wheels:
        dy = np.abs(d - dw)
        inside = dy <= ra + 1e-9
        zl[inside] = np.maximum(zl[inside], zw + np.sqrt(np.maximum(ra**2 - dy[inside] ** 2, 0)))
    return zl


def _sections(p: _Profile, d: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Right halves of the cross-sections at distances ``d``.

    Returns:
        (S, 17, 2) section points (x >= 0, z) from the bottom centre up the flank to the roof centre; (S,) belt
        heights; (S,) heights where the roof-edge rounding starts (the top of the side windows' band).
    """
    d = np.asarray(d, dtype=np.float64)
    z0 = p.f_bottom(d)
    zt = p.f_top(d)
    zb = np.minimum(p.f_belt(d), zt - 0.04)
    rb0 = p.bottom_radius
    zl = np.clip(_arch_height(p, d, z0), z0 + 0.004, np.maximum(zb - 0.06, z0 + 0.004))
    rb = np.minimum(rb0, (zb - zl) * 0.4)
    hw = np.full_like(d, p.half_width)
    xin = hw - p.arch_depth
    crown = np.minimum(p.crown, 0.4 * (zt - zb))
    avail = zt - crown - zb
    rz = np.minimum(p.roof_radius[1], 0.6 * avail)
    zc = zt - crown - rz
    wt = hw - p.shoulder - p.tumble * (zc - zb)
    rx = np.minimum(p.roof_radius[0], 0.5 * wt)
    c45 = np.sqrt(0.5)
    z6 = zl + rb
    z10 = zb + np.minimum(0.03, 0.3 * (zc - zb))
    x10 = hw - p.shoulder
    pts = [
        (np.zeros_like(d), z0), (xin * 0.5, z0), (xin, z0), (xin, zl),
        (hw - rb, zl), (hw - rb + rb * c45, zl + rb - rb * c45), (hw, z6),
        (hw + p.bulge, z6 + 0.45 * (zb - z6)), (hw + 0.6 * p.bulge, z6 + 0.8 * (zb - z6)), (hw, zb),
        (x10, z10), (0.5 * (x10 + wt), 0.5 * (z10 + zc)), (wt, zc),
        (wt - rx + rx * c45, zc + rz * c45), (wt - rx, zt - crown), ((wt - rx) * 0.5, zt - 0.25 * crown),
        (np.zeros_like(d), zt),
    ]
    sec = np.stack([np.stack([x, z], axis=-1) for x, z in pts], axis=1)
    sec[..., 0] *= _plan(p, d)[:, None]
    return sec, zb, zc


def _stations(p: _Profile) -> FloatArray:
    """Distances from the front of the loft's stations: by arc length of the silhouette, denser at arches,
    and on the superellipse at both ends."""
    fine = np.linspace(0, p.length, max(int(p.length / 0.01), 2) + 1)
    s = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(fine), np.diff(p.f_top(fine))))])
    main = np.interp(np.linspace(0, s[-1], max(int(s[-1] / p.spacing), 2) + 1), s, fine)
    special = []
    for r, e, tip, sgn in ((p.nose[0], p.nose[1], 0.0, 1.0), (p.tail[0], p.tail[1], p.length, -1.0)):
        special += list(tip + sgn * r * (1 - (1 - _PINCH**e) ** (1 / e)))
    keep = (main > p.nose[0] + 0.03) & (main < p.length - p.tail[0] - 0.03)
    for dw, _, ra in p.wheels:
        special += list(dw + ra * np.sin(np.linspace(-np.pi / 2, np.pi / 2, 9)))
        special += [dw - ra - 0.012, dw + ra + 0.012]
        keep &= np.abs(main - dw) > ra + 0.06
    d = np.sort(np.clip(np.concatenate([main[keep], special, [0.0, p.length]]), 0.0, p.length))
    d = d[np.concatenate([[True], np.diff(d) > 1e-3])]
    d[-1] = p.length  # the tail's tip, exactly
    return np.asarray(d, dtype=np.float64)


@dataclass
class _Body:
    profile: _Profile
    d: FloatArray  # station distances from the front, ascending
    mesh: Mesh
    tris: FloatArray

    def y(self, d: FloatArray | float) -> FloatArray:
        return self.profile.y_front - np.asarray(d, dtype=np.float64)


def _loft(p: _Profile) -> _Body:
    """One closed, smooth quad mesh through the cross-sections at the stations of ``p``."""
    d = _stations(p)
    sec, _, _ = _sections(p, d)
    order = np.argsort(p.y_front - d)  # ascending y: rows of the grid
    d, sec = d[order], sec[order]
    n_s, n_h = len(d), sec.shape[1]  # n_h = 17 points per half
    ring = 2 * (n_h - 1)  # 32: right half 0..16, left half 17..31 mirrors points 15..1
    x = np.concatenate([sec[..., 0], -sec[:, n_h - 2:0:-1, 0]], axis=1)
    z = np.concatenate([sec[..., 1], sec[:, n_h - 2:0:-1, 1]], axis=1)
    y = np.broadcast_to((p.y_front - d)[:, None], x.shape)
    verts = np.stack([x, y, z], axis=-1).reshape(-1, 3)
    faces = _grid_faces(n_s, ring, wrap=True)
    # Weld the tips: where a section is a vertical line, its left half is its right half.
    idx = np.arange(n_s * ring).reshape(n_s, ring)
    for k in np.flatnonzero(np.abs(sec[..., 0]).max(axis=1) < 1e-9):
        idx[k, n_h:] = idx[k, n_h - 2:0:-1]
    faces = idx.ravel()[faces]
    v, f = _compact(verts, faces)
    mesh = _mesh(v, f)
    return _Body(p, d[::-1].copy(), mesh, _triangles(mesh))


def _span(body: _Body, d_a: float, d_b: float) -> FloatArray:
    """Stations of a patch from ``d_a`` to ``d_b``: the body's own stations between them, so the patch follows
    the body's facets exactly (a section between two stations is not the blend of theirs); its ends where
    fewer than two lie between them."""
    inner = body.d[(body.d >= d_a) & (body.d <= d_b)]
    return inner if len(inner) >= 2 else np.array([d_a, d_b])


def _normals(grid: FloatArray, outward: FloatArray) -> FloatArray:
    """Unit normals of a (R, C, 3) grid, turned towards the ``outward`` (R, C, 3) hints."""
    n = np.cross(np.gradient(grid, axis=0), np.gradient(grid, axis=1))
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return np.asarray(n * np.sign((n * outward).sum(-1, keepdims=True) + 1e-12), dtype=np.float64)


def _oriented(grid: FloatArray, normals: FloatArray) -> Mesh:
    """A grid mesh whose faces wind to match the given normals."""
    n_grid = np.cross(np.gradient(grid, axis=0), np.gradient(grid, axis=1))
    flip = float((n_grid * normals).sum()) < 0
    return _grid_mesh(grid, flip=flip)


def _side_patch(body: _Body, d_a: float, d_b: float, side: float, lo: float | None = None,
                hi: float | None = None, margin: tuple[float, float] = (0.04, 0.03), offset: float = 0.008,
                rows: int = 1, min_height: float = 0.02) -> Mesh | None:
    """A panel on a flank (``side`` +1: right, -1: left) from ``d_a`` to ``d_b`` between two heights.

    ``lo``/``hi`` default to the belt line + ``margin[0]`` and the start of the roof rounding - ``margin[1]``:
    the side windows' band, whose ends then follow the A and C pillars. Stations where the band is lower than
    ``min_height`` are cut off (the panel ends where the pillar meets the belt).
    """
    p = body.profile
    fine = np.linspace(d_a, d_b, max(int((d_b - d_a) / 0.01), 2) + 1)
    _, zb_f, zc_f = _sections(p, fine)
    h = (np.full_like(fine, hi) if hi is not None else zc_f - margin[1]) - \
        (np.full_like(fine, lo) if lo is not None else zb_f + margin[0])
    ok = np.flatnonzero(h >= min_height)
    if len(ok) < 2:
        return None
    ds = _span(body, float(fine[ok[0]]), float(fine[ok[-1]]))
    sec, zb, zc = _sections(p, ds)
    z_lo = np.full_like(ds, lo) if lo is not None else zb + margin[0]
    z_hi = np.maximum(np.full_like(ds, hi) if hi is not None else zc - margin[1], z_lo + 1e-3)
    grid = np.zeros((len(ds), rows + 1, 3))
    bulge = np.zeros(len(ds))
    for i in range(len(ds)):
        zs = np.linspace(z_lo[i], z_hi[i], rows + 1)
        flank = sec[i, 6:13]  # the flank's points, ascending in z
        grid[i, :, 0] = np.interp(zs, flank[:, 1], flank[:, 0])
        grid[i, :, 2] = zs
        grid[i, :, 1] = p.y_front - ds[i]
        # Where the flank bulges between two rows, their chord lies inside: move the station out by that much.
        mid = np.interp(0.5 * (zs[1:] + zs[:-1]), flank[:, 1], flank[:, 0])
        bulge[i] = max(0.0, float((mid - 0.5 * (grid[i, 1:, 0] + grid[i, :-1, 0])).max()))
    out = np.zeros_like(grid)
    out[..., 0] = 1.0
    if rows == 1:  # a straight band: normal in the section plane, perpendicular to the band
        t = grid[:, 1] - grid[:, 0]
        nrm = np.stack([t[:, 2], np.zeros(len(ds)), -t[:, 0]], axis=-1)
        nrm /= np.maximum(np.linalg.norm(nrm, axis=-1, keepdims=True), 1e-12)
        nrm = np.repeat(nrm[:, None], 2, axis=1)
    else:
        nrm = _normals(grid, out)
    grid = grid + (offset + bulge)[:, None, None] * nrm
    if side < 0:
        grid[..., 0] *= -1
        nrm[..., 0] *= -1
    return _oriented(grid, nrm)


def _cap_patch(body: _Body, d_a: float, d_b: float, inset: float = 0.04, offset: float = 0.008) -> Mesh:
    """A panel over the roof's cross-section from ``d_a`` to ``d_b`` (a sloping windscreen or rear window)
    between the roof-edge roundings, ``inset`` inside their midpoints (the A/C pillars)."""
    p = body.profile
    ds = _span(body, d_a, d_b)
    sec, _, _ = _sections(p, ds)
    grid = np.zeros((len(ds), 7, 3))
    for i in range(len(ds)):
        cap = sec[i, 12:][::-1]  # ascending x: roof centre .. roof edge
        xg = max(sec[i, 13, 0] - inset, sec[i, 14, 0] + 1e-3)
        half = np.concatenate([sec[i, 16:13:-1, 0], [xg]])  # the polyline's own vertices: no chord cuts in
        xs = np.concatenate([-half[:0:-1], half])
        grid[i, :, 0] = xs
        grid[i, :, 2] = np.interp(np.abs(xs), cap[:, 0], cap[:, 1])
        grid[i, :, 1] = p.y_front - ds[i]
    up = np.zeros_like(grid)
    up[..., 2] = 1.0
    nrm = _normals(grid, up)
    return _oriented(grid + offset * nrm, nrm)


# ------------------------------------------------------------------------------------------------ materials
def _sampler(rng: np.random.Generator) -> Callable[[float, float], float]:
    """``u(a, b)``: a uniform draw from ``rng`` (shorthand for the many dimensions below)."""

    def u(a: float, b: float) -> float:
        return uniform(rng, (a, b))

    return u


def _choice(rng: np.random.Generator, weights: Sequence[float]) -> int:
    w = np.asarray(weights, dtype=np.float64)
    return int(rng.choice(len(w), p=w / w.sum()))


def _neutral_knobs(k: MaterialKnobs) -> MaterialKnobs:
    """Jitter for near-grey paint: keep its hue and nearly all of its (lack of) saturation."""
    return k.model_copy(update={"saturation_jitter": min(k.saturation_jitter, 0.03),
                                "value_jitter": min(k.value_jitter, 0.15)})


def car_paint(rng: np.random.Generator, k: MaterialKnobs) -> tuple[str, Material]:
    """A car's paint from :data:`CAR_PAINTS`: mostly metallic (0.3-0.9), glossy (roughness 0.15-0.4)."""
    name, rgb, _, metal = CAR_PAINTS[_choice(rng, [c[2] for c in CAR_PAINTS])]
    knobs = _neutral_knobs(k) if name in _NEUTRAL else k.model_copy(
        update={"hue_jitter": min(k.hue_jitter, 0.03)})
    color = jitter_color(rng, rgb, knobs)
    if rng.random() < 0.1:  # solid, satin paint
        return name, Material(color, roughness=uniform(rng, (0.35, 0.55)), metallic=uniform(rng, (0.0, 0.2)))
    return name, Material(color, roughness=uniform(rng, (0.15, 0.4)), metallic=uniform(rng, metal))


def _livery(rng: np.random.Generator, k: MaterialKnobs, exclude: str = "") -> tuple[str, Material]:
    opts = [c for c in LIVERIES if c[0] != exclude]
    name, rgb, _ = opts[_choice(rng, [c[2] for c in opts])]
    color = jitter_color(rng, rgb, _neutral_knobs(k) if name in _NEUTRAL else k)
    return name, Material(color, roughness=uniform(rng, (0.25, 0.45)), metallic=uniform(rng, (0.0, 0.35)))


def _glass(rng: np.random.Generator) -> Material:
    tint = rng.choice(3)
    base = [(0.012, 0.015, 0.018), (0.01, 0.016, 0.014), (0.02, 0.02, 0.022)][int(tint)]
    v = rng.uniform(0.7, 1.5)
    return Material((base[0] * v, base[1] * v, base[2] * v), roughness=uniform(rng, (0.02, 0.08)), metallic=0.0)


def _common_materials(rng: np.random.Generator) -> dict[str, Material]:
    rim_kind = rng.random()
    if rim_kind < 0.6:  # alloy
        rim = Material((0.55, 0.56, 0.58), roughness=uniform(rng, (0.2, 0.35)), metallic=1.0)
    elif rim_kind < 0.8:  # dark alloy
        rim = Material((0.06, 0.06, 0.065), roughness=uniform(rng, (0.25, 0.4)), metallic=0.9)
    else:  # plastic hub cap / steel
        rim = Material((0.3, 0.3, 0.31), roughness=uniform(rng, (0.3, 0.5)), metallic=0.6)
    plate_col = (0.8, 0.8, 0.78) if rng.random() < 0.85 else (0.85, 0.6, 0.02)
    return {
        "glass": _glass(rng),
        "rubber": Material((0.018, 0.018, 0.019), roughness=uniform(rng, (0.85, 0.95))),
        "rims": rim,
        "trim": Material((0.02, 0.02, 0.021), roughness=uniform(rng, (0.4, 0.6))),
        "head_lights": Material((0.75, 0.76, 0.78), roughness=0.06, metallic=0.6),
        "tail_lights": Material((0.5, 0.012, 0.01), roughness=0.1),
        "plates": Material(plate_col, roughness=0.4),
    }


# ---------------------------------------------------------------------------------------------------- wheels
def _wheel(radius: float, width: float, rim_frac: float, spokes: int, segments: int = 16
           ) -> tuple[Mesh, Mesh]:
    """A tyre (closed lathe, rounded shoulders) and the outer face of its rim (dished, with recessed gaps
    between ``spokes``), both around the x axis at the origin, outer face towards +x."""
    r_in, h = radius * rim_frac, width / 2
    sh = min(0.06, 0.3 * (radius - r_in))
    tyre = np.array([(r_in, -h * 0.85), (r_in + 0.5 * (radius - r_in), -h), (radius - sh, -h * 0.97),
                     (radius, -h * 0.62), (radius, h * 0.62), (radius - sh, h * 0.97),
                     (r_in + 0.5 * (radius - r_in), h), (r_in, h * 0.85)])[::-1]
    t = _revolve(tyre, segments, closed=True)
    prof = np.array([(0.025, h * 0.75), (0.07, h * 0.7), (r_in * 0.55, h * 0.35), (r_in * 0.92, h * 0.55),
                     (r_in * 1.02, h * 0.8)])
    rim = _revolve(prof, segments + 8, closed=False)
    if spokes:
        v = rim.vertices.astype(np.float64)
        ang = np.arctan2(v[:, 2], v[:, 1])
        mid = (np.hypot(v[:, 1], v[:, 2]) > 0.1 * r_in) & (np.hypot(v[:, 1], v[:, 2]) < 0.9 * r_in)
        v[mid, 0] -= 0.035 * np.clip(np.cos(spokes * ang[mid]) * -1.6 + 0.2, 0, 1)
        rim = Mesh(v.astype(np.float32), rim.faces, True)
    return t, rim


def _wheels(positions: Sequence[tuple[float, float, float]], radius: float, width: float, rim_frac: float,
            spokes: int, dual: Sequence[bool] = ()) -> tuple[Mesh, Mesh]:
    """Tyres and rims at (x, y, z) positions (x > 0: the right side; mirrored for x < 0); ``dual[i]`` adds a
    second tyre inboard (truck rear axles)."""
    tyre, rim = _wheel(radius, width, rim_frac, spokes)
    tyres, rims = [], []
    for i, (x, y, z) in enumerate(positions):
        left = x < 0
        tyres.append(_move(tyre, (x, y, z), mirror_x=left))
        rims.append(_move(rim, (x, y, z), mirror_x=left))
        if i < len(dual) and dual[i]:
            tyres.append(_move(tyre, (x - np.sign(x) * (width + 0.03), y, z), mirror_x=left))
    return _merge(tyres), _merge(rims)


def _arch_liners(body: _Body, depth: float) -> Mesh:
    """Dark half-tubes inside the wheel arches, so an arch shows a wheel well, not the body's colour."""
    p = body.profile
    liners = []
    for dw, zw, ra in p.wheels:
        prof = np.array([(ra - 0.01, -depth / 2), (ra - 0.01, depth / 2)])
        half = _revolve(prof, 8, closed=False, arc=(0.0, np.pi))
        for side in (1.0, -1.0):
            x = side * (p.half_width - depth / 2 - 0.005)
            liners.append(_move(half, (x, p.y_front - dw, zw), mirror_x=side < 0))
    return _merge(liners)


# ------------------------------------------------------------------------------------------------ car bodies
_WHEEL_WIDTH = {"sedan": 0.2, "hatchback": 0.19, "suv": 0.23, "van": 0.2}


@dataclass
class _Layout:
    """Where lights, grille and plates sit on the front and rear faces."""

    head: tuple[float, float, float, float]  # head lights (|x| centre, z centre, width, height)
    tail: tuple[float, float, float, float]  # tail lights, likewise
    plates: tuple[float, float]  # (front, rear) plate centre heights
    grille: tuple[float, float, float]  # (z centre, width, height)
    rear_strip: tuple[float, float]  # dark bumper strip on the tail (z centre, height)


@dataclass
class _Car:
    """What the body of a car-like vehicle needs beyond its profile: glass and lights layout."""

    kind: str
    profile: _Profile
    ws: tuple[float, float]  # windscreen (d from, d to) on the roof cap
    rear: tuple[float, float] | None  # rear window on the roof cap, or None (a decal on the tail instead)
    side_glass: list[tuple[float, float]]  # side window spans (d from, d to)
    wheel_radius: float
    track_inset: float
    lay: _Layout
    doors: list[float] = field(default_factory=list)  # door seams (d)
    cladding: bool = False  # dark plastic sills between the arches
    mirrors: bool = True


def _face_layout(rng: np.random.Generator, hw: float, front: tuple[float, float], rear: tuple[float, float]
                 ) -> _Layout:
    """Lights, grille and plates stacked on the vertical front and rear faces, whose (bottom, top) heights
    are ``front`` and ``rear``: head lights just under the hood's edge, grille below, plate below that; tail
    lights at the top corners of the tail, plate between them or lower."""
    u = _sampler(rng)
    hh = u(0.08, 0.13)
    hz = front[1] - 0.02 - hh / 2
    gh = u(0.1, 0.16)
    gz = hz - hh / 2 - u(0.02, 0.05) - gh / 2
    pz_f = max(gz - gh / 2 - 0.03 - 0.06, front[0] + 0.1)
    th = u(0.09, 0.15)
    tz = rear[1] - 0.02 - th / 2
    pz_r = max(tz - u(0.0, 0.2), rear[0] + 0.16)
    return _Layout(head=(hw * u(0.6, 0.68), hz, u(0.32, 0.46), hh), tail=(hw * u(0.68, 0.76), tz, u(0.25, 0.38), th),
                   plates=(pz_f, pz_r), grille=(gz, hw * u(0.6, 0.95), gh), rear_strip=(rear[0] + 0.07, 0.08))


def _car(rng: np.random.Generator, kind: str) -> _Car:
    u = _sampler(rng)
    if kind == "sedan":
        length, width, height, r = u(4.4, 4.95), u(1.74, 1.88), u(1.38, 1.5), u(0.3, 0.335)
        clear, fo, ro, hood = u(0.13, 0.17), u(0.85, 1.0), u(0.95, 1.15), u(0.84, 0.94)
    elif kind == "hatchback":
        length, width, height, r = u(3.8, 4.35), u(1.68, 1.8), u(1.42, 1.55), u(0.29, 0.32)
        clear, fo, ro, hood = u(0.13, 0.16), u(0.75, 0.9), u(0.6, 0.8), u(0.86, 0.96)
    else:  # suv
        length, width, height, r = u(4.3, 4.9), u(1.82, 1.98), u(1.62, 1.85), u(0.35, 0.385)
        clear, fo, ro, hood = u(0.18, 0.23), u(0.85, 1.0), u(0.85, 1.05), u(1.02, 1.14)
    hw = width / 2
    belt_f = hood + u(0.0, 0.04)
    belt_r = belt_f + u(0.04, 0.1)
    ws0 = fo + u(0.45, 0.7) if kind != "hatchback" else fo + u(0.3, 0.45)  # windscreen base (hood's end)
    ws_run = (height - hood) / np.tan(np.radians(u(27, 33) if kind != "suv" else u(31, 38)))
    r0 = ws0 + ws_run  # roof front
    edge = hood - u(0.05, 0.08)  # the hood's leading edge
    nose_z = edge - 0.03  # top of the vertical front face
    front_bottom = clear + u(0.12, 0.2)
    top = [(0.0, nose_z), (0.08, edge), (0.45, hood - 0.01), (ws0, hood + 0.05), (r0, height - 0.025)]
    if kind == "sedan":
        r1 = r0 + u(0.9, 1.1)
        rw1 = min(r1 + u(0.5, 0.65), length - 0.55)  # rear window base: the boot lid
        boot = belt_r + u(0.02, 0.06)
        tail_z = boot - 0.05
        top += [(0.5 * (r0 + r1), height), (r1, height - 0.03), (rw1, boot), (length - 0.08, boot - 0.01),
                (length, tail_z)]
        rear: tuple[float, float] | None = (r1 + 0.06, rw1 - 0.05)
        c_pillar = r1 - u(0.05, 0.15)
    else:
        r1 = length - (u(0.42, 0.55) if kind == "hatchback" else u(0.3, 0.4))
        hatch = length - (u(0.1, 0.16) if kind == "hatchback" else u(0.05, 0.09))
        hz = belt_r + u(0.02, 0.06)
        tail_z = hz - 0.1
        top += [(0.5 * (r0 + r1), height), (r1, height - 0.03), (hatch, hz), (length - 0.03, hz - 0.05),
                (length, tail_z)]
        rear = (r1 + 0.06, hatch - 0.04)
        c_pillar = r1 - u(0.2, 0.35)
    rear_bottom = clear + u(0.15, 0.25)
    bottom = [(0.0, front_bottom), (0.25, clear + 0.05), (0.7, clear), (length - 0.7, clear),
              (length - 0.3, clear + 0.05), (length, rear_bottom)]
    belt = [(0.0, belt_f - 0.05), (fo, belt_f), (length - ro, belt_r), (length, belt_r)]
    arch = r + u(0.04, 0.06)
    inset = u(0.06, 0.1)  # tyre's outer face inside the flank
    arch_depth = inset + _WHEEL_WIDTH[kind] + u(0.03, 0.06)  # the well holds the whole tyre
    profile = _Profile(length, hw, top, bottom, belt, tumble=u(0.3, 0.42), shoulder=u(0.02, 0.045),
                       bottom_radius=0.06, roof_radius=(u(0.1, 0.16), u(0.06, 0.1)), crown=u(0.025, 0.05),
                       bulge=u(0.005, 0.02), nose=(u(0.28, 0.4), u(2.2, 3.0)), tail=(u(0.22, 0.35), u(2.2, 3.0)),
                       wheels=[(fo, r, arch), (length - ro, r, arch)], arch_depth=arch_depth, spacing=0.15)
    b_pillar = 0.5 * (ws0 + c_pillar) + u(-0.1, 0.1)
    side_glass = [(ws0 + 0.05, b_pillar - 0.05), (b_pillar + 0.06, c_pillar)]
    lay = _face_layout(rng, hw, (front_bottom + 0.03, nose_z), (rear_bottom + 0.03, tail_z))
    rear_door_end = min(c_pillar + 0.05, length - ro - arch - 0.03)
    doors = [fo + arch + u(0.08, 0.15), b_pillar, rear_door_end]
    return _Car(kind, profile, (ws0 + 0.07, r0 - 0.05), rear, side_glass, r, inset, lay, doors,
                cladding=bool(rng.random() < (0.7 if kind == "suv" else 0.15)))


def _van(rng: np.random.Generator) -> tuple[_Car, bool]:
    """A delivery or passenger van: short hood, steep windscreen, one box to a vertical tail."""
    u = _sampler(rng)
    length, width, height, r = u(4.9, 5.6), u(1.95, 2.05), u(1.95, 2.5), u(0.34, 0.37)
    clear, fo, ro, hood = u(0.16, 0.2), u(0.85, 1.0), u(0.9, 1.25), u(1.02, 1.12)
    hw = width / 2
    ws0 = u(0.75, 0.95)
    r0 = ws0 + (height - hood) / np.tan(np.radians(u(48, 58)))
    edge = hood - u(0.05, 0.08)
    nose_z = edge - 0.03
    front_bottom = clear + u(0.12, 0.2)
    top = [(0.0, nose_z), (0.08, edge), (0.45, hood - 0.01), (ws0, hood + 0.05), (r0, height - 0.03),
           (r0 + 0.4, height), (length - 0.12, height), (length - 0.02, height - 0.05), (length, height - 0.1)]
    rear_bottom = clear + u(0.15, 0.22)
    bottom = [(0.0, front_bottom), (0.3, clear + 0.06), (0.7, clear), (length - 0.5, clear),
              (length - 0.15, clear + 0.08), (length, rear_bottom)]
    belt_z = hood + u(0.0, 0.05)
    belt = [(0.0, belt_z - 0.05), (fo, belt_z), (length, belt_z + 0.02)]
    arch = r + u(0.04, 0.06)
    profile = _Profile(length, hw, top, bottom, belt, tumble=u(0.08, 0.14), shoulder=u(0.01, 0.025),
                       bottom_radius=0.05, roof_radius=(u(0.12, 0.18), u(0.1, 0.15)), crown=u(0.02, 0.04),
                       bulge=0.01, nose=(u(0.3, 0.4), u(2.2, 2.8)), tail=(u(0.08, 0.14), u(3.0, 4.0)),
                       wheels=[(fo, r, arch), (length - ro, r, arch)], arch_depth=0.08 + _WHEEL_WIDTH["van"] + 0.05,
                       spacing=0.18)
    passenger = bool(rng.random() < 0.35)
    door = ws0 + u(0.9, 1.1)
    side_glass = [(ws0 + 0.05, door)]
    if passenger:
        panes = np.linspace(door + 0.12, length - 0.35, 3 + (length > 5.2))
        side_glass += [(float(a) + 0.05, float(b) - 0.05) for a, b in itertools.pairwise(panes)]
    lay = _face_layout(rng, hw, (front_bottom + 0.03, nose_z), (rear_bottom + 0.03, belt_z))
    lay.tail = (hw - 0.1, belt_z - u(0.1, 0.25), 0.13, u(0.3, 0.45))
    lay.plates = (lay.plates[0], rear_bottom + u(0.15, 0.25))
    car = _Car("van", profile, (ws0 + 0.07, r0 - 0.06), None, side_glass, r, 0.08, lay,
               [fo + arch + 0.08, door, door + 0.05 + u(0.9, 1.2)], cladding=bool(rng.random() < 0.5))
    return car, passenger


def _mirrors(body: _Body, d: float, z: float, size: tuple[float, float, float]) -> Mesh:
    sec, _, _ = _sections(body.profile, np.array([d]))
    x = float(np.interp(z, sec[0, 6:13, 1], sec[0, 6:13, 0])) + size[0] / 2 + 0.04
    y = float(body.y(d))
    arm = (0.06, 0.04, 0.03)
    return _merge([_qbox(size, (s * x, y, z), taper=0.85) for s in (1, -1)]
                  + [_qbox(arm, (s * (x - size[0] / 2 - 0.02), y, z - 0.02)) for s in (1, -1)])


def _car_parts(rng: np.random.Generator, k: MaterialKnobs, car: _Car, paint: Material, *,
               rear_decals: Sequence[tuple[float, float, float, float]] = ()) -> dict[str, Part]:
    """Body, glass, wheels, lights, plates, grille and mirrors of a car-like vehicle."""
    mats = _common_materials(rng)
    body = _loft(car.profile)
    p = car.profile
    glass: list[Mesh | None] = [_cap_patch(body, *car.ws, inset=0.035)]
    if car.rear is not None:
        glass.append(_cap_patch(body, *car.rear, inset=0.05))
    for a, b in car.side_glass:
        for side in (1.0, -1.0):
            glass.append(_side_patch(body, a, b, side))
    for cx, cz, w, h in rear_decals:
        glass.append(_decal(body.tris, "+y", (cx, cz), (w, h), (3, 2), offset=0.008))
    hx, hz, hwid, hh = car.lay.head
    tx, tz, twid, th = car.lay.tail
    head = [_decal(body.tris, "-y", (s * hx, hz), (hwid, hh), (3, 1)) for s in (1, -1)]
    tail = [_decal(body.tris, "+y", (s * tx, tz), (twid, th), (3, 1)) for s in (1, -1)]
    gz, gw, gh = car.lay.grille
    trim = [_decal(body.tris, "-y", (0.0, gz), (gw, gh), (6, 1), offset=0.008),
            _decal(body.tris, "+y", (0.0, car.lay.rear_strip[0]), (p.half_width * 1.4, car.lay.rear_strip[1]), (8, 1),
                   offset=0.008)]
    plate_w, plate_h = (0.52, 0.11) if rng.random() < 0.7 else (0.31, 0.155)
    plates = [_decal(body.tris, "-y", (0.0, car.lay.plates[0]), (plate_w, plate_h), (1, 1), offset=0.012, flat=True),
              _decal(body.tris, "+y", (0.0, car.lay.plates[1]), (plate_w, plate_h), (1, 1), offset=0.012, flat=True)]
    wheel_w = _WHEEL_WIDTH[car.kind]
    x_w = p.half_width - car.track_inset - wheel_w / 2
    pos = [(s * x_w, float(body.y(dw)), car.wheel_radius) for dw, _, _ in p.wheels for s in (1, -1)]
    tyres, rims = _wheels(pos, car.wheel_radius, wheel_w, 0.62 if car.kind != "van" else 0.58,
                          int(rng.choice([0, 5, 5, 6, 10])) if car.kind != "van" else int(rng.choice([0, 0, 5])))
    liners = _arch_liners(body, car.profile.arch_depth - 0.02)
    if car.mirrors:
        big = car.kind == "van"
        md = car.ws[0] + (0.05 if not big else 0.0)
        mz = float(p.f_belt(np.array([md]))[0]) + (0.1 if not big else 0.15)
        msize = (0.14, 0.09, 0.11) if not big else (0.18, 0.08, 0.28)
        trim.append(_mirrors(body, md, mz, msize))
    # Door seams (thin dark lines from the sill to the belt) and, on some, dark plastic sills.
    sill = float(p.f_bottom(np.array([p.length / 2]))[0])
    for d in car.doors:
        belt = float(p.f_belt(np.array([d]))[0])
        for side in (1.0, -1.0):
            trim.append(_side_patch(body, d - 0.004, d + 0.004, side, lo=sill + 0.1, hi=belt - 0.01, offset=0.003,
                                    rows=3, min_height=0.05))
    if car.cladding:
        (d_f, _, ra_f), (d_r, _, ra_r) = p.wheels[0], p.wheels[-1]
        for side in (1.0, -1.0):
            trim.append(_side_patch(body, d_f + ra_f + 0.02, d_r - ra_r - 0.02, side, lo=sill + 0.03,
                                    hi=sill + uniform(rng, (0.12, 0.2)), offset=0.004, rows=2))
    return {"body": Part(body.mesh, paint), "glass": Part(_merge(glass), mats["glass"]),
            "tyres": Part(_merge([tyres, liners]), mats["rubber"]), "rims": Part(rims, mats["rims"]),
            "head_lights": Part(_merge(head), mats["head_lights"]),
            "tail_lights": Part(_merge(tail), mats["tail_lights"]),
            "trim": Part(_merge(trim), mats["trim"]), "plates": Part(_merge(plates), mats["plates"])}


# ---------------------------------------------------------------------------------------------- box truck
def _truck(rng: np.random.Generator, k: MaterialKnobs) -> dict[str, Part]:
    """A box (delivery) truck: cab-over cab, chassis, cargo box, dual rear tyres."""
    u = _sampler(rng)
    mats = _common_materials(rng)
    mats["rims"] = Material((0.45, 0.45, 0.47), roughness=0.35, metallic=0.8)
    length, width, r = u(6.8, 8.2), u(2.4, 2.55), u(0.45, 0.5)
    hw = width / 2
    cab_len, cab_h, cab_hw = u(1.9, 2.3), u(2.75, 3.1), hw - u(0.02, 0.08)
    box_h = u(3.2, 3.6)
    fo = u(1.1, 1.3)
    rear_axle = length - u(1.5, 2.1)
    zw = r
    cab_z0 = u(0.42, 0.52)
    belt = u(1.55, 1.75)
    cab = _Profile(cab_len, cab_hw, [(0.0, cab_h - 0.2), (0.15, cab_h - 0.03), (0.35, cab_h), (cab_len, cab_h)],
                   [(0.0, cab_z0), (cab_len, cab_z0 + 0.1)], [(0.0, belt), (cab_len, belt)],
                   y_front=length / 2, tumble=0.04, shoulder=0.01, bottom_radius=0.04, roof_radius=(0.14, 0.12),
                   crown=0.02, bulge=0.005, nose=(u(0.16, 0.24), u(2.5, 3.5)), tail=(0.06, 4.0),
                   wheels=[(fo, zw, r + 0.06)], arch_depth=0.1 + 0.28 + 0.05, spacing=0.2)
    cab_body = _loft(cab)
    box_len = length - cab_len - 0.12
    box_z0 = 2 * r + u(0.12, 0.2)
    box = _Profile(box_len, hw, [(0.0, box_h), (box_len, box_h)], [(0.0, box_z0), (box_len, box_z0)],
                   [(0.0, box_h - 0.05), (box_len, box_h - 0.05)], y_front=length / 2 - cab_len - 0.12,
                   tumble=0.0, shoulder=0.0, bottom_radius=0.03, roof_radius=(0.05, 0.05), crown=0.01, bulge=0.0,
                   nose=(0.05, 4.0), tail=(0.04, 4.0), spacing=1.0, smooth=0.0)
    box_body = _loft(box)
    cab_paint = (car_paint(rng, k)[1] if rng.random() < 0.3 else _livery(rng, k)[1])
    box_kind = rng.random()
    if box_kind < 0.55:
        box_mat = Material(jitter_color(rng, (0.78, 0.78, 0.77), _neutral_knobs(k)), roughness=u(0.3, 0.5))
    elif box_kind < 0.8:
        box_mat = Material(jitter_color(rng, (0.5, 0.51, 0.52), _neutral_knobs(k)), roughness=u(0.3, 0.45),
                           metallic=u(0.6, 0.9))
    else:
        box_mat = _livery(rng, k)[1]
    y_front = length / 2
    # Glass: windscreen on the flat front, side windows of the doors.
    glass = [_decal(cab_body.tris, "-y", (0.0, 0.5 * (belt + 0.08 + cab_h - 0.3)), (2 * cab_hw * 0.86,
                                                                                     cab_h - 0.3 - belt - 0.08),
                    (5, 3), offset=0.008)]
    for side in (1.0, -1.0):
        glass.append(_side_patch(cab_body, 0.25, cab_len - 0.35, side, margin=(0.05, 0.08)))
    head = [_decal(cab_body.tris, "-y", (s * (cab_hw - 0.3), cab_z0 + 0.33), (0.34, 0.15), (2, 1))
            for s in (1, -1)]
    trim = [_decal(cab_body.tris, "-y", (0.0, cab_z0 + u(0.5, 0.65)), (cab_hw * u(0.8, 1.1), u(0.25, 0.4)), (5, 1),
                   offset=0.008),
            _decal(cab_body.tris, "-y", (0.0, cab_z0 + 0.12), (2 * cab_hw * 0.97, 0.2), (8, 1), offset=0.008),
            _mirrors(cab_body, 0.12, belt + 0.25, (0.22, 0.08, 0.38))]
    # Chassis: rails, side guards, rear under-run bar, mud flaps, fuel tank.
    y_box_rear = -length / 2
    rails = [_qbox((0.1, length - 0.6, 0.25), (s * 0.45, 0.2, box_z0 - 0.14)) for s in (1, -1)]
    guards = [_qbox((0.04, rear_axle - fo - 2 * r - 0.4, 0.08), (s * (hw - 0.08), y_front - 0.5 * (fo + rear_axle),
                                                                    zz))
              for s in (1, -1) for zz in (0.55, 0.8)]
    bar = [_qbox((width - 0.25, 0.12, 0.14), (0.0, y_box_rear + 0.15, 0.55))]
    flaps = [_qbox((0.5, 0.02, 0.45), (s * (hw - 0.3), y_front - rear_axle - r - 0.2, 0.45)) for s in (1, -1)]
    tank = [_qbox((0.35, 0.9, 0.45), (-(hw - 0.3), y_front - fo - r - 0.7, 0.75))]
    trim += rails + guards + bar + flaps
    tail = [_qbox((0.22, 0.03, 0.1), (s * (hw - 0.3), y_box_rear + 0.2, 0.55)) for s in (1, -1)]
    plate_w, plate_h = (0.52, 0.11)
    plates = [_decal(cab_body.tris, "-y", (0.0, cab_z0 + 0.3), (plate_w, plate_h), (1, 1), offset=0.012, flat=True),
              _qbox((plate_w, 0.01, plate_h), (0.0, y_box_rear + 0.21, 0.55))]
    # Rear doors: two seams and hinges as dark strips on the box's back.
    doors = [_decal(box_body.tris, "+y", (xx, 0.5 * (box_z0 + box_h)), (0.04, box_h - box_z0 - 0.15), (1, 1),
                    offset=0.005) for xx in (0.0, hw - 0.12, -(hw - 0.12))]
    trim += doors
    x_w = hw - 0.12 - 0.15
    tyres, rims = _wheels([(s * (cab_hw - 0.1 - 0.14), y_front - fo, zw) for s in (1, -1)]
                          + [(s * x_w, y_front - rear_axle, zw) for s in (1, -1)], r, 0.28, 0.55, 0,
                          dual=[False, False, True, True])
    liners = _arch_liners(cab_body, cab.arch_depth - 0.02)
    parts = {"body": Part(cab_body.mesh, cab_paint), "cargo_box": Part(box_body.mesh, box_mat),
             "glass": Part(_merge(glass), mats["glass"]), "tyres": Part(_merge([tyres, liners]), mats["rubber"]),
             "rims": Part(rims, mats["rims"]), "head_lights": Part(_merge(head), mats["head_lights"]),
             "tail_lights": Part(_merge(tail), mats["tail_lights"]), "trim": Part(_merge(trim), mats["trim"]),
             "plates": Part(_merge(plates), mats["plates"]),
             "tank": Part(_merge(tank), Material((0.5, 0.5, 0.52), roughness=0.3, metallic=0.9))}
    if rng.random() < 0.5:  # a coloured band along the box
        band_mat = _livery(rng, k, exclude="white")[1]
        z_a = u(box_z0 + 0.3, box_h - 1.0)
        bands = [_side_patch(box_body, 0.1, box_len - 0.1, s, lo=z_a, hi=z_a + u(0.25, 0.7), offset=0.005)
                 for s in (1.0, -1.0)]
        parts["livery"] = Part(_merge(bands), band_mat)
    return parts


# ---------------------------------------------------------------------------------------------------- bus
def _bus(rng: np.random.Generator, k: MaterialKnobs) -> dict[str, Part]:
    """A city bus: one long box with a rounded roof, window band, doors on the right, wrap-around windscreen."""
    u = _sampler(rng)
    mats = _common_materials(rng)
    mats["rims"] = Material((0.5, 0.5, 0.52), roughness=0.35, metallic=0.8)
    length, width, height, r = u(10.5, 12.2), u(2.5, 2.55), u(2.9, 3.15), u(0.48, 0.5)
    hw = width / 2
    fo, ro = u(2.5, 2.8), u(3.0, 3.6)
    z0 = u(0.3, 0.36)
    belt = u(1.05, 1.2)
    top = [(0.0, height - 0.25), (0.1, height - 0.06), (0.3, height), (length - 0.3, height),
           (length - 0.1, height - 0.06), (length, height - 0.22)]
    bottom = [(0.0, z0 + 0.05), (0.25, z0), (length - 0.25, z0), (length, z0 + 0.1)]
    profile = _Profile(length, hw, top, bottom, [(0.0, belt), (length, belt)], tumble=0.03, shoulder=0.01,
                       bottom_radius=0.05, roof_radius=(u(0.2, 0.3), u(0.18, 0.25)), crown=0.03, bulge=0.005,
                       nose=(u(0.22, 0.3), u(2.5, 3.2)), tail=(u(0.2, 0.28), u(2.5, 3.2)),
                       wheels=[(fo, r, r + 0.06), (length - ro, r, r + 0.06)], arch_depth=0.14 + 0.3 + 0.05,
                       spacing=0.5,
                       smooth=0.03)
    body = _loft(profile)
    name, paint = _livery(rng, k)
    glass: list[Mesh | None] = []
    zc_mid = float(_sections(profile, np.array([length / 2]))[2][0])
    win_lo, win_hi = belt + u(0.04, 0.1), zc_mid - u(0.06, 0.15)
    doors = [(0.3, 1.45), (float(u(0.45, 0.55) * length), 0.0)]
    doors[1] = (doors[1][0], doors[1][0] + 1.25)
    band = rng.random() < 0.5  # one continuous dark band (pillars behind glass) or separate panes
    for side in (1.0, -1.0):
        spans: list[tuple[float, float]] = []
        start = 1.5 if side > 0 else 0.3
        stops = ([d for d in doors if d[0] > start] if side > 0 else []) + [(length - 0.45, length)]
        a = start
        for d0, d1 in stops:
            if d0 - a > 0.4:
                if band:
                    spans.append((a + 0.05, d0 - 0.05))
                else:
                    n = max(1, round((d0 - a) / u(1.2, 1.5)))
                    edges = np.linspace(a, d0, n + 1)
                    spans += [(float(e0) + 0.06, float(e1) - 0.06) for e0, e1 in itertools.pairwise(edges)]
            a = d1
        for a0, a1 in spans:
            glass.append(_side_patch(body, a0, a1, side, lo=win_lo, hi=win_hi))
        if side > 0:  # door glass, nearly full height
            for d0, d1 in doors:
                glass.append(_side_patch(body, d0 + 0.04, d1 - 0.04, side, lo=z0 + 0.3, hi=win_hi, rows=4))
    ws_lo = u(0.85, 1.05)
    ws_hi = height - u(0.4, 0.5)
    glass.append(_decal(body.tris, "-y", (0.0, 0.5 * (ws_lo + ws_hi)), (2 * hw * 0.94, ws_hi - ws_lo), (6, 3)))
    if rng.random() < 0.6:
        glass.append(_decal(body.tris, "+y", (0.0, 0.5 * (1.9 + height - 0.35)), (2 * hw * 0.8,
                                                                                   height - 0.35 - 1.9), (5, 2)))
    sign = [_decal(body.tris, "-y", (0.0, height - 0.26), (2 * hw * 0.7, 0.2), (4, 1), offset=0.012)]
    head = [_decal(body.tris, "-y", (s * (hw - 0.3), z0 + 0.28), (0.34, 0.14), (2, 1)) for s in (1, -1)]
    tail = [_decal(body.tris, "+y", (s * (hw - 0.12), z0 + 0.6), (0.16, 0.45), (1, 2)) for s in (1, -1)]
    trim = [_decal(body.tris, "-y", (0.0, z0 + 0.12), (2 * hw * 0.9, 0.2), (6, 1), offset=0.006),
            _decal(body.tris, "+y", (0.0, z0 + 0.12), (2 * hw * 0.9, 0.2), (6, 1), offset=0.006),
            _merge([_qbox((0.16, 0.07, 0.35), (s * (hw + 0.06), length / 2 + 0.12, height - 0.7))
                    for s in (1, -1)]),
            _merge([_tube((s * (hw - 0.05), length / 2 - 0.05, height - 0.35),
                          (s * (hw + 0.06), length / 2 + 0.12, height - 0.52), 0.02, 4) for s in (1, -1)])]
    roof_unit = _qbox((width * u(0.6, 0.75), u(2.0, 3.2), u(0.18, 0.28)), (0.0, u(-1.0, 2.0), height + 0.1),
                      taper=0.9)
    plates = [_decal(body.tris, "-y", (0.0, z0 + 0.35), (0.52, 0.11), (1, 1), offset=0.012, flat=True),
              _decal(body.tris, "+y", (0.0, z0 + 0.45), (0.52, 0.11), (1, 1), offset=0.012, flat=True)]
    tyres, rims = _wheels([(s * (hw - 0.14 - 0.15), float(body.y(dw)), r) for dw, _, _ in profile.wheels
                           for s in (1, -1)], r, 0.3, 0.55, 0)
    liners = _arch_liners(body, profile.arch_depth - 0.02)
    parts = {"body": Part(body.mesh, paint), "glass": Part(_merge(glass), mats["glass"]),
             "tyres": Part(_merge([tyres, liners]), mats["rubber"]), "rims": Part(rims, mats["rims"]),
             "head_lights": Part(_merge(head), mats["head_lights"]),
             "tail_lights": Part(_merge(tail), mats["tail_lights"]), "trim": Part(_merge(trim), mats["trim"]),
             "plates": Part(_merge(plates), mats["plates"]),
             "roof_unit": Part(roof_unit, Material((0.55, 0.56, 0.57), roughness=0.5)),
             "destination": Part(_merge(sign), Material((1.0, 0.45, 0.05), shader="emission",
                                                        emission=uniform(rng, (1.0, 3.0))))}
    if rng.random() < 0.6:  # livery: a band of a second colour along the skirt or under the windows
        band_mat = _livery(rng, k, exclude=name)[1]
        lo = z0 + 0.05 if rng.random() < 0.5 else belt - 0.35
        bands = [_side_patch(body, 0.3, length - 0.3, s, lo=lo, hi=lo + u(0.2, 0.35), offset=0.004, rows=2)
                 for s in (1.0, -1.0)]
        parts["livery"] = Part(_merge(bands), band_mat)
    return parts


# ----------------------------------------------------------------------------------------------- public API
def sample_vehicle_kind(rng: np.random.Generator) -> str:
    """One kind of :data:`VEHICLE_KINDS` with the urban shares of :data:`KIND_WEIGHTS`."""
    return VEHICLE_KINDS[_choice(rng, KIND_WEIGHTS)]


def sample_vehicle_parts(rng: np.random.Generator, k: MaterialKnobs, kind: str | None = None
                         ) -> tuple[str, dict[str, Part]]:
    """A vehicle's kind and its parts by role ("body", "glass", "tyres", "rims", "head_lights",
    "tail_lights", "trim", "plates", and per kind "cargo_box", "livery", ...); see :func:`sample_vehicle`."""
    if kind is None:
        kind = sample_vehicle_kind(rng)
    if kind not in VEHICLE_KINDS:
        raise ValueError(f"vehicle kind must be one of {list(VEHICLE_KINDS)}, got {kind!r}")
    if kind == "truck":
        return kind, _truck(rng, k)
    if kind == "bus":
        return kind, _bus(rng, k)
    if kind == "van":
        car, passenger = _van(rng)
        paint = car_paint(rng, k)[1] if passenger or rng.random() < 0.4 else \
            Material(jitter_color(rng, (0.8, 0.8, 0.79), _neutral_knobs(k)), roughness=uniform(rng, (0.2, 0.4)),
                     metallic=uniform(rng, (0.0, 0.3)))
        return kind, _car_parts(rng, k, car, paint, rear_decals=[
            (s * car.profile.half_width * 0.45, car.profile.f_top(np.array([car.profile.length]))[0] - 0.45,
             car.profile.half_width * 0.7, 0.45) for s in (1, -1)])
    car = _car(rng, kind)
    return kind, _car_parts(rng, k, car, car_paint(rng, k)[1])


def sample_vehicle(rng: np.random.Generator, k: MaterialKnobs, kind: str | None = None) -> list[Part]:
    """A vehicle (class ``vehicle``) in object-local coordinates: origin at the footprint's centre on the
    ground (tyres touch z = 0), length along y, front towards +y.

    Args:
        rng: The scene's generator (all draws come from it: deterministic per seed).
        k: The family's material knobs (colour jitter).
        kind: One of :data:`VEHICLE_KINDS`; ``None`` draws one with the shares of :data:`KIND_WEIGHTS`.

    Returns:
        Its parts: painted body (a lofted, smooth quad mesh), glass, tyres and wheel-arch liners, rims, head
        and tail lights, dark trim (grille, mirrors, bumper strips, chassis), number plates, and per kind a cargo
        box, a livery band, a roof unit or a destination display. Faces (200 seeds each): cars and vans
        2.5-2.85k, box trucks 2.45-2.6k, buses 2.6-3k; 8-11 parts.
    """
    return list(sample_vehicle_parts(rng, k, kind)[1].values())


def sample_bicycle(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    """A bicycle without a rider (class ``vehicle``): diamond frame of tubes, fork, two wheels with tyres, rims
    and spokes, handlebar, saddle, cranks; upright, wheels touching z = 0, front towards +y."""
    u = _sampler(rng)
    r = u(0.31, 0.35)  # wheel radius incl. tyre
    wb = u(0.98, 1.08)
    tyre_r = u(0.014, 0.024)
    yr, yf = -wb / 2, wb / 2
    axle = r
    bb = np.array([0.0, yr + u(0.4, 0.44), axle - u(0.04, 0.08)])  # bottom bracket
    seat_h = u(0.5, 0.6)
    seat_ang = np.radians(u(16, 20))
    st_top = bb + seat_h * np.array([0.0, -np.sin(seat_ang), np.cos(seat_ang)])
    head_top = np.array([0.0, yf - u(0.18, 0.22), st_top[2] + u(-0.05, 0.04)])
    head_bot = head_top + np.array([0.0, 0.05, -u(0.13, 0.18)])
    fr, fr2 = u(0.016, 0.024), 0.011
    rear_hub, front_hub = np.array([0.0, yr, axle]), np.array([0.0, yf, axle])
    tubes = [(bb, st_top, fr), (st_top, head_top, fr * 0.9), (bb, head_bot, fr * 1.1), (head_bot, head_top, fr * 1.2)]
    for s in (1, -1):
        off = np.array([s * 0.05, 0, 0])
        tubes += [(bb + off * 0.6, rear_hub + off, fr2), (st_top - np.array([0, 0, 0.03]), rear_hub + off, fr2 * 0.9),
                  (head_bot + off * 0.5, front_hub + off, fr2 * 1.2)]
    saddle_post_top = st_top + 0.16 * (st_top - bb) / np.linalg.norm(st_top - bb)
    stem_top = head_top + np.array([0.0, -0.02, u(0.05, 0.12)])
    bar_w = u(0.26, 0.32)
    tubes += [(st_top, saddle_post_top, fr * 0.8), (head_top, stem_top, fr),
              (stem_top + np.array([-bar_w, -0.05, 0]), stem_top + np.array([bar_w, -0.05, 0]), 0.012),
              (stem_top + np.array([-bar_w, -0.05, 0]), stem_top + np.array([-bar_w - 0.01, -0.12, -0.02]), 0.014),
              (stem_top + np.array([bar_w, -0.05, 0]), stem_top + np.array([bar_w + 0.01, -0.12, -0.02]), 0.014)]
    crank_ang = rng.uniform(0, 2 * np.pi)
    crank = 0.17 * np.array([0.0, np.cos(crank_ang), np.sin(crank_ang)])
    metal = []
    for s in (1, -1):
        pedal = bb + s * crank + np.array([s * 0.09, 0, 0])
        metal += [_tube(bb + np.array([s * 0.07, 0, 0]), pedal, 0.01, 4),
                  _qbox((0.09, 0.07, 0.02), pedal + np.array([s * 0.05, 0, 0]))]
    frame = _merge([_tube(a, b, rad) for a, b, rad in tubes[:-3]])
    grips = _merge([_tube(a, b, rad) for a, b, rad in tubes[-3:]])
    saddle = _qbox((0.15, 0.27, 0.06), saddle_post_top + np.array([0, -0.02, 0.03]), taper=0.8)
    chainring = _revolve(np.array([(0.09, -0.005), (0.1, 0.0), (0.09, 0.005)]), 16, closed=True)
    metal.append(_move(chainring, bb + np.array([0.04, 0, 0])))
    tyres, rims, spokes = [], [], []
    tyre_prof = np.array([(r - tyre_r * (1 + np.cos(a)), tyre_r * np.sin(a))
                          for a in np.linspace(0, 2 * np.pi, 6, endpoint=False)])
    rim_prof = np.array([(r - 2 * tyre_r - 0.001, -0.01), (r - 2 * tyre_r - 0.02, 0.0), (r - 2 * tyre_r - 0.001, 0.01)])
    n_spokes = int(rng.choice([16, 20, 24]))
    for hub in (rear_hub, front_hub):
        tyres.append(_move(_revolve(tyre_prof, 28, closed=True), hub))
        rims.append(_move(_revolve(rim_prof, 28, closed=True), hub))
        for i in range(n_spokes):
            a = 2 * np.pi * i / n_spokes
            s = 1 if i % 2 else -1
            spokes.append(_tube(hub + np.array([s * 0.03, 0, 0]),
                                hub + (r - 2 * tyre_r - 0.02) * np.array([0, np.cos(a), np.sin(a)]), 0.0015, 3))
        metal.append(_tube(hub - np.array([0.05, 0, 0]), hub + np.array([0.05, 0, 0]), 0.015, 6))
    frame_rgb = [(0.02, 0.02, 0.02), (0.7, 0.7, 0.68), (0.4, 0.02, 0.02), (0.02, 0.06, 0.3), (0.05, 0.2, 0.06),
                 (0.4, 0.4, 0.42), (0.6, 0.35, 0.02)][_choice(rng, [0.3, 0.15, 0.15, 0.15, 0.08, 0.1, 0.07])]
    paint = Material(jitter_color(rng, frame_rgb, _neutral_knobs(k)), roughness=u(0.2, 0.5), metallic=u(0.0, 0.6))
    steel = Material((0.55, 0.55, 0.57), roughness=0.3, metallic=1.0)
    black = Material((0.02, 0.02, 0.02), roughness=u(0.6, 0.9))
    return [Part(frame, paint), Part(_merge([*tyres, grips, saddle]), black),
            Part(_merge(rims + metal + spokes), steel)]
