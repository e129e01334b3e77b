"""Image files: the one reader of image and mask files (every format module and stage reads through it) and the
one writer of label/frame PNGs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from segfactory.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

ImageArray = npt.NDArray[np.unsignedinteger[Any]]
"""An image as read and written here: (H, W) gray or (H, W, 3) RGB, uint8 or uint16."""


def read_image(path: str | os.PathLike[str]) -> ImageArray:
    """Read an image keeping bit depth: (H, W) gray or (H, W, 3) RGB, uint8 or uint16.

    Alpha channels are dropped; TIFFs are read with tifffile (first page), everything else with OpenCV.

    Raises:
        UserError: unreadable file or unsupported pixel type, naming the file.
    """
    path = Path(path)
    img: npt.NDArray[Any] | None
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


def read_mask(path: str | os.PathLike[str]) -> npt.NDArray[np.uint8] | npt.NDArray[np.int32]:
    """Read a class-id mask PNG as (H, W) integers (palette PNGs give their indices, not colours).

    Raises:
        UserError: unreadable or multi-channel mask, naming the file.
    """
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
                raise UserError(f"mask '{path}' is a {im.mode} image, not class ids",
                                fix="save masks as single-channel PNGs whose values are class ids")
            arr: npt.NDArray[Any] = np.array(im)
    except UserError:
        raise
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read mask '{path}': {e}", fix="re-save it as a single-channel PNG") from None
    return arr if arr.dtype == np.uint8 else arr.astype(np.int32, copy=False)


def write_image(path: str | os.PathLike[str], img: ImageArray, jpeg_quality: int = 95) -> None:
    """Write PNG/JPEG (RGB in, OpenCV's BGR on disk; 8 or 16 bit), failing loudly instead of silently."""
    path = Path(path)
    on_disk = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    params = ([cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix in (".jpg", ".jpeg")
              else [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not cv2.imwrite(str(path), on_disk, params):
        raise OSError(f"could not write {path}")
