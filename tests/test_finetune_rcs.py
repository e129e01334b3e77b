"""Rare class sampling of the rendered training frames (``data.rcs``, DAFormer): the class and frame drawn per batch
slot, the window cut around the class, resume, the errors, and a real fine-tune with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS

from finetune.config import FinetuneConfig, RareClassSampling
from finetune.data.mixing import (
    MixedBatchSampler,
    RareClasses,
    WindowDataset,
    drawn_class_counts,
    random_windows,
    rare_class_plans,
)
from finetune.data.sources import open_training_sources, resolve_targets
from finetune.samples import make_coins_folder
from finetune.train import auto_class_weights, class_weights_from_counts
from segfactory.cli import main
from segfactory.errors import UserError

# 5 frames x 4 classes: class 0 everywhere, class 2 rare and in frames 1 and 3 only, class 3 in frame 4 below 16 px
COUNTS = np.array([[900, 100, 0, 0],
                   [800, 150, 50, 0],
                   [950, 50, 0, 0],
                   [700, 200, 100, 0],
                   [990, 0, 0, 10]])


def test_class_probabilities_follow_daformer_and_frames_hold_their_class() -> None:
    plan = RareClasses.from_counts(COUNTS, temperature=0.1, min_pixels=16)
    assert plan is not None
    freq = COUNTS.sum(0) / COUNTS.sum()
    assert plan.classes.tolist() == [0, 1, 2]  # class 3 has no frame with 16 px of it
    want = np.exp((1 - freq[:3]) / 0.1)
    np.testing.assert_allclose(plan.prob, want / want.sum(), rtol=1e-12)
    np.testing.assert_allclose(plan.freq, freq[:3])
    assert [it.tolist() for it in plan.items] == [[0, 1, 2, 3, 4], [0, 1, 2, 3], [1, 3]]
    assert plan.prob[2] > plan.prob[1] > plan.prob[0]  # the rarer, the likelier
    only = RareClasses.from_counts(COUNTS, 0.1, 16, allowed=[1, 3])
    assert only is not None and only.classes.tolist() == [1] and only.prob.tolist() == [1.0]
    assert RareClasses.from_counts(COUNTS, 0.1, 16, allowed=[3]) is None
    assert RareClasses.from_counts(COUNTS, 0.1, 5, allowed=[3]).items[0].tolist() == [4]


def test_sampler_draws_by_the_plan_and_resumes_exactly() -> None:
    """A source with a plan fills its slots by it, a pure function of (seed, step, slot): a resumed sampler replays
    the same batches; the other source's slots are those of a sampler without the plan; classes come at their
    probabilities and every drawn frame holds its class."""
    plan = RareClasses.from_counts(COUNTS, temperature=0.1, min_pixels=16)
    sizes, weights = [5, 7], [0.75, 0.25]
    full = list(MixedBatchSampler(sizes, weights, 8, 3, 0, 400, rare={0: plan}))
    assert list(MixedBatchSampler(sizes, weights, 8, 3, 250, 400, rare={0: plan})) == full[250:]
    plain = list(MixedBatchSampler(sizes, weights, 8, 3, 0, 400))
    assert [[r for r in b if r.source == 1] for b in full] == [[r for r in b if r.source == 1] for b in plain]
    refs = [r for b in full for r in b if r.source == 0]
    assert all(r.focus >= 0 for r in refs) and all(r.focus == -1 for b in plain for r in b)
    assert all(COUNTS[r.item, r.focus] >= 16 for r in refs)
    drawn = np.bincount([r.focus for r in refs], minlength=3) / len(refs)
    np.testing.assert_allclose(drawn, plan.prob, atol=0.03)  # 2400 draws
    assert list(MixedBatchSampler(sizes, weights, 8, 4, 0, 400, rare={0: plan})) != full


def test_shuffled_frames_keep_their_order_and_focus_on_a_class_they_hold() -> None:
    """``frames: shuffled``: the items are those of a sampler without the plan (each frame as often as before), and
    each window's class is one its frame holds, drawn by the plan's probabilities among those; a frame holding
    none of the classes gets a window anywhere."""
    plan = RareClasses.from_counts(COUNTS, temperature=0.1, min_pixels=16, allowed=[1, 2], frames="shuffled")
    full = list(MixedBatchSampler([5], [1.0], 4, 3, 0, 500, rare={0: plan}))
    plain = list(MixedBatchSampler([5], [1.0], 4, 3, 0, 500))
    assert [[r.item for r in b] for b in full] == [[r.item for r in b] for b in plain]
    assert list(MixedBatchSampler([5], [1.0], 4, 3, 300, 500, rare={0: plan})) == full[300:]
    refs = [r for b in full for r in b]
    assert all(r.focus == -1 for r in refs if r.item == 4)  # frame 4 holds neither class 1 nor class 2
    assert all(r.focus == 1 for r in refs if r.item in (0, 2))
    both = [r.focus for r in refs if r.item in (1, 3)]
    share = plan.prob[1] / plan.prob.sum()  # class 2 among {1, 2}
    assert abs(np.mean(np.array(both) == 2) - share) < 0.05 and set(both) == {1, 2}


def test_a_share_of_slots_drawn_by_class_keeps_the_other_frames_in_order_and_resumes_exactly() -> None:
    """``share`` below 1: about that share of the source's slots draw by class, exactly as with ``share`` 1 (same
    frame, same class); the others take the frames in the order a sampler without the plan gives them (frames that
    hold no drawn class, like the street family's rooms, are kept), their windows focused as ``shuffled`` focuses
    them; the other source is untouched; resuming mid-run replays the same batches (the frame order's position
    counts only the ordered slots)."""
    half = RareClasses.from_counts(COUNTS, temperature=0.1, min_pixels=16, allowed=[2], share=0.4)
    every = RareClasses.from_counts(COUNTS, temperature=0.1, min_pixels=16, allowed=[2])
    sizes, weights = [5, 7], [0.75, 0.25]
    full = list(MixedBatchSampler(sizes, weights, 8, 3, 0, 600, rare={0: half}))
    assert list(MixedBatchSampler(sizes, weights, 8, 3, 317, 600, rare={0: half})) == full[317:]
    by_class = list(MixedBatchSampler(sizes, weights, 8, 3, 0, 600, rare={0: every}))
    plain = list(MixedBatchSampler(sizes, weights, 8, 3, 0, 600))
    assert [[r for r in b if r.source == 1] for b in full] == [[r for r in b if r.source == 1] for b in plain]
    drawn, ordered = [], []
    for s, (batch, ref_batch) in enumerate(zip(full, by_class, strict=True)):
        mask = half.by_class_slots(3, s, 8)
        for r, ref in zip(batch, ref_batch, strict=True):
            if r.source == 0 and mask[r.slot]:
                assert r == ref  # a slot drawn by class draws what share 1 draws
                drawn.append(r)
            elif r.source == 0:
                ordered.append(r)
    assert abs(len(drawn) / (len(drawn) + len(ordered)) - 0.4) < 0.03
    assert all(r.item in (1, 3) and r.focus == 2 for r in drawn)
    items = [r.item for r in ordered]  # source 0's shuffled order, epoch after epoch, as without sampling:
    assert items == [r.item for b in MixedBatchSampler([5], [1.0], 1, 3, 0, len(ordered)) for r in b]
    assert all(r.focus == (2 if r.item in (1, 3) else -1) for r in ordered)
    with pytest.raises(ValueError, match=r"share\n.*needs frames=by_class \(with frames=shuffled"):
        RareClassSampling(frames="shuffled", share=0.5)
    assert "share" not in RareClassSampling().model_dump(mode="json")  # at 1: config hashes as before
    assert RareClassSampling(share=0.5).model_dump(mode="json")["share"] == 0.5


def test_a_focused_window_holds_its_class_and_focus_off_draws_as_before() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (200, 150, 3), dtype=np.uint8)
    for seed in range(40):
        mask = np.zeros((200, 150), np.uint8)
        y, x = np.random.default_rng(seed).integers(0, (200, 150))
        mask[y, x] = 3  # one pixel of the class, anywhere (corners included)
        _, win, _ = random_windows(img, mask, 64, np.random.default_rng(seed), 3, "dtype", 255, focus=3)
        assert (win == 3).sum() == 1, seed
        a = random_windows(img, mask, 64, np.random.default_rng(seed), 3, "dtype", 255)
        b = random_windows(img, mask, 64, np.random.default_rng(seed), 3, "dtype", 255, focus=-1)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    absent = random_windows(img, np.zeros((200, 150), np.uint8), 64, np.random.default_rng(1), 3, "dtype", 255,
                            focus=3)
    assert absent[1].shape == (64, 64)  # a frame without the class: a window anywhere
    small = np.zeros((40, 50), np.uint8)
    small[39, 0] = 2
    _, win, _ = random_windows(img[:40, :50], small, 64, np.random.default_rng(2), 3, "dtype", 255, focus=2)
    assert (win == 2).sum() == 1 and (win == 255).any()  # smaller than the window: padded, class kept


def test_plans_of_a_rendered_source_and_their_errors(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = FinetuneConfig.model_validate({"data": {"synthetic": [{"path": str(tiny_dataset)}]}})
    targets = resolve_targets(cfg)
    train, _ = open_training_sources(cfg, targets)
    plans = rare_class_plans(train, RareClassSampling(temperature=0.05), targets.names)
    plan = plans[0]
    syn = train[0]
    for c, items in zip(plan.classes, plan.items, strict=True):  # frames counted from their masks
        assert all((syn.load_mask(syn.train[i]) == c).sum() >= 16 for i in items)
    ds = WindowDataset(train, 32, 3, "dtype", seed=0)
    for refs in MixedBatchSampler([len(syn.train)], [1.0], 8, 0, 0, 4, rare=plans):
        for r in refs:
            assert (ds[r]["mask"].numpy() == r.focus).any()
    with pytest.raises(UserError, match=r"data\.rcs\.classes: 'nucleu' is not a class of the model; "
                                        r"did you mean 'nucleus'"):
        rare_class_plans(train, RareClassSampling(classes=["nucleu"]), targets.names)
    with pytest.raises(UserError, match="holds 100000 pixels of debris") as e:
        rare_class_plans(train, RareClassSampling(classes=["debris"], min_pixels=100000), targets.names)
    assert "min_pixels" in e.value.fix
    coins = make_coins_folder(tmp_path / "coins", n=4, size=32, seed=1)
    real = FinetuneConfig.model_validate({"data": {"real": [{"path": str(coins)}]}})
    rt = resolve_targets(real)
    with pytest.raises(UserError, match="no synthetic training source"):
        rare_class_plans(open_training_sources(real, rt)[0], RareClassSampling(), rt.names)
    assert "rcs" not in FinetuneConfig().model_dump(mode="json")["data"]  # off: config hashes as before


def test_auto_class_weights_count_the_windows_training_draws(tiny_dataset: Path, tmp_path: Path) -> None:
    """With rare class sampling by class, ``class_weights=auto`` counts the label windows the loader yields (source
    mixing with a real labeled folder at input.scale 0.5 included), not the frames: the rare class drawn into
    the windows weighs less than counted over the frames."""
    coins = make_coins_folder(tmp_path / "coins", n=4, size=64, seed=1)
    cfg = FinetuneConfig.model_validate({"data": {"synthetic": [{"path": str(tiny_dataset), "weight": 3}],
                                                  "real": [{"path": str(coins), "remap": {"coin": "nucleus"}}]}})
    targets = resolve_targets(cfg)
    train, _ = open_training_sources(cfg, targets)
    k = targets.num_classes
    plans = rare_class_plans(train, RareClassSampling(temperature=0.05, classes=["debris"]), targets.names)
    sampler = MixedBatchSampler([len(s.train) for s in train], [s.weight for s in train], 8, 5, 0, 10, rare=plans)
    counted = drawn_class_counts(train, sampler, 24, seed=5, num_classes=k, real_scale=0.5, windows=60)
    ds = WindowDataset(train, 24, 3, "dtype", seed=5, real_scale=0.5)
    refs = [r for b in sampler for r in b][:60]
    assert {r.source for r in refs} == {0, 1}
    want = np.zeros(k, np.int64)
    for r in refs:
        y = ds[r]["mask"].numpy()
        want += np.bincount(y[y < k].ravel(), minlength=k)[:k]
    assert counted.tolist() == want.tolist()
    debris = targets.names.index("debris")
    by_frames = auto_class_weights(train, k)
    drawn = class_weights_from_counts(counted)
    assert drawn[debris] / drawn.mean() < by_frames[debris] / by_frames.mean()
    np.testing.assert_allclose(drawn.mean(), 1.0, rtol=1e-6)


def test_a_fine_tune_with_rare_class_sampling_records_its_plan(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ft"
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--out", str(out), "--synthetic",
                 str(tiny_dataset), "--steps", "3", "train.val_every=1000", "data.rcs.temperature=0.05",
                 "data.rcs.classes=[nucleus, debris]", "train.loss.class_weights=auto"]) == 0
    cap = capsys.readouterr()
    printed = " ".join((cap.out + cap.err).split())
    assert "rare class sampling (T=0.05, frames by_class)" in printed and "debris" in printed
    assert "class weights (auto, over the first 256 windows rare class sampling draws): background" in printed
    meta = json.loads((out / "model" / "model.json").read_text())
    (probs,) = meta["lineage"]["training"]["rcs"].values()
    assert set(probs) == {"nucleus", "debris"} and abs(sum(probs.values()) - 1) < 1e-3
    saved = (out / "config.yaml").read_text()
    assert "rcs:" in saved and "temperature: 0.05" in saved
    # frames in their shuffled order: the frames are those auto counts over, its weights stay the frames'
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--out", str(tmp_path / "ft2"), "--synthetic",
                 str(tiny_dataset), "--steps", "1", "train.val_every=1000", "data.rcs.frames=shuffled",
                 "train.loss.class_weights=auto"]) == 0
    cap = capsys.readouterr()
    printed = " ".join((cap.out + cap.err).split())
    assert "rare class sampling (T=0.01, frames shuffled)" in printed and "class weights (auto" not in printed
    # a share of the slots drawn by class: printed; asked with frames shuffled: one line naming the field
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--out", str(tmp_path / "ft3"), "--synthetic",
                 str(tiny_dataset), "--steps", "1", "train.val_every=1000", "data.rcs.share=0.5"]) == 0
    printed = " ".join("".join(capsys.readouterr()).split())
    assert "rare class sampling (T=0.01, frames by_class in 50% of the slots)" in printed
    assert "share: 0.5" in (tmp_path / "ft3" / "config.yaml").read_text()
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--out", str(tmp_path / "ft4"), "--synthetic",
                 str(tiny_dataset), "--steps", "1", "data.rcs.frames=shuffled", "data.rcs.share=0.5"]) == 2
    err = capsys.readouterr().err
    assert "data.rcs.share=0.5 is invalid: it needs frames=by_class" in err, err
    assert "fix: set data.rcs.frames=by_class, or remove data.rcs.share" in err, err
    assert not (tmp_path / "ft4" / "model").exists()
