"""Input scale: resizing real images so their objects get the rendered pixel size, and estimating the factor.

``input.scale`` (model.json ``input.scale``) is the factor real images are resized by before the network;
synthetic frames are always used at their rendered size. :func:`estimate_scale` finds it from unlabeled real
images: the median size of the thing-class objects a model predicts on them (connected components) against
the median size of the same classes' connected components in the synthetic labels. The median is over
components (``input.scale_by: count``, the default) or over pixels (``area``: the area-weighted median, the
diameter such that half of the objects' pixels lie in components of at most that diameter), for scenes whose
components are mostly specks that say nothing about the objects' size (the street family: distant people, pole
parts).

Real images of several sources (folders) can differ in magnification: training estimates one scale per source
(model.json ``input.scales``), and when those differ the model predicts every image at its own estimated scale
(``input.scale_mode: per_image``, :func:`fit_scale` from ``input.object_px``), since a single factor would
serve one source and shrink or blow up the objects of the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from finetune.config import ScaleBy

# model.json ``input`` fields written by ``input.scale=auto`` besides ``scale``: per-source scales, whether
# prediction estimates each image's scale (``fixed`` | ``per_image``), the object diameter (pixels) the model
# saw most in training, the classes measured and the statistic (``scale_by``: ``count`` | ``area``; absent means
# ``count``, as models written before it).
SCALE_KEYS = ("scales", "scale_mode", "object_px", "object_classes", "scale_by")
SCALE_BY = ("count", "area")


def scaled_shape(h: int, w: int, f: float) -> tuple[int, int]:
    """(H, W) of an image of (h, w) resized by ``f`` (at least one pixel)."""
    return max(1, round(h * f)), max(1, round(w * f))


def resize_image(img: np.ndarray, f: float) -> np.ndarray:
    """Resize an (H, W) or (H, W, 3) uint8/uint16 image by ``f``: area averaging when shrinking, else bilinear."""
    if f == 1:
        return img
    h, w = scaled_shape(img.shape[0], img.shape[1], f)
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) class-id mask to ``shape`` (H', W')."""
    if mask.shape[:2] == tuple(shape):
        return mask
    dtype = mask.dtype
    m = mask if dtype in (np.uint8, np.uint16) else mask.astype(np.int32)
    out = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return out.astype(dtype, copy=False)


def component_sizes(mask: np.ndarray, class_ids: Sequence[int], border: bool = False) -> list[float]:
    """Equivalent diameters ``2 sqrt(area / pi)`` (pixels) of the 8-connected components of some classes.

    Args:
        mask: (H, W) class ids.
        class_ids: Classes whose components are measured (each class separately).
        border: Keep components touching the image border (their size is cut off); default dropped.
    """
    out: list[float] = []
    h, w = mask.shape
    for k in class_ids:
        _, _, stats, _ = cv2.connectedComponentsWithStats((mask == k).astype(np.uint8), connectivity=8)
        x, y, bw, bh, area = stats[1:].T  # a speckled prediction has thousands of components: no Python loop
        if not border:
            inside = (x != 0) & (y != 0) & (x + bw != w) & (y + bh != h)
            area = area[inside]
        out.extend((2.0 * np.sqrt(area / np.pi)).tolist())
    return out


def area_median(sizes: Sequence[float]) -> float:
    """Area-weighted median of equivalent diameters: the smallest ``d`` such that at least half of the pixels of
    all the components lie in components of diameter at most ``d`` (each component weighs ``d^2``, its area up to
    the constant). ``sizes`` must not be empty."""
    d = np.sort(np.asarray(sizes, np.float64))
    cum = np.cumsum(d * d)
    return float(d[min(int(np.searchsorted(cum, 0.5 * cum[-1])), len(d) - 1)])


def robust_median(sizes: list[float], min_size: float, by: ScaleBy = "count") -> float | None:
    """Median of the sizes at least ``min_size`` (specks of a few pixels are noise, not objects).

    Args:
        sizes: Equivalent diameters (:func:`component_sizes`).
        min_size: Smaller components are dropped first.
        by: ``count``: the median over components; ``area``: over pixels (:func:`area_median`), which a crowd of
            specks barely moves.

    Returns:
        The median, or ``None`` when no size is at least ``min_size``.
    """
    keep = [s for s in sizes if s >= min_size]
    if not keep:
        return None
    if by == "area":
        return area_median(keep)
    if by != "count":
        raise ValueError(f"scale_by must be one of {SCALE_BY}, not {by!r}")
    return float(np.median(keep))


