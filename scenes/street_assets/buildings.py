"""Procedural buildings of the ``street`` family (class ``building``): plain NumPy meshes, no Blender.

A building is a wall block with a street facade on ``+x``: a grid of windows (glass panes on the facade
plane, protruding frames with mullions, sills, lintels), a ground floor with a door or shop fronts (large glass,
dark or showing a lit interior, a sign band with lettering, awnings), balconies (slab and railing) on some, on
some modern blocks a continuous balcony along every upper floor with floor-to-ceiling glass behind it, string
courses, a cornice, a roof parapet and a drainpipe. Its sides (``+-y``, seen through gaps between buildings) get
plainer windows or stay blank firewalls. Walls are brick (Blender's brick texture, mortar as ``color2``), plaster
or concrete (noise textures with a little bump) in realistic colours.

Geometry (object-local, metres): footprint ``x`` in ``[-depth/2, depth/2]``, ``y`` in ``[-width/2, width/2]``,
``z`` from 0 to ``height`` plus a roof parapet of at most ``ROOF_LEDGE_MAX``. Only the street facade
(``+x``) has things sticking out of the footprint: frames, sills, balconies, sign bands and awnings, at most
``FRONT_PROTRUSION_MAX``; below ``HEADROOM`` (2.3 m) nothing sticks out further than
``GROUND_PROTRUSION_MAX`` (door steps), so people can walk under awnings and balconies. The side walls stand
``SIDE_INSET`` inside the footprint so the side windows' frames stay inside it. Every part is one merged
triangle mesh per material (all panes of the building in one part, all frames in another): the street facade
stays under ~5k faces, the whole building under ~10k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scenes import geometry as g
from scenes.randomization import MaterialKnobs, jitter_color, uniform
from scenes.spec import FloatArray, Material, Mesh, Part, Vec3, vec3
from scenes.street_assets.nature import pick

FRONT_PROTRUSION_MAX = 1.5  # m beyond the +x face: balconies, awnings, sills, cornices
ROOF_LEDGE_MAX = 0.6  # m above ``height``: the roof parapet
HEADROOM = 2.3  # m: what sticks out further than GROUND_PROTRUSION_MAX (balconies, awnings) is above this
GROUND_PROTRUSION_MAX = 0.36  # m: door steps, plinths, stall risers, sills, frames below HEADROOM
SIDE_INSET = 0.06  # the side walls stand this far inside the footprint
PANE_OFFSET = 0.01  # panes lie this far in front of their wall plane
FRONT_FACE_BUDGET = 3400  # faces of the window grid of the street facade (the rest of it adds < 800)

BRICK: list[Vec3] = [(0.3, 0.085, 0.05), (0.22, 0.065, 0.04), (0.38, 0.17, 0.08), (0.45, 0.34, 0.2),
                     (0.15, 0.065, 0.045), (0.34, 0.12, 0.07)]
MORTAR: list[Vec3] = [(0.45, 0.43, 0.4), (0.3, 0.3, 0.29), (0.55, 0.53, 0.5), (0.2, 0.2, 0.19)]
PLASTER: list[Vec3] = [(0.7, 0.64, 0.52), (0.74, 0.73, 0.7), (0.62, 0.46, 0.26), (0.6, 0.4, 0.35),
                       (0.48, 0.53, 0.58), (0.52, 0.56, 0.44), (0.58, 0.58, 0.56), (0.7, 0.55, 0.45)]
CONCRETE: list[Vec3] = [(0.33, 0.32, 0.3), (0.42, 0.41, 0.38), (0.25, 0.25, 0.25), (0.5, 0.48, 0.44)]
TRIM: list[Vec3] = [(0.72, 0.71, 0.68), (0.55, 0.52, 0.46), (0.4, 0.39, 0.36), (0.65, 0.6, 0.5)]
FRAMES: list[Vec3] = [(0.72, 0.72, 0.7), (0.035, 0.035, 0.04), (0.12, 0.06, 0.03), (0.02, 0.06, 0.035),
                      (0.4, 0.4, 0.41), (0.72, 0.72, 0.7)]
DOORS: list[Vec3] = [(0.1, 0.05, 0.025), (0.03, 0.03, 0.035), (0.02, 0.07, 0.04), (0.2, 0.1, 0.04),
                     (0.05, 0.08, 0.2), (0.3, 0.04, 0.03)]
SIGNS: list[Vec3] = [(0.02, 0.02, 0.025), (0.35, 0.02, 0.02), (0.02, 0.12, 0.05), (0.02, 0.05, 0.25),
                     (0.7, 0.7, 0.68), (0.5, 0.3, 0.02), (0.15, 0.02, 0.15)]
INTERIORS: list[Vec3] = [(0.75, 0.68, 0.55), (0.6, 0.6, 0.58), (0.8, 0.75, 0.65), (0.55, 0.5, 0.42),
                         (0.7, 0.72, 0.75), (0.65, 0.55, 0.5)]  # lit shop interiors (warm and cool light)
BAND_OTHER_SHARE = 0.25  # balcony bands on buildings that are not modern: this share of the modern ones' chance
AWNINGS: list[Vec3] = [(0.3, 0.02, 0.02), (0.02, 0.12, 0.05), (0.02, 0.04, 0.2), (0.6, 0.45, 0.2),
                       (0.05, 0.05, 0.05), (0.6, 0.6, 0.55)]


def _bx(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float) -> Mesh:
    """Axis-aligned box between the given coordinates."""
    return g.transform(g.box(x1 - x0, y1 - y0, z1 - z0), ((x0 + x1) / 2, (y0 + y1) / 2, z0))


def _quads(v: list[tuple[float, float, float]], quads: list[tuple[int, int, int, int]]) -> Mesh:
    tris = [t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))]
    return Mesh(np.asarray(v, dtype=np.float32), np.asarray(tris, dtype=np.int32))


def _pane(y0: float, y1: float, z0: float, z1: float, x: float = PANE_OFFSET) -> Mesh:
    """A glass pane in the plane ``x`` (normal +x)."""
    return _quads([(x, y0, z0), (x, y1, z0), (x, y1, z1), (x, y0, z1)], [(0, 1, 2, 3)])


def _ring(y0: float, y1: float, z0: float, z1: float, t: float, depth: float, bottom: bool = True) -> Mesh:
    """A rectangular frame of bar width ``t`` around the opening [y0, y1] x [z0, z1], from x=0 to ``depth``.

    Front face, inner reveal and outer sides: 24 triangles; a door's frame has no bottom bar (18).
    """
    zb = z0 - t if bottom else z0
    outer = [(y0 - t, zb), (y1 + t, zb), (y1 + t, z1 + t), (y0 - t, z1 + t)]
    inner = [(y0, z0), (y1, z0), (y1, z1), (y0, z1)]
    v = ([(depth, y, z) for y, z in outer] + [(depth, y, z) for y, z in inner]
         + [(0.0, y, z) for y, z in outer] + [(0.0, y, z) for y, z in inner])
    quads = []
    for i in range(4) if bottom else range(1, 4):
        j = (i + 1) % 4
        quads += [(i, j, 4 + j, 4 + i), (4 + i, 4 + j, 12 + j, 12 + i), (8 + i, 8 + j, j, i)]
    return _quads(v, quads)


class _Acc:
    """Meshes of one facade (or the whole building) by part name."""

    def __init__(self) -> None:
        self.meshes: dict[str, list[Mesh]] = {}

    def add(self, key: str, mesh: Mesh) -> None:
        self.meshes.setdefault(key, []).append(mesh)

    def place(self, other: _Acc, rotation: FloatArray, offset: tuple[float, float, float]) -> None:
        for key, meshes in other.meshes.items():
            for m in meshes:
                self.add(key, g.transform(m, offset, rotation=rotation))

    def faces(self) -> int:
        return sum(len(m.faces) for ms in self.meshes.values() for m in ms)


@dataclass
class _WindowStyle:
    frame_t: float
    frame_d: float
    mullion: bool
    transom: bool
    sill_d: float  # 0: no sill
    lintel: bool
    curtain_p: float

    def cost(self) -> int:
        return 26 + 12 * (self.mullion + self.transom + (self.sill_d > 0) + self.lintel)


def _window(rng: np.random.Generator, acc: _Acc, st: _WindowStyle, yc: float, z0: float, w: float, h: float,
            door: bool = False) -> None:
    """A window (or balcony door) in wall-local coordinates: wall plane x=0, outward +x, opening centred on
    ``yc`` from ``z0`` to ``z0 + h``."""
    y0, y1, z1 = yc - w / 2, yc + w / 2, z0 + h
    acc.add("glass_curtain" if rng.random() < st.curtain_p else "glass", _pane(y0, y1, z0, z1))
    acc.add("frame", _ring(y0, y1, z0, z1, st.frame_t, st.frame_d))
    bar = st.frame_t * 0.7
    if st.mullion and w > 0.8:
        acc.add("frame", _bx(0.0, st.frame_d * 0.8, yc - bar / 2, yc + bar / 2, z0, z1))
    if st.transom and h > 1.2:
        zt = z0 + h * 0.72
        acc.add("frame", _bx(0.0, st.frame_d * 0.8, y0, y1, zt - bar / 2, zt + bar / 2))
    if st.sill_d > 0 and not door:
        acc.add("trim", _bx(0.0, st.sill_d, y0 - st.frame_t - 0.05, y1 + st.frame_t + 0.05, z0 - st.frame_t - 0.06,
                            z0 - st.frame_t))
    if st.lintel:
        acc.add("trim", _bx(0.0, 0.05, y0 - st.frame_t - 0.08, y1 + st.frame_t + 0.08, z1 + st.frame_t,
                            z1 + st.frame_t + 0.22))


def _wall_material(rng: np.random.Generator, k: MaterialKnobs, kind: str) -> Material:
    w = float(rng.uniform(0, 100))
    if kind == "brick":
        return Material(jitter_color(rng, pick(rng, BRICK), k), roughness=uniform(rng, (0.8, 0.95)),
                        texture="brick", color2=jitter_color(rng, pick(rng, MORTAR), k),
                        texture_scale=uniform(rng, (4.0, 4.6)), texture_w=w, bump=uniform(rng, (0.3, 0.6)))
    base = pick(rng, PLASTER if kind == "plaster" else CONCRETE)
    color = jitter_color(rng, base, k)
    return Material(color, roughness=uniform(rng, (0.8, 0.95)), texture="noise",
                    color2=vec3(c * rng.uniform(0.75, 0.92) for c in color),
                    texture_scale=uniform(rng, (1.5, 5.0) if kind == "plaster" else (3.0, 10.0)), texture_w=w,
                    texture_detail=uniform(rng, (5.0, 8.0)),
                    bump=uniform(rng, (0.05, 0.15) if kind == "plaster" else (0.1, 0.25)))


def _stone(rng: np.random.Generator, k: MaterialKnobs, base: Vec3) -> Material:
    color = jitter_color(rng, base, k)
    return Material(color, roughness=uniform(rng, (0.6, 0.9)), texture="noise",
                    color2=vec3(c * 0.85 for c in color), texture_scale=uniform(rng, (4.0, 10.0)),
                    texture_w=float(rng.uniform(0, 100)), texture_detail=6.0, bump=0.1)


def _materials(rng: np.random.Generator, k: MaterialKnobs, wall_kind: str, modern: bool) -> dict[str, Material]:
    glass_tint = pick(rng, [(0.012, 0.018, 0.022), (0.02, 0.028, 0.03), (0.01, 0.012, 0.016)])
    if modern and rng.random() < 0.3:  # mirrored office glass
        glass = Material(jitter_color(rng, (0.1, 0.14, 0.18), k), roughness=uniform(rng, (0.02, 0.06)), metallic=0.7)
    else:
        glass = Material(glass_tint, roughness=uniform(rng, (0.02, 0.08)))
    frame_c = pick(rng, FRAMES[1:] if modern else FRAMES)
    return {
        "wall": _wall_material(rng, k, wall_kind),
        "trim": _stone(rng, k, pick(rng, TRIM if wall_kind != "concrete" else CONCRETE)),
        "plinth": _stone(rng, k, pick(rng, [(0.2, 0.2, 0.2), (0.35, 0.33, 0.3), (0.12, 0.11, 0.1)])),
        "frame": Material(jitter_color(rng, frame_c, k), roughness=uniform(rng, (0.3, 0.6)),
                          metallic=1.0 if frame_c == FRAMES[4] else 0.0),
        "glass": glass,
        "glass_curtain": Material(jitter_color(rng, pick(rng, [(0.45, 0.42, 0.36), (0.3, 0.3, 0.3),
                                                             (0.5, 0.5, 0.48)]), k), roughness=0.25),
        "door": Material(jitter_color(rng, pick(rng, DOORS), k), roughness=uniform(rng, (0.3, 0.6))),
        "shop_frame": Material(jitter_color(rng, pick(rng, [(0.03, 0.03, 0.035), (0.4, 0.4, 0.41),
                                                          (0.02, 0.06, 0.035), (0.1, 0.05, 0.025)]), k),
                               roughness=0.4),
        "shop_glass": Material(pick(rng, [(0.02, 0.022, 0.025), (0.04, 0.035, 0.03)]), roughness=0.03),
        "sign": Material(jitter_color(rng, pick(rng, SIGNS), k), roughness=uniform(rng, (0.2, 0.5))),
        "sign2": Material(jitter_color(rng, pick(rng, SIGNS), k), roughness=uniform(rng, (0.2, 0.5))),
        "lettering": Material(pick(rng, [(0.8, 0.8, 0.78), (0.7, 0.5, 0.1), (0.02, 0.02, 0.02)]), roughness=0.3),
        "awning": Material(jitter_color(rng, pick(rng, AWNINGS), k), roughness=0.9, texture="noise",
                           color2=vec3(c * 0.8 for c in pick(rng, AWNINGS)), texture_scale=20.0,
                           texture_w=float(rng.uniform(0, 100)), bump=0.2),
        "railing": Material(jitter_color(rng, pick(rng, [(0.03, 0.03, 0.035), (0.4, 0.4, 0.41), (0.7, 0.7, 0.68)]),
                                         k), roughness=0.4, metallic=float(rng.random() < 0.4)),
        "railing_glass": Material((0.05, 0.07, 0.07), roughness=0.05),
        "metal": Material((0.3, 0.3, 0.31), roughness=0.4, metallic=1.0),
    }


def _lit_shop_glass(rng: np.random.Generator, k: MaterialKnobs) -> Material:
    """Display windows with a lit interior seen through them (``lit_shops``): a bright, blotchy pane (shelves, goods,
    lamps as a coarse texture) that still reflects a little."""
    light = jitter_color(rng, pick(rng, INTERIORS), k)
    return Material(light, roughness=uniform(rng, (0.08, 0.2)), texture="noise" if rng.random() < 0.5 else "voronoi",
                    color2=vec3(c * uniform(rng, (0.15, 0.4)) for c in light),
                    texture_scale=uniform(rng, (2.0, 6.0)), texture_w=float(rng.uniform(0, 100)),
                    texture_detail=uniform(rng, (2.0, 5.0)))


def sample_building_parts(rng: np.random.Generator, k: MaterialKnobs, width: float, depth: float, height: float,
                          shop_front: bool | None = None, balcony_bands: float = 0.0,
                          lit_shops: float = 0.0) -> dict[str, Part]:
    """One building as named parts ("wall", "glass", "frame", ...; see the module docstring for its frame).

    Args:
        rng: Random generator.
        k: Material knobs (colour jitter).
        width: Extent along y (the street), metres.
        depth: Extent along x (away from the street), metres.
        height: Height of the walls, metres (the parapet adds up to ``ROOF_LEDGE_MAX``).
        shop_front: Shops on the ground floor; ``None`` draws (1 in 2).
        balcony_bands: Chance that a modern building (concrete, some plaster) has a balcony along every upper floor
            with floor-to-ceiling glass behind it instead of its window grid (``BAND_OTHER_SHARE`` of it for the
            others); 0 (the default) draws none.
        lit_shops: Chance that the display windows show a lit interior instead of dark glass; 0 draws none.

    Returns:
        Named parts; "glass", "glass_curtain" and "shop_glass" hold only panes on the wall planes.
    """
    W, D, H = float(width), float(depth), float(height)
    # The balcony bands and lit shop interiors draw from a generator of their own (spawning one does not advance
    # ``rng``): everything else of the building, and of the scene drawn after it, is what it was without them.
    extra = rng.spawn(1)[0]
    if shop_front is None:
        shop_front = bool(rng.random() < 0.5)
    wall_kind = ("brick", "plaster", "concrete")[int(rng.choice(3, p=[0.35, 0.4, 0.25]))]
    modern = wall_kind == "concrete" or (wall_kind == "plaster" and rng.random() < 0.4)
    mats = _materials(rng, k, wall_kind, modern)
    if extra.random() < lit_shops:
        mats["shop_glass"] = _lit_shop_glass(extra, k)
    hw = W / 2 - SIDE_INSET
    body = _Acc()
    body.add("wall", _bx(-D / 2, D / 2, -hw, hw, 0.0, H))

    # Floors: a taller ground floor, ~3 m upper floors, room for the cornice at the top.
    gf_h = uniform(rng, (3.6, 4.6)) if shop_front else uniform(rng, (3.0, 3.6))
    gf_h = min(gf_h, max(H - 0.8, 2.6))
    floor_h = uniform(rng, (2.9, 3.2) if modern else (3.0, 3.6))
    top_margin = uniform(rng, (0.5, 1.0))
    n_upper = max(0, int((H - gf_h - top_margin) // floor_h))
    floors = [gf_h + i * floor_h for i in range(n_upper)]

    ribbon = modern and rng.random() < 0.35
    st = _WindowStyle(frame_t=uniform(rng, (0.04, 0.06) if modern else (0.06, 0.09)),
                      frame_d=uniform(rng, (0.05, 0.1)), mullion=bool(rng.random() < (0.3 if modern else 0.75)),
                      transom=bool(not modern and rng.random() < 0.5),
                      sill_d=0.0 if modern and rng.random() < 0.5 else uniform(rng, (0.08, 0.18)),
                      lintel=bool(not modern and wall_kind != "concrete" and rng.random() < 0.5),
                      curtain_p=uniform(rng, (0.0, 0.4)))
    margin = uniform(rng, (0.7, 1.4))
    spacing = uniform(rng, (1.8, 3.0) if modern else (2.2, 3.2))
    n_windows_ground = 0 if shop_front else 1
    # A continuous balcony along every upper floor (apartment blocks): slab, railing across the whole front,
    # floor-to-ceiling glass behind, instead of the window grid (which is still drawn, into a discarded
    # accumulator, so that ``rng`` advances as without it).
    band = not ribbon and n_upper >= 1 and extra.random() < balcony_bands * (1.0 if modern else BAND_OTHER_SHARE)
    band_rail = int(extra.integers(3)) if band else 0  # 0 solid parapet, 1 glass panels, 2 rails on posts
    if band_rail == 2 and len(floors) * (W // 1.4 + 1) > 60:  # posts every 1.4 m: keep the face budget
        band_rail = 1
    while True:  # fit the window grid into the face budget: drop details, then widen the spacing
        n_cols = max(1, int((W - 2 * margin) // spacing))
        cost = st.cost() * n_cols * (len(floors) + n_windows_ground)
        if ribbon or cost <= FRONT_FACE_BUDGET:
            break
        if st.lintel:
            st.lintel = False
        elif st.transom:
            st.transom = False
        elif st.mullion:
            st.mullion = False
        else:
            spacing *= 1.15
    pitch = (W - 2 * margin) / n_cols
    cols = [-W / 2 + margin + (j + 0.5) * pitch for j in range(n_cols)]
    win_w = min(pitch * (uniform(rng, (0.55, 0.8)) if modern else uniform(rng, (0.4, 0.6))), 2.4)
    win_h = min(uniform(rng, (1.3, 1.8)), floor_h - 1.2)
    sill_z = uniform(rng, (0.8, 1.0))

    front = _Acc()
    # Balconies on some buildings: a pattern of columns on all upper floors but sometimes the first.
    balconies: set[tuple[int, int]] = set()
    if n_upper >= 1 and rng.random() < 0.4:
        pattern = int(rng.integers(3))
        bcols = [j for j in range(n_cols) if pattern == 0 or (pattern == 1 and j % 2 == n_cols % 2)
                 or (pattern == 2 and abs(j - (n_cols - 1) / 2) < 1)]
        first = int(rng.integers(0, 2)) if n_upper > 1 else 0
        balconies = {(f, j) for f in range(first, n_upper) for j in bcols}
        while len(balconies) > 12:
            balconies.discard(max(balconies))
    rail_style = int(rng.integers(3))  # 0 solid, 1 glass, 2 bars
    if rail_style == 2 and len(balconies) > 4:
        rail_style = 0
    bal_d = uniform(rng, (0.9, 1.4))
    bal_w = min(win_w + uniform(rng, (0.6, 1.2)), pitch - 0.15)

    if ribbon:  # modern ribbon windows: one long pane per floor with thin mullions
        y0, y1 = -W / 2 + margin, W / 2 - margin
        for fz in floors:
            z0 = fz + sill_z
            front.add("glass", _pane(y0, y1, z0, z0 + win_h))
            front.add("frame", _ring(y0, y1, z0, z0 + win_h, st.frame_t, st.frame_d))
            n_m = max(1, int((y1 - y0) // uniform(rng, (1.2, 1.8))))
            for i in range(1, n_m):
                ym = y0 + i * (y1 - y0) / n_m
                front.add("frame", _bx(0.0, st.frame_d * 0.8, ym - 0.025, ym + 0.025, z0, z0 + win_h))
            front.add("trim", _bx(0.0, 0.04, -W / 2, W / 2, fz - 0.2, fz + sill_z - st.frame_t))
    else:
        grid = _Acc() if band else front
        for f, fz in enumerate(floors):
            for j, yc in enumerate(cols):
                if (f, j) in balconies:
                    _balcony(rng, grid, st, yc, fz, win_w, bal_w, bal_d, rail_style)
                else:
                    _window(rng, grid, st, yc, fz + sill_z, win_w, win_h)
            if not modern and f > 0 and rng.random() < 0.8:  # string course at the floor level
                grid.add("trim", _bx(0.0, 0.04, -W / 2, W / 2, fz - 0.08, fz + 0.08))
        if band:
            band_d = uniform(extra, (1.0, FRONT_PROTRUSION_MAX - 0.05))
            inset = uniform(extra, (0.0, margin * 0.6))
            door_w = min(pitch * uniform(extra, (0.6, 0.85)), 2.8, pitch - 0.2)
            door_h = min(uniform(extra, (2.1, 2.4)), floor_h - 0.5)
            for fz in floors:
                for yc in cols:
                    _window(extra, front, st, yc, fz + 0.05, door_w, door_h, door=True)
                _balcony_band(front, -W / 2 + inset, W / 2 - inset, fz, band_d, band_rail)

    if shop_front:
        _shop_ground_floor(rng, front, st, W, gf_h)
    else:
        _plain_ground_floor(rng, front, st, cols, gf_h, win_w, min(win_h, gf_h - 1.6), W)

    # Cornice (and a smaller step below it), roof parapet, drainpipe.
    cd, ch = uniform(rng, (0.15, 0.45)), uniform(rng, (0.25, 0.5))
    front.add("trim", _bx(0.0, cd, -W / 2, W / 2, H - ch, H))
    front.add("trim", _bx(0.0, cd * 0.5, -W / 2, W / 2, H - ch - 0.15, H - ch))
    if rng.random() < 0.6:
        yp = (-1 if rng.random() < 0.5 else 1) * (W / 2 - 0.15)
        front.add("metal", g.transform(g.cylinder(0.05, H - ch, 8), (0.09, yp, 0.0)))

    body.place(front, np.eye(3), (D / 2, 0.0, 0.0))
    lh = uniform(rng, (0.0, ROOF_LEDGE_MAX - 0.1))
    if lh > 0.1:
        t = 0.25
        body.add("trim", _bx(D / 2 - t, D / 2 + 0.02, -hw, hw, H, H + lh))
        body.add("trim", _bx(-D / 2, -D / 2 + t, -hw, hw, H, H + lh))
        body.add("trim", _bx(-D / 2 + t, D / 2 - t, hw - t, hw, H, H + lh))
        body.add("trim", _bx(-D / 2 + t, D / 2 - t, -hw, -hw + t, H, H + lh))

    # Side walls (+-y): plainer windows (no sills, shallow frames) or a blank firewall.
    side_st = _WindowStyle(st.frame_t, min(st.frame_d, SIDE_INSET - 0.015), False, False, 0.0, False, st.curtain_p)
    for sign in (1, -1):
        if rng.random() > 0.75 or D < 4.0:
            continue
        side = _Acc()
        s_margin = uniform(rng, (1.0, 2.0))
        n_s = max(1, int((D - 2 * s_margin) // uniform(rng, (2.5, 3.5))))
        s_pitch = (D - 2 * s_margin) / n_s
        sw = min(win_w, s_pitch * 0.6)
        for fz in floors:
            for i in range(n_s):
                _window(rng, side, side_st, -D / 2 + s_margin + (i + 0.5) * s_pitch, fz + sill_z, sw, win_h)
        body.place(side, g.rot_z(sign * np.pi / 2), (0.0, sign * hw, 0.0))

    return {key: Part(g.merge(meshes), mats[key])
            for key, meshes in body.meshes.items()}


def _balcony(rng: np.random.Generator, acc: _Acc, st: _WindowStyle, yc: float, fz: float, win_w: float,
             bal_w: float, bal_d: float, rail_style: int) -> None:
    """A balcony door with a slab and a railing in front of it (wall-local coordinates)."""
    _window(rng, acc, st, yc, fz + 0.05, win_w, 2.25, door=True)
    y0, y1 = yc - bal_w / 2, yc + bal_w / 2
    acc.add("trim", _bx(0.0, bal_d, y0, y1, fz - 0.16, fz))
    rh, t = 1.0, 0.05
    if rail_style == 0:  # solid parapet
        acc.add("trim", _bx(bal_d - t, bal_d, y0, y1, fz, fz + rh))
        acc.add("trim", _bx(0.0, bal_d - t, y0, y0 + t, fz, fz + rh))
        acc.add("trim", _bx(0.0, bal_d - t, y1 - t, y1, fz, fz + rh))
        return
    acc.add("railing", _bx(0.0, bal_d, y0, y0 + t, fz + rh - 0.04, fz + rh))
    acc.add("railing", _bx(0.0, bal_d, y1 - t, y1, fz + rh - 0.04, fz + rh))
    acc.add("railing", _bx(bal_d - t, bal_d, y0, y1, fz + rh - 0.04, fz + rh))
    if rail_style == 1:  # glass panels under a handrail
        acc.add("railing_glass", _bx(bal_d - 0.03, bal_d - 0.02, y0 + t, y1 - t, fz + 0.05, fz + rh - 0.04))
        acc.add("railing_glass", _bx(0.0, bal_d - t, y0 + 0.02, y0 + 0.03, fz + 0.05, fz + rh - 0.04))
        acc.add("railing_glass", _bx(0.0, bal_d - t, y1 - 0.03, y1 - 0.02, fz + 0.05, fz + rh - 0.04))
        return
    n = max(2, int(bal_w / 0.14))
    for i in range(n + 1):  # bars
        yb = y0 + t / 2 + i * (bal_w - t) / n
        acc.add("railing", _bx(bal_d - 0.035, bal_d - 0.015, yb - 0.01, yb + 0.01, fz, fz + rh - 0.04))
    for x in np.linspace(0.1, bal_d - 0.15, max(1, int(bal_d / 0.25))):
        for yb in (y0 + t / 2, y1 - t / 2):
            acc.add("railing", _bx(x - 0.01, x + 0.01, yb - 0.01, yb + 0.01, fz, fz + rh - 0.04))


def _balcony_band(acc: _Acc, y0: float, y1: float, fz: float, bal_d: float, rail: int) -> None:
    """A balcony along a whole floor from ``y0`` to ``y1`` (wall-local coordinates): a slab, a railing across its
    front and at both ends: a solid parapet (``rail`` 0), glass panels under a handrail (1) or a handrail and two
    rails on posts (2)."""
    acc.add("trim", _bx(0.0, bal_d, y0, y1, fz - 0.18, fz))
    rh, t = 1.0, 0.05
    if rail == 0:
        acc.add("trim", _bx(bal_d - 0.08, bal_d, y0, y1, fz, fz + rh))
        acc.add("trim", _bx(0.0, bal_d - 0.08, y0, y0 + 0.08, fz, fz + rh))
        acc.add("trim", _bx(0.0, bal_d - 0.08, y1 - 0.08, y1, fz, fz + rh))
        return
    acc.add("railing", _bx(bal_d - t, bal_d, y0, y1, fz + rh - 0.04, fz + rh))
    acc.add("railing", _bx(0.0, bal_d - t, y0, y0 + t, fz + rh - 0.04, fz + rh))
    acc.add("railing", _bx(0.0, bal_d - t, y1 - t, y1, fz + rh - 0.04, fz + rh))
    if rail == 1:
        acc.add("railing_glass", _bx(bal_d - 0.03, bal_d - 0.02, y0 + t, y1 - t, fz + 0.05, fz + rh - 0.04))
        acc.add("railing_glass", _bx(0.0, bal_d - t, y0 + 0.02, y0 + 0.03, fz + 0.05, fz + rh - 0.04))
        acc.add("railing_glass", _bx(0.0, bal_d - t, y1 - 0.03, y1 - 0.02, fz + 0.05, fz + rh - 0.04))
        return
    for z in (fz + 0.35, fz + 0.65):  # two rails below the handrail
        acc.add("railing", _bx(bal_d - 0.035, bal_d - 0.015, y0, y1, z - 0.015, z + 0.015))
    n = max(1, int((y1 - y0) // 1.4))
    for i in range(n + 1):  # posts
        yb = y0 + t / 2 + i * (y1 - y0 - t) / n
        acc.add("railing", _bx(bal_d - 0.04, bal_d - 0.01, yb - 0.02, yb + 0.02, fz, fz + rh - 0.04))


def _door(rng: np.random.Generator, acc: _Acc, st: _WindowStyle, yc: float, dw: float, dh: float,
          top: float) -> None:
    """An entrance door with a frame, a step and (room permitting) a glass transom."""
    acc.add("door", _bx(0.0, 0.04, yc - dw / 2, yc + dw / 2, 0.0, dh))
    for sy in ((-1, 1) if dw > 1.3 else (0,)):  # raised panels on each leaf
        c = yc + sy * dw / 4
        pw = dw / 2 - 0.2 if dw > 1.3 else dw - 0.3
        acc.add("door", _bx(0.04, 0.06, c - pw / 2, c + pw / 2, 0.3, dh * 0.45))
        acc.add("door", _bx(0.04, 0.06, c - pw / 2, c + pw / 2, dh * 0.52, dh - 0.2))
    t = st.frame_t + 0.03
    if top - dh > 0.55:
        acc.add("glass", _pane(yc - dw / 2, yc + dw / 2, dh + t, dh + 0.45))
        acc.add("frame", _ring(yc - dw / 2, yc + dw / 2, 0.0, dh + 0.45, t, 0.12, bottom=False))
        acc.add("frame", _bx(0.0, 0.1, yc - dw / 2, yc + dw / 2, dh, dh + t))
    else:
        acc.add("frame", _ring(yc - dw / 2, yc + dw / 2, 0.0, dh, t, 0.12, bottom=False))
    acc.add("plinth", _bx(0.0, 0.35, yc - dw / 2 - 0.25, yc + dw / 2 + 0.25, 0.0, 0.14))


def _plain_ground_floor(rng: np.random.Generator, acc: _Acc, st: _WindowStyle, cols: list[float], gf_h: float,
                        win_w: float, win_h: float, W: float) -> None:
    """Ground floor of a residential building: a stone plinth, windows and one entrance door."""
    j_door = int(rng.integers(len(cols)))
    dw = uniform(rng, (1.1, 1.7))
    dh = uniform(rng, (2.2, 2.5))
    plinth_h = uniform(rng, (0.4, 0.9))
    door_y = cols[j_door]
    edges = [-W / 2, door_y - dw / 2 - st.frame_t - 0.03, door_y + dw / 2 + st.frame_t + 0.03, W / 2]
    for a, b in ((edges[0], edges[1]), (edges[2], edges[3])):
        if b - a > 0.05:
            acc.add("plinth", _bx(0.0, 0.04, a, b, 0.0, plinth_h))
    _door(rng, acc, st, door_y, dw, dh, gf_h - 0.2)
    z0 = max(plinth_h + 0.3, gf_h - 0.5 - win_h)
    for j, yc in enumerate(cols):
        if j != j_door and gf_h - 0.4 - z0 > 0.6:
            _window(rng, acc, st, yc, z0, win_w, min(win_h, gf_h - 0.4 - z0))


def _shop_ground_floor(rng: np.random.Generator, acc: _Acc, st: _WindowStyle, W: float, gf_h: float) -> None:
    """Ground floor of shops: piers, display windows on stall risers, glass shop doors, sign bands with
    lettering, awnings; the residents' door at one end."""
    pier = uniform(rng, (0.35, 0.7))
    door_end = 1 if rng.random() < 0.5 else -1
    entrance_w = 1.9 if W > 8 else 0.0
    y0, y1 = -W / 2 + pier, W / 2 - pier
    if entrance_w:
        if door_end > 0:
            _door(rng, acc, st, y1 - entrance_w / 2, 1.2, uniform(rng, (2.2, 2.5)), gf_h - 0.3)
            y1 -= entrance_w + pier
        else:
            _door(rng, acc, st, y0 + entrance_w / 2, 1.2, uniform(rng, (2.2, 2.5)), gf_h - 0.3)
            y0 += entrance_w + pier
    n_units = int(np.clip(round((y1 - y0) / uniform(rng, (5.0, 9.0))), 1, 3))
    unit_w = (y1 - y0 - (n_units - 1) * pier) / n_units
    band_h = uniform(rng, (0.5, 0.85))
    band_d = uniform(rng, (0.1, 0.2))
    top = gf_h - band_h - 0.35  # top of the display windows
    for u in range(n_units):
        a = y0 + u * (unit_w + pier)
        b = a + unit_w
        # Sign band across the unit with a row of "letters".
        bz0, bz1 = gf_h - band_h - 0.2, gf_h - 0.2
        acc.add("sign" if u % 2 == 0 else "sign2", _bx(0.0, band_d, a, b, bz0, bz1))
        n_letters = int(rng.integers(4, 12))
        lh = band_h * uniform(rng, (0.4, 0.6))
        lw = min(lh * 0.7, unit_w * 0.7 / n_letters)
        start = (a + b) / 2 - n_letters * lw * 1.25 / 2
        for i in range(n_letters):
            if rng.random() < 0.12:  # a space between words
                continue
            ly = start + i * lw * 1.25
            acc.add("lettering", _bx(band_d, band_d + 0.02, ly, ly + lw * rng.uniform(0.6, 1.0),
                                     (bz0 + bz1) / 2 - lh / 2, (bz0 + bz1) / 2 + lh / 2))
        # Shop door at one end of the unit, display window over the rest.
        dw = min(uniform(rng, (1.0, 1.3)), unit_w * 0.4)
        door_left = rng.random() < 0.5
        da, db = (a, a + dw) if door_left else (b - dw, b)
        wa, wb = (db + 0.1, b) if door_left else (a, da - 0.1)
        t = 0.07
        acc.add("shop_glass", _pane(da + t, db - t, 0.02, 2.3))
        acc.add("shop_frame", _ring(da + t, db - t, 0.02, 2.3, t, 0.08, bottom=False))
        if top - 2.3 > 0.3:
            acc.add("shop_glass", _pane(da + t, db - t, 2.3 + t, top))
            acc.add("shop_frame", _ring(da + t, db - t, 2.3 + t, top, t, 0.08))
        riser = uniform(rng, (0.25, 0.6))
        if wb - wa > 0.6:
            acc.add("shop_frame", _bx(0.0, 0.06, wa, wb, 0.0, riser))
            acc.add("shop_glass", _pane(wa + t, wb - t, riser + t, top))
            acc.add("shop_frame", _ring(wa + t, wb - t, riser + t, top, t, 0.08))
            n_m = int((wb - wa) // uniform(rng, (1.5, 2.5)))
            for i in range(1, n_m + 1):
                ym = wa + i * (wb - wa) / (n_m + 1)
                acc.add("shop_frame", _bx(0.0, 0.07, ym - 0.03, ym + 0.03, riser, top))
        if rng.random() < 0.4 and top > HEADROOM + 0.6:  # awning: a sloping cloth with a valance
            ad = uniform(rng, (0.9, FRONT_PROTRUSION_MAX - 0.05))
            za = top + 0.1
            drop = min(ad * uniform(rng, (0.3, 0.6)), za - 0.25 - HEADROOM)
            zf = za - drop
            v = [(0.0, a, za), (0.0, b, za), (ad, b, zf), (ad, a, zf), (ad, a, zf - 0.25), (ad, b, zf - 0.25)]
            acc.add("awning", _quads(v, [(0, 1, 2, 3), (3, 2, 5, 4)]))
            acc.add("awning", Mesh(np.asarray([v[0], v[3], v[4], v[1], v[2], v[5]], dtype=np.float32),
                                   np.asarray([(0, 1, 2), (3, 5, 4)], dtype=np.int32)))


def sample_building(rng: np.random.Generator, k: MaterialKnobs, width: float, depth: float, height: float,
                    shop_front: bool | None = None, balcony_bands: float = 0.0, lit_shops: float = 0.0) -> list[Part]:
    """A building's parts (see :func:`sample_building_parts`; the street facade is its ``+x`` face)."""
    return list(sample_building_parts(rng, k, width, depth, height, shop_front, balcony_bands, lit_shops).values())
