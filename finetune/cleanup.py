"""Speck cleanup: predicted thing-class components far smaller than the class's objects take the next class.

A model trained on rendered frames predicts, on real images, many tiny components of its thing classes (a few
pixels of "person" on a window, a lamp post, a shadow): on the street demo's held-out video frames most of its
false person objects. They are far smaller than any object the model was trained to find, so they are dropped
by size, with one parameter relative to what training saw rather than a pixel count tuned per image set:

- At the end of training, each thing class's **object size** is measured on the rendered training labels: the
  area-weighted median equivalent diameter ``2 sqrt(area / pi)`` of its 8-connected components (components under
  2 px and those touching the frame border left out, as :func:`finetune.scale.estimate_scale` does), times the
  median zoom of the training augmentation (:func:`finetune.scale.training_zoom`): the size, in network input
  pixels, the model saw most (model.json ``cleanup.object_px``, by class id).
- At prediction, an 8-connected component of a thing class ``c`` whose equivalent diameter is under
  ``min_object x object_px[c] / f`` pixels (``f``: the input scale the image was predicted at) is a speck: its
  pixels take their next most probable class (the argmax of the class probabilities without ``c``). One pass, in
  class-id order. ``min_object`` (model.json ``cleanup.min_object``, the finetune config's
  ``predict.min_object``, ``--min-object`` of ``predict``/``evaluate``) defaults to 0.25: the quarter of the
  object size below which :func:`finetune.scale.estimate_scale` already counts predicted components as specks.

Classes without an object size (no thing flag, no component of at least 2 px in the sampled rendered labels,
models trained before this existed or without rendered data) are never cleaned.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import cv2
import numpy as np

# Rendered label frames sampled for the object sizes (spread over the training frames).
SAMPLE_FRAMES = 64
# Label components under this equivalent diameter (pixels) are not objects (estimate_scale's rule).
LABEL_MIN_PX = 2.0


def object_sizes(masks: Iterable[np.ndarray], things: Sequence[int], zoom: float = 1.0) -> dict[str, float]:
    """Per thing class, the object size the model saw most in training (see module docstring).

    Args:
        masks: (H, W) target-id label masks of rendered training frames, at their rendered size.
        things: Thing class ids.
        zoom: Median object resize of the training augmentation (:func:`finetune.scale.training_zoom`).

    Returns:
        ``{str(class id): diameter in network input pixels}``, for the classes with at least one component.
    """
    from finetune.scale import component_sizes, robust_median

    sizes: dict[int, list[float]] = {int(c): [] for c in things}
    for m in masks:
        for c in sizes:
            sizes[c] += component_sizes(m, [c])
    out: dict[str, float] = {}
    for c, s in sizes.items():
        med = robust_median(s, LABEL_MIN_PX, "area")
        if med is not None:
            out[str(c)] = round(med * zoom, 3)
    return out


def cleanup_spec(min_object: float, object_px: dict[str, float]) -> dict[str, Any] | None:
    """model.json's ``cleanup`` record, or ``None`` when there is nothing to clean (no class has a size)."""
    if not object_px:
        return None
    return {"min_object": float(min_object), "object_px": dict(object_px), "connectivity": 8}


def with_min_object(meta: dict[str, Any], min_object: float | None) -> dict[str, Any]:
    """A model's meta with ``cleanup.min_object`` replaced (``predict``/``evaluate --min-object``; ``None``:
    model.json's own). The object sizes stay the model's.

    Raises:
        UserError: a value outside 0..1, or a positive one for a model without object sizes.
    """
    from segfactory.errors import UserError

    if min_object is None:
        return meta
    if not 0 <= min_object < 1:
        raise UserError(f"--min-object {min_object} is outside 0..1",
                        fix="e.g. --min-object 0.25 (a quarter of the object size), or 0 to turn cleanup off")
    spec = meta.get("cleanup")
    if min_object > 0 and not spec:
        raise UserError(f"--min-object {min_object}: this model has no object sizes (model.json cleanup)",
                        fix="retrain with this version of segfactory on rendered data, or leave --min-object out")
    if not spec:
        return meta
    return {**meta, "cleanup": {**spec, "min_object": float(min_object)}}


def drop_specks(labels: np.ndarray, probs: np.ndarray, spec: dict[str, Any] | None, scale: float) -> np.ndarray:
    """Relabel the speck components of the thing classes (see module docstring); ``labels`` is not modified.

    Args:
        labels: (H, W) class ids, the argmax of ``probs``.
        probs: (K, H, W) class probabilities (or any scores with the same argmax).
        spec: model.json's ``cleanup`` (``None`` or ``min_object`` 0: ``labels`` is returned as is).
        scale: Input scale ``f`` the image was predicted at.

    Returns:
        (H, W) class ids, same dtype.
    """
    if not spec or float(spec.get("min_object", 0)) <= 0:
        return labels
    ratio = float(spec["min_object"])
    out = labels
    for key, px in sorted(spec["object_px"].items(), key=lambda kv: int(kv[0])):
        c = int(key)
        fg = out == c
        if not fg.any():
            continue
        min_d = ratio * float(px) / float(scale)
        _, cc, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8),
                                                           connectivity=int(spec.get("connectivity", 8)))
        small = 2.0 * np.sqrt(stats[:, cv2.CC_STAT_AREA] / np.pi) < min_d
        small[0] = False
        if not small[1:].any():
            continue
        speck = small[cc]
        p = probs[:, speck].copy()  # (K, n)
        p[c] = -np.inf
        if out is labels:
            out = labels.copy()
        out[speck] = p.argmax(0).astype(out.dtype)
    return out
