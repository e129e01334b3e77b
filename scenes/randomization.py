"""Domain-randomisation knobs (typed config) and the samplers that draw from them.

Each scene family starts from its own defaults (``SceneFamily.randomization``) which the user's
``scene.randomization`` section overrides key by key.
"""

from __future__ import annotations

import colorsys
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, model_validator

from scenes.spec import FloatArray, Light, LightType, Material, PostFX, TextureKind, Vec3, World, vec3
from segfactory.config import StrictModel


def _ordered(v: tuple[float, float]) -> tuple[float, float]:
    if v[0] > v[1]:
        raise ValueError(f"range must be [low, high] with low <= high, got {list(v)}")
    return v


def _ordered_nonneg(v: tuple[float, float]) -> tuple[float, float]:
    if v[0] < 0:
        raise ValueError(f"range must not be negative, got {list(v)}")
    return _ordered(v)


Range = Annotated[tuple[float, float], AfterValidator(_ordered)]
PosRange = Annotated[tuple[float, float], AfterValidator(_ordered_nonneg)]
CountRange = Annotated[tuple[int, int], AfterValidator(_ordered_nonneg)]


def uniform(rng: np.random.Generator, r: tuple[float, float]) -> float:
    return float(rng.uniform(r[0], r[1])) if r[1] > r[0] else float(r[0])


