"""Procedural articulated people for the ``street`` family (plain NumPy, no Blender).

A person is a small skeleton posed by joint angles (shoulder, elbow, hip, knee, foot; a forward-kinematics chain
per limb) and skinned with tapered lofts: head with hair or a hat, neck, chest and pelvis, upper arms, forearms,
hands, thighs, shins and shoes. Clothing is a set of separate parts (top, bottom, optional coat or skirt,
shoes) whose colours follow a street-like distribution (mostly black, navy, grey, denim, brown/beige and white,
a few bright ones), some with a fabric or stripe texture; skin tones cover the full human range. Heights run
from 1.0 m (children, with larger heads and shorter legs) to 1.95 m, with slim to broad builds.

Poses: ``stand`` (arms down, a hand in a pocket, looking at a phone, a slight weight shift) and ``walk`` (a gait
phase: opposite arm and leg swing, knee bend of the swinging leg, heel strike and toe-off of the feet); only when
asked for, ``sit`` (on a seat of a given height: thighs near level, knees bent about 90 degrees, shins down to flat
feet; hands on the thighs, one on the seat, or holding a phone) and ``squat`` (deep knee bend, heels up or flat,
leaning forward; forearms over the knees, reaching forward and down, or a phone).
Accessories: an umbrella held up in one hand, a handbag or shopping bag hanging from one hand, a backpack.

Coordinates as every street asset: origin between the feet, soles on ``z = 0``, facing ``+y`` (a seated figure's
seat is behind its feet: see :class:`Figure`). The figure's
right side is ``+x``. 1.3 to 1.95 k triangles per person (mean about 1.6 k).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from scenes import geometry as g
from scenes.randomization import MaterialKnobs, jitter_color, srgb8, uniform
from scenes.spec import FloatArray, Material, Mesh, Part, TextureKind, Vec3, vec3

Pose = Literal["stand", "walk", "sit", "squat"]
Accessory = Literal["none", "umbrella", "bag", "backpack"]
POSES: tuple[Pose, ...] = ("stand", "walk")  # what ``pose=None`` draws from (unchanged by the seated poses)
SEATED_POSES: tuple[Pose, ...] = ("sit", "squat")  # only when asked for
SEAT_HEIGHT_RANGE = (0.4, 0.48)  # metres: a bench's seat top, what ``sit`` draws when no height is given
SEAT_TOLERANCE = 0.01  # metres a seated body may sink into its seat (the cushioning of clothes and flesh)
ACCESSORIES: tuple[Accessory, ...] = ("none", "umbrella", "bag", "backpack")
ACCESSORY_P = (0.58, 0.1, 0.17, 0.15)
HEIGHT_RANGE = (1.0, 1.95)
MIN_GROUP_DISTANCE = 0.55  # metres between the origins of two people of a group
MAX_FOOTPRINT = 0.58  # a person's footprint radius without an umbrella (strides are shortened to stay inside)
MAX_UMBRELLA_FOOTPRINT = 0.68
LIMB_SEGMENTS = 8


# (colour, weight). Street clothing is mostly dark and neutral; bright colours are a minority.
TOPS = [(srgb8(20, 20, 22), 18), (srgb8(50, 50, 55), 10), (srgb8(110, 110, 112), 8), (srgb8(175, 175, 172), 5),
        (srgb8(228, 228, 222), 10), (srgb8(25, 32, 60), 10), (srgb8(60, 85, 120), 4), (srgb8(85, 60, 40), 5),
        (srgb8(190, 170, 135), 6), (srgb8(85, 90, 55), 4), (srgb8(100, 25, 35), 4), (srgb8(190, 30, 35), 3),
        (srgb8(220, 180, 40), 2), (srgb8(100, 150, 210), 3), (srgb8(40, 120, 60), 2), (srgb8(220, 130, 160), 2),
        (srgb8(230, 110, 30), 2), (srgb8(90, 50, 120), 2)]
BOTTOMS = [(srgb8(20, 20, 22), 25), (srgb8(50, 50, 55), 12), (srgb8(55, 75, 110), 20), (srgb8(35, 45, 70), 12),
           (srgb8(110, 110, 112), 8), (srgb8(180, 160, 120), 8), (srgb8(25, 32, 60), 6), (srgb8(85, 60, 40), 5),
           (srgb8(228, 228, 222), 1), (srgb8(85, 90, 55), 3)]
COATS = [(srgb8(20, 20, 22), 30), (srgb8(50, 50, 55), 15), (srgb8(25, 32, 60), 12), (srgb8(170, 130, 85), 12),
         (srgb8(85, 60, 40), 8), (srgb8(110, 110, 112), 8), (srgb8(85, 90, 55), 5), (srgb8(100, 25, 35), 3),
         (srgb8(190, 30, 35), 2), (srgb8(230, 190, 40), 2), (srgb8(100, 150, 210), 3)]
SHOES = [(srgb8(18, 18, 18), 35), (srgb8(232, 232, 228), 25), (srgb8(80, 50, 30), 12), (srgb8(110, 110, 112), 10),
         (srgb8(25, 32, 60), 5), (srgb8(150, 100, 60), 5), (srgb8(190, 30, 35), 3)]
HAIR = [(srgb8(22, 18, 16), 35), (srgb8(50, 35, 25), 25), (srgb8(95, 65, 40), 15), (srgb8(185, 150, 100), 10),
        (srgb8(120, 55, 30), 5), (srgb8(140, 138, 135), 7), (srgb8(205, 205, 200), 3)]
HATS = [(srgb8(20, 20, 22), 40), (srgb8(25, 32, 60), 15), (srgb8(110, 110, 112), 15), (srgb8(190, 30, 35), 8),
        (srgb8(228, 228, 222), 10), (srgb8(170, 130, 85), 12)]
UMBRELLAS = [(srgb8(15, 15, 18), 45), (srgb8(25, 32, 60), 12), (srgb8(190, 30, 35), 10), (srgb8(230, 190, 40), 5),
             (srgb8(100, 150, 210), 8), (srgb8(110, 110, 112), 8), (srgb8(40, 120, 60), 5), (srgb8(220, 130, 160), 7)]
BAGS = [(srgb8(18, 18, 18), 35), (srgb8(80, 50, 30), 20), (srgb8(150, 100, 60), 12), (srgb8(190, 160, 120), 15),
        (srgb8(228, 228, 222), 10), (srgb8(190, 30, 35), 8)]
# Skin: a ramp over the full range of human skin tones, light to very dark (sRGB), sampled along its length.
SKIN_RAMP = np.array([srgb8(246, 212, 186), srgb8(232, 184, 152), srgb8(205, 150, 115), srgb8(170, 118, 82),
                      srgb8(130, 88, 58), srgb8(92, 60, 40), srgb8(58, 38, 27)])


def _pick(rng: np.random.Generator, palette: Sequence[tuple[Vec3, float]]) -> Vec3:
    w = np.array([p[1] for p in palette], dtype=np.float64)
    return palette[int(rng.choice(len(palette), p=w / w.sum()))][0]


def _fabric(rng: np.random.Generator, k: MaterialKnobs, palette: Sequence[tuple[Vec3, float]],
            roughness: tuple[float, float] = (0.65, 0.95), pattern_p: float = 0.5) -> Material:
    """A cloth material: a palette colour jittered by the knobs; with probability ``pattern_p * texture_prob`` a
    pattern (fine mottled noise, or wavy stripes with a second palette colour)."""
    color = jitter_color(rng, _pick(rng, palette), k)
    tex: Literal["none"] | TextureKind = "none"
    color2: Vec3 | None = None
    scale = 5.0
    if rng.random() < pattern_p * k.texture_prob:
        if rng.random() < 0.6:
            tex, scale = "noise", float(rng.uniform(8.0, 30.0))
            color2 = vec3(np.asarray(color) * rng.uniform(0.45, 0.8))
        else:
            tex, scale = "wave", float(rng.uniform(2.0, 7.0))
            color2 = jitter_color(rng, _pick(rng, palette), k)
    return Material(color=color, roughness=uniform(rng, roughness), texture=tex, color2=color2,
                    texture_scale=scale, texture_w=float(rng.uniform(0, 100)))


def _skin(rng: np.random.Generator) -> Material:
    t = rng.uniform(0, len(SKIN_RAMP) - 1)
    i = min(int(t), len(SKIN_RAMP) - 2)
    c = SKIN_RAMP[i] * (1 - (t - i)) + SKIN_RAMP[i + 1] * (t - i)
    c = c * rng.uniform(0.9, 1.1, 3) ** 0.3  # a little hue/brightness variation
    return Material(color=vec3(np.clip(c, 0, 1)), roughness=float(rng.uniform(0.45, 0.65)))


# --------------------------------------------------------------------------------------------------- geometry
def _loft(rings: Sequence[tuple[float, float, float, float]], segments: int, bottom_apex: float | None = None,
          top_apex: float | None = None) -> Mesh:
    """Closed tube of elliptic rings along z, triangles, outward normals.

    Args:
        rings: (z, rx, ry, y_centre) per ring, bottom to top.
        segments: Vertices per ring.
        bottom_apex, top_apex: z of the cap centres (rounded ends); ``None`` closes the end flat.
    """
    r = np.asarray(rings, dtype=np.float64)
    th = np.linspace(0, 2 * np.pi, segments, endpoint=False)
    c, s = np.cos(th), np.sin(th)
    v = np.stack([r[:, None, 1] * c, r[:, None, 3] + r[:, None, 2] * s, np.repeat(r[:, None, 0], segments, 1)],
                 axis=-1).reshape(-1, 3)
    n = len(r)
    j = np.arange(segments)
    k = (j + 1) % segments
    faces = []
    for i in range(n - 1):
        a, b = i * segments, (i + 1) * segments
        faces.append(np.stack([a + j, a + k, b + k], 1))
        faces.append(np.stack([a + j, b + k, b + j], 1))
    bot = len(v)
    top = bot + 1
    apex = np.array([[0.0, r[0, 3], r[0, 0] if bottom_apex is None else bottom_apex],
                     [0.0, r[-1, 3], r[-1, 0] if top_apex is None else top_apex]])
    faces.append(np.stack([np.full(segments, bot), k, j], 1))
    t0 = (n - 1) * segments
    faces.append(np.stack([np.full(segments, top), t0 + j, t0 + k], 1))
    return Mesh(np.concatenate([v, apex]).astype(np.float32), np.concatenate(faces).astype(np.int32), smooth=True)


def _capsule(length: float, r_top: float, r_bottom: float, segments: int = LIMB_SEGMENTS, bulge: float = 0.0,
             flat: float = 1.0) -> Mesh:
    """A tapered limb hanging from its joint at the origin down to ``z = -length``, rounded at both ends.

    ``bulge`` widens the upper third (muscle, or a loose sleeve); ``flat`` scales the depth (y) of the section.
    """
    t = np.array([0.2, 0.65, 1.0])
    rad = (r_top + (r_bottom - r_top) * t) * (1 + bulge * np.sin(np.pi * np.clip(t / 0.7, 0, 1)))
    rad[-1] *= 0.85
    rings = [(-ti * length, ri, ri * flat, 0.0) for ti, ri in zip(t, rad, strict=True)]
    rings.insert(0, (r_top * 0.45, r_top * 0.8, r_top * 0.8 * flat, 0.0))  # above the joint: covers it
    return _loft(rings[::-1], segments, bottom_apex=-length - r_bottom * 0.8, top_apex=r_top * 0.95)


def _beam(p0: FloatArray, p1: FloatArray, width: float, thickness: float) -> Mesh:
    """A thin box from ``p0`` to ``p1`` (a strap), ``width`` across x, ``thickness`` in the remaining direction."""
    axis = p1 - p0
    length = float(np.linalg.norm(axis))
    z = axis / length
    x = np.array([1.0, 0.0, 0.0]) - z[0] * z
    x /= np.linalg.norm(x)
    rot = np.column_stack([x, np.cross(z, x), z])
    return g.transform(g.box(width, thickness, length), p0, rotation=rot)


def _about(mesh: Mesh, pivot: FloatArray, rotation: FloatArray, pivot_z: float) -> Mesh:
    """Rotate a mesh built upright about the point (0, 0, ``pivot_z``) and move that point to ``pivot``."""
    v = (mesh.vertices.astype(np.float64) - (0.0, 0.0, pivot_z)) @ rotation.T + pivot
    return Mesh(v.astype(np.float32), mesh.faces, mesh.smooth)


def _place(mesh: Mesh, location: FloatArray, rotation: FloatArray) -> Mesh:
    return g.transform(mesh, location, rotation=rotation)


@dataclass
class Body:
    """Sampled body dimensions (metres): heights of the joints above the soles and half-widths."""

    height: float
    child: bool
    female: bool
    build: float
    head_h: float
    chin_z: float
    shoulder_z: float
    hip_z: float
    ankle_z: float
    upper_arm: float
    forearm: float
    hand: float
    thigh: float
    shin: float
    foot: float
    shoulder_x: float  # shoulder joint
    hip_x: float  # hip joint
    hip_rx: float
    hip_ry: float
    waist_rx: float
    waist_ry: float
    chest_rx: float
    chest_ry: float
    arm_r: float
    leg_r: float
    neck_r: float


def _sample_body(rng: np.random.Generator) -> Body:
    child = bool(rng.random() < 0.15)
    female = bool(rng.random() < 0.5)
    if child:
        h = float(rng.uniform(HEIGHT_RANGE[0], 1.45))
        build = float(rng.uniform(0.85, 1.1))
    else:
        h = float(np.clip(rng.normal(1.64 if female else 1.77, 0.07), 1.45, HEIGHT_RANGE[1]))
        build = float(np.clip(rng.normal(1.02, 0.11), 0.85, 1.3))
    head_f = float(np.interp(h, [1.0, 1.45, 1.75], [0.185, 0.15, 0.13]))
    hip_f = float(np.interp(h, [1.0, 1.45, 1.75], [0.455, 0.49, 0.515]))
    s = h / 1.75
    sb = np.sqrt(build)
    chin = h * (1 - head_f)
    shoulder = chin - 0.055 * h
    hip = hip_f * h
    ankle = 0.045 * h
    wrist = hip - 0.015 * h
    arm = shoulder - wrist
    leg = hip - ankle
    sex = 0.0 if child else (1.0 if female else -1.0)  # +: female proportions
    return Body(
        height=h, child=child, female=female, build=build, head_h=head_f * h, chin_z=chin, shoulder_z=shoulder,
        hip_z=hip, ankle_z=ankle, upper_arm=0.54 * arm, forearm=0.46 * arm, hand=0.1 * h, thigh=0.5 * leg,
        shin=0.5 * leg, foot=0.15 * h + 0.01,
        shoulder_x=(0.178 - 0.012 * sex) * s * build ** 0.75, hip_x=(0.085 + 0.005 * sex) * s * build,
        hip_rx=(0.16 + 0.015 * sex) * s * build ** 0.9, hip_ry=(0.1 + 0.008 * sex) * s * build,
        waist_rx=(0.135 - 0.01 * sex) * s * build, waist_ry=0.09 * s * build ** 1.3,
        chest_rx=(0.16 - 0.01 * sex) * s * build, chest_ry=(0.1 + 0.01 * max(sex, 0)) * s * build,
        arm_r=(0.043 - 0.004 * sex) * s * sb, leg_r=(0.078 + 0.004 * sex) * s * sb, neck_r=(0.058 - 0.005 * sex) * s)


@dataclass
class Angles:
    """Joint angles in radians. Per side (index 0: right, +x; 1: left): shoulder flexion (forward +), abduction
    (outward +), internal twist, elbow flexion; hip flexion, abduction, knee flexion; foot pitch (toe up +) and
    toe-out yaw. Torso lean (forward +), sideways sway, pelvis shift along x, head pitch (down +)."""

    sh_flex: list[float] = field(default_factory=lambda: [0.0, 0.0])
    sh_abd: list[float] = field(default_factory=lambda: [0.1, 0.1])
    sh_twist: list[float] = field(default_factory=lambda: [0.0, 0.0])
    elbow: list[float] = field(default_factory=lambda: [0.1, 0.1])
    hip_flex: list[float] = field(default_factory=lambda: [0.0, 0.0])
    hip_abd: list[float] = field(default_factory=lambda: [0.03, 0.03])
    knee: list[float] = field(default_factory=lambda: [0.0, 0.0])
    foot_pitch: list[float] | None = None  # None: follow the shin (walk) / flat (stand)
    toe_out: list[float] = field(default_factory=lambda: [0.1, 0.1])
    lean: float = 0.0
    sway: float = 0.0
    shift: float = 0.0
    head_pitch: float = 0.0
    hand_hidden: list[bool] = field(default_factory=lambda: [False, False])  # in a pocket
    phone: bool = False
    hip_height: float | None = None  # the pelvis joint's height above the soles; None: the body's standing one


SIDES = (1.0, -1.0)


def _arm_to(body: Body, side: float, target: FloatArray) -> tuple[float, float, float]:
    """(abduction, flexion, elbow flexion) that bring a wrist to ``target`` (torso-local, as the arm chain of
    :func:`_assemble`; no twist), or as near as the arm reaches."""
    drop = 0.45 * body.arm_r
    v = np.asarray(target, np.float64) - (side * (body.shoulder_x - 0.15 * body.arm_r), -0.005,
                                          body.shoulder_z - drop)
    u, f = body.upper_arm - drop, body.forearm
    abd = float(np.arctan2(side * v[0], -v[2]))
    across = float(np.hypot(v[0], v[2]))
    dist = float(np.clip(np.linalg.norm(v), abs(u - f) + 1e-3, u + f - 1e-3))
    elbow = float(np.arccos(np.clip((dist**2 - u**2 - f**2) / (2 * u * f), -1.0, 1.0)))
    flex = float(np.arctan2(v[1], across) - np.arctan2(f * np.sin(elbow), u + f * np.cos(elbow)))
    return abd, flex, elbow


def _thigh_point(body: Body, a: Angles, i: int, t: float, hip_height: float) -> FloatArray:
    """A point a fraction ``t`` along leg ``i``'s thigh (pelvis upright at ``hip_height``, before grounding)."""
    r_th = g.rot_y(-SIDES[i] * a.hip_abd[i]) @ g.rot_x(a.hip_flex[i])
    out: FloatArray = np.array([SIDES[i] * body.hip_x, 0.0, hip_height]) + r_th @ (0.0, 0.0, -t * body.thigh)
    return out


