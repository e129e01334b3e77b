"""DenseCL on CPU with the tiny ``test_resnet``: the dense loss learns, resume is exact with both queues and the
momentum encoder in the checkpoint, bad options are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightly.models.utils import most_similar_index
from safetensors.torch import load_file
from test_pretrain import REAL, TINY, ingest_inline

from pretrain.augment import ViewMaker, adjust_specs
from pretrain.config import PretrainConfig
from pretrain.encoder import build_encoder
from pretrain.images import make_loader
from pretrain.methods import build_method
from pretrain.methods.densecl import DenseCL
from pretrain.train import checkpoint_paths, run_pretrain
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats.images import open_images

# 64 px crops on the stride-32 test_resnet: a 2x2 grid; queues of 16 hold real keys after 4 steps of 4 images
DENSE = ["method.name=densecl", "method.densecl.hidden_dim=32", "method.densecl.out_dim=16",
         "method.densecl.memory_bank_size=16", "augment.crop_size=64"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_inline(REAL, tmp_path_factory.mktemp("images"), max_short_side=96)


def dense_cfg(*extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["backbone.name=test_resnet", *TINY, *DENSE, *extra])


def build(cfg: PretrainConfig, total: int = 20) -> DenseCL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method = build_method("densecl", build_encoder("test_resnet", 3), cfg.method, total)
    assert isinstance(method, DenseCL)
    return method


def test_dense_loss_falls_on_a_fixed_batch(images: Path) -> None:
    cfg = dense_cfg("method.densecl.memory_bank_size=8", "augment.crop_size=96")  # a 3x3 grid
    batch = next(iter(make_loader(open_images(images).entries, 110, 3, 8, 0, 0, 0, False, 2)))
    method = build(cfg)
    specs = adjust_specs(method.view_specs(96, 32, None), cfg.augment, single_channel=False)
    views = ViewMaker(specs, [0.5] * 3, [0.25] * 3)(batch, torch.Generator().manual_seed(0))
    assert method.encoder.feature_map(views[0]).shape[-2:] == (3, 3)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=2e-3)
    dense, total = [], []
    for step in range(12):
        method.on_step_start(step)
        loss_global, loss_dense = method.losses(views, step)
        loss = 0.5 * (loss_global + loss_dense)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dense.append(loss_dense.item())
        total.append(loss.item())

    assert all(np.isfinite(dense))
    # the queues start as random unit vectors (easy negatives) and hold real keys of the batch after step 0
    assert np.mean(dense[-3:]) < 0.75 * dense[1], dense
    assert np.mean(total[-3:]) < total[1], total


def test_forward_mixes_the_losses_with_lambda_and_starts_dense_late() -> None:
    cfg = dense_cfg("method.densecl.loss_lambda=0.25", "method.densecl.dense_start_step=3")
    method = build(cfg)
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(4, 3, 64, 64, generator=g), torch.rand(4, 3, 64, 64, generator=g)]
    with torch.no_grad():  # no gradients: the queues are read, not updated, so every call sees the same state
        loss_global, loss_dense = method.losses(views, 5)
        assert float(method(views, 5)) == pytest.approx(0.75 * float(loss_global) + 0.25 * float(loss_dense))
        assert float(method(views, 2)) == pytest.approx(float(method.losses(views, 2)[0]))
    assert method.loss_lambda(2) == 0.0 and method.loss_lambda(3) == 0.25


def test_correspondence_is_the_backbone_feature_argmax() -> None:
    """Identical views through identical query and key encoders (step 0, one BN group): every query cell's best
    match is its own cell, so the dense positives are exactly the key projections of the same cells."""
    method = build(dense_cfg("method.densecl.shuffle_bn_groups=1", "augment.crop_size=96")).train()
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fq = method._grid(method.encoder.feature_map(x)).transpose(1, 2)
        fk = method._key_features(x, 0).transpose(1, 2)
    assert fq.shape == (4, 9, 96)
    assert torch.allclose(fq, fk, atol=1e-5)
    assert torch.equal(most_similar_index(fq, fk), torch.arange(9).expand(4, 9))


def test_resume_repeats_an_uninterrupted_run_exactly_with_queues_in_the_checkpoint(images: Path,
                                                                                   tmp_path: Path) -> None:
    cfg = dense_cfg()
    straight = run_pretrain(cfg, images, tmp_path / "straight")
    first = run_pretrain(cfg, images, tmp_path / "resumed", stop_after=2)
    assert first["steps"] == 2 and not first["finished"]
    ckpt_path = checkpoint_paths(tmp_path / "resumed")[-1]
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    # both queues (lightly registers them non-persistent) and the momentum encoder and heads are saved
    extra = ckpt["extra_buffers"]
    assert {"criterion.memory_bank.bank", "criterion.memory_bank.bank_ptr", "dense_bank.bank",
            "dense_bank.bank_ptr"} <= extra.keys()
    assert int(extra["dense_bank.bank_ptr"]) == int(extra["criterion.memory_bank.bank_ptr"]) == 2 * 4
    assert extra["dense_bank.bank"].shape == (16, 16)
    assert torch.allclose(extra["dense_bank.bank"].norm(dim=1), torch.ones(16))
    model = ckpt["model"]
    for prefix in ("key_encoder.body.", "key_head.", "key_dense_head."):
        assert any(k.startswith(prefix) for k in model)
    w = next(k.removeprefix("encoder.") for k in model if k.startswith("encoder.body.") and model[k].ndim == 4)
    assert not torch.equal(model["encoder." + w], model["key_encoder." + w])  # the EMA copy lags the online net

    second = run_pretrain(cfg, images, tmp_path / "resumed", resume="last")
    assert second["steps"] == 4 and second["finished"]
    a, b = load_file(tmp_path / "straight" / "encoder" / "encoder.safetensors"), load_file(
        tmp_path / "resumed" / "encoder" / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert straight["final_loss"] == second["final_loss"]
    meta = json.loads((tmp_path / "resumed" / "encoder" / "encoder.json").read_text())
    assert meta["method"] == "densecl" and meta["steps"] == 4

    # the saved queues matter: the same resume with the dense queue reset to its initial state does not repeat
    ckpt["extra_buffers"]["dense_bank.bank"] = torch.nn.functional.normalize(
        torch.randn(16, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    ckpt["extra_buffers"]["dense_bank.bank_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save(ckpt, tmp_path / "reset.pt")
    third = run_pretrain(cfg, images, tmp_path / "reset", resume=str(tmp_path / "reset.pt"))
    assert third["steps"] == 4 and third["final_loss"] != straight["final_loss"]


@pytest.mark.parametrize(("override", "needle"), [
    ("method.densecl.loss_lambda=1.5", "method.densecl.loss_lambda=1.5 is invalid"),
    ("method.densecl.memory_bank_size=0", "method.densecl.memory_bank_size=0 is invalid"),
    ("method.densecl.grid_size=0", "method.densecl.grid_size=0 is invalid"),
    ("method.densecl.lambda=0.5", "unknown config key 'method.densecl.lambda'"),
])
def test_bad_options_are_one_line(override: str, needle: str) -> None:
    with pytest.raises(UserError) as e:
        load_config(PretrainConfig, None, ["method.name=densecl", override])
    assert needle in e.value.message and e.value.fix
    assert "\n" not in str(e.value)


def test_a_grid_larger_than_the_feature_map_is_one_line() -> None:
    method = build(dense_cfg("method.densecl.grid_size=3"))
    with pytest.raises(UserError) as e:
        method.view_specs(64, 32, None)  # test_resnet at 64 px: 2x2
    assert "method.densecl.grid_size=3 is larger than the 2x2 feature grid" in e.value.message
    assert "\n" not in str(e.value)
    assert len(build(dense_cfg("method.densecl.grid_size=2")).view_specs(64, 32, None)) == 2
