"""Real Blender renders through the real pipeline (LocalCluster + render subprocesses): layout, COCO, labels,
determinism, resume, bad input and shard failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from conftest import CELLS_TINY, CONFIGS, assert_hang_children_gone, render_cli
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segfactory.errors import EXIT_PARTIAL, EXIT_USER
from segfactory.formats.dataset import load_frame, open_dataset
from segfactory.formats.imagefile import read_image
from segfactory.io import read_json, sha256_file


def check_layout(root: Path, channels: int, bit_depth: int) -> None:
    """Every documented file exists, checksums match the manifests, dtypes and value ranges are right."""
    ds = open_dataset(root)
    meta = ds.meta
    assert meta["format"] == "segfactory-dataset" and meta["ignore_index"] == 255
    assert {"classes", "shards", "num_frames", "config_hash", "code_version", "depth"} <= set(meta)
    assert meta["num_frames"] == len(ds) > 0 and [s["id"] for s in meta["shards"]] == ds.shard_ids
    class_ids = {c["id"] for c in ds.classes}
    for sid in ds.shard_ids:
        manifest = ds.manifest(sid)
        assert manifest["num_frames"] == len(manifest["frames"])
        assert sha256_file(ds.shard_dir(sid) / "coco.json") == manifest["coco_sha256"]
        for fr in manifest["frames"]:
            assert fr["seed"] == [manifest["seed"], fr["scene_index"]]
            for entry in fr["files"].values():
                assert sha256_file(ds.shard_dir(sid) / entry["path"]) == entry["sha256"]
    for ref in ds.frames():
        f = load_frame(ref)
        assert f["semantic"].dtype == np.uint8 and f["instance"].dtype == np.uint16
        assert f["depth"].dtype == np.uint16
        assert f["rgb"].dtype == (np.uint16 if bit_depth == 16 else np.uint8)
        assert f["rgb"].ndim == (2 if channels == 1 else 3)
        assert f["rgb"].shape[:2] == f["semantic"].shape == f["instance"].shape == f["depth"].shape
        assert set(np.unique(f["semantic"])) <= class_ids


def check_coco(root: Path) -> int:
    """pycocotools loads each shard's COCO file and every RLE decodes to exactly its instance's pixels."""
    ds = open_dataset(root)
    things = {c["id"] for c in ds.classes if c["thing"]}
    n_anns = 0
    for sid in ds.shard_ids:
        coco = COCO(str(ds.shard_dir(sid) / "coco.json"))
        assert {c["id"] for c in coco.loadCats(coco.getCatIds())} == things
        for img in coco.loadImgs(coco.getImgIds()):
            instance = read_image(ds.shard_dir(sid) / f"instance/{img['frame']}.png")
            semantic = read_image(ds.shard_dir(sid) / f"semantic/{img['frame']}.png")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert {a["instance_id"] for a in anns} == set(np.unique(instance)) - {0}
            union = np.zeros_like(instance, dtype=bool)
            for a in anns:
                m = coco.annToMask(a).astype(bool)
                assert np.array_equal(m, instance == a["instance_id"])
                assert a["area"] == m.sum() and a["category_id"] in things
                assert np.all(semantic[m] == a["category_id"])
                assert mask_utils.area(a["segmentation"]) == m.sum()
                union |= m
            assert np.array_equal(union, instance > 0)
            n_anns += len(anns)
    return n_anns


@pytest.mark.render
def test_cells_dataset_layout_coco_and_sheet(rendered_cells_dataset: Path, tmp_path: Path):
    check_layout(rendered_cells_dataset, channels=1, bit_depth=8)
    assert check_coco(rendered_cells_dataset) > 20
    from segfactory.cli import main

    assert main(["show", str(rendered_cells_dataset), "--out", str(tmp_path / "sheet.png"), "--frames", "3"]) == 0
    sheet = read_image(tmp_path / "sheet.png")
    assert sheet.ndim == 3 and sheet.shape[0] > 300


def _tile_boxes(sheet: np.ndarray, color: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) of the pixels of exactly ``color``; asserts they fill that box."""
    ys, xs = np.nonzero(np.all(sheet == color, axis=-1))
    assert ys.size, color
    y0, x0, y1, x1 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    assert ys.size == (y1 - y0) * (x1 - x0), (color, (y0, x0, y1, x1), ys.size)
    return int(y0), int(x0), int(y1), int(x1)


