"""Procedural street buildings without Blender: determinism, footprint, facade planes, materials, face budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scenes.randomization import MaterialKnobs
from scenes.spec import Part, to_jsonable
from scenes.street_assets.buildings import (
    FRONT_PROTRUSION_MAX,
    GROUND_PROTRUSION_MAX,
    HEADROOM,
    PANE_OFFSET,
    ROOF_LEDGE_MAX,
    SIDE_INSET,
    sample_building,
    sample_building_parts,
)

K = MaterialKnobs()
PANES = ("glass", "glass_curtain", "shop_glass")


def check_parts(parts: list[Part], max_faces: int) -> None:
    """Valid meshes: float32 finite vertices, one corner count (3 or 4) per mesh, indices in range, no
    degenerate faces; all in at most ``max_faces`` faces; the object stands on z=0."""
    assert parts
    total = 0
    for p in parts:
        v, f = p.mesh.vertices, p.mesh.faces
        assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3 and np.isfinite(v).all()
        assert f.ndim == 2 and f.shape[1] in (3, 4) and f.dtype == np.int32
        assert f.min() >= 0 and f.max() < len(v)
        tri = v[f[:, :3]].astype(np.float64)
        area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        assert (area > 1e-10).all(), "degenerate faces"
        total += len(f)
    assert total <= max_faces, f"{total} faces > {max_faces}"
    assert min(float(p.mesh.vertices[:, 2].min()) for p in parts) == pytest.approx(0.0, abs=1e-5)


def _dims(seed: int) -> tuple[float, float, float]:
    r = np.random.default_rng(10_000 + seed)
    return float(r.uniform(5, 25)), float(r.uniform(5, 16)), float(r.uniform(5, 32))


def _faces_in_front(parts: dict[str, Part], depth: float) -> int:
    return sum(int((p.mesh.vertices[p.mesh.faces][:, :, 0].min(axis=1) >= depth / 2 - 1e-3).sum())
               for p in parts.values())


def test_building_is_deterministic_per_seed():
    def dump(seed: int) -> str:
        return json.dumps(to_jsonable(sample_building(np.random.default_rng(seed), K, 12.0, 10.0, 18.0)))

    assert dump(3) == dump(3)
    assert dump(3) != dump(4)


@pytest.mark.parametrize("seed", range(40))
def test_building_stays_in_its_footprint_and_budget(seed):
    width, depth, height = _dims(seed)
    named = sample_building_parts(np.random.default_rng(seed), K, width, depth, height)
    parts = list(named.values())
    check_parts(parts, max_faces=10_000)
    v = np.concatenate([p.mesh.vertices for p in parts]).astype(np.float64)
    tol = 1e-4
    assert v[:, 0].min() >= -depth / 2 - tol
    assert v[:, 0].max() <= depth / 2 + FRONT_PROTRUSION_MAX + tol  # only the street facade sticks out
    assert np.abs(v[:, 1]).max() <= width / 2 + tol
    assert v[:, 2].max() <= height + ROOF_LEDGE_MAX + tol
    assert _faces_in_front(named, depth) <= 5000
    low = v[v[:, 2] < HEADROOM - tol]  # people on the sidewalk fit under balconies and awnings
    assert low[:, 0].max() <= depth / 2 + GROUND_PROTRUSION_MAX + tol


@pytest.mark.parametrize("seed", range(25))
def test_window_panes_lie_on_the_facade_planes(seed):
    width, depth, height = _dims(seed)
    named = sample_building_parts(np.random.default_rng(seed), K, width, depth, height)
    front_x, side_y = depth / 2 + PANE_OFFSET, width / 2 - SIDE_INSET + PANE_OFFSET
    n_front = 0
    for key in PANES:
        if key not in named:
            continue
        corners = named[key].mesh.vertices[named[key].mesh.faces].astype(np.float64)  # (F, 3, 3)
        on_front = np.abs(corners[:, :, 0] - front_x).max(axis=1) < 1e-4
        on_side = np.abs(np.abs(corners[:, :, 1]) - side_y).max(axis=1) < 1e-4
        assert (on_front | on_side).all(), f"{key}: a pane off the facade planes"
        assert (corners[:, :, 2] >= -1e-5).all() and (corners[:, :, 2] <= height).all()
        assert (np.abs(corners[on_side][:, :, 0]) <= depth / 2).all()
        assert (np.abs(corners[on_front][:, :, 1]) <= width / 2).all()
        n_front += int(on_front.sum()) // 2
    assert n_front >= 2  # a ground floor and (tall enough) a window grid
    if height > 10:
        assert n_front >= 4
    # Glass is dark (or mirrored) and reflective; frames stand in front of the wall.
    glass = named["glass"].material
    assert glass.roughness <= 0.1 and (max(glass.color) < 0.05 or glass.metallic > 0.5)
    fx = named["frame"].mesh.vertices[:, 0]
    assert fx.max() > depth / 2 + 0.03


def test_shop_fronts_and_plain_ground_floors():
    for seed in range(6):
        shop = sample_building_parts(np.random.default_rng(seed), K, 14.0, 10.0, 15.0, shop_front=True)
        assert {"shop_glass", "shop_frame", "sign", "lettering"} <= set(shop)
        plain = sample_building_parts(np.random.default_rng(seed), K, 14.0, 10.0, 15.0, shop_front=False)
        assert "shop_glass" not in plain and "door" in plain and "plinth" in plain
        # The big shop glass reaches (nearly) the ground; plain ground-floor windows sit above the plinth.
        assert shop["shop_glass"].mesh.vertices[:, 2].min() < 0.7


def test_buildings_vary_in_materials_and_details():
    kinds, keys, balcony_depths = set(), set(), []
    for seed in range(60):
        named = sample_building_parts(np.random.default_rng(seed), K, 15.0, 10.0, 20.0)
        wall = named["wall"].material
        assert wall.texture in ("brick", "noise") and wall.color2 is not None and wall.bump > 0
        if wall.texture == "brick":
            kinds.add("brick")
            assert sum(wall.color2) > sum(wall.color) * 0.5  # mortar is lighter than the darkest bricks' half
        else:
            kinds.add("plaster" if max(wall.color) > 0.45 else "concrete")
        keys |= set(named)
        front = np.concatenate([p.mesh.vertices for p in named.values()])
        high = front[front[:, 2] > 5.0]
        balcony_depths.append(float(high[:, 0].max()) - 5.0)
    assert kinds == {"brick", "plaster", "concrete"}
    assert {"railing", "awning", "glass_curtain", "metal"} <= keys
    assert max(balcony_depths) > 0.85  # balconies on some
    assert min(balcony_depths) < 0.5  # not on all


def test_narrow_and_low_buildings_still_valid():
    for seed, (w, d, h) in enumerate([(4.0, 4.0, 4.0), (5.0, 20.0, 3.5), (30.0, 6.0, 40.0)]):
        named = sample_building_parts(np.random.default_rng(seed), K, w, d, h)
        check_parts(list(named.values()), max_faces=10_000)
        v = np.concatenate([p.mesh.vertices for p in named.values()])
        assert np.abs(v[:, 1]).max() <= w / 2 + 1e-4 and v[:, 2].max() <= h + ROOF_LEDGE_MAX + 1e-4


def _band_floors(named: dict[str, Part], width: float, depth: float) -> int:
    """Upper floors whose balcony slab runs along (nearly) the whole facade: trim boxes 1 m or more in front
    of the wall that span over 70 % of the width."""
    trim = named["trim"].mesh
    boxes = trim.vertices[trim.faces].reshape(-1, 12 * 3, 3) if len(trim.faces) % 12 == 0 else None
    assert boxes is not None  # trim is all boxes (12 triangles each)
    x_front = boxes[:, :, 0].max(axis=1)
    span = boxes[:, :, 1].max(axis=1) - boxes[:, :, 1].min(axis=1)
    thin = (boxes[:, :, 2].max(axis=1) - boxes[:, :, 2].min(axis=1)) < 0.25
    slabs = (x_front >= depth / 2 + 1.0) & (span > 0.7 * width) & thin & (boxes[:, :, 2].min(axis=1) > HEADROOM)
    return int(slabs.sum())


def test_some_blocks_have_a_balcony_along_every_upper_floor_with_tall_glass_behind():
    banded = 0
    for seed in range(80):
        width, depth, height = 16.0, 10.0, 19.0
        named = sample_building_parts(np.random.default_rng(seed), K, width, depth, height, balcony_bands=0.45)
        n = _band_floors(named, width, depth)
        if not n:
            continue
        banded += 1
        check_parts(list(named.values()), max_faces=10_000)
        assert _faces_in_front(named, depth) <= 5000
        # one slab per upper floor (4-5 floors above a 3-4.6 m ground floor at 19 m), floor-to-ceiling glass
        assert 4 <= n <= 6
        glass = named["glass"].mesh.vertices[named["glass"].mesh.faces]  # (F, 3, 3)
        tall = glass[:, :, 2].max(axis=1) - glass[:, :, 2].min(axis=1)
        assert tall.max() > 2.0
    assert 8 <= banded <= 40  # on some blocks (mostly the modern ones), not on all
    assert not any(_band_floors(sample_building_parts(np.random.default_rng(seed), K, 16.0, 10.0, 19.0), 16.0, 10.0)
                   for seed in range(80))  # off by default


def test_shop_windows_are_dark_or_show_a_lit_interior():
    lit = dark = 0
    for seed in range(40):
        glass = sample_building_parts(np.random.default_rng(seed), K, 14.0, 10.0, 15.0, shop_front=True,
                                      lit_shops=0.55)["shop_glass"].material
        if max(glass.color) > 0.3:
            lit += 1
            assert glass.texture in ("noise", "voronoi") and glass.color2 is not None
            assert max(glass.color2) < max(glass.color)  # blotchy: shelves and goods darker than the light
        else:
            dark += 1
            assert max(glass.color) < 0.05 and glass.roughness <= 0.05
    assert lit >= 10 and dark >= 10


def test_balcony_bands_and_lit_shops_leave_the_rest_of_the_scene_as_it_was():
    """They draw from a generator spawned from the scene's (which does not advance it): with or without them, the
    caller's generator is left in the same state and the building's other parts are the same."""

    def build(p: float, seed: int) -> tuple[dict[str, Part], float]:
        rng = np.random.default_rng(seed)
        parts = sample_building_parts(rng, K, 16.0, 10.0, 19.0, shop_front=True, balcony_bands=p, lit_shops=p)
        return parts, float(rng.random())

    changed = 0
    for seed in range(12):
        (off, next_off), (on, next_on) = build(0.0, seed), build(1.0, seed)
        assert next_off == next_on
        for key in ("wall", "sign", "door"):
            assert to_jsonable(off[key]) == to_jsonable(on[key])
        assert max(off["shop_glass"].material.color) < 0.05 < max(on["shop_glass"].material.color)
        changed += _band_floors(on, 16.0, 10.0) > 0 and _band_floors(off, 16.0, 10.0) == 0
    assert changed >= 6  # every modern building without ribbon windows gets a band at 1 (the others at 0.25)
