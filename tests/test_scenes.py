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
from scipy import ndimage

from scenes import SCENES, SceneConfig, resolve_scene, sample_scene, scene_rng
from scenes.camera import visible_mask
from scenes.spec import to_jsonable
from segfactory.errors import UserError

FAMILIES = ["street", "tabletop", "cells"]
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


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
STREET_OBJECTS = ("vehicle", "bicycle", "person", "pole", "lamp", "bollard", "tree", "bush")


def test_street_objects_clear_buildings_and_each_other():
    from test_street_layout import hull, point_polygon_distance

    trees = 0
    for i in range(12):
        # Narrow sidewalks and many objects: big crowns and crowded sidewalks are where they used to collide.
        spec = _sample("street", index=i, views=1, sidewalk_width=[2.0, 3.0], **STREET_DENSE)
        objs = [o for o in spec.objects if _kind(o) in STREET_OBJECTS]
        # Buildings turn with a curved street: their outlines, not axis-aligned rectangles.
        buildings = [hull(o) for o in spec.objects if _kind(o) == "building"]
        trees += sum(_kind(o) == "tree" for o in objs)
        for o in objs:
            centre = np.array(o.location[:2])
            reach = np.linalg.norm(_world_xy(o) - centre, axis=1).max()
            gap = min(point_polygon_distance(centre, b) for b in buildings)
            assert gap >= reach - 1e-6, f"scene {i}: {o.name} reaches into a building"
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
    spec = _sample("street", views=2, vehicles=[0, 0], persons=[0, 0], poles=[0, 0], bicycles=[0, 0],
                   bollards=[0, 0], lamp_prob=0.0, intersection_prob=0.0,
                   crosswalk_prob=0.0)
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
                       irregularity=[0.15, 0.22], density=[20.0, 25.0])
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


# ------------------------------------------------------------------------------------------ cells realism
CELLS_FLAT = {"brightness": [0.2, 0.2], "brightness_spread": 0.0}  # every nucleus at the same signal


def _nuclei(spec) -> list:
    return [o for o in spec.objects if o.class_id == 1]


def test_cells_pixel_size_and_ranges_are_honoured():
    from scenes.cells import HEADROOM

    for index in range(3):
        spec = _sample("cells", index=index, views=2, pixel_size=[0.4, 0.4], nucleus_radius=[6.0, 6.0],
                       elongation=[1.0, 1.0], irregularity=[0.0, 0.0], defocus_fraction=[0.5, 0.5],
                       defocus=[1.0, 2.0], mitotic_fraction=[0.0, 0.0], dim_fraction=[0.0, 0.0], **CELLS_FLAT)
        # The view is pixel_size x resolution (256 by default) micrometres wide.
        assert all(abs(c.ortho_scale - 0.4 * 256) < 1e-9 for c in spec.cameras)
        nuclei = _nuclei(spec)
        assert len(nuclei) >= 10
        for o in nuclei:
            v = o.parts[0].mesh.vertices
            assert np.ptp(v[:, 0]) == pytest.approx(12.0, rel=0.03) and np.ptp(v[:, 1]) == pytest.approx(12.0, rel=0.03)
            assert o.parts[0].material.emission * HEADROOM == pytest.approx(0.2)
            assert o.defocus == 0.0 or 1.0 <= o.defocus <= 2.0
        blurred = sum(o.defocus > 0 for o in nuclei) / len(nuclei)
        assert 0.2 < blurred < 0.8  # about the half asked for
        # Every part of a nucleus' look is its texture (mean 1 inside), never a separate labeled object.
        assert {o.class_id for o in spec.objects} <= {0, 1, 2} and spec.film == "raw"
        assert all(o.parts[0].material.image is not None for o in nuclei)
        assert all(p.linear and p.gain == HEADROOM for p in spec.post)


