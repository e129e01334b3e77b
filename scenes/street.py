"""``street``: an urban street seen from a car's dashcam, a pedestrian's eyes or a raised surveillance camera.

Class map (Cityscapes colors, ids stable since the family was added): sky 0, road 1, sidewalk 2, lane_marking 3,
building 4, vehicle 5*, person 6*, pole_sign 7*, vegetation 8 (* = thing classes with instances). Bicycles are
``vehicle``; street lamps, signs, traffic lights, bollards and benches are ``pole_sign``; trees, bushes, grass
verges and the grass outside the street are ``vegetation``; curb stones are ``sidewalk``; asphalt patches, cracks
and puddles are ``road``; crosswalk stripes are ``lane_marking``. In rooms (``interior_scenes``) the floor, walls,
ceiling, windows, doors and all furniture and clutter are ``building`` (the inside of a building), potted plants
``vegetation`` and people ``person``; no other class occurs there.

Layout. The street runs along a centre line that is straight up to ``s0`` and may then bend into an arc
(:class:`StreetFrame`: street coordinates ``s`` along the centre line, ``t`` across it, ``t > 0`` to the right
of traffic heading towards ``+s``). Across the street from the centre: travel lanes (markings in one of several
styles), optional parking strips, curb stones, an optional grass verge, the sidewalk (raised by the curb
height), then rows of buildings with varied widths, heights, setbacks and gaps, their facades facing the road.
The asphalt (noise-textured and bumped, wet and glossy in rain) has patches of another shade, puddles in rain and
cracks (:func:`sample_cracks`): thin dark ribbons just above it, longitudinal along the wheel paths and lane
joints, transverse across the road, branching alligator-like networks, and black, smoother sealed "tar snakes".
An optional cross street meets the straight part at right angles, with its own sidewalks and crosswalks; the
buildings leave its corners free. Vehicles park along the curbs (both directions, some at slight angles) and
drive in the lanes; people walk on the sidewalks and crosswalks, alone and in groups; street lamps and trees
stand in rows, traffic lights at the corners, signs and bollards near crossings. Footprints never overlap
(:mod:`scenes.placement` for the small objects, separating-axis tests for the buildings' rectangles), and every
object stands on the surface under it (road 0, crosswalk paint, sidewalk top = curb height).

Cameras come in three kinds (``camera_mix``): a dashcam in a lane looking along the road, a pedestrian's eye
height on a sidewalk, and a raised surveillance view (4-12 m, looking down at the street like CCTV footage). Of a
camera's tries the one where people and poles are largest is kept; a share ``vehicle_views`` of the views (off by
default) is framed on vehicles instead: each try aims at a vehicle within 20 m, and the one where vehicles fill
most of the frame is kept; likewise a share ``person_views`` on people within 8 m (close-ups of people).

Interiors. A share ``interior_scenes`` of the scenes (off by default) is a room instead of a street
(:mod:`scenes.street_assets.interiors`: a lounge, kitchen or dining room with furniture and 1-6 people sitting on
its seats, squatting or standing, lit by a ceiling light, lamps, the daylight of its windows and in some rooms a
camera flash); all of a room's views are inside it, at standing or seated eye height, framed on its people. Whether
a scene is a room is drawn from a generator of its own (:func:`is_room`), so the scenes that stay streets are
exactly the streets they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from scenes import geometry as g
from scenes.camera import BestTry, frame_share, look_at, visible_mask
from scenes.placement import Footprint, FootprintSet
from scenes.randomization import (
    CountRange,
    MaterialKnobs,
    PosRange,
    Range,
    integers,
    sample_material,
    uniform,
)
from scenes.registry import SceneContext, register_scene
from scenes.spec import (
    Camera,
    ClassDef,
    FloatArray,
    Light,
    Material,
    Mesh,
    Part,
    SceneObject,
    SceneSpec,
    Vec3,
    World,
    footprint_radius,
    vec3,
)
from scenes.street_assets import furniture
from scenes.street_assets.buildings import sample_building
from scenes.street_assets.environment import (
    Environment,
    EnvironmentKnobs,
    puddle_material,
    sample_environment,
    wet,
)
from scenes.street_assets.furniture import Bench, sample_bench, sample_bollard
from scenes.street_assets.interiors import Daylight, Room, flash_light, room_camera, sample_room
from scenes.street_assets.nature import sample_bush, sample_tree
from scenes.street_assets.people import SEAT_TOLERANCE, Figure, group_offsets, sample_figure, sample_person
from scenes.street_assets.vehicles import sample_bicycle, sample_vehicle
from segfactory.config import UnsaidDefaults

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

MarkingStyle = Literal["dashed_white", "solid_white", "double_yellow", "none"]
CameraKind = Literal["dashcam", "pedestrian", "surveillance"]
CAMERA_KINDS: tuple[CameraKind, ...] = ("dashcam", "pedestrian", "surveillance")
MARK_H = 0.005  # paint thickness: markings and crosswalk stripes stand this far above the asphalt
AT_END_CLEARANCE = 0.3  # m: objects placed at a given spot keep this far from a region's ends along the street
PATCH_Z, PUDDLE_Z = 0.0015, 0.003  # asphalt patches and puddles lie between the asphalt and the paint
CRACK_Z = 0.00075  # asphalt cracks lie between the asphalt and the patches: patches, puddles and paint cover them


# --- Params ---------------------------------------------------------------------------------------------------

class StreetParams(UnsaidDefaults):
    # off: scenes and config hashes as before
    unsaid_defaults: ClassVar[dict[str, Any]] = {"vehicle_views": 0.0, "person_views": 0.0, "balcony_bands": 0.0,
                                                 "lit_shops": 0.0, "seated_people": 0.0, "interior_scenes": 0.0,
                                                 "cracks": (0, 0)}

    lanes: CountRange = Field((2, 4), description="travel lanes (1 = one-way street)")
    lane_width: PosRange = Field((3.0, 3.6), description="metres per travel lane")
    sidewalk_width: PosRange = Field((2.0, 4.5), description="metres of sidewalk on each side (without a verge)")
    street_length: float = Field(160.0, gt=20, description="metres of street along its centre line")
    vehicles: CountRange = Field((4, 14), description="cars, vans, trucks and buses, parked and in lanes")
    bicycles: CountRange = Field((0, 3), description="bicycles parked on the sidewalks (class vehicle)")
    persons: CountRange = Field((10, 32), description="people on the sidewalks and crosswalks")
    poles: CountRange = Field((2, 8), description="signs and traffic lights, besides lamps and bollards")
    trees: CountRange = Field((2, 10), description="trees on the sidewalks and verges")
    bushes: CountRange = Field((0, 6), description="bushes on verges and in front of buildings")
    bollards: CountRange = Field((0, 8), description="bollards along the curbs near crossings")
    building_height: PosRange = Field((6.0, 30.0), description="metres")
    building_width: PosRange = Field((8.0, 22.0), description="metres of facade along the street")
    building_depth: PosRange = Field((8.0, 16.0), description="metres")
    setback: PosRange = Field((0.0, 3.0), description="metres between the sidewalk and a facade")
    building_gap_prob: float = Field(0.4, ge=0, le=1, description="chance of a gap after a building")
    shop_front_prob: float = Field(0.4, ge=0, le=1, description="share of buildings with a shop front")
    balcony_bands: float = Field(0.0, ge=0, le=1, description="chance that a modern building has a balcony along "
                                 "every upper floor with floor-to-ceiling glass behind (a quarter of it for the "
                                 "others); 0 (the default) draws none and leaves every scene as it was; 0.45 "
                                 "did not help on real street photos (docs/street.md)")
    lit_shops: float = Field(0.0, ge=0, le=1, description="share of shop fronts whose display windows show a lit "
                             "interior instead of dark glass; 0 (the default) leaves every scene as it was")
    curve_prob: float = Field(0.35, ge=0, le=1, description="share of streets that bend into an arc")
    curve_radius: PosRange = Field((80.0, 250.0), description="metres, radius of a curved street's arc")
    intersection_prob: float = Field(0.4, ge=0, le=1, description="share of streets with a cross street")
    t_junction_prob: float = Field(0.3, ge=0, le=1, description="share of cross streets on one side only")
    cross_lanes: CountRange = Field((1, 2), description="lanes of the cross street")
    crosswalk_prob: float = Field(0.5, ge=0, le=1, description="chance of a mid-block crosswalk "
                                  "(intersections always get crosswalks)")
    marking_styles: list[MarkingStyle] = Field(
        default_factory=lambda: list[MarkingStyle](["dashed_white", "solid_white", "double_yellow", "none"]),
        description="centre-line styles drawn from; 'none' also leaves out lane and edge lines")
    parking_prob: float = Field(0.7, ge=0, le=1, description="chance of a parking strip along each curb")
    parked_share: float = Field(0.6, ge=0, le=1, description="share of vehicles parked (rest in lanes)")
    parked_angle_prob: float = Field(0.2, ge=0, le=1, description="share of parked vehicles at a slight angle")
    curb_height: PosRange = Field((0.12, 0.18), description="metres: the sidewalk top")
    verge_prob: float = Field(0.3, ge=0, le=1, description="chance of a grass verge between curb and sidewalk")
    verge_width: PosRange = Field((0.8, 2.5), description="metres")
    patches: CountRange = Field((0, 6), description="asphalt patches of another shade")
    cracks: CountRange = Field((0, 0), description="asphalt cracks on the main road (class road; off by default, "
                               "configs/street.yaml draws 0-8): longitudinal "
                               "ones along the wheel paths and lane joints, transverse ones across the road, "
                               "branching alligator-like networks and black sealed 'tar snakes'; drawn from "
                               "a generator of their own and added last, so everything else in a scene stays as "
                               "it was")
    lamp_prob: float = Field(0.85, ge=0, le=1, description="chance of a row of street lamps on each side")
    lamp_spacing: PosRange = Field((18.0, 35.0), description="metres between street lamps")
    tree_row_prob: float = Field(0.5, ge=0, le=1, description="chance that a side's trees stand in a regular row")
    group_prob: float = Field(0.45, ge=0, le=1, description="share of people walking in groups of 2-4")
    crossing_share: float = Field(0.15, ge=0, le=1, description="share of people on crosswalks (if any)")
    seated_people: float = Field(0.0, ge=0, le=1, description="share of the people on the sidewalks who sit on "
                                 "benches (added at the sidewalks' back edges, class pole_sign) or squat (where there "
                                 "is room); drawn from a generator of its own after everything else is laid out, so "
                                 "the street, vehicles, the other people and the camera draws stay as they were; 0 "
                                 "(the default) adds nothing and leaves every scene as it was")
    interior_scenes: float = Field(0.0, ge=0, le=1, description="share of the scenes that are a room instead of a "
                                   "street (a lounge, kitchen or dining room with furniture and 1-6 people sitting, "
                                   "squatting or standing; cameras inside it framed on them; the room and its "
                                   "furniture are class building, potted plants vegetation); decided from a "
                                   "generator of its own, so the scenes that stay streets are the streets they were; "
                                   "0 (the default) draws nothing and leaves every scene as it was")
    camera_mix: tuple[float, float, float] = Field(
        (0.35, 0.35, 0.3), description="relative weights of dashcam, pedestrian and surveillance cameras")
    vehicle_views: float = Field(0.0, ge=0, le=1, description="share of views framed on vehicles: of the "
                                 "camera's tries, the one where vehicles fill most of the frame wins (close-ups "
                                 "count in full) instead of the one where people and poles are largest; 0 (the "
                                 "default) draws nothing extra, so scenes stay what they were")
    person_views: float = Field(0.0, ge=0, le=1, description="share of views framed on people: each try aims at a "
                                "person within 8 m and the one where people fill most of the frame wins (close-ups "
                                "of people); with vehicle_views at most 1 together; 0 (the default) draws nothing "
                                "extra")
    dashcam_height: PosRange = Field((1.2, 1.6), description="metres above the road")
    pedestrian_height: PosRange = Field((1.5, 1.8), description="metres above the sidewalk top")
    surveillance_height: PosRange = Field((4.0, 12.0), description="metres above the sidewalk top")
    surveillance_pitch_deg: Range = Field((-55.0, -20.0), description="degrees (negative: looking down)")
    camera_height: PosRange | None = Field(None, description="old knob: if set, the height of dashcam and "
                                           "pedestrian cameras (overrides dashcam_height and pedestrian_height)")
    camera_yaw_deg: PosRange = Field((0.0, 30.0), description="degrees a pedestrian camera turns off the street "
                                     "direction (dashcams: a fifth of it)")
    camera_pitch_deg: Range = Field((-12.0, 3.0), description="degrees, pitch of dashcam and pedestrian cameras")
    environment: EnvironmentKnobs = Field(default_factory=EnvironmentKnobs,
                                          description="time of day and weather (sun, sky, rain, fog, dusk)")
    max_lamp_lights: int = Field(6, ge=0, description="at dusk, point lights in the street lamps nearest to the "
                                 "cameras (each costs render time)")

    @model_validator(mode="after")
    def _mix_positive(self) -> StreetParams:
        if min(self.camera_mix) < 0 or sum(self.camera_mix) <= 0:
            raise ValueError(f"camera_mix must be non-negative weights with a positive sum, got "
                             f"{list(self.camera_mix)}")
        if self.vehicle_views + self.person_views > 1:
            raise ValueError(f"vehicle_views + person_views must be at most 1 (shares of the views), got "
                             f"{self.vehicle_views} + {self.person_views}")
        return self


WHITE_PAINT, YELLOW_PAINT = (0.85, 0.85, 0.8), (0.8, 0.55, 0.05)


# --- Assets ---------------------------------------------------------------------------------------------------

def sample_pole(rng: np.random.Generator, k: MaterialKnobs, kind: str | None = None, lit: bool = False,
                glow: Material | None = None) -> list[Part]:
    """``furniture.sample_pole``; a street lamp is turned so that its arm reaches ``+y`` (the layout turns +y over
    the road). Signs and traffic lights keep facing ``+y``, along the street."""
    parts = furniture.sample_pole(rng, k, kind, lit, glow)
    if kind != "street_lamp":
        return parts
    return [Part(g.transform(q.mesh, rotation=g.rot_z(-np.pi / 2)), q.material) for q in parts]


# --- Street coordinates ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreetFrame:
    """The street's centre line: straight along world ``y`` (``x = t``, ``y = s``) up to ``s0``, then an arc of
    signed curvature ``kappa`` (1/m; > 0 bends towards +x, 0 = straight)."""

    kappa: float = 0.0
    s0: float = 0.0

    def theta(self, s: FloatArray | float) -> FloatArray:
        """Heading angle at ``s`` (radians; the street direction is (sin, cos)); an object with yaw ``-theta``
        faces along +s."""
        out: FloatArray = self.kappa * np.maximum(np.asarray(s, dtype=np.float64) - self.s0, 0.0)
        return out

    def to_world(self, s: FloatArray | float, t: FloatArray | float) -> FloatArray:
        """(..., 2) world x/y of street coordinates."""
        s, t = np.broadcast_arrays(np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64))
        if self.kappa == 0:
            return np.stack([t, s], axis=-1)
        radius, th = 1.0 / self.kappa, self.theta(s)
        x = radius * (1 - np.cos(th)) + t * np.cos(th)
        y = self.s0 + (radius - t) * np.sin(th)
        straight = s <= self.s0
        return np.stack([np.where(straight, t, x), np.where(straight, s, y)], axis=-1)

    def to_street(self, xy: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Street coordinates (s, t) of (..., 2) world points (within the arc's radius of the centre line)."""
        x, y = xy[..., 0], xy[..., 1]
        if self.kappa == 0:
            return y.copy(), x.copy()
        radius = 1.0 / self.kappa
        vx, vy = x - radius, y - self.s0
        r_minus_t = np.sign(radius) * np.hypot(vx, vy)
        th = np.arctan2(vy / r_minus_t, -vx / r_minus_t)
        straight = y <= self.s0
        return np.where(straight, y, self.s0 + th * radius), np.where(straight, x, radius - r_minus_t)

    def normal(self, s: FloatArray | float) -> FloatArray:
        """(..., 2) world direction of increasing t."""
        th = self.theta(s)
        return np.stack([np.cos(th), -np.sin(th)], axis=-1)

    def tangent(self, s: FloatArray | float) -> FloatArray:
        """(..., 2) world direction of increasing s."""
        th = self.theta(s)
        return np.stack([np.sin(th), np.cos(th)], axis=-1)

    def bend(self, mesh: Mesh) -> Mesh:
        """A mesh built in street coordinates (x = t, y = s, z) moved to the world."""
        v = mesh.vertices.astype(np.float64)
        xy = self.to_world(v[:, 1], v[:, 0])
        return Mesh(np.column_stack([xy, v[:, 2]]).astype(np.float32), mesh.faces.copy(), mesh.smooth)


