"""Rooms of the ``street`` family (``interior_scenes``; scenes/street_assets/interiors.py, scenes/street.py): sampled
without Blender, and one tiny render."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, render_cli
from scipy.spatial import ConvexHull
from test_render import check_coco, check_layout
from test_street_layout import overlap_depth

from scenes import SceneConfig, resolve_scene, sample_scene, scene_rng
from scenes.registry import SceneContext
from scenes.spec import SceneSpec, to_jsonable
from scenes.street import RoomLayout, StreetParams, build_room, is_room
from scenes.street_assets.interiors import CAMERA_CLEARANCE, Item, Room
from scenes.street_assets.people import SEAT_TOLERANCE
from segfactory.formats.dataset import load_frame, open_dataset

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"floor", "wall", "ceiling"}
ON_WALL = {"window", "door"}
OVERHEAD = {"ceiling_light"}
# sha256 of each of the first 12 default street scenes (seed 5, one view, 64 px; floats to 9 digits) as sampled
# before rooms existed (b6a7169): with interior_scenes at 0 every scene must stay exactly what it was (and with
# cracks off, their default: cracks came later).
STREET_DIGESTS = [
    "690633e48fcefe8525fd10c68387cac5be475678f71801ff45faf897d457fdee",
    "12d493cb9e304563e8b0c9e2734066c3fca432a08323e71023ce132cfef2d588",
    "dc8c32436224043766ec87ee1c90301d200daf80efa84c87e5e4477f6bbd236b",
    "2ccbcfe648e4e869204ec6cb8315afc3eb1502a6d3103507ec439b9339875858",
    "2ed772ab1ffe70f9f644c0530561a9ffd8e489cc94efed9b96cc635649d2a0b0",
    "6614bf5f37fec5f3431357eba516a05e798935cfa0cfd3785f47de701d4a5831",
    "9dc97a99307f5124e4b456f07ffae9ceebf5ba5442f24d1970477f252bc20a52",
    "118fdc7fbc51e82c480e5d943cbac19ca54cbdc5d0bfbbecf7245d22568d8c3c",
    "fe311cca2195d931905bf9c6c43a3945edd4f8bf56d0107b6e4ff66839ded266",
    "2ff354bd71bc8b5e68eadcc9c99396ecb3401d8e9ea700b834e7fc44a4be2c11",
    "a53ee64933ab89b22bbfcc069c592948127416f5853f67cacbce79e1282adda5",
    "1b8b0ef75ea43ac1ad887b19dc359351f1436ff30998c9cd64799f822d080e13",
]
# The same 12 scenes with cracks as configs/street.yaml draws them (``cracks=(0, 8)``; recorded when cracks were
# added: STREET_DIGESTS plus one ``road_crack`` object each, tests/test_street_cracks.py).
CRACKED_STREET_DIGESTS = [
    "a3c0b5a36c478e78751c4a08306193a6aab7602f0430b0a9de608507c67e461f",
    "63546991c8835f05eac4ae9429e04f48920983a9535214baeddd85debe631bff",
    "a4a85afa317ca30097dd44612c8b61cb3de77e48729fa09bd514f3b0ef52c2d3",
    "7e6bb057c18dc6586eec35d7f69a103b36872ff59178fd4dc062d59c9f86121b",
    "b1a68a3dc43555ec237c183fe35e00fdbcbc0da2b859a8aa62ba4155c6e22275",
    "e929ed31a5b0518ecf3b9adb362aace4187486e55be16bc7e4aed5c303607815",
    "aa1948a839b662cdcac9326fd9d8ae00baabf7225a54b0245385dccd37f0a543",
    "08ad2b32ede83112e290b38421cacfc149bb4c28199d2e4ee13e854242280b1e",
    "d10a1103a94e82cb2b689f65f9886d53570caabbf1273593eeb79141a8dadce4",
    "32515cd40d019ed2e2d308e85dbbad572bd216a75064e3eb4956612ba90fee87",
    "32854f9e4786eb62fbe0ddfbefb623253db9ae173abe33d6bdf2948ccf8a63f5",
    "5a2a8d147e933d9a2090e19ddac489333b7c37d1590e12a58fc138e0b45e6e50",
]


def room(index: int = 0, seed: int = 0, views: int = 2, **params) -> RoomLayout:
    resolved = resolve_scene(SceneConfig(family="street", params={"interior_scenes": 1.0, **params}))
    return build_room(SceneContext(scene_rng(seed, index), resolved.params, resolved.randomization, views,
                                   resolved.classes, 128))


def scene(index: int, seed: int = 5, views: int = 1, **params) -> SceneSpec:
    resolved = resolve_scene(SceneConfig(family="street", params=params))
    return sample_scene(resolved, scene_rng(seed, index), views, 64)


def _rounded(x: object) -> object:
    """Floats to 9 significant digits: NumPy's vectorized sin, cos and exp may differ in the last bit between CPUs
    (AVX-512 or not), which must not change a digest recorded on another machine."""
    if isinstance(x, float):
        return float(f"{x:.9g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def digest(spec: SceneSpec) -> str:
    """sha256 of the spec as the digests were recorded: ``Light.view`` (a view's own flash, added since) is left
    out where it is ``None``, as it is for every street light, so the digests still compare the sampled street."""
    tree = to_jsonable(spec)
    for light in tree["lights"]:
        if light["view"] is None:
            del light["view"]
    return hashlib.sha256(json.dumps(_rounded(tree), sort_keys=True).encode()).hexdigest()


def box_corners(it: Item) -> np.ndarray:
    """(8 * B, 3) world corners of an item's solid boxes."""
    b = np.asarray(it.solids)
    corners = np.array([[b[:, i], b[:, j], b[:, m]] for i in (0, 3) for j in (1, 4) for m in (2, 5)])
    local = corners.transpose(2, 0, 1).reshape(-1, 3)
    c, s = np.cos(it.yaw), np.sin(it.yaw)
    return np.column_stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]]) \
        + np.asarray(it.location)


