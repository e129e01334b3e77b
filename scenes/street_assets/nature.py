"""Trees and bushes of the ``street`` family (class ``vegetation``): plain NumPy meshes, no Blender.

A leafy tree is a tapered trunk, a few branches and several irregular foliage clusters (not one ball); a bare
tree is a trunk with recursively forking branches. Crowns never reach further than ``max_reach`` from the
trunk axis: crowns that would are squeezed radially (``squeeze_reach``), so a tree fits where the layout
measured room for it. Every mesh here is triangles. The small geometry helpers (``tube``, ``squeeze_reach``)
are shared with ``furniture``.
"""

from __future__ import annotations

import numpy as np

from scenes import geometry as g
from scenes.randomization import MaterialKnobs, jitter_color, uniform
from scenes.spec import FloatArray, Material, Mesh, Part, Vec3, vec3

# g.blob(rng, r, irregularity, octaves=3) reaches at most r * (1 + irregularity * (1 + 1/2 + 1/3)).
HARMONIC_SUM = 1 + 1 / 2 + 1 / 3
LEAF_GREENS: list[Vec3] = [(0.05, 0.12, 0.02), (0.07, 0.15, 0.03), (0.035, 0.08, 0.025), (0.1, 0.17, 0.03),
                           (0.045, 0.1, 0.04)]
LEAF_AUTUMN: list[Vec3] = [(0.26, 0.1, 0.015), (0.32, 0.2, 0.02), (0.18, 0.04, 0.015), (0.22, 0.16, 0.03)]
BARK: list[Vec3] = [(0.07, 0.055, 0.04), (0.11, 0.09, 0.07), (0.05, 0.04, 0.035), (0.14, 0.12, 0.09)]


def pick(rng: np.random.Generator, palette: list[Vec3]) -> Vec3:
    return palette[int(rng.integers(len(palette)))]


def tube(p0: FloatArray | Vec3, p1: FloatArray | Vec3, r0: float, r1: float, segments: int = 6,
         cap_bottom: bool = False) -> Mesh:
    """A tapered cylinder from point ``p0`` (radius ``r0``) to ``p1`` (radius ``r1``), top capped.

    Faces: ``2 * segments`` sides + ``segments`` per cap.
    """
    a, b = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    d = b - a
    length = float(np.linalg.norm(d))
    z = d / max(length, 1e-9)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    mesh = g.lathe([r0, r1], [0.0, length], segments, cap_bottom=cap_bottom, cap_top=True)
    return g.transform(mesh, a, rotation=np.column_stack([x, y, z]))


def reach(parts: list[Part] | list[Mesh]) -> float:
    """Largest horizontal distance of any vertex from the z axis."""
    meshes = [p.mesh if isinstance(p, Part) else p for p in parts]
    return float(max(np.linalg.norm(m.vertices[:, :2], axis=1).max() for m in meshes))


def squeeze_reach(meshes: list[Mesh], max_reach: float) -> list[Mesh]:
    """Scale the meshes' x/y about the z axis so that none reaches beyond ``max_reach`` (no-op if none does)."""
    current = reach(meshes)
    if not np.isfinite(max_reach) or current <= max_reach:
        return meshes
    f = max_reach / current * (1 - 1e-4)
    return [Mesh((m.vertices * np.array([f, f, 1.0])).astype(np.float32), m.faces, m.smooth) for m in meshes]


def _lumpy_blob(rng: np.random.Generator, radius: float, irregularity: float = 0.25, rings: int = 7,
                segments: int = 12, lumps: float = 0.12) -> Mesh:
    """``g.blob`` with a little per-vertex radial noise (a leafy, not balloon-like, outline); still star-shaped.
    Reaches at most ``radius * (1 + irregularity * HARMONIC_SUM) * (1 + lumps)``."""
    b = g.blob(rng, radius, irregularity, rings, segments)
    f = 1 + rng.uniform(-lumps, lumps, size=(len(b.vertices), 1))
    return Mesh((b.vertices * f).astype(np.float32), b.faces, smooth=True)


def foliage_material(rng: np.random.Generator, k: MaterialKnobs, autumn: bool | None = None) -> Material:
    """Greens (sometimes autumn colours) with a voronoi or noise texture of leaf clumps and bump."""
    if autumn is None:
        autumn = bool(rng.random() < 0.15)
    color = jitter_color(rng, pick(rng, LEAF_AUTUMN if autumn else LEAF_GREENS), k)
    dark = vec3(c * rng.uniform(0.3, 0.55) for c in color)
    return Material(color, roughness=uniform(rng, (0.6, 0.85)), texture="voronoi" if rng.random() < 0.7 else "noise",
                    color2=dark, texture_scale=uniform(rng, (5.0, 12.0)), texture_w=float(rng.uniform(0, 100)),
                    texture_detail=4.0, bump=uniform(rng, (0.5, 0.9)))


