"""The report's real-image section says when the instance head gave the watershed no seed (its rows equal)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.report import _real_section

NOTE = "splits nothing there"


def write_eval(tmp_path: Path, calibration: dict | None) -> Path:
    """A real-image evaluation folder (metrics.json with a model and a model_watershed row) and its model."""
    model = tmp_path / "model"
    model.mkdir()
    inst = {"things": [1], "seed_threshold": 0.5, "seed_h": 0.05, "min_size": 0, "method": "watershed"}
    if calibration is not None:
        inst["calibration"] = calibration
    (model / "model.json").write_text(json.dumps({"instances": inst}))
    row = {"fg_iou": 0.4, "miou": 0.5, "instances": {"person": {"f1": 0.0, "mean_matched_iou": None,
                                                                "count_error": 2.0}}}
    metrics = {"model": str(model), "input": {"scale": 0.33},
               "real": {"people": {"rows": {"model": row, "model_watershed": row}, "baselines": [], "notes": []}}}
    ev = tmp_path / "evaluate_real"
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps(metrics))
    return ev


def test_a_head_without_seeds_is_named_in_the_report(tmp_path: Path) -> None:
    html = _real_section(write_eval(tmp_path, {"frames": 8, "objects": 115, "peak_distance": 0.42, "seeded": 0.0}))
    assert "peaked at 0.42" in html and NOTE in html and "seed threshold 0.50" in html


def test_a_head_with_seeds_or_without_the_record_gets_no_note(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert NOTE not in _real_section(write_eval(tmp_path / "a", {"peak_distance": 0.81, "seeded": 0.9}))
    assert NOTE not in _real_section(write_eval(tmp_path / "b", None))  # a model calibrated before the record