def training_zoom(crop_size: int, window: int, area: tuple[float, float], zoom: tuple[float, float] | None) -> float:
    """Median factor by which the training augmentation resizes objects (what the model saw most).

    With ``augment.zoom`` it is the geometric mean of the range; otherwise a random-resized crop of area
    fraction ``a ~ U(area)`` of the ``window`` resized to ``crop_size`` scales by ``crop / (window sqrt(a))``,
    whose median is at the median area.
    """
    if zoom is not None:
        return float(np.sqrt(zoom[0] * zoom[1]))
    return float(crop_size / (window * np.sqrt((area[0] + area[1]) / 2)))


# fit_scale: the most one pass moves the scale, and how far (as a factor) the measured object size may move
# from what the change of scale predicts before the masks count as not tracking objects.
MAX_STEP = 3.0
UNTRACKED = 2.0


def fit_scale(predict_at: Callable[[float], list[np.ndarray]], target_px: float, thing_ids: Sequence[int],
              start: float = 1.0, iterations: int = 3, limits: tuple[float, float] = (0.05, 20.0),
              min_objects: int = 1, min_px: float | None = None, by: ScaleBy = "count") -> dict[str, Any]:
    """Fixed point of ``scale <- scale x target / real median object diameter`` (per-image prediction's search,
    which starts from the trained ``input.scale``; the training-time estimate scans instead, :func:`scan_scale`).

    A model run at a badly wrong scale under- or over-segments, so one pass is biased toward the start; each pass
    predicts again at the new scale (two or three converge). One pass moves the scale by at most
    :data:`MAX_STEP` times, and when the measured size does not follow the change of scale (off by more than
    :data:`UNTRACKED` times: specks or texture, not objects) the search stops and goes back to the scale of the
    pass before (``untracked: True`` in the report).

    Args:
        predict_at: ``scale -> predicted class-id masks`` of the real images resized by ``scale``.
        target_px: The object diameter (pixels) the model saw most in training.
        thing_ids: Classes whose objects are measured.
        start: First scale tried.
        iterations: Most passes.
        limits: The scale is clipped to this range.
        min_objects: Fewer objects than this (after dropping specks under a quarter of the target) end the
            search; with none accepted the result is ``ok: False`` and ``scale`` the start value.
        min_px: Components smaller than this are specks, not objects (default a quarter of ``target_px``).
        by: The median measured: over components (``count``) or pixels (``area``), as ``target_px`` was.

    Returns:
        ``{"scale", "passes": [{"scale", "real_median_px", "objects"}], "ok"}``.
    """
    report: dict[str, Any] = {"scale": start, "passes": [], "ok": False}
    scale = start
    prev: tuple[float, float] | None = None  # (scale, real median) of the previous pass
    for _ in range(iterations):
        real = [s for m in predict_at(scale) for s in component_sizes(m, thing_ids)]
        floor = max(2.0, 0.25 * target_px if min_px is None else min_px)
        keep = [s for s in real if s >= floor]
        real_med = robust_median(keep, floor, by) if len(keep) >= max(1, min_objects) else None
        report["passes"].append({"scale": round(scale, 4), "real_median_px": real_med, "objects": len(real)})
        if real_med is None:
            break
        if prev is not None and abs(np.log(real_med / prev[1]) - np.log(scale / prev[0])) > np.log(UNTRACKED):
            # Objects resized by a factor should measure about that factor bigger; when the measured median moves
            # by more than UNTRACKED times otherwise, the masks are not tracking objects (specks, texture, a model
            # not yet able to see them) and following them runs off: go back to the previous pass's scale.
            report.update(scale=round(prev[0], 4), untracked=True)
            break
        new = float(np.clip(scale * target_px / real_med, *limits))
        new = float(np.clip(new, scale / MAX_STEP, scale * MAX_STEP))
        converged = abs(np.log(new / scale)) < 0.02
        prev = (scale, real_med)
        scale = new
        report.update(scale=round(scale, 4), ok=True)
        if converged:
            break
    return report


# scan_scale: the grid's step (a factor), how far below the start it begins, and how far above the start it
# gives up; a median diameter below COLLAPSE times the largest so far, on two grid steps in a row, means the
# model breaks the objects up from there on; above the start (where each step costs twice the one before), a
# median that grows less than GROWTH times per step, twice in a row, does not follow the image (a model that
# does not see the objects yet, e.g. after a few warm-up steps) and ends the scan.
SCAN_STEP = float(np.sqrt(2.0))
SCAN_BELOW = 8.0
SCAN_ABOVE = 4.0
COLLAPSE = 0.5
GROWTH = 1.1


