"""Classic per-image baselines scored next to the model on real images: Otsu, and Gaussian blur + Otsu.

A baseline maps one raw image (any bit depth, gray or RGB; the raw values, not the model's scaling: Otsu does not
care about an offset or a gain) to a boolean foreground map. Which side of the threshold is foreground is chosen
without ground truth:

- ``bright`` (fluorescence) or ``dark`` (phase contrast: dark cells on a bright background), when the labeled
  folder's ``classes.json`` says ``"polarity"`` (the built-in sample sets do);
- ``auto`` otherwise: the minority side of the threshold, i.e. objects cover less than half of the frame (true of
  sparse nuclei and cells; wrong for confluent fields, which should say their polarity).

Instances are the 4-connected components of the foreground (:func:`finetune.metrics.components`), unfiltered.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from finetune.data.normalize import LUMA
from segfactory.errors import UserError
from segfactory.registry import Registry

POLARITIES = ("bright", "dark", "auto")
BLUR_SIGMA = 2.0

Baseline = Callable[[np.ndarray, str], np.ndarray]
BASELINES: Registry[Baseline] = Registry("baseline")
# Report order (the registry lists names alphabetically): the plainest first.
ORDER = ("otsu", "blur_otsu")


def baseline_names() -> list[str]:
    """Every registered baseline, in report order."""
    return sorted(BASELINES.names(), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def gray(img: np.ndarray) -> np.ndarray:
    """(H, W) float32 from (H, W) or (H, W, 3) uint8/uint16 (RGB -> BT.601 luma), raw values kept."""
    x = img.astype(np.float32)
    return np.tensordot(x, LUMA, axes=([2], [0])) if x.ndim == 3 else x


def threshold_side(x: np.ndarray, threshold: float, polarity: str) -> np.ndarray:
    """Boolean foreground: above the threshold (``bright``), at or below it (``dark``), or the smaller side."""
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {POLARITIES}, got {polarity!r}")
    above = x > threshold
    if polarity == "auto":
        polarity = "bright" if np.count_nonzero(above) <= above.size / 2 else "dark"
    return above if polarity == "bright" else ~above


def _otsu(x: np.ndarray, polarity: str) -> np.ndarray:
    from skimage.filters import threshold_otsu

    if float(x.min()) == float(x.max()):
        return np.zeros(x.shape, bool)  # a flat image has no objects
    return threshold_side(x, float(threshold_otsu(x)), polarity)


@BASELINES.register("otsu")
def otsu(img: np.ndarray, polarity: str = "auto") -> np.ndarray:
    """Otsu's threshold of the image's own histogram (256 bins)."""
    return _otsu(gray(img), polarity)


@BASELINES.register("blur_otsu")
def blur_otsu(img: np.ndarray, polarity: str = "auto") -> np.ndarray:
    """Gaussian blur (sigma 2 px) first, then Otsu: removes the pixel noise that fragments plain Otsu's objects."""
    from scipy.ndimage import gaussian_filter

    return _otsu(gaussian_filter(gray(img), BLUR_SIGMA, mode="nearest"), polarity)


def parse_baselines(value: str | list[str] | None) -> list[str]:
    """Baseline names from ``--baselines`` (comma-separated, ``all`` or ``none``) or a list; ``None`` = all.

    Raises:
        UserError: an unknown name, with the closest registered one.
    """
    if value is None:
        return baseline_names()
    items = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    if items == ["all"]:
        return baseline_names()
    if items in (["none"], []):
        return []
    out: list[str] = []
    for name in items:
        if name not in BASELINES:
            raise UserError(f"--baselines: {BASELINES.unknown_message(name)}",
                            fix=f"use a comma-separated list of: {', '.join(baseline_names())} (or all, none)")
        if name not in out:
            out.append(name)
    return out
