"""Scene sampling without Blender: determinism, class maps, placement, cameras, user meshes, config errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh

from scenes import SCENES, SceneConfig, resolve_scene, sample_scene, scene_rng
from scenes.camera import visible_mask
from scenes.spec import to_jsonable
from segfactory.errors import UserError

FAMILIES = ["street", "tabletop", "cells"]


def _sample(family: str, seed: int = 0, index: int = 0, views: int = 3, **params):
    resolved = resolve_scene(SceneConfig(family=family, params=params))
    return sample_scene(resolved, scene_rng(seed, index), views)


def _world_xy(obj) -> np.ndarray:
    """(V, 2) world x/y of all of an object's vertices (scale 1, yaw only, as the families place them)."""
    xy = np.concatenate([p.mesh.vertices[:, :2] for p in obj.parts]).astype(np.float64)
    yaw = obj.rotation[2]
    rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
    return xy @ rot.T + np.array(obj.location[:2])


def _centre_line_gap(a, b) -> tuple[float, float]:
    """(distance of the origins, summed extents of both outlines along the line between them).

    Extents <= distance means that line separates the two outlines' convex hulls: the objects are disjoint.
    """
    ca, cb = np.array(a.location[:2]), np.array(b.location[:2])
    d = float(np.linalg.norm(cb - ca))
    u = (cb - ca) / max(d, 1e-12)
    return d, float(((_world_xy(a) - ca) @ u).max() + ((_world_xy(b) - cb) @ -u).max())


def _kind(obj) -> str:
    return obj.name.rsplit("_", 1)[0]


def test_scenes_never_import_blender():
    code = "import sys, scenes, scenes.street, scenes.tabletop, scenes.cells, segfactory.formats.dataset, " \
           "synth.shard, pipelines.render, segfactory.cli; segfactory.cli.build_parser(); " \
           "print(json.dumps([m for m in ('bpy', 'blenderproc', 'torch') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_deterministic_per_seed(family):
    a = json.dumps(to_jsonable(_sample(family, seed=3, index=7)), sort_keys=True)
    b = json.dumps(to_jsonable(_sample(family, seed=3, index=7)), sort_keys=True)
    c = json.dumps(to_jsonable(_sample(family, seed=3, index=8)), sort_keys=True)
    assert a == b
    assert a != c


@pytest.mark.parametrize("family", FAMILIES)
def test_class_maps_and_views(family):
    spec = _sample(family, views=4)
    ids = [c.id for c in spec.classes]
    assert len(ids) == len(set(ids)) and max(ids) < 255
    assert spec.background_class in ids
    assert {o.class_id for o in spec.objects} <= set(ids)
    assert any(c.thing for c in spec.classes)
    assert len(spec.cameras) == len(spec.post) == 4
    for obj in spec.objects:
        for part in obj.parts:
            assert part.mesh.faces.max() < len(part.mesh.vertices)
            assert np.isfinite(part.mesh.vertices).all()


def test_street_has_all_documented_classes_over_a_few_scenes():
    seen = set()
    for i in range(4):
        spec = _sample("street", index=i)
        seen |= {spec.classes[o.class_id].name for o in spec.objects}
    assert seen >= {"road", "sidewalk", "lane_marking", "building", "vehicle", "person", "pole_sign", "vegetation"}


def test_tabletop_objects_do_not_interpenetrate():
    for i in range(5):
        spec = _sample("tabletop", index=i, mugs=[2, 2], bottles=[2, 2], boxes=[2, 2], cans=[2, 2], fruits=[2, 2])
        things = [o for o in spec.objects if spec.classes[o.class_id].thing]
        assert len(things) >= 6
        circles = []
        for o in things:
            xy = np.concatenate([p.mesh.vertices[:, :2] for p in o.parts])
            yaw = o.rotation[2]
            rot = np.array([[np.cos(yaw), -np.sin(yaw)], [np.sin(yaw), np.cos(yaw)]])
            world = xy @ rot.T + np.array(o.location[:2])
            center = np.array(o.location[:2])
            circles.append((center, np.linalg.norm(world - center, axis=1).max()))
        for a in range(len(circles)):
            for b in range(a + 1, len(circles)):
                (ca, ra), (cb, rb) = circles[a], circles[b]
                assert np.linalg.norm(ca - cb) >= ra + rb - 1e-6


