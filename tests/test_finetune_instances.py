"""Instances for free (:mod:`finetune.instances`): exact distance targets from hand-made instance maps, the
augmentation keeping them exact, seeded watershed splitting known touching objects, predict's instance PNGs and
COCO file (decoded by pycocotools), evaluate's watershed row on hand-made masks, ONNX, and the bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.augment import GpuAugment
from finetune.config import AugmentConfig
from finetune.instances import (
    CALIBRATION_MIN_SIZE,
    CALIBRATION_SEED_H,
    batch_targets,
    calibrate_postprocess,
    component_instances,
    distance_targets,
    postprocess,
    watershed_instances,
)
from finetune.metrics import iou_matrix
from segfactory.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "finetune_tiny.yaml")


def cli(capsys: pytest.CaptureFixture | None, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    if capsys is None:
        return rc, "", ""
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def brute_distance(inst: np.ndarray) -> np.ndarray:
    """The definition, pixel by pixel: distance to the nearest pixel not of the same instance (the frame's
    outside counts as such), divided by the instance's largest such distance."""
    h, w = inst.shape
    pad = np.pad(inst, 1, constant_values=0)
    ys, xs = np.mgrid[0:h + 2, 0:w + 2]
    out = np.zeros((h, w), np.float64)
    for i in np.unique(inst[inst > 0]):
        other = pad != i
        oy, ox = ys[other], xs[other]
        for y, x in zip(*np.nonzero(inst == i), strict=True):
            out[y, x] = np.sqrt(((oy - (y + 1)) ** 2 + (ox - (x + 1)) ** 2).min())
        out[inst == i] /= out[inst == i].max()
    return out


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


# ------------------------------------------------------------------------------------------------ targets
def test_distance_targets_of_touching_squares_are_exact() -> None:
    inst = np.zeros((9, 14), np.int32)
    inst[1:8, 1:8] = 7        # 7x7 square: the centre is 4 px from the outside
    inst[2:7, 8:13] = 3       # 5x5 square touching it on the right: centre 3 px
    inst[0, 13] = 9           # one pixel in the frame's corner: the frame border is a boundary too
    d = distance_targets(inst)
    assert d.dtype == np.float32
    np.testing.assert_allclose(d, brute_distance(inst), atol=1e-6)
    assert d[4, 4] == 1 and d[4, 10] == 1 and d[0, 13] == 1
    # Where the squares touch, both sides are one pixel from the other object: 1/4 and 1/3 of their peaks.
    assert d[4, 7] == pytest.approx(1 / 4) and d[4, 8] == pytest.approx(1 / 3)
    assert (d[inst == 0] == 0).all() and (d[inst > 0] > 0).all()


def test_targets_of_random_instance_maps_match_the_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(3):
        inst = np.kron(rng.integers(0, 4, (4, 5)), np.ones((3, 3), np.int64))  # blocks of ids, touching
        np.testing.assert_allclose(distance_targets(inst), brute_distance(inst), atol=1e-6)


def test_batch_targets_keep_only_thing_objects_and_mark_unknown_pixels() -> None:
    inst = torch.tensor([[[1, 1, 2, 2, -1], [1, 1, 2, 2, -1]]])
    mask = torch.tensor([[[1, 1, 2, 2, 255], [1, 1, 2, 255, 255]]])   # instance 2 lies on class 2 (a stuff class)
    tgt, valid = batch_targets(inst, mask, things=[1], ignore_index=255)
    assert tgt.shape == valid.shape == (1, 1, 2, 5)
    np.testing.assert_allclose(tgt[0, 0].numpy(), distance_targets(np.array([[1, 1, 0, 0, 0], [1, 1, 0, 0, 0]])))
    assert valid[0, 0].tolist() == [[True] * 4 + [False], [True] * 3 + [False] * 2]


