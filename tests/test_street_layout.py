"""The ``street`` family's layout without Blender: footprints, support surfaces, cameras, curves, intersections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial import ConvexHull

from scenes import SceneConfig, resolve_scene, scene_rng
from scenes.registry import SceneContext
from scenes.spec import SceneObject, to_jsonable
from scenes.street import CAMERA_KINDS, MARK_H, YELLOW_PAINT, StreetLayout, StreetParams, build_street
from scenes.street_assets.environment import EnvironmentKnobs, sample_environment

# Surfaces things stand on (road, paint, curbs, sidewalks, verges, the grass outside the street).
SURFACES = {"ground", "road", "cross_road", "sidewalk", "curb", "verge", "lane_marking", "road_patch", "puddle",
            "road_crack"}
DENSE = {"vehicles": [14, 14], "persons": [24, 24], "poles": [8, 8], "trees": [10, 10], "bushes": [6, 6],
         "bollards": [8, 8], "bicycles": [3, 3]}


def layout(index: int = 0, seed: int = 0, views: int = 4, **params) -> StreetLayout:
    resolved = resolve_scene(SceneConfig(family="street", params=params))
    return build_street(SceneContext(scene_rng(seed, index), resolved.params, resolved.randomization, views,
                                     resolved.classes, 128))


def kind(obj: SceneObject) -> str:
    return obj.name.rsplit("_", 1)[0]


def world_vertices(obj: SceneObject) -> np.ndarray:
    """(V, 3) world coordinates of all of an object's vertices (yaw and location only, as the family places)."""
    v = np.concatenate([p.mesh.vertices for p in obj.parts]).astype(np.float64)
    yaw = obj.rotation[2]
    rot = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    return v @ rot.T + np.array(obj.location)


def hull(obj: SceneObject) -> np.ndarray:
    """(H, 2) convex outline of an object seen from above, counter-clockwise."""
    xy = world_vertices(obj)[:, :2]
    return xy[ConvexHull(xy).vertices]


def overlap_depth(a: np.ndarray, b: np.ndarray) -> float:
    """How deep two convex polygons overlap along their least-overlapping edge normal (<= 0: disjoint)."""
    depth = np.inf
    for poly in (a, b):
        e = np.roll(poly, -1, axis=0) - poly
        n = np.column_stack([e[:, 1], -e[:, 0]]) / np.linalg.norm(e, axis=1)[:, None]
        pa, pb = a @ n.T, b @ n.T
        depth = min(depth, float(np.min(np.minimum(pa.max(0) - pb.min(0), pb.max(0) - pa.min(0)))))
    return depth


def point_polygon_distance(p: np.ndarray, poly: np.ndarray) -> float:
    """Distance from a point to a convex counter-clockwise polygon (0 inside)."""
    a, b = poly, np.roll(poly, -1, axis=0)
    ab, ap = b - a, p - a
    if np.all(ab[:, 0] * ap[:, 1] - ab[:, 1] * ap[:, 0] >= 0):
        return 0.0
    u = np.clip((ap * ab).sum(1) / (ab * ab).sum(1), 0, 1)
    return float(np.linalg.norm(ap - u[:, None] * ab, axis=1).min())


def surface_triangles(spec) -> np.ndarray:
    """(F, 3, 3) world triangles of every surface object that is not vertical."""
    tris = []
    for o in spec.objects:
        if kind(o) not in SURFACES:
            continue
        v, off = world_vertices(o), 0
        for p in o.parts:
            tris.append(v[off:off + len(p.mesh.vertices)][p.mesh.faces])
            off += len(p.mesh.vertices)
    t = np.concatenate(tris)
    d1, d2 = t[:, 1, :2] - t[:, 0, :2], t[:, 2, :2] - t[:, 0, :2]
    area = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    return t[np.abs(area) > 1e-9]


