"""Evaluation speed-ups keep every number: O(N) instance ids, numpy argmax, the one-tile shortcut, and frames
post-processed on worker threads but folded in order (the report is byte-identical for any ``workers``)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.metrics import iou_matrix
from segfactory.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "finetune_tiny.yaml")


def _iou_matrix_by_sorting(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The previous ``iou_matrix`` (np.unique everywhere): the reference the O(N) one must equal bit for bit."""
    g = gt.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    gt_ids, g_idx = np.unique(g, return_inverse=True)
    pred_ids, p_idx = np.unique(p, return_inverse=True)
    g_area = np.bincount(g_idx, minlength=len(gt_ids))
    p_area = np.bincount(p_idx, minlength=len(pred_ids))
    both = (g != 0) & (p != 0)
    pairs, counts = np.unique(g_idx[both] * len(pred_ids) + p_idx[both], return_counts=True)
    gi, pi = np.divmod(pairs, len(pred_ids))
    g_keep, p_keep = gt_ids != 0, pred_ids != 0
    g_pos, p_pos = np.cumsum(g_keep) - 1, np.cumsum(p_keep) - 1
    iou = np.zeros((int(g_keep.sum()), int(p_keep.sum())), np.float64)
    inter = counts.astype(np.float64)
    iou[g_pos[gi], p_pos[pi]] = inter / (g_area[gi] + p_area[pi] - inter)
    return iou, gt_ids[g_keep], pred_ids[p_keep]


@pytest.mark.parametrize("values", [
    np.array([3, 0, 3, 7, 1, 7, 7]),                      # small ids: the bincount path
    np.array([5, -2, 5, 0]),                              # negative ids: np.unique
    np.array([0, 10**9, 4, 10**9]),                       # ids far above the length: np.unique
    np.zeros(0, np.int64),
    np.random.default_rng(0).integers(0, 40, 5000),
])
def test_unique_inverse_is_np_unique(values: np.ndarray) -> None:
    from finetune.metrics import unique_inverse

    ids, index, counts = unique_inverse(values)
    ref_ids, ref_index, ref_counts = np.unique(values, return_inverse=True, return_counts=True)
    assert ids.dtype == ref_ids.dtype
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(index, ref_index.reshape(-1))
    np.testing.assert_array_equal(counts, ref_counts)
    ids2, none, counts2 = unique_inverse(values, inverse=False)
    np.testing.assert_array_equal(ids2, ref_ids)
    np.testing.assert_array_equal(counts2, ref_counts)
    assert none.size == 0


def test_iou_matrix_equals_the_sorting_implementation_bit_for_bit() -> None:
    from skimage.measure import label

    rng = np.random.default_rng(1)
    for _ in range(5):
        gt = label(rng.random((60, 70)) > 0.6, connectivity=1)
        pred = label(rng.random((60, 70)) > 0.5, connectivity=1) * 3  # sparse ids
        pred[0, 0] = 20000                                           # and one id far above the pixel count
        for a, b in ((gt, pred), (pred, gt), (gt, gt), (gt, np.zeros_like(gt))):
            got, ref = iou_matrix(a, b), _iou_matrix_by_sorting(a, b)
            for x, y in zip(got, ref, strict=True):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y)


def test_class_map_takes_the_first_class_on_ties_like_torch() -> None:
    from finetune.predict import outputs_from_probs

    probs = torch.tensor([[[0.5, 0.2, 0.3]], [[0.5, 0.4, 0.3]], [[0.0, 0.4, 0.3]]])  # (K=3, 1, 3): ties everywhere
    labels, inst, dist = outputs_from_probs(probs, {"num_classes": 3})
    assert labels.dtype == np.uint8 and inst is None and dist is None
    np.testing.assert_array_equal(labels, probs.argmax(0).to(torch.uint8).numpy())
    assert labels.tolist() == [[0, 1, 0]]