def _to_torso(body: Body, a: Angles, p: FloatArray, hip_height: float) -> FloatArray:
    """A point of the figure (before grounding) in torso-local coordinates (upright, pelvis at ``body.hip_z``)."""
    out: FloatArray = g.rot_x(-a.lean).T @ (p - (0.0, 0.0, hip_height)) + (0.0, 0.0, body.hip_z)
    return out


def _seated_angles(rng: np.random.Generator, a: Angles, pose: Pose, body: Body, seat: float) -> None:
    """Legs, torso and arms of ``sit`` (on a seat ``seat`` m high: hip joints ``a.hip_height`` above the soles,
    thighs near level, shins down to flat feet) and ``squat`` (deep knee bend, heels up or flat, leaning forward)."""
    b = body
    hz = float(a.hip_height if a.hip_height is not None else b.hip_z)
    if pose == "sit":
        a.lean = float(rng.uniform(-0.05, 0.25))
        a.head_pitch = float(rng.uniform(0.0, 0.2))
        flex = float(rng.uniform(1.45, 1.62))
        for i in range(2):
            a.hip_abd[i] = float(rng.uniform(0.04, 0.2))
            hf = flex + float(rng.uniform(-0.05, 0.05))
            cos_abd = float(np.cos(a.hip_abd[i]))
            reach = b.ankle_z + 0.995 * b.shin * cos_abd  # the highest knee whose foot still reaches the ground
            if hz - b.thigh * float(np.cos(hf)) * cos_abd > reach:  # a high seat: the thigh slopes down to it
                hf = float(np.arccos(np.clip((hz - reach) / (b.thigh * cos_abd), -1.0, 1.0)))
            knee_z = hz - b.thigh * float(np.cos(hf)) * cos_abd
            # The shin tilts forward from the knee just enough for the flat foot to reach the ground.
            psi = float(np.arccos(np.clip((knee_z - b.ankle_z) / (b.shin * cos_abd), 0.0, 1.0)))
            a.hip_flex[i], a.knee[i] = hf, hf - psi
            a.toe_out[i] = float(rng.uniform(0.05, 0.3))
        a.foot_pitch = [0.0, 0.0]
    else:  # squat
        a.lean = float(rng.uniform(0.35, 0.65))
        heels_up = rng.random() < 0.5
        flex = float(rng.uniform(1.95, 2.2))
        psi = float(rng.uniform(0.45, 0.7)) + (0.0 if heels_up else 0.1)  # knees ahead of the ankles
        pitch = -float(rng.uniform(0.3, 0.55)) if heels_up else 0.0
        for i in range(2):
            a.hip_abd[i] = float(rng.uniform(0.18, 0.38))
            a.hip_flex[i] = flex + float(rng.uniform(-0.04, 0.04))
            a.knee[i] = a.hip_flex[i] + psi
            a.toe_out[i] = float(rng.uniform(0.15, 0.4))
        a.foot_pitch = [pitch, pitch]
        a.head_pitch = -a.lean * float(rng.uniform(0.4, 0.9))
    style = int(rng.choice(3, p=[0.5, 0.25, 0.25]))  # hands on the thighs / knees, one on the seat / reaching
    if style == 2:  # looking at a phone held in both hands (as standing, relative to the torso)
        a.phone = True
        a.head_pitch = float(rng.uniform(0.35, 0.55)) - 0.5 * a.lean
        for i in range(2):
            a.sh_flex[i], a.sh_abd[i] = float(rng.uniform(0.15, 0.3)), float(rng.uniform(0.1, 0.18))
            a.sh_twist[i], a.elbow[i] = float(rng.uniform(0.35, 0.5)), float(rng.uniform(1.25, 1.5))
        return
    other = int(rng.integers(2))
    for i, side in enumerate(SIDES):
        if pose == "sit" and style == 1 and i == other:  # a hand on the seat beside the hip
            target = np.array([side * (b.hip_x + 1.3 * b.leg_r + 0.07), float(rng.uniform(-0.06, 0.06)),
                               seat + 0.9 * b.hand + 0.03])
        elif pose == "sit":  # resting on the thigh, towards the knee
            target = _thigh_point(b, a, i, float(rng.uniform(0.55, 0.75)), hz)
            target += (side * 0.5 * b.leg_r, 0.0, 1.2 * b.leg_r + 0.02)
        elif style == 1:  # squat, reaching forward and down in front of the feet
            target = _thigh_point(b, a, i, 1.0, hz) + np.array([side * 0.05, rng.uniform(0.15, 0.3), -b.shin * 0.6])
        else:  # squat, forearms over the knees, hands hanging in front of them
            target = _thigh_point(b, a, i, 1.0, hz) + np.array([side * 0.02, rng.uniform(0.2, 0.3),
                                                                 rng.uniform(-0.02, 0.06)])
        abd, flex, elbow = _arm_to(b, side, _to_torso(b, a, target, hz))
        a.sh_abd[i], a.sh_flex[i], a.elbow[i], a.sh_twist[i] = max(abd, 0.03), flex, elbow, 0.0