def surface_height(tris: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(P,) height of the highest surface triangle above or below each of the (P, 2) points."""
    a, b, c = tris[:, 0], tris[:, 1], tris[:, 2]
    v0, v1 = b[:, :2] - a[:, :2], c[:, :2] - a[:, :2]
    den = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
    out = np.full(len(xy), -np.inf)
    for i, p in enumerate(xy):
        w = p - a[:, :2]
        u = (w[:, 0] * v1[:, 1] - w[:, 1] * v1[:, 0]) / den
        v = (v0[:, 0] * w[:, 1] - v0[:, 1] * w[:, 0]) / den
        inside = (u >= -1e-9) & (v >= -1e-9) & (u + v <= 1 + 1e-9)
        if inside.any():
            z = a[inside, 2] + u[inside] * (b[inside, 2] - a[inside, 2]) + v[inside] * (c[inside, 2] - a[inside, 2])
            out[i] = z.max()
    return out


def test_layout_is_deterministic_per_seed():
    a, b, c = layout(index=5), layout(index=5), layout(index=6)
    dump = [json.dumps(to_jsonable(x.spec), sort_keys=True) for x in (a, b, c)]
    assert dump[0] == dump[1] != dump[2]
    assert (a.curved, a.intersection, a.camera_kinds) == (b.curved, b.intersection, b.camera_kinds)


def test_class_ids_are_stable():
    spec = layout().spec
    assert [(c.id, c.name, c.thing) for c in spec.classes] == [
        (0, "sky", False), (1, "road", False), (2, "sidewalk", False), (3, "lane_marking", False),
        (4, "building", False), (5, "vehicle", True), (6, "person", True), (7, "pole_sign", True),
        (8, "vegetation", False)]
    expect = {"person": "person", "vehicle": "vehicle", "bicycle": "vehicle", "lamp": "pole_sign",
              "pole": "pole_sign", "bollard": "pole_sign", "tree": "vegetation", "bush": "vegetation",
              "building": "building", "curb": "sidewalk", "sidewalk": "sidewalk", "verge": "vegetation",
              "puddle": "road", "road_patch": "road", "road_crack": "road", "road": "road", "cross_road": "road",
              "lane_marking": "lane_marking", "ground": "vegetation"}
    cls: dict[str, set[str]] = {}
    for i in range(3):
        lay = layout(index=i, views=1, verge_prob=1.0, patches=[2, 2], cracks=[2, 2], intersection_prob=1.0,
                     lamp_prob=1.0, environment={"weights": {"clear": 0, "overcast": 0, "dusk": 0, "rain": 1}}, **DENSE)
        names = {c.id: c.name for c in lay.spec.classes}
        for o in lay.spec.objects:
            cls.setdefault(kind(o), set()).add(names[o.class_id])
    assert cls == {k: {v} for k, v in expect.items()}  # every kind of object made, each in its one class


@pytest.mark.parametrize("index", range(8))
def test_no_two_footprints_overlap_buildings_included(index):
    lay = layout(index=index, views=1, sidewalk_width=[2.0, 3.0], **DENSE)
    objs = [o for o in lay.spec.objects if kind(o) not in SURFACES]
    hulls = [hull(o) for o in objs]
    centres = [h.mean(axis=0) for h in hulls]
    radii = [np.linalg.norm(h - c, axis=1).max() for h, c in zip(hulls, centres, strict=True)]
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if np.linalg.norm(centres[i] - centres[j]) >= radii[i] + radii[j]:
                continue
            assert overlap_depth(hulls[i], hulls[j]) <= 1e-4, f"{objs[i].name} overlaps {objs[j].name}"
    # Buildings stand clear of the road, the sidewalks, curbs and verges (the cross street's included).
    street = [o for o in lay.spec.objects if kind(o) in {"road", "cross_road", "sidewalk", "curb", "verge"}]
    tris = np.concatenate([world_vertices(o)[p.mesh.faces][:, :, :2] for o in street for p in o.parts[:1]])
    for o, h in zip(objs, hulls, strict=True):
        if kind(o) != "building":
            continue
        near = np.linalg.norm(tris.mean(axis=1) - h.mean(axis=0), axis=1) < 60
        for tri in tris[near]:
            if abs(np.cross(tri[1] - tri[0], tri[2] - tri[0])) > 1e-9:
                assert overlap_depth(h, tri) <= 1e-4, f"{o.name} stands on the street"
    assert sum(kind(o) == "building" for o in objs) >= 8
    assert sum(kind(o) == "person" for o in objs) >= 12


@pytest.mark.parametrize("index", range(6))
def test_things_stand_on_the_surface_under_them(index):
    """The lowest vertices of every person, vehicle, pole, tree... are at the height of the surface under them
    (the road at 0, crosswalk paint, the sidewalk top = curb height): nothing floats or sinks in."""
    lay = layout(index=index, views=1, **DENSE)
    tris = surface_triangles(lay.spec)
    heights = set()
    for o in lay.spec.objects:
        if kind(o) in SURFACES or kind(o) == "building":
            continue
        v = world_vertices(o)
        z0 = v[:, 2].min()
        base = v[v[:, 2] <= z0 + 0.02]  # feet, wheels, a trunk's foot
        under = surface_height(tris, base[:, :2])
        # All of its base is over one surface at its own height (not hanging over a curb or off the sidewalk's
        # end), within the paint's thickness (a wheel on a stripe, a foot between a crosswalk's stripes).
        assert np.all(np.abs(under - z0) <= MARK_H + 1e-4), \
            f"{o.name}: base at {z0:.3f}, surface {under.min():.3f}..{under.max():.3f}"
        if kind(o) in {"person", "vehicle"}:
            heights.add(round(float(v[:, 2].min()), 3))
    assert round(lay.curb_height, 3) in heights and 0.0 in heights  # on sidewalks and on the road


def test_people_walk_alone_in_groups_and_on_crosswalks():
    on_crosswalk = grouped = people = 0
    for i in range(10):
        lay = layout(index=i, views=1, persons=[20, 20], crosswalk_prob=1.0, crossing_share=0.3)
        persons = [o for o in lay.spec.objects if kind(o) == "person"]
        people += len(persons)
        xy = np.array([o.location[:2] for o in persons])
        d = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
        grouped += int((d.min(axis=1) < 1.5).sum())
        on_crosswalk += sum(abs(o.location[2] - MARK_H) < 1e-6 for o in persons)
    assert people >= 10 * 20 * 0.75
    assert grouped >= 30 and on_crosswalk >= 10


@pytest.mark.parametrize("index", range(10))
def test_cameras_outside_objects_with_heights_per_kind(index):
    lay = layout(index=index, views=8, **DENSE)
    p = StreetParams()
    tris = surface_triangles(lay.spec)
    objs = [o for o in lay.spec.objects if kind(o) not in SURFACES]
    hulls = [hull(o) for o in objs]
    for cam, k in zip(lay.spec.cameras, lay.camera_kinds, strict=True):
        eye = np.array(cam.location)
        for o, h in zip(objs, hulls, strict=True):
            assert point_polygon_distance(eye[:2], h) >= cam.clip_start, f"{k} camera inside {o.name}"
        ground = float(surface_height(tris, eye[None, :2])[0])
        fwd = -cam.rotation[:, 2]
        pitch = np.degrees(np.arcsin(fwd[2]))
        _, t = lay.frame.to_street(eye[None, :2])
        if k == "dashcam":
            assert abs(ground) < 0.01 and abs(t[0]) < lay.road_width / 2  # on the road
            lo, hi = p.dashcam_height
        elif k == "pedestrian":
            assert abs(ground - lay.curb_height) < 1e-6 and lay.road_width / 2 < abs(t[0]) < lay.walk_outer
            lo, hi = p.pedestrian_height
        else:
            lo, hi = p.surveillance_height
            assert p.surveillance_pitch_deg[0] - 1e-6 <= pitch <= p.surveillance_pitch_deg[1] + 1e-6
        assert lo - 1e-6 <= eye[2] - ground <= hi + 1e-6, (k, eye[2], ground)
        assert 35 - 1e-6 <= np.degrees(cam.fov) <= 95 + 1e-6
        assert cam.visible_objects is not None and cam.min_visible_met == (cam.visible_objects >= 2)
    assert all(c.min_visible_met for c in lay.spec.cameras)


def test_camera_mix_and_old_camera_height_knob():
    kinds = [k for i in range(6) for k in layout(index=i, views=6).camera_kinds]
    assert set(kinds) == set(CAMERA_KINDS)
    only = layout(views=5, camera_mix=[0, 0, 1])
    assert only.camera_kinds == ["surveillance"] * 5
    assert all(c.location[2] > 4 for c in only.spec.cameras)
    old = layout(views=6, camera_mix=[1, 0, 0], camera_height=[2.0, 2.1])  # the old knob still applies
    assert all(2.0 - 1e-6 <= c.location[2] <= 2.1 + 1e-6 for c in old.spec.cameras)
    with pytest.raises(Exception, match="camera_mix"):
        StreetParams(camera_mix=(0, 0, 0))


def _largest_share(lay: StreetLayout, cls: str = "vehicle") -> list[float]:
    """Per view: the largest ``cls`` thing's height over the frame's height at its distance (0 when none is in
    view; 0.13 is a car 1.5 m high seen 10 m away through a 60 degree lens)."""
    from scenes.camera import visible_mask

    things = [o for o in lay.spec.objects if lay.spec.classes[o.class_id].name == cls]
    out = []
    for cam in lay.spec.cameras:
        best = 0.0
        for o in things:
            top = float(world_vertices(o)[:, 2].max())
            centre = np.array([*o.location[:2], top / 2])
            if visible_mask(cam, centre[None], margin=0.05)[0]:
                dist = max(float(np.linalg.norm(centre - np.array(cam.location))), 0.5)
                best = max(best, top / (2 * dist * np.tan(cam.fov / 2)))
        out.append(best)
    return out


def test_views_framed_on_vehicles_bring_them_closer_and_the_default_draws_nothing_extra():
    plain = [layout(index=i, views=4) for i in range(6)]
    # 0 (the default) takes no extra draw: the scenes are exactly those of the default.
    zero = [layout(index=i, views=4, vehicle_views=0.0) for i in range(6)]
    assert [json.dumps(to_jsonable(a.spec)) for a in plain] == [json.dumps(to_jsonable(b.spec)) for b in zero]
    framed = [layout(index=i, views=4, vehicle_views=1.0) for i in range(6)]
    near, far = (np.array([s for lay in ls for s in _largest_share(lay)]) for ls in (framed, plain))
    assert np.median(near) > 2 * np.median(far) and np.percentile(near, 90) > np.percentile(far, 90)
    assert (near > 0).mean() > 0.9  # a vehicle in almost every view
    for lay in framed:  # still valid cameras of their kinds, outside every object
        assert all(c.min_visible_met for c in lay.spec.cameras) and set(lay.camera_kinds) <= set(CAMERA_KINDS)
    # Off, it stays out of the resolved params (existing datasets keep their config hash); on, it is recorded.
    assert "vehicle_views" not in StreetParams().model_dump(mode="json")
    assert StreetParams(vehicle_views=0.3).model_dump(mode="json")["vehicle_views"] == 0.3
    with pytest.raises(Exception, match="vehicle_views"):
        StreetParams(vehicle_views=1.5)


def test_views_framed_on_people_bring_them_closer_and_vehicle_views_alone_draws_as_before():
    plain = [layout(index=i, views=4) for i in range(6)]
    framed = [layout(index=i, views=4, person_views=1.0) for i in range(6)]
    near, far = (np.array([s for lay in ls for s in _largest_share(lay, "person")]) for ls in (framed, plain))
    assert np.median(near) > 2 * np.median(far) and (near > 0).mean() > 0.9  # a person close by in almost every view
    for lay in framed:  # still valid cameras of their kinds, outside every object
        assert all(c.min_visible_met for c in lay.spec.cameras) and set(lay.camera_kinds) <= set(CAMERA_KINDS)
    # person_views=0 next to vehicle_views takes no extra draw: the scenes of vehicle_views alone stay as they were.
    vv = [layout(index=i, views=4, vehicle_views=0.3) for i in range(3)]
    both = [layout(index=i, views=4, vehicle_views=0.3, person_views=0.0) for i in range(3)]
    assert [json.dumps(to_jsonable(a.spec)) for a in vv] == [json.dumps(to_jsonable(b.spec)) for b in both]
    # A mix frames some views on each (one draw per view decides).
    mixed = [layout(index=i, views=4, vehicle_views=0.5, person_views=0.5) for i in range(6)]
    people = np.array([s for lay in mixed for s in _largest_share(lay, "person")])
    cars = np.array([s for lay in mixed for s in _largest_share(lay)])
    assert (people > np.median(near) / 2).any() and (cars > np.median(far)).any()
    assert "person_views" not in StreetParams().model_dump(mode="json")
    assert StreetParams(person_views=0.2).model_dump(mode="json")["person_views"] == 0.2
    with pytest.raises(Exception, match="vehicle_views \\+ person_views must be at most 1"):
        StreetParams(vehicle_views=0.6, person_views=0.5)


def test_each_view_names_its_camera_kind_in_the_spec_and_its_frame_record():
    from scenes import sample_scene
    from synth.worker import camera_record

    resolved = resolve_scene(SceneConfig(family="street"))
    seen = []
    for i in range(3):
        spec = sample_scene(resolved, scene_rng(0, i), 6, 64)  # what a render worker samples
        kinds = [c.kind for c in spec.cameras]
        if i == 0:
            assert kinds == layout(index=i, views=6).camera_kinds  # the kind each camera was placed as
        assert all(k in CAMERA_KINDS for k in kinds)
        assert [camera_record(c)["kind"] for c in spec.cameras] == kinds
        seen += kinds
    assert set(seen) == set(CAMERA_KINDS)
    only = layout(views=3, camera_mix=[0, 1, 0])
    assert [camera_record(c)["kind"] for c in only.spec.cameras] == ["pedestrian"] * 3
    # A family with one sort of camera leaves the kind out of its records.
    tabletop = sample_scene(resolve_scene(SceneConfig(family="tabletop")), scene_rng(0, 0), 2, 64)
    assert all(c.kind is None and "kind" not in camera_record(c) for c in tabletop.cameras)


def test_curved_and_intersection_layouts_over_seeds():
    lays = [layout(index=i, views=1) for i in range(12)]
    curved = [x for x in lays if x.curved]
    crossing = [x for x in lays if x.intersection is not None]
    assert curved and crossing and len(curved) < len(lays) and len(crossing) < len(lays)
    for x in curved:
        # The road, its markings and the building rows all follow the arc.
        half = StreetParams().street_length / 2
        assert abs(float(x.frame.theta(half))) > 0.05
        yaws = [o.rotation[2] for o in x.spec.objects if kind(o) == "building"]
        assert np.ptp(np.unwrap(np.mod(yaws, np.pi) * 2) / 2) > 0.05
        road = next(o for o in x.spec.objects if kind(o) == "road")
        end = world_vertices(road)[:, :2]
        assert np.abs(end[:, 0]).max() > x.road_width / 2 + 0.3  # not a straight strip along y
    for x in crossing:
        names = {kind(o) for o in x.spec.objects}
        assert "cross_road" in names
        # Its corners are free of buildings: no building within the cross street's width plus its sidewalks, on
        # the side(s) the cross street runs to (a T-junction has buildings across from its mouth).
        arms = [hull(o) for o in x.spec.objects if kind(o) == "cross_road"]
        for o in x.spec.objects:
            if kind(o) == "building":
                h = hull(o)
                on_arm = any(h[:, 0].max() > a[:, 0].min() and h[:, 0].min() < a[:, 0].max() for a in arms)
                assert not (on_arm and np.abs(h[:, 1] - x.intersection).min() < 2.0
                            and (h[:, 1].min() < x.intersection < h[:, 1].max())), o.name
    assert not any(layout(index=i, views=1, curve_prob=0.0).curved for i in range(3))
    assert all(layout(index=i, views=1, intersection_prob=1.0).intersection is not None for i in range(3))


def test_markings_styles_crosswalks_and_wet_roads():
    yellow = [layout(index=i, views=1, lanes=[2, 2], marking_styles=["double_yellow"],
                     environment={"weights": {"rain": 0}}) for i in range(3)]  # dry: wet paint is darker
    for x in yellow:
        marks = next(o for o in x.spec.objects if kind(o) == "lane_marking")
        assert any(p.material.color == YELLOW_PAINT for p in marks.parts)
    bare = layout(views=1, marking_styles=["none"], crosswalk_prob=0.0, intersection_prob=0.0)
    assert not any(kind(o) == "lane_marking" for o in bare.spec.objects)
    wet = layout(views=1, environment={"weights": {"clear": 0, "overcast": 0, "dusk": 0, "rain": 1}})
    dry = layout(views=1, environment={"weights": {"rain": 0}})
    assert wet.wetness > 0 and dry.wetness == 0
    assert any(kind(o) == "puddle" for o in wet.spec.objects)
    assert not any(kind(o) == "puddle" for o in dry.spec.objects)
    road = {x.wetness: next(o for o in x.spec.objects if kind(o) == "road").parts[0].material for x in (wet, dry)}
    assert road[wet.wetness].roughness < road[0.0].roughness


def test_street_lamps_are_lit_when_the_street_lights_are_on():
    on = layout(views=1, lamp_prob=1.0, environment={"weights": {"clear": 0, "overcast": 0, "dusk": 1, "rain": 0}})
    off = layout(views=1, lamp_prob=1.0, environment={"weights": {"dusk": 0}, "rain_street_lights_prob": 0.0})
    assert on.street_lights_on and not off.street_lights_on
    lamps_on = [o for o in on.spec.objects if kind(o) == "lamp"]
    lamps_off = [o for o in off.spec.objects if kind(o) == "lamp"]
    assert len(lamps_on) >= 4 and len(lamps_off) >= 4
    assert all(any(p.material.shader == "emission" for p in o.parts) for o in lamps_on)
    assert not any(p.material.shader == "emission" for o in lamps_off for p in o.parts)
    # Lit lamps light the street: point lights under the heads nearest to the cameras, at most max_lamp_lights.
    points = [lt for lt in on.spec.lights if lt.type == "POINT"]
    assert 1 <= len(points) <= StreetParams().max_lamp_lights
    assert not [lt for lt in off.spec.lights if lt.type == "POINT"]


def test_lamp_heads_glow_in_the_colour_of_the_lamp_lights():
    dusk = {"weights": {"clear": 0, "overcast": 0, "dusk": 1, "rain": 0}}
    colours = []
    for i in range(3):
        lay = layout(index=i, views=1, lamp_prob=1.0, environment=dusk)
        env = sample_environment(scene_rng(0, i), StreetParams(environment=dusk).environment)  # the scene's first draw
        heads = [p.material for o in lay.spec.objects if kind(o) == "lamp" for p in o.parts
                 if p.material.shader == "emission"]
        points = [lt for lt in lay.spec.lights if lt.type == "POINT"]
        assert heads and points
        # Every glowing head and every lamp light: the environment's one street-light colour.
        assert {m.color for m in heads} == {lt.color for lt in points} == {env.street_light_color}
        assert {m.emission for m in heads} == {env.street_light_glow}
        lo, hi = EnvironmentKnobs().street_light_glow
        assert lo <= env.street_light_glow <= hi
        colours.append(env.street_light_color)
    assert len(set(colours)) == 3  # the colour follows each scene's lamp temperature
    # Lights off (a dry day): the heads are the environment's unlit glass, no part of a lamp glows.
    dry = {"weights": {"dusk": 0, "rain": 0}}
    day = layout(views=1, lamp_prob=1.0, environment=dry)
    glass = sample_environment(scene_rng(0, 0), StreetParams(environment=dry).environment).lamp_material()
    lamps = [o for o in day.spec.objects if kind(o) == "lamp"]
    assert lamps and glass.shader == "principled"
    assert all(any(p.material == glass for p in o.parts) for o in lamps)


def test_params_of_the_old_street_config_still_validate():
    old = {"lanes": [2, 4], "lane_width": [3.0, 3.6], "sidewalk_width": [2.0, 4.5], "street_length": 160.0,
           "vehicles": [3, 10], "persons": [2, 10], "poles": [2, 8], "trees": [2, 10],
           "building_height": [6.0, 30.0], "camera_height": [1.2, 2.2], "camera_yaw_deg": [0.0, 25.0],
           "camera_pitch_deg": [-12.0, 3.0]}
    StreetParams.model_validate(old)
    lay = layout(views=4, **old)
    eye_level = [c for c, k in zip(lay.spec.cameras, lay.camera_kinds, strict=True) if k != "surveillance"]
    assert all(1.2 - 1e-6 <= c.location[2] <= 2.2 + lay.curb_height + 1e-6 for c in eye_level)
