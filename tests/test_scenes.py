"""Scene sampling without Blender: determinism, class maps, placement, cameras, user meshes, config errors."""

from __future__ import annotations

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


def test_scenes_never_import_blender():
    code = "import sys, scenes, scenes.street, scenes.tabletop, scenes.cells, synth.dataset, synth.shard, " \
           "pipelines.render, segfactory.cli; segfactory.cli.build_parser(); " \
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


def test_camera_sampling_keeps_objects_in_view():
    spec = _sample("tabletop", index=1, views=6)
    targets = np.array([o.location for o in spec.objects if spec.classes[o.class_id].thing])
    counts = [int(visible_mask(cam, targets).sum()) for cam in spec.cameras]
    assert min(counts) >= min(2, len(targets))


def test_cells_overlap_is_bounded_and_grayscale():
    spec = _sample("cells", index=2, max_overlap=0.0)
    assert spec.grayscale and all(c.projection == "orthographic" for c in spec.cameras)
    nuclei = [o for o in spec.objects if spec.classes[o.class_id].name == "nucleus"]
    assert len(nuclei) >= 20
    sizes = [np.ptp(o.parts[0].mesh.vertices[:, 0]) for o in nuclei]
    assert max(sizes) / min(sizes) > 1.5  # varied sizes


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