@pytest.mark.parametrize(("params", "claim"), [
    ({"mitotic_fraction": [1.0, 1.0], "mitotic_brightness": [4.0, 5.0]}, "mitotic"),
    ({"mitotic_fraction": [0.0, 0.0], "dim_fraction": [1.0, 1.0], "dim_factor": [0.25, 0.25]}, "dim"),
    ({"mitotic_fraction": [0.0, 0.0], "dim_fraction": [0.0, 0.0], "defocus_fraction": [0.0, 0.0]}, "plain"),
])
def test_cells_mitotic_and_dim_nuclei_are_what_they_claim(params, claim):
    from scenes.cells import HEADROOM

    for index in range(3):
        nuclei = _nuclei(_sample("cells", index=index, views=1, pixel_size=[0.5, 0.5], **CELLS_FLAT, **params))
        assert nuclei
        signal = np.array([o.parts[0].material.emission * HEADROOM for o in nuclei])
        width = np.array([np.ptp(o.parts[0].mesh.vertices[:, 0]) for o in nuclei])
        names = {o.name.split("_")[0] for o in nuclei}
        if claim == "mitotic":
            # Condensed: at most 2 x 4 um radius x 2.8 elongation x irregular bulges; and 4-5 x the signal.
            assert names == {"mitotic"} and width.max() < 2 * 4.0 * 2.8 * 1.6
            assert np.all((signal >= 0.2 * 4.0 - 1e-9) & (signal <= 0.2 * 5.0 + 1e-9))
            texture_cv = [o.parts[0].material.image.std() for o in nuclei]
            assert np.median(texture_cv) > 0.3  # coarse, high-contrast granules
        elif claim == "dim":
            assert names == {"nucleus"} and np.allclose(signal, 0.2 * 0.25)
        else:
            assert names == {"nucleus"} and np.allclose(signal, 0.2) and width.min() > 2 * 5.0 * 0.6
            assert all(o.defocus == 0 for o in nuclei)


def test_cells_out_of_plane_nuclei_add_dim_blurred_light_labeled_background():
    """Out-of-plane nuclei (z-stack optical sections) are extra objects labeled background, dim, blurred, below the
    in-plane nuclei and with light of their own; turning them on leaves every other object, camera and post-fx of
    the scene as it was (they are drawn last)."""
    from scenes.cells import HEADROOM

    for index in range(3):
        plain = _sample("cells", index=index, views=2, pixel_size=[0.4, 0.4], **CELLS_FLAT)
        spec = _sample("cells", index=index, views=2, pixel_size=[0.4, 0.4], out_of_plane=[0.5, 0.5],
                       out_of_plane_dim=[0.2, 0.3], out_of_plane_defocus=[2.0, 3.0], **CELLS_FLAT)
        extra = spec.objects[len(plain.objects):]
        assert [o.name for o in spec.objects[:len(plain.objects)]] == [o.name for o in plain.objects]
        for a, b in zip(plain.objects, spec.objects, strict=False):
            assert a.location == b.location and a.class_id == b.class_id
        assert all(np.array_equal(a.rotation, b.rotation) and a.location == b.location
                   for a, b in zip(plain.cameras, spec.cameras, strict=True))
        assert plain.post == spec.post
        assert len(extra) == round(0.5 * len(_nuclei(plain)))  # per in-plane nucleus
        assert extra and all(o.name.startswith("out_of_plane_") for o in extra)
        assert all(o.class_id == spec.background_class and o.emits for o in extra)
        assert all(2.0 <= o.defocus <= 3.0 for o in extra)
        assert all(0.2 * 0.2 - 1e-9 <= o.parts[0].material.emission * HEADROOM <= 0.2 * 0.3 + 1e-9 for o in extra)
        assert max(o.location[2] for o in extra) < min(o.location[2] for o in _nuclei(spec))
        dark = spec.dark_objects()
        assert dark[0] and dark[1]  # nothing hit, the black slide
        assert not dark[len(plain.objects) + 1:].any() and not dark[2:len(plain.objects) + 1].any()
        assert not any(o.emits for o in plain.objects)  # the default: decided by class


def _touching_share(spec, slack: float = 0.5) -> float:
    """Share of nuclei whose outline comes within ``slack`` micrometres of another's."""
    nuclei = _nuclei(spec)
    touching = set()
    for a in range(len(nuclei)):
        for b in range(a + 1, len(nuclei)):
            d, extent = _centre_line_gap(nuclei[a], nuclei[b])
            if d < extent + slack:
                touching |= {a, b}
    return len(touching) / max(len(nuclei), 1)


def test_cells_clusters_pack_nuclei_into_touching_groups():
    common = {"density": [6.0, 6.0], "pixel_size": [0.5, 0.5], "max_overlap": 0.0}
    packed = [_touching_share(_sample("cells", index=i, views=1, clusters_per_field=[2, 2],
                                      cluster_share=[0.9, 0.9], **common)) for i in range(3)]
    scattered = [_touching_share(_sample("cells", index=i, views=1, clusters_per_field=[0, 0], **common))
                 for i in range(3)]
    assert np.mean(packed) > 0.6 and np.mean(scattered) < 0.25, (packed, scattered)