def test_show_beside_real_folder(tmp_path: Path, capsys):
    """`show --beside`: one row of N rendered frames (picked as the contact sheet picks them), one row of N real
    images picked evenly through the sorted folder, every tile a centre square crop; 16-bit gray is stretched."""
    from PIL import Image

    from segfactory.cli import main
    from segfactory.formats.dataset import FrameArrays, write_dataset
    from synth.viz import pick_frames

    size, tile = 40, 24
    classes = [{"id": 0, "name": "background", "color": [0, 0, 0], "thing": False}]
    zeros8, zeros16 = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint16)
    rendered_colors = [(200, 10 + 20 * i, 30) for i in range(5)]  # one flat colour per frame
    scenes = [[FrameArrays(np.full((size, size, 3), c, np.uint8), zeros8, zeros16, zeros16)] for c in rendered_colors]
    ds = write_dataset(tmp_path / "ds", scenes, classes, family="flat", scenes_per_shard=2)
    real = tmp_path / "real"
    real.mkdir()
    real_colors = {}
    for i in range(7):  # wide images: blue centre square, red side bands that the centre crop must cut off
        img = np.zeros((30, 60, 3), np.uint8)
        img[:] = (255, 0, 0)
        img[:, 15:45] = (10, 20 + 30 * i, 240)
        Image.fromarray(img).save(real / f"img_{i}.png")
        real_colors[f"img_{i}.png"] = (10, 20 + 30 * i, 240)
    gray16 = np.full((50, 50), 1000, np.uint16)  # 16-bit gray: left half dark, right half bright
    gray16[:, 25:] = 60000
    Image.fromarray(gray16).save(real / "z_gray16.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(real / "bus_excluded.png")
    (real / ".hidden.png").write_bytes((real / "img_0.png").read_bytes())
    out = tmp_path / "sheet.png"
    assert main(["show", str(ds.root), "--beside", str(real), "--frames", "3", "--tile", str(tile),
                 "--exclude", "bus*", "--out", str(out)]) == 0
    sheet = np.asarray(Image.open(out).convert("RGB"))
    # Rendered row: the frames pick_frames picks, in order, left to right.
    picked = [tuple(int(v) for v in load_frame(ref)["rgb"][0, 0]) for ref in pick_frames(ds, 3)]
    assert len(picked) == 3 and len(set(picked)) == 3
    boxes = [_tile_boxes(sheet, c) for c in picked]
    # Real row: 8 files after the exclusion (hidden skipped), sorted; picked at 0, 4 (3.5 rounds to 4), 7.
    want = [real_colors["img_0.png"], real_colors["img_4.png"]]
    boxes += [_tile_boxes(sheet, c) for c in want]
    for y0, x0, y1, x1 in boxes:
        assert (y1 - y0, x1 - x0) == (tile, tile)
    assert not np.all(sheet == (255, 0, 0), axis=-1).any()  # the side bands were cropped away
    for c in set(real_colors.values()) - set(want):
        assert not np.all(sheet == c, axis=-1).any(), c
    (ry, *_), (qy, *_) = boxes[0], boxes[3]
    assert [b[0] for b in boxes[:3]] == [ry] * 3 and [b[0] for b in boxes[3:]] == [qy] * 2 and qy >= ry + tile
    xs = [b[1] for b in boxes[:3]]
    assert xs == sorted(xs) and [b[1] for b in boxes[3:]] == xs[:2]  # columns line up
    gray = sheet[qy:qy + tile, xs[2]:xs[2] + tile]  # third real tile: the 16-bit gray image, stretched
    assert np.all(gray[:, : tile // 2 - 4] == 0) and np.all(gray[:, tile // 2 + 4:] == 255)  # (resize ringing)
    # Two rows only: nothing but background below the real row (right of the labels).
    assert np.all(sheet[qy + tile:, xs[0]:] == 255)

    # A missing folder is a one-line user error (exit 2), before anything is written.
    capsys.readouterr()
    missing = tmp_path / "no_such_folder"
    assert main(["show", str(ds.root), "--beside", str(missing), "--out", str(tmp_path / "x.png")]) == EXIT_USER
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(missing) in lines[0] and "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()
    # Everything excluded: a user error naming the exclusion.
    assert main(["show", str(ds.root), "--beside", str(real), "--exclude", "*.png", "--out", str(out)]) == EXIT_USER
    assert "--exclude" in capsys.readouterr().err


def test_show_beside_sample_reference(tmp_path: Path, monkeypatch):
    """`--beside sample:NAME/SPLIT` is materialized and shown (a labeled split: its images/, not its masks/)."""
    from PIL import Image

    from segfactory import sampledata
    from segfactory.cli import main
    from segfactory.formats.dataset import FrameArrays, write_dataset

    zeros8, zeros16 = np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint16)
    classes = [{"id": 0, "name": "background", "color": [0, 0, 0], "thing": False}]
    frame = FrameArrays(np.full((32, 32, 3), (77, 140, 20), np.uint8), zeros8, zeros16, zeros16)
    ds = write_dataset(tmp_path / "ds", [[frame]], classes, family="flat")
    folder = tmp_path / "sample" / "eval"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    Image.fromarray(np.full((32, 32, 3), (1, 2, 3), np.uint8)).save(folder / "images" / "a.png")
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(folder / "masks" / "a.png")
    asked = []

    def fake_materialize(name: str, split: str) -> dict[str, Path]:
        asked.append((name, split))
        return {split: folder}

    monkeypatch.setattr(sampledata, "materialize", fake_materialize)
    out = tmp_path / "sheet.png"
    assert main(["show", str(ds.root), "--beside", "sample:street/eval", "--frames", "2", "--tile", "32",
                 "--out", str(out)]) == 0
    assert asked == [("street", "eval")]
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert _tile_boxes(sheet, (77, 140, 20))[2:] != _tile_boxes(sheet, (1, 2, 3))[2:]
    y0, x0, y1, x1 = _tile_boxes(sheet, (1, 2, 3))
    assert (y1 - y0, x1 - x0) == (32, 32)
    assert np.all(sheet[y0:y1, x1:] == 255)  # one real tile: masks/ holds no images to show


@pytest.mark.render
def test_cells_camera_frames_16bit_offset_and_labels(tmp_path: Path, capsys):
    """configs/cells.yaml as shipped: 12-bit counts plus the 32768 offset in 16-bit PNGs, textured nuclei that stay
    whole in the labels, and show/stats work on it."""
    from scipy import ndimage

    from segfactory.cli import main

    out = tmp_path / "cells16"
    rc = render_cli(str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", "2", "--views", "2",
                    "--resolution", "96", "--workers", "1", "dataset.scenes_per_shard=2",
                    "scene.params.pixel_size=[0.6, 0.6]", "scene.params.density=[15, 18]",
                    "scene.params.nucleoli=[3, 3]")
    assert rc == 0
    check_layout(out, channels=1, bit_depth=16)
    assert check_coco(out) > 4
    ds = open_dataset(out)
    posts = {fr["name"]: fr["post"] for fr in ds.manifest(ds.shard_ids[0])["frames"]}
    for ref in ds.frames():
        f, post = load_frame(ref), posts[ref.name]
        counts = f["rgb"].astype(np.int64) - 32768
        assert post["camera_bits"] == 12 and post["camera_offset"] == 32768
        assert counts.min() >= 0 and counts.max() <= 4095
        nucleus, background = f["semantic"] == 1, f["semantic"] == 0
        assert nucleus.any() and np.median(counts[nucleus]) > np.median(counts[background]) + 20
        assert np.median(counts[background]) > 10  # background glow above the offset, as on real cameras
        # Nucleoli are texture, not objects: a nucleus' mask has no holes, except where another nucleus lies on it.
        for k in np.unique(f["instance"])[1:]:
            m = f["instance"] == k
            holes = ndimage.binary_fill_holes(m) & ~m
            assert np.all(f["semantic"][holes] == 1), (ref.name, int(k))
    capsys.readouterr()
    assert main(["stats", str(out), "--json"]) == 0
    shares = {c["name"]: c["pixel_share"] for c in json.loads(capsys.readouterr().out)["classes"]}
    assert shares["nucleus"] > 0.05 and shares["background"] > 0.2
    assert main(["show", str(out), "--out", str(tmp_path / "sheet.png"), "--frames", "2"]) == 0
    sheet = read_image(tmp_path / "sheet.png")
    assert sheet.ndim == 3 and sheet[..., 0].std() > 20  # auto-contrast: not the flat gray of /257 scaling


@pytest.mark.render
def test_cells_out_of_plane_nuclei_glow_in_the_background_and_keep_the_labels(tmp_path: Path):
    """scene.params.out_of_plane renders nuclei outside the focal plane as light in pixels labeled background:
    the same scenes with and without them have identical class and instance maps, and only the background
    brightens, in blurred blobs (not a uniform offset)."""
    from scipy import ndimage

    args = ["--scenes", "2", "--views", "2", "--resolution", "96", "--workers", "1", "render.samples=2",
            "dataset.scenes_per_shard=2", "scene.params.pixel_size=[0.5, 0.5]", "scene.params.density=[4, 5]",
            "scene.params.dim_fraction=[0, 0]", "scene.params.defocus_fraction=[0, 0]"]
    assert render_cli(str(CONFIGS / "cells.yaml"), "--out", str(tmp_path / "plain"), *args) == 0
    assert render_cli(str(CONFIGS / "cells.yaml"), "--out", str(tmp_path / "oop"), *args,
                      "scene.params.out_of_plane=[2, 2]", "scene.params.out_of_plane_dim=[0.5, 0.5]") == 0
    plain = {ref.name: load_frame(ref) for ref in open_dataset(tmp_path / "plain").frames()}
    oop = {ref.name: load_frame(ref) for ref in open_dataset(tmp_path / "oop").frames()}
    assert plain.keys() == oop.keys() and len(plain) == 4
    glow = []
    for name, a in plain.items():
        b = oop[name]
        assert np.array_equal(a["semantic"], b["semantic"]) and np.array_equal(a["instance"], b["instance"]), name
        bg = a["semantic"] == 0
        smooth = [ndimage.gaussian_filter(f["rgb"].astype(np.float64) - 32768, 3) for f in (a, b)]
        diff = (smooth[1] - smooth[0])[bg]
        glow.append((np.percentile(diff, 95), np.percentile(diff, 5), np.mean(diff > 20)))
    # Seen: 95th percentiles 34-534 counts, 5th -2.6 to -5.6 (shot noise; smoothed over 3 px).
    assert max(hi for hi, _, _ in glow) > 200  # a glow hundreds of counts above the plain background somewhere
    assert all(lo > -15 for _, lo, _ in glow)  # light only adds (up to the noise)
    assert all(share < 0.9 for *_, share in glow)  # in blobs, not all over the background


@pytest.mark.render
def test_cells_pixels_do_not_depend_on_the_scenes_rendered_before(tmp_path: Path):
    """One render process renders many scenes: each scene's textures must be its own, never a previous scene's
    (Cycles' persistent data once served a freed texture's pixels to a new one allocated at the same address)."""
    args = ["--scenes", "6", "--views", "1", "--resolution", "96", "--workers", "2", "render.samples=2",
            "scene.params.pixel_size=[0.6, 0.6]"]
    assert render_cli(str(CONFIGS / "cells.yaml"), "--out", str(tmp_path / "one"), *args,
                      "dataset.scenes_per_shard=6") == 0
    assert render_cli(str(CONFIGS / "cells.yaml"), "--out", str(tmp_path / "each"), *args,
                      "dataset.scenes_per_shard=1") == 0
    one = {ref.name: load_frame(ref)["rgb"] for ref in open_dataset(tmp_path / "one").frames()}
    each = {ref.name: load_frame(ref)["rgb"] for ref in open_dataset(tmp_path / "each").frames()}
    assert one.keys() == each.keys() and len(one) == 6
    for name in one:
        assert np.array_equal(one[name], each[name]), name


@pytest.mark.render
def test_street_dataset_layout_and_coco(rendered_street_dataset: Path, capsys):
    check_layout(rendered_street_dataset, channels=3, bit_depth=8)
    assert check_coco(rendered_street_dataset) > 0
    from segfactory.cli import main

    capsys.readouterr()  # drop pycocotools' chatter

    assert main(["stats", str(rendered_street_dataset), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    shares = {c["name"]: c["pixel_share"] for c in stats["classes"]}
    assert abs(sum(shares.values()) + stats["ignore_share"] - 1) < 1e-9
    assert shares["road"] > 0.05 and shares["sky"] > 0.01


@pytest.mark.render
def test_street_frames_record_their_camera_kind(rendered_street_dataset: Path):
    import yaml

    from scenes import SceneConfig, resolve_scene, sample_scene, scene_rng
    from scenes.street import CAMERA_KINDS

    cfg = yaml.safe_load((rendered_street_dataset / "config.yaml").read_text())
    resolved = resolve_scene(SceneConfig.model_validate(cfg["scene"]))
    ds = open_dataset(rendered_street_dataset)
    frames = [f for sid in ds.shard_ids for f in ds.manifest(sid)["frames"]]
    assert len(frames) == 8
    specs: dict[int, object] = {}
    for f in frames:
        assert f["camera"]["kind"] in CAMERA_KINDS, f["name"]
        # The kind the scene's own sample placed that view's camera as (sampled again from the frame's seed).
        seed, scene = f["seed"]
        if scene not in specs:
            specs[scene] = sample_scene(resolved, scene_rng(seed, scene), cfg["render"]["views"],
                                        cfg["render"]["resolution"])
        assert specs[scene].cameras[f["view"]].kind == f["camera"]["kind"]  # type: ignore[attr-defined]


@pytest.mark.render
def test_tabletop_with_user_mesh_16bit(tmp_path: Path):
    mesh = tmp_path / "duck.glb"
    trimesh.creation.capsule(height=1.0, radius=0.4).export(mesh)
    out = tmp_path / "tabletop"
    cfg = tmp_path / "tabletop.yaml"
    cfg.write_text((CONFIGS / "tabletop.yaml").read_text().replace(
        "user_meshes: []", f"user_meshes: [{{path: '{mesh}', class_name: duck, count: [2, 2]}}]").replace(
        "extra_classes: []", "extra_classes: [duck]"))
    rc = render_cli(str(cfg), "--out", str(out), "--scenes", "2", "--views", "1", "--resolution", "64",
                    "--workers", "1", "output.bit_depth=16", "render.samples=4")
    assert rc == 0
    check_layout(out, channels=3, bit_depth=16)
    check_coco(out)
    ds = open_dataset(out)
    duck = next(c["id"] for c in ds.classes if c["name"] == "duck")
    assert any((load_frame(r)["semantic"] == duck).any() for r in ds.frames())


@pytest.mark.render
def test_same_config_and_seed_give_identical_labels(rendered_cells_dataset: Path, tmp_path: Path):
    """Re-render the first shard of the fixture elsewhere: its id and every label file are identical."""
    out = tmp_path / "again"
    rc = render_cli(str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", "4", "--views", "2",
                    "--resolution", "64", "--workers", "1", "dataset.scenes_per_shard=4", *CELLS_TINY)
    assert rc == 0
    a, b = open_dataset(rendered_cells_dataset), open_dataset(out)
    assert b.shard_ids[0] == a.shard_ids[0] and a.meta["config_hash"] == b.meta["config_hash"]
    fa, fb = a.manifest(a.shard_ids[0])["frames"], b.manifest(b.shard_ids[0])["frames"]
    for x, y in zip(fa, fb, strict=True):
        for key in ("semantic", "instance", "depth"):
            assert x["files"][key]["sha256"] == y["files"][key]["sha256"], (x["name"], key)
    # A different seed gives different shards; the dataset is then the new seed's scenes only (the old shard
    # stays on disk, unlisted, and is reused when the old seed comes back).
    seed0 = b.shard_ids[0]
    rc = render_cli(str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", "4", "--views", "2",
                    "--resolution", "64", "--workers", "1", "--seed", "1", "dataset.scenes_per_shard=4", *CELLS_TINY)
    seed1 = open_dataset(out).shard_ids
    assert rc == 0 and len(seed1) == 1 and seed1 != [seed0] and (out / "shards" / seed0 / "manifest.json").is_file()
    assert len(open_dataset(out)) == 8 and read_json(out / "dataset.json")["num_frames"] == 8


def _render_small(out: Path, scenes: int = 3, workers: int = 2, *extra: str) -> int:
    return render_cli(str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", str(scenes), "--views", "1",
                      "--resolution", "48", "--workers", str(workers), "dataset.scenes_per_shard=1",
                      "render.samples=2", *extra)


@pytest.mark.render
def test_resume_renders_only_missing_shards(tmp_path: Path, capsys):
    out = tmp_path / "ds"
    assert _render_small(out) == 0
    ds = open_dataset(out)
    first = {s: ds.manifest(s)["created"] for s in ds.shard_ids}
    # Simulate an interrupted write: a half-written temp dir and a shard that lost its commit mark.
    (out / "shards" / ".tmp-cells-000009-deadbeef-12345678" / "rgb").mkdir(parents=True)
    victim = ds.shard_ids[1]
    (ds.shard_dir(victim) / "manifest.json").unlink()
    capsys.readouterr()
    assert _render_small(out) == 0
    err = capsys.readouterr().err
    assert "2 already done, 1 to render" in err and "removed 1 unfinished" in err
    ds2 = open_dataset(out)
    assert ds2.shard_ids == ds.shard_ids
    assert all(ds2.manifest(s)["created"] == first[s] for s in ds.shard_ids if s != victim)
    assert not list((out / "shards").glob(".tmp-*"))
    check_layout(out, channels=1, bit_depth=16)


@pytest.mark.render
def test_other_sizes_and_shard_sizes_never_duplicate_scenes(tmp_path: Path, capsys):
    """Growing a dataset whose last shard was partial, or changing the shard size, re-plans the shards: the
    dataset lists each scene exactly once, and shards of the earlier plan stay on disk unlisted."""
    out = tmp_path / "ds"
    assert _render_small(out, 3, 2, "dataset.scenes_per_shard=2") == 0  # [0, 2) [2, 3)
    assert _render_small(out, 4, 2, "dataset.scenes_per_shard=2") == 0  # [0, 2) reused, [2, 4) new
    capsys.readouterr()
    ds = open_dataset(out)
    scenes = [fr["scene_index"] for s in ds.shard_ids for fr in ds.manifest(s)["frames"]]
    assert sorted(scenes) == [0, 1, 2, 3] and len(list((out / "shards").iterdir())) == 3
    assert _render_small(out, 3, 2, "dataset.scenes_per_shard=2") == 0  # back to 3 scenes: nothing to render
    err = capsys.readouterr().err
    assert "2 already done, 0 to render" in err and "1 committed shard(s)" in err
    assert sorted(fr["scene_index"] for s in open_dataset(out).shard_ids
                  for fr in open_dataset(out).manifest(s)["frames"]) == [0, 1, 2]


@pytest.mark.render
def test_crashing_shard_is_reported_and_others_finish(tmp_path: Path, monkeypatch, capsys):
    out = tmp_path / "ds"
    monkeypatch.setenv("SEGFACTORY_FAULT", "crash@1")
    rc = _render_small(out, 3, 2, "execution.retries=1")
    err = capsys.readouterr().err
    assert rc == EXIT_PARTIAL
    ds = open_dataset(out)
    assert len(ds.shard_ids) == 2
    failed = re.findall(r"(cells-000001-[0-9a-f]{10})", err)
    assert failed and failed[0] not in ds.shard_ids and "SIGABRT" in err
    assert not list((out / "shards").glob(".tmp-*")) or all(
        not (p / "manifest.json").exists() for p in (out / "shards").glob(".tmp-*"))
    monkeypatch.delenv("SEGFACTORY_FAULT")
    assert _render_small(out, 3, 2) == 0
    assert failed[0] in open_dataset(out).shard_ids


def test_render_scratch_is_removed_whatever_the_child_did_and_dead_owners_scratch_is_swept(tmp_path: Path,
                                                                                           monkeypatch):
    import pipelines.render as render
    from synth.shard import SCRATCH_ENV, SCRATCH_PREFIX

    monkeypatch.setattr(render, "scratch_root", lambda: str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{SCRATCH_PREFIX}{dead.pid}-k1ll3d"  # its Dask worker was SIGKILLed mid-render
    (stale / "blender_abc123").mkdir(parents=True)
    (stale / "pass0001.exr").write_bytes(b"x" * 1000)
    live = tmp_path / f"{SCRATCH_PREFIX}{os.getppid()}-alive0"  # another worker's render, running
    live.mkdir()
    other = tmp_path / f"{SCRATCH_PREFIX}x8y9z0ab"  # not ours to judge (no owner pid in its name)
    other.mkdir()
    with pytest.raises(RuntimeError, match="killed"), render.render_scratch() as env:
        scratch = Path(env[SCRATCH_ENV])
        assert env["TMPDIR"] == str(scratch) and scratch.parent == tmp_path and scratch.is_dir()
        assert scratch.name.startswith(f"{SCRATCH_PREFIX}{os.getpid()}-")
        (scratch / "blender_def456").mkdir()
        raise RuntimeError("render killed at its timeout")
    assert not scratch.exists() and not stale.exists()
    assert live.is_dir() and other.is_dir()


def test_segfactory_scratch_root_moves_render_scratch(tmp_path: Path, monkeypatch):
    """``SEGFACTORY_SCRATCH_ROOT`` (a small /dev/shm, as Docker's 64 MB; a test's own scratch) is where a render
    task makes its scratch dir."""
    import pipelines.render as render
    from synth.shard import SCRATCH_ENV, SCRATCH_ROOT_ENV

    monkeypatch.setenv(SCRATCH_ROOT_ENV, str(tmp_path))
    with render.render_scratch() as env:
        assert Path(env[SCRATCH_ENV]).parent == tmp_path and Path(env[SCRATCH_ENV]).is_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.render
def test_a_render_process_removes_blenders_session_temp_dir_before_its_os_exit(tmp_path: Path):
    code = ("import os, bpy\nfrom synth.bproc_boot import purge_blender_tempdir\n"
            "assert os.path.isdir(bpy.app.tempdir), bpy.app.tempdir\npurge_blender_tempdir()\nos._exit(0)")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.render
@pytest.mark.slow  # waits out a 25 s render timeout
def test_hanging_shard_is_killed_at_timeout_and_retried(tmp_path: Path, monkeypatch, capsys):
    from synth.shard import SCRATCH_PREFIX, SCRATCH_ROOT_ENV

    out = tmp_path / "ds"
    monkeypatch.setenv("SEGFACTORY_FAULT", "hang@0,hang-once@1")
    tmp = tmp_path / "tmp"  # the workers' and render processes' TMPDIR: Blender's session temp dirs went here
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    # A scratch root of this test's own: renders of tests on another pytest-xdist worker use /dev/shm meanwhile.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv(SCRATCH_ROOT_ENV, str(scratch))
    rc = _render_small(out, 2, 2, "execution.timeout_s=25", "execution.retries=1")
    # Killed renders (a timeout, after a frame was written) and finished ones (which end with os._exit) leave no
    # scratch dir (their EXR passes) and no Blender temp dir behind.
    assert not list(scratch.glob(f"{SCRATCH_PREFIX}*"))
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("blender_")]
    err = capsys.readouterr().err
    assert rc == EXIT_PARTIAL
    assert re.search(r"cells-000000-[0-9a-f]{10}.*timed out after 25s", err.replace("\n", " "))
    ds = open_dataset(out)
    assert [s.split("-")[1] for s in ds.shard_ids] == ["000001"]  # hung once, retried, finished
    assert_hang_children_gone(out)  # the whole process group was killed, not only the render process


def test_bad_inputs_stop_before_rendering(tmp_path: Path, capsys):
    from segfactory.cli import main

    street = str(CONFIGS / "street.yaml")
    cases = [
        ([street, "--out", str(tmp_path / "a"), "scene.family=stret"], "did you mean 'street'"),
        ([street, "--out", str(tmp_path / "b"), "--scenes", "-2"], "dataset.scenes=-2"),
        ([str(CONFIGS / "tabletop.yaml"), "--out", str(tmp_path / "c"),
          "scene.params.user_meshes=[{path: /no/such.obj, class_name: mug}]"], "does not exist"),
        ([str(CONFIGS / "tabletop.yaml"), "--out", str(tmp_path / "d"),
          f"scene.params.user_meshes=[{{path: {CONFIGS / 'street.yaml'}, class_name: mug}}]"], "unsupported type"),
        ([str(CONFIGS / "tabletop.yaml"), "--out", str(tmp_path / "e"),
          f"scene.params.user_meshes=[{{path: {tmp_path / 'x.obj'}, class_name: spoon}}]"], "not a known class"),
    ]
    (tmp_path / "x.obj").write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    cases.append(([street, "--out", str(blocker / "sub")], "not writable"))
    for args, needle in cases:
        assert main(["render", *args]) == EXIT_USER, args
        err = capsys.readouterr().err
        assert needle in err and "fix:" in err, (needle, err)
        assert "Traceback" not in err
    assert not any((tmp_path / d).exists() and any((tmp_path / d).iterdir()) for d in "abcde")


@pytest.mark.render
def test_existing_dataset_of_other_config_is_refused(rendered_cells_dataset: Path, capsys):
    from segfactory.cli import main

    rc = main(["render", str(CONFIGS / "cells.yaml"), "--out", str(rendered_cells_dataset), "--resolution", "96"])
    assert rc == EXIT_USER
    assert "different config" in capsys.readouterr().err


# With the default color settings the denoiser softens a few edge pixels of the RGB itself (emission has no
# albedo to guide it), so the color-derived map, not the labels, loses a little; a 1 px shift still scores ~97 %.
@pytest.mark.parametrize(("settings", "min_agreement"), [([], 0.999), (["--defaults"], 0.998)],
                         ids=["clean-256-samples", "default-render-settings"])
@pytest.mark.render
def test_label_alignment_with_rgb(settings: list[str], min_agreement: float):
    """Flat emission colors: the color-derived class map agrees with the label map on >= 99.9 % of pixels of a
    clean render, while the same labels shifted by one pixel would not; and the default color settings that
    datasets are rendered with (few adaptive samples plus denoising) stay far from a shift too."""
    out = subprocess.run([sys.executable, "-m", "synth.alignment", "--resolution", "128", "--views", "3", *settings],
                         capture_output=True, text=True, timeout=300, env={**os.environ})
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("SEGFACTORY-RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["edge_pixels"] > 1000  # the scene has plenty of edges to get wrong
    assert result["agreement"] >= min_agreement, result
    assert result["agreement_if_shifted_1px"] < 0.99, result