def footprint(it: Item) -> np.ndarray:
    """(H, 2) convex outline from above: people by their vertices, everything else by its solid boxes."""
    xy = it.world_vertices()[:, :2] if it.cls == "person" else box_corners(it)[:, :2]
    return xy[ConvexHull(xy).vertices]


def inside_boxes(it: Item, xyz: np.ndarray, top_tolerance: float = 0.002) -> np.ndarray:
    """(N,) world points strictly inside one of the item's solid boxes (by more than 2 mm; from the top by more than
    ``top_tolerance``)."""
    p = it.to_local(xyz)
    b = np.asarray(it.solids)
    lo = b[None, :, :3] + 0.002
    hi = b[None, :, 3:] - np.array([0.002, 0.002, top_tolerance])
    return ((p[:, None] > lo) & (p[:, None] < hi)).all(axis=2).any(axis=1)


ROOMS = [(i, s) for s in (0, 1) for i in range(10)]


def test_rooms_are_deterministic_per_seed_and_vary():
    a, b = room(3, seed=2), room(3, seed=2)
    assert to_jsonable(a.spec) == to_jsonable(b.spec)
    assert to_jsonable(room(4, seed=2).spec) != to_jsonable(a.spec)
    rooms = [room(i, s).room for i, s in ROOMS]
    assert {r.kind for r in rooms} == {"lounge", "kitchen", "dining"}
    kinds = {it.kind for r in rooms for it in r.items}
    assert {"sofa", "armchair", "chair", "stool", "coffee_table", "table", "shelf", "cabinet", "counter", "tv",
            "rug", "floor_lamp", "plant", "window", "door", "ceiling_light", "floor_clutter"} <= kinds
    assert all(1 <= len(r.people()) <= 6 for r in rooms)
    assert any(len(r.people()) >= 3 for r in rooms)
    poses = {it.figure.pose for r in rooms for it in r.people() if it.figure is not None}
    assert poses == {"sit", "squat", "stand"}
    assert {r.flash for r in rooms} == {True, False}


@pytest.mark.parametrize(("index", "seed"), ROOMS)
def test_nothing_interpenetrates(index, seed):
    r = room(index, seed).room
    furniture = [it for it in r.items if it.kind not in SHELL | OVERHEAD and it.cls != "person" and it.solids]
    people = r.people()
    # Everything inside the walls, under the ceiling, on or above the floor.
    for it in furniture + people:
        pts = it.world_vertices()
        assert (np.abs(pts[:, 0]) <= r.width / 2 + 1e-3).all() and (np.abs(pts[:, 1]) <= r.depth / 2 + 1e-3).all()
        assert pts[:, 2].min() >= -1e-4 and pts[:, 2].max() <= r.height - 0.05, it.kind
    # Footprints: furniture, windows, doors and people apart (a sitter and its own seat are checked in 3D below).
    things = [(i, it) for i, it in enumerate(r.items) if it.cls == "person" or any(it is f for f in furniture)]
    for n, (ia, a) in enumerate(things):
        for ib, b in things[n + 1:]:
            if a.on_seat == ib or b.on_seat == ia:
                continue
            if a.kind in ON_WALL and b.kind in ON_WALL:
                continue
            assert overlap_depth(footprint(a), footprint(b)) <= 1e-6, (a.kind, b.kind)
    # 3D: no person's vertex inside any solid (a seat's top may give SEAT_TOLERANCE).
    for p in people:
        v = p.world_vertices()
        for it in r.items:
            if it.cls == "person" or not it.solids:
                continue
            tol = SEAT_TOLERANCE + 0.002 if it.seat is not None else 0.002
            assert not inside_boxes(it, v, tol).any(), (it.kind, p.kind)


