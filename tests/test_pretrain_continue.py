"""Continued pretraining (``backbone.init``): a user's timm checkpoint / safetensors / encoder directory is loaded
strictly into the backbone, training starts from exactly those weights (the momentum / teacher encoders of MoCo, BYOL
and DINO too), and the export is unchanged (DINO exports its teacher)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from safetensors.torch import save_file

from finetune.models import load_into_smp
from pretrain import train
from pretrain.backbones import BACKBONES
from pretrain.config import PretrainConfig
from pretrain.encoder import build_encoder
from pretrain.init import load_init
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats.encoder import load_encoder
from tests.test_pretrain import REAL, TINY, ingest_inline


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_inline(REAL[:6], tmp_path_factory.mktemp("images"))


def timm_model(name: str, in_chans: int = 3, seed: int = 7, **kw: Any) -> torch.nn.Module:
    """A full timm model (with its classifier head), as users hold them."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, in_chans=in_chans, **kw)


def body_state(name: str, full: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model's weights as the features_only body should hold them (loaded through timm itself)."""
    body = build_encoder(name, 3).body
    sd = full.state_dict()
    out = {}
    for k in body.state_dict():
        cands = [k, k.removeprefix("model."), k.replace("_", ".", 1) if "_" in k.split(".")[0] else k]
        out[k] = next(sd[c] for c in cands if c in sd)
    return out


def cfg(*extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["backbone.name=test_resnet", *TINY, *extra])


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_timm_checkpoint_loads_strictly_and_drops_the_head(tmp_path: Path, fmt: str) -> None:
    full = timm_model("test_resnet")
    sd = full.state_dict()
    assert "fc.weight" in sd
    path = tmp_path / f"ckpt.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"state_dict": sd, "epoch": 3} if fmt == "wrapped" else sd, path)
    enc = build_encoder("test_resnet", 3)
    assert not torch.equal(enc.body.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
    rep = load_init(enc.body, enc.spec, "test_resnet", 3, str(path))
    assert rep.dropped == ["fc.bias", "fc.weight"] and "fc." in rep.describe() and rep.adapted is None
    assert rep.loaded == len(enc.body.state_dict())
    for k, v in enc.body.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("name", ["test_convnext", "test_efficientnet", "test_vit"])
def test_other_architectures_map_their_keys(tmp_path: Path, name: str) -> None:
    kw = BACKBONES.get(name).timm_kwargs
    full = timm_model(name, **kw)
    torch.save(full.state_dict(), tmp_path / "c.pth")
    enc = build_encoder(name, 3)
    rep = load_init(enc.body, enc.spec, name, 3, str(tmp_path / "c.pth"))
    assert rep.dropped  # the classifier (and for some, a final conv/norm) is outside features_only
    want = body_state(name, full)
    assert all(torch.equal(v, want[k]) for k, v in enc.body.state_dict().items())


def test_wrong_architecture_is_one_clear_line(tmp_path: Path) -> None:
    torch.save(timm_model("test_convnext").state_dict(), tmp_path / "convnext.pth")
    enc = build_encoder("test_resnet", 3)
    with pytest.raises(UserError) as e:
        load_init(enc.body, enc.spec, "test_resnet", 3, str(tmp_path / "convnext.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "convnext.pth" in msg and "test_resnet" in msg and "missing" in msg
    assert "backbone.name" in e.value.fix
    # same key names, another width: the shape is named
    wide = timm_model("test_resnet").state_dict()
    wide["layer1.0.conv1.weight"] = torch.zeros(5, 3, 3, 3)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(UserError, match=r"'layer1.0.conv1.weight' has shape \(5, 3, 3, 3\)"):
        load_init(enc.body, enc.spec, "test_resnet", 3, str(tmp_path / "wide.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable torch state dict"):
        load_init(enc.body, enc.spec, "test_resnet", 3, str(tmp_path / "junk.pth"))


def test_rgb_checkpoint_into_gray_backbone_is_adapted(tmp_path: Path) -> None:
    sd = timm_model("test_resnet").state_dict()
    torch.save(sd, tmp_path / "rgb.pth")
    enc = build_encoder("test_resnet", 1)
    rep = load_init(enc.body, enc.spec, "test_resnet", 1, str(tmp_path / "rgb.pth"))
    assert rep.adapted and "3 to 1" in rep.adapted
    assert torch.allclose(enc.body.state_dict()["conv1.0.weight"], sd["conv1.0.weight"].sum(1, keepdim=True))


def test_config_pins_the_file_hash(tmp_path: Path) -> None:
    p = tmp_path / "c.pth"
    torch.save(timm_model("test_resnet").state_dict(), p)
    c = cfg(f"backbone.init={p}")
    assert c.backbone.init_sha256 and len(c.backbone.init_sha256) == 64
    dump = c.model_dump(mode="json")
    assert dump["backbone"]["init_sha256"] == c.backbone.init_sha256  # in the resolved config and stage keys
    torch.save(timm_model("test_resnet", seed=8).state_dict(), p)
    with pytest.raises(UserError, match="has changed"):
        load_config(PretrainConfig, None, [f"backbone.init={p}", f"backbone.init_sha256={c.backbone.init_sha256}"])
    with pytest.raises(UserError, match="does not exist"):
        cfg(f"backbone.init={tmp_path / 'nope.pth'}")


def test_a_bad_init_path_names_backbone_init_and_a_run_directory_stands_for_its_encoder(tmp_path: Path) -> None:
    """The error names the field the user set (not backbone.init_sha256, which is filled in from it); the run
    directory of an earlier `segfactory pretrain` resolves to its encoder/, and that of a `segfactory run` to its
    newest pretrain stage's, as `finetune --encoder` accepts them (one home: segfactory.formats.locate)."""
    import os

    from segfactory.formats.encoder import save_encoder

    for bad, said in ((tmp_path / "nope.pth", "does not exist"), (tmp_path, "directory without")):
        with pytest.raises(UserError) as e:
            cfg(f"backbone.init={bad}")
        assert said in str(e.value) and "backbone.init=" in str(e.value) and "init_sha256" not in str(e.value)

    def encoder(out: Path, seed: int) -> Path:
        enc = build_encoder("test_resnet", 3)
        torch.manual_seed(seed)
        for w in enc.body.parameters():
            torch.nn.init.normal_(w)
        return save_encoder(out, enc.body, timm_name="test_resnet", in_chans=3,
                            normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, method="simclr", steps=1,
                            data_manifest_hash=None)

    run = tmp_path / "run"
    encoder(run / "encoder", 0)
    c = cfg(f"backbone.init={run}")
    assert c.backbone.init == str(run / "encoder") and c.backbone.init_sha256 and len(c.backbone.init_sha256) == 64
    pipeline = tmp_path / "pipeline"
    old, new = encoder(pipeline / "stages" / "pretrain-aaa" / "encoder", 1), encoder(
        pipeline / "stages" / "pretrain-bbb" / "encoder", 2)
    os.utime(old / "encoder.json", (1, 1))  # the older stage
    c = cfg(f"backbone.init={pipeline}")
    assert c.backbone.init == str(new) and c.backbone.init_sha256 != cfg(f"backbone.init={old}").backbone.init_sha256


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "dino"])
def test_training_starts_from_the_checkpoint_and_exports_for_finetuning(
        tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    sd = timm_model("test_resnet").state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "c.safetensors")
    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = train.build_method

    def spy(name: str, encoder: Any, *a: Any) -> Any:  # the model as built, before step 1
        model = real(name, encoder, *a)
        seen["online"] = {k: v.clone() for k, v in model.encoder.body.state_dict().items()}
        twins = [ema for online, ema in model.momentum_pairs if online == "encoder"]  # key / target / teacher
        assert len(twins) == (name != "simclr")
        for ema in twins:
            seen["momentum"] = {k: v.clone() for k, v in getattr(model, ema).body.state_dict().items()}
        return model

    monkeypatch.setattr(train, "build_method", spy)
    c = cfg(f"backbone.init={tmp_path / 'c.safetensors'}", f"method.name={method}", "train.steps=2",
            "backbone.in_chans=3")
    s = train.run_pretrain(c, images, tmp_path / "run")
    for branch in ("online", "momentum") if method != "simclr" else ("online",):
        assert all(torch.equal(v, sd[k]) for k, v in seen[branch].items()), branch
    meta, exported = load_encoder(s["encoder"])
    assert meta["init"]["sha256"] == c.backbone.init_sha256 and meta["init"]["dropped_modules"] == ["fc."]
    assert meta["timm_name"] == "test_resnet" and meta["steps"] == 2
    assert not all(torch.equal(v, sd[k]) for k, v in exported.items())  # it trained
    net = smp.Unet(encoder_name="tu-test_resnet", encoder_weights=None, in_channels=3, classes=2)
    load_into_smp(net, s["encoder"])
    assert all(torch.equal(net.encoder.model.state_dict()[k], v) for k, v in exported.items())

    # the exported directory is itself a valid init for the next round
    c2 = cfg(f"backbone.init={s['encoder']}", "train.steps=1", "backbone.in_chans=3")
    s2 = train.run_pretrain(c2, images, tmp_path / "run2")
    assert all(torch.equal(v, exported[k]) for k, v in seen["online"].items())
    assert json.loads((Path(s2["encoder"]) / "encoder.json").read_text())["init"]["kind"] == "encoder"