def test_augmentation_warps_instance_maps_exactly_like_class_maps() -> None:
    """Class = a function of the instance id before augmentation, so it must stay one after (same affine, nearest);
    pixels from outside the window are unknown (-1) exactly where the class map says ignore."""
    rng = np.random.default_rng(1)
    inst = torch.from_numpy(np.kron(rng.integers(0, 50, (2, 8, 8)), np.ones((8, 8), np.int64)))  # (2, 64, 64)
    cls = (inst % 3).to(torch.uint8)
    aug = GpuAugment(AugmentConfig(crop_size=64, zoom=(0.6, 1.6), rotate_p=1.0, rotate_deg=30, vflip=0.5))
    params = aug.sample(2, torch.Generator().manual_seed(3))
    img = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    _, y = aug.apply(img, cls, params)
    w = aug.warp_ids(inst, params, 64)
    assert w.shape == y.shape == (2, 64, 64)
    known = w >= 0
    assert torch.equal(known, y != 255) and (~known).any() and known.float().mean() > 0.3
    assert torch.equal(y[known], w[known] % 3)
    # The targets are then derived from the warped map: exact for what the network sees.
    np.testing.assert_allclose(distance_targets(w[0].numpy()), brute_distance(np.maximum(w[0].numpy(), 0)),
                               atol=1e-6)


# ------------------------------------------------------------------------------------------------ post-processing
def test_watershed_splits_touching_discs_that_connected_components_merge() -> None:
    shape = (48, 72)
    truth = np.zeros(shape, np.int32)
    truth[disc(shape, 24, 20, 12)] = 1
    truth[disc(shape, 24, 42, 11) & (truth == 0)] = 2               # overlapping discs: one blob
    truth[disc(shape, 10, 62, 5)] = 3                                # a separate small one
    labels = (truth > 0).astype(np.uint8)
    # A hand-made "prediction": the exact distance map, smoothed and noisy like a network's.
    from scipy.ndimage import gaussian_filter

    dist = np.clip(gaussian_filter(distance_targets(truth), 1.0)
                   + np.random.default_rng(0).normal(0, 0.03, shape), 0, 1)
    cc = component_instances(labels, [1])
    assert cc.max() == 2                                             # the two discs merge
    ws = watershed_instances(labels, dist, [1], seed_threshold=0.5)
    assert ws.max() == 3 and set(np.unique(ws)) == {0, 1, 2, 3}
    iou, _, _ = iou_matrix(truth, ws)
    assert (iou.max(1) > 0.9).all()                                  # every true object recovered
    assert ((ws > 0) == (labels > 0)).all()                          # instances partition the class


def test_h_maxima_seeds_keep_one_object_on_a_noisy_plateau_and_still_split_touching_ones() -> None:
    """What a weakly trained head predicts: a flat interior (0.5) with texture (+-0.04). Plain threshold
    seeds shatter it; h-maxima seeds (h 0.1) give one seed, and two objects whose maps dip to 0 between them
    still get two."""
    shape = (40, 80)
    labels = np.zeros(shape, np.uint8)
    one = disc(shape, 20, 18, 14)
    labels[one] = 1
    from scipy.ndimage import gaussian_filter

    texture = gaussian_filter(np.random.default_rng(0).normal(size=shape), 2)
    dist = np.where(one, 0.5 + 0.04 * texture / np.abs(texture).max(), 0.0)
    assert watershed_instances(labels, dist, [1], 0.5).max() > 3
    assert watershed_instances(labels, dist, [1], 0.5, seed_h=0.1).max() == 1
    truth = np.zeros(shape, np.int32)
    truth[disc(shape, 20, 50, 10)] = 1
    truth[disc(shape, 20, 68, 10) & (truth == 0)] = 2
    pair = (truth > 0).astype(np.uint8)
    ws = watershed_instances(pair, distance_targets(truth), [1], 0.5, seed_h=0.1)
    iou, _, _ = iou_matrix(truth, ws)
    assert ws.max() == 2 and (iou.max(1) > 0.9).all()


def test_watershed_keeps_seedless_regions_and_drops_small_ones_per_class() -> None:
    labels = np.zeros((20, 30), np.uint8)
    labels[2:8, 2:8] = 1                                   # a flat object: no seed
    labels[10:18, 2:10] = 2                                # an object of another thing class, with a seed
    labels[0:2, 25:27] = 1                                 # 4 px speck
    dist = np.zeros(labels.shape)
    dist[13:15, 5:7] = 0.9
    inst = watershed_instances(labels, dist, [1, 2], seed_threshold=0.5, min_size=5)
    assert inst.max() == 2
    assert len(np.unique(inst[2:8, 2:8])) == 1 and len(np.unique(inst[10:18, 2:10])) == 1
    assert inst[2, 2] != inst[10, 2] and (inst[0:2, 25:27] == 0).all()
    assert (inst[labels == 0] == 0).all()


