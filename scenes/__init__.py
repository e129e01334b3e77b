"""Scene library: registered families that sample plain :class:`~scenes.spec.SceneSpec` data.

Nothing here imports Blender; ``synth`` turns specs into Blender objects. Every sampler takes an explicit
``numpy.random.Generator`` so any scene can be reproduced from its seed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, ValidationError

from scenes.randomization import Randomization
from scenes.registry import SCENES, SceneContext, SceneFamily, register_scene
from scenes.spec import ClassDef, SceneSpec
from segfactory.config import StrictModel, validation_error_to_user_error
from segfactory.errors import UserError
from segfactory.seeds import scene_rng

__all__ = ["SCENES", "ResolvedScene", "SceneConfig", "SceneContext", "SceneFamily", "families", "register_scene",
           "resolve_scene", "sample_scene", "scene_rng"]


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


def families() -> list[str]:
    """The registered scene family names (for help texts)."""
    _load_builtin_families()
    return SCENES.names()


def sample_scene(resolved: ResolvedScene, rng: np.random.Generator, views: int, resolution: int = 256
                 ) -> SceneSpec:
    """Sample one scene with ``views`` camera views, to be rendered at ``resolution`` pixels square."""
    ctx = SceneContext(rng, resolved.params, resolved.randomization, views, resolved.classes, resolution)
    spec = resolved.family.sampler(ctx)
    spec.grayscale = resolved.family.channels == 1
    if len(spec.cameras) != views or len(spec.post) != views:
        raise RuntimeError(f"scene family '{resolved.family.name}' returned {len(spec.cameras)} views, not {views}")
    for i, light in enumerate(spec.lights):
        if light.view is not None and not 0 <= light.view < views:
            raise RuntimeError(f"scene family '{resolved.family.name}' returned light {i} for view {light.view}, "
                               f"but the scene has views 0..{views - 1}")
    return spec


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def _load_builtin_families() -> None:
    # Importing registers them; done lazily so `scenes.spec` stays importable on its own.
    from scenes import cells, street, tabletop  # noqa: F401
