"""Asphalt cracks of the ``street`` family (``cracks``, scenes/street.py): sampled without Blender, and one tiny
render."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError
from test_street_layout import kind, layout

from scenes.spec import Material, SceneObject, to_jsonable
from scenes.street import (
    CLASSES,
    CRACK_KINDS,
    CRACK_MARGIN,
    CRACK_Z,
    MARK_H,
    PATCH_Z,
    PUDDLE_Z,
    StreetFrame,
    StreetLayout,
    StreetParams,
    crack_parts,
    sample_cracks,
)

ROOT = Path(__file__).resolve().parents[1]
FORCED = {"cracks": (8, 8)}


def cracks_of(lay: StreetLayout) -> list[SceneObject]:
    return [o for o in lay.spec.objects if kind(o) == "road_crack"]


def road_of(lay: StreetLayout) -> SceneObject:
    (road,) = [o for o in lay.spec.objects if kind(o) == "road"]
    return road


def street_coords(lay: StreetLayout, obj: SceneObject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s, t, z) of all of an object's vertices (the road's objects sit at the origin, unturned)."""
    assert obj.location == (0.0, 0.0, 0.0) and obj.rotation == (0.0, 0.0, 0.0)
    v = np.concatenate([p.mesh.vertices for p in obj.parts]).astype(np.float64)
    s, t = lay.frame.to_street(v[:, :2])
    return s, t, v[:, 2]


def test_the_knob_is_a_count_range_like_patches():
    assert StreetParams().cracks == (0, 0)  # off by default: configs and their hashes stay what they were
    assert "cracks" not in StreetParams().model_dump(mode="json")
    assert "cracks" not in StreetParams(cracks=[0, 0]).model_dump()
    assert StreetParams(cracks=[0, 8]).model_dump(mode="json")["cracks"] == [0, 8]
    assert StreetParams(cracks=[3, 3]).cracks == (3, 3)
    for bad in ([5, 2], [-1, 2]):
        with pytest.raises(ValidationError):
            StreetParams(cracks=bad)


def test_class_map_unchanged_and_cracks_are_road():
    assert [(c.id, c.name, c.color, c.thing) for c in CLASSES] == [
        (0, "sky", (70, 130, 180), False), (1, "road", (128, 64, 128), False), (2, "sidewalk", (244, 35, 232), False),
        (3, "lane_marking", (255, 255, 255), False), (4, "building", (70, 70, 70), False),
        (5, "vehicle", (0, 0, 142), True), (6, "person", (220, 20, 60), True), (7, "pole_sign", (220, 220, 0), True),
        (8, "vegetation", (107, 142, 35), False)]
    lay = layout(index=0, views=1, **FORCED)
    names = {c.id: c.name for c in lay.spec.classes}
    (crack,) = cracks_of(lay)
    assert names[crack.class_id] == "road"


def test_cracks_are_deterministic_per_seed_and_vary_between_scenes():
    a, b = layout(index=3, seed=1, views=1, **FORCED), layout(index=3, seed=1, views=1, **FORCED)
    assert to_jsonable(cracks_of(a)) == to_jsonable(cracks_of(b))
    c = layout(index=4, seed=1, views=1, **FORCED)
    assert to_jsonable(cracks_of(a)[0].parts) != to_jsonable(cracks_of(c)[0].parts)


@pytest.mark.parametrize("index", range(4))
def test_cracks_change_nothing_else_and_are_off_at_zero(index):
    """Drawn from a generator of their own and added last: the scene with cracks is the scene without them plus
    one ``road_crack`` object (names, cameras and the post effects' draws included); ``cracks=(0, 0)`` adds none."""
    off = layout(index=index, seed=2, views=2, cracks=(0, 0))
    assert not cracks_of(off)
    on = layout(index=index, seed=2, views=2, **FORCED)
    assert len(cracks_of(on)) == 1 and on.spec.objects[-1] is cracks_of(on)[0]
    rest = to_jsonable(on.spec)
    rest["objects"] = rest["objects"][:-1]
    assert rest == to_jsonable(off.spec)


