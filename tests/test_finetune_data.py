"""Fine-tuning data: normalisation parity, class remapping, real folders, bad inputs, per-batch mixing.

Real images only: scikit-image's coins photograph with masks derived by Otsu thresholding
(``finetune.samples``), and the session's ``tiny_dataset`` (cells-like frames in the real dataset format).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from finetune.config import FinetuneConfig, SourceSpec
from finetune.data.mixing import MixedBatchSampler, WindowDataset, batch_counts, collate, random_window
from finetune.data.normalize import to_unit
from finetune.data.remap import build_remap, make_targets
from finetune.data.sources import open_source, open_training_sources, resolve_targets, split_items, subset_items
from finetune.samples import coins_image_and_mask, make_coins_folder, skimage_data_path
from segfactory.errors import UserError
from segfactory.formats.imagefile import read_image, read_mask

CELLS = [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"}, {"id": 2, "name": "debris"}]


@pytest.fixture(scope="module")
def coins_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coins_folder(tmp_path_factory.mktemp("coins") / "real", n=10, size=64, seed=3)


# ------------------------------------------------------------------------------------------ normalisation
def test_8_and_16_bit_gray_and_rgb_normalise_identically(tmp_path: Path) -> None:
    img8, _ = coins_image_and_mask()
    img16 = img8.astype(np.uint16) * 257  # exact 8 -> 16 bit expansion: v/255 == 257v/65535
    cv2.imwrite(str(tmp_path / "g8.png"), img8)
    cv2.imwrite(str(tmp_path / "g16.png"), img16)
    tifffile.imwrite(tmp_path / "rgb16.tif", np.repeat(img16[..., None], 3, 2))
    cv2.imwrite(str(tmp_path / "rgb8.png"), np.repeat(img8[..., None], 3, 2))
    reads = {n: read_image(tmp_path / n) for n in ("g8.png", "g16.png", "rgb16.tif", "rgb8.png")}
    assert reads["g16.png"].dtype == np.uint16 and reads["g16.png"].ndim == 2
    assert reads["rgb16.tif"].dtype == np.uint16 and reads["rgb16.tif"].shape == (*img8.shape, 3)
    ref3 = to_unit(reads["g8.png"], 3)
    ref1 = to_unit(reads["g8.png"], 1)
    assert ref3.shape == (3, *img8.shape) and ref1.shape == (1, *img8.shape)
    for name, arr in reads.items():
        np.testing.assert_allclose(to_unit(arr, 3), ref3, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(to_unit(arr, 1), ref1, atol=1e-5, err_msg=name)
    assert ref3.min() >= 0.0 and ref3.max() <= 1.0


@pytest.mark.parametrize("scaling", ["minmax", "percentile"])
def test_per_image_scaling_uses_whole_image_range_for_crops(scaling: str) -> None:
    img8, _ = coins_image_and_mask()
    img16 = (img8.astype(np.uint16) * 16 + 1000)  # a 12-bit sensor's range inside 16 bit
    full = to_unit(img16, 1, scaling)
    assert full.min() == 0.0 and full.max() == 1.0
    if scaling == "percentile":  # 0.5 % of pixels on each side are clipped
        assert 0.004 < (full == 0).mean() < 0.02 and 0.004 < (full == 1).mean() < 0.02
    rng = np.random.default_rng(0)
    x, _ = random_window(img16, np.zeros(img16.shape, np.uint8), 64, rng, 1, scaling, 255)
    rng = np.random.default_rng(0)
    y0 = int(rng.integers(0, img16.shape[0] - 64 + 1))
    x0 = int(rng.integers(0, img16.shape[1] - 64 + 1))
    np.testing.assert_allclose(x, full[:, y0:y0 + 64, x0:x0 + 64], atol=1e-6)


def test_rgba_drops_alpha_and_palette_masks_give_indices(tmp_path: Path) -> None:
    from PIL import Image

    rgb = read_image(skimage_data_path("astronaut.png"))
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], 2)
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    _, mask = coins_image_and_mask()
    pal = Image.fromarray(mask, mode="L").convert("P")
    pal.putpalette([0, 0, 0, 255, 200, 0] + [9] * (254 * 3))
    pal.save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask)
    Image.fromarray(rgb).save(tmp_path / "rgbmask.png")
    with pytest.raises(UserError, match="RGB image, not class ids"):
        read_mask(tmp_path / "rgbmask.png")



@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_a_float_tiff_mask_says_it_holds_floats_and_how_to_save_class_ids(tmp_path: Path, dtype: str) -> None:
    """A float TIFF mask was "a F image, not class ids" (fix: save PNGs) or, float16/64, "cannot read mask"; the
    one line now says the file holds floats, why that is no class mask, and what to save."""
    _, mask = coins_image_and_mask()  # class ids 0/1 of the coins photo, as a tool might save them: floats
    path = tmp_path / f"coins_{dtype}.tif"
    tifffile.imwrite(path, mask.astype(dtype))
    with pytest.raises(UserError) as e:
        read_mask(path)
    assert e.value.message == (f"mask '{path}' has floating-point pixels ({dtype}): a class mask holds whole class "
                               "ids (0, 1, 2, ...), and float values (probabilities, resampled or scaled labels) are "
                               "not ids")
    assert e.value.fix == ("save the mask's integer class ids as uint8 (uint16 above 255 ids), e.g. "
                           "tifffile.imwrite(path, np.rint(mask).astype(np.uint8)), or as a PNG")
    tifffile.imwrite(path, mask.astype(np.uint16))  # as the fix says: read as the class ids
    np.testing.assert_array_equal(read_mask(path), mask)


# ------------------------------------------------------------------------------------------ remapping
def test_several_source_classes_onto_one_target_and_ignore() -> None:
    targets = make_targets([{"id": 0, "name": "background"}, {"id": 1, "name": "object"}])
    source = [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"}, {"id": 2, "name": "debris"},
              {"id": 3, "name": "bubble"}]
    remap = build_remap(source, 255, targets, {"nucleus": "object", 2: "object", "bubble": "ignore"}, "src", "r")
    mask = np.array([[0, 1, 2, 3, 255]], np.uint8)
    np.testing.assert_array_equal(remap.apply(mask, "m.png", "error"), [[0, 1, 1, 255, 255]])
    assert remap.mapping["debris (2)"] == "object" and remap.mapping["bubble (3)"] == "ignore"


def test_unknown_mask_values_error_names_file_and_value_or_map_to_ignore() -> None:
    targets = make_targets(CELLS)
    remap = build_remap(CELLS, 255, targets, {}, "src", "r")
    mask = np.array([[0, 1, 7], [2, 300, 255]], np.int32)
    with pytest.raises(UserError, match=r"mask 'dir/x\.png' holds class id\(s\) 7, 300 outside its class map"):
        remap.apply(mask, "dir/x.png", "error")
    np.testing.assert_array_equal(remap.apply(mask, "dir/x.png", "ignore"), [[0, 1, 255], [2, 255, 255]])


def test_remap_typos_and_unmapped_classes_are_one_line_errors() -> None:
    targets = make_targets([{"id": 0, "name": "background"}, {"id": 1, "name": "object"}])
    with pytest.raises(UserError, match="'nucleuss' is not a class of src") as e:
        build_remap(CELLS, 255, targets, {"nucleuss": "object"}, "src", "data.synthetic[0].remap")
    assert "nucleus (1)" in e.value.fix
    with pytest.raises(UserError, match="target 'objekt'"):
        build_remap(CELLS, 255, targets, {"nucleus": "objekt"}, "src", "r")
    with pytest.raises(UserError, match=r"class 'nucleus' \(id 1\) of src has no target class") as e:
        build_remap(CELLS, 255, targets, {}, "src", "data.synthetic[0].remap")
    assert "data.synthetic[0].remap" in e.value.fix


# ------------------------------------------------------------------------------------------ sources
def test_real_folder_classes_split_and_nested_subsets(coins_dir: Path) -> None:
    targets = make_targets(CELLS)
    spec = SourceSpec(path=coins_dir, remap={"coin": "nucleus"})
    src = open_source(spec, "real", targets, "train", val_fraction=0.2)
    assert len(src.train) == 8 and len(src.val) == 2
    img, mask = src.load(src.train[0])
    assert img.shape == mask.shape == (64, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1, 255}
    again = open_source(spec, "real", targets, "train", val_fraction=0.2)
    assert [i.key for i in again.val] == [i.key for i in src.val]  # stable split
    items = src.train
    small, big = subset_items(items, 0.3, None), subset_items(items, 0.6, None)
    assert len(small) == 3 and len(big) == 5 and {i.key for i in small} <= {i.key for i in big}
    assert subset_items(items, 0.0, None) == []
    tr, va = split_items(items, 0.5, 1)
    assert len(va) == 1 and len(tr) == len(items) - 1


def test_image_mask_size_mismatch_is_reported_with_both_files(tmp_path: Path, coins_dir: Path) -> None:
    d = tmp_path / "bad"
    shutil.copytree(coins_dir, d)
    m = d / "masks" / "coins_004.png"
    cv2.imwrite(str(m), read_mask(m)[:50, :60].astype(np.uint8))
    with pytest.raises(UserError, match=r"image '.*coins_004\.png' is 64x64 but its mask '.*coins_004\.png' is 60x50"):
        open_source(SourceSpec(path=d, remap={"coin": "nucleus"}), "real", make_targets(CELLS), "train")


def test_real_mask_with_unknown_id_fails_before_training(tmp_path: Path, coins_dir: Path) -> None:
    d = tmp_path / "bad"
    shutil.copytree(coins_dir, d)
    m = d / "masks" / "coins_002.png"
    arr = read_mask(m)
    arr[3, 3] = 9
    cv2.imwrite(str(m), arr)
    spec = SourceSpec(path=d, remap={"coin": "nucleus"})
    with pytest.raises(UserError, match=r"coins_002\.png' holds class id\(s\) 9"):
        open_source(spec, "real", make_targets(CELLS), "train")
    src = open_source(spec.model_copy(update={"on_unknown": "ignore"}), "real", make_targets(CELLS), "eval")
    item = next(i for i in src.val if i.key == "coins_002")
    assert src.load(item)[1][3, 3] == 255


def test_empty_and_wrong_kind_sources(tmp_path: Path, coins_dir: Path, tiny_dataset: Path) -> None:
    targets = make_targets(CELLS)
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(UserError, match="has no images"):
        open_source(SourceSpec(path=tmp_path / "empty"), "real", targets, "train")
    # A dataset whose shards never committed (no manifest) has no frames.
    ds = tmp_path / "uncommitted"
    (ds / "shards" / "000000").mkdir(parents=True)
    shutil.copy(tiny_dataset / "dataset.json", ds / "dataset.json")
    with pytest.raises(UserError, match="has no committed frames"):
        open_source(SourceSpec(path=ds), "synthetic", targets, "train")
    with pytest.raises(UserError, match="is a synthetic source but was given as real") as e:
        open_source(SourceSpec(path=tiny_dataset), "real", targets, "train")
    assert "--synthetic" in e.value.fix
    with pytest.raises(UserError, match="neither a segfactory dataset"):
        open_source(SourceSpec(path=tmp_path / "empty" / "images"), "real", targets, "train")
    with pytest.raises(UserError, match="no training data"):
        resolve_targets(FinetuneConfig())
    # A missing folder names the config field it came from (e.g. the example path in configs/finetune.yaml).
    with pytest.raises(UserError, match=r"'.*no-such' \(data\.real\[0\]\) does not exist") as e:
        resolve_targets(FinetuneConfig.model_validate({"data": {"synthetic": [{"path": str(tiny_dataset)}],
                                                                "real": [{"path": str(tmp_path / "no-such")}]}}))
    assert "data.real=[]" in e.value.fix
    (coins_dir / "masks" / "coins_009.png").rename(tmp_path / "moved.png")
    try:
        with pytest.raises(UserError, match=r"coins_009\.png' has no mask"):
            open_source(SourceSpec(path=coins_dir), "real", targets, "train")
    finally:
        (tmp_path / "moved.png").rename(coins_dir / "masks" / "coins_009.png")


def test_rendered_dataset_as_source(tiny_dataset: Path, coins_dir: Path) -> None:
    cfg = FinetuneConfig.model_validate({"data": {
        "synthetic": [{"path": str(tiny_dataset), "weight": 3}],
        "real": [{"path": str(coins_dir), "remap": {"coin": "nucleus"}}], "val_fraction": 0.25}})
    targets = resolve_targets(cfg)
    assert targets.names == [c["name"] for c in json.loads((tiny_dataset / "dataset.json").read_text())["classes"]]
    train, _ = open_training_sources(cfg, targets)
    assert [s.kind for s in train] == ["synthetic", "real"] and [s.weight for s in train] == [3, 1]
    syn = train[0]
    assert len(syn.train) + len(syn.val) == 16 and len(syn.val) == 4
    img, mask = syn.load(syn.train[0])
    assert img.shape[:2] == mask.shape == (64, 64)
    assert set(np.unique(mask)) <= {0, 1, 2, 255}
    ds = WindowDataset(train, 64, 3, "dtype", seed=0)
    sampler = MixedBatchSampler([len(s.train) for s in train], [s.weight for s in train], 8, 0, 0, 3)
    for refs in sampler:
        batch = collate([ds[r] for r in refs])
        assert batch["image"].shape == (8, 3, 64, 64) and batch["mask"].shape == (8, 64, 64)
        assert batch["image"].dtype.is_floating_point and float(batch["image"].min()) >= 0
        assert sorted(batch["source"].tolist()) == [0] * 6 + [1] * 2  # 3:1 of 8


def test_rendered_split_keeps_scenes_whole_and_ignores_the_render_key(tmp_path: Path) -> None:
    """A scene's views are never split between train and val, and the same scenes re-rendered under another
    render key (other shard ids) validate on the same scenes."""
    from procedural import write_cells_dataset

    targets = make_targets(CELLS)
    splits = []
    for name, per_shard in (("a", 4), ("b", 3)):
        path = write_cells_dataset(tmp_path / name, scenes=10, views=2, size=32, scenes_per_shard=per_shard)
        src = open_source(SourceSpec(path=path), "synthetic", targets, "train", val_fraction=0.2)
        assert len(src.val) == 4 and len(src.train) == 16
        val_units = {it.unit for it in src.val}
        assert len(val_units) == 2 and not val_units & {it.unit for it in src.train}
        splits.append((val_units, {it.key.split("/")[0] for it in src.val}))
    assert splits[0][0] == splits[1][0]  # the same scenes ...
    assert not splits[0][1] & splits[1][1]  # ... under other shard ids


# ------------------------------------------------------------------------------------------ mixing
def test_batch_counts_follow_ratios_exactly_on_average() -> None:
    w = np.array([0.7, 0.2, 0.1])
    total = np.zeros(3)
    for s in range(1000):
        c = batch_counts(w, 6, seed=1, step=s)
        assert c.sum() == 6 and np.all(c >= np.floor(w * 6))
        total += c
    np.testing.assert_allclose(total / total.sum(), w, atol=0.01)


def test_sampler_resume_replays_the_same_batches_and_covers_every_item() -> None:
    sizes, weights = [5, 3], [0.5, 0.5]
    full = list(MixedBatchSampler(sizes, weights, 4, 7, 0, 10))
    tail = list(MixedBatchSampler(sizes, weights, 4, 7, 6, 10))
    assert full[6:] == tail
    src0 = [r.item for b in full for r in b if r.source == 0]
    assert sorted(src0[:5]) == list(range(5)) and sorted(src0[5:10]) == list(range(5))  # epoch = permutation
    other = list(MixedBatchSampler(sizes, weights, 4, 8, 0, 10))
    assert other != full


def test_on_unknown_ignore_says_once_which_values_pixels_and_files_it_drops(tmp_path: Path, coins_dir: Path,
                                                                             capsys) -> None:
    """`on_unknown=ignore` turned mask values outside the class map into ignore without a word: loading a real
    source now says them in one line (values, pixels, masks), and training's loads add nothing."""
    d = tmp_path / "unknown"
    shutil.copytree(coins_dir, d)
    for stem, value in (("coins_002", 9), ("coins_005", 9), ("coins_007", 40)):
        m = d / "masks" / f"{stem}.png"
        arr = read_mask(m)
        arr[:2, :3] = value  # 6 pixels each
        cv2.imwrite(str(m), arr)
    capsys.readouterr()
    spec = SourceSpec(path=d, remap={"coin": "nucleus"}, on_unknown="ignore")
    src = open_source(spec, "real", make_targets(CELLS), "train", val_fraction=0.2)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"note: real source '{d}': mask value(s) 9 (12 px), 40 (6 px) are outside its class map "
                     "(known: 0, 1, 255): 18 pixel(s) in 3 of 10 mask(s) are ignored (on_unknown=ignore)"]
    for it in src.train + src.val:
        src.load(it)
    assert capsys.readouterr().err == ""  # no note per sample
    # The fine-tune's data.json records it too (the note was only on stderr, gone with the terminal).
    assert src.describe()["unknown_ignored"] == {"values": {"9": 12, "40": 6}, "pixels": 18, "masks": 3, "of": 10}
    clean = open_source(spec.model_copy(update={"path": coins_dir}), "real", make_targets(CELLS), "train")
    assert capsys.readouterr().err == ""  # nothing dropped, nothing said
    assert "unknown_ignored" not in clean.describe()


def test_real_flag_fills_a_config_entry_with_a_remap_but_no_path(tmp_path: Path, coins_dir: Path) -> None:
    """`data.real: [{remap: {...}}]` + `segfactory finetune ... --real DIR` failed with "data.real.0.path is
    missing": the flag now gives that entry its folder and the entry keeps its remap and weight."""
    import yaml

    from segfactory.cli import main

    cfg = tmp_path / "remap_only.yaml"
    cfg.write_text(yaml.safe_dump({"extends": str(Path(__file__).resolve().parent.parent / "configs" /
                                                  "finetune_tiny.yaml"),
                                   "classes": CELLS, "data": {"real": [{"remap": {"coin": "nucleus"}, "weight": 2}],
                                                              "val_fraction": 0}}))
    out = tmp_path / "run"
    assert main(["finetune", str(cfg), "--real", str(coins_dir), "--out", str(out), "--steps", "1"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())["data"]["real"]
    assert [(e["path"], e["remap"], e["weight"]) for e in saved] == [(str(coins_dir), {"coin": "nucleus"}, 2.0)]
