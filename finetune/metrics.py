"""Segmentation metrics: confusion matrices, mIoU and per-class IoU; foreground IoU; and instance F1 at an IoU
threshold with one-to-one (Hungarian) matching, mean matched IoU and count error.

Conventions: label images are (H, W) integer arrays, 0 = no object, every other value one object. A predicted
object may match at most one true object and vice versa; among all one-to-one assignments the one with the most
pairs at IoU >= the threshold is taken, and among those the one with the highest summed IoU (as in StarDist's
``matching``). Precision, recall and F1 pool the counts of all images: ``F1 = 2 TP / (2 TP + FP + FN)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_THRESHOLD = 0.5


def unique_inverse(values: np.ndarray, inverse: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True, return_counts=True)`` of a 1-D integer array, in O(N).

    Label images hold small non-negative ids (0..a few thousand): a ``bincount`` then replaces the sort, which is
    what made per-frame instance scoring slow. Other values (negative, or ids far above the array's length) take
    ``np.unique``; both give the same arrays.

    Args:
        values: (N,) integers.
        inverse: Also return the index of every value into the sorted distinct values (else an empty array).

    Returns:
        ``(ids, index, counts)``: (M,) sorted distinct values, (N,) int64 index of each value into ``ids``
        (empty without ``inverse``) and (M,) int64 count of each.
    """
    v = np.asarray(values).reshape(-1)
    if v.size and np.issubdtype(v.dtype, np.integer) and int(v.min()) >= 0 and int(v.max()) < 4 * v.size + 4096:
        counts = np.bincount(v)
        present = counts > 0
        ids = np.flatnonzero(present).astype(v.dtype, copy=False)
        index = (np.cumsum(present) - 1)[v] if inverse else np.zeros(0, np.int64)
        return ids, index, counts[present]
    if inverse:
        ids, index, counts = np.unique(v, return_inverse=True, return_counts=True)
        return ids, index.reshape(-1).astype(np.int64, copy=False), counts.astype(np.int64, copy=False)
    ids, counts = np.unique(v, return_counts=True)
    return ids, np.zeros(0, np.int64), counts.astype(np.int64, copy=False)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true object with every predicted object.

    Args:
        gt: (H, W) true instance ids (0 = none).
        pred: (H, W) predicted instance ids (0 = none), same shape.

    Returns:
        ``(iou, gt_ids, pred_ids)``: (n_gt, n_pred) float64 IoUs, and the ids each row / column stands for.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {gt.shape} vs {pred.shape}")
    g = gt.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    gt_ids, g_idx, g_area = unique_inverse(g)
    pred_ids, p_idx, p_area = unique_inverse(p)
    both = (g != 0) & (p != 0)
    # Overlaps only where both have an object: the pair count stays small even with thousands of objects.
    pairs, _, counts = unique_inverse(g_idx[both] * len(pred_ids) + p_idx[both], inverse=False)
    gi, pi = np.divmod(pairs, len(pred_ids))
    g_keep = gt_ids != 0
    p_keep = pred_ids != 0
    g_pos = np.cumsum(g_keep) - 1
    p_pos = np.cumsum(p_keep) - 1
    iou = np.zeros((int(g_keep.sum()), int(p_keep.sum())), np.float64)
    inter = counts.astype(np.float64)
    iou[g_pos[gi], p_pos[pi]] = inter / (g_area[gi] + p_area[pi] - inter)
    return iou, gt_ids[g_keep], pred_ids[p_keep]


def match(iou: np.ndarray, threshold: float = IOU_THRESHOLD) -> list[tuple[int, int, float]]:
    """One-to-one matching of rows (true objects) to columns (predictions) at IoU >= ``threshold``.

    Maximises the number of matched pairs first, then their summed IoU (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``), so one prediction covering two objects matches at most one.

    Returns:
        ``[(row, col, iou)]`` of the matched pairs.
    """
    from scipy.optimize import linear_sum_assignment

    valid = iou >= threshold
    rows = np.flatnonzero(valid.any(1))
    cols = np.flatnonzero(valid.any(0))
    if rows.size == 0:
        return []
    sub = iou[np.ix_(rows, cols)]
    ok = sub >= threshold
    n = min(sub.shape)
    # Each valid pair is worth 1 + IoU / (2 n): the IoU bonus of all pairs together stays below one extra pair.
    cost = -(ok.astype(np.float64) + np.where(ok, sub, 0.0) / (2 * n))
    r, c = linear_sum_assignment(cost)
    return [(int(rows[i]), int(cols[j]), float(sub[i, j])) for i, j in zip(r, c, strict=True) if ok[i, j]]


