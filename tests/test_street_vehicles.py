"""Street vehicles without Blender: determinism, standing on the ground, dimensions, orientation, mesh validity,
closed bodies, footprints, kind frequencies and polygon budgets."""

from __future__ import annotations

import numpy as np
import pytest

from scenes.randomization import MaterialKnobs
from scenes.spec import Mesh, Part, footprint_radius
from scenes.street_assets.vehicles import (
    CAR_PAINTS,
    KIND_WEIGHTS,
    VEHICLE_KINDS,
    car_paint,
    sample_bicycle,
    sample_vehicle,
    sample_vehicle_kind,
    sample_vehicle_parts,
)

K = MaterialKnobs()
SEEDS = range(4)
# (length, body width without mirrors (flanks bulge ~1 cm), height) ranges per kind, metres.
DIMS = {
    "sedan": ((4.3, 5.0), (1.7, 1.95), (1.35, 1.55)),
    "hatchback": ((3.7, 4.4), (1.65, 1.85), (1.38, 1.6)),
    "suv": ((4.2, 5.0), (1.8, 2.05), (1.6, 1.9)),
    "van": ((4.8, 5.7), (1.9, 2.1), (1.9, 2.55)),
    "truck": ((6.7, 8.3), (2.35, 2.6), (3.1, 3.7)),
    "bus": ((10.4, 12.3), (2.45, 2.6), (2.85, 3.45)),
}
BUDGET = {"sedan": 3000, "hatchback": 3000, "suv": 3000, "van": 3000, "truck": 3000, "bus": 4000}


def _all_vertices(parts: list[Part]) -> np.ndarray:
    return np.concatenate([p.mesh.vertices for p in parts]).astype(np.float64)


def _signed_volume(m: Mesh) -> float:
    v, f = m.vertices.astype(np.float64), m.faces
    tris = [(0, 1, 2), (0, 2, 3)] if f.shape[1] == 4 else [(0, 1, 2)]
    return float(sum(np.einsum("ij,ij->i", v[f[:, a]], np.cross(v[f[:, b]], v[f[:, c]])).sum() / 6
                     for a, b, c in tris))


