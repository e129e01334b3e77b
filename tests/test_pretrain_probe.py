"""The dense linear probe on a real rendered dataset (``tiny_dataset`` from conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.backbones import build_encoder
from pretrain.config import ProbeConfig
from pretrain.export import save_encoder
from pretrain.probe import run_probe
from segfactory.cli import main


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(3)
        enc = build_encoder("test_resnet", 3)
    return save_encoder(tmp_path_factory.mktemp("enc"), enc.body, timm_name="test_resnet", in_chans=3,
                        normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, method="random", steps=0,
                        data_manifest_hash=None)


def test_probe_reports_both_mious(tiny_dataset: Path, encoder_dir: Path) -> None:
    cfg = ProbeConfig(steps=30, image_size=64, batch_size=4, feature_stride=4)
    r = run_probe(encoder_dir, tiny_dataset, cfg)
    assert 0.0 <= r["miou_encoder"] <= 1.0 and 0.0 <= r["miou_random"] <= 1.0
    assert r["train_frames"] + r["val_frames"] == 16 and r["num_classes"] == 3
    # a probe that learned nothing predicts one class everywhere: mIoU <= 1 / classes present
    assert r["miou_random"] > 1 / 3 or r["miou_encoder"] > 1 / 3
    # deterministic: the same seed gives the same numbers
    assert run_probe(encoder_dir, tiny_dataset, cfg)["miou_encoder"] == r["miou_encoder"]


def test_probe_cli_prints_one_json_object(tiny_dataset: Path, encoder_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["probe", "--encoder", str(encoder_dir), "--data", str(tiny_dataset), "--steps", "5",
                 "image_size=64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"miou_encoder", "miou_random"} <= set(out)
    assert main(["probe", "--encoder", str(encoder_dir.parent), "--data", str(tiny_dataset)]) == 2
    assert "encoder.json is missing" in capsys.readouterr().err
