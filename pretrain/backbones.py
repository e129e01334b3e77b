"""Backbones: registered names -> timm models built ``features_only`` (the exported encoder's layout).

This module is the table of backbones and imports no torch (timm is imported when a model is built), so
``--help`` and config validation read the names cheaply; the pooled SSL encoder is :mod:`pretrain.encoder`.

Pretraining trains exactly the module that is exported: ``timm.create_model(timm_name, features_only=True,
in_chans=..., pretrained=False)``. Its state dict is what segmentation-models-pytorch's ``tu-<name>``
encoder holds in ``encoder.model``, so fine-tuning loads it without key renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from segfactory.registry import Registry

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone.

    Attributes:
        timm_name: timm model name.
        timm_kwargs: Extra ``timm.create_model`` kwargs that do not change the state dict (recorded in
            ``encoder.json``).
        smp_compatible: Whether smp's ``tu-`` encoder accepts it (plain ViTs have a single stride and do not).
        tiny: A few-hundred-thousand-parameter variant for tests and smoke runs.
    """

    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    smp_compatible: bool = True
    tiny: bool = False


BACKBONES: Registry[BackboneSpec] = Registry("backbone")


def register_backbone(name: str, spec: BackboneSpec) -> None:
    BACKBONES.register(name)(spec)


for _name in ("resnet18", "resnet34", "resnet50", "convnext_atto", "convnext_tiny", "efficientnet_b0",
              "efficientnet_b2"):
    register_backbone(_name, BackboneSpec(_name))
# Plain ViTs: dynamic_img_size so any crop size (DINO's local crops) works; the state dict is unchanged.
register_backbone("vit_tiny", BackboneSpec("vit_tiny_patch16_224", {"dynamic_img_size": True}, smp_compatible=False))
register_backbone("vit_small", BackboneSpec("vit_small_patch16_224", {"dynamic_img_size": True},
                                            smp_compatible=False))
# timm's own test models: real architectures at ~0.1-0.4 M parameters, for tests and CPU smoke runs.
register_backbone("test_resnet", BackboneSpec("test_resnet", tiny=True))
register_backbone("test_convnext", BackboneSpec("test_convnext", tiny=True))
register_backbone("test_efficientnet", BackboneSpec("test_efficientnet", tiny=True))
register_backbone("test_vit", BackboneSpec("test_vit", {"dynamic_img_size": True}, smp_compatible=False, tiny=True))


def spec_for_timm_name(timm_name: str) -> BackboneSpec:
    """The registered spec of a timm name (for encoders exported elsewhere), or a plain spec."""
    for name in BACKBONES:
        spec = BACKBONES.get(name)
        if spec.timm_name == timm_name:
            return spec
    return BackboneSpec(timm_name)


def create_features_model(timm_name: str, in_chans: int, timm_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The encoder module: ``timm.create_model(timm_name, features_only=True, in_chans, pretrained=False)``.

    Returns:
        A module mapping (B, in_chans, H, W) to a list of feature maps (B, C_i, H / s_i, W / s_i).
    """
    import timm

    return timm.create_model(timm_name, features_only=True, in_chans=in_chans, pretrained=False,
                             **(timm_kwargs or {}))


def feature_info(model: nn.Module) -> tuple[list[int], list[int]]:
    """(channels, strides) of a ``features_only`` timm model's outputs."""
    info = model.feature_info  # type: ignore[attr-defined]
    return [int(c) for c in info.channels()], [int(r) for r in info.reduction()]