def _edge_use(m: Mesh) -> np.ndarray:
    """How many faces use each undirected edge."""
    f = m.faces
    edges = np.stack([f, np.roll(f, -1, axis=1)], axis=-1).reshape(-1, 2)
    _, counts = np.unique(np.sort(edges, axis=1), axis=0, return_counts=True)
    return counts


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_deterministic_per_seed(kind: str):
    a = sample_vehicle(np.random.default_rng(7), K, kind)
    b = sample_vehicle(np.random.default_rng(7), K, kind)
    c = sample_vehicle(np.random.default_rng(8), K, kind)
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.mesh.vertices, pb.mesh.vertices)
        np.testing.assert_array_equal(pa.mesh.faces, pb.mesh.faces)
        assert pa.material == pb.material
    assert not np.array_equal(a[0].mesh.vertices, c[0].mesh.vertices)


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_valid_meshes_on_the_ground_within_budget(kind: str):
    for seed in SEEDS:
        _, named = sample_vehicle_parts(np.random.default_rng(seed), K, kind)
        parts = list(named.values())
        for name, part in named.items():
            m = part.mesh
            assert m.faces.ndim == 2 and m.faces.shape[1] in (3, 4), name  # one face size per mesh
            assert len(m.faces) > 0, name
            assert m.faces.min() >= 0 and m.faces.max() < len(m.vertices), name
            assert np.isfinite(m.vertices).all(), name
            assert (np.diff(np.sort(m.faces, axis=1), axis=1) > 0).all(), f"{name}: a face repeats a vertex"
        v = _all_vertices(parts)
        assert abs(v[:, 2].min()) < 0.01, "the lowest point is on the ground"
        tyres = named["tyres"].mesh.vertices
        assert abs(tyres[:, 2].min()) < 0.005, "the tyres touch the ground"
        body_min = named["body"].mesh.vertices[:, 2].min()
        assert 0.1 < body_min < 0.7, "the body floats above the ground on its wheels"
        assert sum(len(p.mesh.faces) for p in parts) <= BUDGET[kind]


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_realistic_dimensions_and_footprint(kind: str):
    (l0, l1), (w0, w1), (h0, h1) = DIMS[kind]
    for seed in SEEDS:
        _, named = sample_vehicle_parts(np.random.default_rng(seed), K, kind)
        parts = list(named.values())
        v = _all_vertices(parts)
        length, height = np.ptp(v[:, 1]), v[:, 2].max()
        body = named["body"].mesh.vertices
        width = np.ptp(body[:, 0]) if kind != "truck" else np.ptp(named["cargo_box"].mesh.vertices[:, 0])
        assert l0 <= length <= l1 + 0.2, f"length {length:.2f}"  # + plates, a bus's mirrors
        assert w0 <= width <= w1, f"width {width:.2f}"
        assert h0 <= height <= h1, f"height {height:.2f}"
        assert abs(body[:, 1].max() + body[:, 1].min()) < (0.1 if kind != "truck" else length), \
            "the origin is at the footprint's centre"
        assert abs(v[:, 1].max() + v[:, 1].min()) < 0.2
        # Mirrors stick out sideways: the footprint circle is a little wider than the body's half diagonal.
        r = footprint_radius(parts)
        assert length / 2 - 0.1 <= r <= float(np.hypot(length / 2 + 0.1, width / 2 + 0.35))
        assert np.ptp(v[:, 0]) <= width + 0.7, "mirrors reach at most 35 cm out"


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_front_is_plus_y(kind: str):
    for seed in SEEDS:
        _, named = sample_vehicle_parts(np.random.default_rng(seed), K, kind)
        head = named["head_lights"].mesh.vertices
        tail = named["tail_lights"].mesh.vertices
        assert head[:, 1].mean() > 0 > tail[:, 1].mean()
        y_max = named["body"].mesh.vertices[:, 1].max()
        assert head[:, 1].max() > y_max - 0.1, "head lights sit on the front face"
        glass = named["glass"].mesh.vertices
        # The windscreen is the glass nearest the front, and it sits higher than the head lights.
        front_glass = glass[glass[:, 1] > glass[:, 1].max() - 0.3]
        assert front_glass[:, 2].mean() > head[:, 2].mean()
        if kind in ("sedan", "hatchback", "suv"):  # the windscreen ahead of the rear window
            top = glass[np.abs(glass[:, 0]) < 0.2]
            assert top[:, 1].max() > 0.3 and top[:, 1].min() < -0.3


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_bodies_are_closed_outward_and_smooth(kind: str):
    _, named = sample_vehicle_parts(np.random.default_rng(3), K, kind)
    bodies = [named["body"].mesh] + ([named["cargo_box"].mesh] if kind == "truck" else [])
    for m in bodies:
        assert m.smooth and m.faces.shape[1] == 4
        assert (_edge_use(m) == 2).all(), "a lofted body is watertight (its ends are welded shut)"
        v = m.vertices.astype(np.float64)
        box_volume = float(np.prod(np.ptp(v, axis=0)))
        assert 0.4 * box_volume < _signed_volume(m) < box_volume, "normals point outwards, a plausible fill"
    assert named["glass"].material.roughness < 0.1 and max(named["glass"].material.color) < 0.1


def _inside(mesh: Mesh, points: np.ndarray) -> np.ndarray:
    """Which points lie inside a closed mesh (parity of crossings along a slightly tilted vertical ray)."""
    v = mesh.vertices.astype(np.float64)
    f = mesh.faces
    tris = np.concatenate([v[f[:, [0, 1, 2]]], v[f[:, [0, 2, 3]]]]) if f.shape[1] == 4 else v[f]
    d = np.array([0.013, 0.021, 1.0]) / np.linalg.norm([0.013, 0.021, 1.0])
    v0, e1, e2 = tris[:, 0], tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]
    p = np.cross(d, e2)
    det = (e1 * p).sum(1)
    inv = 1 / np.where(np.abs(det) > 1e-12, det, 1)
    s = points[:, None] - v0[None]
    u = (s * p[None]).sum(-1) * inv
    q = np.cross(s, e1[None])
    w = (q @ d) * inv
    t = (q * e2[None]).sum(-1) * inv
    hits = (np.abs(det) > 1e-12) & (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 0)
    return hits.sum(1) % 2 == 1


