"""The one input normalisation shared by training, evaluation and prediction.

Keeping this in one place is what makes "normalised exactly as at prediction time" true: every path from a
file to the network goes through :func:`segfactory.formats.imagefile.read_image`, :func:`to_unit` and
:func:`standardize`.
"""

from __future__ import annotations

import numpy as np

from segfactory.errors import UserError
from segfactory.formats.imagefile import PERCENTILES, stretch_range

# ITU-R BT.601 luma, the weights OpenCV and PIL use for RGB -> gray.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)



def resolve_scaling(img: np.ndarray, scaling: str) -> str:
    """The scaling an image gets: ``auto`` is ``dtype`` (÷255) for 8-bit images and ``percentile`` for deeper
    ones (what ``segfactory ingest`` does for pretraining); any other mode is returned as it is.

    Why not ``dtype`` for 16-bit: a 16-bit file holding 8-bit values (0..235) would be scaled to at most 0.004,
    and a 12-bit camera frame with an offset (e.g. 32978..36863) to 0.50..0.56.
    """
    if scaling == "auto":
        return "dtype" if img.dtype == np.uint8 else "percentile"
    if scaling == "dtype" and img.dtype not in (np.uint8, np.uint16):
        raise UserError(f"input.scaling=dtype divides by the type's maximum, and {img.dtype} pixels (read from a "
                        "signed, 32-bit or floating-point image) have none",
                        fix="use a model trained with input.scaling=auto or percentile, or convert the image to "
                            "8 or 16 bit")
    return scaling


def image_range(img: np.ndarray, scaling: str = "minmax") -> tuple[float, float]:
    """The (low, high) values that ``minmax`` / ``percentile`` scaling maps to 0 / 1, from the whole image;
    ``percentile`` is :func:`~segfactory.formats.imagefile.stretch_range`, the rule ``segfactory ingest`` applies."""
    scaling = resolve_scaling(img, scaling)
    if scaling == "percentile":
        return stretch_range(img, *PERCENTILES)
    return float(img.min()), float(img.max())


def to_unit(img: np.ndarray, in_chans: int, scaling: str = "dtype",
            value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale an image to float32 in [0, 1] with the channel count the network expects.

    Args:
        img: (H, W) or (H, W, 3), uint8, uint16 or float32 (from :func:`read_image`, possibly cropped).
        in_chans: 1 (RGB becomes BT.601 luma) or 3 (gray is repeated).
        scaling: ``dtype`` divides by 255 / 65535 (8- and 16-bit images only); ``minmax`` stretches the image's
            min..max to 0..1; ``percentile`` stretches its 0.5..99.5 percentiles to 0..1 and clips (as
            ``segfactory ingest`` does for every image deeper than 8 bit, so fine-tuning sees what the pretrained
            encoder saw); ``auto`` picks per image
            (:func:`resolve_scaling`).
        value_range: (low, high) of the *whole* image for ``minmax``/``percentile`` (so crops scale like the
            full image); default computed from the given array.

    Returns:
        (C, H, W) float32.
    """
    scaling = resolve_scaling(img, scaling)
    x = img.astype(np.float32)
    if scaling == "dtype":
        x *= 1.0 / (65535.0 if img.dtype == np.uint16 else 255.0)
    elif scaling in ("minmax", "percentile"):
        lo, hi = value_range if value_range is not None else image_range(img, scaling)
        x = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
    else:
        raise ValueError(f"unknown scaling {scaling!r}")
    if x.ndim == 2:
        x = x[None]
        if in_chans == 3:
            x = np.repeat(x, 3, axis=0)
    else:
        x = np.moveaxis(x, -1, 0)
        if in_chans == 1:
            x = np.tensordot(LUMA, x, axes=1)[None]
    return np.ascontiguousarray(x, dtype=np.float32)


def standardize(x, mean, std):
    """``(x - mean) / std`` per channel on a (B, C, H, W) or (C, H, W) torch tensor."""
    import torch

    shape = (-1, 1, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s
