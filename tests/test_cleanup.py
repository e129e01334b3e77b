"""Speck cleanup (:mod:`finetune.cleanup`): object sizes from label masks, specks relabelled to the next class."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.cleanup import cleanup_spec, drop_specks, object_sizes, with_min_object
from segfactory.errors import UserError


def _disk(h: int, w: int, cy: int, cx: int, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_object_sizes_are_area_weighted_diameters_without_border_and_tiny_components() -> None:
    m = np.zeros((64, 64), np.uint8)
    m[_disk(64, 64, 20, 20, 8)] = 1  # area a1
    m[_disk(64, 64, 45, 45, 4)] = 1  # area a2 (smaller)
    m[0:10, 0:3] = 1                  # touches the border: size unknown, left out
    m[60, 30] = 1                     # one pixel: diameter 1.13 < 2 px, not an object
    m[_disk(64, 64, 45, 15, 5)] = 2   # another class, not asked for
    a1, a2 = int(_disk(64, 64, 20, 20, 8).sum()), int(_disk(64, 64, 45, 45, 4).sum())
    sizes = object_sizes([m], [1], zoom=1.5)
    # the larger disk holds most of the pixels: it is the area-weighted median
    assert sizes == {"1": pytest.approx(round(2 * np.sqrt(a1 / np.pi) * 1.5, 3))}
    assert a1 > a2
    assert object_sizes([m], [3]) == {}  # a class with no component has no size
    assert cleanup_spec(0.25, {}) is None


def _probs(labels: np.ndarray, second: np.ndarray, k: int) -> np.ndarray:
    """(K, H, W) probabilities whose argmax is ``labels`` and whose runner-up is ``second``."""
    p = np.full((k, *labels.shape), 0.01, np.float32)
    np.put_along_axis(p, second[None].astype(np.int64), 0.3, 0)
    np.put_along_axis(p, labels[None].astype(np.int64), 0.6, 0)
    return p


def test_drop_specks_relabels_small_components_to_their_runner_up_class() -> None:
    h = w = 80
    labels = np.zeros((h, w), np.uint8)
    big, small = _disk(h, w, 30, 30, 10), _disk(h, w, 60, 60, 2)
    labels[big] = 1
    labels[small] = 1
    labels[_disk(h, w, 10, 65, 2)] = 2  # a small component of a class without a size: never touched
    second = np.full((h, w), 3, np.uint8)
    probs = _probs(labels, second, 4)
    spec = cleanup_spec(0.25, {"1": 40.0})  # specks: diameter < 10 px at scale 1
    out = drop_specks(labels, probs, spec, 1.0)
    assert out.dtype == labels.dtype and out is not labels
    assert (out[big] == 1).all() and (out[small] == 3).all()
    assert (out[~small] == labels[~small]).all()
    assert (labels[small] == 1).all()  # the input is left alone
    # at input scale 0.5 the image's objects are twice the network's: the threshold doubles (20 px) and the big
    # disk (diameter ~20.9) stays while one a bit smaller would go
    out_half = drop_specks(labels, probs, spec, 0.5)
    assert (out_half[big] == 1).all() and (out_half[small] == 3).all()
    assert (drop_specks(labels, probs, spec, 0.45)[big] == 3).all()
    # off: the same array back
    assert drop_specks(labels, probs, cleanup_spec(0.0, {"1": 40.0}), 1.0) is labels
    assert drop_specks(labels, probs, None, 1.0) is labels


def test_min_object_override_checks_its_range_and_the_model() -> None:
    meta = {"cleanup": cleanup_spec(0.25, {"1": 40.0})}
    assert with_min_object(meta, None) is meta
    assert with_min_object(meta, 0.5)["cleanup"] == {**meta["cleanup"], "min_object": 0.5}
    assert meta["cleanup"]["min_object"] == 0.25
    with pytest.raises(UserError, match=r"outside 0\.\.1"):
        with_min_object(meta, 1.5)
    with pytest.raises(UserError, match="no object sizes"):
        with_min_object({}, 0.25)
    assert with_min_object({}, 0.0) == {}
