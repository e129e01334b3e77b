"""``input.scale_by``: the area-weighted object size for ``input.scale=auto`` (no training here).

Street-like masks: a crowd of 3 px specks (distant people, pole parts, a model's speck false positives) and a
few large objects. The median over components is a speck's size, which does not grow with the image; the median
over pixels is the large objects' size, which does.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest

from finetune.config import FinetuneConfig, InputConfig
from segfactory.config import hash_config, load_config
from segfactory.errors import UserError

SPECK = 2 * np.sqrt(9 / np.pi)  # equivalent diameter of a 3x3 square: 3.39 px
SYN_PEOPLE_PX = 24.0  # rendered objects' diameter
REAL_PEOPLE_PX = 60.0  # real objects' diameter at scale 1: the right scale is 24 / 60 = 0.4


def specks(n: int, side: int = 400, spacing: int = 10) -> np.ndarray:
    """``n`` separate 3x3 squares of class 1 on a grid (their size is the same at every input scale)."""
    m = np.zeros((side, side), np.uint8)
    per_row = (side - 2 * spacing) // spacing
    for i in range(n):
        y, x = spacing + spacing * (i // per_row), spacing + spacing * (i % per_row)
        m[y:y + 3, x:x + 3] = 1
    return m


def discs(d: float, n: int = 6) -> np.ndarray:
    """``n`` discs of class 1 and diameter ``d`` on a 3x2 grid of cells ``2.5 d`` wide."""
    cell = max(8, round(2.5 * d))
    m = np.zeros((2 * cell, 3 * cell), np.uint8)
    for i in range(n):
        cy, cx = cell // 2 + cell * (i // 3), cell // 2 + cell * (i % 3)
        cv2.circle(m, (cx, cy), max(1, round(d / 2)), 1, -1)
    return m


def synthetic() -> list[np.ndarray]:
    """100 specks and 6 objects of 24 px: count median a speck, area median 24 px."""
    return [specks(100), discs(SYN_PEOPLE_PX)]


def predict_at(f: float) -> list[np.ndarray]:
    """A model's masks on real images resized by ``f``: 6 objects of ``60 f`` px that grow with the image and
    300 specks that do not (they hold about as many pixels as the objects at the right scale)."""
    return [discs(REAL_PEOPLE_PX * f), specks(300)]


def test_area_median_is_the_diameter_holding_half_the_pixels() -> None:
    from finetune.scale import area_median, component_sizes, robust_median

    assert area_median([1, 1, 1, 10]) == 10  # 3 of 103 area units in the small ones
    assert area_median([3, 4]) == 4  # 9 and 16: half of 25 lies in the component of 4
    assert area_median([5, 5]) == 5 and area_median([7.0]) == 7.0
    sizes = [s for m in synthetic() for s in component_sizes(m, [1])]
    assert len(sizes) == 106
    assert robust_median(sizes, 2.0) == pytest.approx(SPECK, rel=1e-6)  # the default: over components
    assert robust_median(sizes, 2.0, "count") == pytest.approx(SPECK, rel=1e-6)
    assert robust_median(sizes, 2.0, "area") == pytest.approx(SYN_PEOPLE_PX, rel=0.05)
    assert robust_median(sizes, 30.0, "area") is None  # nothing left above the floor
    with pytest.raises(ValueError, match="scale_by"):
        robust_median(sizes, 2.0, "mean")  # type: ignore[arg-type]


def test_scan_with_area_weighting_finds_the_scale_the_count_median_misses() -> None:
    from finetune.scale import estimate_scale, fit_scale, scale_summary, scan_scale

    right = SYN_PEOPLE_PX / REAL_PEOPLE_PX
    area = estimate_scale(predict_at, synthetic(), [1], by="area")
    assert area["ok"] and not area.get("untracked") and area["scale"] == pytest.approx(right, rel=0.08), area
    assert area["scale_by"] == "area" and area["synthetic_median_px"] == pytest.approx(SYN_PEOPLE_PX, rel=0.05)
    assert area["synthetic_px"]["count"] == pytest.approx(SPECK, rel=1e-3)
    assert area["object_px"] == pytest.approx(area["synthetic_median_px"], rel=1e-3)  # train_zoom 1
    assert "area-weighted" in scale_summary(area)
    # the count median (the default) compares a speck with a speck: whatever it returns is not the objects' scale
    count = estimate_scale(predict_at, synthetic(), [1])
    assert count["scale_by"] == "count" and count["synthetic_median_px"] == pytest.approx(SPECK, rel=1e-3)
    assert "area-weighted" not in scale_summary(count)
    assert not count["ok"] or abs(np.log(count["scale"] / right)) > np.log(2), count
    # the speck floor still matters with area weighting: the 300 real specks hold as many pixels as the objects
    # at the right scale; counted in (floor 2 px), they pull the scale off
    no_floor = scan_scale(predict_at, SYN_PEOPLE_PX, [1], min_px=2.0, by="area")
    assert abs(np.log(no_floor["scale"] / right)) > abs(np.log(area["scale"] / right)) + 0.1, (no_floor, area)
    # per-image prediction's fixed point measures the same statistic and converges to the same answer
    fit = fit_scale(predict_at, float(area["object_px"]), [1], start=1.0, by="area")
    assert fit["ok"] and not fit.get("untracked") and fit["scale"] == pytest.approx(right, rel=0.08), fit


def test_scale_guard_judges_the_chosen_median_and_names_scale_by_area() -> None:
    from finetune.selftrain import check_scale_target

    check_scale_target(synthetic(), [1], "area")  # 24 px over pixels: fine
    with pytest.raises(UserError) as e:
        check_scale_target(synthetic(), [1])  # 3.4 px over components
    msg = str(e.value)
    assert "measure 3.4 px across (median of 106)" in msg and "(area-weighted) is 23.7 px" in msg
    assert "input.scale_by=area" in msg and "\n" not in msg
    only_specks = [specks(100)]
    for by in ("count", "area"):
        with pytest.raises(UserError) as e:
            check_scale_target(only_specks, [1], by)  # type: ignore[arg-type]
        msg = str(e.value)
        assert "measure 3.4 px across" in msg and "input.scale_by=area" not in msg and "input.scale to" in msg
        assert ("area-weighted median of 100" in msg) == (by == "area")
    check_scale_target([discs(SYN_PEOPLE_PX)], [1])  # objects, not specks: either median passes


def test_scale_by_config_defaults_to_count_and_stays_out_of_default_dumps() -> None:
    default = FinetuneConfig()
    assert default.input.scale_by == "count" and "scale_by" not in default.model_dump(mode="json")["input"]
    area = load_config(FinetuneConfig, None, ["input.scale=auto", "input.scale_by=area"])
    assert area.input.scale_by == "area" and area.model_dump(mode="json")["input"]["scale_by"] == "area"
    assert FinetuneConfig.model_validate(area.model_dump(mode="json")).input.scale_by == "area"
    assert hash_config(load_config(FinetuneConfig, None, ["input.scale_by=count"])) == hash_config(default)
    assert hash_config(load_config(FinetuneConfig, None, ["input.scale_by=area"])) != hash_config(default)
    with pytest.raises(UserError) as e:
        load_config(FinetuneConfig, None, ["input.scale_by=median"])
    assert "input.scale_by" in str(e.value) and "'count'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError):
        InputConfig(scale_by="median")  # type: ignore[arg-type]


def test_per_image_scales_measure_the_statistic_model_json_records(monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.scale as scale_mod
    from finetune.predict import auto_scale

    seen: list[Any] = []
    monkeypatch.setattr(scale_mod, "fit_scale", lambda *a, **k: seen.append(k.get("by")) or {"scale": 1.0})
    img = np.zeros((32, 32), np.uint8)
    spec = {"scale": 1.0, "object_px": 24.0, "object_classes": [1]}
    for recorded, used in ((None, "count"), ("count", "count"), ("area", "area")):
        meta = {"input": {**spec, **({"scale_by": recorded} if recorded else {})}}
        auto_scale(None, meta, img, None, 64, 0, 1)  # type: ignore[arg-type]
        assert seen[-1] == used
    with pytest.raises(UserError, match=r"input\.scale_by is 'pixels'"):
        auto_scale(None, {"input": {**spec, "scale_by": "pixels"}}, img, None, 64, 0, 1)  # type: ignore[arg-type]