STREET_DENSE = {"vehicles": [10, 10], "persons": [10, 10], "poles": [8, 8], "trees": [10, 10]}
STREET_OBJECTS = ("vehicle", "person", "pole", "tree")


def test_street_objects_clear_buildings_and_each_other():
    trees = 0
    for i in range(12):
        # Narrow sidewalks and many objects: big crowns and crowded sidewalks are where they used to collide.
        spec = _sample("street", index=i, views=1, sidewalk_width=[2.0, 3.0], **STREET_DENSE)
        objs = [o for o in spec.objects if _kind(o) in STREET_OBJECTS]
        buildings = [_world_xy(o) for o in spec.objects if _kind(o) == "building"]
        rects = np.array([[*b.min(axis=0), *b.max(axis=0)] for b in buildings])
        trees += sum(_kind(o) == "tree" for o in objs)
        for o in objs:
            centre = np.array(o.location[:2])
            reach = np.linalg.norm(_world_xy(o) - centre, axis=1).max()
            gap = np.hypot(np.maximum(np.maximum(rects[:, 0] - centre[0], centre[0] - rects[:, 2]), 0),
                           np.maximum(np.maximum(rects[:, 1] - centre[1], centre[1] - rects[:, 3]), 0))
            assert gap.min() >= reach - 1e-6, f"scene {i}: {o.name} reaches into a building"
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                d, extent = _centre_line_gap(objs[a], objs[b])
                assert d >= extent - 1e-6, f"scene {i}: {objs[a].name} overlaps {objs[b].name}"
    assert trees >= 12 * 10 * 0.6  # still most of the trees asked for, not dropped to make room


def test_street_cameras_are_outside_objects_and_record_visibility():
    for i in range(15):
        spec = _sample("street", index=i, views=8, **STREET_DENSE)
        objs = [o for o in spec.objects if _kind(o) in STREET_OBJECTS]
        for cam in spec.cameras:
            eye = np.array(cam.location[:2])
            for o in objs:
                # Distance from the object's convex outline to the camera, bounded from below along the line
                # from the object's origin through the camera.
                centre = np.array(o.location[:2])
                d = float(np.linalg.norm(eye - centre))
                u = (eye - centre) / max(d, 1e-12)
                assert d - ((_world_xy(o) - centre) @ u).max() >= cam.clip_start, \
                    f"scene {i}: camera at {cam.location} is inside {o.name}"
            assert cam.visible_objects is not None and cam.min_visible_met == (cam.visible_objects >= 2)
    # No labeled things at all: two can never be in view, and the kept best attempt says so.
    spec = _sample("street", views=2, vehicles=[0, 0], persons=[0, 0], poles=[0, 0])
    assert [c.min_visible_met for c in spec.cameras] == [False, False]
    tabletop = _sample("tabletop", index=1, views=4)
    assert all(c.min_visible_met and c.visible_objects >= 2 for c in tabletop.cameras)


def test_camera_sampling_keeps_objects_in_view():
    spec = _sample("tabletop", index=1, views=6)
    targets = np.array([o.location for o in spec.objects if spec.classes[o.class_id].thing])
    counts = [int(visible_mask(cam, targets).sum()) for cam in spec.cameras]
    assert min(counts) >= min(2, len(targets))


@pytest.mark.parametrize("max_overlap", [0.0, 0.3])
def test_cells_overlap_is_bounded_and_grayscale(max_overlap):
    overlapping = 0
    for index in range(3):
        spec = _sample("cells", index=index, max_overlap=max_overlap, elongation=[1.4, 1.7],
                       irregularity=[0.15, 0.22])
        assert spec.grayscale and all(c.projection == "orthographic" for c in spec.cameras)
        nuclei = [o for o in spec.objects if spec.classes[o.class_id].name == "nucleus"]
        assert len(nuclei) >= 20
        sizes = [np.ptp(o.parts[0].mesh.vertices[:, 0]) for o in nuclei]
        assert max(sizes) / min(sizes) > 1.5  # varied sizes
        # Pairwise, on the nuclei's real outlines: their extents along the line between their centres may
        # exceed the distance by at most max_overlap of those extents (0: a separating axis, disjoint).
        for a in range(len(nuclei)):
            for b in range(a + 1, len(nuclei)):
                d, extent = _centre_line_gap(nuclei[a], nuclei[b])
                assert d >= extent * (1 - max_overlap) - 1e-4, f"{nuclei[a].name} and {nuclei[b].name} overlap"
                overlapping += d < extent
    assert (overlapping > 0) == (max_overlap > 0)  # overlap allowed is used; none allowed means none