def test_calibration_picks_the_seed_height_and_minimum_size_that_score_best() -> None:
    """Two touching discs whose predicted distance map has a low second maximum in one (seed_h 0.05 splits off a
    50 px fragment there), plus 3 x 3 specks predicted as the class (min_size 0 keeps them as false objects).
    F1 1 needs the specks gone and the fragment either not split (seed_h >= 0.1) or dropped (min_size 60); the
    first such pair in grid order, (0.05, 60), is chosen."""
    shape = (48, 80)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    truth = np.zeros(shape, np.int32)
    truth[disc(shape, 24, 22, 13)] = 1
    truth[disc(shape, 24, 46, 12) & (truth == 0)] = 2

    def peak(cy: float, cx: float, a: float, s: float) -> np.ndarray:
        return a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))

    dist = np.where(truth > 0, 0.55 + peak(24, 22, 0.4, 4) * (truth == 1) + peak(24, 46, 0.4, 4) * (truth == 2)
                    + peak(24, 12, 0.16, 1.5) * (truth == 1), 0.0)
    labels = (truth > 0).astype(np.uint8)
    for y, x in ((4, 70), (40, 72), (6, 4)):
        labels[y:y + 3, x:x + 3] = 1                                                  # specks, no object
    mask = (truth > 0).astype(np.uint8)
    mask[0, 0] = 255                                                                  # an unknown pixel
    spec = {"things": [1], "seed_threshold": 0.5, "smooth": 0.0, "seed_h": 0.0, "min_size": 0, "method": "watershed"}
    out, rep = calibrate_postprocess([(labels, dist, mask, truth)], spec)
    grid = {(h, m): f1 for h, m, f1 in rep["grid"]}
    assert len(grid) == len(CALIBRATION_SEED_H) * len(CALIBRATION_MIN_SIZE)
    assert grid[(0.05, 0)] < grid[(0.05, 15)] < 1.0 and grid[(0.1, 0)] < 1.0      # specks; the fragment
    assert grid[(0.1, 15)] == 1.0 and grid[(0.05, 60)] == 1.0
    assert rep["chosen"] == {"seed_h": 0.05, "min_size": 60, "f1": 1.0} and rep["objects"] == 2
    # The two touching discs are one predicted region with seeds; the three specks are regions without.
    assert rep["seeded"] == 0.25 and rep["peak_distance"] == pytest.approx(0.95, abs=1e-3)
    assert out == {**spec, "seed_h": 0.05, "min_size": 60}
    inst = postprocess(labels, dist, out)
    iou, _, _ = iou_matrix(truth, inst)
    assert inst.max() == 2 and (iou.max(1) > 0.9).all()


def test_calibration_without_objects_keeps_the_configured_values() -> None:
    labels = np.zeros((16, 16), np.uint8)
    labels[2:5, 2:5] = 1                                                  # a predicted speck, no true object
    spec = {"things": [1], "seed_threshold": 0.5, "smooth": 0.0, "seed_h": 0.1, "min_size": 7}
    out, rep = calibrate_postprocess([(labels, np.zeros((16, 16)), np.zeros((16, 16), np.uint8),
                                       np.zeros((16, 16), np.int32))], spec)
    assert out == spec and rep["chosen"] is None and rep["objects"] == 0 and rep["frames"] == 1
    assert rep["peak_distance"] == 0.0 and rep["seeded"] == 0.0


def test_a_head_below_the_seed_threshold_is_reported_and_splits_nothing() -> None:
    """A weakly trained head (a flat distance map under seed_threshold): the report says so (peak, no region
    seeded), and the watershed's instances are the connected components."""
    shape = (32, 60)
    truth = np.zeros(shape, np.int32)
    for i, cx in enumerate((14, 29, 44)):                                 # touching: one predicted region
        truth[disc(shape, 16, cx, 8) & (truth == 0)] = i + 1
    labels = (truth > 0).astype(np.uint8)
    dist = np.where(truth > 0, 0.3, 0.0) + 0.1 * (truth == 2)             # 0.3 and 0.4: never above 0.5
    spec = {"things": [1], "seed_threshold": 0.5, "smooth": 0.0, "seed_h": 0.0, "min_size": 0}
    _, rep = calibrate_postprocess([(labels, dist, labels.copy(), truth)], spec)
    assert rep["peak_distance"] == pytest.approx(0.4) and rep["seeded"] == 0.0
    assert {f1 for _, _, f1 in rep["grid"]} == {0.0}                      # the blob matches no disc
    np.testing.assert_array_equal(postprocess(labels, dist, spec), component_instances(labels, [1]))
    _, low = calibrate_postprocess([(labels, dist, labels.copy(), truth)], {**spec, "seed_threshold": 0.35})
    assert low["seeded"] == 1.0