def test_cells_debris_stays_off_the_nuclei():
    for index in range(3):
        spec = _sample("cells", index=index, views=1, debris_per_field=[10, 10], max_overlap=0.0)
        debris = [o for o in spec.objects if o.class_id == 2]
        assert debris
        for dbr in debris:
            for nuc in _nuclei(spec):
                d, extent = _centre_line_gap(dbr, nuc)
                assert d >= extent - 1e-4, f"{dbr.name} lies on {nuc.name}"


def _texture(look, seed: int = 0):
    """A nucleus texture at 0.2 um texels, with each texel's depth inside the outline (um) and the inside mask."""
    from scenes import geometry as g
    from scenes.fluorescence import nucleus_texture, outline_radius

    rng = np.random.default_rng(seed)
    mesh = g.transform(g.blob(rng, 7.0, 0.1, rings=12, segments=36), scale=(1.2, 1.0, 0.35))
    tex, (x0, y0, x1, y1) = nucleus_texture(rng, mesh, look, 0.2)
    h, w = tex.shape
    assert (x1 - x0) / w == pytest.approx(0.2, rel=0.05) and (y1 - y0) / h == pytest.approx(0.2, rel=0.05)
    xx, yy = np.meshgrid(x0 + (np.arange(w) + 0.5) * (x1 - x0) / w, y0 + (np.arange(h) + 0.5) * (y1 - y0) / h)
    az = np.linspace(-np.pi, np.pi, 361)
    inside = np.hypot(xx, yy) <= np.interp(np.arctan2(yy, xx), az, outline_radius(mesh, az))
    return tex, ndimage.distance_transform_edt(inside) * 0.2, inside


def test_nucleus_texture_rim_nucleoli_and_chromatin():
    from scenes.fluorescence import NucleusLook

    plain = NucleusLook(chromatin_contrast=0.0, edge_width=0.1)
    tex, depth, inside = _texture(plain)
    assert tex[inside].mean() == pytest.approx(1.0, abs=1e-5) and tex[depth > 1.0].std() < 1e-3  # flat inside

    tex, depth, _ = _texture(NucleusLook(chromatin_contrast=0.0, edge_width=0.1, rim=0.6, rim_width=0.5))
    assert tex[(depth > 0.1) & (depth < 0.4)].mean() > 1.2 * tex[depth > 3].mean()  # the envelope is brighter

    tex, depth, _ = _texture(NucleusLook(chromatin_contrast=0.0, edge_width=0.1, nucleoli=3,
                                         nucleolus_radius=(1.2, 1.2), nucleolus_contrast=-0.7))
    interior = tex[depth > 1.5]
    # Three dark discs of radius 1.2 um: about 3 x 4.5 um2 of texels at well under the nucleoplasm's level.
    assert (interior < 0.6 * np.median(interior)).sum() * 0.04 > 5.0

    tex, depth, _ = _texture(NucleusLook(chromatin_contrast=0.3, chromatin_scales=(0.3, 1.0), edge_width=0.1))
    core = tex[depth > 1.0]
    assert 0.15 < core.std() / core.mean() < 0.5  # about the contrast asked for
    fine = tex - ndimage.gaussian_filter(tex, 2.0)
    assert fine[depth > 1.0].std() > 0.05  # texture at the finest scale, not only broad blotches


# ------------------------------------------------------------------- post-processing (no Blender either)
def test_camera_model_writes_offset_12_bit_counts_and_saturates():
    from scenes.spec import PostFX
    from synth.postfx import apply_post

    rgb = np.zeros((64, 64), dtype=np.uint16)
    rgb[10:30, 10:30] = 65535 // 16  # 1/16 of the render's range: with gain 8, half the camera's full scale
    rgb[40:50, 40:50] = 65535 // 2  # 4 x the camera's full scale: saturates
    fx = PostFX(linear=True, gain=8.0, background=0.05, illumination=0.2, vignetting=0.2, poisson_peak=2000.0,
                noise_std=0.004, camera_bits=12, camera_offset=32768)
    out = apply_post(rgb, fx, np.random.default_rng(0), out_dtype=np.uint16)
    assert out.dtype == np.uint16 and out.min() >= 32768 and out.max() <= 32768 + 4095
    assert np.all(out[40:50, 40:50] == 32768 + 4095)  # clipped at the camera maximum
    assert 0.3 * 4095 < np.median(out[10:30, 10:30]) - 32768 < 0.7 * 4095
    bg = out[55:, :8].astype(float) - 32768
    assert 0.01 * 4095 < np.median(bg) < 0.1 * 4095  # background glow above the offset, not at zero
    # Same frame, same generator seed: the same pixels; 8-bit output cannot hold the offset.
    assert np.array_equal(out, apply_post(rgb, fx, np.random.default_rng(0), out_dtype=np.uint16))
    with pytest.raises(ValueError, match="do not fit"):
        apply_post(rgb, fx, np.random.default_rng(0), out_dtype=np.uint8)