def test_user_mesh_contents_are_pinned_in_the_config_hash(tmp_path: Path):
    from pipelines.render import resolve_render_config
    from synth.config import RenderConfig

    mesh_path = tmp_path / "duck.ply"
    trimesh.creation.icosphere(subdivisions=2).export(mesh_path)
    scene = {"family": "tabletop", "params": {"user_meshes": [{"path": str(mesh_path), "class_name": "duck",
                                                               "count": [2, 2]}], "extra_classes": ["duck"]}}
    before, hash_before = resolve_render_config(RenderConfig.model_validate({"scene": scene}))
    assert before.scene.params["user_meshes"][0]["sha256"] == hashlib.sha256(mesh_path.read_bytes()).hexdigest()
    # The resolved config (as saved next to the dataset and sent to workers) resolves to the same hash.
    assert resolve_render_config(RenderConfig.model_validate(before.model_dump(mode="json")))[1] == hash_before

    trimesh.creation.box().export(mesh_path)  # edit the mesh in place
    after, hash_after = resolve_render_config(RenderConfig.model_validate({"scene": scene}))
    assert hash_after != hash_before
    with pytest.raises(UserError) as e:  # the old resolved config no longer matches the file
        resolve_scene(SceneConfig.model_validate(before.scene.model_dump(mode="json")))
    assert "has changed" in e.value.message and "user_meshes.0.sha256" in e.value.message
    spec = sample_scene(resolve_scene(after.scene), scene_rng(0, 0), 1)
    ducks = [o for o in spec.objects if o.name.startswith("duck")]
    assert ducks and all(len(o.parts[0].mesh.vertices) == 8 for o in ducks)  # the box, not a cached sphere


def test_user_mesh_is_placed_with_its_class(tmp_path: Path):
    mesh_path = tmp_path / "duck.ply"
    trimesh.creation.icosphere(subdivisions=2).export(mesh_path)
    spec = _sample("tabletop", user_meshes=[{"path": str(mesh_path), "class_name": "duck", "count": [2, 2]}],
                   extra_classes=["duck"], mugs=[0, 0])
    duck = next(c for c in spec.classes if c.name == "duck")
    assert duck.thing and duck.id == 8
    assert sum(o.class_id == duck.id for o in spec.objects) == 2


@pytest.mark.parametrize(("params", "needle"), [
    ({"user_meshes": [{"path": "/nonexistent/mesh.obj", "class_name": "mug"}]}, "does not exist"),
    ({"user_meshes": [{"path": "CORRUPT", "class_name": "mug"}]}, "cannot be read"),
    ({"user_meshes": [{"path": "OK", "class_name": "teapot"}]}, "not a known class"),
    ({"mugs": [-1, 2]}, "must not be negative"),
    ({"mugs": [3, 1]}, "low <= high"),
])
def test_bad_scene_params_name_field_and_fix(tmp_path: Path, params, needle):
    corrupt = tmp_path / "broken.obj"
    corrupt.write_bytes(b"v 0 0 0\nv 1 0 0\nf 1 2 9999\n\x00\xff garbage")
    ok = tmp_path / "ok.stl"
    trimesh.creation.box().export(ok)
    for m in params.get("user_meshes", []):
        m["path"] = {"CORRUPT": str(corrupt), "OK": str(ok)}.get(m["path"], m["path"])
    with pytest.raises(UserError) as e:
        resolve_scene(SceneConfig(family="tabletop", params=params))
    assert needle in str(e.value)
    assert "scene.params." in e.value.message


def test_unknown_family_lists_valid_names():
    with pytest.raises(UserError) as e:
        resolve_scene(SceneConfig(family="stret"))
    assert "did you mean 'street'" in e.value.message
    assert set(FAMILIES) <= set(SCENES.names())
    assert all(name in e.value.fix for name in FAMILIES)
