"""Light and weather of a ``street`` scene: sun over the day, overcast, dusk with street lights, rain, fog and haze.

:func:`sample_environment` draws one :class:`Environment` per scene from :class:`EnvironmentKnobs`. The scene
layout asks it for the sun (:meth:`Environment.lights`), the sky (:meth:`Environment.world`), street-lamp lights
and glowing lamp heads when ``street_lights_on`` (:meth:`Environment.street_light`,
:meth:`Environment.lamp_material`), wet road materials and puddles in rain (:func:`wet`, :func:`puddle_material`),
and each view's camera effects with the fog (:meth:`Environment.post`). Fog and haze are image effects on the
depth pass (``synth.postfx.fog``), not Blender volumes, which would cost minutes per frame on a CPU.

Plain NumPy and pydantic: nothing here imports Blender.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import Field

from scenes.randomization import CountRange, PosRange, PostKnobs, Range, integers, kelvin_to_rgb, sample_post, uniform
from scenes.spec import FloatArray, Light, Material, PostFX, Vec3, World, vec3
from segfactory.config import StrictModel

Condition = Literal["clear", "overcast", "dusk", "rain"]
CONDITIONS: tuple[Condition, ...] = ("clear", "overcast", "dusk", "rain")


class ConditionWeights(StrictModel):
    """Relative frequency of each sky condition (need not sum to 1; 0 switches one off)."""

    clear: float = Field(0.45, ge=0, description="sunny or fair: blue sky, sun anywhere from morning to evening")
    overcast: float = Field(0.25, ge=0, description="bright grey uniform sky, weak diffuse sun or none")
    dusk: float = Field(0.15, ge=0, description="dark blue-orange sky, low warm sun or none, street lights on")
    rain: float = Field(0.15, ge=0, description="grey sky, wet dark glossy road and sidewalks, puddles, haze")


class EnvironmentKnobs(StrictModel):
    """Light and weather of a street scene. Energies are Blender's: sun W/m2, lamps W (under the AgX view)."""

    weights: ConditionWeights = Field(default_factory=ConditionWeights)
    hours: Range = Field((7.0, 18.5), description="local solar time of clear/overcast/rain scenes (sunrise 6, "
                         "sunset 18): sets the sun's elevation and direction")
    noon_elevation_deg: Range = Field((35.0, 70.0), description="the sun's elevation at noon (latitude, season)")
    sun_energy: PosRange = Field((3.0, 5.5), description="clear-sky sun at high elevation (lower suns get less)")
    sky_strength: PosRange = Field((0.6, 1.4), description="clear-sky world strength")
    overcast_sky_strength: PosRange = Field((1.2, 2.2), description="overcast world strength (the sky lights all)")
    overcast_sun_prob: float = Field(0.5, ge=0, le=1, description="share of overcast scenes with a weak, blurred sun")
    overcast_sun_energy: PosRange = Field((0.2, 0.8), description="that sun's energy")
    dusk_sun_elevation_deg: Range = Field((-4.0, 5.0), description="sun elevation at dusk (below 0: no sun)")
    dusk_sun_energy: PosRange = Field((0.3, 1.2), description="dusk sun above the horizon")
    dusk_sky_strength: PosRange = Field((0.1, 0.3), description="dusk world strength")
    dusk_exposure: Range = Field((0.5, 1.2), description="stops a camera adds at dusk (auto exposure)")
    dusk_noise: PosRange = Field((0.004, 0.012), description="extra sensor noise at dusk (higher gain)")
    street_light_energy: PosRange = Field((250.0, 900.0), description="W of a street lamp's point light")
    street_light_kelvin: PosRange = Field((2100.0, 4200.0), description="lamp colour: sodium ~2100 K, LED ~4000 K")
    street_light_glow: PosRange = Field((15.0, 40.0), description="emission strength of a lit lamp head (its glass "
                                        "glows in the lamps' colour)")
    rain_street_lights_prob: float = Field(0.3, ge=0, le=1, description="share of rain scenes with lamps on")
    rain_sky_strength: PosRange = Field((0.6, 1.3), description="rain world strength")
    wetness: PosRange = Field((0.5, 1.0), description="how wet surfaces are in rain, 0..1 (see wet())")
    puddles: CountRange = Field((3, 10), description="puddles a rainy street gets")
    fog_prob: float = Field(0.05, ge=0, le=1, description="share of scenes with fog")
    fog_density: PosRange = Field((0.008, 0.03), description="fog extinction per metre (visibility 3/density: "
                                  "100-375 m)")
    haze_prob: float = Field(0.25, ge=0, le=1, description="share of the other scenes with haze (rain: always)")
    haze_density: PosRange = Field((0.0003, 0.0015), description="haze extinction per metre (visibility 2-10 km)")


