"""Scene library: registered families that sample plain :class:`~scenes.spec.SceneSpec` data.

Nothing here imports Blender; ``synth`` turns specs into Blender objects. Every sampler takes an explicit
``numpy.random.Generator`` so any scene can be reproduced from its seed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from scenes.randomization import Randomization
from scenes.spec import ClassDef, SceneSpec
from segfactory.config import StrictModel, validation_error_to_user_error
from segfactory.errors import UserError
from segfactory.registry import Registry


@dataclass
class SceneContext:
    """What a family's sampler receives (``resolution``: the square image size in pixels the views are
    rendered at, for families whose params are in pixel terms, such as the microscope's pixel size)."""

    rng: np.random.Generator
    params: Any
    randomization: Randomization
    views: int
    classes: list[ClassDef]
    resolution: int = 256

    def class_id(self, name: str) -> int:
        for c in self.classes:
            if c.name == name:
                return c.id
        raise KeyError(name)


Sampler = Callable[[SceneContext], SceneSpec]


@dataclass
class SceneFamily:
    name: str
    description: str
    classes: list[ClassDef]
    background: str
    params_model: type[BaseModel]
    randomization_defaults: dict[str, Any]
    sampler: Sampler
    extra_classes: Callable[[Any], list[str]] | None = None
    channels: int = 3  # 1: single-channel (grayscale) images
    unit_m: float = 1.0  # length of one scene unit in metres (depth PNGs hold 1/1000 units)

    def classes_for(self, params: Any) -> list[ClassDef]:
        """The family's classes plus any the config declares (e.g. for user meshes)."""
        classes = list(self.classes)
        for name in self.extra_classes(params) if self.extra_classes else []:
            if any(c.name == name for c in classes):
                continue
            cid = max(c.id for c in classes) + 1
            classes.append(ClassDef(cid, name, _extra_color(cid), thing=True))
        return classes


SCENES: Registry[SceneFamily] = Registry("scene")


def register_scene(name: str, *, description: str, classes: list[ClassDef], background: str,
                   params: type[BaseModel], randomization: dict[str, Any] | None = None,
                   extra_classes: Callable[[Any], list[str]] | None = None, channels: int = 3,
                   unit_m: float = 1.0) -> Callable[[Sampler], Sampler]:
    """Register a scene family's sampler under ``name``.

    Args:
        name: Family name used in configs (``scene.family``).
        description: One line for ``--help`` and the README.
        classes: The class map; ids must be unique and < 255 (255 is the ignore index).
        background: Class of pixels where no object is hit.
        params: Pydantic model of the family's own knobs (``scene.params``).
        randomization: Family defaults for the shared domain-randomisation knobs.
        extra_classes: Returns class names the params declare in addition to ``classes``.
        channels: 3 for RGB, 1 for single-channel images (e.g. fluorescence microscopy).
        unit_m: Length of one scene unit in metres (sets the depth PNGs' scale).
    """
    ids = [c.id for c in classes]
    if len(set(ids)) != len(ids) or max(ids) >= 255:
        raise ValueError(f"scene '{name}': class ids must be unique and < 255")

    def deco(fn: Sampler) -> Sampler:
        SCENES.register(name)(SceneFamily(name, description, classes, background, params,
                                          randomization or {}, fn, extra_classes, channels, unit_m))
        return fn

    return deco


class SceneConfig(StrictModel):
    """The ``scene`` config section."""

    family: str = Field("street", description="registered scene family")
    params: dict[str, Any] = Field(default_factory=dict, description="the family's own knobs")
    randomization: dict[str, Any] = Field(default_factory=dict, description="domain-randomisation overrides")


@dataclass
class ResolvedScene:
    family: SceneFamily
    params: Any
    randomization: Randomization
    classes: list[ClassDef]

    def as_config(self) -> SceneConfig:
        """The fully resolved section (every default filled in), as saved next to outputs and hashed."""
        return SceneConfig(family=self.family.name, params=self.params.model_dump(mode="json"),
                           randomization=self.randomization.model_dump(mode="json"))


def resolve_scene(cfg: SceneConfig) -> ResolvedScene:
    """Validate ``scene.params`` and ``scene.randomization`` against the family's models."""
    _load_builtin_families()
    family = SCENES.get(cfg.family) if cfg.family in SCENES else None
    if family is None:
        raise UserError(f"scene.family: {SCENES.unknown_message(cfg.family)}",
                        fix=f"use one of: {', '.join(SCENES.names())}")
    try:
        params = family.params_model.model_validate(cfg.params)
    except ValidationError as e:
        raise validation_error_to_user_error(e, family.params_model, "config", "scene.params") from None
    merged = _deep_merge(copy.deepcopy(family.randomization_defaults), cfg.randomization)
    try:
        rand = Randomization.model_validate(merged)
    except ValidationError as e:
        raise validation_error_to_user_error(e, Randomization, "config", "scene.randomization") from None
    return ResolvedScene(family, params, rand, family.classes_for(params))


def sample_scene(resolved: ResolvedScene, rng: np.random.Generator, views: int, resolution: int = 256
                 ) -> SceneSpec:
    """Sample one scene with ``views`` camera views, to be rendered at ``resolution`` pixels square."""
    ctx = SceneContext(rng, resolved.params, resolved.randomization, views, resolved.classes, resolution)
    spec = resolved.family.sampler(ctx)
    spec.grayscale = resolved.family.channels == 1
    if len(spec.cameras) != views or len(spec.post) != views:
        raise RuntimeError(f"scene family '{resolved.family.name}' returned {len(spec.cameras)} views, not {views}")
    return spec


def scene_rng(seed: int, scene_index: int) -> np.random.Generator:
    """The generator of scene ``scene_index`` of a dataset with base ``seed``: independent per scene."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(scene_index)]))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _extra_color(cid: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(cid)
    return tuple(int(c) for c in rng.integers(40, 255, size=3))  # type: ignore[return-value]


def _load_builtin_families() -> None:
    # Importing registers them; done lazily so `scenes.spec` stays importable on its own.
    from scenes import cells, street, tabletop  # noqa: F401
