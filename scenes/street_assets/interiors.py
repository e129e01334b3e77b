"""Rooms of the ``street`` family (``interior_scenes``): a lounge, a kitchen or a dining room with people in it.

:func:`sample_room` lays out one closed room: a floor (wood boards, tiles, carpet, concrete or packed earth),
four walls (painted plaster, wallpaper, wood planks or brick), a ceiling, one or two windows (a glowing pane of
daylight with a frame and sill, an area light in front of it) and a door; furniture: sofas and armchairs (a base,
seat cushions, a backrest and arms in fabric, velvet or leather), chairs, dining tables, coffee tables (some with
glass tops), low round tables, low stools, shelves, cabinets and kitchen counters with clutter (pots, bottles,
bowls, boxes, books), a TV on a low cabinet, rugs, floor lamps and potted plants; and 1-6 people
(:mod:`scenes.street_assets.people`): sitting on the sofas, armchairs, chairs and stools (the ``sit`` pose at the
seat's real height, as ``scenes.street.bench_with_sitters`` does), squatting on the floor by a low table, or
standing, often close together. :func:`room_camera` places a camera inside it, framed on the people.

Coordinates: the room's floor is ``z = 0`` over ``|x| <= width / 2``, ``|y| <= depth / 2`` (the walls' inner
faces), the ceiling at ``height``. Furniture is built like the other street assets: object-local, standing on
``z = 0``, facing ``+y``; a seat's origin is the middle of its seat's front edge (the seat from ``y = -depth`` to
0, as :class:`~scenes.street_assets.furniture.Bench`). Every item keeps its solid boxes (:attr:`Item.solids`,
object-local, axis-aligned), which the layout, the cameras and the tests check against; a rug is a floor
covering 2 mm above the floor (things stand through it) and has none. Footprints never overlap
(:mod:`scenes.placement`), every item stands on the floor (clutter on its shelf or table top, part of that item),
and a sitter's body rests on its seat, clear of the backrest and the arms.

Light: a ceiling light (a flush glowing fixture and an area light under it) in most rooms, floor lamps that are
on, daylight through the windows (an area light per window, its strength and colour from the street environment's
condition: day, overcast or dusk) and, from :func:`room_camera`'s caller, a flash at the camera in a share of the
rooms. The sky outside never reaches in (the room is closed), so a room is never lit by it alone.

Plain NumPy: nothing here imports Blender.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from scenes import geometry as g
from scenes.camera import BestTry, frame_share, look_at, visible_mask
from scenes.placement import Footprint, FootprintSet
from scenes.randomization import MaterialKnobs, jitter_color, kelvin_to_rgb, srgb8, uniform
from scenes.spec import Camera, FloatArray, Light, Material, Mesh, Part, TextureKind, Vec3, vec3
from scenes.street_assets.nature import foliage_material, pick
from scenes.street_assets.people import SEAT_TOLERANCE, Figure, sample_figure

RoomKind = Literal["lounge", "kitchen", "dining"]
ROOM_KINDS: tuple[RoomKind, ...] = ("lounge", "kitchen", "dining")
ROOM_KIND_P = (0.45, 0.3, 0.25)
RoomClass = Literal["building", "vegetation", "person"]
Daylight = Literal["day", "overcast", "dusk"]
Box3 = tuple[float, float, float, float, float, float]  # x0, y0, z0, x1, y1, z1 (object-local)

PEOPLE = (1, 6)
WALL_T = 0.12  # wall thickness (outside the room's interior)
SEAT_GAP = 0.62  # metres between two sitters' origins on a sofa
CAMERA_CLEARANCE = 0.3  # metres from the camera to every solid box and wall
STANDING_EYE, SEATED_EYE = (1.4, 1.7), (1.0, 1.3)
ROOM_FOV_DEG = (42.0, 75.0)
TARGET_DISTANCE = (1.0, 4.0)
GOOD_TRIES = 8
# A person counts up to this share of the frame when tries are ranked (about 0.6 of its height): a group in view
# beats one person cut off by the frame.
SHARE_CAP = 0.4


PLASTER = [srgb8(236, 232, 220), srgb8(222, 214, 196), srgb8(205, 196, 170), srgb8(190, 200, 196),
           srgb8(214, 190, 160), srgb8(170, 150, 120), srgb8(200, 205, 215), srgb8(150, 110, 80)]
WALLPAPER = [(srgb8(200, 180, 140), srgb8(150, 120, 80)), (srgb8(160, 170, 140), srgb8(110, 125, 95)),
             (srgb8(190, 160, 160), srgb8(140, 100, 100)), (srgb8(220, 210, 180), srgb8(180, 160, 120))]
WOOD = [srgb8(120, 80, 45), srgb8(150, 105, 65), srgb8(90, 60, 35), srgb8(170, 130, 85), srgb8(70, 50, 35),
        srgb8(110, 95, 75)]
BRICK = [srgb8(140, 70, 50), srgb8(160, 95, 70), srgb8(120, 60, 45), srgb8(180, 170, 160)]
TILE = [srgb8(200, 195, 185), srgb8(150, 140, 125), srgb8(110, 60, 45), srgb8(60, 60, 62), srgb8(220, 220, 215)]
CARPET = [srgb8(120, 100, 80), srgb8(90, 90, 95), srgb8(130, 60, 55), srgb8(70, 80, 100), srgb8(160, 150, 130)]
EARTH = [srgb8(120, 105, 90), srgb8(95, 85, 75), srgb8(140, 130, 115)]
CONCRETE = [srgb8(130, 128, 122), srgb8(100, 98, 95), srgb8(155, 150, 140)]
# Upholstery: fabric, velvet (the gold, green and wine of old lounges) and leather.
FABRIC = [srgb8(120, 110, 100), srgb8(70, 75, 85), srgb8(150, 140, 120), srgb8(60, 80, 60), srgb8(110, 40, 40),
          srgb8(40, 50, 80), srgb8(180, 170, 150)]
VELVET = [srgb8(190, 145, 40), srgb8(170, 130, 50), srgb8(40, 90, 60), srgb8(110, 25, 40), srgb8(50, 60, 110)]
LEATHER = [srgb8(80, 45, 25), srgb8(25, 22, 20), srgb8(120, 70, 35), srgb8(150, 120, 90)]
CLUTTER = [srgb8(200, 40, 35), srgb8(40, 90, 160), srgb8(230, 200, 60), srgb8(60, 140, 70), srgb8(235, 235, 230),
           srgb8(30, 30, 30), srgb8(160, 120, 80), srgb8(200, 120, 50)]
METAL = [srgb8(180, 180, 178), srgb8(60, 60, 62), srgb8(140, 120, 90), srgb8(30, 30, 32)]


# --- Parts ------------------------------------------------------------------------------------------------------

class _Kit:
    """Meshes grouped by material (one Part per material), and the solid boxes of an item."""

    def __init__(self) -> None:
        self.groups: dict[str, tuple[Material, list[Mesh]]] = {}
        self.solids: list[Box3] = []

    def add(self, key: str, material: Material, mesh: Mesh, solid: bool = True) -> None:
        self.groups.setdefault(key, (material, []))[1].append(mesh)
        if solid:
            lo, hi = mesh.vertices.min(axis=0), mesh.vertices.max(axis=0)
            self.solids.append((float(lo[0]), float(lo[1]), float(lo[2]), float(hi[0]), float(hi[1]), float(hi[2])))

    def box(self, key: str, material: Material, size: tuple[float, float, float], at: tuple[float, float, float],
            solid: bool = True) -> None:
        """A box of ``size`` whose bottom face is centred at ``at``."""
        self.add(key, material, g.transform(g.box(*size), at), solid)

    def parts(self) -> list[Part]:
        return [Part(g.merge(meshes), m) for m, meshes in self.groups.values()]


def _mat(rng: np.random.Generator, k: MaterialKnobs, palette: list[Vec3], roughness: tuple[float, float] = (0.5, 0.9),
         texture: Literal["none"] | TextureKind = "none", scale: float = 5.0, dark: float = 0.7,
         bump: float = 0.0) -> Material:
    color = jitter_color(rng, pick(rng, palette), k)
    if texture == "none":
        return Material(color, roughness=uniform(rng, roughness), bump=bump)
    return Material(color, roughness=uniform(rng, roughness), texture=texture,
                    color2=vec3(c * dark for c in color), texture_scale=scale, texture_w=float(rng.uniform(0, 100)),
                    bump=bump)


def _wood(rng: np.random.Generator, k: MaterialKnobs) -> Material:
    return _mat(rng, k, WOOD, (0.4, 0.75), "wave", float(rng.uniform(3.0, 8.0)), float(rng.uniform(0.6, 0.8)))


def _upholstery(rng: np.random.Generator, k: MaterialKnobs) -> Material:
    u = rng.random()
    if u < 0.35:  # velvet: a soft sheen, mottled
        return _mat(rng, k, VELVET, (0.55, 0.75), "noise", float(rng.uniform(3.0, 8.0)), 0.75)
    if u < 0.6:
        return _mat(rng, k, LEATHER, (0.3, 0.5), "noise", float(rng.uniform(6.0, 15.0)), 0.85)
    return _mat(rng, k, FABRIC, (0.75, 0.95), "noise", float(rng.uniform(15.0, 40.0)), 0.8)


# --- Items ------------------------------------------------------------------------------------------------------

@dataclass
class Seat:
    """Where people sit on a seat item (object-local): the seat's top at ``height``, from ``y = -depth`` to its
    front edge at 0, ``length`` across x (between the arms, if any), centred."""

    height: float
    depth: float
    length: float


@dataclass
class Item:
    """One labeled thing of a room.

    Attributes:
        kind: What it is ("floor", "wall", "sofa", "person", ...); the scene object's name starts with it.
        cls: Its class in the street map: "building" (the room and all furniture), "vegetation" or "person".
        parts: Object-local parts.
        location: World position of its origin (on the floor: z = 0).
        yaw: Radians about z.
        solids: Object-local boxes its geometry lies in (people: their bounding box); empty for rugs.
        seat: Where people sit on it (sofas, armchairs, chairs, stools).
        on_seat: People: the index (in :attr:`Room.items`) of the item it sits on, or None.
        figure: People: the sampled figure.
    """

    kind: str
    cls: RoomClass
    parts: list[Part]
    location: Vec3 = (0.0, 0.0, 0.0)
    yaw: float = 0.0
    solids: list[Box3] = field(default_factory=list)
    seat: Seat | None = None
    on_seat: int | None = None
    figure: Figure | None = None

    def to_local(self, xyz: FloatArray) -> FloatArray:
        """(N, 3) world points in this item's frame."""
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        d = np.asarray(xyz, dtype=np.float64) - np.asarray(self.location)
        out: FloatArray = np.column_stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]])
        return out

    def world_vertices(self) -> FloatArray:
        v = np.concatenate([p.mesh.vertices for p in self.parts]).astype(np.float64)
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        out: FloatArray = np.column_stack([c * v[:, 0] - s * v[:, 1], s * v[:, 0] + c * v[:, 1], v[:, 2]]) \
            + np.asarray(self.location)
        return out

    def distance(self, xyz: FloatArray) -> FloatArray:
        """(N,) distance of world points to the nearest of its solid boxes (0 inside; inf without any)."""
        if not self.solids:
            return np.full(len(xyz), np.inf)
        p = self.to_local(xyz)
        b = np.asarray(self.solids)
        d = np.maximum(np.maximum(b[None, :, :3] - p[:, None], p[:, None] - b[None, :, 3:]), 0.0)
        out: FloatArray = np.linalg.norm(d, axis=2).min(axis=1)
        return out