def bark_material(rng: np.random.Generator, k: MaterialKnobs) -> Material:
    color = jitter_color(rng, pick(rng, BARK), k)
    if rng.random() < 0.25:  # plane-tree bark: light patches
        return Material(color, roughness=0.85, texture="voronoi", color2=vec3(min(1.0, c * 2.5) for c in color),
                        texture_scale=uniform(rng, (3.0, 6.0)), texture_w=float(rng.uniform(0, 100)), bump=0.3)
    return Material(color, roughness=0.9, texture="noise", color2=vec3(c * 0.5 for c in color),
                    texture_scale=uniform(rng, (8.0, 20.0)), texture_w=float(rng.uniform(0, 100)),
                    texture_detail=6.0, bump=uniform(rng, (0.4, 0.7)))


def sample_tree(rng: np.random.Generator, k: MaterialKnobs, max_reach: float = np.inf,
                leafy: bool | None = None) -> list[Part]:
    """A leafy (trunk, branches, foliage clusters) or bare (recursive branches) street tree.

    Args:
        rng: Random generator.
        k: Material knobs (colour jitter).
        max_reach: No vertex of the crown lies further than this from the trunk axis (narrow sidewalks get
            small, squeezed crowns); the trunk itself is thinned to fit if it must.
        leafy: Leafy or bare; ``None`` draws (3 in 4 leafy).

    Returns:
        ``[trunk and branches, foliage]`` parts (bare trees: one part), at most ~3k faces.
    """
    if leafy is None:
        leafy = bool(rng.random() < 0.75)
    return _leafy_tree(rng, k, max_reach) if leafy else _bare_tree(rng, k, max_reach)


def _leafy_tree(rng: np.random.Generator, k: MaterialKnobs, max_reach: float) -> list[Part]:
    blob_reach = (1 + 0.25 * HARMONIC_SUM) * 1.12  # a typical cluster's reach / radius
    cap = max(max_reach / 1.6, 0.3)  # the crown radius the old _tree chose under max_reach, roughly
    crown_r = uniform(rng, (min(0.9, cap), min(3.0, cap)))
    trunk_h = uniform(rng, (1.8, 3.5))
    stretch = uniform(rng, (0.8, 1.5))  # crown height / width
    trunk_r = min(uniform(rng, (0.08, 0.12)) + 0.04 * crown_r, max(max_reach * 0.5, 0.03))
    crown_z = trunk_h + crown_r * stretch * 0.85  # centre of the crown
    wood = [g.lathe([trunk_r * 1.25, trunk_r, trunk_r * 0.55], [0.0, 0.4, crown_z], 10, cap_bottom=False)]
    foliage = [g.transform(_lumpy_blob(rng, crown_r * 0.55), (0, 0, crown_z), scale=(1, 1, stretch))]
    n_branches = int(rng.integers(3, 6))
    for i in range(n_branches):
        az = 2 * np.pi * (i + rng.uniform(-0.25, 0.25)) / n_branches
        z0 = trunk_h + rng.uniform(-0.2, 0.4) * crown_r * stretch
        dist = crown_r * rng.uniform(0.45, 0.7)
        end = np.array([dist * np.cos(az), dist * np.sin(az),
                        crown_z + rng.uniform(-0.3, 0.5) * crown_r * stretch])
        wood.append(tube((0.0, 0.0, z0), end, trunk_r * 0.5, trunk_r * 0.2, 6))
        r = crown_r * rng.uniform(0.38, 0.5)
        foliage.append(g.transform(_lumpy_blob(rng, r), end, rotation_z=float(rng.uniform(0, 2 * np.pi)),
                                   scale=(1, 1, rng.uniform(0.75, 1.0) * stretch)))
    for _ in range(int(rng.integers(12, 22))):  # small clusters on the crown's shell break up its outline
        az, el = rng.uniform(0, 2 * np.pi), rng.uniform(-0.6, 1.3)
        dist = crown_r * rng.uniform(0.55, 0.8)
        c = (dist * np.cos(az) * np.cos(el), dist * np.sin(az) * np.cos(el),
             crown_z + dist * np.sin(el) * stretch)
        foliage.append(g.transform(_lumpy_blob(rng, crown_r * rng.uniform(0.18, 0.3), 0.3, 5, 8, 0.06), c,
                                   rotation_z=float(rng.uniform(0, 2 * np.pi)), scale=(1, 1, stretch * 0.9)))
    # Keep the crown inside a circle of about crown_r * blob_reach, then inside max_reach.
    foliage = squeeze_reach(foliage, crown_r * blob_reach)
    meshes = squeeze_reach(wood + foliage, max_reach)
    wood, foliage = meshes[:len(wood)], meshes[len(wood):]
    return [Part(g.merge(wood), bark_material(rng, k)), Part(g.merge(foliage), foliage_material(rng, k))]