def _sample_angles(rng: np.random.Generator, pose: Pose, accessory: Accessory, holder: int, body: Body,
                   stride: float = 1.0, hip_height: float | None = None, seat: float = 0.0) -> Angles:
    a = Angles()
    # Arms must clear the hips: the smallest abduction that keeps the wrist outside the pelvis.
    arm_len = body.upper_arm + body.forearm
    min_abd = float(np.arcsin(np.clip((body.hip_rx + body.arm_r * 0.8 - body.shoulder_x) / arm_len, -0.5, 0.5)))
    for i in range(2):
        a.sh_abd[i] = max(float(rng.uniform(0.05, 0.14)), min_abd + 0.03)
        a.toe_out[i] = float(rng.uniform(0.0, 0.25))
    if pose == "walk":
        # Mid-stance looks like standing: walkers are drawn mid-stride (|sin(phase)| >= 0.45).
        phase = float(rng.uniform(np.arcsin(0.45), np.pi - np.arcsin(0.45))) + np.pi * int(rng.integers(2))
        amp_leg = float(rng.uniform(0.3, 0.42)) * stride
        amp_arm = float(rng.uniform(0.25, 0.45)) * stride
        for i in range(2):
            ph = phase + np.pi * i
            a.hip_flex[i] = amp_leg * float(np.sin(ph))
            a.knee[i] = 0.08 + 0.8 * max(0.0, float(np.cos(ph + 0.5))) ** 2
            a.hip_abd[i] = 0.02
            a.sh_flex[i] = -amp_arm * float(np.sin(ph))  # opposite to the leg of the same side
            a.elbow[i] = 0.2 + 0.35 * max(0.0, a.sh_flex[i]) / max(amp_arm, 1e-6) + float(rng.uniform(0, 0.1))
            a.toe_out[i] *= 0.5
        a.lean = float(rng.uniform(0.03, 0.08))
        a.head_pitch = float(rng.uniform(-0.05, 0.1))
    elif pose in SEATED_POSES:
        a.hip_height = hip_height
        _seated_angles(rng, a, pose, body, seat)
    else:
        style = rng.choice(3, p=[0.55, 0.25, 0.2])  # arms down, hand(s) in pockets, looking at a phone
        if style == 2 and accessory in ("umbrella", "bag"):
            style = 0
        shift_side = 0 if rng.random() < 0.5 else 1
        a.shift = SIDES[shift_side] * float(rng.uniform(0.0, 0.03))
        relaxed = 1 - shift_side  # the leg that carries less weight bends a little
        a.knee[relaxed] = float(rng.uniform(0.0, 0.18))
        a.hip_flex[relaxed] = a.knee[relaxed] * 0.5
        for i in range(2):
            a.hip_abd[i] = float(rng.uniform(0.02, 0.07))
            a.sh_flex[i] = float(rng.uniform(-0.05, 0.1))
            a.elbow[i] = float(rng.uniform(0.05, 0.25))
        a.sway = -a.shift * 0.8
        a.head_pitch = float(rng.uniform(-0.05, 0.12))
        if style == 1:
            for i in ([0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]):
                a.sh_flex[i], a.sh_abd[i] = float(rng.uniform(-0.15, -0.02)), float(rng.uniform(0.22, 0.32))
                a.sh_twist[i], a.elbow[i] = float(rng.uniform(0.35, 0.55)), float(rng.uniform(0.55, 0.85))
                a.hand_hidden[i] = True
        elif style == 2:
            a.phone = True
            a.head_pitch = float(rng.uniform(0.35, 0.55))
            for i in range(2):
                a.sh_flex[i], a.sh_abd[i] = float(rng.uniform(0.15, 0.3)), float(rng.uniform(0.1, 0.18))
                a.sh_twist[i], a.elbow[i] = float(rng.uniform(0.35, 0.5)), float(rng.uniform(1.25, 1.5))
    if accessory == "umbrella":
        a.sh_flex[holder], a.sh_abd[holder] = float(rng.uniform(0.2, 0.4)), float(rng.uniform(0.08, 0.16))
        a.sh_twist[holder], a.elbow[holder] = float(rng.uniform(0.2, 0.35)), float(rng.uniform(1.65, 1.95))
        a.hand_hidden[holder] = False
    elif accessory == "bag":
        a.sh_flex[holder] *= 0.3
        a.sh_abd[holder] = max(float(rng.uniform(0.1, 0.16)), min_abd + 0.05)
        a.sh_twist[holder], a.elbow[holder], a.hand_hidden[holder] = 0.0, 0.08, False
    return a