def test_postprocess_sizes_are_in_network_input_pixels() -> None:
    """An image predicted at input scale 2 was enlarged 2x for the network: min_size 40 (network pixels) is
    10 pixels at the image's own size there, and 40 at scale 1."""
    labels = np.zeros((20, 20), np.uint8)
    labels[2:6, 2:6] = 1                                                  # 16 px at the image's own size
    dist = np.zeros(labels.shape)
    spec = {"things": [1], "seed_threshold": 0.5, "smooth": 0.0, "seed_h": 0.0, "min_size": 40}
    assert postprocess(labels, dist, spec, scale=1.0).max() == 0
    assert postprocess(labels, dist, spec, scale=2.0).max() == 1
    assert postprocess(labels, dist, spec, scale=0.5).max() == 0          # 160 px at its own size


# ------------------------------------------------------------------------------------------------ a trained model
@pytest.fixture(scope="module")
def inst_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net with the instance head, fine-tuned for 30 steps through the real CLI."""
    out = tmp_path_factory.mktemp("inst") / "run"
    rc = main(["finetune", TINY, "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "30",
               "train.val_every=30", "train.log_every=10", "instances.enabled=true", "instances.min_size=3"])
    assert rc == 0
    return out / "model"


def test_training_logs_the_instance_loss_and_records_the_head(inst_model: Path) -> None:
    meta = json.loads((inst_model / "model.json").read_text())
    assert meta["architecture"]["instance_channels"] == 1
    inst = dict(meta["instances"])
    cal = inst.pop("calibration")  # instances.calibrate (default): seed_h and min_size chosen on rendered val
    assert {k: inst[k] for k in ("target", "channels", "things", "method", "seed_threshold", "smooth")} == \
        {"target": "distance", "channels": 1, "things": [1], "method": "watershed", "seed_threshold": 0.5,
         "smooth": 0.0}
    assert cal["frames"] >= 1 and len(cal["grid"]) == len(CALIBRATION_SEED_H) * len(CALIBRATION_MIN_SIZE)
    best = max(f1 for _, _, f1 in cal["grid"])
    assert cal["chosen"]["f1"] == best and [inst["seed_h"], inst["min_size"], best] in cal["grid"]
    assert [inst["seed_h"], inst["min_size"]] == [cal["chosen"]["seed_h"], cal["chosen"]["min_size"]]
    assert 0 <= cal["peak_distance"] <= 1 and 0 <= cal["seeded"] <= 1  # what the head gives the watershed
    logs = [json.loads(line) for line in (inst_model.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["instance_loss"] for r in logs if "instance_loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_predict_writes_instance_pngs_and_coco_that_decodes_to_them(inst_model: Path, tiny_dataset: Path,
                                                                   tmp_path: Path, capsys) -> None:

    from segfactory.formats.dataset import open_dataset

    frames = list(open_dataset(tiny_dataset).frames())[:3]
    inp = tmp_path / "in"
    inp.mkdir()
    for f in frames:
        (inp / f"{f.name}.png").write_bytes(Path(f.rgb).read_bytes())
    out = tmp_path / "out"
    rc, _, _ = cli(capsys, "predict", "--model", inst_model, "--input", inp, "--out", out, "--instances", "on")
    assert rc == 0
    coco = json.loads((out / "instances.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["nucleus"]
    assert [im["file_name"] for im in coco["images"]] == sorted(p.name for p in inp.iterdir())
    n_objects = 0
    for im in coco["images"]:
        stem = Path(im["file_name"]).stem
        png = Image.open(out / "instances" / f"{stem}.png")
        inst = np.array(png)
        assert inst.dtype == np.uint16 and inst.shape == (im["height"], im["width"]) == (64, 64)
        classes = np.array(Image.open(out / f"{stem}.png"))
        assert (classes[inst > 0] == 1).all()                         # objects only on the thing class
        anns = _image_annotations_match(coco, im, inst)
        for a in anns:
            assert a["category_id"] == 1 and a["area"] == int((inst == a["instance_id"]).sum())
        n_objects += len(anns)
        assert (out / "overlays" / f"{stem}.jpg").is_file()
    assert n_objects > 0


def _image_annotations_match(coco: dict, im: dict, inst: np.ndarray) -> list[dict]:
    """The COCO image ``im``'s annotations are exactly the objects of its (H, W) instance map ``inst``, each RLE
    decoding to its object's pixels; returns them."""
    from pycocotools import mask as mask_utils

    anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
    assert sorted(a["instance_id"] for a in anns) == sorted(int(i) for i in np.unique(inst) if i)
    for a in anns:
        decoded = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), inst == a["instance_id"])
    return anns