def test_one_tile_frame_gives_the_blended_numbers() -> None:
    """A frame inside one tile skips the blend accumulation; its blend weights are 1, so the probabilities must
    be the plain softmax of the padded frame (the accumulation ``acc * 1 / 1`` gave exactly these)."""
    from finetune.predict import predict_probs

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1))
    x = torch.randn(1, 40, 50, generator=torch.Generator().manual_seed(0))
    got = predict_probs(model, x, tile=64, overlap=8, batch_size=2)
    padded = torch.nn.functional.pad(x[None], (0, 64 - 50, 0, 64 - 40), mode="reflect")
    with torch.no_grad():
        ref = model(padded).float().softmax(1)[0, :, :40, :50]
    assert got.shape == (3, 40, 50) and torch.equal(got, ref)


def test_pipeline_folds_in_submission_order_when_later_frames_finish_first() -> None:
    import time

    from finetune.evaluate import FramePipeline, eval_workers

    folded: list[int] = []
    with FramePipeline(3) as pipe:
        for i in range(6):
            pipe.submit(lambda i, delay: (time.sleep(delay), i)[1], folded.append, i, 0.05 * (6 - i))
        pipe.drain()
    assert folded == list(range(6))
    with pytest.raises(ZeroDivisionError), FramePipeline(2) as pipe:  # a worker's error reaches the caller
        pipe.submit(lambda: 1 / 0, folded.append)
        pipe.drain()
    assert eval_workers(torch.device("cpu")) == 0 and 1 <= eval_workers(torch.device("cuda")) <= 4


# ------------------------------------------------------------------------------------------------ whole evaluation
@pytest.fixture(scope="module")
def inst_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net with the instance head (watershed row), fine-tuned for 20 steps."""
    out = tmp_path_factory.mktemp("evspeed") / "run"
    assert main(["finetune", TINY, "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "20",
                 "train.val_every=20", "train.log_every=10", "instances.enabled=true", "instances.min_size=3"]) == 0
    return out / "model"


@pytest.fixture(scope="module")
def cho(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real CHO frames cropped to 150x200 (several 128 px tiles each), with masks and instance masks."""
    from segfactory.sampledata import materialize

    full = materialize("ctc-cho", split="eval", out=tmp_path_factory.mktemp("cho"))["eval"]
    stems = sorted(p.stem for p in (full / "images").iterdir())[:3]
    out = tmp_path_factory.mktemp("cho_small") / "cho"
    for sub in ("images", "masks", "instances"):
        (out / sub).mkdir(parents=True)
        for stem in stems:
            arr = np.array(Image.open(full / sub / f"{stem}.png"))[150:300, 150:350]
            Image.fromarray(np.ascontiguousarray(arr)).save(out / sub / f"{stem}.png")
    (out / "classes.json").write_text((full / "classes.json").read_text())
    return out


def test_report_is_identical_for_any_number_of_workers_and_scoring_runs_on_them(
        inst_model: Path, tiny_dataset: Path, cho: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.predict as predict
    from finetune.config import SourceSpec
    from finetune.evaluate import run_evaluate

    threads: list[str] = []
    plain = predict.outputs_from_probs

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return plain(*args, **kwargs)

    monkeypatch.setattr(predict, "outputs_from_probs", spy)
    data = [SourceSpec(path=tiny_dataset), SourceSpec(path=cho)]
    reports = {}
    for workers in (0, 2):
        threads.clear()
        out = tmp_path / f"w{workers}"
        reports[workers] = run_evaluate(inst_model, data, out, device="cpu", show_progress=False, overlays=2,
                                        workers=workers)
        n_frames = sum(r["images"] for r in reports[workers]["data"].values())
        assert len(threads) == n_frames
        on_workers = [t for t in threads if t.startswith("evaluate")]
        assert len(on_workers) == (n_frames if workers else 0)
    assert reports[0] == reports[2]
    assert {"model", "model_watershed", "otsu", "blur_otsu"} == set(reports[0]["real"]["cho"]["rows"])
    assert set(reports[0]["instances"]["cells"]) == {"model", "model_watershed"}
    files = sorted(p.relative_to(tmp_path / "w0") for p in (tmp_path / "w0").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2").rglob("*") if p.is_file())
    assert len(reports[0]["real"]["cho"]["overlays"]) == 2
    for f in files:
        assert (tmp_path / "w0" / f).read_bytes() == (tmp_path / "w2" / f).read_bytes(), f
