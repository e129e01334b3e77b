"""The labelme sample sets: real photos with manual polygon masks from labelme's examples (its PyPI sdist, fetched
at setup with the street files), rasterized as labelme does, as ``sample:labelme-vehicles/eval`` and
``sample:labelme-people/eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfactory import streetdata as sd
from segfactory.errors import UserError
from segfactory.sampledata import MANIFEST, SAMPLE_SETS, materialize, parse_ref, resolve_path


def _poly(label: str, x0: int, y0: int, x1: int, y1: int, kind: str = "polygon") -> dict:
    return {"label": label, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], "group_id": None,
            "shape_type": kind, "flags": {}}


def test_polygons_are_rasterized_in_file_order_with_their_outline() -> None:
    ann = {"imageWidth": 20, "imageHeight": 10, "shapes": [
        _poly("person", 2, 2, 9, 8),       # person 1: columns 2..9 (outline included), rows 2..8
        _poly("bottle", 7, 3, 8, 4),       # not scored: background, drawn over the person
        _poly("person", 12, 1, 15, 5),     # person 2
        _poly("__ignore__", 14, 4, 17, 6),  # ignore over the second person's corner
        _poly("sofa", 0, 9, 19, 9)]}       # not scored: background
    sem, inst = sd.labelme_masks(ann, {"person": 1})
    assert sem.shape == inst.shape == (10, 20) and sem.dtype == np.uint8 and inst.dtype == np.uint16
    assert sem[2:9, 2:10].sum() == 7 * 8 - 4 and sem[1, 2:10].sum() == sem[9, 2:10].sum() == 0  # bottle: 2x2
    assert (sem[3:5, 7:9] == 0).all() and (inst[3:5, 7:9] == 0).all()
    assert (inst[2:9, 2:10][sem[2:9, 2:10] == 1] == 1).all() and (inst[1:4, 12:14] == 2).all()
    assert (sem[4:7, 14:18] == 255).all() and (inst[4:7, 14:18] == 0).all()
    assert set(np.unique(sem)) == {0, 1, 255} and set(np.unique(inst)) == {0, 1, 2}
    with pytest.raises(UserError, match="is a rectangle, not a polygon"):
        sd.labelme_masks({"imageWidth": 4, "imageHeight": 4, "shapes": [_poly("car", 0, 0, 1, 1, "rectangle")]},
                         {"car": 1})


def test_sets_are_listed_with_one_eval_split() -> None:
    for name, cls in (("labelme-vehicles", "vehicle"), ("labelme-people", "person")):
        s = SAMPLE_SETS.get(name)
        assert s.class_name == cls and "GPL-3.0" in s.terms and "VOC" in s.citation
        assert parse_ref(f"sample:{name}/eval") == (name, "eval")
        with pytest.raises(UserError, match=f"sample set '{name}' has no split 'unlabeled'"):
            parse_ref(f"sample:{name}/unlabeled")
        with pytest.raises(UserError, match="names a sample set but no split") as e:
            resolve_path(f"sample:{name}")
        assert e.value.fix == f"use sample:{name}/eval"


@pytest.fixture(scope="module")
def labelme(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("labelme")
    return {name: materialize(name, out=root / name)["eval"] for name in ("labelme-vehicles", "labelme-people")}


def test_materialized_sets_hold_the_real_photos_and_their_manual_masks(labelme: dict[str, Path]) -> None:
    veh, ppl = labelme["labelme-vehicles"], labelme["labelme-people"]
    stems = sorted(p.stem for p in (veh / "images").glob("*.png"))
    assert stems == [f"video_0000010{i}" for i in range(5)] + ["voc_2011_000025"]
    assert sorted(p.stem for p in (ppl / "images").glob("*.png")) == ["voc_2011_000003", "voc_2011_000006"]
    for stem in stems:
        img = np.asarray(Image.open(veh / "images" / f"{stem}.png"))
        assert np.array_equal(img, np.asarray(Image.open(sd.locate(f"{stem}.jpg")).convert("RGB")))  # lossless
        m = np.asarray(Image.open(veh / "masks" / f"{stem}.png"))
        inst = np.asarray(Image.open(veh / "instances" / f"{stem}.png"))
        assert m.shape == inst.shape == img.shape[:2] and set(np.unique(m)) == {0, 1}
        assert set(np.unique(inst)) == {0, 1, 2, 3} and ((inst > 0) == (m == 1)).all()
    # The truck and the car are 11-14 % of each video frame (1000x563); the buses and the car most of the photo.
    for i in range(5):
        m = np.asarray(Image.open(veh / "masks" / f"video_0000010{i}.png"))
        assert m.shape == (563, 1000) and 0.10 < m.mean() < 0.15
        assert m[:150].mean() < 0.01 and m[450:].mean() == 0  # facades above, the sidewalk below: no vehicle
    assert np.asarray(Image.open(veh / "masks" / "voc_2011_000025.png")).mean() > 0.6
    # People: the VOC photos' persons, the '__ignore__' polygons ignored, bottles and sofas background.
    for stem, people in (("voc_2011_000003", 3), ("voc_2011_000006", 4)):
        m = np.asarray(Image.open(ppl / "masks" / f"{stem}.png"))
        assert set(np.unique(m)) == {0, 1, 255} and 0.15 < (m == 1).mean() < 0.25
        assert np.unique(np.asarray(Image.open(ppl / "instances" / f"{stem}.png"))).size == people + 1
    for folder, cls in ((veh, "vehicle"), (ppl, "person")):
        classes = json.loads((folder / "classes.json").read_text())
        assert [c["name"] for c in classes["classes"]] == ["background", cls] and classes["classes"][1]["thing"]
        assert "manual polygons" in classes["labels"]
        attribution = (folder / "ATTRIBUTION.txt").read_text()
        assert sd.LABELME_ARCHIVE.sha256 in attribution and "GPL-3.0" in attribution and "Everingham" in attribution
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["files"]["classes.json"] and all(k.startswith(("video_", "voc_"))
                                                         for k in manifest["source_files"])
    # Re-materializing reuses the folders; the street set's own key does not depend on labelme's files.
    assert materialize("labelme-people", out=ppl.parent) == {"eval": ppl}
    assert not any(k.startswith(("video_", "voc_")) for k in sd.source_checksums())