@dataclass
class Environment:
    """One scene's light and weather.

    Attributes:
        condition: "clear", "overcast", "dusk" or "rain".
        hour: Local solar time the sun was placed for.
        sun_elevation: Radians above the horizon (may be negative: no sun).
        sun_azimuth: Radians, counter-clockwise from +x (the direction towards the sun).
        sun_energy: W/m2 (0: no sun light).
        sun_color: Linear RGB, from the colour temperature (``sun_kelvin``).
        sun_kelvin: Colour temperature of the sun.
        sun_angle: Angular diameter in radians (hazy/overcast suns cast soft shadows).
        sky_horizon, sky_zenith: Linear RGB of the sky gradient.
        sky_strength: World strength.
        wetness: 0 (dry) .. 1 (soaked): the layout wets road and sidewalks with :func:`wet`.
        puddles: How many puddles the layout lays on the road and sidewalks (:func:`puddle_material`).
        fog_density: Extinction per metre (0: clear air).
        fog_color: Display-referred RGB of fully fogged pixels.
        street_lights_on: The layout makes lamp heads glow and puts a light in each.
        street_light_energy: W per lamp.
        street_light_color: Linear RGB of the lamps: their point lights and their glowing heads alike.
        street_light_glow: Emission strength of a lit lamp head (:meth:`lamp_material`).
        exposure: Stops each view's camera adds (auto exposure at dusk).
        extra_noise: Sensor noise each view adds (fraction of full scale).
    """

    condition: Condition
    hour: float
    sun_elevation: float
    sun_azimuth: float
    sun_energy: float
    sun_color: Vec3
    sun_kelvin: float
    sun_angle: float
    sky_horizon: Vec3
    sky_zenith: Vec3
    sky_strength: float
    wetness: float = 0.0
    puddles: int = 0
    fog_density: float = 0.0
    fog_color: Vec3 = (0.75, 0.75, 0.75)
    street_lights_on: bool = False
    street_light_energy: float = 0.0
    street_light_color: Vec3 = (1.0, 0.8, 0.5)
    street_light_glow: float = 20.0
    exposure: float = 0.0
    extra_noise: float = 0.0

    def sun_direction(self) -> FloatArray:
        """(3,) unit vector from the scene towards the sun."""
        el, az = self.sun_elevation, self.sun_azimuth
        return np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])

    def lights(self, center: FloatArray | Vec3 = (0.0, 0.0, 0.0)) -> list[Light]:
        """The sun (none when it is below the horizon or off); the layout adds street lamps itself.

        Args:
            center: (3,) point the scene is around (a sun only needs a direction; it is placed above it).
        """
        if self.sun_energy <= 0 or self.sun_elevation <= 0:
            return []
        el, az = self.sun_elevation, self.sun_azimuth
        loc = np.asarray(center, dtype=np.float64) + 100.0 * self.sun_direction()
        # Blender lights shine along their local -Z: tilt it down to the elevation, then turn it to the azimuth.
        rot = (float(np.pi / 2 - el), 0.0, float(az + np.pi / 2))
        return [Light("SUN", vec3(loc), rot, self.sun_energy, self.sun_color, angle=self.sun_angle)]

    def world(self) -> World:
        """The sky: a vertical gradient from horizon to zenith."""
        return World(self.sky_horizon, self.sky_zenith, self.sky_strength)

    def street_light(self, location: FloatArray | Vec3) -> Light:
        """A street lamp's light at ``location`` (just below the lamp head, so the head does not shade it)."""
        return Light("POINT", vec3(location), energy=self.street_light_energy, color=self.street_light_color,
                     size=0.4)

    def lamp_material(self) -> Material:
        """A lamp head's glass: glowing in the lamps' colour (the colour of :meth:`street_light`) when the lights
        are on, else pale frosted plastic. The layout gives every street lamp of the scene this one material."""
        if self.street_lights_on:
            return Material(self.street_light_color, shader="emission", emission=self.street_light_glow)
        return Material((0.7, 0.7, 0.68), roughness=0.3)

    def post(self, rng: np.random.Generator, knobs: PostKnobs) -> PostFX:
        """One view's camera effects: ``knobs`` (:func:`~scenes.randomization.sample_post`) plus this
        environment's fog, and at dusk the camera's higher exposure and noise."""
        fx = sample_post(rng, knobs)
        fx.fog_density = self.fog_density
        fx.fog_color = self.fog_color
        fx.exposure += self.exposure
        fx.noise_std += self.extra_noise
        return fx