def test_predict_names_each_page_of_a_tiff_stack_in_the_coco_file_as_its_outputs(inst_model: Path,
                                                                                 tiny_dataset: Path,
                                                                                 tmp_path: Path, capsys) -> None:
    """The pages of a multi-page TIFF all had the stack's file_name in instances.json (told apart only by an extra
    `page` key COCO tools do not read): each page is now `<stem>_p<N>.tif`, the name of its mask and instance PNG."""
    import tifffile

    from segfactory.formats.dataset import open_dataset

    frames = [np.array(Image.open(f.rgb)) for f in list(open_dataset(tiny_dataset).frames())[:3]]
    inp = tmp_path / "in"
    inp.mkdir()
    tifffile.imwrite(inp / "stack.tif", np.stack(frames), photometric="minisblack")  # 3 gray pages of 64x64
    Image.fromarray(frames[0]).save(inp / "single.png")
    out = tmp_path / "out"
    rc, _, _ = cli(capsys, "predict", "--model", inst_model, "--input", inp, "--out", out, "--instances", "on")
    assert rc == 0
    coco = json.loads((out / "instances.json").read_text())
    assert [(im["file_name"], im.get("stack"), im.get("page")) for im in coco["images"]] == \
        [("single.png", None, None), ("stack_p0.tif", "stack.tif", 0), ("stack_p1.tif", "stack.tif", 1),
         ("stack_p2.tif", "stack.tif", 2)]
    assert len({im["id"] for im in coco["images"]}) == 4
    for im in coco["images"]:  # each entry's annotations are its own page's objects
        stem = Path(im["file_name"]).stem
        inst = np.array(Image.open(out / "instances" / f"{stem}.png"))
        assert (out / f"{stem}.png").is_file()
        _image_annotations_match(coco, im, inst)


def test_onnx_export_returns_both_heads_with_parity(inst_model: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from finetune.export import export_onnx

    rep = export_onnx(inst_model, tmp_path / "m.onnx")
    assert rep["outputs"] == ["logits", "instance_logits"] and rep["max_abs_diff"] < 1e-3
    assert "watershed" in rep["recipe"]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"image": np.zeros((1, 3, 64, 96), np.float32)})
    assert [o.shape for o in outs] == [(1, 3, 64, 96), (1, 1, 64, 96)]


# ------------------------------------------------------------------------------------------------ evaluate
def write_real_folder(root: Path, inst: np.ndarray, image: np.ndarray) -> Path:
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray((inst > 0).astype(np.uint8)).save(root / "masks" / "a.png")
    Image.fromarray(inst.astype(np.uint16)).save(root / "instances" / "a.png")
    (root / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "background"},
                                                               {"id": 1, "name": "nucleus", "thing": True}]}))
    return root