@dataclass
class Figure:
    """A sampled person: its parts by role, joint positions (object-local, soles on z = 0) and what was drawn.

    ``parts`` keys: skin, hair (or a hat), bottom, shoes, top (not under a coat), and where drawn coat, skirt,
    legwear (tights), accessory, accessory_trim (umbrella shaft, backpack straps), phone.
    """

    parts: dict[str, Part]
    joints: dict[str, FloatArray]
    body: Body
    pose: Pose
    accessory: Accessory
    # ``sit``: the seat it sits on, in figure coordinates: the top at ``seat_height`` (its body rests there), the
    # front edge at ``y = seat_front`` (the seat lies at smaller y, under the pelvis and thighs; the knees and
    # the lower legs are in front of it); None for the other poses.
    seat_height: float | None = None
    seat_front: float | None = None

    def part_list(self) -> list[Part]:
        return list(self.parts.values())


def _shoe(body: Body, width: float) -> Mesh:
    """A shoe with its ankle joint at the origin, toes towards +y, sole tangent to ``z = -ankle_z``."""
    length, hs = body.foot, body.ankle_z / 0.85
    heel = 0.25 * length
    prof = [(0.0, 0.36, 0.36), (0.07, 0.46, 0.5), (0.3, 0.5, 0.56), (0.6, 0.5, 0.4), (0.85, 0.45, 0.3),
            (0.97, 0.3, 0.22)]
    # Rings along the foot (local z of the loft = along the foot), section in x/z: local y maps to -z below.
    rings = [(t * length - heel, rx * width, rz * hs, -(rz * hs - body.ankle_z)) for t, rx, rz in prof]
    m = _loft(rings, LIMB_SEGMENTS, bottom_apex=-heel - 0.02 * length, top_apex=length - heel + 0.01 * length)
    return g.transform(m, rotation=g.rot_x(-np.pi / 2))


def _head_shape(v: FloatArray) -> FloatArray:
    """Unit sphere points -> a head shape (narrower jaw, chin forward), before scaling by the semi-axes."""
    v = v.copy()
    low = np.clip(-v[:, 2], 0, 1)
    v[:, 0] *= 1 - 0.22 * low
    v[:, 1] = v[:, 1] * (1 - 0.12 * low) + 0.06 * low * (v[:, 1] > 0)
    return v