def wet(material: Material, wetness: float) -> Material:
    """``material`` wet by rain: darker (water fills the pores) and glossier; 0 leaves it as it is.

    At wetness 1 colours keep 55 % of their value, roughness goes to 0.08 and bumps are half filled.
    """
    w = float(np.clip(wetness, 0.0, 1.0))
    if w == 0:
        return material
    dark = 1.0 - 0.45 * w
    return replace(material, color=vec3(np.multiply(material.color, dark)),
                   color2=None if material.color2 is None else vec3(np.multiply(material.color2, dark)),
                   roughness=material.roughness * (1 - w) + 0.08 * w, bump=material.bump * (1 - 0.5 * w))


def puddle_material(base: Material) -> Material:
    """Standing water on ``base`` (the road's material): a dark, nearly mirror-smooth surface that reflects the
    sky and lights."""
    return Material(vec3(np.multiply(base.color, 0.35)), roughness=0.03)


def _sky(hue: float, sat: float, value: float) -> Vec3:
    return vec3(colorsys.hsv_to_rgb(hue % 1.0, sat, value))


def _fog_color(horizon: Vec3, zenith: Vec3, strength: float) -> Vec3:
    """Display-referred fog colour from the sky that lights it, mostly the (larger) upper sky; a 2.2 power stands in
    for the view transform."""
    lin = (0.35 * np.asarray(horizon) + 0.65 * np.asarray(zenith)) * strength
    return vec3(np.clip(lin, 0.0, None) ** (1 / 2.2) * 0.9 + 0.02)


def _clip_fog(c: Vec3) -> Vec3:
    return vec3(np.clip(c, 0.02, 0.85))


