"""Classic per-image baselines scored next to the model on real images: Otsu, Gaussian blur + Otsu, and (opt-in)
OpenCV's HOG people detector.

A baseline maps one raw image (any bit depth, gray or RGB; the raw values, not the model's scaling: Otsu does not
care about an offset or a gain) to a boolean foreground map. Which side of the threshold is foreground is chosen
without ground truth:

- ``bright`` (fluorescence) or ``dark`` (phase contrast: dark cells on a bright background), when the labeled
  folder's ``classes.json`` says ``"polarity"`` (the built-in sample sets do);
- ``auto`` otherwise: the minority side of the threshold, i.e. objects cover less than half of the frame (true of
  sparse nuclei and cells; wrong for confluent fields, which should say their polarity).

Instances are the 4-connected components of the foreground (:func:`finetune.metrics.components`), unfiltered.

The thresholds apply to any foreground/background folder and form the default set (``all``). ``hog_people``
(:func:`hog_people`: the HOG + linear SVM pedestrian detector of Dalal & Triggs as shipped in OpenCV, each kept
detection window filled where the person stands in it) only makes sense for people in camera images, so it is
**opt-in** (:data:`OPT_IN`): it runs only when named (``--baselines hog_people``, ``--baselines all,hog_people``,
``eval.baselines: hog_people``), never as part of ``all`` or the default. It ignores the polarity.
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
ORDER = ("otsu", "blur_otsu", "hog_people")
# Baselines for one kind of data only: registered (help, "did you mean"), but never in ``all`` / the default.
OPT_IN = frozenset({"hog_people"})
# Baselines that detect one class only: they score a folder only when its foreground class is that one (by name,
# after mapping), e.g. a people detector says nothing about a vehicle mask.
DETECTS = {"hog_people": "person"}


def baseline_names() -> list[str]:
    """Every registered baseline (the default set and the opt-in ones), in report order."""
    return sorted(BASELINES.names(), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def default_baselines() -> list[str]:
    """The baselines of ``all`` (and of no choice): every registered one except the opt-in ones, in report order."""
    return [n for n in baseline_names() if n not in OPT_IN]


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


# ------------------------------------------------------------------------------------------------ HOG people
# OpenCV's default people detector scans 64x128 windows in which the person is about 96 px tall (16 px margins above
# and below) and about half the window wide. Images are resized so that a person HOG_MIN_PERSON_PX tall fills that
# window (small frames are upscaled: vtest.avi's 60-100 px pedestrians would otherwise be below the detector's
# smallest size), unless the longer side would exceed HOG_MAX_SIDE (bounded time: big photos have big people).
HOG_PERSON_PX = 96
HOG_MIN_PERSON_PX = 64
HOG_MAX_SIDE = 1600
HOG_WIN_STRIDE = (8, 8)
HOG_PADDING = (16, 16)
HOG_SCALE = 1.05                 # pyramid step
HOG_GROUP = 2                    # OpenCV's grouping: a box needs 3 overlapping raw hits (drops lone hits)
HOG_MIN_SCORE = 1.0              # SVM score of a kept box
HOG_NMS_IOU = 0.3                # kept boxes overlapping a higher-scoring one by more are dropped
HOG_INNER = (0.5, 0.75)          # the person's share of the window: width, height
# The foreground is that inner part of each kept window, filled. Checked on 6 frames of the unlabeled split
# (50, 150, ..., 550; motion masks made as for the eval split; never the eval frames): person IoU 0.78 for this
# inner box, 0.74 for an upright ellipse inscribed in it, 0.75 for the whole window; a score threshold of 1.0 beat
# 0.5 and 0 (0.74, 0.70 for the inner box). In the four photos it drops one weak hit on a tree (building.jpg) and
# one on a person (bus.jpg, whose close-up people HOG hardly finds at any threshold).


def _uint8(img: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 for OpenCV: uint8 as is, other depths stretched from their min..max."""
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    x = img.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(x)
    return np.ascontiguousarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))