def test_evaluate_scores_watershed_and_components_rows_with_known_matches(tmp_path: Path) -> None:
    """Three touching 10x10 squares in a row: semantic + components finds one 10x30 blob (IoU 1/3 with each:
    no match, F1 0), the watershed instances are the three squares (F1 1)."""
    from finetune.config import SourceSpec
    from finetune.data.remap import make_targets
    from finetune.data.sources import open_source
    from finetune.realeval import MODEL_ROW, WATERSHED_ROW, RealScorer

    inst = np.zeros((20, 40), np.int32)
    for i in range(3):
        inst[5:15, 5 + 10 * i:15 + 10 * i] = i + 1
    root = write_real_folder(tmp_path / "real", inst, (inst > 0).astype(np.uint8) * 200)
    targets = make_targets([{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"}], 255)
    spec = SourceSpec(path=root)
    src = open_source(spec, "real", targets, "eval")
    scorer = RealScorer(spec, src, targets, ["blur_otsu"], 0, tmp_path / "eval", "dtype", watershed=True)
    img, gt = src.load(src.val[0])
    pred = (inst > 0).astype(np.uint8)
    scorer.add(src.val[0], img, gt, pred, inst)
    rows = scorer.result()["rows"]
    assert list(rows) == [MODEL_ROW, WATERSHED_ROW, "blur_otsu"]
    cc, ws = rows[MODEL_ROW]["instances"]["nucleus"], rows[WATERSHED_ROW]["instances"]["nucleus"]
    assert (cc["tp"], cc["fp"], cc["fn"], cc["f1"], cc["count_error"]) == (0, 1, 3, 0.0, 2)
    assert (ws["tp"], ws["fp"], ws["fn"], ws["f1"], ws["mean_matched_iou"]) == (3, 0, 0, 1.0, 1.0)
    assert rows[MODEL_ROW]["fg_iou"] == rows[WATERSHED_ROW]["fg_iou"] == 1.0


def test_evaluate_cli_adds_the_watershed_row_for_a_model_with_the_head(inst_model: Path, tmp_path: Path,
                                                                       capsys) -> None:
    inst = np.zeros((64, 64), np.int32)
    inst[disc((64, 64), 30, 24, 9)] = 1
    inst[disc((64, 64), 30, 41, 9) & (inst == 0)] = 2
    root = write_real_folder(tmp_path / "real", inst, (40 + 150 * (inst > 0)).astype(np.uint8))
    rc, _, _ = cli(capsys, "evaluate", "--model", inst_model, "--data", root, "--out", tmp_path / "ev",
                     "--overlays", "1")
    assert rc == 0
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["real"]["real"]["rows"]
    assert {"model", "model_watershed", "otsu", "blur_otsu"} == set(rows)
    for r in rows.values():
        assert r["instances"]["nucleus"]["n_gt"] == 2


# ------------------------------------------------------------------------------------------------ bad input
def test_predict_asking_instances_of_a_model_without_head_is_one_line(tiny_dataset: Path, tmp_path: Path,
                                                                      capsys) -> None:
    from finetune.models import build_model, model_meta, save_model_dir

    arch = {"arch": "unet", "encoder": "test_resnet", "in_chans": 3, "num_classes": 3, "decoder_channels": 8}
    classes = [{"id": i, "name": n} for i, n in enumerate(("background", "nucleus", "debris"))]
    inp = {"in_chans": 3, "scaling": "auto", "mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1.0}
    save_model_dir(tmp_path / "plain", build_model(arch), model_meta(arch, classes, 255, inp, {}, {}))
    (tmp_path / "in").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "in" / "a.png")
    rc, _, err = cli(capsys, "predict", "--model", tmp_path / "plain", "--input", tmp_path / "in", "--out",
                     tmp_path / "out", "--instances", "on")
    assert rc == 2 and "has no instance head" in err and "instances.enabled=true" in err
    assert not (tmp_path / "out" / "a.png").exists()
    rc, _, _ = cli(capsys, "predict", "--model", tmp_path / "plain", "--input", tmp_path / "in", "--out",
                   tmp_path / "out")
    assert rc == 0 and not (tmp_path / "out" / "instances").exists()   # auto: plain masks only


def test_instance_head_on_a_dataset_without_thing_classes_is_one_line(tmp_path: Path, capsys) -> None:
    from procedural import CELLS_CLASSES, cells_scene

    from segfactory.formats.dataset import write_dataset

    frames = [cells_scene(np.random.default_rng(i), 1, 64) for i in range(2)]
    stuff = [{**c, "thing": False} for c in CELLS_CLASSES]
    write_dataset(tmp_path / "ds", frames, stuff, family="cells", scenes_per_shard=2)
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "run", "--synthetic", tmp_path / "ds",
                     "--steps", "2", "instances.enabled=true")
    assert rc == 2 and "no training source has a thing class" in err and "instances.enabled=false" in err


def test_real_instance_masks_that_do_not_match_the_class_masks_are_one_line(tmp_path: Path, capsys) -> None:
    inst = np.zeros((32, 32), np.int32)
    inst[4:12, 4:12] = 1
    root = write_real_folder(tmp_path / "real", inst, np.zeros((32, 32), np.uint8))
    bad = inst.copy()
    bad[20:24, 20:24] = 2                                           # an object where the class mask says background
    Image.fromarray(bad.astype(np.uint16)).save(root / "instances" / "a.png")
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "run", "--real", root, "--steps", "1",
                     "data.val_fraction=0")
    assert rc == 2 and "does not match its class mask" in err and "16 object pixel(s)" in err
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(root / "instances" / "a.png")   # another size
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "run2", "--real", root, "--steps", "1",
                     "data.val_fraction=0")
    assert rc == 2 and "is not the size of its mask" in err and "does not match its class mask" in err
    assert err.count("\n") <= 2


