"""Decoder architectures: registered names (segmentation-models-pytorch's ``create_model`` names) -> the decoder's
keyword arguments for a ``model.decoder_channels`` value.

This module imports no torch, so ``--help`` and the ``model.arch`` check read the names cheaply. A new
architecture is a ``@register_arch("name")`` function here (copy ``_fpn``); :func:`finetune.models.build_model`
passes what it returns to ``smp.create_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from segfactory.errors import UserError
from segfactory.registry import Registry

__all__ = ["ARCHS", "DecoderWidthError", "decoder_kwargs", "register_arch"]

DecoderWidth = int | list[int] | None
# name -> f(width, *, strict=True) -> the decoder's keyword arguments (strict=False: model records written before a
# check, which must still load as they were built)
ARCHS: Registry[Callable[..., dict[str, Any]]] = Registry("architecture")


def register_arch(name: str) -> Callable:
    return ARCHS.register(name)


class DecoderWidthError(ValueError):
    """A ``model.decoder_channels`` value the architecture cannot take: ``reason`` (what the architecture needs,
    naming neither it nor the field: "has no configurable decoder width") and ``fix``. The config check
    (:class:`finetune.config.ModelConfig`) and :func:`decoder_kwargs` name the field."""

    def __init__(self, reason: str, fix: str):
        super().__init__(reason)
        self.reason, self.fix = reason, fix


def decoder_kwargs(arch: str, width: DecoderWidth, strict: bool = True) -> dict[str, Any]:
    """The decoder's keyword arguments of architecture ``arch`` for a ``model.decoder_channels`` value.

    Args:
        strict: Refuse what the config check refuses. ``False`` for a model record (``model.json``) written before
            a check existed: it builds as it was built (``fpn`` and ``deeplabv3plus`` took a list's first width).

    Raises:
        UserError: the architecture cannot take ``width`` (naming ``model.decoder_channels``).
    """
    try:
        return ARCHS.get(arch)(width, strict=strict)
    except DecoderWidthError as e:
        raise UserError(f"model.decoder_channels={width} is invalid: model.arch={arch} {e.reason}",
                        fix=e.fix) from None


@register_arch("unet")
@register_arch("unetplusplus")
def _pyramid(width: DecoderWidth, *, strict: bool = True, depth: int = 5) -> dict[str, Any]:
    """U-Net style decoder widths: an int is the last stage's width, doubling towards the encoder."""
    if width is None:
        return {}
    if isinstance(width, int):
        return {"decoder_channels": tuple(width * 2 ** (depth - 1 - i) for i in range(depth))}
    if len(width) != depth:
        raise DecoderWidthError(f"needs {depth} values (one per decoder stage), not {len(width)}",
                                f"give {depth} widths or one int (the last stage's width)")
    return {"decoder_channels": tuple(width)}


def _single(width: DecoderWidth, strict: bool) -> int | None:
    """The one width of ``fpn`` and ``deeplabv3plus`` (a list of one value is that value)."""
    if width is None:
        return None
    if isinstance(width, int):
        return width
    if strict and len(width) != 1:
        raise DecoderWidthError(f"takes one width, not a list of {len(width)}",
                                f"give one int (e.g. {width[0] if width else 128})")
    return int(width[0])


@register_arch("fpn")
def _fpn(width: DecoderWidth, *, strict: bool = True) -> dict[str, Any]:
    w = _single(width, strict)
    # The segmentation blocks use GroupNorm(32, C): C must be a multiple of 32.
    return {} if w is None else {"decoder_pyramid_channels": w,
                                 "decoder_segmentation_channels": max(32, 32 * round(w / 64))}


@register_arch("deeplabv3plus")
def _deeplab(width: DecoderWidth, *, strict: bool = True) -> dict[str, Any]:
    w = _single(width, strict)
    return {} if w is None else {"decoder_channels": w}


@register_arch("linknet")
def _linknet(width: DecoderWidth, *, strict: bool = True) -> dict[str, Any]:
    if width is not None:
        raise DecoderWidthError("has no configurable decoder width",
                                "leave it unset (null), or choose unet, unetplusplus, fpn or deeplabv3plus")
    return {}
