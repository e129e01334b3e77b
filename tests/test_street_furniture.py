"""Street furniture and vegetation without Blender: poles, bollards, trees, bushes (validity, lamps, reach)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from test_street_buildings import check_parts

from scenes.randomization import MaterialKnobs
from scenes.spec import Mesh, Part, to_jsonable
from scenes.street_assets.furniture import POLE_KINDS, lamp_positions, sample_bollard, sample_pole
from scenes.street_assets.nature import reach, sample_bush, sample_tree

K = MaterialKnobs()


def _components(mesh: Mesh) -> int:
    """Connected pieces of a mesh (foliage clusters, branch segments)."""
    f = mesh.faces.astype(np.int64)
    rows = np.repeat(f[:, 0], f.shape[1])
    graph = coo_matrix((np.ones(len(rows)), (rows, f.ravel())), shape=(len(mesh.vertices),) * 2)
    return int(connected_components(graph, directed=False)[0])


def _emissive(parts: list[Part]) -> list[Part]:
    return [p for p in parts if p.material.shader == "emission"]


def _dump(parts: list[Part]) -> str:
    return json.dumps(to_jsonable(parts))


@pytest.mark.parametrize("kind", POLE_KINDS)
def test_poles_valid_deterministic_and_standing(kind):
    for seed in range(12):
        parts = sample_pole(np.random.default_rng(seed), K, kind)
        check_parts(parts, max_faces=1500)
        assert _dump(parts) == _dump(sample_pole(np.random.default_rng(seed), K, kind))
        v = np.concatenate([p.mesh.vertices for p in parts])
        assert v[:, 2].max() > 2.0  # taller than people
        assert v[:, 0].max() < 1.3  # arms reach over -x only (wide signs on two poles: +-1.2 m)
        if kind != "street_lamp":
            assert not _emissive(parts)
    assert _dump(sample_pole(np.random.default_rng(0), K, kind)) != _dump(sample_pole(np.random.default_rng(1), K,
                                                                                        kind))


def test_pole_kind_is_checked_and_drawn():
    with pytest.raises(ValueError, match="pole kind"):
        sample_pole(np.random.default_rng(0), K, "bench")
    for seed in range(10):
        check_parts(sample_pole(np.random.default_rng(seed), K), max_faces=1500)


@pytest.mark.parametrize("kind", ["street_lamp", "traffic_light"])
def test_lit_lamps_glow_and_unlit_do_not(kind):
    for seed in range(10):
        lit = sample_pole(np.random.default_rng(seed), K, kind, lit=True)
        unlit = sample_pole(np.random.default_rng(seed), K, kind, lit=False)
        glow = _emissive(lit)
        assert glow and all(p.material.emission > 1 for p in glow)
        assert not _emissive(unlit)
        assert not lamp_positions(unlit)
        (centre, color), = lamp_positions(lit)
        assert centre[2] > 2.0 and max(color) > 0.5
        if kind == "street_lamp":  # the lamp head is high up, never on the building side (+x)
            assert centre[2] > 3.0 and centre[0] <= 0.01


def test_a_street_lamp_head_takes_the_glass_it_is_given():
    from scenes.spec import Material

    glass = Material((0.9, 0.6, 0.3), shader="emission", emission=25.0)
    for seed in range(5):
        parts = sample_pole(np.random.default_rng(seed), K, "street_lamp", lit=True, glow=glass)
        assert [p.material for p in _emissive(parts)] == [glass]  # the same object: one material per scene
        (_, color), = lamp_positions(parts)
        assert color == glass.color


def test_signs_face_plus_y():
    for seed in range(10):
        parts = sample_pole(np.random.default_rng(seed), K, "round_sign")
        pole_r = max(float(np.abs(p.mesh.vertices[:, 1]).max()) for p in parts[:1])
        faces = parts[1:]
        assert min(float(p.mesh.vertices[:, 1].min()) for p in faces) >= pole_r - 1e-4


def test_bollards():
    heights = []
    for seed in range(12):
        parts = sample_bollard(np.random.default_rng(seed), K)
        check_parts(parts, max_faces=400)
        heights.append(max(float(p.mesh.vertices[:, 2].max()) for p in parts))
        assert reach(parts) < 0.3
    assert min(heights) > 0.35 and max(heights) < 1.3


@pytest.mark.parametrize("leafy", [True, False])
@pytest.mark.parametrize("max_reach", [0.4, 1.0, 2.0, 3.5, np.inf])
def test_trees_respect_max_reach(leafy, max_reach):
    for seed in range(8):
        parts = sample_tree(np.random.default_rng(seed), K, max_reach, leafy=leafy)
        check_parts(parts, max_faces=3000)
        assert reach(parts) <= max_reach
        assert _dump(parts) == _dump(sample_tree(np.random.default_rng(seed), K, max_reach, leafy=leafy))


def test_leafy_and_bare_trees_have_their_structure():
    heights, reds = [], 0
    for seed in range(30):
        leafy = sample_tree(np.random.default_rng(seed), K, leafy=True)
        wood, foliage = leafy
        assert _components(foliage.mesh) >= 6  # several clusters, not one ball
        assert _components(wood.mesh) >= 4  # trunk and branches
        assert foliage.material.texture in ("voronoi", "noise") and foliage.material.color2 is not None
        r, gr, _ = foliage.material.color
        reds += r > gr
        heights.append(max(float(p.mesh.vertices[:, 2].max()) for p in leafy))
        bare = sample_tree(np.random.default_rng(seed), K, leafy=False)
        assert len(bare) == 1 and _components(bare[0].mesh) >= 10  # recursive branches
        heights.append(float(bare[0].mesh.vertices[:, 2].max()))
    assert 0 < reds < 15  # mostly green, sometimes autumn
    assert max(heights) - min(heights) > 3.0  # varied sizes
    drawn = {len(sample_tree(np.random.default_rng(s), K)) for s in range(20)}
    assert drawn == {1, 2}


@pytest.mark.parametrize("max_reach", [0.3, 0.8, 1.0, 2.0])
def test_bushes(max_reach):
    for seed in range(10):
        parts = sample_bush(np.random.default_rng(seed), K, max_reach)
        check_parts(parts, max_faces=1500)
        assert reach(parts) <= max_reach
        assert _components(parts[0].mesh) >= 3
        assert max(float(p.mesh.vertices[:, 2].max()) for p in parts) < 2.0
