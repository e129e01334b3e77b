"""Input scale: resizing real images so their objects get the rendered pixel size, and estimating the factor.

``input.scale`` (model.json ``input.scale``) is the factor real images are resized by before the network;
synthetic frames are always used at their rendered size. :func:`estimate_scale` finds it from unlabeled real
images: the median size of the thing-class objects a model predicts on them (connected components) against
the median size of the same classes' connected components in the synthetic labels.

Real images of several sources (folders) can differ in magnification: training estimates one scale per source
(model.json ``input.scales``), and when those differ the model predicts every image at its own estimated scale
(``input.scale_mode: per_image``, :func:`fit_scale` from ``input.object_px``), since a single factor would
serve one source and shrink or blow up the objects of the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# model.json ``input`` fields written by ``input.scale=auto`` besides ``scale``: per-source scales, whether
# prediction estimates each image's scale (``fixed`` | ``per_image``), the object diameter (pixels) the model
# saw most in training and the classes measured.
SCALE_KEYS = ("scales", "scale_mode", "object_px", "object_classes")


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
        for x, y, bw, bh, area in stats[1:]:
            if not border and (x == 0 or y == 0 or x + bw == w or y + bh == h):
                continue
            out.append(2.0 * float(np.sqrt(area / np.pi)))
    return out


def robust_median(sizes: list[float], min_size: float) -> float | None:
    """Median of the sizes at least ``min_size`` (specks of a few pixels are noise, not objects)."""
    keep = [s for s in sizes if s >= min_size]
    return float(np.median(keep)) if keep else None


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
              min_objects: int = 1, min_px: float | None = None) -> dict[str, Any]:
    """Fixed point of ``scale <- scale x target / real median object diameter`` (the estimate's core).

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

    Returns:
        ``{"scale", "passes": [{"scale", "real_median_px", "objects"}], "ok"}``.
    """
    report: dict[str, Any] = {"scale": start, "passes": [], "ok": False}
    scale = start
    prev: tuple[float, float] | None = None  # (scale, real median) of the previous pass
    for _ in range(iterations):
        real = [s for m in predict_at(scale) for s in component_sizes(m, thing_ids)]
        keep = [s for s in real if s >= max(2.0, 0.25 * target_px if min_px is None else min_px)]
        real_med = float(np.median(keep)) if len(keep) >= max(1, min_objects) else None
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


def pooled_scale(scales: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted geometric mean of per-source scales (the default for images of no known source)."""
    w = np.asarray(weights, np.float64)
    return float(np.exp(np.sum(w * np.log(np.asarray(scales, np.float64))) / max(float(w.sum()), 1e-12)))


def scales_differ(scales: Sequence[float], ratio: float = 1.25) -> bool:
    """Whether per-source scales are far enough apart that one factor cannot serve them all."""
    return len(scales) > 1 and max(scales) / min(scales) > ratio


def estimate_scale(predict_at: Callable[[float], list[np.ndarray]], synthetic_masks: list[np.ndarray],
                   thing_ids: Sequence[int], start: float = 1.0, iterations: int = 3,
                   limits: tuple[float, float] = (0.05, 20.0), train_zoom: float = 1.0) -> dict[str, Any]:
    """Fixed-point estimate of the input scale of one set of real images (:func:`fit_scale`).

    A model trained on rendered frames sees objects of the rendered size best, so its masks on real images
    resized by the current estimate are measured, the estimate is multiplied by ``synthetic / real`` median
    object diameter and the real images are predicted again at the new scale.

    Args:
        predict_at: ``scale -> predicted class-id masks`` of the real images resized by ``scale``.
        synthetic_masks: Label masks of synthetic frames (at their rendered size).
        thing_ids: Classes whose objects are measured (the ``thing`` classes).
        start: First scale tried.
        iterations: Passes over the real images.
        limits: The estimate is clipped to this range.
        train_zoom: The median object resize of the training augmentation (:func:`training_zoom`): real
            objects are matched to the size the model saw most, ``synthetic median x train_zoom``.

    Returns:
        ``{"scale", "synthetic_median_px", "object_px", "passes": [{"scale", "real_median_px", "objects"}],
        "ok"}``; ``ok`` is False (and ``scale`` the start value) when no objects were found on either side.
    """
    syn = [s for m in synthetic_masks for s in component_sizes(m, thing_ids)]
    syn_med = robust_median(syn, 2.0)
    report: dict[str, Any] = {"scale": start, "synthetic_median_px": syn_med, "synthetic_objects": len(syn),
                              "train_zoom": round(train_zoom, 4), "passes": [], "ok": False}
    if syn_med is None:  # say whether there were objects at all, or only ones cut by the frame border
        report["synthetic_border_objects"] = sum(len(component_sizes(m, thing_ids, border=True))
                                                 for m in synthetic_masks)
        return report
    report["object_px"] = round(syn_med * train_zoom, 3)
    report.update(fit_scale(predict_at, syn_med * train_zoom, thing_ids, start, iterations, limits,
                            min_px=0.25 * syn_med))
    return report


def scale_summary(report: dict[str, Any]) -> str:
    """One line about an ``input.scale=auto`` estimate (:meth:`finetune.selftrain.SelfTraining.estimate_scale`)."""
    def one(r: dict[str, Any]) -> str:
        last = r["passes"][-1]["real_median_px"] if r["passes"] else None
        if r.get("untracked"):
            return (f"{r['scale']:.3f} (stopped: the predicted objects did not follow the change of scale, "
                    "so the model does not see them reliably yet)")
        return (f"{r['scale']:.3f} (real objects {last:.1f} px at the previous scale)" if r["ok"] and last
                else "no objects found")

    head = (f"input.scale=auto: {report['scale']:.3f} (synthetic objects {report['synthetic_median_px']:.1f} px, "
            f"target {report.get('object_px', 0):.1f} px)")
    srcs = report.get("sources")
    if not srcs:
        return f"{head}; {one(report)}"
    parts = [f"{'/'.join(Path(g).parts[-2:]) or '?'} ({r.get('images', '?')} images): {one(r)}"
             for g, r in srcs.items()]
    return f"{head}; per source: " + "; ".join(parts)