@dataclass
class Room:
    """A sampled room (see the module docstring).

    Attributes:
        kind: "lounge", "kitchen" or "dining".
        width, depth, height: Metres of the interior (x, y, z).
        items: The room itself (floor, walls, ceiling, windows, door), furniture, plants and people.
        lights: Ceiling light, lamps and daylight through the windows (no flash: see :func:`flash_light`).
        flash: The cameras of this room fire a flash.
        flash_energy: W of that flash.
        daylight: The light outside the windows.
    """

    kind: RoomKind
    width: float
    depth: float
    height: float
    items: list[Item]
    lights: list[Light]
    flash: bool
    flash_energy: float
    daylight: Daylight

    def people(self) -> list[Item]:
        return [it for it in self.items if it.cls == "person"]

    def inside(self, xyz: FloatArray, margin: float = 0.0) -> npt.NDArray[np.bool_]:
        """(N,) the points are inside the room, at least ``margin`` from every wall, the floor and the ceiling."""
        p = np.asarray(xyz, dtype=np.float64)
        out: npt.NDArray[np.bool_] = ((np.abs(p[:, 0]) <= self.width / 2 - margin)
                                      & (np.abs(p[:, 1]) <= self.depth / 2 - margin)
                                      & (p[:, 2] >= margin) & (p[:, 2] <= self.height - margin))
        return out


def _lathe_item(kit: _Kit, key: str, mat: Material, radii: Sequence[float], heights: Sequence[float],
                at: tuple[float, float, float], segments: int = 14, cap_top: bool = True) -> None:
    kit.add(key, mat, g.transform(g.lathe(radii, heights, segments, cap_top=cap_top), at))


def _clutter(rng: np.random.Generator, k: MaterialKnobs, kit: _Kit, x0: float, x1: float, y: float, z: float,
             depth: float, kitchen: bool) -> None:
    """A row of small things on a surface from x0 to x1 at height z (centred on y, within ``depth``): pots,
    bottles, bowls, boxes, books (kitchens: more pots, kettles and bowls)."""
    x = x0 + float(rng.uniform(0.0, 0.15))
    kinds = ["pot", "bottle", "bowl", "box", "books", "kettle"]
    w = np.array([3, 3, 3, 2, 1, 1] if kitchen else [1, 2, 1, 2, 4, 0], dtype=np.float64)
    i = 0
    while x < x1 - 0.1:
        kind = kinds[int(rng.choice(len(kinds), p=w / w.sum()))]
        col = _mat(rng, k, CLUTTER, (0.3, 0.7))
        r = min(float(rng.uniform(0.05, 0.13)), depth / 2 - 0.01)
        key = f"c{i}"
        if kind == "pot":
            h = float(rng.uniform(0.1, 0.25))
            met = _mat(rng, k, METAL, (0.25, 0.5))
            met.metallic = 1.0 if rng.random() < 0.6 else 0.0
            _lathe_item(kit, key, met, [r, r, r * 1.03, r * 1.03], [0.0, 0.02, h, h + 0.005], (x + r, y, z))
            x += 2 * r
        elif kind == "kettle":
            h = float(rng.uniform(0.15, 0.25))
            met = _mat(rng, k, METAL, (0.25, 0.5))
            _lathe_item(kit, key, met, [r * 0.8, r, r * 0.7, r * 0.2], [0.0, h * 0.4, h * 0.85, h], (x + r, y, z))
            x += 2 * r
        elif kind == "bottle":
            r = min(r, 0.045)
            h = float(rng.uniform(0.2, 0.33))
            glass = Material(jitter_color(rng, pick(rng, [srgb8(40, 90, 40), srgb8(90, 50, 20), srgb8(200, 200, 190),
                                                          srgb8(150, 30, 30)]), k), roughness=0.15)
            _lathe_item(kit, key, glass, [r, r, r * 0.4, r * 0.35], [0.0, h * 0.6, h * 0.8, h], (x + r, y, z), 10)
            x += 2 * r
        elif kind == "bowl":
            h = float(rng.uniform(0.05, 0.09))
            _lathe_item(kit, key, col, [r * 0.5, r * 0.9, r], [0.0, h * 0.6, h], (x + r, y, z), 14, cap_top=False)
            x += 2 * r
        elif kind == "box":
            sx, sy, sz = float(rng.uniform(0.1, 0.3)), min(float(rng.uniform(0.1, 0.3)), depth - 0.02), \
                float(rng.uniform(0.08, 0.3))
            if x + sx > x1:
                break
            kit.box(key, col, (sx, sy, sz), (x + sx / 2, y, z))
            x += sx
        else:  # a row of books standing
            for _ in range(int(rng.integers(3, 10))):
                t, bh = float(rng.uniform(0.02, 0.05)), float(rng.uniform(0.17, 0.28))
                if x + t > x1:
                    break
                kit.box(f"book{i}", _mat(rng, k, CLUTTER + WOOD, (0.5, 0.8)),
                        (t, min(float(rng.uniform(0.13, 0.2)), depth - 0.02), bh), (x + t / 2, y, z))
                x += t + 0.002
                i += 1
        x += float(rng.uniform(0.02, 0.25))
        i += 1