def scan_scale(predict_at: Callable[[float], list[np.ndarray]], target_px: float, thing_ids: Sequence[int],
               start: float = 1.0, limits: tuple[float, float] = (0.05, 20.0), min_objects: int = 1,
               min_px: float | None = None, by: ScaleBy = "count") -> dict[str, Any]:
    """The smallest scale at which the model's objects reach ``target_px``, found on a rising grid of scales.

    A model sees real objects correctly only up to about the largest size it was trained on; beyond it, it
    breaks each object into fragments, so the measured size *falls* as the image grows, and a fixed-point search
    started there (:func:`fit_scale`) runs off to ever larger scales. Scanning from small scales upward
    (``start / SCAN_BELOW`` in steps of ``SCAN_STEP``) follows the objects while they grow with the image and
    stops at the first grid step whose median diameter reaches ``target_px``; the scale is interpolated on
    log-log axes between that step and the one before. Small scales cost little (pixels grow with the square
    of the scale), so the scan costs about as much as three passes near the answer.

    Args:
        predict_at: ``scale -> predicted class-id masks`` of the real images resized by ``scale``.
        target_px: The object diameter (pixels) the model saw most in training.
        thing_ids: Classes whose objects are measured.
        start: The grid is ``start x SCAN_STEP^k``, from ``start / SCAN_BELOW`` to ``start x SCAN_ABOVE``.
        limits: The grid stays in this range.
        min_objects: Fewer objects than this at a grid step count as none found there.
        min_px: Components smaller than this are specks, not objects (default a quarter of ``target_px``).
        by: The median measured: over components (``count``) or pixels (``area``), as ``target_px`` was.

    Returns:
        ``{"scale", "passes": [{"scale", "real_median_px", "objects"}], "ok"}``, plus ``untracked: True`` when no
        grid step reached ``target_px`` before the objects broke up or stopped growing, or the grid ended (the
        scale is then taken
        from the step where the objects measured largest, as :func:`fit_scale` would from there).
    """
    report: dict[str, Any] = {"scale": start, "passes": [], "ok": False}
    floor = max(2.0, 0.25 * target_px if min_px is None else min_px)
    lo, hi = max(limits[0], start / SCAN_BELOW), min(limits[1], start * SCAN_ABOVE)

    def measure(scale: float) -> float | None:
        real = [s for m in predict_at(scale) for s in component_sizes(m, thing_ids)]
        keep = [s for s in real if s >= floor]
        med = robust_median(keep, floor, by) if len(keep) >= max(1, min_objects) else None
        report["passes"].append({"scale": round(scale, 4), "real_median_px": med, "objects": len(real)})
        return med

    def done(scale: float, untracked: bool = False) -> dict[str, Any]:
        report.update(scale=round(float(np.clip(scale, *limits)), 4), ok=True)
        if untracked:
            report["untracked"] = True
        return report

    scale = lo
    med = measure(scale)
    # objects already at the target at the bottom of the grid: go further down until they are not
    while med is not None and med >= target_px and scale / SCAN_STEP >= limits[0]:
        below = measure(scale / SCAN_STEP)
        if below is None or below < target_px:
            return done(_interpolate(scale / SCAN_STEP, below, scale, med, target_px))
        scale, med = scale / SCAN_STEP, below
    if med is not None and med >= target_px:
        return done(scale * target_px / med)
    prev: tuple[float, float] | None = (scale, med) if med is not None else None
    best: tuple[float, float] | None = prev  # (scale, diameter) where the objects measured largest
    low_run = none_run = flat_run = 0
    while scale * SCAN_STEP <= hi * 1.0001:
        scale *= SCAN_STEP
        med = measure(scale)
        if med is None:
            # no objects: still too small, or the model sees none; larger images cost more, so give up after
            # two empty steps once objects were seen, or at twice the start when none ever were
            none_run += 1
            if (best is not None and none_run >= 2) or (best is None and scale >= 2 * start):
                break
            continue
        none_run = 0
        if med >= target_px:
            return done(_interpolate(prev[0], prev[1], scale, med, target_px) if prev else scale * target_px / med)
        if best is None or med > best[1]:
            best = (scale, med)
        low_run = low_run + 1 if med < COLLAPSE * best[1] else 0
        flat_run = flat_run + 1 if scale > start * 1.01 and prev is not None and med < GROWTH * prev[1] else 0
        if low_run >= 2 or flat_run >= 2:
            break
        prev = (scale, med)
    if best is None:
        return report
    return done(min(best[0] * target_px / best[1], best[0] * MAX_STEP), untracked=True)


def _interpolate(s0: float, d0: float | None, s1: float, d1: float, target: float) -> float:
    """The scale between ``s0`` and ``s1`` whose diameter is ``target``, on log-log axes (``d0 < target <= d1``;
    without ``d0``, ``s1`` moved by the ratio)."""
    if d0 is None or d0 <= 0 or d1 <= d0:
        return s1 * target / d1
    t = np.log(target / d0) / np.log(d1 / d0)
    return float(np.exp(np.log(s0) + t * (np.log(s1) - np.log(s0))))


