"""Seated and squatting street people, benches and ``seated_people`` (scenes/street_assets/people.py, furniture.py,
scenes/street.py): sampled without Blender."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS, render_cli
from test_render import check_coco, check_layout
from test_street_layout import (
    DENSE,
    SURFACES,
    hull,
    kind,
    layout,
    overlap_depth,
    surface_height,
    surface_triangles,
    world_vertices,
)

from scenes.randomization import MaterialKnobs
from scenes.spec import SceneObject, to_jsonable
from scenes.street import SEATED_GAP, StreetParams, bench_with_sitters
from scenes.street_assets.furniture import sample_bench
from scenes.street_assets.people import POSES, SEAT_TOLERANCE, Figure, sample_figure, sample_person
from segfactory.formats.dataset import load_frame, open_dataset

K = MaterialKnobs()
BODY = ("skin", "hair", "top", "bottom", "shoes", "coat", "skirt", "legwear")


def figure(seed: int, pose: str, **kw) -> Figure:
    return sample_figure(np.random.default_rng(seed), K, pose, **kw)  # type: ignore[arg-type]


def body_vertices(f: Figure) -> np.ndarray:
    return np.concatenate([p.mesh.vertices for r, p in f.parts.items() if r in BODY]).astype(np.float64)


def test_seated_poses_are_deterministic_per_seed_and_never_drawn_by_default():
    for pose in ("sit", "squat"):
        a, b = sample_person(np.random.default_rng(3), K, pose), sample_person(np.random.default_rng(3), K, pose)
        assert to_jsonable(a) == to_jsonable(b)
    assert set(POSES) == {"stand", "walk"}
    assert {figure(s, None).pose for s in range(40)} == {"stand", "walk"}  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(16))
def test_a_sitter_rests_on_its_seat_with_its_feet_flat_on_the_ground(seed):
    seat = 0.4 + 0.005 * seed
    f = figure(seed, "sit", seat_height=seat)
    assert f.pose == "sit" and f.seat_height is not None and f.seat_front is not None
    assert abs(f.seat_height - seat) <= 0.005
    feet = f.parts["shoes"].mesh.vertices
    assert abs(feet[:, 2].min()) <= 1e-4
    for i in range(2):  # both soles on the ground, the feet in front of the seat
        foot = feet[np.sign(feet[:, 0]) == (1 if i == 0 else -1)]
        assert foot[:, 2].min() <= 0.01 and foot[:, 1].max() > f.seat_front
    v = body_vertices(f)
    assert v[:, 2].min() >= -1e-4
    over = v[v[:, 1] <= f.seat_front]  # nothing sinks into the seat
    assert over[:, 2].min() >= seat - SEAT_TOLERANCE - 0.002
    pelvis, knees = f.joints["pelvis"], [f.joints[f"knee{i}"] for i in range(2)]
    assert seat + 0.03 < pelvis[2] < seat + 0.16  # the hip joints just above the seat
    assert f.seat_front - pelvis[1] > 0.0  # the seat reaches in front of the hips, under the thighs
    for knee in knees:  # thighs roughly level (knees near hip height), knees in front of the hips
        assert abs(knee[2] - pelvis[2]) < 0.2 and knee[1] - pelvis[1] > 0.8 * f.body.thigh


@pytest.mark.parametrize("seed", range(16))
def test_a_squatter_has_its_soles_on_the_ground_and_its_hips_low(seed):
    f = figure(seed, "squat")
    assert abs(f.parts["shoes"].mesh.vertices[:, 2].min()) <= 1e-4
    assert min(p.mesh.vertices[:, 2].min() for p in f.part_list()) >= -1e-4
    assert f.joints["pelvis"][2] < 0.45 * f.body.hip_z  # well below standing
    top = body_vertices(f)[:, 2].max()
    assert top < 0.8 * f.body.height
    assert f.accessory in ("none", "backpack")


@pytest.mark.parametrize("seed", range(8))
def test_bench_sitters_sit_on_the_seat_clear_of_the_backrest(seed):
    bench, seated = bench_with_sitters(np.random.default_rng(seed), K, 3)
    v = np.concatenate([p.mesh.vertices for p in bench.parts])
    assert abs(v[:, 2].min()) < 1e-6 and abs(v[:, 1].max()) < 1e-6 and v[:, 2].max() >= bench.seat_height - 1e-6
    assert sum(len(p.mesh.faces) for p in bench.parts) <= 400
    assert 1 <= len(seated) <= 3
    xs = sorted(x for _, x, _ in seated)
    assert all(b - a >= SEATED_GAP - 0.1 for a, b in itertools.pairwise(xs))
    for f, x, y in seated:
        body = body_vertices(f) + np.array([x, y, 0.0])
        on = body[(np.abs(body[:, 0]) <= bench.length / 2) & (body[:, 1] <= 0) & (body[:, 1] >= -bench.depth)]
        assert len(on) and on[:, 2].min() >= bench.seat_height - SEAT_TOLERANCE - 0.002
        assert on[:, 2].min() <= bench.seat_height + 0.01  # resting on it, not floating
        behind = body[(body[:, 1] < -bench.depth) & (body[:, 2] > bench.seat_height - SEAT_TOLERANCE)]
        assert not len(behind)  # nothing in the backrest
        assert abs(f.parts["shoes"].mesh.vertices[:, 2].min()) <= 1e-4  # feet on the ground in front
        assert f.parts["shoes"].mesh.vertices[:, 1].min() + y > 0


def test_benches_vary():
    benches = [sample_bench(np.random.default_rng(s), K) for s in range(30)]
    assert {b.back for b in benches} == {True, False}
    assert all(0.38 <= b.seat_height <= 0.5 and 0.3 <= b.depth <= 0.55 for b in benches)


def _digest(lay) -> list:
    return to_jsonable(lay.spec)


def _same_at_zero(n: int) -> None:
    for i in range(n):
        assert _digest(layout(index=i, seed=11, views=1)) == _digest(layout(index=i, seed=11, views=1,
                                                                            seated_people=0.0)), i


def test_seated_people_zero_leaves_every_scene_as_it_was():
    """At 0 (the default, and absent) the scenes are the same; it stays out of the dumped params (config hashes)."""
    assert "seated_people" not in StreetParams().model_dump(mode="json")
    assert StreetParams(seated_people=0.3).model_dump(mode="json")["seated_people"] == 0.3
    _same_at_zero(6)


@pytest.mark.render
def test_a_rendered_street_with_seated_people_has_person_and_bench_masks_and_valid_coco(tmp_path: Path):
    """One scene, one 64 px view framed on people (``person_views=1``), everyone on the sidewalks seated."""
    out = tmp_path / "street"
    assert render_cli(str(CONFIGS / "street.yaml"), "--out", str(out), "--scenes", "1", "--views", "1",
                      "--resolution", "64", "--workers", "1", "render.samples=8", "scene.params.seated_people=1.0",
                      "scene.params.person_views=1.0", "scene.params.persons=[24,24]") == 0
    check_layout(out, channels=3, bit_depth=8)
    assert check_coco(out) > 0
    ids = {c["name"]: c["id"] for c in open_dataset(out).classes}
    sem = load_frame(next(iter(open_dataset(out).frames())))["semantic"]
    assert (sem == ids["person"]).any() and (sem == ids["pole_sign"]).any()


def _bench_parts(lay) -> list[SceneObject]:
    return [o for o in lay.spec.objects if kind(o) == "bench"]


@pytest.mark.parametrize("index", range(4))
def test_seated_people_changes_only_people_and_adds_benches(index):
    off = layout(index=index, views=2, **DENSE)
    on = layout(index=index, views=2, seated_people=0.6, **DENSE)
    names = {c.id: c.name for c in on.spec.classes}
    benches = _bench_parts(on)
    assert benches and all(names[b.class_id] == "pole_sign" for b in benches)
    rest = [o for o in on.spec.objects if kind(o) != "bench"]
    assert [o.name for o in rest] == [o.name for o in off.spec.objects]
    changed = 0
    for a, b in zip(off.spec.objects, rest, strict=True):
        if kind(a) == "person":
            changed += to_jsonable(a) != to_jsonable(b)
        else:
            assert to_jsonable(a) == to_jsonable(b), a.name
    assert changed >= 3
    assert on.spec.lights == off.spec.lights and on.spec.world == off.spec.world


@pytest.mark.parametrize("index", range(6))
def test_benches_and_seated_people_interpenetrate_nothing_and_stand_on_the_sidewalk(index):
    lay = layout(index=index, views=1, seated_people=1.0, sidewalk_width=[2.0, 3.0], **DENSE)
    objs = [o for o in lay.spec.objects if kind(o) not in SURFACES]
    hulls = [hull(o) for o in objs]
    tris = surface_triangles(lay.spec)
    benches = [i for i, o in enumerate(objs) if kind(o) == "bench"]
    assert benches
    sitters = 0
    for bi in benches:
        b = objs[bi]
        bv = world_vertices(b)
        yaw = b.rotation[2]
        rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
        local_b = np.column_stack([(bv[:, :2] - b.location[:2]) @ rot, bv[:, 2] - b.location[2]])
        seat = local_b[local_b[:, 1] > -0.05, 2].max()
        slats = local_b[np.abs(local_b[:, 2] - seat) < 1e-3]
        depth, half = -slats[:, 1].min(), np.abs(slats[:, 0]).max()
        # The bench's feet on the sidewalk top.
        assert np.all(np.abs(surface_height(tris, bv[bv[:, 2] <= bv[:, 2].min() + 0.02, :2]) - bv[:, 2].min())
                      <= 1e-3)
        for j, o in enumerate(objs):
            if j == bi:
                continue
            if overlap_depth(hulls[bi], hulls[j]) <= 1e-4:
                continue
            # Only the people sitting on it reach over it: resting on its seat, nothing in the seat or backrest.
            assert kind(o) == "person", f"{o.name} overlaps {b.name}"
            v = world_vertices(o)
            lv = np.column_stack([(v[:, :2] - b.location[:2]) @ rot, v[:, 2] - b.location[2]])
            inside = np.abs(lv[:, 0]) <= half
            on = lv[inside & (lv[:, 1] <= 0) & (lv[:, 1] >= -depth)]
            assert on[:, 2].min() >= seat - SEAT_TOLERANCE - 0.003, o.name
            assert not np.any(inside & (lv[:, 1] < -depth) & (lv[:, 2] > seat - SEAT_TOLERANCE)), o.name
            assert abs(v[:, 2].min() - b.location[2]) <= 1e-3  # feet on the ground
            sitters += 1
    assert sitters >= 2
    # Everything else still keeps clear of everything (people beside each other on a bench included).
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if i in benches or j in benches:
                continue
            assert overlap_depth(hulls[i], hulls[j]) <= 1e-4, f"{objs[i].name} overlaps {objs[j].name}"
    for o in objs:  # people, seated or not, on the surface under them
        if kind(o) == "person":
            v = world_vertices(o)
            base = v[v[:, 2] <= v[:, 2].min() + 0.02]
            assert np.all(np.abs(surface_height(tris, base[:, :2]) - v[:, 2].min()) <= 0.006), o.name