def _head(body: Body) -> tuple[Mesh, float, float, float]:
    """Head (with a nose) centred at the origin; returns the mesh and its semi-axes (x, y, z)."""
    c = body.head_h / 2
    a, b = c * 0.68, c * 0.84
    m = g.uv_sphere(1.0, 7, 12)
    v = _head_shape(m.vertices.astype(np.float64)) * (a, b, c)
    nose = g.transform(g.box(0.16 * a, 0.22 * b, 0.32 * c, center_z=True), (0, b * 0.95, -0.12 * c),
                       rotation=g.rot_x(-0.35))
    return g.merge([Mesh(v.astype(np.float32), m.faces, True), nose]), a, b, c


def sample_figure(rng: np.random.Generator, k: MaterialKnobs, pose: Pose | None = None,
                  accessory: Accessory | None = None, seat_height: float | None = None) -> Figure:
    """Sample one person with its parts by role and its joints (see :func:`sample_person`)."""
    pose_ = pose or POSES[int(rng.random() < 0.55)]
    acc = accessory or ACCESSORIES[int(rng.choice(len(ACCESSORIES), p=ACCESSORY_P))]
    if pose_ in SEATED_POSES and (acc in ("umbrella", "bag") or (pose_ == "sit" and acc == "backpack")):
        acc = "none"  # put down (a backpack would be in a bench's backrest)
    body = _sample_body(rng)
    if pose_ == "sit":
        seat = uniform(rng, SEAT_HEIGHT_RANGE) if seat_height is None else float(seat_height)
        for _ in range(50):  # feet flat on the ground: legs long enough for the seat (most children's are not)
            if seat + 0.06 * body.height - 0.36 * body.thigh - body.ankle_z <= 0.98 * body.shin:
                break
            body = _sample_body(rng)
    holder = int(rng.integers(2))
    seed = int(rng.integers(2**31))
    if pose_ == "sit":  # the hip height that puts the body on the seat (the legs follow it to the ground)
        hz = seat + 0.055 * body.height
        for _ in range(4):
            fig = _assemble(np.random.default_rng(seed), k, body, pose_, acc, holder, 1.0, hz, seat)
            err = seat - float(fig.seat_height or 0.0)
            if abs(err) < 1e-3:
                break
            hz += err
        return fig
    stride = 1.0
    for _ in range(6):  # shorten the stride until the feet stay inside the footprint
        fig = _assemble(np.random.default_rng(seed), k, body, pose_, acc, holder, stride)
        limit = MAX_UMBRELLA_FOOTPRINT if acc == "umbrella" else MAX_FOOTPRINT
        if pose_ == "squat" or _footprint(fig.part_list()) <= limit + 1e-6:
            break
        stride *= 0.85
    return fig


def _footprint(parts: list[Part]) -> float:
    return float(max(np.linalg.norm(p.mesh.vertices[:, :2], axis=1).max() for p in parts))


