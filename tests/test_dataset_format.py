"""``segfactory.formats.dataset.write_dataset``: a dataset written from NumPy has exactly a render's layout (the
checks ``test_render`` runs on real renders), is the same bytes for the same arrays, and refuses bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from procedural import CELLS_CLASSES, cells_scene, write_cells_dataset
from test_render import check_coco, check_layout

from segfactory.errors import UserError
from segfactory.formats.dataset import FrameArrays, load_frame, open_dataset, write_dataset
from segfactory.io import read_json


def test_written_dataset_has_the_render_layout(tiny_dataset: Path) -> None:
    check_layout(tiny_dataset, channels=1, bit_depth=8)
    assert check_coco(tiny_dataset) > 100  # every visible nucleus of 16 frames is a COCO instance
    ds = open_dataset(tiny_dataset)
    assert len(ds) == 16 and len(ds.shard_ids) == 2 and ds.class_names == ["background", "nucleus", "debris"]
    assert all(sid.startswith(("cells-000000-", "cells-000004-")) for sid in ds.shard_ids)
    assert ds.meta["generator"] == "arrays" and ds.meta["image"] == {"format": "png", "bit_depth": 8,
                                                                     "channels": 1, "resolution": 64}
    assert ds.meta["depth"]["scale_m"] == pytest.approx(1e-9)  # nanometres, like a cells render
    shares = np.zeros(3)
    for ref in ds.frames():
        f = load_frame(ref)
        shares += np.bincount(f["semantic"].ravel(), minlength=3)
        things = f["semantic"] == 1
        assert np.array_equal(f["instance"] > 0, things)  # nuclei are instances, debris and background are not
        assert (f["depth"][things] < f["depth"][f["semantic"] == 0].min()).all()  # nuclei lie above the slide
        assert f["rgb"][things].mean() > 2 * f["rgb"][f["semantic"] == 0].mean() + 10  # and glow
    shares /= shares.sum()
    assert 0.55 < shares[0] < 0.9 and 0.1 < shares[1] < 0.4 and 0 < shares[2] < 0.02
    # A scene's views share instance ids: the same nucleus seen twice keeps its id.
    frames = {ref.name: load_frame(ref) for ref in ds.frames()}
    ids = [set(np.unique(frames[f"s000000_v{v:02d}"]["instance"])) - {0} for v in (0, 1)]
    assert ids[0] & ids[1]


def test_same_arrays_same_bytes_other_pixels_other_shards(tmp_path: Path) -> None:
    a = write_cells_dataset(tmp_path / "a", scenes=3, views=1, size=32, scenes_per_shard=2)
    b = write_cells_dataset(tmp_path / "b", scenes=3, views=1, size=32, scenes_per_shard=2)
    c = write_cells_dataset(tmp_path / "c", scenes=3, views=1, size=32, scenes_per_shard=2, seed=1)
    da, db, dc = open_dataset(a), open_dataset(b), open_dataset(c)
    assert da.shard_ids == db.shard_ids and set(da.shard_ids).isdisjoint(dc.shard_ids)
    for sid in da.shard_ids:
        files = [fr["files"] for fr in da.manifest(sid)["frames"]]
        assert files == [fr["files"] for fr in db.manifest(sid)["frames"]]  # sha256 of every file
    assert read_json(a / "dataset.json")["config_hash"] == read_json(b / "dataset.json")["config_hash"]
    assert not list((a / "shards").glob(".tmp-*"))  # every attempt directory was committed


def test_rgb_16_bit_and_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scene = [FrameArrays(np.repeat(f.rgb[..., None], 3, axis=2).astype(np.uint16) * 257, f.semantic, f.instance,
                         f.depth) for f in cells_scene(rng, 2, 32)]
    ds = write_dataset(tmp_path / "rgb16", [scene], CELLS_CLASSES, family="rgb16")
    assert ds.meta["image"] == {"format": "png", "bit_depth": 16, "channels": 3, "resolution": 32}
    check_layout(ds.root, channels=3, bit_depth=16)
    assert np.array_equal(load_frame(next(ds.frames()))["rgb"], scene[0].rgb)
    gray = [FrameArrays(f.rgb, f.semantic, f.instance, f.depth) for f in cells_scene(rng, 1, 32)]
    jpg = write_dataset(tmp_path / "jpg", [gray], CELLS_CLASSES, family="jpg", image_format="jpg")
    assert next(jpg.frames()).rgb.suffix == ".jpg"
    check_layout(jpg.root, channels=1, bit_depth=8)


def test_bad_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    frame = cells_scene(np.random.default_rng(0), 1, 16)[0]

    def refused(scenes: list[list[FrameArrays]], match: str) -> None:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        with pytest.raises(ValueError, match=match):
            write_dataset(out, scenes, CELLS_CLASSES, family="bad")
        assert not out.exists()

    refused([], "at least one scene")
    refused([[frame], []], "at least one scene")
    refused([[FrameArrays(frame.rgb, frame.semantic.astype(np.int32), frame.instance, frame.depth)]],
            r"scene 0 view 0: semantic is int32")
    refused([[frame, FrameArrays(frame.rgb[:8], frame.semantic[:8], frame.instance[:8], frame.depth[:8])]],
            r"scene 0 view 1: rgb is uint8 \(8, 16\), expected uint8 or uint16 of 16x16")
    refused([[frame], [FrameArrays(np.repeat(frame.rgb[..., None], 3, 2), frame.semantic, frame.instance,
                                   frame.depth)]], "one dataset, one image format")
    refused([[FrameArrays(frame.rgb, np.full_like(frame.semantic, 7), frame.instance, frame.depth)]],
            r"class id\(s\) \[7\]")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(UserError, match="not a new or empty directory"):
        write_dataset(taken, [[frame]], CELLS_CLASSES, family="bad")