def sample_sofa(rng: np.random.Generator, k: MaterialKnobs, seats: int) -> tuple[_Kit, Seat]:
    """A sofa of ``seats`` places (1: an armchair): a base, seat cushions, a backrest with cushions and two arms,
    on short legs or a plinth. Origin at the middle of the seat's front edge, facing +y."""
    cover = _upholstery(rng, k)
    length = seats * float(rng.uniform(0.58, 0.7)) + (0.0 if seats > 1 else 0.05)
    depth = float(rng.uniform(0.5, 0.6))
    top = float(rng.uniform(0.4, 0.47))
    cushion = float(rng.uniform(0.1, 0.16))
    arm_w, arm_h = float(rng.uniform(0.12, 0.25)), float(rng.uniform(0.16, 0.26))
    back_t, back_h = float(rng.uniform(0.16, 0.26)), float(rng.uniform(0.35, 0.5))
    legs = float(rng.uniform(0.04, 0.12)) if rng.random() < 0.6 else 0.0
    kit = _Kit()
    total = length + 2 * arm_w
    base_h = top - cushion - legs
    kit.box("cover", cover, (total, depth + back_t, base_h), (0.0, -(depth + back_t) / 2, legs))
    for i in range(seats):  # seat cushions
        w = length / seats
        kit.box("cover", cover, (w - 0.01, depth - 0.01, cushion),
                (-length / 2 + (i + 0.5) * w, -depth / 2, top - cushion))
    kit.box("cover", cover, (total, back_t, back_h + cushion), (0.0, -depth - back_t / 2, top - cushion))
    for sx in (-1, 1):
        kit.box("cover", cover, (arm_w, depth + back_t, cushion + arm_h),
                (sx * (length / 2 + arm_w / 2), -(depth + back_t) / 2, top - cushion))
    if legs > 0:
        leg = _wood(rng, k) if rng.random() < 0.7 else _mat(rng, k, METAL, (0.3, 0.5))
        for sx in (-1, 1):
            for y in (-0.05, -depth - back_t + 0.05):
                kit.box("legs", leg, (0.05, 0.05, legs), (sx * (total / 2 - 0.05), y, 0.0))
    return kit, Seat(top, depth, length)


def sample_chair(rng: np.random.Generator, k: MaterialKnobs, stool: bool = False) -> tuple[_Kit, Seat]:
    """A wooden or metal chair with a backrest (``stool``: a low stool without one, 0.25-0.45 m). Origin at the
    middle of the seat's front edge, facing +y."""
    mat = _wood(rng, k) if rng.random() < 0.75 else _mat(rng, k, METAL + CLUTTER, (0.3, 0.6))
    kit = _Kit()
    if stool:
        top, w, d = float(rng.uniform(0.25, 0.45)), float(rng.uniform(0.3, 0.42)), float(rng.uniform(0.3, 0.4))
    else:
        top, w, d = float(rng.uniform(0.43, 0.48)), float(rng.uniform(0.42, 0.5)), float(rng.uniform(0.4, 0.46))
    t = float(rng.uniform(0.03, 0.05))
    kit.box("frame", mat, (w, d, t), (0.0, -d / 2, top - t))
    leg = float(rng.uniform(0.03, 0.045))
    for sx in (-1, 1):
        for y in (-leg / 2 - 0.01, -d + leg / 2 + 0.01):
            kit.box("frame", mat, (leg, leg, top - t), (sx * (w / 2 - leg / 2 - 0.01), y, 0.0))
    if not stool:
        back_h = float(rng.uniform(0.35, 0.5))
        for sx in (-1, 1):
            kit.box("frame", mat, (leg, leg, back_h), (sx * (w / 2 - leg / 2 - 0.01), -d - leg / 2, top))
        kit.box("frame", mat, (w, leg, float(rng.uniform(0.1, 0.2))), (0.0, -d - leg / 2, top + back_h - 0.2))
        kit.box("frame", mat, (w, leg, 0.06), (0.0, -d - leg / 2, top + back_h - 0.06))
    return kit, Seat(top, d, w)


def sample_table(rng: np.random.Generator, k: MaterialKnobs, kind: str, kitchen: bool = False) -> _Kit:
    """A table centred on its origin: "dining" (0.72-0.78 m), "coffee" (0.35-0.48 m, some with a glass top) or
    "low" (a round low table, 0.25-0.38 m, with bowls, a pot or a kettle on it)."""
    kit = _Kit()
    wood = _wood(rng, k)
    if kind == "low":
        r, top = float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.25, 0.38))
        kit.add("top", wood, g.transform(g.cylinder(r, 0.04, 20), (0.0, 0.0, top - 0.04)))
        kit.add("top", wood, g.transform(g.cylinder(r * 0.75, top - 0.04, 16), (0.0, 0.0, 0.0)))
        for i in range(int(rng.integers(2, 6))):
            a, rr = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, r - 0.14)
            bowl = _mat(rng, k, CLUTTER, (0.3, 0.6))
            _lathe_item(kit, f"bowl{i}", bowl, [0.04, 0.07, 0.08], [0.0, 0.04, 0.06],
                        (float(rr * np.cos(a)), float(rr * np.sin(a)), top), cap_top=False)
        return kit
    if kind == "dining":
        w, d, top = float(rng.uniform(1.0, 1.8)), float(rng.uniform(0.75, 1.0)), float(rng.uniform(0.72, 0.78))
    else:
        w, d, top = float(rng.uniform(0.8, 1.3)), float(rng.uniform(0.45, 0.7)), float(rng.uniform(0.35, 0.48))
    glass = kind == "coffee" and rng.random() < 0.4
    t = 0.012 if glass else float(rng.uniform(0.03, 0.05))
    top_mat = Material(jitter_color(rng, (0.18, 0.22, 0.2), k), roughness=0.04) if glass else wood
    frame = _mat(rng, k, METAL, (0.2, 0.4)) if glass else wood
    if glass:
        frame.metallic = 1.0
    kit.box("top", top_mat, (w, d, t), (0.0, 0.0, top - t))
    leg = float(rng.uniform(0.04, 0.07))
    for sx in (-1, 1):
        for sy in (-1, 1):
            kit.box("frame", frame, (leg, leg, top - t), (sx * (w / 2 - leg), sy * (d / 2 - leg), 0.0))
    if glass or rng.random() < 0.4:  # a lower shelf or a frame rail
        kit.box("frame", frame, (w - 2 * leg, d - 2 * leg, 0.02), (0.0, 0.0, 0.12 if glass else top * 0.3))
    if kind == "dining" or kitchen:
        _clutter(rng, k, kit, -w / 2 + 0.1, w / 2 - 0.1, float(rng.uniform(-0.1, 0.1)), top, d * 0.5, True)
    return kit


