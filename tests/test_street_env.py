"""Light and weather of the street family (no Blender), and one tiny real render of brick and bump materials."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from scenes.randomization import PostKnobs
from scenes.spec import Material, to_jsonable
from scenes.street_assets.environment import (
    ConditionWeights,
    EnvironmentKnobs,
    puddle_material,
    sample_environment,
    wet,
)

ROOT = Path(__file__).resolve().parents[1]


def _only(condition: str, **kw: object) -> EnvironmentKnobs:
    weights = {c: 0.0 for c in ("clear", "overcast", "dusk", "rain")} | {condition: 1.0}
    return EnvironmentKnobs(weights=ConditionWeights(**weights), **kw)  # type: ignore[arg-type]


def _euler_xyz(rot: tuple[float, float, float]) -> np.ndarray:
    x, y, z = rot
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ ry @ rx  # Blender's XYZ Euler


def test_environment_is_deterministic_per_seed_and_covers_every_condition():
    k = EnvironmentKnobs()
    a = [to_jsonable(sample_environment(np.random.default_rng(s), k)) for s in range(40)]
    b = [to_jsonable(sample_environment(np.random.default_rng(s), k)) for s in range(40)]
    assert a == b
    assert a[0] != a[1]
    seen = {e["condition"] for e in a}
    assert seen == {"clear", "overcast", "dusk", "rain"}


def test_sun_follows_the_time_of_day_and_shines_down_along_its_direction():
    noon = sample_environment(np.random.default_rng(0), _only("clear", hours=(12.0, 12.0),
                                                                  noon_elevation_deg=(60.0, 60.0), fog_prob=0.0))
    morning = sample_environment(np.random.default_rng(0), _only("clear", hours=(7.5, 7.5),
                                                                     noon_elevation_deg=(60.0, 60.0), fog_prob=0.0))
    assert np.degrees(noon.sun_elevation) == pytest.approx(60.0)
    assert 10 < np.degrees(morning.sun_elevation) < 30
    assert morning.sun_kelvin < noon.sun_kelvin - 1000  # low sun: warm
    assert morning.sun_energy < noon.sun_energy  # through more air
    # 4.5 h before noon the sun stands 67.5 degrees of azimuth east of where it is at noon (same bearing).
    assert (noon.sun_azimuth - morning.sun_azimuth) % (2 * np.pi) == pytest.approx(np.pi * 4.5 / 12)
    (sun,) = noon.lights(np.zeros(3))
    assert sun.type == "SUN" and sun.energy == noon.sun_energy and sun.angle == pytest.approx(np.radians(2))
    shine = _euler_xyz(sun.rotation) @ np.array([0.0, 0.0, -1.0])  # a Blender light shines along local -Z
    assert np.allclose(shine, -noon.sun_direction(), atol=1e-9)
    assert noon.world().strength == noon.sky_strength


def test_overcast_has_no_strong_sun_and_a_bright_grey_uniform_sky():
    k = _only("overcast")
    for s in range(30):
        e = sample_environment(np.random.default_rng(s), k)
        assert e.sun_energy <= k.overcast_sun_energy[1]
        assert e.sun_energy == 0 or np.degrees(e.sun_angle) >= 20  # a blurred sun: soft shadows
        for c in (e.sky_horizon, e.sky_zenith):
            assert max(c) - min(c) < 0.06 and min(c) > 0.4  # grey, bright
        assert e.sky_strength >= 1.2 and not e.street_lights_on and e.wetness == 0


def test_dusk_switches_street_lights_on_under_a_dark_blue_orange_sky():
    k = _only("dusk")
    clear = _only("clear")
    for s in range(20):
        e = sample_environment(np.random.default_rng(s), k)
        assert e.street_lights_on and e.street_light_energy > 0
        assert e.sky_horizon[0] > e.sky_horizon[2] and e.sky_zenith[2] > e.sky_zenith[0]  # orange low, blue high
        assert e.sky_strength < min(clear.sky_strength)
        assert e.sun_kelvin < 2700 and (e.sun_energy == 0 or e.sun_energy <= k.dusk_sun_energy[1])
        if e.sun_elevation <= 0:
            assert e.lights() == []
        lamp = e.lamp_material()
        assert lamp.shader == "emission" and lamp.color == e.street_light_color
        lo, hi = k.street_light_glow
        assert lamp.emission == e.street_light_glow and lo <= lamp.emission <= hi
        light = e.street_light((1.0, 2.0, 5.5))
        assert light.type == "POINT" and light.location == (1.0, 2.0, 5.5) and light.energy == e.street_light_energy
        fx = e.post(np.random.default_rng(s), PostKnobs(exposure=(0.0, 0.0), noise_std=(0.0, 0.0)))
        assert fx.exposure == e.exposure > 0 and fx.noise_std == e.extra_noise > 0  # the camera brightens up
    day = sample_environment(np.random.default_rng(0), clear)
    assert not day.street_lights_on and day.lamp_material().shader == "principled"


def test_rain_wets_surfaces_and_lays_puddles():
    k = _only("rain")
    for s in range(20):
        e = sample_environment(np.random.default_rng(s), k)
        assert k.wetness[0] <= e.wetness <= k.wetness[1] and k.puddles[0] <= e.puddles <= k.puddles[1]
        assert e.fog_density > 0  # rain is always at least hazy
        assert e.sun_energy <= k.overcast_sun_energy[1]
    asphalt = Material((0.06, 0.06, 0.065), roughness=0.8, texture="noise", color2=(0.03, 0.03, 0.03), bump=0.6)
    soaked = wet(asphalt, 1.0)
    assert soaked.roughness < 0.1 and soaked.color[0] < asphalt.color[0] * 0.6 and soaked.color2 is not None
    assert soaked.color2[0] < asphalt.color2[0] and soaked.bump < asphalt.bump
    half = wet(asphalt, 0.5)
    assert soaked.roughness < half.roughness < asphalt.roughness
    assert wet(asphalt, 0.0) is asphalt and asphalt.roughness == 0.8  # the input is not changed
    puddle = puddle_material(asphalt)
    assert puddle.roughness < 0.05 and puddle.color[0] < asphalt.color[0]


def test_fog_and_haze_shares_and_the_fog_reaches_each_view():
    k = EnvironmentKnobs(fog_prob=0.2, haze_prob=0.0, weights=ConditionWeights(rain=0.0))
    envs = [sample_environment(np.random.default_rng(s), k) for s in range(400)]
    foggy = [e for e in envs if e.fog_density > 0]
    assert 0.14 < len(foggy) / len(envs) < 0.26
    assert all(k.fog_density[0] <= e.fog_density <= k.fog_density[1] for e in foggy)
    assert all(0 < c <= 0.85 for e in envs for c in e.fog_color)
    e = foggy[0]
    fx = e.post(np.random.default_rng(0), PostKnobs())
    assert fx.fog_density == e.fog_density and fx.fog_color == e.fog_color
    assert sample_environment(np.random.default_rng(1), EnvironmentKnobs(fog_prob=0.0, haze_prob=0.0,
                                                                         weights=ConditionWeights(rain=0.0))
                              ).fog_density == 0
    with pytest.raises(ValueError, match="weight"):
        sample_environment(np.random.default_rng(0), EnvironmentKnobs(weights=ConditionWeights(
            clear=0, overcast=0, dusk=0, rain=0)))


# --------------------------------------------------------------------------------------- real Blender render
_RENDER = textwrap.dedent("""
    import os, sys, tempfile
    import numpy as np
    from scenes import geometry as g
    from scenes.camera import look_at
    from scenes.spec import Camera, ClassDef, Light, Material, Part, PostFX, SceneObject, SceneSpec, World
    from synth.blender import BlenderRenderer
    from synth.config import OutputSettings, RenderSettings

    settings = RenderSettings(resolution=64, views=1, samples=16, noise_threshold=0, denoise=False)
    r = BlenderRenderer(settings, OutputSettings(), tempfile.mkdtemp(), threads=2)
    def spec(m):
        loc = np.array([2.2, -2.6, 1.6])
        cam = Camera(tuple(loc), look_at(loc, np.array([0, 0, 0.5])), fov=0.7)
        sun = Light("SUN", (5, -5, 8), (0.7, 0.0, 0.6), 4.0)
        return SceneSpec("t", [ClassDef(0, "bg", (0, 0, 0)), ClassDef(1, "c", (1, 1, 1), True)], 0,
                         [SceneObject("cube", 1, [Part(g.box(1.5, 1.5, 1.5), m)])], [sun],
                         World((0.4, 0.45, 0.5), (0.2, 0.3, 0.5), 1.0), [cam], [PostFX()], film="agx")
    red, mortar = (0.45, 0.18, 0.1), (0.6, 0.6, 0.58)
    mats = {"plain": Material(red, roughness=0.8), "plain2": Material(red, roughness=0.8),
            "brick": Material(red, roughness=0.8, texture="brick", color2=mortar, texture_scale=4.4),
            "brick_bump": Material(red, roughness=0.8, texture="brick", color2=mortar, texture_scale=4.4, bump=1.0),
            "grain": Material(red, roughness=0.8, bump=1.0, texture_scale=1.0)}
    out = {}
    for k, m in mats.items():
        views, _ = r.render(spec(m))
        out[k] = views[0].rgb
        out[k + "_index"] = views[0].index
    np.savez(sys.argv[1], **out)
    sys.stdout.flush()
    os._exit(0)