def test_per_object_defocus_blurs_that_object_only():
    from scenes.spec import PostFX
    from synth.postfx import apply_post

    index = np.zeros((64, 64), dtype=np.int32)
    index[10:26, 10:26] = 1  # blurred
    index[36:52, 36:52] = 2  # sharp
    rgb = np.where(index > 0, 30000, 0).astype(np.uint16)
    out = apply_post(rgb, PostFX(linear=True), np.random.default_rng(0), index, np.array([0.0, 3.0, 0.0]))
    assert np.array_equal(out[36:52, 36:52], rgb[36:52, 36:52]) and out[55:, 55:].max() == 0
    assert out[10:26, 10:26].min() < 20000 and out[6:9, 10:26].min() > 1000  # soft inside, light spills out
    assert out[:32, :32].sum() == pytest.approx(rgb[:32, :32].sum(), rel=0.02)  # light is kept, only spread

    # The color pass's anti-aliasing puts some of an object's light in the pixels just outside its label; left
    # sharp around a blurred object, that edge would draw the label outline into the image.
    rgb[9, 10:26] = 15000  # half-covered pixels above the object, labeled background (index 0, dark)
    dark = np.array([True, False, False])
    soft = apply_post(rgb, PostFX(linear=True), np.random.default_rng(0), index, np.array([0.0, 3.0, 0.0]),
                      dark=dark)
    ring = apply_post(rgb, PostFX(linear=True), np.random.default_rng(0), index, np.array([0.0, 3.0, 0.0]))
    column = soft[2:18, 18].astype(int)  # from outside, across the edge, into the object
    assert np.all(np.diff(column) >= 0), column
    assert ring[9, 18] > ring[10, 18] + 3000  # without: a bright line along the label boundary


def test_unused_post_knobs_draw_nothing():
    """Fixed ranges (the camera knobs' defaults) take nothing from the generator, so the families that do not use
    them sample every later value as before those knobs existed."""
    from scenes.randomization import PostKnobs, sample_post

    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    fx = sample_post(rng, PostKnobs(exposure=(0.1, 0.1), blur_sigma=(0.0, 0.0), noise_std=(0.01, 0.01)))
    assert rng.bit_generator.state == before
    assert (fx.illumination, fx.vignetting, fx.background, fx.camera_bits, fx.camera_offset) == (0, 0, 0, 0, 0)
    fx = sample_post(rng, PostKnobs(camera_bits=12, camera_offset=(100, 200), background=(0.01, 0.02)))
    assert fx.camera_bits == 12 and 100 <= fx.camera_offset <= 200 and 0.01 <= fx.background <= 0.02


def test_camera_bits_beyond_the_output_depth_stop_before_rendering():
    from pipelines.render import resolve_render_config
    from segfactory.config import load_config
    from synth.config import RenderConfig

    cfg = load_config(RenderConfig, CONFIGS_DIR / "cells.yaml")
    assert cfg.output.bit_depth == 16
    resolve_render_config(cfg)
    with pytest.raises(UserError) as e:
        resolve_render_config(load_config(RenderConfig, CONFIGS_DIR / "cells.yaml", ["output.bit_depth=8"]))
    assert "camera_bits" in e.value.message and "output.bit_depth=16" in e.value.fix


def test_a_family_whose_light_names_a_view_the_scene_lacks_is_refused() -> None:
    """A light for one view (``Light.view``, a camera flash) must name one of the scene's views: else Blender would
    keyframe it on a frame that is never rendered and the view it was meant for would go without it."""
    import dataclasses

    from scenes.spec import Light

    resolved = resolve_scene(SceneConfig(family="cells"))
    inner = resolved.family.sampler

    def with_light(view: int):
        def sampler(ctx):
            spec = inner(ctx)
            spec.lights.append(Light("point", (0.0, 0.0, 1.0), view=view))
            return spec
        return dataclasses.replace(resolved, family=dataclasses.replace(resolved.family, sampler=sampler))

    assert sample_scene(with_light(1), scene_rng(0, 0), views=2, resolution=64).lights[-1].view == 1
    for bad in (2, -1):
        with pytest.raises(RuntimeError, match=f"returned light .* for view {bad}, but the scene has views 0..1"):
            sample_scene(with_light(bad), scene_rng(0, 0), views=2, resolution=64)