@pytest.mark.parametrize("kind", VEHICLE_KINDS)
def test_glass_lights_plates_lie_on_the_body_not_in_it(kind: str):
    """Face centres and edge mid-points of the thin parts on the body are outside it (none hides in the paint),
    and the glass lies on the body, not floating away from it."""
    for seed in range(3):
        _, named = sample_vehicle_parts(np.random.default_rng(seed), K, kind)
        body = named["body"].mesh
        for name in ("glass", "head_lights", "tail_lights", "plates", "livery"):
            if name not in named:
                continue
            v, f = named[name].mesh.vertices.astype(np.float64), named[name].mesh.faces
            pts = np.concatenate([v[f].mean(1), 0.5 * (v[f[:, 0]] + v[f[:, 1]]), 0.5 * (v[f[:, 1]] + v[f[:, 2]])])
            assert not _inside(body, pts).any(), f"{kind} seed {seed}: {name} inside the body"
        g = named["glass"].mesh.vertices.astype(np.float64)
        bv = body.vertices.astype(np.float64)
        sample = g[:: max(1, len(g) // 60)]
        dist = np.sqrt(((sample[:, None] - bv[None]) ** 2).sum(-1)).min(1)
        assert np.median(dist) < 0.15  # on the surface (nearest body vertex, stations ~0.15 m apart)


@pytest.mark.parametrize("kind", ["sedan", "suv", "bus"])
def test_wheels_sit_in_arches(kind: str):
    """Each tyre's top is under the body's arch: the body has no vertex inside the tyre's swept box."""
    _, named = sample_vehicle_parts(np.random.default_rng(1), K, kind)
    body = named["body"].mesh.vertices.astype(np.float64)
    tyres = named["tyres"].mesh.vertices.astype(np.float64)
    r = tyres[:, 2].max() / 2
    for y_axle in np.unique(np.round(tyres[np.abs(tyres[:, 2] - r) < 0.01, 1], 1)):
        near = body[(np.abs(body[:, 1] - y_axle) < r * 0.5) & (np.abs(body[:, 0]) > body[:, 0].max() - 0.12)]
        assert len(near) and near[:, 2].min() > 2 * r - 0.05, "the flank is cut above the tyre"


def test_kind_frequencies():
    rng = np.random.default_rng(0)
    n = 20000
    counts = {k: 0 for k in VEHICLE_KINDS}
    for _ in range(n):
        counts[sample_vehicle_kind(rng)] += 1
    for kind, w in zip(VEHICLE_KINDS, KIND_WEIGHTS, strict=True):
        assert abs(counts[kind] / n - w) < 0.015, kind
    cars = sum(counts[k] for k in ("sedan", "hatchback", "suv")) / n
    assert 0.75 < cars < 0.85 and counts["bus"] < counts["truck"] < counts["van"]
    # sample_vehicle without a kind draws the kind first, from the same generator.
    kind, _ = sample_vehicle_parts(np.random.default_rng(5), K)
    assert kind == sample_vehicle_kind(np.random.default_rng(5))


def test_paint_distribution():
    rng = np.random.default_rng(0)
    n = 4000
    names = [car_paint(rng, K)[0] for _ in range(n)]
    shares = {c[0]: names.count(c[0]) / n for c in CAR_PAINTS}
    assert abs(shares["white"] - 0.25) < 0.03 and abs(shares["black"] - 0.2) < 0.03
    assert abs(shares["grey"] - 0.18) < 0.03 and abs(shares["silver"] - 0.12) < 0.03
    assert sum(shares[c] for c in ("white", "black", "grey", "silver")) > 0.7
    rng = np.random.default_rng(1)
    mats = [car_paint(rng, K)[1] for _ in range(400)]
    glossy = [m for m in mats if 0.15 <= m.roughness <= 0.4 and 0.1 <= m.metallic <= 0.9]
    assert len(glossy) > 0.85 * len(mats), "mostly glossy metallic paint"
    rng = np.random.default_rng(2)
    for _ in range(200):  # neutral paint stays neutral: little saturation after the jitter
        name, m = car_paint(rng, K)
        if name in ("white", "grey", "silver", "black"):
            assert max(m.color) - min(m.color) < 0.06 * max(max(m.color), 0.05) + 0.02


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="vehicle kind"):
        sample_vehicle(np.random.default_rng(0), K, "tank")


def test_bicycle():
    for seed in SEEDS:
        parts = sample_bicycle(np.random.default_rng(seed), K)
        v = _all_vertices(parts)
        assert abs(v[:, 2].min()) < 0.005, "the tyres touch the ground"
        assert 1.5 <= np.ptp(v[:, 1]) <= 1.9 and 0.85 <= v[:, 2].max() <= 1.25 and np.ptp(v[:, 0]) < 0.8
        assert 0.75 < footprint_radius(parts) < 1.0
        for p in parts:
            assert p.mesh.faces.ndim == 2 and p.mesh.faces.max() < len(p.mesh.vertices)
            assert np.isfinite(p.mesh.vertices).all()
        assert sum(len(p.mesh.faces) for p in parts) <= 1500
    a = sample_bicycle(np.random.default_rng(1), K)
    b = sample_bicycle(np.random.default_rng(1), K)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.mesh.vertices, pb.mesh.vertices)