""")


@pytest.mark.render
def test_brick_and_bump_materials_render(tmp_path: Path):
    out = tmp_path / "cube.npz"
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _RENDER, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    d = np.load(out)
    cube = d["plain_index"] == 1
    assert cube.mean() > 0.2 and all(np.array_equal(d[k + "_index"], d["plain_index"])
                                     for k in ("brick", "brick_bump", "grain"))
    def mad(a: str, b: str) -> float:
        return float(np.abs(d[a].astype(int) - d[b].astype(int))[cube].mean())

    # Two renders of one scene in one session can differ slightly (seen: 0-1.4 grey levels mean on the cube),
    # so each material's effect is measured against that floor.
    floor = mad("plain2", "plain")
    assert floor < 2.0
    assert mad("brick", "plain") > max(5.0, 4 * floor)  # mortar lines across the faces
    bricks = d["brick"][cube].astype(int).sum(-1)
    assert np.percentile(bricks, 95) - np.percentile(bricks, 5) > 60  # light mortar between red bricks
    assert mad("brick_bump", "brick") > max(2.0, 2 * floor)  # the joints' relief shades them

    def fine_detail(k: str) -> float:  # mean high-pass magnitude inside the cube's faces
        grey = d[k].astype(float).sum(-1)
        inner = ndimage.binary_erosion(cube, iterations=3)
        return float(np.abs(grey - ndimage.uniform_filter(grey, 3))[inner].mean())

    # Bump without a colour texture: a fine grain of its own (the 16-sample noise alone gives the floor).
    assert abs(fine_detail("plain2") - fine_detail("plain")) < 0.02 * fine_detail("plain")
    assert fine_detail("grain") > 1.05 * fine_detail("plain")