def _stations(s0: float, s1: float, ds: float) -> FloatArray:
    return np.linspace(s0, s1, max(1, math.ceil((s1 - s0) / ds)) + 1)


def _ribbon(t0: float, t1: float, s0: float, s1: float, z: float, ds: float = 3.0) -> Mesh:
    """A flat strip t0..t1 x s0..s1 at height z in street coordinates, split every ``ds`` metres along s."""
    ss = _stations(s0, s1, ds)
    v = np.array([(t, s, z) for s in ss for t in (t0, t1)])
    f = [(2 * i, 2 * i + 1, 2 * i + 3) for i in range(len(ss) - 1)] + \
        [(2 * i, 2 * i + 3, 2 * i + 2) for i in range(len(ss) - 1)]
    return Mesh(v.astype(np.float32), np.asarray(f, dtype=np.int32))


def _slab(t0: float, t1: float, s0: float, s1: float, z0: float, z1: float, ds: float = 3.0) -> Mesh:
    """A box t0..t1 x s0..s1 x z0..z1 in street coordinates (top, sides and ends), split every ``ds`` along s."""
    ss = _stations(s0, s1, ds)
    ring = [(t0, z0), (t0, z1), (t1, z1), (t1, z0)]
    v = np.array([(t, s, z) for s in ss for t, z in ring])
    f: list[tuple[int, int, int]] = []
    for i in range(len(ss) - 1):
        a, b = 4 * i, 4 * (i + 1)
        for j in range(3):  # sides t0, top, side t1
            f += [(a + j, a + j + 1, b + j + 1), (a + j, b + j + 1, b + j)]
    n = 4 * (len(ss) - 1)
    f += [(0, 2, 1), (0, 3, 2), (n, n + 1, n + 2), (n, n + 2, n + 3)]
    return Mesh(v.astype(np.float32), np.asarray(f, dtype=np.int32))


def _polys_overlap(a: FloatArray, b: FloatArray, tol: float = 1e-6) -> bool:
    """Two convex polygons ((V, 2) in order) overlap by more than ``tol`` (touching is not overlapping)."""
    for poly in (a, b):
        edges = np.roll(poly, -1, axis=0) - poly
        normals = np.column_stack([edges[:, 1], -edges[:, 0]])
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        pa, pb = a @ normals.T, b @ normals.T
        if np.any((pa.max(axis=0) <= pb.min(axis=0) + tol) | (pb.max(axis=0) <= pa.min(axis=0) + tol)):
            return False
    return True


def _dist_to_polys(points: FloatArray, polys: list[FloatArray]) -> FloatArray:
    """(P, B) distance from each of the (P, 2) points to each convex polygon ((V, 2), the same V for all) (0
    inside)."""
    a = np.asarray(polys, dtype=np.float64)  # (B, V, 2)
    ab = np.roll(a, -1, axis=1) - a
    rel = points[:, None, None, :] - a[None]  # (P, B, V, 2)
    u = np.clip((rel * ab[None]).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12)[None], 0, 1)
    d = np.linalg.norm(rel - u[..., None] * ab[None], axis=3).min(axis=2)
    cross = ab[None, ..., 0] * rel[..., 1] - ab[None, ..., 1] * rel[..., 0]
    inside = (cross >= 0).all(axis=2) | (cross <= 0).all(axis=2)
    out: FloatArray = np.where(inside, 0.0, d)
    return out