def sample_storage(rng: np.random.Generator, k: MaterialKnobs, kind: str, kitchen: bool) -> _Kit:
    """Against a wall (origin at the middle of its front bottom edge, the back towards -y): "shelf" (open shelves,
    1.2-2 m high), "cabinet" (0.8-1 m with a top), "counter" (a kitchen counter, 0.88-0.93 m, a worktop) or
    "tv" (a low cabinet with a TV on it); shelves and tops carry clutter."""
    kit = _Kit()
    body = _wood(rng, k) if rng.random() < 0.6 else _mat(rng, k, PLASTER + METAL, (0.3, 0.6))
    if kind == "shelf":
        w, d, h = float(rng.uniform(0.7, 1.6)), float(rng.uniform(0.28, 0.4)), float(rng.uniform(1.2, 2.0))
        t = 0.025
        for sx in (-1, 1):
            kit.box("body", body, (t, d, h), (sx * (w / 2 - t / 2), -d / 2, 0.0))
        kit.box("body", body, (w, 0.01, h), (0.0, -d + 0.005, 0.0))
        n = int(rng.integers(3, 6))
        for j in range(n + 1):
            z = j * (h - t) / n
            kit.box("body", body, (w - 2 * t, d, t), (0.0, -d / 2, z))
            if j < n:
                _clutter(rng, k, kit, -w / 2 + t, w / 2 - t, -d / 2, z + t, d - 0.02, kitchen)
        return kit
    if kind == "tv":
        w, d, h = float(rng.uniform(1.0, 1.8)), float(rng.uniform(0.35, 0.45)), float(rng.uniform(0.4, 0.6))
        kit.box("body", body, (w, d, h), (0.0, -d / 2, 0.0))
        tw = float(rng.uniform(0.8, min(1.45, w)))
        th = tw * 9 / 16
        black = Material(jitter_color(rng, (0.02, 0.02, 0.022), k), roughness=0.3)
        kit.box("tv", black, (0.25, 0.18, 0.06), (0.0, -d / 2, h))
        kit.box("tv", black, (0.05, 0.04, 0.12), (0.0, -d / 2, h + 0.06))
        kit.box("tv", black, (tw, 0.05, th), (0.0, -d / 2, h + 0.12))
        on = rng.random() < 0.35
        screen = (Material(jitter_color(rng, (0.25, 0.3, 0.45), k), shader="emission",
                           emission=float(rng.uniform(0.5, 2.0))) if on else
                  Material((0.01, 0.01, 0.012), roughness=0.08))
        kit.add("screen", screen, g.transform(g.box(tw - 0.04, 0.004, th - 0.04), (0.0, -d / 2 + 0.026, h + 0.14)),
                solid=False)
        return kit
    counter = kind == "counter"
    w = float(rng.uniform(1.2, 2.6) if counter else rng.uniform(0.7, 1.6))
    d = float(rng.uniform(0.55, 0.65) if counter else rng.uniform(0.35, 0.5))
    h = float(rng.uniform(0.88, 0.93) if counter else rng.uniform(0.75, 1.0))
    kit.box("body", body, (w, d - 0.02, h - 0.04), (0.0, -d / 2 - 0.01, 0.0))
    doors = _mat(rng, k, PLASTER + WOOD + CLUTTER, (0.3, 0.6))
    n = max(1, int(w // 0.5))
    for j in range(n):  # door fronts with a gap between them
        kit.box("doors", doors, (w / n - 0.01, 0.018, h - 0.14), (-w / 2 + (j + 0.5) * w / n, -0.012, 0.08),
                solid=False)
    worktop = (_mat(rng, k, TILE + CONCRETE, (0.2, 0.5), "noise", 20.0, 0.85) if counter else body)
    kit.box("top", worktop, (w + 0.02, d, 0.04), (0.0, -d / 2, h - 0.04))
    _clutter(rng, k, kit, -w / 2 + 0.05, w / 2 - 0.05, -d / 2, h, d - 0.1, kitchen)
    return kit


def sample_floor_lamp(rng: np.random.Generator, k: MaterialKnobs, lit: bool) -> tuple[_Kit, float]:
    """A floor lamp: a round base, a pole and a conical shade (glowing when ``lit``). Returns it and the height of
    the shade's centre, where its light goes."""
    kit = _Kit()
    metal = _mat(rng, k, METAL, (0.3, 0.5))
    h = float(rng.uniform(1.35, 1.7))
    sh = float(rng.uniform(0.25, 0.35))
    r0, r1 = float(rng.uniform(0.17, 0.25)), float(rng.uniform(0.1, 0.15))
    kit.add("metal", metal, g.cylinder(0.15, 0.03, 16))
    kit.add("metal", metal, g.cylinder(0.015, h - sh * 0.5, 8))
    shade_col = jitter_color(rng, pick(rng, [srgb8(240, 225, 190), srgb8(230, 210, 170), srgb8(200, 190, 180)]), k)
    shade = (Material(shade_col, shader="emission", emission=float(rng.uniform(2.0, 5.0))) if lit else
             Material(shade_col, roughness=0.8))
    kit.add("shade", shade, g.transform(g.lathe([r0, r1], [0.0, sh], 16, cap_bottom=False, cap_top=False),
                                        (0.0, 0.0, h - sh)))
    return kit, h - sh / 2


def sample_plant(rng: np.random.Generator, k: MaterialKnobs) -> _Kit:
    """A potted plant (class vegetation): a pot and a few leafy clusters above it, 0.5-1.5 m."""
    kit = _Kit()
    pr, ph = float(rng.uniform(0.12, 0.22)), float(rng.uniform(0.18, 0.4))
    pot = _mat(rng, k, [srgb8(170, 90, 55), srgb8(220, 215, 205), srgb8(60, 60, 60), srgb8(120, 110, 90)], (0.4, 0.8))
    kit.add("pot", pot, g.lathe([pr * 0.75, pr, pr * 1.05], [0.0, ph * 0.9, ph], 16))
    leaves = foliage_material(rng, k, autumn=False)
    top = float(rng.uniform(0.5, 1.5))
    reach = pr * float(rng.uniform(1.2, 2.0))
    for _ in range(int(rng.integers(3, 7))):
        r = float(rng.uniform(0.12, 0.25)) * min(1.0, reach / 0.3)
        z = float(rng.uniform(ph + r * 0.6, max(ph + r * 0.6, top - r)))
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, max(reach - r, 0.0))
        blob = g.blob(rng, r, 0.3, 6, 10)
        v = blob.vertices.astype(np.float64)
        v[:, 2] = v[:, 2] - v[:, 2].min()
        kit.add("leaves", leaves, g.transform(Mesh(v.astype(np.float32), blob.faces, True),
                                              (float(d * np.cos(a)), float(d * np.sin(a)), z - r)))
    return kit


# --- The shell ----------------------------------------------------------------------------------------------------

def _floor_material(rng: np.random.Generator, k: MaterialKnobs, kind: RoomKind) -> Material:
    w = {"lounge": [3, 2, 3, 1, 0], "kitchen": [2, 3, 0, 2, 2], "dining": [4, 3, 1, 1, 0]}[kind]
    choice = ["wood", "tiles", "carpet", "concrete", "earth"][int(rng.choice(5, p=np.array(w) / sum(w)))]
    if choice == "wood":
        return _mat(rng, k, WOOD, (0.3, 0.6), "wave", float(rng.uniform(2.0, 5.0)), float(rng.uniform(0.6, 0.85)))
    if choice == "tiles":
        return _mat(rng, k, TILE, (0.15, 0.4), "voronoi", float(rng.uniform(2.0, 4.0)), 0.85)
    if choice == "carpet":
        return _mat(rng, k, CARPET, (0.85, 1.0), "noise", 60.0, 0.8, bump=0.3)
    if choice == "concrete":
        return _mat(rng, k, CONCRETE, (0.6, 0.9), "noise", 6.0, 0.8, bump=0.3)
    return _mat(rng, k, EARTH, (0.85, 1.0), "noise", 4.0, 0.7, bump=0.6)


def _wall_material(rng: np.random.Generator, k: MaterialKnobs, kind: RoomKind) -> Material:
    u = rng.random()
    rustic = kind == "kitchen" and rng.random() < 0.5
    if rustic or u < 0.12:  # wood planks (the courses of a wave texture run along z)
        return _mat(rng, k, WOOD, (0.6, 0.9), "wave", float(rng.uniform(6.0, 12.0)), float(rng.uniform(0.5, 0.75)))
    if u < 0.25:
        color = jitter_color(rng, pick(rng, BRICK), k)
        return Material(color, roughness=0.85, texture="brick", color2=srgb8(190, 185, 175),
                        texture_scale=float(rng.uniform(3.5, 5.0)), texture_w=float(rng.uniform(0, 100)), bump=0.4)
    if u < 0.45:
        a, b = WALLPAPER[int(rng.integers(len(WALLPAPER)))]
        return Material(jitter_color(rng, a, k), roughness=0.8, texture="wave", color2=jitter_color(rng, b, k),
                        texture_scale=float(rng.uniform(8.0, 20.0)), texture_w=float(rng.uniform(0, 100)))
    return _mat(rng, k, PLASTER, (0.7, 0.95), bump=0.15)


@dataclass
class _Opening:
    wall: int
    u: float  # along the wall (its tangent), from the wall's middle
    width: float
    z0: float
    z1: float


def _wall_frame(wall: int, w: float, d: float) -> tuple[FloatArray, FloatArray, float, float]:
    """(inward normal, tangent, distance of the wall's inner face from the centre, the wall's length)."""
    normals = [np.array([0.0, -1.0]), np.array([-1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0])]
    n = normals[wall]
    tangent = np.array([-n[1], n[0]])
    half = d / 2 if wall in (0, 2) else w / 2
    return n, tangent, half, (w if wall in (0, 2) else d)


def _wall_yaw(wall: int) -> float:
    """Yaw that turns an item's +y to the wall's inward normal."""
    return (np.pi, np.pi / 2, 0.0, -np.pi / 2)[wall]


# --- Layout -----------------------------------------------------------------------------------------------------

@dataclass
class _Piece:
    """One item of a unit, in the unit's frame."""

    kind: str
    cls: RoomClass
    kit: _Kit | None
    x: float = 0.0
    y: float = 0.0
    yaw: float = 0.0
    seat: Seat | None = None
    on: int | None = None  # index of the piece of the unit it sits on
    figure: Figure | None = None
    parts: list[Part] | None = None

    def part_list(self) -> list[Part]:
        return self.parts if self.parts is not None else (self.kit.parts() if self.kit else [])

    def solids(self) -> list[Box3]:
        if self.kit is not None:
            return self.kit.solids
        v = np.concatenate([p.mesh.vertices for p in self.part_list()]).astype(np.float64)
        lo, hi = v.min(axis=0), v.max(axis=0)
        return [(float(lo[0]), float(lo[1]), float(lo[2]), float(hi[0]), float(hi[1]), float(hi[2]))]

    def outline(self) -> FloatArray:
        """(4, 2) corners of its footprint rectangle in the unit's frame."""
        b = np.asarray(self.solids())
        x0, y0, x1, y1 = b[:, 0].min(), b[:, 1].min(), b[:, 3].max(), b[:, 4].max()
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        out: FloatArray = pts @ np.array([[c, s], [-s, c]]) + np.array([self.x, self.y])
        return out


def _person_piece(rng: np.random.Generator, k: MaterialKnobs, pose: str, x: float = 0.0, y: float = 0.0,
                  yaw: float = 0.0) -> _Piece:
    acc = "none" if rng.random() < 0.85 else "backpack"
    fig = sample_figure(rng, k, pose, acc)  # type: ignore[arg-type]
    return _Piece("person", "person", None, x, y, yaw, figure=fig, parts=fig.part_list())


def _seated(rng: np.random.Generator, k: MaterialKnobs, kit: _Kit, seat: Seat, kind: str, n: int,
            arms: float = 0.0) -> list[_Piece]:
    """A seat item and up to ``n`` people on it (as ``scenes.street.bench_with_sitters``): each figure's seat front
    on the seat's, its body clear of the backrest (no more of it below the seat's top than ``SEAT_TOLERANCE``) and,
    with ``arms`` (the arms' top above the floor), between the arms."""
    pieces = [_Piece(kind, "building", kit, seat=seat)]
    slots = max(1, min(n, int(seat.length // SEAT_GAP) if seat.length >= SEAT_GAP else 1))
    xs = (np.arange(slots) - (slots - 1) / 2) * seat.length / slots if n > 0 else np.zeros(0)
    back = [b for b in kit.solids if b[4] <= -seat.depth + 1e-6 and b[5] > seat.height + 0.05]
    for x in xs[:n]:
        for _ in range(4):
            fig = sample_figure(rng, k, "sit", "none", seat_height=seat.height)
            y = -float(fig.seat_front or 0.0)
            body = np.concatenate([q.mesh.vertices for q in fig.part_list()]).astype(np.float64)
            above = body[body[:, 2] > seat.height - SEAT_TOLERANCE]
            back_y = max([b[4] for b in back], default=-seat.depth)
            y += max(0.0, back_y + 0.01 - float(above[:, 1].min() + y))  # forward, clear of the backrest
            xx = float(x)
            if arms > 0:  # between the arms below their top
                low = body[(body[:, 2] < arms + 0.02) & (body[:, 1] + y < 0.0)]
                if len(low):
                    lo, hi = -seat.length / 2 + 0.005 - low[:, 0].min(), seat.length / 2 - 0.005 - low[:, 0].max()
                    if lo > hi:
                        continue
                    xx = float(np.clip(xx, lo, hi))
            piece = _Piece("person", "person", None, xx, y, 0.0, on=0, figure=fig, parts=fig.part_list())
            if any(_overlap(piece.outline(), q.outline()) for q in pieces[1:]):
                continue
            pieces.append(piece)
            break
    return pieces


class _Layout:
    def __init__(self, width: float, depth: float, height: float) -> None:
        self.w, self.d, self.h = width, depth, height
        self.items: list[Item] = []
        self.occupied = FootprintSet.of([])

    def fits(self, outline: FloatArray, xy: FloatArray, yaw: float, margin: float = 0.02) -> bool:
        fp = Footprint.of_points(outline, yaw)
        pts = fp.points + xy
        if (np.abs(pts[:, 0]) > self.w / 2 - margin).any() or (np.abs(pts[:, 1]) > self.d / 2 - margin).any():
            return False
        return bool(self.occupied.clear(xy[None], fp)[0])

    def add_unit(self, pieces: list[_Piece], xy: FloatArray, yaw: float) -> list[int]:
        """Put the unit's pieces into the room (unit origin at ``xy``, turned by ``yaw``)."""
        c, s = np.cos(yaw), np.sin(yaw)
        idx: list[int] = []
        for p in pieces:
            at = xy + np.array([c * p.x - s * p.y, s * p.x + c * p.y])
            on = idx[p.on] if p.on is not None else None
            self.items.append(Item(p.kind, p.cls, p.part_list(), vec3((at[0], at[1], 0.0)), float(yaw + p.yaw),
                                   p.solids(), p.seat, on, p.figure))
            idx.append(len(self.items) - 1)
        outline = np.concatenate([p.outline() for p in pieces])
        self.occupied = self.occupied.add((float(xy[0]), float(xy[1])), Footprint.of_points(outline, yaw))
        return idx

    def block(self, outline: FloatArray) -> None:
        """Keep a world region (a door's swing, a window's sill) free."""
        centre = outline.mean(axis=0)
        self.occupied = self.occupied.add((float(centre[0]), float(centre[1])), Footprint(outline - centre))

    def against_wall(self, rng: np.random.Generator, pieces: list[_Piece], walls: Sequence[int] = (0, 1, 2, 3),
                     tries: int = 12, gap: tuple[float, float] = (0.01, 0.08)) -> list[int] | None:
        outline = np.concatenate([p.outline() for p in pieces])
        rear, half = -float(outline[:, 1].min()), float(np.abs(outline[:, 0]).max())
        for _ in range(tries):
            wall = int(walls[int(rng.integers(len(walls)))])
            n, t, dist, length = _wall_frame(wall, self.w, self.d)
            if length / 2 - half - 0.02 <= 0:
                continue
            u = float(rng.uniform(-(length / 2 - half - 0.02), length / 2 - half - 0.02))
            xy = -n * dist + n * (rear + uniform(rng, gap)) + t * u
            yaw = _wall_yaw(wall)
            if self.fits(outline, xy, yaw):
                return self.add_unit(pieces, xy, yaw)
        return None

    def near(self, rng: np.random.Generator, pieces: list[_Piece], target: FloatArray, dist: tuple[float, float],
             face: bool = True, tries: int = 16, yaw_random: bool = True) -> list[int] | None:
        """Somewhere ``dist`` from ``target``, facing it (``face``), turned at random (``yaw_random``) or not
        turned."""
        outline = np.concatenate([p.outline() for p in pieces])
        for _ in range(tries):
            a = rng.uniform(0, 2 * np.pi)
            xy = target + uniform(rng, dist) * np.array([np.cos(a), np.sin(a)])
            to = target - xy
            yaw = (float(np.arctan2(-to[0], to[1])) + rng.normal(0, 0.15) if face else
                   float(rng.uniform(0, 2 * np.pi)) if yaw_random else 0.0)
            if self.fits(outline, xy, yaw):
                return self.add_unit(pieces, xy, yaw)
        return None

    def anywhere(self, rng: np.random.Generator, pieces: list[_Piece], tries: int = 16,
                 yaw: float | None = None) -> list[int] | None:
        outline = np.concatenate([p.outline() for p in pieces])
        for _ in range(tries):
            xy = rng.uniform(-1, 1, 2) * np.array([self.w / 2 - 0.3, self.d / 2 - 0.3])
            y_ = float(rng.uniform(0, 2 * np.pi)) if yaw is None else yaw
            if self.fits(outline, xy, y_):
                return self.add_unit(pieces, xy, y_)
        return None


def _shell(rng: np.random.Generator, k: MaterialKnobs, lay: _Layout, kind: RoomKind, daylight: Daylight,
           lights: list[Light]) -> None:
    """Floor, walls, ceiling, windows (with their daylight) and a door."""
    w, d, h = lay.w, lay.d, lay.h
    floor = _Kit()
    floor.box("floor", _floor_material(rng, k, kind), (w + 2 * WALL_T, d + 2 * WALL_T, 0.05), (0.0, 0.0, -0.05))
    lay.items.append(Item("floor", "building", floor.parts(), solids=floor.solids))
    wall_mat = _wall_material(rng, k, kind)
    for wall in range(4):
        n, _, dist, length = _wall_frame(wall, w, d)
        kit = _Kit()
        kit.box("wall", wall_mat, (length + 2 * WALL_T, WALL_T, h), (0.0, -WALL_T / 2, 0.0))
        if rng.random() < 0.5:  # a skirting board
            kit.box("skirting", _mat(rng, k, WOOD + PLASTER, (0.4, 0.7)), (length, 0.015, 0.08), (0.0, 0.0075, 0.0))
        at = -n * dist
        lay.items.append(Item("wall", "building", kit.parts(), vec3((at[0], at[1], 0.0)), _wall_yaw(wall),
                              kit.solids))
    ceiling = _Kit()
    ceiling.box("ceiling", _mat(rng, k, PLASTER[:4] + WOOD, (0.7, 0.95)), (w + 2 * WALL_T, d + 2 * WALL_T, 0.08),
                (0.0, 0.0, h))
    lay.items.append(Item("ceiling", "building", ceiling.parts(), solids=ceiling.solids))

    # Openings: windows (1 or 2) and a door, on different spots of the walls.
    openings: list[_Opening] = []

    def free_spot(wall: int, width: float) -> float | None:
        _, _, _, length = _wall_frame(wall, w, d)
        for _ in range(10):
            lim = length / 2 - width / 2 - 0.2
            if lim <= 0:
                return None
            u = float(rng.uniform(-lim, lim))
            if all(o.wall != wall or abs(o.u - u) > (o.width + width) / 2 + 0.3 for o in openings):
                return u
        return None

    # (colour, the pane's glow, W per square metre of window of the light in front of it)
    sky = {"day": (srgb8(235, 240, 250), (3.0, 6.0), (25.0, 100.0)),
           "overcast": (srgb8(215, 220, 225), (2.0, 4.0), (18.0, 70.0)),
           "dusk": (srgb8(60, 75, 130), (0.4, 1.2), (5.0, 20.0))}[daylight]
    frame_mat = _mat(rng, k, [srgb8(235, 235, 230), *WOOD, srgb8(60, 60, 62)], (0.4, 0.7))
    for _ in range(int(rng.integers(1, 3))):
        wall = int(rng.integers(4))
        ww, wh = float(rng.uniform(0.7, 1.6)), float(rng.uniform(0.9, 1.4))
        sill = float(rng.uniform(0.75, 1.05))
        wh = min(wh, h - sill - 0.25)
        u = free_spot(wall, ww)
        if u is None:
            continue
        openings.append(_Opening(wall, u, ww, sill, sill + wh))
        kit = _Kit()
        pane = Material(jitter_color(rng, sky[0], k), shader="emission", emission=uniform(rng, sky[1]))
        kit.box("pane", pane, (ww, 0.01, wh), (0.0, 0.005, sill), solid=False)
        ft = float(rng.uniform(0.04, 0.07))
        for sx in (-1, 1):
            kit.box("frame", frame_mat, (ft, 0.05, wh), (sx * (ww / 2 + ft / 2), 0.025, sill))
        kit.box("frame", frame_mat, (ww + 2 * ft, 0.05, ft), (0.0, 0.025, sill + wh))
        kit.box("frame", frame_mat, (ww + 2 * ft, 0.1, ft), (0.0, 0.05, sill - ft))  # the sill
        if rng.random() < 0.6:  # glazing bars
            kit.box("frame", frame_mat, (0.025, 0.03, wh), (0.0, 0.015, sill))
            kit.box("frame", frame_mat, (ww, 0.03, 0.025), (0.0, 0.015, sill + wh * float(rng.uniform(0.4, 0.7))))
        n, t, dist, _ = _wall_frame(wall, w, d)
        at = -n * dist + t * u
        yaw = _wall_yaw(wall)
        lay.items.append(Item("window", "building", kit.parts(), vec3((at[0], at[1], 0.0)), yaw, kit.solids))
        lay.block(np.array([at + t * (ww / 2 + ft), at - t * (ww / 2 + ft), at - t * (ww / 2 + ft) + n * 0.12,
                            at + t * (ww / 2 + ft) + n * 0.12]))
        # Daylight: an area light just inside the pane, facing into the room (its local -Z along the normal).
        lp = at + n * 0.08
        rot = (float(np.pi / 2), 0.0, float(np.arctan2(n[1], n[0]) - np.pi / 2))
        lights.append(Light("AREA", vec3((lp[0], lp[1], sill + wh / 2)), rot, uniform(rng, sky[2]) * ww * wh,
                            jitter_color(rng, sky[0], k), size=float(min(ww, wh))))
    # The door: a panel and its frame on a wall, its swing kept free.
    wall = int(rng.integers(4))
    dw, dh = float(rng.uniform(0.8, 0.95)), float(rng.uniform(1.95, min(2.15, h - 0.15)))
    u_door = free_spot(wall, dw)
    if u_door is not None:
        kit = _Kit()
        kit.box("door", _mat(rng, k, WOOD + PLASTER, (0.4, 0.7)), (dw, 0.04, dh), (0.0, 0.02, 0.0))
        trim = _mat(rng, k, [srgb8(235, 235, 230), *WOOD], (0.4, 0.7))
        for sx in (-1, 1):
            kit.box("trim", trim, (0.06, 0.06, dh + 0.06), (sx * (dw / 2 + 0.03), 0.03, 0.0))
        kit.box("trim", trim, (dw + 0.12, 0.06, 0.06), (0.0, 0.03, dh))
        kit.box("handle", _mat(rng, k, METAL, (0.2, 0.4)), (0.12, 0.06, 0.03), (0.35 * dw, 0.07, 1.0))
        n, t, dist, _ = _wall_frame(wall, w, d)
        at = -n * dist + t * u_door
        lay.items.append(Item("door", "building", kit.parts(), vec3((at[0], at[1], 0.0)), _wall_yaw(wall),
                              kit.solids))
        half = dw / 2 + 0.1
        lay.block(np.array([at + t * half, at - t * half, at - t * half + n * 0.9, at + t * half + n * 0.9]))


def _add_people(rng: np.random.Generator, k: MaterialKnobs, lay: _Layout, n: int, near: FloatArray | None,
                squat_share: float) -> int:
    """Up to ``n`` people standing or squatting, in groups of 1-3 facing each other where they fit (mostly near
    ``near``, else anywhere; a group with no room is placed one by one). Returns how many were placed."""
    placed = 0
    while n > 0:
        size = min(n, int(rng.integers(1, 4)))
        n -= size
        pieces = []
        r = 0.0 if size == 1 else float(rng.uniform(0.38, 0.5)) * (1.0 if size == 2 else 1.2)
        a0 = float(rng.uniform(0, 2 * np.pi))
        for j in range(size):
            pose = "squat" if rng.random() < squat_share else "stand"
            a = a0 + 2 * np.pi * j / size
            x, y = r * np.cos(a), r * np.sin(a)
            yaw = float(np.arctan2(x, -y)) + rng.normal(0, 0.4) if size > 1 else float(rng.uniform(0, 2 * np.pi))
            pieces.append(_person_piece(rng, k, pose, x, y, yaw))
        apart = all(not _overlap(p.outline(), q.outline()) for i, p in enumerate(pieces) for q in pieces[i + 1:])
        got = None
        if apart:
            if near is not None and rng.random() < 0.75:
                got = lay.near(rng, pieces, near, (0.7, 1.5), face=False, yaw_random=False)
            got = got or lay.anywhere(rng, pieces, yaw=float(rng.uniform(0, 2 * np.pi)))
        if got is not None:
            placed += size
            continue
        for p in pieces:  # one by one
            p.x = p.y = 0.0
            if lay.anywhere(rng, [p], yaw=0.0) is not None:
                placed += 1
    return placed


def _overlap(a: FloatArray, b: FloatArray) -> bool:
    """Two convex quadrilaterals overlap (separating-axis test; touching is not overlapping)."""
    for poly in (a, b):
        e = np.roll(poly, -1, axis=0) - poly
        normals = np.column_stack([e[:, 1], -e[:, 0]])
        pa, pb = a @ normals.T, b @ normals.T
        if np.any((pa.max(axis=0) <= pb.min(axis=0) + 1e-9) | (pb.max(axis=0) <= pa.min(axis=0) + 1e-9)):
            return False
    return True


def sample_room(rng: np.random.Generator, k: MaterialKnobs, daylight: Daylight = "day",
                people: tuple[int, int] = PEOPLE, kind: RoomKind | None = None) -> Room:
    """One room with furniture and people (see the module docstring).

    Args:
        rng: Source of every random choice (the same state gives the same room).
        k: Material knobs (colour jitter, textures).
        daylight: What the windows show and let in: "day", "overcast" or "dusk" (lamps on).
        people: Range of people in the room (inclusive); as many as find room are placed.
        kind: "lounge" (a sofa, armchairs, a coffee table, a TV), "kitchen" (counters, a low table with people
            squatting or on stools around it, pots on the floor) or "dining" (a table with chairs); None draws one.

    Returns:
        The room; its items hold the floor, walls, ceiling, windows and door first, then furniture and people.
    """
    kind_ = kind or ROOM_KINDS[int(rng.choice(len(ROOM_KINDS), p=ROOM_KIND_P))]
    lay = _Layout(float(rng.uniform(3.5, 6.0)), float(rng.uniform(3.5, 6.5)), float(rng.uniform(2.4, 3.0)))
    lights: list[Light] = []
    _shell(rng, k, lay, kind_, daylight, lights)
    n_people = int(rng.integers(people[0], people[1] + 1))
    seated = 0
    focus: FloatArray | None = None

    def sitters(cap: int) -> int:
        return int(min(cap, max(0, n_people - seated), rng.integers(0, cap + 1) + (1 if rng.random() < 0.6 else 0)))

    if kind_ == "lounge":
        seats = int(rng.integers(2, 4))
        kit, seat = sample_sofa(rng, k, seats)
        arms = max(b[5] for b in kit.solids if b[0] >= seat.length / 2 - 1e-6)
        pieces = _seated(rng, k, kit, seat, "sofa", sitters(seats), arms)
        idx = lay.against_wall(rng, pieces)
        if idx is not None:
            seated += len(idx) - 1
            sofa = lay.items[idx[0]]
            fwd = np.array([-np.sin(sofa.yaw), np.cos(sofa.yaw)])
            front = np.asarray(sofa.location[:2]) + fwd * float(rng.uniform(0.75, 1.1))
            table = sample_table(rng, k, "coffee")
            if rng.random() < 0.6:  # a rug under the table
                rug = _Kit()
                rug.add("rug", _mat(rng, k, CARPET + VELVET, (0.8, 1.0), "wave", float(rng.uniform(3.0, 10.0)), 0.6),
                        g.plane(float(rng.uniform(1.4, 2.4)), float(rng.uniform(1.0, 1.8)), 0.002), solid=False)
                lay.items.append(Item("rug", "building", rug.parts(), vec3((front[0], front[1], 0.0)), sofa.yaw))
            for dist in (0.0, 0.2, 0.4):
                xy = front + fwd * dist
                if lay.fits(_Piece("t", "building", table).outline(), xy, sofa.yaw):
                    lay.add_unit([_Piece("coffee_table", "building", table)], xy, sofa.yaw)
                    focus = xy
                    break
            focus = np.asarray(sofa.location[:2]) if focus is None else focus
        for _ in range(int(rng.integers(0, 3))):  # armchairs facing the table or the sofa
            kit, seat = sample_sofa(rng, k, 1)
            arms = max(b[5] for b in kit.solids if b[0] >= seat.length / 2 - 1e-6)
            pieces = _seated(rng, k, kit, seat, "armchair", sitters(1), arms)
            got = lay.near(rng, pieces, focus, (1.0, 1.8)) if focus is not None else lay.anywhere(rng, pieces)
            seated += len(got) - 1 if got else 0
        if rng.random() < 0.6:
            lay.against_wall(rng, [_Piece("tv", "building", sample_storage(rng, k, "tv", False))])
    elif kind_ == "kitchen":
        for _ in range(int(rng.integers(1, 3))):
            lay.against_wall(rng, [_Piece("counter", "building", sample_storage(rng, k, "counter", True))])
        table = sample_table(rng, k, "low" if rng.random() < 0.7 else "dining", kitchen=True)
        got = lay.anywhere(rng, [_Piece("table", "building", table)], tries=24)
        if got is not None:
            focus = np.asarray(lay.items[got[0]].location[:2])
            low = max(b[5] for b in table.solids) < 0.6
            for _ in range(int(rng.integers(0, 3))):  # low stools or chairs with someone on them
                kit, seat = sample_chair(rng, k, stool=low)
                pieces = _seated(rng, k, kit, seat, "stool" if low else "chair", sitters(1))
                got2 = lay.near(rng, pieces, focus, (0.75, 1.2))
                seated += len(got2) - 1 if got2 else 0
            for _ in range(int(rng.integers(0, 4))):  # pots, a kettle and bowls on the floor
                kit = _Kit()
                _clutter(rng, k, kit, 0.0, float(rng.uniform(0.2, 0.5)), 0.0, 0.0, 0.3, True)
                if kit.groups:
                    lay.near(rng, [_Piece("floor_clutter", "building", kit)], focus, (0.5, 1.3), face=False)
    else:  # dining
        table = sample_table(rng, k, "dining")
        got = lay.anywhere(rng, [_Piece("table", "building", table)], tries=24)
        if got is not None:
            focus = np.asarray(lay.items[got[0]].location[:2])
            for _ in range(int(rng.integers(2, 6))):
                kit, seat = sample_chair(rng, k)
                pieces = _seated(rng, k, kit, seat, "chair", sitters(1))
                got2 = lay.near(rng, pieces, focus, (0.65, 1.3))
                seated += len(got2) - 1 if got2 else 0
    # Storage along the walls, lamps, plants.
    for _ in range(int(rng.integers(1, 4))):
        what = str(rng.choice(["shelf", "cabinet"] + (["counter"] if kind_ == "kitchen" else [])))
        lay.against_wall(rng, [_Piece(what, "building", sample_storage(rng, k, what, kind_ == "kitchen"))])
    lamp_on = daylight == "dusk" or rng.random() < 0.5
    for _ in range(int(rng.integers(0, 3))):
        kit, z = sample_floor_lamp(rng, k, lamp_on)
        idx2 = lay.against_wall(rng, [_Piece("floor_lamp", "building", kit)], gap=(0.05, 0.3))
        if idx2 is not None and lamp_on:
            loc = lay.items[idx2[0]].location
            lights.append(Light("POINT", vec3((loc[0], loc[1], z)), energy=float(rng.uniform(15.0, 45.0)),
                                color=kelvin_to_rgb(float(rng.uniform(2400, 3200))), size=0.2))
    for _ in range(int(rng.integers(0, 4))):
        lay.against_wall(rng, [_Piece("plant", "vegetation", sample_plant(rng, k))], gap=(0.02, 0.2))
    # The rest of the people stand or squat, near the others.
    rest = n_people - seated
    if rest > 0:
        _add_people(rng, k, lay, rest, focus, 0.6 if kind_ == "kitchen" else 0.1)
    # The ceiling light: a flush glowing fixture and an area light under it (most rooms; always at dusk and where
    # no lamp is on, so that the windows are never the only light).
    lamps = any(li.type == "POINT" for li in lights)
    if rng.random() < 0.8 or daylight == "dusk" or not lamps:
        kit = _Kit()
        r = float(rng.uniform(0.15, 0.3))
        glow = Material(kelvin_to_rgb(float(rng.uniform(2700, 4500))), shader="emission",
                        emission=float(rng.uniform(4.0, 10.0)))
        kit.add("glow", glow, g.transform(g.cylinder(r, 0.06, 20), (0.0, 0.0, lay.h - 0.06)))
        xy = rng.uniform(-0.25, 0.25, 2) * np.array([lay.w, lay.d])
        lay.items.append(Item("ceiling_light", "building", kit.parts(), vec3((xy[0], xy[1], 0.0)), 0.0, kit.solids))
        lights.append(Light("AREA", vec3((xy[0], xy[1], lay.h - 0.07)), energy=float(rng.uniform(30.0, 120.0)),
                            color=glow.color, size=2 * r))
    flash = bool(rng.random() < 0.45)
    return Room(kind_, lay.w, lay.d, lay.h, lay.items, lights, flash, float(rng.uniform(8.0, 35.0)) if flash else 0.0,
                daylight)


# --- Cameras ------------------------------------------------------------------------------------------------------

def _blocked(room: Room, eye: FloatArray, target: FloatArray, skip: int) -> bool:
    """The straight line from ``eye`` to ``target`` passes through a solid box of an item other than ``skip``
    (floor, walls and ceiling cannot be in the way of a camera inside the room)."""
    ts = np.linspace(0.05, 0.95, 19)[:, None]
    pts = eye[None] + ts * (target - eye)[None]
    for i, it in enumerate(room.items):
        if i == skip or it.kind in ("floor", "wall", "ceiling", "rug") or not it.solids:
            continue
        if (it.distance(pts) <= 0.0).any():
            return True
    return False


def clearance(room: Room, xyz: FloatArray) -> FloatArray:
    """(N,) distance from world points to the nearest solid box of any item (walls, floor and ceiling too)."""
    d = np.full(len(xyz), np.inf)
    for it in room.items:
        d = np.minimum(d, it.distance(xyz))
    return d


def room_camera(rng: np.random.Generator, room: Room, tries: int = 60, fov_deg: tuple[float, float] = ROOM_FOV_DEG,
                min_visible: int = 1) -> Camera | None:
    """A camera inside ``room`` at standing (1.4-1.7 m) or seated (1.0-1.3 m) eye height, aimed with a slight
    downward pitch at a person or a group 1-4 m away, at least ``CAMERA_CLEARANCE`` from every solid box and wall.
    Of the first ``GOOD_TRIES`` tries that see ``min_visible`` people unblocked, the one where people fill most
    of the frame wins; None if no try found a free spot."""
    people = [i for i, it in enumerate(room.items) if it.cls == "person"]
    if not people:
        return None
    heads = []
    sizes = []
    for i in people:
        v = room.items[i].world_vertices()
        heads.append(np.array([*v[:, :2].mean(axis=0), v[:, 2].min() + 0.6 * (v[:, 2].max() - v[:, 2].min())]))
        sizes.append(float(v[:, 2].max() - v[:, 2].min()))
    centres, hts = np.array(heads), np.array(sizes)
    best = BestTry(min_visible, GOOD_TRIES)
    for _ in range(tries):
        j = int(rng.integers(len(people)))
        near = np.linalg.norm(centres[:, :2] - centres[j, :2], axis=1) < 1.6  # its group
        aim = centres[near].mean(axis=0) + np.array([*rng.normal(0, 0.15, 2), rng.normal(-0.05, 0.1)])
        it = room.items[people[j]]
        facing = it.yaw + np.pi / 2 + rng.normal(0, 0.7)  # mostly in front of the person
        dist = uniform(rng, TARGET_DISTANCE)
        eye_h = uniform(rng, STANDING_EYE if rng.random() < 0.65 else SEATED_EYE)
        eye = np.array([aim[0] + dist * np.cos(facing), aim[1] + dist * np.sin(facing), eye_h])
        if not room.inside(eye[None], CAMERA_CLEARANCE)[0] or clearance(room, eye[None])[0] < CAMERA_CLEARANCE:
            continue
        to = aim - eye
        pitch = np.arctan2(to[2], np.linalg.norm(to[:2]))
        to[2] = np.tan(np.clip(pitch, np.radians(-28.0), np.radians(-2.0))) * np.linalg.norm(to[:2])
        cam = Camera(vec3(eye), look_at(eye, eye + to), fov=float(np.radians(uniform(rng, fov_deg))),
                     clip_start=0.1, clip_end=60.0, kind="interior")
        vis = visible_mask(cam, centres, margin=0.05)
        for m in np.flatnonzero(vis):
            if _blocked(room, eye, centres[m], people[m]):
                vis[m] = False
        if best.offer(cam, int(vis.sum()), float((vis * frame_share(cam, centres, hts, SHARE_CAP)).sum())):
            break
    return best.result()


def flash_light(camera: Camera, energy: float, view: int) -> Light:
    """A camera flash: a small point light just above and behind the lens, lit in that camera's view only.

    Args:
        camera: The view's camera.
        energy: W of the flash.
        view: The camera's index in the scene's views.
    """
    rot = np.asarray(camera.rotation)
    loc = np.asarray(camera.location) + rot @ np.array([0.0, 0.06, 0.08])  # camera looks down its local -Z
    return Light("POINT", vec3(loc), energy=energy, color=kelvin_to_rgb(5600.0), size=0.05, view=view)
