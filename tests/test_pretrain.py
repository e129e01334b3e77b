"""Pretraining on CPU with tiny timm backbones: methods learn, resume is exact, bad input is one line."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import skimage
import sklearn
import torch
from safetensors.torch import load_file

from pretrain import ingest as core
from pretrain import train
from pretrain.augment import ViewMaker, adjust_specs
from pretrain.config import AugmentConfig, IngestConfig, PretrainConfig
from pretrain.encoder import build_encoder
from pretrain.images import make_loader
from pretrain.methods import METHODS, build_method
from pretrain.train import checkpoint_paths, restore_scaler, run_pretrain
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats import images as store
from segfactory.formats.images import open_images

REAL = [Path(skimage.__file__).parent / "data" / f for f in
        ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg", "hubble_deep_field.jpg",
         "camera.png", "coins.png")]
REAL += [Path(sklearn.__file__).parent / "datasets" / "images" / f for f in ("china.jpg", "flower.jpg")]
REAL += [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
TINY = ["train.steps=4", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
        "augment.crop_size=32", "augment.local_crop_size=16", "data.num_workers=0", "optim.warmup_steps=1",
        "method.simclr.hidden_dim=32", "method.simclr.out_dim=16", "method.moco.hidden_dim=32",
        "method.moco.out_dim=16", "method.moco.memory_bank_size=16", "method.byol.hidden_dim=32",
        "method.byol.out_dim=16", "method.dino.hidden_dim=32", "method.dino.bottleneck_dim=16",
        "method.dino.out_dim=64", "method.dino.n_local_crops=2", "method.barlowtwins.hidden_dim=32",
        "method.barlowtwins.out_dim=32", "method.vicreg.hidden_dim=32", "method.vicreg.out_dim=32"]


def ingest_inline(files: list[Path], out: Path, max_short_side: int = 64) -> Path:
    """The ingest core without Dask (the Dask pipeline is covered in test_ingest.py)."""
    c = IngestConfig(normalize={"max_short_side": max_short_side})
    hashed = core.hash_files([core.SourceFile(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files], 100)
    for spec in core.plan_shards(hashed, {}, 1, 6):
        core.ingest_shard(spec, str(out), c.model_dump(mode="json"))
    store.build_index(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_inline(REAL, tmp_path_factory.mktemp("images"))


def tiny_cfg(*extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, ["backbone.name=test_resnet", *TINY, *extra])


def test_ingested_images_load_as_seeded_squares(images: Path) -> None:
    data = open_images(images)
    assert len(data.entries) == 11 and data.num_gray == 2
    a = next(iter(make_loader(data.entries, 40, 3, 5, seed=1, start_batch=3, num_workers=0, pin_memory=False,
                              prefetch_factor=2)))
    b = next(iter(make_loader(data.entries, 40, 3, 5, seed=1, start_batch=3, num_workers=1, pin_memory=False,
                              prefetch_factor=2)))
    assert a.shape == (5, 3, 40, 40) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # worker processes see the same pixels as the main process
    c = next(iter(make_loader(data.entries, 40, 1, 5, seed=1, start_batch=3, num_workers=0, pin_memory=False,
                              prefetch_factor=2)))
    assert c.shape == (5, 1, 40, 40)
    # same images and squares as RGB, read as luma (BT.601); JPEG gray decoding skips chroma, so not bit-equal
    luma = (a.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert (luma - c.float()).abs().mean() < 1.0 and (luma - c.float()).abs().max() < 10


@pytest.mark.parametrize("in_chans", [3, 1])
def test_views_are_seeded_and_shaped(images: Path, in_chans: int) -> None:
    data = open_images(images)
    batch = next(iter(make_loader(data.entries, 48, in_chans, 6, 0, 0, 0, False, 2)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        method = build_method("dino", build_encoder("test_resnet", in_chans), tiny_cfg().method, 10)
    specs = adjust_specs(method.view_specs(32, 16, None), AugmentConfig(), single_channel=in_chans == 1)
    assert len(specs) == 4 and all(s.hue == 0 for s in specs) == (in_chans == 1)
    vm = ViewMaker(specs, [0.5] * in_chans, [0.25] * in_chans)
    v1 = vm(batch, torch.Generator().manual_seed(7))
    v2 = vm(batch, torch.Generator().manual_seed(7))
    v3 = vm(batch, torch.Generator().manual_seed(8))
    assert [tuple(v.shape) for v in v1] == [(6, in_chans, 32, 32)] * 2 + [(6, in_chans, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    assert not torch.equal(v1[0], v3[0])
    assert all(torch.isfinite(v).all() and v.min() >= -2.1 and v.max() <= 2.1 for v in v1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return torch.equal(a, b)


@pytest.mark.parametrize("op", ["hflip", "vflip", "rot90", "jitter_p", "brightness", "hue", "gray_p", "blur_p",
                                "solarize_p"])
def test_switching_one_view_op_off_leaves_every_other_draw_alone(op: str) -> None:
    from dataclasses import replace

    from pretrain.augment import ViewSpec, sample_view

    on = ViewSpec(32, vflip=0.5, rot90=True, solarize_p=0.3)
    off = replace(on, **{op: False if op == "rot90" else 0.0})
    own = {"jitter_p": "jitter", "brightness": "jitter", "hue": "jitter", "blur_p": "blur", "gray_p": "gray",
           "solarize_p": "solarize"}.get(op, op)
    g_on, g_off = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    p_on, p_off = sample_view(8, 40, on, g_on), sample_view(8, 40, off, g_off)
    assert torch.equal(g_on.get_state(), g_off.get_state())
    assert [k for k in p_on if not _same(p_on[k], p_off[k])] in ([own], [])
    # the next view of the batch is the same pixel for pixel
    x = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vm_on, vm_off = (ViewMaker([spec, ViewSpec(24)], [0.5] * 3, [0.25] * 3) for spec in (on, off))
    assert torch.equal(vm_on(x, torch.Generator().manual_seed(5))[1], vm_off(x, torch.Generator().manual_seed(5))[1])


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_loss_falls_on_a_fixed_batch(images: Path, name: str) -> None:
    data = open_images(images)
    batch = next(iter(make_loader(data.entries, 40, 3, 8, 0, 0, 0, False, 2)))
    cfg = tiny_cfg()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        method = build_method(name, build_encoder("test_resnet", 3), cfg.method, total_steps=12)
    specs = adjust_specs(method.view_specs(32, 16, None), cfg.augment, single_channel=False)
    views = ViewMaker(specs, [0.5] * 3, [0.25] * 3)(batch, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(method.parameters(), lr=2e-3)
    losses = []
    for step in range(12):
        method.on_step_start(step)
        loss = method(views, step)
        opt.zero_grad()
        loss.backward()
        method.on_before_optimizer_step(step)
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    # MoCo's memory bank starts as random unit vectors (easy negatives); it holds real keys after 2 steps
    first = losses[2] if name == "moco" else losses[0]
    assert np.mean(losses[-3:]) < first, losses


def encoder_state(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "encoder" / "encoder.safetensors")


@pytest.mark.parametrize("name", ["moco", "dino"])
def test_resume_repeats_an_uninterrupted_run_exactly(images: Path, tmp_path: Path, name: str) -> None:
    cfg = tiny_cfg(f"method.name={name}")
    straight = run_pretrain(cfg, images, tmp_path / "straight")
    first = run_pretrain(cfg, images, tmp_path / "resumed", stop_after=2)
    assert first["steps"] == 2 and not first["finished"]
    second = run_pretrain(cfg, images, tmp_path / "resumed", resume="last")
    assert second["steps"] == 4 and second["finished"]
    a, b = encoder_state(tmp_path / "straight"), encoder_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]
    assert straight["final_loss"] == second["final_loss"]
    header = (tmp_path / "resumed" / "metrics.csv").read_text().splitlines()[0]
    assert header == "step,loss,lr,images_per_s,data_wait_pct,elapsed_s"
    assert (tmp_path / "resumed" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    meta = json.loads((tmp_path / "resumed" / "encoder" / "encoder.json").read_text())
    assert meta["steps"] == 4 and meta["method"] == name and meta["data_manifest_hash"] == open_images(images).data_hash


def test_pretrain_cli_end_to_end_and_bad_input(images: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    tiny = ["--backbone", "test_convnext", *TINY]
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(run), "--steps", "2",
                 *tiny]) == 0
    out, _ = capsys.readouterr()
    summary = json.loads(out)
    assert summary["steps"] == 2 and summary["backbone"] == "test_convnext"
    # a run is never silently overwritten
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(run), *tiny]) == 2
    assert "--resume" in capsys.readouterr().err
    # a checkpoint of another architecture
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(tmp_path / "o"),
                 "--resume-from", str(next((run / "checkpoints").glob("*.pt"))), *TINY, "--backbone",
                 "test_resnet"]) == 2
    err = capsys.readouterr().err
    assert "test_convnext" in err and "--backbone test_convnext" in err
    # unknown method / backbone: one line naming the valid ones
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(tmp_path / "o"),
                 "--method", "simclrr"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'simclrr'; did you mean 'simclr'" in err and "byol" in err
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(tmp_path / "o"),
                 "--backbone", "resnet7"]) == 2
    assert "unknown backbone 'resnet7'" in capsys.readouterr().err
    # a file that is not a checkpoint
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"not a checkpoint")
    assert main(["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--out", str(tmp_path / "o"),
                 "--resume-from", str(bogus), *TINY]) == 2
    assert "not a readable segfactory checkpoint" in capsys.readouterr().err


def test_images_smaller_than_the_crop_and_empty_image_sets(images: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"all 11 ingested images are smaller than augment.crop_size=128"):
        run_pretrain(tiny_cfg("augment.crop_size=128"), images, tmp_path / "r1")
    empty = tmp_path / "empty"
    shutil.copytree(images, empty)
    for man in empty.glob("shards/*/manifest.json"):
        man.unlink()
    with pytest.raises(UserError, match="holds no ingested images"):
        run_pretrain(tiny_cfg(), empty, tmp_path / "r2")
    with pytest.raises(UserError, match="is not an ingested image set"):
        run_pretrain(tiny_cfg(), tmp_path, tmp_path / "r3")


def test_resume_is_a_plain_flag_and_resume_from_takes_a_checkpoint(images: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    args = ["pretrain", "configs/pretrain_tiny.yaml", "--images", str(images), "--backbone", "test_resnet", *TINY]
    assert main([*args, "--out", str(run), "--stop-after", "2"]) == 0
    capsys.readouterr()
    # the override after --resume is an override, not a checkpoint path
    assert main([*args, "--out", str(run), "--resume", "train.steps=3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["total_steps"] == 3 and summary["finished"]
    # an explicit checkpoint (of another run) continues into a new OUT
    ckpt = run / "checkpoints" / "step_0000002.pt"
    assert ckpt.is_file()
    assert main([*args, "--out", str(tmp_path / "branch"), "--resume-from", str(ckpt), "train.steps=5"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 5 and "resuming from" in err and "at step 2" in err
    # one or the other
    with pytest.raises(SystemExit):
        main([*args, "--out", str(run), "--resume", "--resume-from", str(ckpt)])


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_mid_step_never_checkpoints_half_a_step(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      presses: int) -> None:
    # MoCo: its momentum encoder is updated at the start of a step and its memory bank during the forward pass
    cfg = tiny_cfg("method.name=moco", "train.steps=5")
    run_pretrain(cfg, images, tmp_path / "straight")
    real_seed = train.pretrain_augment_seed

    def ctrl_c_during_step_3(seed: int, step: int, micro: int) -> int:
        if step == 2:  # after the momentum update of step 3 and its batch; before its forward pass
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return real_seed(seed, step, micro)

    monkeypatch.setattr(train, "pretrain_augment_seed", ctrl_c_during_step_3)
    before = signal.getsignal(signal.SIGINT)  # not always Python's default: other libraries install their own
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, images, tmp_path / "resumed")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    # one press: step 3 is finished and checkpointed; a second press stops at once and saves nothing
    last = checkpoint_paths(tmp_path / "resumed")[-1]
    assert last.name == ("step_0000003.pt" if presses == 1 else "step_0000002.pt")
    resumed = run_pretrain(cfg, images, tmp_path / "resumed", resume="last")
    assert resumed["steps"] == 5
    a, b = encoder_state(tmp_path / "straight"), encoder_state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(r) for r in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in ref]


def test_a_checkpoint_without_loss_scaler_state_resumes_into_fp16() -> None:
    state = torch.amp.GradScaler("cuda", enabled=False).state_dict()  # what a CPU / bf16 / fp32 run saves
    assert state == {}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        fp16.load_state_dict(state)  # what resuming used to do
    restore_scaler(fp16, state)
    assert fp16.get_scale() == 2.0**16  # the default scale
    restore_scaler(fp16, torch.amp.GradScaler("cpu", init_scale=1024.0).state_dict())
    assert fp16.get_scale() == 1024.0  # a real fp16 state is restored


@pytest.mark.gpu
def test_bf16_run_resumes_as_fp16_on_gpu(images: Path, tmp_path: Path) -> None:
    first = run_pretrain(tiny_cfg("train.device=cuda", "train.amp=bf16"), images, tmp_path / "run", stop_after=2)
    assert first["amp"] == "bfloat16"
    second = run_pretrain(tiny_cfg("train.device=cuda", "train.amp=fp16"), images, tmp_path / "run", resume="last")
    assert second["amp"] == "float16" and second["steps"] == 4 and second["finished"]


def test_moco_shuffled_bn_groups_change_key_statistics() -> None:
    """On one device a permutation alone leaves BatchNorm statistics unchanged; grouping the shuffled keys is
    what gives each key statistics of a random subset (MoCo's shuffled BN)."""
    cfg = PretrainConfig.model_validate({"method": {"name": "moco", "moco": {"memory_bank_size": 0}}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        method = build_method("moco", build_encoder("test_resnet", 3), cfg.method, 10).train()
    g = torch.Generator().manual_seed(0)
    views = [torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, 32, 32, generator=g)]

    def keys(groups: int) -> torch.Tensor:
        method.cfg.shuffle_bn_groups = groups
        with torch.no_grad():
            q = method.head(method.encoder(views[1]))  # the key encoder is a copy of the query encoder at step 0
            k = torch.cat([method.key_head(method.key_encoder(c)) for c in views[1].chunk(groups)])
        return q, k

    q, k1 = keys(1)
    assert torch.allclose(q, k1, atol=1e-5)  # one group: keys normalized exactly like their queries
    _, k2 = keys(2)
    assert not torch.allclose(q, k2, atol=1e-3)
    with torch.no_grad():
        method.cfg.shuffle_bn_groups = 1
        one = float(method(views, 0))
        method.cfg.shuffle_bn_groups = 2
        two = float(method(views, 0))
    assert one != two  # the method's forward uses the groups