def sample_environment(rng: np.random.Generator, k: EnvironmentKnobs) -> Environment:
    """Draw one scene's light and weather.

    The sun follows the time of day: elevation ``noon * sin(pi * (hour - 6) / 12)``, azimuth swinging 180 degrees
    from sunrise to sunset around a random street bearing; colour temperature from about 2000 K at the horizon to
    5500-6000 K above 35 degrees, and less energy through more air at low elevations.
    """
    w = np.array([getattr(k.weights, c) for c in CONDITIONS], dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError("environment.weights: every condition has weight 0")
    condition: Condition = CONDITIONS[int(rng.choice(len(CONDITIONS), p=w / w.sum()))]
    bearing = float(rng.uniform(0, 2 * np.pi))
    noon = np.radians(uniform(rng, k.noon_elevation_deg))
    if condition == "dusk":
        elevation = np.radians(uniform(rng, k.dusk_sun_elevation_deg))
        hour = 18.0 + float(np.degrees(elevation)) / -15.0  # about 15 degrees per hour near the horizon
    else:
        hour = uniform(rng, k.hours)
        elevation = float(noon * np.sin(np.pi * (hour - 6.0) / 12.0))
    azimuth = float((bearing + np.pi * (hour - 12.0) / 12.0) % (2 * np.pi))
    s = float(np.clip(np.sin(max(elevation, 0.0)) / np.sin(np.radians(35.0)), 0.0, 1.0))
    kelvin = 2000.0 + 3700.0 * s + float(rng.uniform(-300, 300))
    air = float(np.clip(np.sin(max(elevation, 0.0)) / np.sin(np.radians(40.0)), 0.1, 1.0)) ** 0.5
    env = Environment(condition, float(hour), float(elevation), azimuth, 0.0, kelvin_to_rgb(kelvin), kelvin,
                      float(np.radians(2.0)), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)

    if condition == "clear":
        env.sun_energy = uniform(rng, k.sun_energy) * air
        hue = rng.uniform(0.55, 0.62)
        # Low suns pale and warm the horizon.
        env.sky_horizon = _sky(hue - 0.45 * (1 - s) * rng.uniform(0, 1), rng.uniform(0.08, 0.25),
                               rng.uniform(0.6, 0.95))
        env.sky_zenith = _sky(hue, rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.7))
        env.sky_strength = uniform(rng, k.sky_strength)
    elif condition == "overcast":
        if rng.random() < k.overcast_sun_prob:
            env.sun_energy = uniform(rng, k.overcast_sun_energy)
            env.sun_angle = float(np.radians(rng.uniform(20, 45)))
        v = rng.uniform(0.55, 0.85)
        env.sky_zenith = _sky(rng.uniform(0.55, 0.65), rng.uniform(0.0, 0.06), v)
        env.sky_horizon = _sky(rng.uniform(0.55, 0.65), rng.uniform(0.0, 0.04), v * rng.uniform(0.85, 1.0))
        env.sky_strength = uniform(rng, k.overcast_sky_strength)
    elif condition == "dusk":
        if elevation > 0:
            env.sun_energy = uniform(rng, k.dusk_sun_energy) * air
        env.sun_kelvin = float(rng.uniform(1800, 2600))
        env.sun_color = kelvin_to_rgb(env.sun_kelvin)
        env.sky_horizon = _sky(rng.uniform(0.02, 0.1), rng.uniform(0.5, 0.85), rng.uniform(0.6, 0.95))
        env.sky_zenith = _sky(rng.uniform(0.6, 0.67), rng.uniform(0.55, 0.85), rng.uniform(0.12, 0.35))
        env.sky_strength = uniform(rng, k.dusk_sky_strength)
        env.street_lights_on = True
        env.exposure = uniform(rng, k.dusk_exposure)
        env.extra_noise = uniform(rng, k.dusk_noise)
    else:  # rain
        env.sun_energy = 0.0 if rng.random() < 0.75 else uniform(rng, k.overcast_sun_energy) * 0.5
        env.sun_angle = float(np.radians(40.0))
        v = rng.uniform(0.4, 0.7)
        env.sky_zenith = _sky(rng.uniform(0.55, 0.65), rng.uniform(0.02, 0.1), v)
        env.sky_horizon = _sky(rng.uniform(0.55, 0.65), rng.uniform(0.0, 0.06), v * rng.uniform(0.9, 1.05))
        env.sky_strength = uniform(rng, k.rain_sky_strength)
        env.wetness = uniform(rng, k.wetness)
        env.puddles = integers(rng, k.puddles)
        env.street_lights_on = bool(rng.random() < k.rain_street_lights_prob)

    if env.street_lights_on:
        kl = uniform(rng, k.street_light_kelvin)
        env.street_light_color = kelvin_to_rgb(kl)
        env.street_light_energy = uniform(rng, k.street_light_energy)
        env.street_light_glow = uniform(rng, k.street_light_glow)
    foggy, haze_draw = bool(rng.random() < k.fog_prob), rng.random()
    if foggy:
        env.fog_density = uniform(rng, k.fog_density)
    elif condition == "rain" or haze_draw < k.haze_prob:
        env.fog_density = uniform(rng, k.haze_density)
    env.fog_color = _clip_fog(_fog_color(env.sky_horizon, env.sky_zenith, env.sky_strength))
    if foggy and env.sun_energy > 0:
        # Fog scatters the sun: weaker and soft-shadowed.
        env.sun_energy *= 0.4
        env.sun_angle = max(env.sun_angle, float(np.radians(25.0)))
    return env