def _assemble(rng: np.random.Generator, k: MaterialKnobs, body: Body, pose: Pose, acc: Accessory, holder: int,
              stride: float, hip_height: float | None = None, seat: float = 0.0) -> Figure:
    b = body
    ang = _sample_angles(rng, pose, acc, holder, b, stride, hip_height, seat)
    seated = pose in SEATED_POSES
    # ------------------------------------------------------------------ outfit
    skin = _skin(rng)
    female = b.female and not b.child
    top_kind = rng.choice(["long", "short", "coat"], p=[0.5, 0.25, 0.25] if not b.child else [0.55, 0.35, 0.1])
    bottom_kind = rng.choice(["trousers", "shorts", "skirt"],
                             p=[0.55, 0.1, 0.35] if female else [0.85, 0.15, 0.0] if not b.child else [0.7, 0.2, 0.1])
    top = _fabric(rng, k, TOPS)
    bottom = _fabric(rng, k, BOTTOMS, pattern_p=0.3)
    coat = _fabric(rng, k, COATS, pattern_p=0.2) if top_kind == "coat" else None
    shoes = _fabric(rng, k, SHOES, roughness=(0.3, 0.8), pattern_p=0.0)
    legwear = skin if bottom_kind != "trousers" and rng.random() < 0.6 else _fabric(rng, k, BOTTOMS[:2], pattern_p=0)
    hair_style = rng.choice(["short", "long", "hat", "bald"],
                            p=[0.3, 0.55, 0.12, 0.03] if female else [0.68, 0.08, 0.16, 0.08])
    hair = (_fabric(rng, k, HATS, pattern_p=0.2) if hair_style == "hat" else
            Material(jitter_color(rng, _pick(rng, HAIR), k), roughness=float(rng.uniform(0.4, 0.65))))
    if b.child and hair_style == "bald":
        hair_style = "short"

    # ------------------------------------------------------------------ skeleton (forward kinematics)
    pelvis = np.array([ang.shift, 0.0, b.hip_z if ang.hip_height is None else ang.hip_height])
    r_pelvis = g.rot_y(ang.sway * 0.5)
    r_torso = g.rot_y(ang.sway) @ g.rot_x(-ang.lean)
    sk: dict[str, list[Mesh]] = {"skin": [], "top": [], "bottom": [], "shoes": [], "hair": [], "coat": [],
                                 "skirt": [], "legwear": []}
    joints: dict[str, FloatArray] = {"pelvis": pelvis}

    def torso_pt(p: Sequence[float]) -> FloatArray:
        return np.asarray(pelvis + r_torso @ (np.asarray(p, dtype=np.float64) - (0, 0, b.hip_z)), np.float64)

    def on_torso(m: Mesh) -> Mesh:  # torso-local (upright, pelvis at hip height) -> posed
        return _about(m, pelvis, r_torso, b.hip_z)

    def on_pelvis(m: Mesh) -> Mesh:
        return _about(m, pelvis, r_pelvis, b.hip_z)

    # Torso: pelvis (bottom garment) and chest (top garment).
    waist_z, chest_z = b.hip_z + 0.33 * (b.shoulder_z - b.hip_z), b.hip_z + 0.68 * (b.shoulder_z - b.hip_z)
    h = b.height
    crotch = b.hip_z - 0.045 * h
    pel = _loft([(crotch, b.hip_rx * 0.55, b.hip_ry * 0.7, 0.0), (crotch + 0.03 * h, b.hip_rx * 0.92,
                  b.hip_ry * 0.95, -0.005), (b.hip_z, b.hip_rx, b.hip_ry, -0.008),
                 (waist_z, b.waist_rx * 0.94, b.waist_ry * 0.9, 0.0)], 12,
                bottom_apex=crotch - 0.01 * h)
    sk["bottom"].append(on_pelvis(pel))
    contact = [sk["bottom"][-1]]  # what rests on a seat (sit)
    bust = 0.015 * h if female else 0.0
    neck_base = b.shoulder_z + 0.035 * h
    if bottom_kind == "skirt":  # the top tucked into the skirt, whose waistband covers its hem
        top_hem = (waist_z - 0.01 * h, b.waist_rx * 0.97, b.waist_ry * 0.97, 0.0)
    else:  # hanging over the trousers' waist, down to the hips
        top_hem = (b.hip_z - float(rng.uniform(-0.01, 0.03)) * h, b.hip_rx * 1.1, b.hip_ry * 1.17, -0.008)
    chest_rings = [top_hem,
                   (waist_z, b.waist_rx * 1.04, b.waist_ry * 1.04, 0.0),
                   (chest_z - 0.05 * h, b.chest_rx * 0.98, b.chest_ry * 0.98 + bust * 0.5, 0.004 + bust * 0.5),
                   (chest_z, b.chest_rx, b.chest_ry + bust, 0.006 + bust),
                   (b.shoulder_z - 0.018 * h, b.shoulder_x + 0.25 * b.arm_r, b.chest_ry * 0.92, 0.0),
                   (b.shoulder_z + 0.012 * h, b.shoulder_x * 0.88, b.chest_ry * 0.72, -0.008),
                   (neck_base - 0.005 * h, b.neck_r * 1.7, b.neck_r * 1.35, -0.01)]
    chest = _loft(chest_rings, 12, top_apex=neck_base)
    if top_kind != "coat":  # a coat covers the chest
        sk["top"].append(on_torso(chest))
    # Bent legs (sit, squat): coat and skirt end at the pelvis and go on down the thighs, as sleeves to the hem.
    thigh_cover: list[tuple[str, float, float]] = []  # (role, share of the thigh, radius factor)
    if top_kind == "coat":
        hem = b.hip_z - (0.45 if pose == "walk" else 0.8) * b.thigh
        spread = 1.0 + 0.15 * (pose == "walk")
        coat_rings = [(hem, b.hip_rx * 1.22, b.hip_ry * 1.35 * spread, -0.01),
                      (crotch, b.hip_rx * 1.15, b.hip_ry * 1.22 * spread, -0.01),
                      (b.hip_z, b.hip_rx * 1.12, b.hip_ry * 1.15, -0.008)] + \
            [(z, rx * 1.08 + 0.006, ry * 1.1 + 0.006, yc) for z, rx, ry, yc in chest_rings[1:6]] + \
            [(neck_base + 0.005 * h, b.neck_r * 1.45, b.neck_r * 1.3, -0.012)]
        if seated:
            coat_rings = coat_rings[1:]
            thigh_cover.append(("coat", 0.75, 1.32))
        cm = _loft(coat_rings, 12, bottom_apex=coat_rings[0][0] + (-0.01 * h if seated else 0.02))
        sk["coat"].append(on_torso(cm))
        contact.append(sk["coat"][-1])
    if bottom_kind == "skirt":
        share = float(rng.uniform(0.35, 0.95))
        hem = b.hip_z - share * b.thigh
        flare = float(rng.uniform(1.1, 1.35)) * (1.12 if pose == "walk" else 1.0)
        skirt_rings = [(hem, b.hip_rx * 1.15 * flare, b.hip_ry * 1.3 * flare, -0.005),
                       (crotch, b.hip_rx * 1.1, b.hip_ry * 1.12, -0.008),
                       (b.hip_z, b.hip_rx * 1.05, b.hip_ry * 1.05, -0.008),
                       (waist_z + 0.01 * h, b.waist_rx * 1.07, b.waist_ry * 1.07, 0.0)]
        if seated:
            skirt_rings = skirt_rings[1:]
            thigh_cover.append(("skirt", min(share + 0.1, 0.95), 1.2))
        sm = _loft(skirt_rings, 12, bottom_apex=skirt_rings[0][0] + (-0.01 * h if seated else 0.03))
        sk["skirt"].append(on_pelvis(sm))
        contact.append(sk["skirt"][-1])

    # Neck and head.
    neck_top = torso_pt((0, 0.005, b.chin_z + 0.02 * h))
    neck = _place(_capsule(neck_top[2] - torso_pt((0, 0, b.shoulder_z))[2], b.neck_r, b.neck_r * 1.1, 8),
                  neck_top, r_torso)
    sk["skin"].append(neck)
    r_head = r_torso @ g.rot_x(-ang.head_pitch)
    head_c = neck_top + r_head @ np.array([0, 0.012, 0.5 * b.head_h - 0.02 * h])
    head, ha, hb, hc = _head(b)
    sk["skin"].append(_place(head, head_c, r_head))
    joints["head"] = head_c
    sk["hair"] += _hair(rng, hair_style, ha, hb, hc, head_c, r_head)

    # Arms.
    sleeve = "coat" if top_kind == "coat" else "top"
    for i, side in enumerate(SIDES):
        # The joint sits a little inside and below the shoulder line, so the torso rounds the arm's top.
        drop = 0.45 * b.arm_r
        sh = torso_pt((side * (b.shoulder_x - 0.15 * b.arm_r), -0.005, b.shoulder_z - drop))
        r_up = r_torso @ g.rot_y(-side * ang.sh_abd[i]) @ g.rot_x(ang.sh_flex[i]) @ g.rot_z(side * ang.sh_twist[i])
        upper = b.upper_arm - drop
        elbow = sh + r_up @ np.array([0, 0, -upper])
        r_fore = r_up @ g.rot_x(ang.elbow[i])
        wrist = elbow + r_fore @ np.array([0, 0, -b.forearm])
        loose = 1.25 if sleeve == "coat" else 1.08
        sk[sleeve].append(_place(_capsule(upper, b.arm_r * loose, b.arm_r * 0.8 * loose, bulge=0.08),
                                 sh, r_up))
        fore_mat = "skin" if top_kind == "short" else sleeve
        fr = b.arm_r * (0.85 * loose if fore_mat != "skin" else 0.78)
        sk[fore_mat].append(_place(_capsule(b.forearm, fr, fr * 0.72, bulge=0.05, flat=0.85), elbow, r_fore))
        if top_kind == "short":  # a sleeve over the upper arm's top half
            sk["top"].append(_place(_capsule(upper * 0.5, b.arm_r * 1.22, b.arm_r * 1.12), sh, r_up))
        if not ang.hand_hidden[i]:
            r_hand = r_fore @ g.rot_x(0.1 if not ang.phone else -0.3)
            hand = _capsule(b.hand * 0.9, b.arm_r * 0.62, b.arm_r * 0.52, 6, bulge=0.25, flat=1.0)
            hand = g.transform(hand, scale=(0.55, 1.35, 1.0))
            sk["skin"].append(_place(hand, wrist + r_fore @ np.array([0, 0, 0.01]), r_hand))
        joints[f"shoulder{i}"], joints[f"elbow{i}"], joints[f"wrist{i}"] = sh, elbow, wrist
        joints[f"hand{i}"] = wrist + r_fore @ g.rot_x(0.1) @ np.array([0, 0, -b.hand * 0.45])

    # Legs.
    for i, side in enumerate(SIDES):
        hip = pelvis + r_pelvis @ np.array([side * b.hip_x, 0.0, 0.0])
        r_th = r_pelvis @ g.rot_y(-side * ang.hip_abd[i]) @ g.rot_x(ang.hip_flex[i])
        knee = hip + r_th @ np.array([0, 0, -b.thigh])
        r_sh = r_th @ g.rot_x(-ang.knee[i])
        ankle = knee + r_sh @ np.array([0, 0, -b.shin])
        shin_angle = ang.hip_flex[i] - ang.knee[i]
        pitch = ang.foot_pitch[i] if ang.foot_pitch is not None else 0.6 * shin_angle if pose == "walk" else 0.0
        r_foot = g.rot_z(-side * ang.toe_out[i]) @ g.rot_x(pitch)
        thigh_mat = "bottom" if bottom_kind != "skirt" else "legwear"
        shin_mat = "bottom" if bottom_kind == "trousers" else "legwear"
        loose = 1.12 if bottom_kind == "trousers" else 1.0
        sk[thigh_mat].append(_place(_capsule(b.thigh, b.leg_r * loose, b.leg_r * 0.62 * loose, bulge=0.06),
                                    hip, r_th))
        contact.append(sk[thigh_mat][-1])
        if bottom_kind == "shorts":
            sk["bottom"].append(_place(_capsule(b.thigh * 0.55, b.leg_r * 1.18, b.leg_r * 0.98), hip, r_th))
            contact.append(sk["bottom"][-1])
        for role, share, fat in thigh_cover:
            sk[role].append(_place(_capsule(b.thigh * share, b.leg_r * fat, b.leg_r * fat * 0.85), hip, r_th))
            contact.append(sk[role][-1])
        sr = b.leg_r * (0.72 if bottom_kind == "trousers" else 0.62)
        sk[shin_mat].append(_place(_capsule(b.shin, sr, sr * (0.85 if bottom_kind == "trousers" else 0.6),
                                            bulge=0.12 if bottom_kind != "trousers" else 0.0), knee, r_sh))
        sk["shoes"].append(_place(_shoe(b, 0.12 * b.foot + 0.042 * b.height), ankle, r_foot))
        joints[f"hip{i}"], joints[f"knee{i}"], joints[f"ankle{i}"] = hip, knee, ankle

    # ------------------------------------------------------------------ accessories
    acc_parts: dict[str, Part] = {}
    if acc == "umbrella":
        acc_parts = _umbrella(rng, k, joints[f"hand{holder}"], b.height)
    elif acc == "bag":
        acc_parts = _bag(rng, k, joints[f"hand{holder}"], SIDES[holder])
    elif acc == "backpack":
        acc_parts = _backpack(rng, k, b, on_torso, chest_rings)
    if ang.phone:
        mid = (joints["hand0"] + joints["hand1"]) / 2
        phone = _place(g.box(0.075, 0.012, 0.15, center_z=True), mid + np.array([0, 0.02, 0.03]),
                       g.rot_x(-0.6))
        acc_parts["phone"] = Part(phone, Material(srgb8(15, 15, 18), roughness=0.2))

    # ------------------------------------------------------------------ parts, grounded on the soles
    mats = {"skin": skin, "hair": hair, "top": top, "bottom": bottom, "shoes": shoes, "coat": coat,
            "skirt": bottom if rng.random() < 0.6 else _fabric(rng, k, BOTTOMS + TOPS[:6], pattern_p=0.5),
            "legwear": legwear}
    parts: dict[str, Part] = {}
    for role, meshes in sk.items():
        if meshes:
            mat = mats[role] or top
            if role == "legwear" and legwear is skin:
                parts["skin"] = Part(g.merge([parts["skin"].mesh, *meshes]) if "skin" in parts else
                                     g.merge(meshes), skin)
                continue
            if role in parts:
                parts[role] = Part(g.merge([parts[role].mesh, *meshes]), mat)
            else:
                parts[role] = Part(g.merge(meshes), mat)
    parts.update(acc_parts)
    feet = parts["shoes"].mesh.vertices
    ground = float(feet[:, 2].min())
    # Seated poses: the origin between the feet (standing ones keep it under the pelvis, as they always did).
    mid = (feet[:, :2].min(axis=0) + feet[:, :2].max(axis=0)) / 2 if seated else np.zeros(2)
    lift = np.array([-mid[0], -mid[1], -ground], np.float32)
    for p in parts.values():
        p.mesh.vertices = p.mesh.vertices + lift
    joints = {n: j + lift for n, j in joints.items()}
    fig = Figure(parts, joints, body, pose, acc)
    if pose == "sit":
        # The seat's top under the buttocks (the lowest of the pelvis, thighs and clothes near the hip joints); its
        # front edge where the thighs (sloping down to the knees on a high seat) come lower than that, and behind
        # the backs of the knees.
        v = np.concatenate([m.vertices for m in contact]).astype(np.float64) + lift
        hip_y = float(joints["pelvis"][1])
        seat_top = float(v[v[:, 1] <= hip_y + 0.05, 2].min())
        knees = min(float(joints["knee0"][1]), float(joints["knee1"][1]))
        below = v[(v[:, 1] > hip_y) & (v[:, 2] < seat_top - SEAT_TOLERANCE), 1]
        fig.seat_height = seat_top
        fig.seat_front = min(knees - 1.35 * b.leg_r - 0.03, float(below.min()) - 0.01 if len(below) else np.inf)
    return fig