@dataclass
class InstanceTally:
    """Counts pooled over images for one class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    n_gt: int = 0
    n_pred: int = 0
    images: int = 0
    abs_count_error: int = 0
    matched_ious: list[float] = field(default_factory=list)

    @classmethod
    def of_image(cls, gt: np.ndarray, pred: np.ndarray, threshold: float = IOU_THRESHOLD) -> InstanceTally:
        """The counts of one image's label images (pure: safe to compute in a worker thread, then
        :meth:`merge` in image order)."""
        iou, gt_ids, pred_ids = iou_matrix(gt, pred)
        pairs = match(iou, threshold)
        tp = len(pairs)
        n_gt, n_pred = len(gt_ids), len(pred_ids)
        return cls(tp, n_pred - tp, n_gt - tp, n_gt, n_pred, 1, abs(n_pred - n_gt), [p[2] for p in pairs])

    def merge(self, other: InstanceTally) -> None:
        """Add another tally's counts (matched IoUs appended in order)."""
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.n_gt += other.n_gt
        self.n_pred += other.n_pred
        self.images += other.images
        self.abs_count_error += other.abs_count_error
        self.matched_ious.extend(other.matched_ious)

    def add(self, gt: np.ndarray, pred: np.ndarray, threshold: float = IOU_THRESHOLD) -> dict[str, Any]:
        """Score one image's label images and add its counts; returns that image's own scores."""
        one = self.of_image(gt, pred, threshold)
        self.merge(one)
        return one.result()

    def result(self) -> dict[str, Any]:
        return scores(self.tp, self.fp, self.fn, self.matched_ious, self.n_gt, self.n_pred, self.abs_count_error,
                      self.images)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def scores(tp: int, fp: int, fn: int, matched_ious: list[float], n_gt: int, n_pred: int, abs_count_error: int,
           images: int) -> dict[str, Any]:
    """F1, precision, recall (``None`` when undefined), mean matched IoU, count error and the raw counts.

    ``count_error`` is the mean over images of ``|predicted objects - true objects|``; ``count_error_rel`` divides
    the summed absolute errors by the number of true objects.
    """
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else None
    return {"f1": _r(f1), "precision": _r(tp / (tp + fp)) if tp + fp else None,
            "recall": _r(tp / (tp + fn)) if tp + fn else None,
            "mean_matched_iou": _r(np.mean(matched_ious)) if matched_ious else None,
            "count_error": _r(abs_count_error / images) if images else None,
            "count_error_rel": _r(abs_count_error / n_gt) if n_gt else None,
            "tp": tp, "fp": fp, "fn": fn, "n_gt": n_gt, "n_pred": n_pred, "images": images}


def foreground_counts(pred_fg: np.ndarray, gt_fg: np.ndarray, valid: np.ndarray | None = None) -> tuple[int, int]:
    """(intersection, union) pixel counts of two boolean foreground maps, over ``valid`` pixels only."""
    if valid is not None:
        pred_fg, gt_fg = pred_fg & valid, gt_fg & valid
    return int(np.count_nonzero(pred_fg & gt_fg)), int(np.count_nonzero(pred_fg | gt_fg))


def components(mask: np.ndarray) -> np.ndarray:
    """(H, W) int32 instance ids of the 4-connected components of a boolean mask (``skimage.measure.label``)."""
    from skimage.measure import label

    return label(mask, connectivity=1).astype(np.int32, copy=False)


# ------------------------------------------------------------------------------- semantic (pixel) metrics


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts; ``cm[t, p]`` pixels of true class t predicted as p.

    Args:
        pred: (H, W) or any shape of predicted ids in ``0..K-1``.
        target: Same shape, true ids, ``ignore_index`` left out.
    """
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.size and (t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"ids beyond num_classes={num_classes}: target max {t.max()}, pred max {p.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, names: list[str], scored: list[int] | None = None) -> dict[str, Any]:
    """mIoU, per-class IoU/accuracy, pixel accuracy from a confusion matrix.

    Args:
        cm: (K, K) counts, ``cm[t, p]``.
        names: The K class names.
        scored: The class ids mIoU and mean accuracy average (the classes the reference labels); ``None``: all.
            Per-class values are given for every class either way; pixels predicted as an unscored class still
            count, as misses of the true class they cover.

    Returns:
        ``{"miou", "pixel_accuracy", "mean_accuracy", "pixels", "per_class": {name: {"iou", "accuracy",
        "gt_pixels", "pred_pixels"}}}`` (plus ``"miou_classes"`` when ``scored`` leaves classes out); undefined
        values are ``None``.
    """
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()

    def val(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 6)

    sel = np.arange(len(names)) if scored is None else np.asarray(sorted(set(scored)), np.int64)
    s_iou, s_acc = iou[sel], acc[sel]
    out: dict[str, Any] = {
        "miou": val(np.nanmean(s_iou)) if np.any(~np.isnan(s_iou)) else None,
        "pixel_accuracy": val(tp.sum() / total) if total else None,
        "mean_accuracy": val(np.nanmean(s_acc)) if np.any(~np.isnan(s_acc)) else None,
        "pixels": int(total),
        "per_class": {n: {"iou": val(iou[i]), "accuracy": val(acc[i]), "gt_pixels": int(gt[i]),
                          "pred_pixels": int(pr[i])} for i, n in enumerate(names)},
    }
    if len(sel) < len(names):
        out["miou_classes"] = [names[i] for i in sel]
    return out


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source"