def _local_rect(parts: list[Part]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1): the object-local bounding rectangle of an object's parts."""
    xy = np.concatenate([p.mesh.vertices[:, :2] for p in parts]).astype(np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _rect_points(rect: tuple[float, float, float, float]) -> FloatArray:
    x0, y0, x1, y1 = rect
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def _world_poly(rect: tuple[float, float, float, float], center: FloatArray, yaw: float) -> FloatArray:
    c, s = np.cos(yaw), np.sin(yaw)
    out: FloatArray = _rect_points(rect) @ np.array([[c, s], [-s, c]]) + center
    return out


# --- Layout ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """A rectangle in street coordinates whose surface is at height ``z`` (a sidewalk, a crosswalk)."""

    s0: float
    s1: float
    t0: float
    t1: float
    z: float

    @property
    def area(self) -> float:
        return max(self.s1 - self.s0, 0.0) * max(self.t1 - self.t0, 0.0)

    def shrunk(self, m: float) -> Region | None:
        if self.s1 - self.s0 <= 2 * m or self.t1 - self.t0 <= 2 * m:
            return None
        return Region(self.s0 + m, self.s1 - m, self.t0 + m, self.t1 - m, self.z)


def _across(s0: float, s1: float, ts: tuple[float, float], z: float) -> Region:
    """The region s0..s1 between the two ``t`` values ``ts`` (in either order), at height ``z``."""
    return Region(s0, s1, float(min(ts)), float(max(ts)), z)


@dataclass
class StreetLayout:
    """A sampled street: its spec plus what the layout decided (for tests and inspection).

    Attributes:
        spec: The scene.
        frame: Centre line (straight, or bending into an arc at ``frame.s0``).
        curved: The street bends.
        intersection: ``s`` of the cross street's centre line, or None.
        camera_kinds: One of :data:`CAMERA_KINDS` per view.
        road_width, walk_outer, curb_height: Across the street: the road spans ``|t| <= road_width / 2``, the
            sidewalks (with curbs and verges) end at ``|t| = walk_outer``; their top is at ``curb_height``.
        street_lights_on, wetness: The environment's draw.
    """

    spec: SceneSpec
    frame: StreetFrame
    curved: bool
    intersection: float | None
    camera_kinds: list[CameraKind]
    road_width: float
    walk_outer: float
    curb_height: float
    street_lights_on: bool = False
    wetness: float = 0.0
    building_polys: list[FloatArray] = field(default_factory=list)


class _Builder:
    """Mutable state while laying out one street."""

    def __init__(self, ctx: SceneContext) -> None:
        self.ctx, self.rng, self.p, self.k = ctx, ctx.rng, ctx.params, ctx.randomization.materials
        self.objects: list[SceneObject] = []
        self.occupied = FootprintSet.of([])
        self.occupied_list: list[tuple[tuple[float, float], Footprint]] = []
        self.building_polys: list[FloatArray] = []
        self.keep_out: list[FloatArray] = []  # convex regions buildings stay out of (the cross street)
        self.frame = StreetFrame()

    def add(self, name: str, cls: str, parts: list[Part], loc: Vec3 | FloatArray = (0.0, 0.0, 0.0),
            yaw: float = 0.0) -> SceneObject:
        obj = SceneObject(f"{name}_{len(self.objects)}", self.ctx.class_id(cls), parts, vec3(loc),
                          (0.0, 0.0, float(yaw)))
        self.objects.append(obj)
        return obj

    def occupy(self, xy: FloatArray, fp: Footprint) -> None:
        center = (float(xy[0]), float(xy[1]))
        self.occupied = self.occupied.add(center, fp)
        self.occupied_list.append((center, fp))

    def free(self, xy: FloatArray, fp: Footprint) -> npt.NDArray[np.bool_]:
        """(T,) bool: ``fp`` at each of the (T, 2) world points overlaps no placed object or building."""
        ok = self.occupied.clear(xy, fp)
        if self.building_polys:
            ok &= (_dist_to_polys(xy, self.building_polys) >= fp.radius).all(axis=1)
        return ok

    def place(self, name: str, cls: str, parts: list[Part], regions: list[Region], yaw_off: float | None = None,
              footprint: str = "circle", margin: float | None = None, tries: int = 6, batch: int = 24,
              at: tuple[float, float] | None = None) -> bool:
        """Put an object at a free spot in one of ``regions`` (chosen by area) standing on its surface.

        ``yaw_off`` is relative to the street direction at the spot (None: random); ``footprint`` "circle" (any
        yaw) or "rect" (its bounding rectangle turned by its yaw). ``at`` = (s, t): try that spot only.
        """
        rng = self.rng
        fp_circle = Footprint.circle(footprint_radius(parts))
        m = min(fp_circle.radius, 0.45) if margin is None else margin
        usable = [r2 for r in regions if (r2 := r.shrunk(m)) is not None]
        if not usable and at is None:
            return False
        yaw0 = float(rng.uniform(0, 2 * np.pi)) if yaw_off is None else yaw_off
        for _ in range(1 if at is not None else tries):
            if at is not None:
                s, t = np.array([at[0]]), np.array([at[1]])
                # Not at a region's very end along the street (a sidewalk cut by a cross street): a pole's foot
                # would hang over the kerb there.
                inside = [r.z for r in regions if r.s0 + AT_END_CLEARANCE <= at[0] <= r.s1 - AT_END_CLEARANCE
                          and r.t0 <= at[1] <= r.t1]
                if not inside:
                    return False
                z = inside[0]
            else:
                areas = np.array([r.area for r in usable])
                reg = usable[int(rng.choice(len(usable), p=areas / areas.sum()))]
                s_mid = rng.uniform(reg.s0, reg.s1)
                s = np.clip(s_mid + rng.uniform(-3, 3, batch), reg.s0, reg.s1)
                t = rng.uniform(reg.t0, reg.t1, batch)
                z = reg.z
            yaw = yaw0 - float(self.frame.theta(s[0]))
            fp = (Footprint.of_points(_rect_points(_local_rect(parts)), yaw) if footprint == "rect" else fp_circle)
            xy = self.frame.to_world(s, t)
            hit = np.flatnonzero(self.free(xy, fp))
            if len(hit):
                spot = xy[hit[0]]
                self.add(name, cls, parts, (spot[0], spot[1], z), yaw)
                self.occupy(spot, fp)
                return True
        return False


def build_street(ctx: SceneContext) -> StreetLayout:
    """Sample one street scene and the layout decisions behind it (see the module docstring)."""
    b = _Builder(ctx)
    rng, p, r = ctx.rng, ctx.params, ctx.randomization
    k = r.materials
    env = sample_environment(rng, p.environment)
    wetness = env.wetness
    length = p.street_length
    half = length / 2

    # Across the street: lanes, parking strips, curb, verge, sidewalk.
    n_lanes = integers(rng, p.lanes) or 1
    lane_w = uniform(rng, p.lane_width)
    park = [uniform(rng, (2.0, 2.4)) if rng.random() < p.parking_prob else 0.0 for _ in range(2)]  # -t, +t
    road_w = n_lanes * lane_w + park[0] + park[1]
    edge = road_w / 2
    curb_h = uniform(rng, p.curb_height)
    curb_w = uniform(rng, (0.15, 0.3))
    side_w = uniform(rng, p.sidewalk_width)
    verge_w = uniform(rng, p.verge_width) if rng.random() < p.verge_prob else 0.0
    walk_in = edge + curb_w + verge_w  # the sidewalk proper starts here (|t|)
    walk_outer = walk_in + side_w
    lane_t0 = -edge + park[0]  # travel lanes span lane_t0 .. lane_t0 + n_lanes * lane_w
    n_fwd = n_lanes // 2 if n_lanes > 1 else int(rng.integers(2))  # lanes heading +s, on the +t side
    lane_ts = [lane_t0 + (i + 0.5) * lane_w for i in range(n_lanes)]
    lane_dir = [1.0 if i >= n_lanes - n_fwd else -1.0 for i in range(n_lanes)]

    # Intersection (in the straight part) and curve.
    intersection: float | None = None
    cross_w = cross_side = 0.0
    cross_sides: list[int] = []
    if rng.random() < p.intersection_prob:
        intersection = float(rng.uniform(-0.2, 0.2) * length)
        cross_w = integers(rng, p.cross_lanes) * uniform(rng, p.lane_width)
        cross_side = uniform(rng, p.sidewalk_width)
        cross_sides = [int(rng.choice([-1, 1]))] if rng.random() < p.t_junction_prob else [-1, 1]
    curved = bool(rng.random() < p.curve_prob)
    if curved:
        lo = -half if intersection is None else intersection + cross_w / 2 + cross_side + 8.0
        s0 = float(rng.uniform(lo, max(lo, half * 0.5)))
        radius = uniform(rng, p.curve_radius) * (1.0 if rng.random() < 0.5 else -1.0)
        b.frame = StreetFrame(1.0 / radius, s0)
    frame = b.frame
    # Where the main sidewalks are cut by the cross street (both sides; a T junction's other side continues).
    mouth = (intersection - cross_w / 2, intersection + cross_w / 2) if intersection is not None else None

    def s_pieces(side: int, s0: float, s1: float, cut: tuple[float, float] | None) -> list[tuple[float, float]]:
        if cut is None or side not in cross_sides:
            return [(s0, s1)]
        return [(a, c) for a, c in ((s0, cut[0]), (cut[1], s1)) if c > a]

    def ground_mat(base: Vec3, roughness: tuple[float, float] | None = None) -> Material:
        return wet(sample_material(rng, base, k, roughness), wetness)

    b.add("ground", "vegetation", [Part(g.plane(800, 800, -0.02), ground_mat((0.08, 0.2, 0.04)))])
    asphalt = wet(Material((0.05, 0.05, 0.055), roughness=uniform(rng, (0.6, 0.9)), texture="noise",
                           color2=(0.03, 0.03, 0.035), texture_scale=uniform(rng, (20.0, 60.0)),
                           texture_w=float(rng.uniform(0, 100)), texture_detail=6.0,
                           bump=uniform(rng, (0.2, 0.5))), wetness)
    road_parts = [Part(frame.bend(_ribbon(-edge, edge, -half, half, 0.0)), asphalt)]
    b.add("road", "road", road_parts)

    # Curbs, verges and sidewalks, cut at the cross street.
    paving = ground_mat((0.3, 0.29, 0.27))
    paving.bump = max(paving.bump, 0.15)
    curb_stone = wet(Material((0.45, 0.44, 0.42), roughness=0.7, texture="brick", color2=(0.25, 0.25, 0.24),
                              texture_scale=1.0, texture_w=float(rng.uniform(0, 100)), bump=0.2), wetness)
    walk_regions: list[Region] = []  # sidewalks, for people and furniture
    verge_regions: list[Region] = []
    for side in (-1, 1):
        for a, c in s_pieces(side, -half, half, mouth):
            def band(t0: float, t1: float, a: float = a, c: float = c, side: int = side) -> Mesh:
                lo_t, hi_t = sorted((side * t0, side * t1))
                return frame.bend(_slab(lo_t, hi_t, a, c, 0.0, curb_h))
            b.add("curb", "sidewalk", [Part(band(edge, edge + curb_w), curb_stone)])
            if verge_w:
                b.add("verge", "vegetation", [Part(band(edge + curb_w, walk_in), ground_mat((0.1, 0.25, 0.05)))])
                verge_regions.append(_across(a, c, (side * (edge + curb_w), side * walk_in), curb_h))
            b.add("sidewalk", "sidewalk", [Part(band(walk_in, walk_outer), paving)])
            walk_regions.append(_across(a, c, (side * walk_in, side * walk_outer), curb_h))

    # The cross street: its road, sidewalks and (later) crosswalks; straight along world x at y = intersection.
    cross_len = 60.0
    cross_regions: list[Region] = []
    if intersection is not None:
        y = intersection
        for side in cross_sides:
            x0, x1 = sorted((side * edge, side * (walk_outer + cross_len)))
            b.add("cross_road", "road", [Part(_swap(_ribbon(y - cross_w / 2, y + cross_w / 2, x0, x1, 0.0)), asphalt)])
            xs0, xs1 = sorted((side * walk_outer, side * (walk_outer + cross_len)))
            for sy in (-1, 1):
                ya, yb = sorted((y + sy * cross_w / 2, y + sy * (cross_w / 2 + cross_side)))
                walk = _swap(_slab(ya, yb, xs0, xs1, 0.0, curb_h))
                b.add("sidewalk", "sidewalk", [Part(walk, paving)])
                cross_regions.append(Region(ya, yb, xs0, xs1, curb_h))  # in (s, t): the straight part, s = y
            # Buildings keep the cross street and its corners free.
            gap = 1.0
            b.keep_out.append(_rect_points((min(x0, xs0), y - cross_w / 2 - cross_side - gap,
                                            max(x1, xs1), y + cross_w / 2 + cross_side + gap)))

    # Lane markings, crosswalks, patches, puddles.
    marks: dict[Vec3, list[Mesh]] = {WHITE_PAINT: [], YELLOW_PAINT: []}
    crosswalks: list[tuple[float, float]] = []  # s ranges of crosswalks over the main road
    cw_len = uniform(rng, (2.5, 4.0))
    if intersection is not None:
        for sy in (-1, 1):
            c0 = intersection + sy * (cross_w / 2 + 1.0 + cw_len / 2)
            crosswalks.append((c0 - cw_len / 2, c0 + cw_len / 2))
    elif rng.random() < p.crosswalk_prob:
        c0 = float(rng.uniform(-0.3, 0.3) * length)
        crosswalks.append((c0 - cw_len / 2, c0 + cw_len / 2))
    stripe_w, stripe_gap = uniform(rng, (0.4, 0.6)), uniform(rng, (0.4, 0.7))
    for c0, c1 in crosswalks:
        t = -edge + 0.3
        while t + stripe_w <= edge - 0.3:
            marks[WHITE_PAINT].append(frame.bend(_slab(t, t + stripe_w, c0, c1, 0.0, MARK_H, ds=1.0)))
            t += stripe_w + stripe_gap
    if intersection is not None:  # across the cross street's mouth, just outside the main sidewalks
        for side in cross_sides:
            xa, xb = sorted((side * (walk_outer + 1.0), side * (walk_outer + 1.0 + cw_len)))
            yy = intersection - cross_w / 2 + 0.3
            while yy + stripe_w <= intersection + cross_w / 2 - 0.3:
                marks[WHITE_PAINT].append(_swap(_slab(yy, yy + stripe_w, xa, xb, 0.0, MARK_H, ds=10.0)))
                yy += stripe_w + stripe_gap
    gaps = list(crosswalks) + ([(mouth[0] - 0.5, mouth[1] + 0.5)] if mouth is not None else [])
    style = p.marking_styles[int(rng.integers(len(p.marking_styles)))] if p.marking_styles else "none"
    line_w = uniform(rng, (0.1, 0.18))
    if style != "none":
        dash, dash_gap = uniform(rng, (2.5, 4.0)), uniform(rng, (4.0, 8.0))
        for i in range(1, n_lanes):
            t = lane_t0 + i * lane_w
            if lane_dir[i - 1] != lane_dir[i]:  # the centre line
                if style == "double_yellow":
                    for o in (-1, 1):
                        marks[YELLOW_PAINT] += _line(frame, t + o * (line_w / 2 + 0.06), line_w, -half, half, gaps)
                elif style == "solid_white":
                    marks[WHITE_PAINT] += _line(frame, t, line_w, -half, half, gaps)
                else:
                    marks[WHITE_PAINT] += _line(frame, t, line_w, -half, half, gaps, dash, dash_gap)
            else:
                marks[WHITE_PAINT] += _line(frame, t, line_w, -half, half, gaps, dash, dash_gap)
        if rng.random() < 0.6:  # edge lines along the travel lanes
            for t in (lane_t0 + 0.25, lane_t0 + n_lanes * lane_w - 0.25):
                marks[WHITE_PAINT] += _line(frame, t, line_w, -half, half, gaps)
    mark_parts = [Part(g.merge(ms), wet(Material(c, roughness=0.6), wetness * 0.5)) for c, ms in marks.items()
                  if ms]
    if mark_parts:
        b.add("lane_marking", "lane_marking", mark_parts)
    patches = []
    for _ in range(integers(rng, p.patches)):
        pw, pl = uniform(rng, (1.0, min(4.0, road_w))), uniform(rng, (1.5, 8.0))
        ps, pt = rng.uniform(-half + pl, half - pl), rng.uniform(-edge + pw / 2, edge - pw / 2)
        patches.append(frame.bend(_ribbon(pt - pw / 2, pt + pw / 2, ps - pl / 2, ps + pl / 2, PATCH_Z, ds=2.0)))
    if patches:
        shade = float(rng.choice([0.6, 1.6]))
        patch_mat = wet(Material(vec3(np.array(asphalt.color) * shade), roughness=uniform(rng, (0.5, 0.9)),
                                 texture="noise", color2=vec3(np.array(asphalt.color) * shade * 0.7),
                                 texture_scale=30.0, texture_w=float(rng.uniform(0, 100)), bump=0.3), wetness)
        b.add("road_patch", "road", [Part(g.merge(patches), patch_mat)])
    if wetness > 0.3:
        puddles = []
        for _ in range(env.puddles):
            pr = uniform(rng, (0.4, 1.6))
            ps, pt = rng.uniform(-half + 5, half - 5), rng.uniform(-edge + pr, edge - pr)
            puddles.append(_puddle(rng, frame, ps, pt, pr))
        if puddles:
            b.add("puddle", "road", [Part(g.merge(puddles), puddle_material(asphalt))])

    # Buildings in rows on both sides.
    for side in (-1, 1):
        _building_row(b, side, walk_outer, half)

    # Vehicles: parked along the curbs (rows, both directions, some at an angle), then in the lanes.
    n_veh = integers(rng, p.vehicles)
    n_parked = round(n_veh * p.parked_share) if any(park) else 0
    parked_sides = [side for side, w in zip((-1, 1), park, strict=True) if w]
    for i in range(n_parked):
        side = parked_sides[i % len(parked_sides)] if len(parked_sides) == 1 else int(rng.choice(parked_sides))
        strip = park[(side + 1) // 2]
        parts = sample_vehicle(rng, k, str(rng.choice(["sedan", "hatchback", "suv", "van"],
                                                      p=[0.45, 0.25, 0.2, 0.1])))
        yaw = (0.0 if rng.random() < 0.5 else np.pi) + (rng.normal(0, 0.12) if rng.random() < p.parked_angle_prob
                                                         else rng.normal(0, 0.015))
        across = Footprint.of_points(_rect_points(_local_rect(parts)), yaw).points[:, 0]  # t offsets of corners
        width = float(np.ptp(across))
        # Its curb-side corner 0.2-0.5 m from the curb (or further out if the strip is wide).
        t_near = edge - 0.2 - rng.uniform(0, max(strip - width - 0.2, 0.05))
        t = t_near - across.max() if side > 0 else -t_near - across.min()
        reg = Region(-half + 4, half - 4, t - 0.01, t + 0.01, 0.0)
        regions = _cut_regions([reg], crosswalks + ([(mouth[0] - 3, mouth[1] + 3)] if mouth else []), 3.0)
        b.place("vehicle", "vehicle", parts, regions, yaw, footprint="rect", margin=0.0, tries=10)
    for _ in range(n_veh - n_parked):
        lane = int(rng.integers(n_lanes))
        parts = sample_vehicle(rng, k)
        yaw = (0.0 if lane_dir[lane] > 0 else np.pi) + rng.normal(0, 0.03)
        across = Footprint.of_points(_rect_points(_local_rect(parts)), yaw).points[:, 0]
        t = lane_ts[lane] - (across.max() + across.min()) / 2
        wiggle = float(np.clip((lane_w - np.ptp(across)) / 2 - 0.1, 0.01, 0.3))
        reg = Region(-half + 6, half - 6, t - wiggle, t + wiggle, 0.0)
        b.place("vehicle", "vehicle", parts, [reg], yaw, footprint="rect", margin=0.0, tries=10)
    if intersection is not None:  # a car or two on the cross street, waiting at the junction
        for side in cross_sides:
            if rng.random() < 0.7:
                parts = sample_vehicle(rng, k, str(rng.choice(["sedan", "hatchback", "suv"])))
                along = uniform(rng, (walk_outer + 2 + cw_len, walk_outer + 25))
                half_car = (_local_rect(parts)[2] - _local_rect(parts)[0]) / 2
                tt = intersection - side * float(np.clip(cross_w / 4, 0.0, cross_w / 2 - half_car - 0.15))
                b.place("vehicle", "vehicle", parts, [Region(tt - 0.01, tt + 0.01, side * along, side * along + 1e-3,
                                                             0.0)], -side * np.pi / 2, footprint="rect", margin=0.0)

    # Street furniture: lamps in rows, traffic lights at the corners, signs near crossings, bollards.
    lamp_glass = env.lamp_material()
    for side in (-1, 1):
        if rng.random() < p.lamp_prob:
            spacing = uniform(rng, p.lamp_spacing)
            t = side * (walk_in + 0.35)
            for s in np.arange(-half + rng.uniform(2, spacing), half - 2, spacing):
                # Heads glow in the colour of the lamps' point lights (_lamp_lights): one material for all.
                parts = sample_pole(rng, k, "street_lamp", lit=env.street_lights_on, glow=lamp_glass)
                # The arm reaches +y: turn it over the road.
                b.place("lamp", "pole_sign", parts, walk_regions, side * np.pi / 2, at=(float(s), t))
    if intersection is not None:
        for side in (-1, 1):
            for sy in (-1, 1):
                s = intersection + sy * (cross_w / 2 + 0.4)
                if side not in cross_sides:
                    s = intersection + sy * (cross_w / 2 + 1.0 + cw_len + 0.6)
                b.place("pole", "pole_sign", sample_pole(rng, k, "traffic_light"), walk_regions,
                        -sy * np.pi / 2 + np.pi, at=(s, side * (walk_in + 0.4)))
    for c0, c1 in crosswalks:
        for side in (-1, 1):
            if rng.random() < 0.5:
                s = c1 + 0.7 if rng.random() < 0.5 else c0 - 0.7
                b.place("pole", "pole_sign", sample_pole(rng, k, str(rng.choice(["sign", "round_sign"]))),
                        walk_regions, np.pi if side > 0 else 0.0, at=(s, side * (walk_in + 0.35)))
    n_bollards = integers(rng, p.bollards)
    if n_bollards:
        side = int(rng.choice([-1, 1]))
        s = float(crosswalks[0][1] + 1.5) if crosswalks else float(rng.uniform(-half / 2, half / 2))
        step = uniform(rng, (1.2, 2.0))
        for i in range(n_bollards):
            b.place("bollard", "pole_sign", sample_bollard(rng, k), walk_regions + verge_regions, 0.0,
                    at=(s + i * step, side * (walk_in + 0.25)))
    for _ in range(integers(rng, p.poles)):
        side = int(rng.choice([-1, 1]))
        near = [reg for reg in walk_regions if reg.t0 * side > 0]
        pole = sample_pole(rng, k)
        x0, _, x1, _ = _local_rect(pole)  # a sign on two poles is wide across the sidewalk
        m = max(0.1, -x0, x1) + 0.02
        t_end = min(walk_in + max(0.9, 2 * m), walk_outer)
        spots = [_across(reg.s0, reg.s1, (side * walk_in, side * t_end), reg.z) for reg in near]
        b.place("pole", "pole_sign", pole, spots, np.pi if side > 0 else 0.0, margin=m)

    # Trees: rows along the curb (or on the verge) or scattered; bushes on verges and by the buildings.
    n_trees = integers(rng, p.trees)
    for side in (-1, 1):
        n_side = n_trees // 2 + (n_trees % 2 if side > 0 else 0)
        t_line = side * ((edge + curb_w + walk_in) / 2 if verge_w else walk_in + 0.6)
        reach = walk_outer - abs(t_line) - 0.05  # fits even where a building stands at the sidewalk's back edge
        in_row = rng.random() < p.tree_row_prob
        spacing = uniform(rng, (7.0, 12.0))
        start = rng.uniform(-half + 3, -half + 3 + spacing)
        regions = verge_regions if verge_w else walk_regions
        for i in range(n_side):
            parts = sample_tree(rng, k, reach)
            trunk = 0.3
            if in_row:
                ok = False
                for extra in (0.0, 0.5, -0.5, 1.0, -1.0):
                    s = start + (i + extra) * spacing
                    if -half + 2 < s < half - 2 and b.place("tree", "vegetation", parts, regions, None,
                                                            margin=trunk, at=(s, t_line)):
                        ok = True
                        break
                if ok:
                    continue
            spots = [_across(reg.s0, reg.s1, (t_line - 0.6, t_line + 0.6), reg.z) for reg in regions
                    if reg.t0 * side > 0]
            b.place("tree", "vegetation", parts, spots, None, margin=0.4)
    # Bushes on the verges and along the sidewalks' back edges.
    bush_regions = verge_regions + [_across(reg.s0, reg.s1, (np.sign(reg.t0) * (walk_outer - 1.2),
                                                             np.sign(reg.t0) * walk_outer), reg.z)
                                    for reg in walk_regions]
    for _ in range(integers(rng, p.bushes)):
        b.place("bush", "vegetation", sample_bush(rng, k, 0.55), bush_regions, None, margin=0.56)
    for _ in range(integers(rng, p.bicycles)):
        side = int(rng.choice([-1, 1]))
        bike = sample_bicycle(rng, k)
        x0, y0, x1, y1 = _local_rect(bike)  # parked along the street: its length runs along s
        half_len, half_w = max(-y0, y1) + 0.05, max(-x0, x1) + 0.05
        spots = [_across(reg.s0 + half_len, reg.s1 - half_len,
                         (side * (walk_in + half_w), side * (walk_in + max(1.2, 2 * half_w) - half_w)), reg.z)
                 for reg in walk_regions if reg.t0 * side > 0 and reg.s1 - reg.s0 > 2 * half_len]
        b.place("bicycle", "vehicle", bike, spots, float(rng.choice([0.0, np.pi])), footprint="rect", margin=0.0)

    # People: on sidewalks (alone and in groups) and on the crosswalks.
    n_people = integers(rng, p.persons)
    crossing_regions = [Region(c0 + 0.3, c1 - 0.3, -edge + 0.3, edge - 0.3, MARK_H) for c0, c1 in crosswalks]
    if intersection is not None:  # the cross street's crosswalks, in (s, t) = (world y, world x)
        for side in cross_sides:
            xa, xb = sorted((side * (walk_outer + 1.3), side * (walk_outer + 0.7 + cw_len)))
            crossing_regions.append(Region(intersection - cross_w / 2 + 0.3, intersection + cross_w / 2 - 0.3,
                                           xa, xb, MARK_H))
    people_regions = walk_regions + cross_regions
    placed = 0
    while placed < n_people:
        if crossing_regions and rng.random() < p.crossing_share:
            heading = float(rng.choice([-1.0, 1.0])) * np.pi / 2 + rng.normal(0, 0.2)
            b.place("person", "person", sample_person(rng, k, "walk"), crossing_regions, heading, footprint="rect")
            placed += 1
        elif n_people - placed >= 2 and rng.random() < p.group_prob:
            n = min(int(rng.integers(2, 5)), n_people - placed)
            # Members that find no room in the group (a crowded sidewalk) stand alone somewhere else.
            for _ in range(n - _place_group(b, n, people_regions)):
                heading = (0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0, 0.4)
                b.place("person", "person", sample_person(rng, k), people_regions, heading, footprint="rect")
            placed += n
        else:
            heading = (0.0 if rng.random() < 0.5 else np.pi) + rng.normal(0, 0.4)
            b.place("person", "person", sample_person(rng, k), people_regions, heading, footprint="rect")
            placed += 1

    # Cracks, from a generator of their own and after every other object of the default scene: those objects
    # (names included), the cameras and all their draws are what they were without cracks. The cameras never look
    # at them (flat on the road, not things), and nothing is placed on or around them.
    if p.cracks[1] > 0:
        crack_rng = own_stream(rng, CRACK_STREAM, "street cracks")
        cracks = sample_cracks(crack_rng, integers(crack_rng, p.cracks), half, edge, lane_ts, lane_w)
        if cracks:
            b.add("road_crack", "road", crack_parts(cracks, frame, asphalt, wetness, crack_rng))

    if p.seated_people > 0:
        # A generator of its own (spawning one does not advance ``rng``): everything above and the cameras' draws
        # below are what they were without seated people.
        _seat_people(b, rng.spawn(1)[0], walk_regions, walk_outer, curb_h)

    # Cameras.
    kinds = [CAMERA_KINDS[int(i)] for i in rng.choice(3, size=ctx.views, p=np.array(p.camera_mix) / sum(p.camera_mix))]
    things = [o for o in b.objects if ctx.classes[o.class_id].thing]
    geom = _Geometry(frame, half, edge, walk_in, walk_outer, curb_h, lane_ts, lane_dir, walk_regions)
    cameras = []
    for i, kind in enumerate(kinds):
        # A kind with no free spot at all (a one-lane street full of cars has no room for a dashcam) gives way to
        # the others.
        for alt in (kind, *(k2 for k2 in CAMERA_KINDS if k2 != kind)):
            cam = _street_camera(b, alt, geom, things)
            if cam is not None:
                cam.kind = alt
                cameras.append(cam)
                kinds[i] = alt
                break
        else:
            raise RuntimeError("street camera: no free spot for any kind of camera")
    lights = env.lights(np.zeros(3))
    if env.street_lights_on:
        lights += _lamp_lights(b.objects, env, [np.array(c.location) for c in cameras], p.max_lamp_lights)
    spec = SceneSpec("street", ctx.classes, ctx.class_id("sky"), b.objects, lights, env.world(), cameras,
                     [env.post(rng, r.post) for _ in range(ctx.views)])
    return StreetLayout(spec, frame, curved, intersection, kinds, road_w, walk_outer, curb_h,
                        env.street_lights_on, wetness, b.building_polys)


def _lamp_lights(objects: list[SceneObject], env: Environment, eyes: list[FloatArray], limit: int) -> list[Light]:
    """Point lights just below the glowing heads of the street lamps nearest to the cameras (a glowing lens alone
    lights little of the street), at most ``limit`` of them: each light costs render time."""
    spots = []
    for o in objects:
        if not o.name.startswith("lamp"):
            continue
        yaw = o.rotation[2]
        rot = np.array([[np.cos(yaw), -np.sin(yaw), 0.0], [np.sin(yaw), np.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        for centre, _ in furniture.lamp_positions(o.parts):
            spots.append(rot @ np.array(centre) + np.array(o.location) - np.array([0.0, 0.0, 0.35]))
    if not spots or limit <= 0:
        return []
    pts = np.array(spots)
    dist = np.min([np.linalg.norm(pts - e, axis=1) for e in eyes], axis=0) if eyes else np.zeros(len(pts))
    return [env.street_light(pts[i]) for i in np.argsort(dist, kind="stable")[:limit]]


def _swap(mesh: Mesh) -> Mesh:
    """A mesh built as (x = t, y = s) turned into the cross street's frame (s along world x, t along world y):
    x and y swapped, faces reversed so that they still face outwards (the swap is a reflection)."""
    v = mesh.vertices[:, [1, 0, 2]].copy()
    return Mesh(v, mesh.faces[:, ::-1].copy(), mesh.smooth)


def _line(frame: StreetFrame, t: float, w: float, s0: float, s1: float, gaps: list[tuple[float, float]],
          dash: float | None = None, gap: float = 0.0) -> list[Mesh]:
    """A painted line at ``t`` (solid, or dashes of ``dash`` m every ``dash + gap``) that skips ``gaps``."""
    spans = [(s0, s1)] if dash is None else [(a, a + dash) for a in np.arange(s0, s1 - dash, dash + gap)]
    out = []
    for a, c in spans:
        for lo, hi in _subtract((a, c), gaps):
            if hi - lo > 0.2:
                out.append(frame.bend(_slab(t - w / 2, t + w / 2, lo, hi, 0.0, MARK_H, ds=3.0)))
    return out


def _subtract(span: tuple[float, float], cuts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    pieces = [span]
    for c0, c1 in cuts:
        nxt = []
        for a, b in pieces:
            if c1 <= a or c0 >= b:
                nxt.append((a, b))
            else:
                nxt += [x for x in ((a, c0), (c1, b)) if x[1] > x[0]]
        pieces = nxt
    return pieces


def _cut_regions(regions: list[Region], cuts: list[tuple[float, float]], pad: float) -> list[Region]:
    out = []
    for reg in regions:
        for a, c in _subtract((reg.s0, reg.s1), [(c0 - pad, c1 + pad) for c0, c1 in cuts]):
            out.append(Region(a, c, reg.t0, reg.t1, reg.z))
    return out


def _puddle(rng: np.random.Generator, frame: StreetFrame, s: float, t: float, r: float) -> Mesh:
    """A flat irregular disc (triangle fan) at PUDDLE_Z."""
    n = 14
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = r * (1 + 0.25 * np.sin(2 * ang + rng.uniform(0, 6)) + 0.15 * np.sin(3 * ang + rng.uniform(0, 6)))
    stretch = uniform(rng, (1.0, 2.0))
    ring = np.column_stack([t + rad * np.cos(ang), s + stretch * rad * np.sin(ang), np.full(n, PUDDLE_Z)])
    v = np.vstack([[t, s, PUDDLE_Z], ring])
    f = [(0, 1 + i, 1 + (i + 1) % n) for i in range(n)]
    return frame.bend(Mesh(v.astype(np.float32), np.asarray(f, dtype=np.int32)))


# --- Cracks ---------------------------------------------------------------------------------------------------

# The cracks' stream: a child of the scene's seed sequence at this spawn index, made without spawning (as the
# room-or-street draw's, :data:`ROOM_STREAM`): the scene's ``rng`` and its ``rng.spawn`` stay what they were.
CRACK_STREAM = 0x4352434B
CrackKind = Literal["longitudinal", "transverse", "network", "sealed"]
CRACK_KINDS: tuple[CrackKind, ...] = ("longitudinal", "transverse", "network", "sealed")
CRACK_SHARES = (0.35, 0.25, 0.25, 0.15)
CRACK_MARGIN = 0.1  # m: cracks keep this far inside the road's edges (the curbs)


@dataclass(frozen=True)
class Crack:
    """One crack (or sealed crack) of the road, in street coordinates.

    Attributes:
        kind: One of :data:`CRACK_KINDS`.
        paths: (N, 2) polylines of (t, s) points: one for a single crack, the trunk and its branches for a network.
        widths: (N,) metres across the crack at each point of the matching path.
    """

    kind: CrackKind
    paths: list[FloatArray]
    widths: list[FloatArray]


def own_stream(rng: np.random.Generator, key: int, what: str) -> np.random.Generator:
    """A generator of its own for the scene of ``rng``: the child of its seed sequence at spawn index ``key``,
    made without spawning, so neither ``rng``'s draws nor its ``rng.spawn`` children change.

    Args:
        rng: The scene's generator, made from a numpy ``SeedSequence`` (:func:`~segfactory.seeds.scene_rng`).
        key: The stream's spawn index (:data:`ROOM_STREAM`, :data:`CRACK_STREAM`).
        what: Who asks, for the error message.

    Returns:
        A generator that is a function of ``rng``'s seed sequence and ``key`` only.

    Raises:
        TypeError: ``rng`` was not made from a ``SeedSequence``.
    """
    seq = rng.bit_generator.seed_seq
    if not isinstance(seq, np.random.SeedSequence):
        raise TypeError(f"{what} needs a generator made from a numpy SeedSequence (scene_rng), got {seq!r}")
    return np.random.default_rng(np.random.SeedSequence(seq.entropy, spawn_key=(*seq.spawn_key, key),
                                                        pool_size=seq.pool_size))


def _walk(rng: np.random.Generator, start: FloatArray, heading: float, length: float, step: float,
          wander: float) -> FloatArray:
    """(N, 2) points of a crack's random walk in (t, s) from ``start``: steps of about ``step`` metres whose
    direction (``heading``: 0 along +s, pi/2 along +t) strays by an AR(1) process of ``wander`` radians per step."""
    n = max(2, math.ceil(length / step))
    dev = np.zeros(n)
    for i in range(1, n):
        dev[i] = 0.65 * dev[i - 1] + rng.normal(0.0, wander)
    ang = heading + dev
    steps = step * rng.uniform(0.6, 1.4, n)[:, None] * np.column_stack([np.sin(ang), np.cos(ang)])
    out: FloatArray = np.vstack([start, start + np.cumsum(steps, axis=0)])
    return out


def _width_profile(rng: np.random.Generator, n: int, width: float) -> FloatArray:
    """(n,) widths about ``width`` that vary smoothly along a crack and taper towards its ends."""
    knots = rng.uniform(0.6, 1.4, max(2, n // 6 + 2))
    w = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(knots)), knots) * width
    u = np.linspace(0, 1, n)
    taper = np.clip(np.minimum(u, 1 - u) / 0.15, 0.35, 1.0)
    out: FloatArray = w * taper
    return out


def _inside(path: FloatArray, t_lim: float, s_lim: float) -> FloatArray:
    """``path`` up to its first point outside ``|t| <= t_lim``, ``|s| <= s_lim`` (the points before it)."""
    out = (np.abs(path[:, 0]) > t_lim) | (np.abs(path[:, 1]) > s_lim)
    end = int(np.argmax(out)) if out.any() else len(path)
    kept: FloatArray = path[:end]
    return kept


def sample_cracks(rng: np.random.Generator, n: int, half: float, edge: float, lane_ts: list[float],
                  lane_w: float) -> list[Crack]:
    """``n`` cracks of a road ``|t| <= edge``, ``|s| <= half`` (street coordinates).

    Longitudinal cracks run along the wheel paths (about 0.8 m either side of a lane's centre) or the joints
    between lanes, transverse ones across the road from an edge, networks (alligator cracking) are a jagged
    trunk along a wheel path with short branches, and sealed cracks ("tar snakes") are wider, smoother lines of
    either direction. Every point stays :data:`CRACK_MARGIN` plus its half width inside the edges.

    Args:
        rng: The cracks' own generator (:data:`CRACK_STREAM`).
        n: How many cracks (a network counts as one).
        half: Half the street's length.
        edge: Half the road's width.
        lane_ts: ``t`` of each travel lane's centre.
        lane_w: Width of a travel lane.

    Returns:
        The cracks; one that found no room (a very narrow road) is left out.
    """
    cracks: list[Crack] = []
    s_lim = half - 1.0
    for _ in range(n):
        kind = CRACK_KINDS[int(rng.choice(len(CRACK_KINDS), p=CRACK_SHARES))]
        if kind == "sealed":
            base = float(rng.uniform(0.03, 0.06))
        else:
            base = float(rng.uniform(0.01, 0.03) if rng.random() < 0.6 else rng.uniform(0.02, 0.05))
        t_lim = edge - CRACK_MARGIN - 0.7 * base  # the widest point of a profile is 1.4 x base
        if t_lim <= 0.2:
            continue
        s = float(rng.uniform(-s_lim, s_lim))  # where it starts; a longitudinal crack runs on from there
        wheel = lane_ts[int(rng.integers(len(lane_ts)))] + float(rng.choice([-1.0, 1.0])) * uniform(rng, (0.7, 1.0))
        along = 0.0 if rng.random() < 0.5 else np.pi
        paths: list[FloatArray] = []
        if kind == "longitudinal" or (kind == "sealed" and rng.random() < 0.5):
            joints = [lane_ts[i] + lane_w / 2 for i in range(len(lane_ts) - 1)]
            t = float(rng.choice(joints)) if joints and rng.random() < 0.3 else wheel
            length = min(uniform(rng, (3.0, 25.0)), s_lim)
            s = float(np.clip(s, -s_lim + length, s_lim)) if along else float(np.clip(s, -s_lim, s_lim - length))
            paths.append(_walk(rng, np.array([t, s]), along + rng.normal(0, 0.02), length, 0.3,
                               0.03 if kind == "sealed" else 0.08))
        elif kind in ("transverse", "sealed"):
            side = 1.0 if rng.random() < 0.5 else -1.0
            start = np.array([side * (t_lim - rng.uniform(0.0, 0.5)), s])
            span = uniform(rng, (0.3, 1.0)) * 2 * t_lim
            paths.append(_walk(rng, start, -side * np.pi / 2 + rng.normal(0, 0.08), span, 0.2,
                               0.04 if kind == "sealed" else 0.12))
        else:  # network: a jagged trunk along a wheel path, branches off it, some branching again
            s = float(np.clip(s, -s_lim + 6.0, s_lim - 6.0))  # room for the trunk and its branches
            trunk = _walk(rng, np.array([wheel, s]), along, uniform(rng, (1.5, 5.0)), 0.15, 0.35)
            paths.append(trunk)
            for _ in range(integers(rng, (3, 8))):
                src = paths[int(rng.integers(len(paths)))]
                i = int(rng.integers(len(src)))
                d = src[min(i + 1, len(src) - 1)] - src[max(i - 1, 0)]
                heading = float(np.arctan2(d[0], d[1])) + float(rng.choice([-1.0, 1.0])) * uniform(rng, (0.5, 1.3))
                paths.append(_walk(rng, src[i], heading, uniform(rng, (0.3, 1.5)), 0.12, 0.35))
        kept, widths = [], []
        for j, path in enumerate(paths):
            path = _inside(path, t_lim, s_lim)
            if len(path) < 2 or np.linalg.norm(np.diff(path, axis=0), axis=1).sum() < 0.2:
                continue  # (what is left of) a crack that ran off the road at once
            kept.append(path)
            widths.append(_width_profile(rng, len(path), base * (1.0 if j == 0 else 0.6)))
        if kept:
            cracks.append(Crack(kind, kept, widths))
    return cracks


def _crack_mesh(path: FloatArray, widths: FloatArray, z: float) -> Mesh:
    """A flat ribbon at height ``z`` along a (N, 2) polyline of (t, s) points, ``widths`` (N,) across it, in street
    coordinates (x = t, y = s); its faces look up."""
    d = np.gradient(path, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)
    left = np.column_stack([-d[:, 1], d[:, 0]]) * (widths[:, None] / 2)  # to the left of the walking direction
    xy = np.stack([path + left, path - left], axis=1).reshape(-1, 2)
    v = np.column_stack([xy, np.full(len(xy), z)])
    n = len(path) - 1
    f = [(2 * i, 2 * i + 1, 2 * i + 3) for i in range(n)] + [(2 * i, 2 * i + 3, 2 * i + 2) for i in range(n)]
    return Mesh(v.astype(np.float32), np.asarray(f, dtype=np.int32))


def crack_parts(cracks: list[Crack], frame: StreetFrame, asphalt: Material, wetness: float,
                rng: np.random.Generator) -> list[Part]:
    """The cracks as parts lying on the road at :data:`CRACK_Z`: open cracks in a dark, matt shade of ``asphalt``,
    sealed ones black and smoother; both wet by the rain like the asphalt patches.

    Args:
        cracks: From :func:`sample_cracks`.
        frame: The street's centre line (the ribbons bend with it).
        asphalt: The road's material.
        wetness: The environment's (0 dry .. 1 soaked).
        rng: The cracks' own generator (the materials' draws).

    Returns:
        Up to two parts (open cracks, sealed cracks); none without cracks.
    """
    opened = [frame.bend(_crack_mesh(p, w, CRACK_Z)) for c in cracks if c.kind != "sealed"
              for p, w in zip(c.paths, c.widths, strict=True)]
    sealed = [frame.bend(_crack_mesh(p, w, CRACK_Z)) for c in cracks if c.kind == "sealed"
              for p, w in zip(c.paths, c.widths, strict=True)]
    dark = uniform(rng, (0.15, 0.35))  # the inside of a crack lies in shadow
    crack_mat = wet(Material(vec3(np.array(asphalt.color) * dark), roughness=uniform(rng, (0.8, 0.95))), wetness)
    # Sealant: black and smoother than the open cracks, yet not smooth enough to mirror the sky at a dashcam's
    # grazing angle (a flat glossy ribbon on bumped asphalt shines there like a painted line).
    tar = wet(Material((0.01, 0.01, 0.011), roughness=uniform(rng, (0.6, 0.8))), wetness)
    return [Part(g.merge(ms), m) for ms, m in ((opened, crack_mat), (sealed, tar)) if ms]


def _building_row(b: _Builder, side: int, walk_outer: float, half: float) -> None:
    """Buildings along one side, facades towards the road, none overlapping the street, the cross street or
    each other."""
    rng, p, k, frame = b.rng, b.p, b.k, b.frame
    s = -half - rng.uniform(0, 8)
    while s < half:
        w, depth = uniform(rng, p.building_width), uniform(rng, p.building_depth)
        height, setback = uniform(rng, p.building_height), uniform(rng, p.setback)
        parts = sample_building(rng, k, w, depth, height, shop_front=bool(rng.random() < p.shop_front_prob),
                                balcony_bands=p.balcony_bands, lit_shops=p.lit_shops)
        rect = _local_rect(parts)  # x0..x1 depth (facade at x1), y0..y1 width
        width = rect[3] - rect[1]
        front = walk_outer + setback
        placed = False
        for _ in range(12):
            s_c = s + width / 2
            # Facade (+x local) towards the road: local +x = -side * normal.
            yaw = (0.0 if side < 0 else np.pi) - float(frame.theta(s_c))
            facade_dir = -side * frame.normal(s_c)
            tang = frame.tangent(s_c)
            anchor = frame.to_world(s_c, side * front)  # the middle of the facade's foot
            center = anchor - facade_dir * rect[2] - tang * (rect[1] + rect[3]) / 2 * (1 if side < 0 else -1)
            poly = _world_poly(rect, center, yaw)
            for _ in range(3):  # on the inside of a curve a facade's ends come nearer the road: move it back
                deficit = front - float(np.min(side * frame.to_street(_densify(poly))[1]))
                if deficit <= 1e-6:
                    break
                center = center - facade_dir * (deficit + 1e-3)
                poly = _world_poly(rect, center, yaw)
            if not any(_polys_overlap(poly, q) for q in b.building_polys + b.keep_out) and \
                    (not b.occupied_list or b.free(center[None], Footprint.of_points(_rect_points(rect), yaw))[0]):
                placed = True
                break
            s += 1.5
        if placed:
            b.add("building", "building", parts, (center[0], center[1], 0.0), yaw)
            b.building_polys.append(poly)
            s += width + (uniform(rng, (0.5, 6.0)) if rng.random() < p.building_gap_prob else 0.0)


def _densify(poly: FloatArray, n: int = 8) -> FloatArray:
    """Points along a polygon's edges (n per edge)."""
    a, c = poly, np.roll(poly, -1, axis=0)
    f = np.linspace(0, 1, n, endpoint=False)[:, None, None]
    out: FloatArray = (a[None] + f * (c - a)[None]).reshape(-1, 2)
    return out


def _place_group(b: _Builder, n: int, regions: list[Region]) -> int:
    """A group of ``n`` people: the whole group's outline is placed first, then its members, each clear.

    Returns:
        How many of them were placed.
    """
    rng, k = b.rng, b.k
    members = [sample_person(rng, k, "stand") for _ in range(n)]
    offsets = group_offsets(rng, n)
    pad = max(footprint_radius(m) for m in members)
    fp_group = Footprint.of_points(offsets, pad=pad)
    usable = [r2 for r in regions if (r2 := r.shrunk(min(fp_group.radius, 1.2))) is not None]
    if not usable:
        return 0
    areas = np.array([r.area for r in usable])
    for _ in range(12):
        reg = usable[int(rng.choice(len(usable), p=areas / areas.sum()))]
        s = np.clip(rng.uniform(reg.s0, reg.s1) + rng.uniform(-3, 3, 24), reg.s0, reg.s1)
        t = rng.uniform(reg.t0, reg.t1, 24)
        theta = float(b.frame.theta(s[0]))
        c, sn = np.cos(-theta), np.sin(-theta)
        world_off = offsets @ np.array([[c, sn], [-sn, c]])  # offsets turned with the street
        fp = Footprint(world_off, pad)
        xy = b.frame.to_world(s, t)
        hit = np.flatnonzero(b.free(xy, fp))
        if not len(hit):
            continue
        center = xy[hit[0]]
        placed = 0
        for parts, off in zip(members, world_off, strict=True):
            spot = center + off
            yaw = float(np.arctan2(-off[0], off[1])) + np.pi + rng.normal(0, 0.3)  # towards the group's centre
            # Its real outline at that yaw, not its bounding circle: people in a group stand closer than that.
            fp_m = Footprint.of_points(_rect_points(_local_rect(parts)), yaw)
            if b.free(spot[None], fp_m)[0]:
                b.add("person", "person", parts, (spot[0], spot[1], reg.z), yaw)
                b.occupy(spot, fp_m)
                placed += 1
        return placed
    return 0


SEATED_GAP = 0.6  # metres between the origins of two people on one bench


def bench_with_sitters(rng: np.random.Generator, k: MaterialKnobs, n: int) -> tuple[Bench, list[tuple[Figure, float,
                                                                                                      float]]]:
    """A bench and up to ``n`` people sitting on it, bench-local (see :class:`~scenes.street_assets.furniture.Bench`):
    each figure with the (x, y) of its origin, its seat's front edge on the bench's and its body clear of the
    backrest (no more of it below the seat's top than ``SEAT_TOLERANCE``)."""
    bench = sample_bench(rng, k)
    slots = max(1, min(n, int((bench.length - 0.3) // SEATED_GAP)))
    xs = (np.arange(slots) - (slots - 1) / 2) * (bench.length - 0.3) / slots
    xs = xs + rng.uniform(-0.05, 0.05, slots)
    out = []
    for x in xs:
        fig = sample_figure(rng, k, "sit", seat_height=bench.seat_height)
        y = -float(fig.seat_front or 0.0)  # the figure's seat front on the bench's front edge
        body = np.concatenate([q.mesh.vertices for r, q in fig.parts.items() if r != "phone"]).astype(np.float64)
        above = body[body[:, 2] > bench.seat_height - SEAT_TOLERANCE]
        y += max(0.0, -bench.depth + 0.01 - float(above[:, 1].min() + y))  # forward, clear of the backrest
        out.append((fig, float(x), y))
    return bench, out


def _seat_people(b: _Builder, rng: np.random.Generator, walk_regions: list[Region], walk_outer: float,
                 curb_h: float) -> None:
    """``seated_people``: a share of the people on the sidewalks sit on benches or squat, all drawn from ``rng`` (a
    generator of the scene's own). A sitter moves to a bench at a sidewalk's back edge, facing the road (benches
    go where they fit; their people stand on where none does); a squatter stays where it stood if its outline
    fits there. A changed person keeps its object's name and its place in the list."""
    p, k = b.p, b.k
    people = [i for i, o in enumerate(b.objects) if o.name.startswith("person_") and abs(o.location[2] - curb_h) < 1e-6]
    sitters: list[int] = []
    squatters: list[int] = []
    for i in people:
        if rng.random() < p.seated_people:
            (sitters if rng.random() < 0.6 else squatters).append(i)
    for i in squatters:
        obj = b.objects[i]
        parts = sample_person(rng, k, "squat")
        yaw = obj.rotation[2]
        fp = Footprint.of_points(_rect_points(_local_rect(parts)), yaw)
        center = (float(obj.location[0]), float(obj.location[1]))
        others = FootprintSet.of([e for e in b.occupied_list if e[0] != center])
        xy = np.array([center])
        if others.clear(xy, fp)[0] and (not b.building_polys or
                                       (_dist_to_polys(xy, b.building_polys) >= fp.radius).all()):
            b.objects[i] = SceneObject(obj.name, obj.class_id, parts, obj.location, obj.rotation)
            b.occupy(xy[0], fp)
    regions = [r for r in walk_regions if r.s1 - r.s0 > 5.0]
    while sitters and regions:
        group = sitters[:int(rng.integers(1, 4))]
        sitters = sitters[len(group):]
        bench, seated = bench_with_sitters(rng, k, len(group))
        local = [_rect_points(_local_rect(bench.parts))]
        local += [_rect_points(_local_rect(f.part_list())) + np.array([x, y]) for f, x, y in seated]
        pts = np.concatenate(local)
        rear = -float(pts[:, 1].min())
        reg = regions[int(rng.integers(len(regions)))]
        side = 1.0 if reg.t0 > 0 else -1.0
        s = rng.uniform(reg.s0 + bench.length, reg.s1 - bench.length, 24)
        t = side * (walk_outer - 0.05 - rear - rng.uniform(0.0, 0.3, 24))
        yaw = side * np.pi / 2 - float(b.frame.theta(float(s[0])))
        fp = Footprint.of_points(pts, yaw)
        xy = b.frame.to_world(s, t)
        hit = np.flatnonzero(b.free(xy, fp))
        if not len(hit):
            continue
        spot = xy[hit[0]]
        b.add("bench", "pole_sign", bench.parts, (spot[0], spot[1], reg.z), yaw)
        b.occupy(spot, fp)
        c, sn = np.cos(yaw), np.sin(yaw)
        for i, (fig, x, y) in zip(group, seated, strict=False):
            at = spot + np.array([c * x - sn * y, sn * x + c * y])
            obj = b.objects[i]
            b.objects[i] = SceneObject(obj.name, obj.class_id, fig.part_list(), vec3((at[0], at[1], reg.z)),
                                       (0.0, 0.0, yaw))


@dataclass
class _Geometry:
    frame: StreetFrame
    half: float
    edge: float
    walk_in: float
    walk_outer: float
    curb_h: float
    lane_ts: list[float]
    lane_dir: list[float]
    walk_regions: list[Region]


# Cameras keep this far from every object's footprint: clear of the near clip plane (0.1) with room to spare.
CAMERA_CLEARANCE = 0.3
# How much a thing in view counts when the tries that see enough things are ranked: people and poles are small in
# the frame and scarce in the labels, so views where they are large win.
CLASS_WEIGHT = {"person": 3.0, "pole_sign": 1.0, "vehicle": 0.5}
# A view framed on vehicles (``vehicle_views``) or people (``person_views``) scores that class only, and one of
# them up to the whole frame (other views: a quarter); it aims at one within this many metres of the camera.
FRAMED_ON = {"vehicle": 20.0, "person": 8.0}
SHARE_CAP = {False: 0.25, True: 1.0}
GOOD_TRIES = 8  # tries that see enough things, of which the best is kept
# Points ahead of an eye-level camera (metres along its view) that must be free: a dashcam keeps a gap to the car
# in front, a pedestrian's view is not blocked by someone right at the lens.
AHEAD = {"dashcam": np.array([1.5, 3.0, 4.5, 6.0]), "pedestrian": np.array([0.9, 1.5])}


def _street_camera(b: _Builder, kind: CameraKind, geo: _Geometry, things: list[SceneObject]) -> Camera | None:
    """A camera of ``kind`` outside every object; retried until enough labeled things are in frame. Of the
    first ``GOOD_TRIES`` tries that see enough, the one where people and poles are largest wins (in a share
    ``vehicle_views`` / ``person_views`` of the views: the one where vehicles / people fill most of the frame); if
    none does, the attempt that saw most, marked with ``min_visible_met=False``; None if no try found a free
    spot."""
    rng, p, ctx = b.rng, b.p, b.ctx
    kc = ctx.randomization.camera
    eye = Footprint.circle(CAMERA_CLEARANCE)
    targets = np.array([(*o.location[:2], o.location[2] + min(_height(o) / 2, 1.5)) for o in things]
                       or [(0.0, 0.0, 0.0)])
    # Drawn only when asked for, so that the default leaves every scene's draws as they were (and one draw
    # decides both shares: vehicle_views alone draws what it drew before person_views existed).
    framed = None
    if p.vehicle_views > 0 or p.person_views > 0:
        u = float(rng.random())
        framed = "vehicle" if u < p.vehicle_views else "person" if u < p.vehicle_views + p.person_views else None
    names = [ctx.classes[o.class_id].name for o in things]
    table, other = ({framed: 1.0}, 0.0) if framed else (CLASS_WEIGHT, 1.0)
    weights = np.array([table.get(n, other) for n in names] or [0.0])
    sizes = np.array([min(_height(o), 4.0) for o in things] or [0.0])
    aims = targets[[n == framed for n in names]] if framed and things else np.zeros((0, 3))
    aim_m = FRAMED_ON[framed] if framed else 0.0
    tries = BestTry(kc.min_visible_objects, GOOD_TRIES)
    for _ in range(kc.max_tries):
        pose = _camera_pose(rng, p, kind, geo)
        if pose is None:
            continue
        loc, fwd = pose
        near = np.flatnonzero(np.linalg.norm(aims[:, :2] - loc[:2], axis=1) < aim_m)
        if near.size:  # a framed view looks at one of those nearby (off its centre a little)
            to = aims[int(rng.choice(near))] - loc
            to[:2] += rng.normal(0.0, 0.6 if framed == "vehicle" else 0.25, 2)
            fwd = to / max(float(np.linalg.norm(to)), 1e-9)
        if not b.free(loc[None, :2], eye)[0]:
            continue
        if kind != "surveillance":  # no wall of a car or a person right in front of the lens
            ahead = fwd[:2] / max(float(np.linalg.norm(fwd[:2])), 1e-9)
            steps = AHEAD[kind]
            if not b.free(loc[None, :2] + steps[:, None] * ahead[None], Footprint.circle(0.6)).all():
                continue
        cam = Camera(vec3(loc), look_at(loc, loc + fwd), fov=np.radians(uniform(rng, kc.fov_deg)),
                     clip_start=0.1, clip_end=400.0)
        vis = visible_mask(cam, targets, margin=0.05) if things else np.zeros(1, dtype=bool)
        share = frame_share(cam, targets, sizes, SHARE_CAP[framed is not None])
        if tries.offer(cam, int(vis.sum()), float((weights * vis * share).sum())):
            break
    return tries.result()  # None: no free spot in max_tries draws


def _height(o: SceneObject) -> float:
    return float(max(p.mesh.vertices[:, 2].max() for p in o.parts))


def _camera_pose(rng: np.random.Generator, p: StreetParams, kind: CameraKind, geo: _Geometry
                 ) -> tuple[FloatArray, FloatArray] | None:
    """(location (3,), forward (3,)) of one camera try."""
    frame, half = geo.frame, geo.half
    direction = 1.0 if rng.random() < 0.5 else -1.0
    end, ahead = min(5.0, half * 0.2), min(40.0, half)  # keep off the street's ends; leave street in view
    if kind == "dashcam":
        lane = int(rng.integers(len(geo.lane_ts)))
        direction = geo.lane_dir[lane]
        s = rng.uniform(-half + end, max(-half + end, half - ahead)) * direction
        t = geo.lane_ts[lane] + rng.uniform(-0.3, 0.3)
        z = uniform(rng, p.camera_height or p.dashcam_height)
        yaw = np.radians(rng.uniform(-1, 1) * uniform(rng, p.camera_yaw_deg) / 5)
        pitch = np.radians(uniform(rng, p.camera_pitch_deg))
    elif kind == "pedestrian":
        reg = geo.walk_regions[int(rng.integers(len(geo.walk_regions)))]
        lo, hi = (max(reg.s0, -half + end), min(reg.s1, half - ahead)) if direction > 0 else \
            (max(reg.s0, -half + ahead), min(reg.s1, half - end))
        if hi <= lo:
            return None
        s, t = rng.uniform(lo, hi), rng.uniform(reg.t0 + 0.3, reg.t1 - 0.3)
        z = geo.curb_h + uniform(rng, p.camera_height or p.pedestrian_height)
        # Turned off the street direction, towards the road more often than not.
        yaw = np.radians(rng.uniform(-0.3, 1) * uniform(rng, p.camera_yaw_deg)) * np.sign(t) * direction
        pitch = np.radians(uniform(rng, p.camera_pitch_deg))
    else:
        side = 1.0 if rng.random() < 0.5 else -1.0
        s = rng.uniform(-half * 0.7, half * 0.7)
        t = side * (geo.walk_outer - rng.uniform(0.2, 0.6))
        z = geo.curb_h + uniform(rng, p.surveillance_height)
        yaw = np.radians(rng.uniform(20, 75)) * side * direction  # towards the road
        pitch = np.radians(uniform(rng, p.surveillance_pitch_deg))
    xy = frame.to_world(s, t)
    along = direction * frame.tangent(s)
    c, sn = np.cos(yaw), np.sin(yaw)
    # Positive yaw turns from the viewing direction towards -t when direction > 0 (left of it).
    d2 = np.array([c * along[0] - sn * along[1], sn * along[0] + c * along[1]])
    fwd = np.array([d2[0] * np.cos(pitch), d2[1] * np.cos(pitch), np.sin(pitch)])
    return np.array([xy[0], xy[1], z]), fwd


# --- Rooms (``interior_scenes``) ---------------------------------------------------------------------------------

# The room-or-street draw's stream: a child of the scene's seed sequence at this spawn index (the street never
# spawns more than one child, so it never meets it), made without spawning: the scene's own ``rng.spawn`` (the
# seated people's generator) stays the child it was.
ROOM_STREAM = 0x524F4F4D
ROOM_DAYLIGHT: dict[str, Daylight] = {"clear": "day", "overcast": "overcast", "rain": "overcast", "dusk": "dusk"}
ROOM_WORLD = World((0.02, 0.02, 0.025), (0.02, 0.02, 0.025), 1.0)


@dataclass
class RoomLayout:
    """A sampled room scene: its spec and the room behind it (for tests and inspection)."""

    spec: SceneSpec
    room: Room


def is_room(rng: np.random.Generator, share: float) -> bool:
    """Whether the scene of generator ``rng`` is a room (``interior_scenes`` = ``share``), drawn from a generator
    of its own that neither advances ``rng`` nor spawns from it (0 draws nothing). Scenes' generators come from
    :func:`~segfactory.seeds.scene_rng`: the draw is a function of their seed sequence."""
    if share <= 0:
        return False
    return bool(own_stream(rng, ROOM_STREAM, "is_room").random() < share)


def build_room(ctx: SceneContext) -> RoomLayout:
    """Sample one room scene (``interior_scenes``): the street environment's draw sets the daylight in the windows
    (clear: day, overcast and rain: overcast, dusk: dusk with the lamps on) and the views' exposure and noise (no
    fog indoors); :func:`~scenes.street_assets.interiors.sample_room` lays the room out and
    :func:`~scenes.street_assets.interiors.room_camera` places each view inside it, framed on its people; a room
    with a flash gets a flash light at every camera, lit in that camera's view only."""
    rng, r = ctx.rng, ctx.randomization
    env = sample_environment(rng, ctx.params.environment)
    cameras: list[Camera] = []
    for _ in range(20):  # a room whose people found no room at all, or no camera spot: another room
        room = sample_room(rng, r.materials, ROOM_DAYLIGHT[env.condition])
        cameras = []
        for _ in range(ctx.views):
            cam = room_camera(rng, room, r.camera.max_tries)
            if cam is None:
                break
            cameras.append(cam)
        if len(cameras) == ctx.views:
            break
    else:
        raise RuntimeError("street room: no camera spot in 20 rooms")
    objects = [SceneObject(f"{it.kind}_{i}", ctx.class_id(it.cls), it.parts, it.location, (0.0, 0.0, it.yaw))
               for i, it in enumerate(room.items)]
    lights = list(room.lights) + ([flash_light(c, room.flash_energy, v) for v, c in enumerate(cameras)]
                                if room.flash else [])
    post = []
    for _ in range(ctx.views):
        fx = env.post(rng, r.post)
        fx.fog_density = 0.0
        post.append(fx)
    spec = SceneSpec("street", ctx.classes, ctx.class_id("sky"), objects, lights, ROOM_WORLD, cameras, post)
    return RoomLayout(spec, room)


@register_scene(
    "street",
    description="urban street: straight, curved or crossing roads with markings, crosswalks and curbs, buildings, "
                "parked and moving vehicles, people alone and in groups, lamps, signs, trees; dashcam, pedestrian "
                "and surveillance cameras",
    classes=CLASSES,
    background="sky",
    params=StreetParams,
    randomization={
        "camera": {"fov_deg": [35, 95], "min_visible_objects": 2},
        "post": {"noise_std": [0.0, 0.012], "blur_sigma": [0.0, 0.6], "exposure": [-0.5, 0.5],
                 "vignetting": [0.0, 0.3], "white_balance": [-0.08, 0.08], "tint": [-0.03, 0.03],
                 "motion_blur_prob": 0.15, "motion_blur": [1.0, 5.0], "chromatic_aberration": [0.0, 1.0],
                 "lens_k1": [-0.15, 0.03]},
    },
)
def sample_street(ctx: SceneContext) -> SceneSpec:
    if is_room(ctx.rng, ctx.params.interior_scenes):
        return build_room(ctx).spec
    return build_street(ctx).spec