def _hair(rng: np.random.Generator, style: str, a: float, b: float, c: float, centre: FloatArray, rot: FloatArray
          ) -> list[Mesh]:
    """Hair (a shell over the skull above a hairline, long hair down the back) or a hat, on the head at
    ``centre`` with semi-axes (a, b, c)."""
    out = []
    if style == "hat":
        if rng.random() < 0.5:  # beanie
            cap = g.transform(g.uv_sphere(1.0, 6, 12), (0, -0.06 * b, 0.3 * c), scale=(a * 1.1, b * 1.08, c * 0.85))
            out.append(cap)
        else:  # baseball cap: crown and a brim to the front
            cap = g.transform(g.uv_sphere(1.0, 6, 12), (0, -0.04 * b, 0.32 * c), scale=(a * 1.08, b * 1.06, c * 0.8))
            brim = _loft([(0.0, a * 0.75, b * 0.55, 0.0), (0.012, a * 0.75, b * 0.55, 0.0)], 10)
            out += [cap, g.transform(brim, (0, b * 0.85, 0.42 * c), rotation=g.rot_x(0.15))]
    else:  # a shell over the skull, above a hairline that is high at the forehead and low at the nape
        sphere = g.uv_sphere(1.0, 7, 12)
        d = sphere.vertices.astype(np.float64)
        thick = float(rng.uniform(0.04, 0.12)) if style != "bald" else 0.015
        line = float(rng.uniform(0.3, 0.5)) if style != "bald" else 0.55
        cen = d[sphere.faces].mean(axis=1)
        cen /= np.linalg.norm(cen, axis=1, keepdims=True)
        thr = line * np.clip(cen[:, 1], 0, None) + 0.15 * (1 - abs(cen[:, 1])) - 0.5 * np.clip(-cen[:, 1], 0, None)
        keep = cen[:, 2] > thr
        v = _head_shape(d) * (1 + thick) * (a, b, c) + (0, -0.2 * thick * b, 0.3 * thick * c)
        out.append(Mesh(v.astype(np.float32), sphere.faces[keep], True))
        if style == "long":
            length = float(rng.uniform(0.9, 1.9)) * c
            tail = _loft([(-length, a * 0.85, b * 0.25, 0.0), (-length * 0.5, a * 0.98, b * 0.35, 0.0),
                          (0.0, a * 1.04, b * 0.5, 0.0), (0.4 * c, a * 0.9, b * 0.5, 0.0)], 10,
                         bottom_apex=-length - 0.02, top_apex=0.5 * c)
            out.append(g.transform(tail, (0, -0.55 * b, 0.0)))
    return [_place(m, centre, rot) for m in out]


def _umbrella(rng: np.random.Generator, k: MaterialKnobs, hand: FloatArray, height: float) -> dict[str, Part]:
    """Canopy (a shallow ribbed cone) over the head on a shaft through the raised hand."""
    apex = np.array([hand[0] * 0.4, hand[1] * 0.3, height + float(rng.uniform(0.32, 0.42))])
    axis = apex - hand
    axis /= np.linalg.norm(axis)
    depth_ratio = float(rng.uniform(0.3, 0.45))
    rim_c = apex - axis * 0.45 * depth_ratio
    radius = min(float(rng.uniform(0.42, 0.52)), MAX_UMBRELLA_FOOTPRINT - 0.01 - float(np.linalg.norm(rim_c[:2])))
    depth = radius * depth_ratio
    ribs = 8
    canopy = g.lathe([radius * 0.55, radius], [-depth * 0.35, -depth], ribs, cap_bottom=False, top_apex=0.0)
    v = canopy.vertices.astype(np.float64)
    # Rotate the canopy's z axis onto the shaft.
    z = np.array([0.0, 0.0, 1.0])
    ax = np.cross(z, axis)
    s, cth = np.linalg.norm(ax), float(z @ axis)
    if s > 1e-9:
        ax /= s
        kx = np.array([[0, -ax[2], ax[1]], [ax[2], 0, -ax[0]], [-ax[1], ax[0], 0]])
        rot = np.eye(3) + s * kx + (1 - cth) * kx @ kx
    else:
        rot = np.eye(3)
    canopy = Mesh((v @ rot.T + apex).astype(np.float32), canopy.faces, True)
    shaft_len = float(np.linalg.norm(apex - hand)) + 0.12
    shaft = _place(g.transform(g.cylinder(0.008, shaft_len, 6), (0, 0, -0.12)), hand, rot)
    col = _fabric(rng, k, UMBRELLAS, roughness=(0.25, 0.5), pattern_p=0.25)
    return {"accessory": Part(canopy, col),
            "accessory_trim": Part(shaft, Material(srgb8(40, 40, 42), roughness=0.35, metallic=1.0))}


