"""Street furniture of the ``street`` family (class ``pole_sign``): sign poles, traffic lights, street lamps,
bollards and benches as plain NumPy meshes, no Blender.

Conventions (object-local, see ``scenes.street_assets``): the pole stands at the origin on z=0; sign faces and
traffic-light lenses look towards ``+y``; arms (street-lamp arms, traffic-light mast arms) reach towards
``-x``, the road side when the layout turns a pole on the ``+x`` sidewalk by 0 and one on the ``-x`` sidewalk
by pi (as ``scenes/street.py`` does). An arm widens the object's footprint radius to its length (up to 4.5 m).
With ``lit=True`` the lamp head of a street lamp and one lamp of a traffic light are emission parts (dusk and
night scenes); unlit they are plain surfaces, so no part glows. A street lamp's head may instead be given its
material (``glow``: the scene environment's ``lamp_material()``, so that the glass glows in the colour of the
scene's lamp lights). A bench (:func:`sample_bench`) has its origin at the middle of its seat's front edge on
the ground, the seat towards ``-y``, facing ``+y``. Every mesh here is triangles.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from scenes import geometry as g
from scenes.randomization import MaterialKnobs, jitter_color, kelvin_to_rgb, uniform
from scenes.spec import Material, Mesh, Part, Vec3, vec3
from scenes.street_assets.nature import pick, tube
from scenes.street_assets.people import SEAT_HEIGHT_RANGE

POLE_KINDS = ("sign", "round_sign", "traffic_light", "street_lamp")
POLE_KIND_WEIGHTS = (0.35, 0.25, 0.2, 0.2)

RED: Vec3 = (0.45, 0.015, 0.015)
WHITE: Vec3 = (0.72, 0.72, 0.7)
BLUE: Vec3 = (0.01, 0.06, 0.33)
GREEN: Vec3 = (0.01, 0.16, 0.06)
YELLOW: Vec3 = (0.75, 0.45, 0.0)
BLACK: Vec3 = (0.015, 0.015, 0.015)
POLE_PAINT: list[Vec3] = [(0.3, 0.3, 0.31), (0.02, 0.02, 0.022), (0.015, 0.05, 0.03), (0.05, 0.05, 0.055)]
LAMP_COLORS: list[Vec3] = [(1.0, 0.04, 0.02), (1.0, 0.42, 0.02), (0.05, 1.0, 0.4)]


class _Parts:
    """Meshes grouped by material (one Part per material)."""

    def __init__(self) -> None:
        self.groups: dict[str, tuple[Material, list[Mesh]]] = {}

    def add(self, key: str, material: Material, mesh: Mesh) -> None:
        self.groups.setdefault(key, (material, []))[1].append(mesh)

    def parts(self) -> list[Part]:
        return [Part(g.merge(meshes), m) for m, meshes in self.groups.values()]


def _pole_material(rng: np.random.Generator, k: MaterialKnobs) -> Material:
    color = jitter_color(rng, pick(rng, POLE_PAINT), k)
    if color[0] > 0.2:  # galvanised steel
        return Material(color, roughness=uniform(rng, (0.3, 0.5)), metallic=1.0, texture="noise",
                        color2=vec3(c * 0.7 for c in color), texture_scale=8.0, texture_w=float(rng.uniform(0, 100)))
    return Material(color, roughness=uniform(rng, (0.35, 0.6)))


def _paint(rng: np.random.Generator, k: MaterialKnobs, color: Vec3) -> Material:
    return Material(jitter_color(rng, color, k), roughness=uniform(rng, (0.3, 0.5)))


def _plate(w: float, h: float, t: float, y: float, x: float, zc: float) -> Mesh:
    """A rectangular plate facing +y, its back at ``y``."""
    return g.transform(g.box(w, t, h, center_z=True), (x, y + t / 2, zc))


def _disc(r: float, t: float, y: float, x: float, zc: float, segments: int = 20) -> Mesh:
    """A disc (or, with 8 segments, an octagon with a flat top) facing +y, its back at ``y``."""
    rot = g.rot_y(np.pi / segments if segments == 8 else 0.0) @ g.rot_x(-np.pi / 2)
    return g.transform(g.cylinder(r, t, segments), (x, y, zc), rotation=rot)


def _triangle(side: float, t: float, y: float, x: float, zc: float, down: bool = False) -> Mesh:
    """An equilateral triangle plate facing +y (point up, or down for 'yield'), centred at (x, zc)."""
    rad = side / np.sqrt(3)
    ang = np.array([90.0, 210.0, 330.0]) * np.pi / 180 + (np.pi if down else 0.0)
    xs, zs = x + rad * np.cos(ang), zc + rad * np.sin(ang)
    v = [(xs[i], y + t, zs[i]) for i in range(3)] + [(xs[i], y, zs[i]) for i in range(3)]
    f = [(0, 1, 2), (3, 5, 4), (0, 3, 4), (0, 4, 1), (1, 4, 5), (1, 5, 2), (2, 5, 3), (2, 3, 0)]
    return Mesh(np.asarray(v, dtype=np.float32), np.asarray(f, dtype=np.int32))


def _sign_face(rng: np.random.Generator, k: MaterialKnobs, parts: _Parts, kind: str, x: float, y: float,
               zc: float, size: float) -> None:
    """One sign (backing, face and symbol plates) centred at (x, zc), its back at ``y``."""
    t = 0.015
    back = Material((0.35, 0.35, 0.36), roughness=0.5, metallic=1.0)
    if kind == "prohibition":
        parts.add("back", back, _disc(size / 2, t, y, x, zc))
        parts.add("red", _paint(rng, k, RED), _disc(size / 2 * 0.98, 0.004, y + t, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _disc(size / 2 * 0.78, 0.004, y + t + 0.004, x, zc))
    elif kind == "no_entry":
        parts.add("back", back, _disc(size / 2, t, y, x, zc))
        parts.add("red", _paint(rng, k, RED), _disc(size / 2 * 0.98, 0.004, y + t, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _plate(size * 0.7, size * 0.18, 0.004, y + t + 0.004, x, zc))
    elif kind == "mandatory":
        parts.add("back", back, _disc(size / 2, t, y, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _disc(size / 2 * 0.98, 0.004, y + t, x, zc))
        parts.add("blue", _paint(rng, k, BLUE), _disc(size / 2 * 0.9, 0.004, y + t + 0.004, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _plate(size * 0.12, size * 0.5, 0.004, y + t + 0.008, x, zc))
    elif kind == "stop":
        parts.add("back", back, _disc(size / 2, t, y, x, zc, 8))
        parts.add("white", _paint(rng, k, WHITE), _disc(size / 2 * 0.98, 0.004, y + t, x, zc, 8))
        parts.add("red", _paint(rng, k, RED), _disc(size / 2 * 0.9, 0.004, y + t + 0.004, x, zc, 8))
    elif kind in ("warning", "yield"):
        down = kind == "yield"
        parts.add("back", back, _triangle(size, t, y, x, zc, down))
        parts.add("red", _paint(rng, k, RED), _triangle(size * 0.97, 0.004, y + t, x, zc, down))
        parts.add("white", _paint(rng, k, WHITE), _triangle(size * 0.68, 0.004, y + t + 0.004, x, zc, down))
        if not down:  # a black symbol
            parts.add("black", _paint(rng, k, BLACK), _plate(size * 0.07, size * 0.25, 0.004, y + t + 0.008, x,
                                                               zc - size * 0.02))
    elif kind == "priority":
        rot = g.rot_y(np.pi / 4)
        for key, s, dy in (("back", 1.0, 0.0), ("white", 0.97, t), ("yellow", 0.7, t + 0.004)):
            mat = back if key == "back" else _paint(rng, k, YELLOW if key == "yellow" else WHITE)
            th = t if key == "back" else 0.004
            plate = g.box(size * s / np.sqrt(2), th, size * s / np.sqrt(2), center_z=True)
            parts.add(key, mat, g.transform(g.transform(plate, rotation=rot), (x, y + dy + th / 2, zc)))
    else:  # "info": a rectangular plate, white border, coloured face, a white symbol
        w, h = size, size * uniform(rng, (0.9, 1.3))
        face = BLUE if rng.random() < 0.7 else GREEN
        parts.add("back", back, _plate(w, h, t, y, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _plate(w * 0.98, h * 0.98, 0.004, y + t, x, zc))
        parts.add("face", _paint(rng, k, face), _plate(w * 0.9, h * 0.9, 0.004, y + t + 0.004, x, zc))
        parts.add("white", _paint(rng, k, WHITE), _plate(w * 0.35, h * 0.45, 0.004, y + t + 0.008, x, zc))


def _sign_pole(rng: np.random.Generator, k: MaterialKnobs, round_sign: bool) -> list[Part]:
    parts = _Parts()
    metal = _pole_material(rng, k)
    rp = uniform(rng, (0.03, 0.045))
    if not round_sign and rng.random() < 0.25:  # a wide direction/information sign on two poles
        w, h = uniform(rng, (1.2, 2.4)), uniform(rng, (0.5, 1.1))
        bottom = uniform(rng, (2.0, 2.4))
        for sx in (-1, 1):
            parts.add("pole", metal, g.transform(g.cylinder(rp, bottom + h - 0.05, 10), (sx * (w / 2 - 0.2), 0, 0)))
        zc, t = bottom + h / 2, 0.02
        face = pick(rng, [BLUE, GREEN, WHITE, YELLOW])
        border = BLACK if face in (WHITE, YELLOW) else WHITE
        parts.add("back", Material((0.35, 0.35, 0.36), roughness=0.5, metallic=1.0), _plate(w, h, t, rp, 0, zc))
        parts.add("border", _paint(rng, k, border), _plate(w * 0.99, h * 0.98, 0.004, rp + t, 0, zc))
        parts.add("face", _paint(rng, k, face), _plate(w - 0.08, h - 0.08, 0.004, rp + t + 0.004, 0, zc))
        lines = int(rng.integers(1, 4))
        for i in range(lines):  # lines of lettering
            lz = zc + h / 2 - 0.1 - (i + 0.5) * (h - 0.2) / lines
            lw = (w - 0.3) * rng.uniform(0.4, 0.9)
            parts.add("border", _paint(rng, k, border),
                      _plate(lw, (h - 0.2) / lines * 0.45, 0.004, rp + t + 0.008, -w / 2 + 0.15 + lw / 2, lz))
        return parts.parts()
    h = uniform(rng, (2.4, 3.4))
    parts.add("pole", metal, g.lathe([rp, rp], [0.0, h], 10, top_apex=h + rp))
    kinds = ["prohibition", "no_entry", "mandatory", "stop"] if round_sign else \
        ["warning", "yield", "priority", "info"]
    size = uniform(rng, (0.55, 0.8))
    zc = h - size / 2 - 0.05
    _sign_face(rng, k, parts, kinds[int(rng.integers(len(kinds)))], 0.0, rp, zc, size)
    if rng.random() < 0.35:  # a second sign below the first
        extra = ["info", "warning", "mandatory", "prohibition"]
        size2 = size * uniform(rng, (0.6, 0.9))
        _sign_face(rng, k, parts, extra[int(rng.integers(len(extra)))], 0.0, rp, zc - size / 2 - size2 / 2 - 0.08,
                   size2)
    return parts.parts()


def _traffic_head(rng: np.random.Generator, k: MaterialKnobs, parts: _Parts, x: float, y: float, z_top: float,
                  lit: bool, housing: Material) -> None:
    """A housing (its back at ``y``, top at ``z_top``) with red/amber/green lenses and visors facing +y."""
    hw, hd, hh = uniform(rng, (0.26, 0.34)), uniform(rng, (0.2, 0.28)), uniform(rng, (0.8, 1.0))
    parts.add("housing", housing, g.transform(g.box(hw, hd, hh), (x, y + hd / 2, z_top - hh)))
    if rng.random() < 0.5:  # backboard, sometimes with a white border
        if rng.random() < 0.5:
            parts.add("board_border", Material(WHITE, roughness=0.4),
                      _plate(hw * 1.9 + 0.06, hh * 1.2 + 0.06, 0.01, y - 0.012, x, z_top - hh / 2))
        parts.add("housing", housing, _plate(hw * 1.9, hh * 1.2, 0.01, y - 0.002, x, z_top - hh / 2))
    r = hw * 0.33
    on = int(rng.integers(3))
    for i, color in enumerate(LAMP_COLORS):
        zc = z_top - hh * (i + 0.5) / 3
        lens = _disc(r, 0.02, y + hd, x, zc, 14)
        if lit and i == on:
            parts.add(f"lamp{i}", Material(color, shader="emission", emission=uniform(rng, (8.0, 20.0))), lens)
        else:
            parts.add(f"lamp{i}", Material(vec3(c * 0.12 + 0.01 for c in color), roughness=0.15), lens)
        parts.add("housing", housing, g.transform(g.box(r * 2.3, 0.16, 0.012), (x, y + hd + 0.08, zc + r * 1.05)))


def _traffic_light(rng: np.random.Generator, k: MaterialKnobs, lit: bool) -> list[Part]:
    parts = _Parts()
    metal = _pole_material(rng, k)
    housing = Material(jitter_color(rng, pick(rng, [BLACK, (0.05, 0.05, 0.05), (0.3, 0.25, 0.02)]), k),
                       roughness=0.5)
    if rng.random() < 0.35:  # mast arm over the road (-x)
        h = uniform(rng, (5.2, 6.5))
        rp = uniform(rng, (0.09, 0.13))
        parts.add("pole", metal, g.lathe([rp, rp * 0.75], [0.0, h], 12, top_apex=h))
        arm = uniform(rng, (2.5, 4.5))
        za = h - 0.25
        parts.add("pole", metal, tube((0, 0, za), (-arm, 0, za + 0.15), rp * 0.6, rp * 0.4, 8))
        _traffic_head(rng, k, parts, -arm * 0.85, -0.12, za + 0.1, lit, housing)
        if rng.random() < 0.6:  # a second head on the pole for the near side
            _traffic_head(rng, k, parts, 0.0, rp, uniform(rng, (3.0, 3.4)), lit, housing)
    else:
        rp = uniform(rng, (0.05, 0.07))
        h = uniform(rng, (2.9, 3.6))
        parts.add("pole", metal, g.lathe([rp, rp], [0.0, h], 10, top_apex=h + 0.02))
        _traffic_head(rng, k, parts, 0.0, rp, h, lit, housing)
        if rng.random() < 0.4:  # a push-button box for pedestrians
            parts.add("housing", housing, g.transform(g.box(0.12, 0.1, 0.2), (0, rp + 0.05, 1.05)))
    return parts.parts()


def _street_lamp(rng: np.random.Generator, k: MaterialKnobs, lit: bool, glow: Material | None = None
                 ) -> list[Part]:
    parts = _Parts()
    metal = _pole_material(rng, k)
    if glow is None:
        warm = kelvin_to_rgb(uniform(rng, (2700.0, 5000.0)))
        glow = Material(warm, shader="emission", emission=uniform(rng, (15.0, 40.0))) if lit else \
            Material(vec3(0.5 + 0.2 * c for c in warm), roughness=0.15)
    style = ("arm", "curved", "post_top")[int(rng.integers(3))]
    if style == "post_top":  # heritage lantern on a short post
        h = uniform(rng, (3.2, 4.5))
        rp = uniform(rng, (0.05, 0.07))
        parts.add("pole", metal, g.lathe([rp * 2.6, rp * 2.2, rp * 1.2, rp, rp * 0.8],
                                         [0.0, 0.5, 0.7, 1.0, h], 12))
        lw = uniform(rng, (0.18, 0.26))
        lantern = g.lathe([lw * 0.5, lw, lw * 1.05, lw * 0.7], [0.0, 0.1, 0.45, 0.55], 8)
        parts.add("glow", glow, g.transform(lantern, (0, 0, h)))
        roof = g.lathe([lw * 0.9, lw * 1.15, 0.02], [0.0, 0.05, 0.25], 8)
        parts.add("pole", metal, g.transform(roof, (0, 0, h + 0.55)))
        return parts.parts()
    h = uniform(rng, (6.0, 9.0))
    rp = uniform(rng, (0.07, 0.1))
    parts.add("pole", metal, g.lathe([rp * 1.6, rp * 1.6, rp, rp * 0.55], [0.0, 0.6, 0.75, h], 12, top_apex=h))
    length = uniform(rng, (1.0, 2.2))
    if style == "arm":
        end = np.array([-length, 0.0, h + uniform(rng, (0.0, 0.4))])
        parts.add("pole", metal, tube((0, 0, h - 0.3), end, rp * 0.5, rp * 0.4, 8))
    else:  # a curved arm: an arc from the pole top bending over towards -x
        radius = length * 0.7
        pts = [np.array([-radius + radius * np.cos(a), 0.0, h - 0.1 + radius * np.sin(a)])
               for a in np.linspace(0, np.radians(105), 6)]
        for p0, p1 in itertools.pairwise(pts):
            parts.add("pole", metal, tube(p0, p1, rp * 0.55, rp * 0.55, 8))
        end = pts[-1] + np.array([-(length - radius), 0.0, 0.0])
        parts.add("pole", metal, tube(pts[-1], end, rp * 0.55, rp * 0.5, 8))
    hl, hw, hh = uniform(rng, (0.45, 0.7)), uniform(rng, (0.22, 0.32)), uniform(rng, (0.1, 0.16))
    head_c = end + np.array([-hl * 0.35, 0.0, -hh * 0.3])
    parts.add("head", Material(jitter_color(rng, pick(rng, [(0.3, 0.3, 0.31), (0.05, 0.05, 0.05)]), k),
                               roughness=0.4, metallic=float(rng.random() < 0.5)),
              g.transform(g.uv_sphere(1.0, 6, 12), head_c, scale=(hl / 2, hw / 2, hh)))
    lens = g.transform(g.uv_sphere(1.0, 4, 12), head_c + np.array([0.0, 0.0, -hh * 0.55]),
                       scale=(hl * 0.38, hw * 0.38, hh * 0.6))
    parts.add("glow", glow, lens)
    return parts.parts()


def sample_pole(rng: np.random.Generator, k: MaterialKnobs, kind: str | None = None, lit: bool = False,
                glow: Material | None = None) -> list[Part]:
    """A pole of class ``pole_sign``.

    Args:
        rng: Random generator.
        k: Material knobs.
        kind: One of ``POLE_KINDS``: "sign" (rectangular, triangular, diamond plates, stacked, or a wide
            plate on two poles), "round_sign" (prohibition, no entry, mandatory, stop octagon),
            "traffic_light" (a housing with three lamps on a pole, or on a mast arm over -x) or
            "street_lamp" (a tall pole with an arm and lamp head, or a short post with a lantern);
            ``None`` draws one.
        lit: The street lamp's head / one traffic-light lamp are emission parts (dusk and night).
        glow: A street lamp's head (its glass) in this material, whatever ``lit`` says (a scene passes its
            environment's ``lamp_material()``: glowing in its lamp lights' colour when they are on); None: a
            colour drawn here, glowing when ``lit``.

    Returns:
        Parts, one per material, <= ~1.5k faces.
    """
    if kind is None:
        kind = POLE_KINDS[int(rng.choice(len(POLE_KINDS), p=POLE_KIND_WEIGHTS))]
    if kind not in POLE_KINDS:
        raise ValueError(f"pole kind must be one of {POLE_KINDS}, got {kind!r}")
    if kind in ("sign", "round_sign"):
        return _sign_pole(rng, k, kind == "round_sign")
    if kind == "traffic_light":
        return _traffic_light(rng, k, lit)
    return _street_lamp(rng, k, lit, glow)


def lamp_positions(parts: list[Part]) -> list[tuple[Vec3, Vec3]]:
    """(centre, colour) of each emission part, object-local: where a dusk or night scene may put a point or spot
    light, since a small glowing lens lights little of the street around it."""
    return [(vec3(p.mesh.vertices.astype(np.float64).mean(axis=0)), p.material.color) for p in parts
            if p.material.shader == "emission"]


def sample_bollard(rng: np.random.Generator, k: MaterialKnobs) -> list[Part]:
    """A bollard (class ``pole_sign``): a metal post with a reflective band, a concrete stub or a square post."""
    style = int(rng.integers(3))
    if style == 0:
        r, h = uniform(rng, (0.05, 0.09)), uniform(rng, (0.8, 1.05))
        body = g.lathe([r, r, r * 0.8], [0.0, h - r * 0.6, h], 12, top_apex=h + r * 0.15)
        band = g.lathe([r * 1.04, r * 1.04], [h * 0.72, h * 0.8], 12, cap_bottom=False, cap_top=False)
        paint = Material(jitter_color(rng, pick(rng, [(0.02, 0.02, 0.022), (0.3, 0.3, 0.31), (0.015, 0.05, 0.03)]),
                                      k), roughness=0.45, metallic=float(rng.random() < 0.5))
        return [Part(body, paint), Part(band, Material(pick(rng, [WHITE, RED, YELLOW]), roughness=0.3))]
    if style == 1:
        r, h = uniform(rng, (0.12, 0.22)), uniform(rng, (0.4, 0.8))
        body = g.lathe([r * 1.05, r, r * 0.8], [0.0, h - r * 0.5, h], 12, top_apex=h + r * 0.2)
        color = jitter_color(rng, (0.4, 0.39, 0.36), k)
        return [Part(body, Material(color, roughness=0.9, texture="noise", color2=vec3(c * 0.7 for c in color),
                                    texture_scale=12.0, texture_w=float(rng.uniform(0, 100)), bump=0.3))]
    s, h = uniform(rng, (0.1, 0.16)), uniform(rng, (0.8, 1.1))
    post = g.box(s, s, h)
    cap = g.transform(g.box(s * 1.02, s * 1.02, 0.1), (0, 0, h * 0.75))
    return [Part(post, Material(jitter_color(rng, pick(rng, [RED, WHITE, (0.12, 0.07, 0.03)]), k), roughness=0.5)),
            Part(cap, Material(WHITE, roughness=0.3))]


WOOD: list[Vec3] = [(0.2, 0.1, 0.045), (0.3, 0.17, 0.08), (0.12, 0.07, 0.035), (0.35, 0.3, 0.24)]


@dataclass
class Bench:
    """A street bench (class ``pole_sign``), object-local: origin at the middle of the seat's front edge on the
    ground, the seat from ``y = -depth`` to 0, its top at ``seat_height``; a backrest (if any) behind ``-depth``.

    Attributes:
        parts: One part per material.
        seat_height, depth, length: Metres (``length`` along x, centred).
        back: It has a backrest.
    """

    parts: list[Part]
    seat_height: float
    depth: float
    length: float
    back: bool


def sample_bench(rng: np.random.Generator, k: MaterialKnobs, seat_height: float | None = None,
                 length: float | None = None) -> Bench:
    """A bench: wooden slats on a painted metal frame with or without a backrest, or a concrete slab on two blocks.

    Args:
        rng: Random generator.
        k: Material knobs.
        seat_height: The seat's top in metres (None: drawn in ``people.SEAT_HEIGHT_RANGE``, the seats that
            ``people.sample_figure(pose="sit")`` sits on).
        length: Metres along x (None: 1.4-2.2 m).

    Returns:
        The bench (see :class:`Bench`), <= ~300 faces.
    """
    top = uniform(rng, SEAT_HEIGHT_RANGE) if seat_height is None else float(seat_height)
    length_ = uniform(rng, (1.4, 2.2)) if length is None else float(length)
    parts = _Parts()
    if rng.random() < 0.25:  # a concrete slab on two blocks, no backrest
        depth, t = uniform(rng, (0.4, 0.5)), uniform(rng, (0.08, 0.12))
        color = jitter_color(rng, (0.42, 0.41, 0.38), k)
        stone = Material(color, roughness=0.9, texture="noise", color2=vec3(c * 0.75 for c in color),
                         texture_scale=10.0, texture_w=float(rng.uniform(0, 100)), bump=0.3)
        parts.add("stone", stone, g.transform(g.box(length_, depth, t), (0.0, -depth / 2, top - t)))
        bw = uniform(rng, (0.14, 0.24))
        for sx in (-1, 1):
            block = g.box(bw, depth * 0.8, top - t)
            parts.add("stone", stone, g.transform(block, (sx * (length_ / 2 - 0.1 - bw / 2), -depth / 2, 0.0)))
        return Bench(parts.parts(), top, depth, length_, False)
    depth = uniform(rng, (0.38, 0.46))
    wood = Material(jitter_color(rng, pick(rng, WOOD), k), roughness=uniform(rng, (0.5, 0.8)), texture="wave",
                    color2=vec3(c * 0.7 for c in pick(rng, WOOD)), texture_scale=uniform(rng, (3.0, 6.0)),
                    texture_w=float(rng.uniform(0, 100)))
    metal = _pole_material(rng, k)
    n_slats, t = int(rng.integers(3, 6)), uniform(rng, (0.03, 0.045))
    gap = 0.015
    w = (depth - gap * (n_slats - 1)) / n_slats
    for i in range(n_slats):
        parts.add("wood", wood, g.transform(g.box(length_, w, t), (0.0, -w / 2 - i * (w + gap), top - t)))
    back = bool(rng.random() < 0.7)
    frames = [-1.0, 1.0] + ([0.0] if length_ > 1.9 else [])
    post, inset = uniform(rng, (0.04, 0.06)), uniform(rng, (0.1, 0.2))
    lean = uniform(rng, (0.15, 0.3))  # the backrest leans back (radians)
    back_h = uniform(rng, (0.35, 0.5))
    up, front = np.array([0.0, -np.sin(lean), np.cos(lean)]), np.array([0.0, np.cos(lean), np.sin(lean)])
    for fx in frames:
        x = fx * (length_ / 2 - inset)
        for y in (-post / 2 - 0.02, -depth + post / 2 + 0.02):  # front and back legs
            parts.add("metal", metal, g.transform(g.box(post, post, top - t), (x, y, 0.0)))
        rear = depth + (t + post if back else 0.0)  # the side bar reaches back under the backrest
        parts.add("metal", metal, g.transform(g.box(post, rear - 0.02, post), (x, -rear / 2, top - t - post)))
        if back:  # a post behind the seat, leaning back; the backrest slats in front of it
            foot = np.array([x, -depth - t - post / 2, top - t - post])
            parts.add("metal", metal, tube(foot, foot + (back_h + post) * up, post * 0.45, post * 0.45, 6))
    if back:  # the slats' front faces rise from the seat's back edge (y = -depth), leaning back
        for j in range(2 if back_h < 0.42 else 3):
            h = 0.08 + j * (back_h - 0.1) / 2
            c = np.array([0.0, -depth, top]) + h * up - (t / 2 + 0.005) * front
            slat = g.transform(g.box(length_, t, w * 0.8, center_z=True), rotation=g.rot_x(lean))
            parts.add("wood", wood, g.transform(slat, c))
    return Bench(parts.parts(), top, depth, length_, back)
