"""``street``: an urban street seen from a pedestrian's or a car's eye height.

Class map (Cityscapes colors): sky, road, sidewalk, lane_marking, building, vehicle*, person*, pole_sign*,
vegetation (* = thing classes with instances). Ground outside the street is grass (vegetation).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from scenes import geometry as g
from scenes.camera import look_at, visible_mask
from scenes.placement import Box, Footprint, FootprintSet, place_footprints
from scenes.randomization import (
    CountRange,
    PosRange,
    integers,
    sample_lights,
    sample_material,
    sample_post,
    sample_world,
    uniform,
)
from scenes.registry import SceneContext, register_scene
from scenes.spec import (
    Camera,
    ClassDef,
    FloatArray,
    Material,
    Part,
    SceneObject,
    SceneSpec,
    Vec3,
    footprint_radius,
    vec3,
)
from segfactory.config import StrictModel

CLASSES = [
    ClassDef(0, "sky", (70, 130, 180)),
    ClassDef(1, "road", (128, 64, 128)),
    ClassDef(2, "sidewalk", (244, 35, 232)),
    ClassDef(3, "lane_marking", (255, 255, 255)),
    ClassDef(4, "building", (70, 70, 70)),
    ClassDef(5, "vehicle", (0, 0, 142), thing=True),
    ClassDef(6, "person", (220, 20, 60), thing=True),
    ClassDef(7, "pole_sign", (220, 220, 0), thing=True),
    ClassDef(8, "vegetation", (107, 142, 35)),
]


class StreetParams(StrictModel):
    lanes: CountRange = (2, 4)
    lane_width: PosRange = (3.0, 3.6)
    sidewalk_width: PosRange = (2.0, 4.5)
    street_length: float = Field(160.0, gt=20)
    vehicles: CountRange = (3, 10)
    persons: CountRange = (2, 10)
    poles: CountRange = (2, 8)
    trees: CountRange = (2, 10)
    building_height: PosRange = (6.0, 30.0)
    camera_height: PosRange = (1.2, 2.2)
    camera_yaw_deg: PosRange = (0.0, 25.0)
    camera_pitch_deg: tuple[float, float] = (-12.0, 3.0)


PAINT = [(0.6, 0.02, 0.02), (0.02, 0.05, 0.4), (0.8, 0.8, 0.8), (0.02, 0.02, 0.02), (0.3, 0.3, 0.32),
         (0.7, 0.5, 0.05), (0.05, 0.25, 0.08)]
FACADE = [(0.45, 0.35, 0.25), (0.35, 0.12, 0.08), (0.4, 0.4, 0.4), (0.2, 0.25, 0.35), (0.55, 0.5, 0.42)]
CLOTHES = [(0.05, 0.05, 0.08), (0.4, 0.05, 0.05), (0.05, 0.1, 0.35), (0.5, 0.5, 0.45), (0.1, 0.25, 0.1)]
SKIN = [(0.6, 0.4, 0.3), (0.35, 0.2, 0.12), (0.15, 0.08, 0.05), (0.7, 0.5, 0.4)]


def _pick(rng: np.random.Generator, palette: list[Vec3]) -> Vec3:
    return palette[int(rng.integers(len(palette)))]


def _vehicle(rng: np.random.Generator, ctx: SceneContext) -> list[Part]:
    k = ctx.randomization.materials
    length, width = uniform(rng, (3.6, 4.9)), uniform(rng, (1.65, 2.0))
    body_h, cabin_h = uniform(rng, (0.55, 0.8)), uniform(rng, (0.45, 0.65))
    wheel_r = uniform(rng, (0.3, 0.36))
    body = g.transform(g.box(width, length, body_h), (0, 0, wheel_r * 0.9))
    cabin_len = length * uniform(rng, (0.45, 0.6))
    cabin = g.transform(g.box(width * 0.88, cabin_len, cabin_h), (0, -length * 0.05, wheel_r * 0.9 + body_h))
    # A tyre: centre the cylinder, then turn its axis from z to x (the axle).
    wheel = g.transform(g.transform(g.cylinder(wheel_r, 0.22, 16), (0, 0, -0.11)), rotation=g.rot_y(np.pi / 2))
    wheels = [g.transform(wheel, (sx * (width / 2 - 0.05), sy * length * 0.32, wheel_r))
              for sx in (-1, 1) for sy in (-1, 1)]
    paint = sample_material(rng, _pick(rng, PAINT), k, roughness=(0.1, 0.4))
    glass = Material((0.02, 0.03, 0.04), roughness=0.05)
    tyre = Material((0.015, 0.015, 0.015), roughness=0.9)
    return [Part(body, paint), Part(cabin, glass), Part(g.merge(wheels), tyre)]


def _person(rng: np.random.Generator, ctx: SceneContext) -> list[Part]:
    k = ctx.randomization.materials
    h = uniform(rng, (1.5, 1.95))
    leg_h, torso_h, head_r = 0.47 * h, 0.33 * h, 0.065 * h
    hip = uniform(rng, (0.09, 0.12))
    legs = g.merge([g.transform(g.cylinder(0.07, leg_h, 10), (sx * hip * 0.6, 0, 0)) for sx in (-1, 1)])
    torso = g.transform(g.lathe([hip * 1.3, hip * 1.6, hip * 1.5, 0.05], [0, torso_h * 0.4, torso_h * 0.9, torso_h],
                                12), (0, 0, leg_h), scale=(1.0, 0.6, 1.0))
    arms = g.merge([g.transform(g.cylinder(0.045, torso_h * 0.95, 8), (sx * hip * 1.9, 0, leg_h + 0.05))
                    for sx in (-1, 1)])
    head = g.transform(g.uv_sphere(head_r, 8, 12), (0, 0, leg_h + torso_h + head_r * 0.9))
    top = sample_material(rng, _pick(rng, CLOTHES), k)
    return [Part(legs, sample_material(rng, _pick(rng, CLOTHES), k)), Part(g.merge([torso, arms]), top),
            Part(head, sample_material(rng, _pick(rng, SKIN), k, roughness=(0.5, 0.8)))]


def _pole(rng: np.random.Generator, ctx: SceneContext) -> list[Part]:
    k = ctx.randomization.materials
    h = uniform(rng, (2.8, 5.0))
    pole = g.cylinder(uniform(rng, (0.04, 0.08)), h, 10)
    kind = rng.integers(3)
    if kind == 0:  # sign plate
        sign = g.transform(g.box(0.05, 0.6, 0.6, center_z=True), (0, 0, h - 0.4), rotation_z=np.pi / 2)
    elif kind == 1:  # round sign
        sign = g.transform(g.cylinder(0.32, 0.04, 16), (0, 0.02, h - 0.4), rotation=g.rot_x(np.pi / 2))
    else:  # traffic light
        sign = g.transform(g.box(0.3, 0.3, 0.9), (0, 0, h - 0.9))
    metal = Material((0.25, 0.25, 0.27), roughness=0.4, metallic=1.0)
    face = sample_material(rng, _pick(rng, [(0.6, 0.02, 0.02), (0.02, 0.1, 0.5), (0.8, 0.6, 0.0),
                                           (0.02, 0.02, 0.02)]), k)
    return [Part(pole, metal), Part(sign, face)]


# g.blob(rng, r, 0.2) reaches at most r * BLOB_REACH from its centre (its three harmonics all at their peaks).
BLOB_REACH = 1.0 + 0.2 * (1 + 1 / 2 + 1 / 3)


def _tree(rng: np.random.Generator, ctx: SceneContext, max_reach: float = np.inf) -> list[Part]:
    """A tree whose crown reaches at most ``max_reach`` from the trunk (narrow sidewalks get small crowns)."""
    k = ctx.randomization.materials
    trunk_h = uniform(rng, (1.8, 3.5))
    cap = max(max_reach / BLOB_REACH, 0.3)
    crown_r = uniform(rng, (min(1.0, cap), min(2.4, cap)))
    trunk = g.cylinder(uniform(rng, (0.1, 0.22)), trunk_h + crown_r * 0.5, 10)
    crown = g.transform(g.blob(rng, crown_r, 0.2), (0, 0, trunk_h + crown_r * 0.8),
                        scale=(1, 1, uniform(rng, (0.8, 1.3))))
    bark = sample_material(rng, (0.12, 0.07, 0.04), k)
    leaves = sample_material(rng, (0.06, 0.2, 0.03), k)
    leaves.texture, leaves.color2 = "voronoi", (0.02, 0.08, 0.01)
    return [Part(trunk, bark), Part(crown, leaves)]


@register_scene(
    "street",
    description="urban street: road, sidewalks, lane markings, buildings, vehicles, people, poles, trees, sky",
    classes=CLASSES,
    background="sky",
    params=StreetParams,
    randomization={
        "lights": {"count": [1, 2], "types": ["SUN"], "sun_energy": [1.5, 5.0]},
        "world": {"strength": [0.6, 1.6], "horizon_value": [0.6, 0.95], "zenith_value": [0.35, 0.8]},
        "camera": {"fov_deg": [60, 90], "min_visible_objects": 2},
        "post": {"noise_std": [0.0, 0.012], "blur_sigma": [0.0, 0.6], "exposure": [-0.4, 0.4]},
    },
)
def sample_street(ctx: SceneContext) -> SceneSpec:
    rng, p, r = ctx.rng, ctx.params, ctx.randomization
    k = r.materials
    cid = ctx.class_id
    length = p.street_length
    road_w = integers(rng, p.lanes) * uniform(rng, p.lane_width)
    n_lanes = max(1, round(road_w / 3.3))
    side_w = uniform(rng, p.sidewalk_width)
    curb = 0.15
    objects: list[SceneObject] = []

    def add(name: str, cls: str, parts: list[Part], loc: Vec3 | FloatArray = (0.0, 0.0, 0.0), yaw: float = 0.0
            ) -> None:
        objects.append(SceneObject(f"{name}_{len(objects)}", cid(cls), parts, vec3(loc), (0.0, 0.0, float(yaw))))

    add("ground", "vegetation", [Part(g.plane(600, 600, -0.02),
                                      sample_material(rng, (0.08, 0.2, 0.04), k))])
    add("road", "road", [Part(g.plane(road_w, length), sample_material(rng, (0.05, 0.05, 0.055), k))])
    for side in (-1, 1):
        walk = g.transform(g.box(side_w, length, curb), (side * (road_w / 2 + side_w / 2), 0, 0))
        add("sidewalk", "sidewalk", [Part(walk, sample_material(rng, (0.3, 0.29, 0.27), k))])
    # Lane markings: dashed between lanes, solid at the edges; 5 mm above the asphalt.
    marks = []
    line_w = uniform(rng, (0.1, 0.2))
    for i in range(n_lanes + 1):
        x = -road_w / 2 + 0.3 + i * (road_w - 0.6) / n_lanes
        if i in (0, n_lanes):
            marks.append(g.transform(g.box(line_w, length, 0.005), (x, 0, 0)))
        else:
            dash, gap = uniform(rng, (2.5, 4.0)), uniform(rng, (4.0, 8.0))
            ys = np.arange(-length / 2, length / 2 - dash, dash + gap)
            marks += [g.transform(g.box(line_w, dash, 0.005), (x, y0 + dash / 2, 0)) for y0 in ys]
    mark_color = (0.85, 0.85, 0.8) if rng.random() < 0.7 else (0.8, 0.55, 0.05)
    add("lane_marking", "lane_marking", [Part(g.merge(marks), Material(mark_color, roughness=0.6))])

    # Buildings in a row along each side, with random widths, setbacks, heights and gaps.
    building_boxes: list[Box] = []
    for side in (-1, 1):
        y = -length / 2
        while y < length / 2:
            w = uniform(rng, (8.0, 22.0))
            depth = uniform(rng, (8.0, 16.0))
            setback = uniform(rng, (0.0, 3.0))
            x = side * (road_w / 2 + side_w + setback + depth / 2)
            mat = sample_material(rng, _pick(rng, FACADE), k)
            if rng.random() < 0.6:  # window rows
                mat.texture, mat.color2 = "wave", (0.03, 0.04, 0.06)
            height = uniform(rng, p.building_height)
            add("building", "building", [Part(g.box(depth, w, height), mat)], (x, y + w / 2, 0))
            building_boxes.append((x - depth / 2, y, x + depth / 2, y + w))
            y += w + (uniform(rng, (0.5, 6.0)) if rng.random() < 0.4 else 0.0)

    # Vehicles in lanes (heading with or against traffic), people and street furniture on the sidewalks.
    lane_xs = [-road_w / 2 + (i + 0.5) * road_w / n_lanes for i in range(n_lanes)]
    # Vehicles: one row of disjoint footprints along the street, each in a random lane.
    vehicles = [_vehicle(rng, ctx) for _ in range(integers(rng, p.vehicles))]
    spots = place_footprints(rng, [Footprint.circle(footprint_radius(v)) for v in vehicles], (0.0, 0.0),
                             (-length / 2 + 5, length / 2 - 5))
    # What stands on the ground so far, as (centre, footprint): sidewalk objects and cameras keep clear of it.
    occupied: list[tuple[tuple[float, float], Footprint]] = []
    for parts, spot in zip(vehicles, spots, strict=True):
        if spot is None:
            continue
        lane = int(rng.integers(n_lanes))
        heading = 0.0 if lane >= n_lanes / 2 else np.pi
        loc, yaw = (lane_xs[lane] + rng.uniform(-0.3, 0.3), spot[1]), heading + rng.normal(0, 0.04)
        add("vehicle", "vehicle", parts, (*loc, 0), yaw)
        # Its real outline, not its bounding circle, so a tree may overhang the road next to a parked car.
        occupied.append((loc, Footprint.of_points(np.concatenate([q.mesh.vertices[:, :2] for q in parts]), yaw)))
    for side in (-1, 1):
        x_range = (side * (road_w / 2 + 0.4), side * (road_w / 2 + side_w - 0.4))
        x_range = (min(x_range), max(x_range))
        # A crown that reaches no further than this fits at the sidewalk's road-side edge even where a building
        # stands right at its back edge (crowns may overhang the road, not a building).
        reach = side_w - 0.4
        items = ([("person", "person", _person(rng, ctx)) for _ in range(integers(rng, p.persons) // 2)]
                 + [("pole", "pole_sign", _pole(rng, ctx)) for _ in range(integers(rng, p.poles) // 2)]
                 + [("tree", "vegetation", _tree(rng, ctx, reach)) for _ in range(integers(rng, p.trees) // 2)])
        footprints = [Footprint.circle(footprint_radius(parts)) for *_, parts in items]
        spots = place_footprints(rng, footprints, x_range, (-length / 2 + 3, length / 2 - 3), occupied=occupied,
                                 boxes=building_boxes)
        for (name, cls, parts), fp, spot in zip(items, footprints, spots, strict=True):
            if spot is None:
                continue
            yaw = np.pi / 2 * (1 - side) + rng.normal(0, 0.1) if name == "pole" else rng.uniform(0, 2 * np.pi)
            add(name, cls, parts, (spot[0], spot[1], curb), yaw)
            occupied.append((spot, fp))

    things = np.array([o.location for o in objects if ctx.classes[o.class_id].thing] or [(0.0, 0.0, 0.0)])
    things = things + np.array([0, 0, 0.8])  # aim at bodies, not feet
    cameras = [_street_camera(rng, ctx, road_w, side_w, length, things, occupied) for _ in range(ctx.views)]
    lights = sample_lights(rng, r.lights, np.zeros(3), min_height=20.0)
    return SceneSpec("street", ctx.classes, cid("sky"), objects, lights, sample_world(rng, r.world), cameras,
                     [sample_post(rng, r.post) for _ in range(ctx.views)])


# Cameras keep this far from every object's footprint: clear of the near clip plane (0.1) with room to spare.
CAMERA_CLEARANCE = 0.3


def _street_camera(rng: np.random.Generator, ctx: SceneContext, road_w: float, side_w: float, length: float,
                   targets: FloatArray, occupied: list[tuple[tuple[float, float], Footprint]]) -> Camera:
    """Eye-height camera looking along the street, outside every object; retried until enough labeled things
    are in frame (else the attempt that saw most, marked with ``min_visible_met=False``)."""
    p, kc = ctx.params, ctx.randomization.camera
    eye, obstacles = Footprint.circle(CAMERA_CLEARANCE), FootprintSet.of(occupied)
    best, best_n = None, -1
    for _ in range(kc.max_tries):
        for _ in range(100):  # a spot on the road or sidewalk that is not inside a car, person, pole or crown
            x = rng.uniform(-road_w / 2 - side_w * 0.8, road_w / 2 + side_w * 0.8)
            y = rng.uniform(-length / 2 + 5, length / 2 - 40)
            direction = 1.0 if rng.random() < 0.5 else -1.0
            if obstacles.clear(np.array([[x, direction * y]]), eye)[0]:
                break
        else:
            continue
        loc = np.array([x, direction * y, uniform(rng, p.camera_height)])
        yaw = np.radians(rng.uniform(-1, 1) * uniform(rng, p.camera_yaw_deg))
        pitch = np.radians(uniform(rng, p.camera_pitch_deg))
        fwd = np.array([np.sin(yaw) * np.cos(pitch), direction * np.cos(yaw) * np.cos(pitch), np.sin(pitch)])
        cam = Camera(vec3(loc), look_at(loc, loc + fwd), fov=np.radians(uniform(rng, kc.fov_deg)),
                     clip_start=0.1, clip_end=400.0)
        n = int(visible_mask(cam, targets, margin=0.05).sum())
        if n > best_n:
            best, best_n = cam, n
        if n >= kc.min_visible_objects:
            break
    if best is None:
        raise RuntimeError("street camera: no free spot on the road or sidewalks after "
                           f"{kc.max_tries * 100} draws")
    best.visible_objects, best.min_visible_met = best_n, best_n >= kc.min_visible_objects
    return best