def _bare_tree(rng: np.random.Generator, k: MaterialKnobs, max_reach: float) -> list[Part]:
    height = uniform(rng, (4.0, 9.0))
    trunk_h = height * uniform(rng, (0.3, 0.45))
    trunk_r = uniform(rng, (0.08, 0.1)) + 0.015 * height
    wood: list[Mesh] = [g.lathe([trunk_r * 1.25, trunk_r, trunk_r * 0.75], [0.0, 0.3, trunk_h], 8,
                                cap_bottom=False)]
    budget = [2600 - len(wood[0].faces)]

    def grow(p0: FloatArray, direction: FloatArray, length: float, radius: float, depth: int) -> None:
        segments = 6 if radius > 0.04 else 4
        if budget[0] < 3 * segments:
            return
        p1 = p0 + direction * length
        wood.append(tube(p0, p1, radius, radius * 0.7, segments))
        budget[0] -= 3 * segments
        if depth == 0:
            return
        for _ in range(int(rng.integers(2, 4))):
            axis = rng.normal(size=3)
            axis -= axis @ direction * direction
            axis /= max(float(np.linalg.norm(axis)), 1e-9)
            angle = rng.uniform(0.35, 0.8)
            d = direction * np.cos(angle) + np.cross(axis, direction) * np.sin(angle)
            d[2] += 0.25  # branches tend upwards
            d /= np.linalg.norm(d)
            start = p0 + (p1 - p0) * rng.uniform(0.7, 1.0)
            grow(start, d, length * rng.uniform(0.6, 0.8), radius * rng.uniform(0.55, 0.7), depth - 1)

    top = np.array([0.0, 0.0, trunk_h])
    n_limbs = int(rng.integers(2, 5))
    limb_len = (height - trunk_h) * 0.45
    for i in range(n_limbs):
        az = 2 * np.pi * (i + rng.uniform(-0.3, 0.3)) / n_limbs
        tilt = rng.uniform(0.3, 0.75)
        d = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])
        grow(top - np.array([0, 0, rng.uniform(0, 0.3)]), d, limb_len, trunk_r * 0.65, 3)
    wood = squeeze_reach(wood, max_reach)
    return [Part(g.merge(wood), bark_material(rng, k))]


def sample_bush(rng: np.random.Generator, k: MaterialKnobs, max_reach: float = 1.0) -> list[Part]:
    """A bush (a cluster of 3-7 foliage blobs) or a short hedge, flattened where it meets the ground.

    Args:
        rng: Random generator.
        k: Material knobs.
        max_reach: No vertex lies further than this from the origin's vertical axis.

    Returns:
        One foliage part (<= ~1.5k faces), standing on z=0.
    """
    size = min(uniform(rng, (0.5, 1.0)), max(max_reach, 0.2))
    hedge = rng.random() < 0.3
    blobs = []
    n = int(rng.integers(3, 8))
    for i in range(n):
        if hedge:
            c = (rng.uniform(-0.15, 0.15) * size, (i / max(n - 1, 1) - 0.5) * 1.6 * size, 0.0)
        else:
            az, dist = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.0, 0.6)
            c = (dist * np.cos(az), dist * np.sin(az), 0.0)
        r = size * rng.uniform(0.45, 0.7)
        b = g.transform(_lumpy_blob(rng, r, 0.2, 6, 10), (c[0], c[1], r * rng.uniform(0.3, 0.55)),
                        scale=(1, 1, rng.uniform(0.7, 1.0)))
        v = b.vertices.copy()
        v[:, 2] = np.maximum(v[:, 2], 0.0)  # flat underside on the ground
        blobs.append(Mesh(v, b.faces, True))
    blobs = squeeze_reach(blobs, max_reach)
    return [Part(g.merge(blobs), foliage_material(rng, k, autumn=bool(rng.random() < 0.1)))]