def test_cracks_and_seated_people_leave_each_other_as_they_were():
    """Both come from generators of their own: the cracks of a scene with seated people are its cracks without
    them, and its benches and seated people are theirs without cracks."""
    plain, seated = layout(index=1, views=1, **FORCED), layout(index=1, views=1, seated_people=0.6, **FORCED)
    assert to_jsonable(cracks_of(seated)) == to_jsonable(cracks_of(plain))
    bare = layout(index=1, views=1, seated_people=0.6, cracks=(0, 0))
    rest = [o for o in seated.spec.objects if kind(o) != "road_crack"]
    assert [to_jsonable(o.parts) for o in rest] == [to_jsonable(o.parts) for o in bare.spec.objects]


def test_a_count_range_from_zero_gives_some_scenes_cracks_and_some_none():
    counts = [len(cracks_of(layout(index=i, seed=4, views=1, cracks=(0, 2)))) for i in range(12)]
    assert 0 < sum(counts) < 12


@pytest.mark.parametrize(("index", "curved"), [(0, False), (1, True), (2, False), (3, True), (4, True)])
def test_cracks_lie_on_the_main_road_between_its_edges_under_the_paint(index, curved):
    """Every crack vertex is on the asphalt (within its edges, which the curbs and sidewalks start beyond; along
    the curve of a curved street too), at CRACK_Z: above the asphalt, under patches, puddles and paint."""
    assert 0 < CRACK_Z < PATCH_Z < PUDDLE_Z < MARK_H
    lay = layout(index=index, seed=3, views=1, curve_prob=float(curved), intersection_prob=0.5, **FORCED)
    assert lay.curved == curved
    rs, rt, rz = street_coords(lay, road_of(lay))
    edge, half = float(np.abs(rt).max()), float(np.abs(rs).max())
    assert np.allclose(rz, 0.0) and edge == pytest.approx(lay.road_width / 2, abs=1e-3)
    (crack,) = cracks_of(lay)
    s, t, z = street_coords(lay, crack)
    assert len(s) > 0
    assert np.allclose(z, CRACK_Z, atol=1e-7)
    assert np.abs(t).max() <= edge - CRACK_MARGIN + 1e-3, (np.abs(t).max(), edge)
    assert np.abs(s).max() <= half - 1.0 + 1e-3
    # On the asphalt, not the curb (edge .. edge + curb width) or the sidewalk beyond it.
    curbs = [o for o in lay.spec.objects if kind(o) == "curb"]
    curb_t = np.abs(np.concatenate([street_coords(lay, o)[1] for o in curbs]))
    assert np.abs(t).max() < curb_t.min()
    for p in crack.parts:  # flat ribbons facing up
        tri = p.mesh.vertices[p.mesh.faces].astype(np.float64)
        normal_z = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])[:, 2]
        assert (normal_z > 0).all()


def test_crack_kinds_widths_and_materials():
    rng = np.random.default_rng(0)
    cracks = sample_cracks(rng, 200, half=40.0, edge=5.0, lane_ts=[-3.3, 0.0, 3.3], lane_w=3.3)
    assert {c.kind for c in cracks} == set(CRACK_KINDS)
    for c in cracks:
        assert all(len(p) == len(w) >= 2 for p, w in zip(c.paths, c.widths, strict=True))
        w = np.concatenate(c.widths)
        lo, hi = (0.03, 0.06) if c.kind == "sealed" else (0.01, 0.05)
        assert w.min() >= 0.35 * 0.6 * 0.6 * lo - 1e-9 and w.max() <= 1.4 * hi + 1e-9
        pts = np.concatenate(c.paths)
        assert np.abs(pts[:, 0]).max() + w.max() / 2 <= 5.0 - CRACK_MARGIN + 1e-9
        assert np.abs(pts[:, 1]).max() <= 39.0 + 1e-9
    network = [c for c in cracks if c.kind == "network"]
    assert all(len(c.paths) >= 2 for c in network[:5]) and max(len(c.paths) for c in network) >= 4
    longitudinal = [c.paths[0] for c in cracks if c.kind == "longitudinal"]
    transverse = [c.paths[0] for c in cracks if c.kind == "transverse"]
    assert all(np.ptp(p[:, 1]) > np.ptp(p[:, 0]) for p in longitudinal)
    assert all(np.ptp(p[:, 0]) > np.ptp(p[:, 1]) for p in transverse)

    # Open cracks in a darker shade of the asphalt, sealed ones black and glossier; both wet by rain.
    asphalt = Material((0.05, 0.05, 0.055), roughness=0.7)
    one_each = [next(c for c in cracks if c.kind == k) for k in CRACK_KINDS]
    for wetness in (0.0, 0.8):
        opened, sealed = crack_parts(one_each, StreetFrame(), asphalt, wetness, np.random.default_rng(1))
        assert max(opened.material.color) < 0.5 * min(asphalt.color)
        assert max(sealed.material.color) < 0.015 and sealed.material.roughness < opened.material.roughness
        assert len(opened.mesh.vertices) == sum(len(p) for c in one_each[:3] for p in c.paths) * 2
    dry, soaked = (crack_parts(one_each, StreetFrame(), asphalt, w, np.random.default_rng(1))[0] for w in (0.0, 0.8))
    assert max(soaked.material.color) < max(dry.material.color) and soaked.material.roughness < dry.material.roughness
    # In scenes: every crack darker than the scene's asphalt.
    for i in range(4):
        lay = layout(index=i, seed=6, views=1, **FORCED)
        road = road_of(lay).parts[0].material
        assert all(max(p.material.color) < min(road.color) for p in cracks_of(lay)[0].parts)