def _bag(rng: np.random.Generator, k: MaterialKnobs, hand: FloatArray, side: float) -> dict[str, Part]:
    """A handbag or a shopping bag hanging from the hand (below it, clear of the ground)."""
    shopping = rng.random() < 0.45
    w, d, hgt = ((float(rng.uniform(0.28, 0.4)), float(rng.uniform(0.1, 0.16)), float(rng.uniform(0.3, 0.42)))
                 if shopping else
                 (float(rng.uniform(0.25, 0.36)), float(rng.uniform(0.08, 0.13)), float(rng.uniform(0.18, 0.28))))
    top = hand[2] - 0.09
    hgt = min(hgt, top - 0.06)  # children's bags stay clear of the ground
    centre = np.array([hand[0] + side * (d / 2 + 0.005), hand[1], top - hgt])
    body = g.transform(g.box(d, w, hgt), centre)
    handle = g.transform(g.box(0.012, w * 0.5, 0.1), (centre[0], hand[1], top - 0.01))
    mat = (_fabric(rng, k, [(srgb8(200, 170, 120), 3), (srgb8(235, 235, 230), 3), *BAGS], pattern_p=0.2)
           if shopping else _fabric(rng, k, BAGS, roughness=(0.3, 0.6), pattern_p=0.1))
    return {"accessory": Part(g.merge([body, handle]), mat)}


def _backpack(rng: np.random.Generator, k: MaterialKnobs, b: Body, on_torso: Callable[[Mesh], Mesh],
              chest_rings: list[tuple[float, float, float, float]]) -> dict[str, Part]:
    h = b.height
    w = min(float(rng.uniform(0.26, 0.34)) * h / 1.75, b.chest_rx * 2.0)
    d = float(rng.uniform(0.12, 0.2)) * h / 1.75
    z0 = b.hip_z + 0.12 * (b.shoulder_z - b.hip_z)
    z1 = b.shoulder_z - 0.01 * h
    back = -(max(r[2] - r[3] for r in chest_rings[1:5]) - 0.01)
    pack = _loft([(z0, w * 0.42, d * 0.4, 0.0), (z0 + 0.04, w * 0.5, d * 0.5, 0.0),
                  (z1 - 0.06, w * 0.5, d * 0.5, 0.0), (z1, w * 0.4, d * 0.35, 0.0)], 12,
                 bottom_apex=z0 - 0.01, top_apex=z1 + 0.015)
    pack = g.transform(pack, (0, back - d * 0.45, 0))
    straps = []
    front_sh = chest_rings[4][2] + chest_rings[4][3] + 0.006
    front_ch = chest_rings[3][2] + chest_rings[3][3] + 0.006
    for side in SIDES:
        x = side * b.shoulder_x * 0.62
        top = np.array([x, 0.0, b.shoulder_z + 0.03 * h])
        straps += [_beam(np.array([x, front_ch, b.hip_z + 0.45 * (b.shoulder_z - b.hip_z)]),
                         np.array([x, front_sh, b.shoulder_z - 0.01 * h]), 0.045, 0.012),
                   _beam(np.array([x, front_sh, b.shoulder_z - 0.01 * h]), top, 0.045, 0.012),
                   _beam(top, np.array([x, back - d * 0.5, z1 - 0.03]), 0.045, 0.012)]
    meshes = [pack, *straps]
    meshes = [on_torso(m) for m in meshes]
    mat = _fabric(rng, k, [*TOPS[:10], (srgb8(190, 30, 35), 2), (srgb8(40, 120, 60), 2)], roughness=(0.5, 0.8),
                  pattern_p=0.1)
    return {"accessory": Part(meshes[0], mat), "accessory_trim": Part(g.merge(meshes[1:]), mat)}


def sample_person(rng: np.random.Generator, k: MaterialKnobs, pose: Pose | None = None,
                  accessory: Accessory | None = None, seat_height: float | None = None) -> list[Part]:
    """One person as street-asset parts (origin between the feet, soles on z = 0, facing +y).

    Args:
        rng: Source of every random choice (the same state gives the same person).
        k: Material knobs: colour jitter of the clothes, hats and accessories, and (``texture_prob``) how often
            clothes carry a pattern (fabric noise or wavy stripes; ``k.textures`` is not used for clothing).
        pose: ``"stand"``, ``"walk"``, ``"sit"`` or ``"squat"``; ``None`` draws standing or walking (55 % walk),
            never the seated poses.
        accessory: ``"none"``, ``"umbrella"``, ``"bag"`` or ``"backpack"``; ``None`` draws one (58 % none). Seated
            poses put an umbrella or bag down (``"none"``), and ``sit`` a backpack too.
        seat_height: ``sit`` only: the seat's top (metres above the soles; None draws one in
            ``SEAT_HEIGHT_RANGE``). The figure's origin stays between its feet (soles on z = 0); its pelvis and
            thighs rest on the seat behind them, whose front edge is at ``Figure.seat_front`` (see :class:`Figure`).

    Returns:
        The parts of :class:`Figure` (skin, hair or hat, clothes, shoes, accessories), each one triangle mesh
        and its material; at most 2 k triangles in all.
    """
    return sample_figure(rng, k, pose, accessory, seat_height).part_list()


def group_offsets(rng: np.random.Generator, n: int) -> FloatArray:
    """Ground offsets of ``n`` people standing or walking together, centred on their mean.

    Walking groups go side by side (rows of two or three across x, rows 0.8 to 1.2 m apart along y); standing
    groups form a loose cluster. Any two offsets are at least ``MIN_GROUP_DISTANCE`` apart.

    Returns:
        (n, 2) float64 offsets in metres.
    """
    if n <= 0:
        return np.zeros((0, 2))
    if rng.random() < 0.5:  # side by side, in rows
        per_row = int(rng.integers(2, 4))
        gap = float(rng.uniform(0.65, 0.85))
        row_gap = float(rng.uniform(0.8, 1.2))
        pts = np.array([((i % per_row) * gap + rng.uniform(-0.04, 0.04), -(i // per_row) * row_gap
                         + rng.uniform(-0.1, 0.1)) for i in range(n)])
    else:  # a loose cluster: rejection sampling in a disc that grows with n
        radius = 0.45 * np.sqrt(n) + 0.2
        pts = np.zeros((0, 2))
        tries = 0
        while len(pts) < n:
            p = rng.uniform(-radius, radius, 2)
            tries += 1
            if np.hypot(*p) <= radius and (len(pts) == 0 or
                                           np.linalg.norm(pts - p, axis=1).min() >= MIN_GROUP_DISTANCE + 0.05):
                pts = np.vstack([pts, p])
            if tries > 200:
                radius *= 1.15
                tries = 0
    return np.asarray(pts - pts.mean(axis=0), dtype=np.float64)