def hog_boxes(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """People boxes of OpenCV's HOG + linear SVM detector, after non-maximum suppression.

    Args:
        img: (H, W) or (H, W, 3) image, uint8 or uint16 (channel order does not matter: HOG takes the strongest
            channel's gradient).

    Returns:
        ``(boxes, scores)``: (N, 4) int ``x, y, w, h`` of the detection windows in ``img``'s pixels (padding around
        the person included), (N,) float SVM scores, best first.
    """
    import cv2

    x = _uint8(img)
    h, w = x.shape[:2]
    f = min(HOG_PERSON_PX / HOG_MIN_PERSON_PX, HOG_MAX_SIDE / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if size[0] < 64 or size[1] < 128:
        return np.zeros((0, 4), np.int64), np.zeros(0, np.float32)  # smaller than one detection window
    if f != 1.0:
        x = cv2.resize(x, size, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)
    hog = cv2.HOGDescriptor()
    hog.setSVMDetector(np.asarray(cv2.HOGDescriptor.getDefaultPeopleDetector(), np.float32))
    rects, weights = hog.detectMultiScale(x, hitThreshold=0.0, winStride=HOG_WIN_STRIDE, padding=HOG_PADDING,
                                          scale=HOG_SCALE, groupThreshold=HOG_GROUP)
    boxes = np.asarray(rects, np.float64).reshape(-1, 4) / np.array([size[0] / w, size[1] / h] * 2)
    scores = np.asarray(weights, np.float32).reshape(-1)
    if not len(boxes):
        return np.zeros((0, 4), np.int64), scores
    keep = np.asarray(cv2.dnn.NMSBoxes(boxes.round().astype(int).tolist(), scores.tolist(), HOG_MIN_SCORE,
                                       HOG_NMS_IOU), np.int64).reshape(-1)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return boxes[keep].round().astype(np.int64), scores[keep]


def person_boxes(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """(H, W) bool: per detection window the person's part of it (HOG_INNER: the central half of its width and
    three quarters of its height), filled.

    Args:
        shape: ``(H, W)`` of the image.
        boxes: (N, 4) ``x, y, w, h`` detection windows (:func:`hog_boxes`).
    """
    out = np.zeros(shape, bool)
    for bx, by, bw, bh in boxes.tolist():
        dx, dy = bw * (1 - HOG_INNER[0]) / 2, bh * (1 - HOG_INNER[1]) / 2
        y0, y1 = max(0, round(by + dy)), min(shape[0], round(by + bh - dy))
        x0, x1 = max(0, round(bx + dx)), min(shape[1], round(bx + bw - dx))
        out[y0:y1, x0:x1] = True
    return out


@BASELINES.register("hog_people")
def hog_people(img: np.ndarray, polarity: str = "auto") -> np.ndarray:
    """People: OpenCV's HOG pedestrian detector (Dalal & Triggs' linear SVM), each kept window's person part
    filled (opt-in: for people in street/camera images; ``polarity`` is ignored).

    Args:
        img: (H, W) or (H, W, 3) uint8 or uint16.

    Returns:
        (H, W) bool foreground.
    """
    return person_boxes((img.shape[0], img.shape[1]), hog_boxes(img)[0])


def parse_baselines(value: str | list[str] | None, where: str = "--baselines") -> list[str]:
    """Baseline names from ``--baselines`` (comma-separated names, ``all`` or ``none``) or a list; ``None`` = all.

    ``all`` is the default set (:func:`default_baselines`); opt-in baselines (:data:`OPT_IN`) run only when named,
    alone or next to ``all`` (``all,hog_people``). ``where`` is the option or config field an error names.

    Raises:
        UserError: an unknown name, with the closest registered one.
    """
    if value is None:
        return default_baselines()
    items = [str(v).strip() for v in (value.split(",") if isinstance(value, str) else value)]
    items = [v for v in items if v]
    if items in (["none"], []):
        return []
    out: list[str] = []
    for name in items:
        if name not in BASELINES and name != "all":
            raise UserError(f"{where}: {BASELINES.unknown_message(name)}",
                            fix=f"use a comma-separated list of: {', '.join(baseline_names())} (or all, none; "
                                f"all = {', '.join(default_baselines())})")
        out.extend(n for n in (default_baselines() if name == "all" else [name]) if n not in out)
    return out