@pytest.mark.parametrize(("index", "seed"), ROOMS)
def test_every_person_stands_on_the_floor_or_sits_on_a_seat(index, seed):
    r = room(index, seed).room
    for p in r.people():
        assert p.location[2] == 0.0 and p.figure is not None
        shoes = p.figure.parts["shoes"].mesh.vertices
        assert abs(float(shoes[:, 2].min())) <= 1e-4  # soles on the floor
        if p.on_seat is None:
            assert p.figure.pose in ("stand", "squat")
            continue
        seat_item = r.items[p.on_seat]
        seat = seat_item.seat
        assert p.figure.pose == "sit" and seat is not None
        assert abs(float(p.figure.seat_height or 0) - seat.height) <= 0.005  # posed for this seat's real height
        local = seat_item.to_local(p.world_vertices())
        on = local[(np.abs(local[:, 0]) <= seat.length / 2) & (local[:, 1] <= 0) & (local[:, 1] >= -seat.depth)]
        assert len(on), "the sitter is over its seat"
        lowest = float(on[:, 2].min())
        assert seat.height - SEAT_TOLERANCE - 0.002 <= lowest <= seat.height + 0.01  # hips on it, not floating


@pytest.mark.parametrize(("index", "seed"), ROOMS)
def test_cameras_are_inside_the_room_outside_every_object_and_framed_on_people(index, seed):
    lay = room(index, seed)
    r: Room = lay.room
    assert len(lay.spec.cameras) == 2
    for cam in lay.spec.cameras:
        eye = np.array([cam.location])
        assert r.inside(eye, CAMERA_CLEARANCE)[0]
        for it in r.items:
            assert it.distance(eye)[0] >= CAMERA_CLEARANCE - 1e-9, it.kind
        assert 1.0 - 1e-9 <= cam.location[2] <= 1.7 + 1e-9
        forward = -np.asarray(cam.rotation)[:, 2]
        assert -np.sin(np.radians(28.5)) <= forward[2] < 0  # a slight downward pitch
        assert cam.kind == "interior" and cam.min_visible_met and (cam.visible_objects or 0) >= 1
        # aimed at people 1-4 m away (the nearest person to the aim point, within 4.5 m of the camera)
        heads = np.array([it.world_vertices().mean(axis=0) for it in r.people()])
        assert np.linalg.norm(heads - cam.location, axis=1).min() <= 4.5
    flashes = [li for li in lay.spec.lights if li.type == "POINT" and li.size == 0.05]
    # one flash per view, each lit in its own view only; the room's own lights shine in every view
    assert [li.view for li in flashes] == ([0, 1] if r.flash else [])
    assert all(li.view is None for li in lay.spec.lights if li not in flashes)
    assert any(li.type in ("AREA", "POINT") and li.energy > 0 for li in r.lights)  # lit from inside


@pytest.mark.parametrize(("index", "seed"), ROOMS[:6])
def test_room_classes_come_from_the_street_map(index, seed):
    lay = room(index, seed)
    names = {c.id: c.name for c in lay.spec.classes}
    assert [c.name for c in lay.spec.classes] == ["sky", "road", "sidewalk", "lane_marking", "building", "vehicle",
                                                  "person", "pole_sign", "vegetation"]
    for o in lay.spec.objects:
        kind = o.name.rsplit("_", 1)[0]
        want = "person" if kind == "person" else "vegetation" if kind == "plant" else "building"
        assert names[o.class_id] == want, o.name
    assert any(names[o.class_id] == "person" for o in lay.spec.objects)


def test_interior_scenes_zero_leaves_every_scene_as_it_was():
    """At 0 (the default, and absent) every scene is what it was before rooms existed; the field stays out of the
    dumped params (config hashes). With cracks on, every scene is the one recorded when cracks were added."""
    assert "interior_scenes" not in StreetParams().model_dump(mode="json")
    assert StreetParams(interior_scenes=0.4).model_dump(mode="json")["interior_scenes"] == 0.4
    for i, (want, cracked) in enumerate(zip(STREET_DIGESTS, CRACKED_STREET_DIGESTS, strict=True)):
        assert digest(scene(i)) == want, i
        assert digest(scene(i, interior_scenes=0.0)) == want, i
        assert digest(scene(i, cracks=(0, 8))) == cracked, i


