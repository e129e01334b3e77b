"""Decoder architectures: registered names -> segmentation-models-pytorch constructors on a timm encoder.

This module imports no torch (smp is imported when a model is built), so ``--help`` and the ``model.arch`` check
read the names cheaply. A new architecture is a ``@register_arch("name")`` factory here (copy ``_fpn``);
:func:`finetune.models.build_model` calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from segfactory.errors import UserError
from segfactory.registry import Registry

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ARCHS", "register_arch"]

ARCHS: Registry[Callable[..., nn.Module]] = Registry("architecture")


def register_arch(name: str) -> Callable:
    return ARCHS.register(name)


def _pyramid(width: int | list[int] | None, depth: int = 5) -> dict[str, Any]:
    """U-Net style decoder widths: an int is the last stage's width, doubling towards the encoder."""
    if width is None:
        return {}
    if isinstance(width, int):
        return {"decoder_channels": tuple(width * 2 ** (depth - 1 - i) for i in range(depth))}
    if len(width) != depth:
        raise UserError(f"model.decoder_channels={width} needs {depth} values for this architecture",
                        fix=f"give {depth} widths or one int (the last stage's width)")
    return {"decoder_channels": tuple(width)}


def _single(width: int | list[int] | None) -> int | None:
    if width is None:
        return None
    return width if isinstance(width, int) else int(width[0])


@register_arch("unet")
def _unet(encoder: str, in_chans: int, num_classes: int, decoder_channels=None) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.Unet(encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_chans, classes=num_classes,
                    **_pyramid(decoder_channels))


@register_arch("unetplusplus")
def _unetpp(encoder: str, in_chans: int, num_classes: int, decoder_channels=None) -> nn.Module:
    import segmentation_models_pytorch as smp

    return smp.UnetPlusPlus(encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_chans,
                            classes=num_classes, **_pyramid(decoder_channels))


@register_arch("fpn")
def _fpn(encoder: str, in_chans: int, num_classes: int, decoder_channels=None) -> nn.Module:
    import segmentation_models_pytorch as smp

    w = _single(decoder_channels)
    # The segmentation blocks use GroupNorm(32, C): C must be a multiple of 32.
    kw = {} if w is None else {"decoder_pyramid_channels": w,
                               "decoder_segmentation_channels": max(32, 32 * round(w / 64))}
    return smp.FPN(encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_chans, classes=num_classes,
                   **kw)


@register_arch("deeplabv3plus")
def _deeplab(encoder: str, in_chans: int, num_classes: int, decoder_channels=None) -> nn.Module:
    import segmentation_models_pytorch as smp

    w = _single(decoder_channels)
    return smp.DeepLabV3Plus(encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_chans,
                             classes=num_classes, **({} if w is None else {"decoder_channels": w}))


@register_arch("linknet")
def _linknet(encoder: str, in_chans: int, num_classes: int, decoder_channels=None) -> nn.Module:
    import segmentation_models_pytorch as smp

    if decoder_channels is not None:
        raise UserError("linknet has no configurable decoder width (model.decoder_channels is set)",
                        fix="remove model.decoder_channels or choose unet/fpn/deeplabv3plus")
    return smp.Linknet(encoder_name=f"tu-{encoder}", encoder_weights=None, in_channels=in_chans, classes=num_classes)
