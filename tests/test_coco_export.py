"""``segfactory coco DATASET``: one COCO instances file for a whole dataset, merged from its shards' ``coco.json``
(each numbers its images and annotations from 1), checked with pycocotools on the NumPy-written cells dataset."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from segfactory.cli import main
from segfactory.errors import EXIT_USER
from segfactory.formats.dataset import open_dataset
from segfactory.io import read_json


def test_one_coco_file_for_the_whole_dataset_loads_and_scores_itself_perfectly(tiny_dataset: Path, tmp_path: Path,
                                                                              capsys) -> None:
    ds = open_dataset(tiny_dataset)
    shards = [read_json(ds.shard_dir(s) / "coco.json") for s in ds.shard_ids]
    assert len(shards) == 2 and all(d["images"][0]["id"] == 1 for d in shards)  # why a merge is needed
    out = tmp_path / "all.json"
    capsys.readouterr()
    assert main(["coco", str(tiny_dataset), "--out", str(out)]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = read_json(out)
    n_img, n_ann = sum(len(d["images"]) for d in shards), sum(len(d["annotations"]) for d in shards)
    assert said == {"coco": str(out), "image_root": str(tiny_dataset), "images": n_img, "annotations": n_ann,
                    "categories": [c["name"] for c in ds.classes if c["thing"]], "shards": 2}
    assert [im["id"] for im in doc["images"]] == list(range(1, n_img + 1))
    assert [a["id"] for a in doc["annotations"]] == list(range(1, n_ann + 1)) and n_ann > 0
    assert doc["info"]["shards"] == ds.shard_ids
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(out))  # pycocotools loads it
    # every annotation is its shard's own, on the same picture: the mask decodes to the same pixels
    for merged_img in doc["images"]:
        sid = merged_img["shard"]
        assert (tiny_dataset / merged_img["file_name"]).is_file()
        src = next(d for s, d in zip(ds.shard_ids, shards, strict=True) if s == sid)
        [orig] = [im for im in src["images"] if im["frame"] == merged_img["frame"]]
        mine = sorted((a for a in doc["annotations"] if a["image_id"] == merged_img["id"]),
                      key=lambda a: a["instance_id"])
        theirs = sorted((a for a in src["annotations"] if a["image_id"] == orig["id"]), key=lambda a: a["instance_id"])
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert a["category_id"] == b["category_id"] and a["bbox"] == b["bbox"]
            assert np.array_equal(mask_utils.decode(gt.annToRLE(a)), mask_utils.decode(b["segmentation"]))
    # the annotations scored as detections of themselves: AP 1 (ids, images and categories all line up)
    with contextlib.redirect_stdout(io.StringIO()):
        dets = gt.loadRes([{"image_id": a["image_id"], "category_id": a["category_id"],
                            "segmentation": a["segmentation"], "score": 1.0} for a in doc["annotations"]])
        ev = COCOeval(gt, dets, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] > 0.99

    # default: DATASET/coco.json (on a copy: the session's dataset stays as it is)
    copy = tmp_path / "ds"
    shutil.copytree(tiny_dataset, copy)
    assert main(["coco", str(copy)]) == 0
    assert read_json(copy / "coco.json")["annotations"] == doc["annotations"]
    capsys.readouterr()
    assert main(["coco", str(tmp_path / "nope")]) == EXIT_USER
