"""Exported encoders load into plain timm models and smp's timm encoders with no key renaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import timm
import torch

from finetune.models import load_into_smp
from pretrain.backbones import BACKBONES
from pretrain.encoder import build_encoder
from pretrain.export import create_timm_encoder
from segfactory.errors import UserError
from segfactory.formats.encoder import load_encoder, save_encoder


def export(name: str, in_chans: int, out: Path, seed: int = 0) -> Path:
    spec = BACKBONES.get(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        enc = build_encoder(name, in_chans)
    return save_encoder(out, enc.body, timm_name=spec.timm_name, in_chans=in_chans,
                        normalization={"mean": [0.4] * in_chans, "std": [0.2] * in_chans}, method="simclr", steps=7,
                        data_manifest_hash="abc", timm_kwargs=spec.timm_kwargs, smp_compatible=spec.smp_compatible)


@pytest.mark.parametrize(("name", "in_chans"), [("test_resnet", 3), ("test_convnext", 1), ("test_efficientnet", 3)])
def test_export_loads_into_timm_and_smp(tmp_path: Path, name: str, in_chans: int) -> None:
    d = export(name, in_chans, tmp_path / "enc")
    meta, sd = load_encoder(d)
    assert meta["format"] == "segfactory-encoder" and meta["version"] == 1
    assert meta["timm_name"] == name and meta["in_chans"] == in_chans and meta["steps"] == 7
    plain = timm.create_model(name, features_only=True, in_chans=in_chans, pretrained=False)
    assert meta["feature_channels"] == plain.feature_info.channels()
    assert meta["feature_strides"] == plain.feature_info.reduction()
    plain.load_state_dict(sd, strict=True)
    net = smp.Unet(encoder_name="tu-" + name, encoder_weights=None, in_channels=in_chans, classes=2)
    load_into_smp(net, d)
    assert all(torch.equal(net.encoder.model.state_dict()[k], v) for k, v in sd.items())
    # the same features as the exporting module
    _, model = create_timm_encoder(d)
    x = torch.rand(2, in_chans, 64, 64)
    plain.eval()
    model.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(x), model(x), strict=True))
        assert net.eval()(x).shape == (2, 2, 64, 64)


def test_vit_exports_for_timm_and_says_smp_cannot_use_it(tmp_path: Path) -> None:
    d = export("test_vit", 3, tmp_path / "vit")
    meta, model = create_timm_encoder(d)
    assert meta["smp_compatible"] is False and meta["timm_kwargs"] == {"dynamic_img_size": True}
    assert [f.shape[1] for f in model(torch.rand(1, 3, 48, 48))] == meta["feature_channels"]
    net = smp.Unet(encoder_name="tu-test_resnet", encoder_weights=None, in_channels=3)
    with pytest.raises(UserError, match="cannot be used by segmentation-models-pytorch"):
        load_into_smp(net, d)


def test_wrong_architecture_and_corrupt_files_are_user_errors(tmp_path: Path) -> None:
    d = export("test_resnet", 1, tmp_path / "enc")
    other = smp.Unet(encoder_name="tu-test_efficientnet", encoder_weights=None, in_channels=1)
    with pytest.raises(UserError, match=r"does not fit the smp model's encoder.*missing"):
        load_into_smp(other, d)
    three = smp.Unet(encoder_name="tu-test_resnet", encoder_weights=None, in_channels=3)
    with pytest.raises(UserError, match=r"conv1.0.weight' has shape \(16, 1, 3, 3\)"):
        load_into_smp(three, d)
    blob = (d / "encoder.safetensors").read_bytes()
    (d / "encoder.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(UserError, match=r"encoder.safetensors' is corrupt"):
        load_encoder(d)
    (d / "encoder.safetensors").unlink()
    with pytest.raises(UserError, match=r"encoder.safetensors' is missing"):
        load_encoder(d)
    meta = json.loads((d / "encoder.json").read_text())
    del meta["in_chans"]
    (d / "encoder.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lacks in_chans"):
        load_encoder(d)
    (d / "encoder.json").write_text("{not json")
    with pytest.raises(UserError, match=r"encoder\.json' is corrupt"):
        load_encoder(d)
    (d / "encoder.json").unlink()
    with pytest.raises(UserError, match=r"encoder\.json is missing"):
        load_encoder(d)


def test_a_vit_encoder_is_refused_before_any_model_is_built(tmp_path: Path) -> None:
    """`finetune --encoder VIT_DIR` (with or without model.encoder set to the ViT, as the mismatch message once
    advised) and `run` with a ViT pretrain backbone stop with the one line above, not smp's traceback from
    building a U-Net on a single-stride encoder."""
    from finetune.config import FinetuneConfig
    from finetune.models import check_encoder_fits
    from pipelines.stages import check_encoder_matches
    from pretrain.config import PretrainConfig

    d = export("test_vit", 3, tmp_path / "vit")
    meta, _ = load_encoder(d)
    for configured in (None, "test_vit", "test_resnet"):
        with pytest.raises(UserError, match="cannot be used by segmentation-models-pytorch"):
            check_encoder_fits(meta, d, configured, 3)
    pre = PretrainConfig.model_validate({"backbone": {"name": "test_vit"}})
    for encoder in (None, "test_vit"):
        with pytest.raises(UserError, match=r"pretrain.backbone.name=test_vit is a plain ViT.*fix: set "
                                            r"pretrain.backbone.name to a CNN \(.*resnet18"):
            check_encoder_matches(pre, FinetuneConfig.model_validate({"model": {"encoder": encoder}}), "")
