"""Reading images and masks, and the one input normalisation shared by training, evaluation and prediction.

Keeping this in one place is what makes "normalised exactly as at prediction time" true: every path from a
file to the network goes through :func:`read_image`, :func:`to_unit` and :func:`standardize`.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segfactory.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# ITU-R BT.601 luma, the weights OpenCV and PIL use for RGB -> gray.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image keeping bit depth: (H, W) gray or (H, W, 3) RGB, uint8 or uint16.

    Alpha channels are dropped; TIFFs are read with tifffile (first page), everything else with OpenCV.

    Raises:
        UserError: unreadable file or unsupported pixel type, naming the file.
    """
    path = Path(path)
    img: np.ndarray | None
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            img = np.asarray(tifffile.imread(path, key=0))
        except Exception as e:  # tifffile raises many types for corrupt files
            raise UserError(f"cannot read image '{path}': {e}", fix="re-save it as PNG, JPEG or TIFF") from None
        if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[2] not in (1, 3, 4):
            img = np.moveaxis(img, 0, -1)  # planar TIFF
    else:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UserError(f"cannot read image '{path}' (missing, corrupt or not an image)",
                            fix="re-save it as PNG, JPEG or TIFF, or remove it")
        if img.ndim == 3 and img.shape[2] >= 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    if img.ndim == 3:
        if img.shape[2] == 1 or img.shape[2] == 2:  # gray (+ alpha)
            img = img[..., 0]
        elif img.shape[2] == 4:
            img = img[..., :3]
        elif img.shape[2] != 3:
            raise UserError(f"image '{path}' has {img.shape[2]} channels", fix="use gray or RGB images")
    if img.ndim not in (2, 3):
        raise UserError(f"image '{path}' has shape {img.shape}", fix="use 2-D gray or RGB images")
    if img.dtype not in (np.uint8, np.uint16):
        raise UserError(f"image '{path}' has pixel type {img.dtype}", fix="convert it to 8- or 16-bit integers")
    return np.ascontiguousarray(img)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a class-id mask PNG as (H, W) integers (palette PNGs give their indices, not colours).

    Raises:
        UserError: unreadable or multi-channel mask, naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
                raise UserError(f"mask '{path}' is a {im.mode} image, not class ids",
                                fix="save masks as single-channel PNGs whose values are class ids")
            arr = np.array(im)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read mask '{path}': {e}", fix="re-save it as a single-channel PNG") from None
    return arr.astype(np.int32 if arr.dtype != np.uint8 else np.uint8, copy=False)


# The percentiles `segfactory ingest` uses to bring 16-bit images to 8 bit for pretraining.
PERCENTILES = (0.5, 99.5)


def resolve_scaling(img: np.ndarray, scaling: str) -> str:
    """The scaling an image gets: ``auto`` is ``dtype`` (÷255) for 8-bit images and ``percentile`` for deeper
    ones (what ``segfactory ingest`` does for pretraining); any other mode is returned as it is.

    Why not ``dtype`` for 16-bit: a 16-bit file holding 8-bit values (0..235) would be scaled to at most 0.004,
    and a 12-bit camera frame with an offset (e.g. 32978..36863) to 0.50..0.56.
    """
    if scaling == "auto":
        return "dtype" if img.dtype == np.uint8 else "percentile"
    return scaling


def image_range(img: np.ndarray, scaling: str = "minmax") -> tuple[float, float]:
    """The (low, high) values that ``minmax`` / ``percentile`` scaling maps to 0 / 1, from the whole image."""
    scaling = resolve_scaling(img, scaling)
    if scaling == "percentile":
        lo, hi = np.percentile(img, PERCENTILES)
        return float(lo), float(hi)
    return float(img.min()), float(img.max())


def to_unit(img: np.ndarray, in_chans: int, scaling: str = "dtype",
            value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scale an image to float32 in [0, 1] with the channel count the network expects.

    Args:
        img: (H, W) or (H, W, 3), uint8 or uint16 (from :func:`read_image`, possibly cropped).
        in_chans: 1 (RGB becomes BT.601 luma) or 3 (gray is repeated).
        scaling: ``dtype`` divides by 255 / 65535; ``minmax`` stretches the image's min..max to 0..1;
            ``percentile`` stretches its 0.5..99.5 percentiles to 0..1 and clips (as ``segfactory ingest`` does
            for 16-bit images, so fine-tuning sees what the pretrained encoder saw); ``auto`` picks per image
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
