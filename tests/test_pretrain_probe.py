"""The dense linear probe on a dataset in the real format (``tiny_dataset`` from conftest: cells-like frames)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest
import skimage
import torch
from safetensors.torch import load_file

from pretrain import ingest as core
from pretrain import probe as probe_mod
from pretrain.backbones import create_features_model
from pretrain.config import IngestConfig, PretrainConfig, ProbeConfig
from pretrain.probe import run_probe
from pretrain.train import run_pretrain
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.formats import images as store
from segfactory.formats.encoder import save_encoder

PHOTOS = [Path(skimage.__file__).parent / "data" / f for f in
          ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "coins.png")]
PHOTOS += [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
PROBE = ProbeConfig(steps=30, image_size=64, batch_size=4, feature_stride=4)


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
    assert len(probed) == 2 and probed[0].keys() == exported.keys() == baseline
    # the "encoder" pass ran the exported (pretrained) weights, the "random" pass a different, random init
    assert all(torch.equal(probed[0][k], exported[k]) for k in exported)
    assert not all(torch.equal(probed[0][k], probed[1][k]) for k in exported)
    assert r["miou_encoder"] != r["miou_random"] or r["iou_encoder"] != r["iou_random"]
    # an exported encoder that *is* the random baseline scores exactly the baseline: both passes are the same
    # pipeline, so any difference above comes from the weights
    twin = run_probe(random_twin(tmp_path / "twin", PROBE.seed), tiny_dataset, PROBE)
    assert all(torch.equal(probed[3][k], probed[2][k]) for k in exported)
    assert twin["miou_encoder"] == twin["miou_random"]
    assert twin["iou_encoder"] == twin["iou_random"]


def test_probe_cli_prints_one_json_object(tiny_dataset: Path, encoder_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--encoder", str(encoder_dir), "--data", str(tiny_dataset), "--steps", "5",
                 "image_size=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou_encoder", "miou_random"} <= set(out)
    assert main(["probe", "--encoder", str(encoder_dir.parent), "--data", str(tiny_dataset)]) == 2
    assert "encoder.json is missing" in capsys.readouterr().err