def test_streets_stay_the_streets_they_were_with_rooms_on():
    """With interior_scenes > 0, a scene that stays a street is the street of interior_scenes 0, the seated people's
    spawned generator included; the draw neither advances nor spawns from the scene's generator."""
    kinds = []
    for i in range(10):
        rng = scene_rng(7, i)
        before = rng.bit_generator.state
        draw = is_room(rng, 0.5)
        assert rng.bit_generator.state == before and rng.bit_generator.seed_seq.n_children_spawned == 0
        on = scene(i, seed=7, interior_scenes=0.5, seated_people=0.5)
        kinds.append(draw)
        if draw:
            assert any(o.name.startswith("floor_") for o in on.objects)
            continue
        assert to_jsonable(on) == to_jsonable(scene(i, seed=7, seated_people=0.5)), i
    assert True in kinds and False in kinds


def test_interior_scenes_one_gives_rooms_only():
    for i in range(6):
        spec = scene(i, seed=3, views=2, interior_scenes=1.0)
        assert any(o.name.startswith("floor_") for o in spec.objects)
        assert not any(o.name.startswith(("road", "sidewalk", "building")) for o in spec.objects)
        assert [c.kind for c in spec.cameras] == ["interior", "interior"]


@pytest.mark.render
def test_a_rendered_room_has_a_person_mask_and_valid_coco(tmp_path: Path):
    """One room, one 64 px view."""
    out = tmp_path / "room"
    assert render_cli(str(CONFIGS / "street.yaml"), "--out", str(out), "--scenes", "1", "--views", "1",
                      "--resolution", "64", "--workers", "1", "render.samples=8",
                      "scene.params.interior_scenes=1.0") == 0
    check_layout(out, channels=3, bit_depth=8)
    assert check_coco(out) > 0
    ds = open_dataset(out)
    ids = {c["name"]: c["id"] for c in ds.classes}
    frame = next(iter(ds.frames()))
    f = load_frame(frame)
    assert (f["semantic"] == ids["person"]).any() and (f["semantic"] == ids["building"]).any()
    assert not (f["semantic"] == ids["sky"]).any() and not (f["semantic"] == ids["road"]).any()
    assert float(f["rgb"].mean()) > 20  # lit, not black


_FLASH_RENDER = """
import os, sys, tempfile
import numpy as np
from scenes import geometry as g
from scenes.camera import look_at
from scenes.spec import Camera, ClassDef, Light, Material, Part, PostFX, SceneObject, SceneSpec, World
from synth.blender import BlenderRenderer
from synth.config import OutputSettings, RenderSettings

settings = RenderSettings(resolution=48, views=3, samples=8, noise_threshold=0, denoise=False)
r = BlenderRenderer(settings, OutputSettings(), tempfile.mkdtemp(), threads=2)
loc = np.array([2.2, -2.6, 1.6])
cam = Camera(tuple(loc), look_at(loc, np.array([0, 0, 0.5])), fov=0.7)
flash = Light("POINT", tuple(loc + np.array([0.0, 0.0, 0.1])), energy=300.0, size=0.05, view=1)
dim = Light("SUN", (5, -5, 8), (0.7, 0.0, 0.6), 0.3)
spec = SceneSpec("t", [ClassDef(0, "bg", (0, 0, 0)), ClassDef(1, "c", (1, 1, 1), True)], 0,
                 [SceneObject("cube", 1, [Part(g.box(1.5, 1.5, 1.5), Material((0.6, 0.6, 0.6)))])], [dim, flash],
                 World((0.02, 0.02, 0.02), (0.02, 0.02, 0.02), 1.0), [cam, cam, cam], [PostFX()] * 3, film="agx")
views, _ = r.render(spec)
np.savez(sys.argv[1], rgb=np.stack([v.rgb for v in views]), index=np.stack([v.index for v in views]))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.render
def test_a_flash_lights_its_own_view_only(tmp_path: Path):
    """Three views from one camera pose, a flash light of view 1 (``Light.view``): view 1 is lit by it, views 0
    and 2 (before and after it in the animation) are not, and all three see the same objects."""
    out = tmp_path / "flash.npz"
    proc = subprocess.run([sys.executable, "-c", _FLASH_RENDER, str(out)], cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = np.load(out)
    cube = d["index"][0] == 1
    assert cube.mean() > 0.2 and all(np.array_equal(d["index"][v], d["index"][0]) for v in (1, 2))
    lum = [float(d["rgb"][v][cube].mean()) for v in range(3)]
    assert lum[1] > lum[0] + 40 and lum[1] > lum[2] + 40, lum
    assert abs(lum[0] - lum[2]) < 3, lum