_RENDER = """
import dataclasses, os, sys, tempfile
import numpy as np
sys.path.insert(0, "tests")
from test_street_layout import layout
from scenes.camera import look_at
from scenes.spec import Camera, PostFX
from synth.blender import BlenderRenderer
from synth.config import OutputSettings, RenderSettings
from synth.shard import labels_from_index

size = int(sys.argv[2])
lay = layout(index=1, seed=0, views=1, cracks=(8, 8), curve_prob=0.0, environment={"weights": {"clear": 1.0,
             "overcast": 0.0, "dusk": 0.0, "rain": 0.0}})
spec = lay.spec
crack = spec.objects[-1]
assert crack.name.startswith("road_crack")
# The street's surfaces only (no car or tree between the camera and the crack), a camera 1.5 m above the middle of
# the widest crack ribbon, looking down at it with a narrow field of view.
keep = ("ground", "road", "road_patch", "puddle", "lane_marking", "curb", "verge", "sidewalk", "road_crack")
spec.objects = [o for o in spec.objects if o.name.rsplit("_", 1)[0] in keep]
v = np.concatenate([p.mesh.vertices for p in crack.parts]).astype(np.float64)
pair = np.linalg.norm(v[0::2] - v[1::2], axis=1)  # each station's two vertices: the ribbon's width there
i = int(np.argmax(pair))
target = (v[2 * i] + v[2 * i + 1]) / 2
loc = target + np.array([0.0, -0.25, 1.5])
spec.cameras = [Camera(tuple(loc), look_at(loc, target), fov=0.6, kind="surveillance")]
spec.post = [PostFX()]
settings = RenderSettings(resolution=size, views=1, samples=8, noise_threshold=0, denoise=False)
r = BlenderRenderer(settings, OutputSettings(), tempfile.mkdtemp(), threads=2)
views, _ = r.render(spec)
sem, _ = labels_from_index(views[0].index, spec)
index_of_crack = spec.objects.index(crack) + 1
road = next(i for i, o in enumerate(spec.objects, start=1) if o.name.rsplit("_", 1)[0] == "road")
np.savez(sys.argv[1], rgb=views[0].rgb, index=views[0].index, semantic=sem, crack=index_of_crack, asphalt=road,
         road=[c.id for c in spec.classes if c.name == "road"][0])
sys.stdout.flush()
os._exit(0)
"""


def render_crack_closeup(out: Path, size: int) -> dict[str, np.ndarray]:
    """Render :data:`_RENDER` (a close-up of a crack of a street scene) in a subprocess; its arrays."""
    proc = subprocess.run([sys.executable, "-c", _RENDER, str(out), str(size)], cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.mark.render
def test_a_rendered_crack_is_labeled_road_and_darker_than_the_asphalt(tmp_path: Path):
    """A 64 px close-up of a crack (clear sky): its pixels exist, are labeled road, and are darker than the
    asphalt around them."""
    d = render_crack_closeup(tmp_path / "crack.npz", 64)
    crack = d["index"] == int(d["crack"])
    assert crack.sum() >= 3
    assert (d["semantic"][crack] == int(d["road"])).all()
    asphalt = d["index"] == int(d["asphalt"])
    assert asphalt.sum() >= 100
    lum = d["rgb"].astype(np.float64).mean(axis=2)
    assert lum[crack].mean() < lum[asphalt].mean() - 5, (lum[crack].mean(), lum[asphalt].mean())