def integers(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


class MaterialKnobs(StrictModel):
    texture_prob: float = Field(0.6, ge=0, le=1, description="share of materials with a procedural texture")
    textures: list[TextureKind] = Field(default_factory=lambda: list[TextureKind](["noise", "voronoi"]))
    texture_scale: PosRange = (2.0, 12.0)
    roughness: Range = (0.25, 0.9)
    metallic_prob: float = Field(0.1, ge=0, le=1)
    hue_jitter: float = Field(0.04, ge=0, le=0.5, description="hue shift around each class's base color")
    saturation_jitter: float = Field(0.15, ge=0, le=1)
    value_jitter: float = Field(0.2, ge=0, le=1)


class LightKnobs(StrictModel):
    count: CountRange = (1, 3)
    types: list[LightType] = Field(default_factory=lambda: list[LightType](["SUN", "POINT", "AREA"]))
    sun_energy: PosRange = (2.0, 6.0)
    point_energy: PosRange = (200.0, 2000.0)
    color_temperature: PosRange = (3500.0, 8000.0)
    distance: PosRange = (3.0, 10.0)


class WorldKnobs(StrictModel):
    strength: PosRange = (0.3, 1.2)
    horizon_value: Range = (0.5, 0.95)
    zenith_value: Range = (0.3, 0.8)
    hue: Range = (0.55, 0.62)
    saturation: Range = (0.1, 0.5)


class CameraKnobs(StrictModel):
    fov_deg: PosRange = (45.0, 75.0)
    distance: PosRange = (1.0, 3.0)
    elevation_deg: Range = (15.0, 60.0)
    look_at_jitter: float = Field(0.1, ge=0, description="metres of random offset of the look-at point")
    min_visible_objects: int = Field(1, ge=0, description="labeled objects whose centre must be in frame")
    max_tries: int = Field(50, ge=1)


class PostKnobs(StrictModel):
    """Per-frame image effects (see :class:`~scenes.spec.PostFX`). A range whose ends are equal is a fixed
    value and draws nothing from the generator."""

    exposure: Range = (-0.3, 0.3)
    blur_sigma: PosRange = (0.0, 0.5)
    noise_std: PosRange = (0.0, 0.01)
    poisson_peak: PosRange = (0.0, 0.0)
    gamma: PosRange = (1.0, 1.0)
    illumination: PosRange = Field((0.0, 0.0), description="amplitude of smooth uneven illumination (0.2 = +-20 %)")
    vignetting: PosRange = Field((0.0, 0.0), description="share of light lost in the image corners, 0..1")
    background: PosRange = Field((0.0, 0.0), description="background glow, fraction of full scale")
    camera_bits: int = Field(0, ge=0, le=16, description="ADC bits of a simulated camera (12: counts 0..4095, "
                             "saturating at 4095); 0 = the output's full 8/16-bit range")
    camera_offset: CountRange = Field((0, 0), description="camera offset added to the counts (e.g. 100, or "
                                      "32768 for 12-bit data in a signed-offset 16-bit container)")
    # Street cameras (all off by default: a family that leaves them draws nothing more from the generator).
    white_balance: Range = Field((0.0, 0.0), description="white-balance error a: red gain 1 + a, blue 1 - a "
                                 "(> 0 warm, < 0 cool; 0.1 is a clearly tinted camera)")
    tint: Range = Field((0.0, 0.0), description="green-magenta error t: green gain 1 + t")
    motion_blur_prob: float = Field(0.0, ge=0, le=1, description="share of frames with motion blur")
    motion_blur: PosRange = Field((0.0, 0.0), description="streak length in px of a blurred frame, at a random "
                                  "angle (mostly horizontal: a pan or a moving car)")
    chromatic_aberration: PosRange = Field((0.0, 0.0), description="lateral chromatic aberration: px that red and "
                                           "blue are displaced at the image corners (1-2 px: a cheap lens)")
    lens_k1: Range = Field((0.0, 0.0), description="radial lens distortion k1 per frame: < 0 barrel (dashcams, "
                           "-0.1 to -0.25), > 0 pincushion; warps image and labels alike")

    @model_validator(mode="after")
    def _vignetting_at_most_one(self) -> PostKnobs:
        if self.vignetting[1] > 1:
            raise ValueError(f"vignetting must be within 0..1, got {list(self.vignetting)}")
        if max(abs(v) for v in self.lens_k1) > 0.3:
            raise ValueError(f"lens_k1 must be within -0.3..0.3, got {list(self.lens_k1)}")
        if max(abs(v) for v in (*self.white_balance, *self.tint)) > 0.5:
            raise ValueError(f"white_balance and tint must be within -0.5..0.5, got {list(self.white_balance)}, "
                             f"{list(self.tint)}")
        return self

    def max_value(self) -> int:
        """The largest integer a frame can hold (offset + ADC maximum), or 0 without a camera model."""
        return self.camera_offset[1] + 2**self.camera_bits - 1 if self.camera_bits else 0


class Randomization(StrictModel):
    """All domain-randomisation knobs of a scene family."""

    materials: MaterialKnobs = Field(default_factory=MaterialKnobs)
    lights: LightKnobs = Field(default_factory=LightKnobs)
    world: WorldKnobs = Field(default_factory=WorldKnobs)
    camera: CameraKnobs = Field(default_factory=CameraKnobs)
    post: PostKnobs = Field(default_factory=PostKnobs)


def jitter_color(rng: np.random.Generator, rgb: Vec3, k: MaterialKnobs) -> Vec3:
    """Randomise a base color in HSV space (linear RGB in, linear RGB out)."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + rng.uniform(-k.hue_jitter, k.hue_jitter)) % 1.0
    s = float(np.clip(s + rng.uniform(-k.saturation_jitter, k.saturation_jitter), 0, 1))
    v = float(np.clip(v * (1 + rng.uniform(-k.value_jitter, k.value_jitter)), 0.01, 1))
    return vec3(colorsys.hsv_to_rgb(h, s, v))


def sample_material(rng: np.random.Generator, base_rgb: Vec3, k: MaterialKnobs,
                    roughness: tuple[float, float] | None = None) -> Material:
    """A principled material around ``base_rgb``; with probability ``texture_prob`` a 2-color texture."""
    color = jitter_color(rng, base_rgb, k)
    tex: Literal["none"] | TextureKind = "none"
    color2 = None
    if k.textures and rng.random() < k.texture_prob:
        tex = k.textures[int(rng.choice(len(k.textures)))]  # the same draw as rng.choice(k.textures)
        color2 = jitter_color(rng, vec3(c * rng.uniform(0.5, 0.9) for c in color), k)
    return Material(
        color=color,
        roughness=uniform(rng, roughness or k.roughness),
        metallic=1.0 if rng.random() < k.metallic_prob else 0.0,
        texture=tex,
        color2=color2,
        texture_scale=uniform(rng, k.texture_scale),
        texture_w=float(rng.uniform(0, 100)),
    )


def srgb8(r: int, g: int, b: int) -> Vec3:
    """An 8-bit sRGB colour as the linear RGB that materials take."""
    c = np.array([r, g, b], dtype=np.float64) / 255.0
    return vec3(np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4))


def kelvin_to_rgb(kelvin: float) -> Vec3:
    """Approximate black-body color (Tanner Helland's fit), normalised to max 1."""
    t = kelvin / 100.0
    r = 255.0 if t <= 66 else 329.7 * (t - 60) ** -0.1332
    g = 99.47 * np.log(t) - 161.1 if t <= 66 else 288.1 * (t - 60) ** -0.0755
    b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5 * np.log(t - 10) - 305.0)
    rgb = np.clip(np.array([r, g, b]) / 255.0, 0, 1)
    return vec3(rgb / rgb.max())


def sample_lights(rng: np.random.Generator, k: LightKnobs, center: FloatArray, min_height: float = 1.0
                  ) -> list[Light]:
    """Lights on a hemisphere around ``center`` (suns get a random direction)."""
    lights = []
    for _ in range(integers(rng, k.count)):
        ltype = k.types[int(rng.choice(len(k.types)))]  # the same draw as rng.choice(k.types)
        az = rng.uniform(0, 2 * np.pi)
        el = rng.uniform(np.radians(25), np.radians(80))
        d = uniform(rng, k.distance)
        loc = center + d * np.array([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)])
        loc[2] = max(loc[2], center[2] + min_height)
        # Point/area lights face the centre; suns only need a direction.
        rot = (float(np.pi / 2 - el), 0.0, float(az + np.pi / 2))
        energy = uniform(rng, k.sun_energy) if ltype == "SUN" else uniform(rng, k.point_energy) * (d / 5.0) ** 2
        lights.append(Light(ltype, vec3(loc), rot, energy,
                            kelvin_to_rgb(uniform(rng, k.color_temperature)), size=float(rng.uniform(0.2, 2.0))))
    return lights