def pooled_scale(scales: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted geometric mean of per-source scales (the default for images of no known source)."""
    w = np.asarray(weights, np.float64)
    return float(np.exp(np.sum(w * np.log(np.asarray(scales, np.float64))) / max(float(w.sum()), 1e-12)))


def scales_differ(scales: Sequence[float], ratio: float = 1.25) -> bool:
    """Whether per-source scales are far enough apart that one factor cannot serve them all."""
    return len(scales) > 1 and max(scales) / min(scales) > ratio


def estimate_scale(predict_at: Callable[[float], list[np.ndarray]], synthetic_masks: list[np.ndarray],
                   thing_ids: Sequence[int], start: float = 1.0,
                   limits: tuple[float, float] = (0.05, 20.0), train_zoom: float = 1.0,
                   by: ScaleBy = "count") -> dict[str, Any]:
    """Estimate of the input scale of one set of real images (:func:`scan_scale`).

    A model trained on rendered frames sees objects of the rendered size best, so the real images are predicted
    at a rising grid of scales and the scale at which the median predicted object reaches the size the model
    saw most in training is taken.

    Args:
        predict_at: ``scale -> predicted class-id masks`` of the real images resized by ``scale``.
        synthetic_masks: Label masks of synthetic frames (at their rendered size).
        thing_ids: Classes whose objects are measured (the ``thing`` classes).
        start: Centre of the grid of scales tried.
        limits: The estimate is clipped to this range.
        train_zoom: The median object resize of the training augmentation (:func:`training_zoom`): real
            objects are matched to the size the model saw most, ``synthetic median x train_zoom``.
        by: ``count``: the median over components, on both sides; ``area``: over pixels (:func:`area_median`),
            for scenes whose components are mostly specks. Specks are dropped on both sides either way (under
            2 px in the labels; under a quarter of the synthetic median in the predictions, which with ``area``
            is a quarter of the larger, area-weighted size): a model's hundreds of speck false positives per
            image can hold as many pixels as its few real objects, so weighting by area alone does not silence
            them.

    Returns:
        ``{"scale", "scale_by", "synthetic_median_px" (the statistic used), "synthetic_px" (both statistics),
        "object_px", "passes": [{"scale", "real_median_px", "objects"}], "ok"}``; ``ok`` is False (and ``scale``
        the start value) when no objects were found on either side.
    """
    syn = [s for m in synthetic_masks for s in component_sizes(m, thing_ids)]
    both = {b: robust_median(syn, 2.0, b) for b in SCALE_BY}  # type: ignore[arg-type]
    syn_med = both[by]
    report: dict[str, Any] = {"scale": start, "scale_by": by, "synthetic_median_px": syn_med,
                              "synthetic_px": {k: None if v is None else round(v, 3) for k, v in both.items()},
                              "synthetic_objects": len(syn), "train_zoom": round(train_zoom, 4), "passes": [],
                              "ok": False}
    if syn_med is None:  # say whether there were objects at all, or only ones cut by the frame border
        report["synthetic_border_objects"] = sum(len(component_sizes(m, thing_ids, border=True))
                                                 for m in synthetic_masks)
        return report
    report["object_px"] = round(syn_med * train_zoom, 3)
    report.update(scan_scale(predict_at, syn_med * train_zoom, thing_ids, start, limits, min_px=0.25 * syn_med,
                             by=by))
    return report


def scale_summary(report: dict[str, Any]) -> str:
    """One line about an ``input.scale=auto`` estimate (:meth:`finetune.selftrain.SelfTraining.estimate_scale`)."""
    def one(r: dict[str, Any]) -> str:
        last = r["passes"][-1] if r["passes"] else {}
        if r.get("untracked"):
            return (f"{r['scale']:.3f} (the predicted objects did not reach the target size at any scale tried "
                    "before they broke up or the grid ended, so the model does not see them reliably yet)")
        return (f"{r['scale']:.3f} (real objects {last['real_median_px']:.1f} px at scale {last['scale']:.3f})"
                if r["ok"] and last.get("real_median_px") else "no objects found")

    weighted = ", area-weighted" if report.get("scale_by") == "area" else ""
    head = (f"input.scale=auto: {report['scale']:.3f} (synthetic objects {report['synthetic_median_px']:.1f} px"
            f"{weighted}, target {report.get('object_px', 0):.1f} px)")
    srcs = report.get("sources")
    if not srcs:
        return f"{head}; {one(report)}"
    parts = [f"{'/'.join(Path(g).parts[-2:]) or '?'} ({r.get('images', '?')} images): {one(r)}"
             for g, r in srcs.items()]
    return f"{head}; per source: " + "; ".join(parts)
