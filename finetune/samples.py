"""Small real labeled folders built from sample images that ship inside installed packages.

No downloads: the pixels are scikit-image's ``coins.png`` (a real photograph of coins, 303x384 gray). The
labels are derived in a documented, reproducible way: Otsu threshold, hole filling and a small opening give
``coin`` (1) vs ``background`` (0); a 1-pixel band along every coin boundary is ``ignore`` (255) because
thresholding is unreliable there. Used by the training benchmark (default data) and by tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segfactory.io import atomic_write_bytes, atomic_write_json

COIN_CLASSES = [{"id": 0, "name": "background", "color": [0, 0, 0]}, {"id": 1, "name": "coin", "color": [255, 200, 0]}]


def skimage_data_path(name: str) -> Path:
    import skimage

    path = Path(skimage.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"scikit-image sample '{name}' is not installed at {path}")
    return path


def coins_image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    """The coins photograph (H, W) uint8 and its derived mask (H, W) uint8 in {0, 1, 255}."""
    from PIL import Image
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = np.array(Image.open(skimage_data_path("coins.png")).convert("L"))
    fg = img > threshold_otsu(img)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, iterations=2))
    boundary = fg ^ ndimage.binary_erosion(fg)
    boundary |= ndimage.binary_dilation(fg) ^ fg
    mask = fg.astype(np.uint8)
    mask[boundary] = 255
    return img, mask


def _encode(arr: np.ndarray, suffix: str) -> bytes:
    import cv2

    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(suffix, arr)
    if not ok:
        raise OSError(f"could not encode {suffix}")
    return buf.tobytes()


def make_coins_folder(out: str | os.PathLike, n: int = 12, size: int = 96, seed: int = 0, bit_depth: int = 8,
                      rgb: bool = False, suffix: str = ".png") -> Path:
    """Write a labeled folder (``images/``, ``masks/``, ``classes.json``) of random crops of the coins photo.

    Args:
        out: Folder to create.
        n: Number of crops.
        size: Crop side (at most 303).
        seed: Crop positions and flips.
        bit_depth: 8, or 16 (values scaled by 257, so 16-bit and 8-bit crops normalise identically).
        rgb: Store 3 identical channels instead of gray.
        suffix: ``.png``, ``.tif`` or ``.jpg`` (JPEG only for 8 bit).

    Returns:
        The folder.
    """
    img, mask = coins_image_and_mask()
    rng = np.random.default_rng(seed)
    out = Path(out)
    h, w = img.shape
    for i in range(n):
        y0, x0 = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        im, m = img[y0:y0 + size, x0:x0 + size], mask[y0:y0 + size, x0:x0 + size]
        if rng.random() < 0.5:
            im, m = im[:, ::-1], m[:, ::-1]
        im = np.ascontiguousarray(im)
        if bit_depth == 16:
            im = im.astype(np.uint16) * 257
        if rgb:
            im = np.repeat(im[..., None], 3, axis=2)
        atomic_write_bytes(out / "images" / f"coins_{i:03d}{suffix}", _encode(im, suffix))
        atomic_write_bytes(out / "masks" / f"coins_{i:03d}.png", _encode(np.ascontiguousarray(m), ".png"))
    atomic_write_json(out / "classes.json", {"classes": COIN_CLASSES, "ignore_index": 255})
    return out
