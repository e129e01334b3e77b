"""The opt-in ``hog_people`` baseline (OpenCV's HOG people detector) on real street images: it finds the walking
people of a frame of OpenCV's vtest.avi (the fetched street set; people marked here by hand), nothing in sky and
façades of the Leuven photo; and ``all`` / the default stay the threshold baselines."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from finetune.baselines import (
    BASELINES,
    HOG_MIN_SCORE,
    HOG_NMS_IOU,
    OPT_IN,
    baseline_names,
    default_baselines,
    hog_boxes,
    hog_people,
    parse_baselines,
    person_boxes,
)
from finetune.data.normalize import LUMA
from segfactory import streetdata as sd
from segfactory.errors import UserError

# Frame 300 of vtest.avi (= vtest_f300.png of sample:street/unlabeled): four people walking, marked by hand as
# (x0, y0, x1, y1) boxes around each whole person (head to feet). Frame 100: people close together, where the
# detector's own grouping leaves overlapping windows for the non-maximum suppression to remove.
FRAME = 300
CROWDED = 100
PEOPLE = [(315, 210, 345, 296), (187, 159, 218, 233), (244, 159, 269, 220), (298, 159, 322, 230)]


def _fetched(*names: str) -> None:
    missing = [n for n in names if n in sd.missing()]
    if missing:
        msg = (f"street sample files not fetched ({', '.join(missing)}): run `make install` or "
               "`segfactory samples fetch`")
        if os.environ.get("CI"):  # `make test` fetches them: in CI a missing file is a broken set-up, not a skip
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="module")
def frames() -> dict[int, np.ndarray]:
    """Frames 100 and 300 of vtest.avi, (576, 768, 3) uint8 RGB: the bytes of the unlabeled split's
    vtest_f100.png and vtest_f300.png."""
    _fetched(sd.VIDEO)
    import cv2

    cap = cv2.VideoCapture(str(sd.locate(sd.VIDEO)))
    out = {}
    try:
        for t in range(FRAME + 1):  # read, not seek: exact frames whatever the codec
            ok, bgr = cap.read()
            assert ok
            if t in (CROWDED, FRAME):
                out[t] = np.ascontiguousarray(bgr[..., ::-1])
    finally:
        cap.release()
    return out


@pytest.fixture(scope="module")
def frame(frames: dict[int, np.ndarray]) -> np.ndarray:
    return frames[FRAME]


def test_hog_people_finds_the_walking_people_of_a_real_frame(frame: np.ndarray) -> None:
    fg = hog_people(frame, "auto")
    assert fg.shape == frame.shape[:2] and fg.dtype == bool
    for x0, y0, x1, y1 in PEOPLE:
        assert fg[y0:y1, x0:x1].mean() > 0.6, (x0, y0, x1, y1)
    assert 0.005 < fg.mean() < 0.05  # the people, not their whole detection windows: a few percent of the frame
    boxes, scores = hog_boxes(frame)
    assert boxes.dtype == np.int64 and boxes.shape == (len(scores), 4) and np.all(np.diff(scores) <= 0)
    for x0, y0, x1, y1 in PEOPLE:  # each person holds the centre of a detection window
        cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
        assert np.any((cx > x0) & (cx < x1) & (cy > y0) & (cy < y1)), (x0, y0, x1, y1)
    np.testing.assert_array_equal(person_boxes((fg.shape[0], fg.shape[1]), boxes), fg)
    # Gray and 16-bit input (any offset and gain): the same people.
    g16 = (np.tensordot(frame.astype(np.float32), LUMA, axes=([2], [0])) * 64 + 1000).astype(np.uint16)
    fg16 = hog_people(g16, "dark")
    assert fg16.shape == frame.shape[:2] and fg16.dtype == bool
    for x0, y0, x1, y1 in PEOPLE:
        assert fg16[y0:y1, x0:x1].mean() > 0.6


def test_hog_boxes_do_not_overlap_after_suppression(frames: dict[int, np.ndarray]) -> None:
    boxes, scores = hog_boxes(frames[CROWDED])
    x0, y0 = boxes[:, 0], boxes[:, 1]
    x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
    iw = np.clip(np.minimum(x1[:, None], x1) - np.maximum(x0[:, None], x0), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1) - np.maximum(y0[:, None], y0), 0, None)
    inter = iw * ih
    area = boxes[:, 2] * boxes[:, 3]
    iou = inter / (area[:, None] + area - inter)
    np.fill_diagonal(iou, 0)
    assert len(boxes) >= 3 and iou.max() <= HOG_NMS_IOU and scores.min() >= HOG_MIN_SCORE


def test_hog_people_finds_nothing_in_sky_facades_and_trees() -> None:
    _fetched("leuvenA.jpg", "building.jpg")
    with Image.open(sd.locate("leuvenA.jpg")) as im:
        top = np.asarray(im.convert("RGB"))[:300]  # sky, roofs, brick façades and windows; nobody there
    with Image.open(sd.locate("building.jpg")) as im:
        building = np.asarray(im.convert("RGB"))  # an office block, trees, hedges, parked cars; nobody there
    for img in (top, building):
        fg = hog_people(img, "auto")
        assert fg.shape == img.shape[:2] and fg.dtype == bool and not fg.any()


def test_hog_people_on_images_smaller_than_a_window_is_empty() -> None:
    tiny = np.full((40, 30, 3), 128, np.uint8)
    fg = hog_people(tiny, "auto")
    assert fg.shape == (40, 30) and fg.dtype == bool and not fg.any()
    assert not hog_people(np.zeros((300, 200), np.uint16), "auto").any()  # flat 16-bit: nothing, no division by zero


def test_hog_people_is_registered_but_opt_in() -> None:
    assert baseline_names() == ["otsu", "blur_otsu", "hog_people"] and set(BASELINES.names()) == set(baseline_names())
    assert {"hog_people"} == OPT_IN and default_baselines() == ["otsu", "blur_otsu"]
    assert parse_baselines(None) == parse_baselines("all") == ["otsu", "blur_otsu"]
    assert parse_baselines("hog_people") == parse_baselines(["hog_people"]) == ["hog_people"]
    assert parse_baselines("all,hog_people") == ["otsu", "blur_otsu", "hog_people"]
    assert parse_baselines("hog_people, all, otsu") == ["hog_people", "otsu", "blur_otsu"]
    with pytest.raises(UserError, match="did you mean 'hog_people'") as e:
        parse_baselines("hog_peple")
    assert "otsu, blur_otsu, hog_people" in (e.value.fix or "") and "all = otsu, blur_otsu" in (e.value.fix or "")
