"""The scene-family registry: ``@register_scene`` and the one list of family names (help, validation, "did you
mean"). Families live one per module (``scenes/cells.py``, ...) and import only this module, the spec and helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from scenes.randomization import Randomization
from scenes.spec import ClassDef, SceneSpec
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


def _extra_color(cid: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(cid)
    r, g, b = (int(c) for c in rng.integers(40, 255, size=3))
    return (r, g, b)