@pytest.mark.slow
def test_instance_head_trains_alongside_self_training_and_auto_scale(tiny_dataset: Path, tmp_path: Path) -> None:
    """The quickstart's recipe with the head: self-training (class logits only) and input.scale=auto run next to
    the instance loss."""
    from test_finetune_adapt import ingest_files

    from finetune.config import FinetuneConfig
    from finetune.train import run_finetune
    from segfactory.config import load_config
    from segfactory.formats.dataset import open_dataset

    frames = [Path(f.rgb) for f in list(open_dataset(tiny_dataset).frames())[:4]]
    unlabeled = ingest_files(frames, tmp_path / "ingested")
    cfg = load_config(FinetuneConfig, TINY, [f"data.synthetic=[{{path: '{tiny_dataset}'}}]",
                                             f"data.unlabeled=['{unlabeled}']", "train.steps=6", "train.log_every=1",
                                             "train.val_every=1000", "adapt.warmup_steps=3", "input.scale=auto",
                                             "instances.enabled=true"])
    summary = run_finetune(cfg, tmp_path / "run", show_progress=False)
    assert summary["finished"]
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in logs if r.get("step", 0) > 4 and "loss" in r]
    assert late and all(np.isfinite(r["instance_loss"]) and r["selftrain_loss"] > 0 for r in late)
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["instances"]["things"] == [1] and meta["architecture"]["instance_channels"] == 1


def test_evaluate_scores_rendered_sources_against_their_instance_maps(inst_model: Path, tiny_dataset: Path,
                                                                      tmp_path: Path, capsys) -> None:
    from segfactory.formats.dataset import load_frame, open_dataset

    rc, _, _ = cli(capsys, "evaluate", "--model", inst_model, "--data", tiny_dataset, "--out", tmp_path / "ev")
    assert rc == 0
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    rows = rep["instances"]["cells"]
    assert set(rows) == {"model", "model_watershed"} and set(rows["model"]) == {"nucleus"}
    n_true = 0
    for f in open_dataset(tiny_dataset).frames():
        fr = load_frame(f)
        n_true += len(np.unique(fr["instance"][fr["semantic"] == 1]))
    assert rows["model"]["nucleus"]["n_gt"] == rows["model_watershed"]["nucleus"]["n_gt"] == n_true
    assert rows["model"]["nucleus"]["images"] == len(list(open_dataset(tiny_dataset).frames()))


def test_real_folders_with_instance_masks_train_the_head(tmp_path: Path, capsys) -> None:
    """A real labeled folder's instances/ and its classes.json `thing` flags are enough: no rendered data."""
    inst = np.zeros((64, 64), np.int32)
    inst[disc((64, 64), 30, 24, 9)] = 1
    inst[disc((64, 64), 30, 41, 9) & (inst == 0)] = 2
    root = write_real_folder(tmp_path / "real", inst, (40 + 150 * (inst > 0)).astype(np.uint8))
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "run", "--real", root, "--steps", "2",
                     "data.val_fraction=0", "train.log_every=1", "instances.enabled=true")
    assert rc == 0, err
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["instances"]["things"] == [1]
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r.get("instance_loss", 0) > 0] == [1, 2]