def sample_world(rng: np.random.Generator, k: WorldKnobs) -> World:
    hue = uniform(rng, k.hue)
    sat = uniform(rng, k.saturation)
    horizon = colorsys.hsv_to_rgb(hue, sat * 0.5, uniform(rng, k.horizon_value))
    zenith = colorsys.hsv_to_rgb(hue, sat, uniform(rng, k.zenith_value))
    return World(horizon, zenith, uniform(rng, k.strength))


def sample_post(rng: np.random.Generator, k: PostKnobs, linear: bool = False, gain: float = 1.0) -> PostFX:
    """One frame's effects. Knobs left at a fixed value draw nothing, so families that do not use the camera
    knobs sample the same values as before they existed."""
    fx = PostFX(exposure=uniform(rng, k.exposure), blur_sigma=uniform(rng, k.blur_sigma),
                noise_std=uniform(rng, k.noise_std), poisson_peak=uniform(rng, k.poisson_peak),
                gamma=uniform(rng, k.gamma), linear=linear, gain=gain)
    fx.illumination = uniform(rng, k.illumination)
    fx.vignetting = uniform(rng, k.vignetting)
    fx.background = uniform(rng, k.background)
    fx.camera_bits = k.camera_bits
    fx.camera_offset = integers(rng, k.camera_offset) if k.camera_offset[1] > k.camera_offset[0] \
        else k.camera_offset[0]
    a, t = uniform(rng, k.white_balance), uniform(rng, k.tint)
    fx.white_balance = (1.0 + a, 1.0 + t, 1.0 - a)
    if k.motion_blur_prob > 0 and k.motion_blur[1] > 0 and rng.random() < k.motion_blur_prob:
        fx.motion_blur = uniform(rng, k.motion_blur)
        # Mostly horizontal (panning, a moving car), sometimes any direction (shake).
        fx.motion_angle = float(rng.normal(0.0, 0.15) if rng.random() < 0.7 else rng.uniform(0, np.pi))
    fx.chromatic_aberration = uniform(rng, k.chromatic_aberration)
    fx.lens_k1 = uniform(rng, k.lens_k1)
    return fx
