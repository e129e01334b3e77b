"""The shared core's helpers for every stage: device and AMP choice, the learning-rate schedule, resume
bookkeeping, the named seed streams and sample-then-apply colour jitter and blur."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segfactory import seeds
from segfactory.augment import ColorJitter, GaussianBlur
from segfactory.errors import UserError
from segfactory.resume import changed_keys, describe_change, read_jsonl, truncate_jsonl
from segfactory.torchutil import amp_dtype, lr_factor, resolve_device, warmup_decay

# ------------------------------------------------------------------------------------------- devices


def test_device_names_and_their_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match=r"train.device='gpu' is not a device") as e:
        resolve_device("gpu", "train.device")
    assert e.value.fix == "set train.device=auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"--device='cuda:1' but no CUDA device is available") as e:
            resolve_device("cuda:1")
        assert e.value.fix == "pass --device cpu or auto"
    else:
        n = torch.cuda.device_count()
        with pytest.raises(UserError, match=f"there are {n} CUDA device"):
            resolve_device(f"cuda:{n}")


def test_mixed_precision_is_cuda_only_and_asking_for_it_on_a_cpu_is_refused() -> None:
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "off") is None
    for mode in ("bf16", "fp16"):
        with pytest.raises(UserError, match=f"train.amp={mode} needs a CUDA device") as e:
            amp_dtype(cpu, mode)
        assert "train.amp=auto" in e.value.fix


@pytest.mark.gpu
def test_mixed_precision_dtypes_on_cuda() -> None:
    cuda = torch.device("cuda")
    assert amp_dtype(cuda, "auto") == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert amp_dtype(cuda, "bf16") == torch.bfloat16 and amp_dtype(cuda, "fp16") == torch.float16
    assert amp_dtype(cuda, "off") is None


# ------------------------------------------------------------------------------------- lr schedule


def test_lr_schedules() -> None:
    assert lr_factor(0, 100, 10, "cosine", 0.9, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine", 0.9, 0.0) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine", 0.9, 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine", 0.9, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine", 0.9, 0.1) == pytest.approx(0.1)
    assert lr_factor(150, 100, 10, "cosine", 0.9, 0.1) == pytest.approx(0.1)  # past the end: stays at the floor
    assert lr_factor(50, 100, 0, "poly", 0.9, 0.0) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(55, 100, 10, "cosine", 0.9, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)


def _optimizer() -> torch.optim.Optimizer:
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    return torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.02}])


def test_warmup_decay_scales_each_group_and_resumes_from_its_state() -> None:
    opt = _optimizer()
    sched = warmup_decay(opt, 20, 4, "poly", 2.0, 0.1)
    seen = []
    for step in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        assert seen[-1] == pytest.approx([0.1 * lr_factor(step, 20, 4, "poly", 2.0, 0.1),
                                          0.02 * lr_factor(step, 20, 4, "poly", 2.0, 0.1)])
        opt.step()
        sched.step()
        if step == 8:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    resumed = _optimizer()
    rsched = warmup_decay(resumed, 20, 4, "poly", 2.0, 0.1)
    resumed.load_state_dict(state["optimizer"])
    rsched.load_state_dict(state["scheduler"])
    for step in range(9, 20):
        assert [g["lr"] for g in resumed.param_groups] == seen[step]
        resumed.step()
        rsched.step()


# --------------------------------------------------------------------------------------------- resume


def test_config_changes_name_the_first_key_and_skip_the_free_ones() -> None:
    old = {"train": {"lr": 0.1, "steps": 10, "stop_at": 4}, "data": {"num_workers": 2}, "model": {"arch": "unet"}}
    new = {"train": {"lr": 0.2, "steps": 10, "stop_at": 8}, "data": {"num_workers": 0}, "model": {"arch": "fpn"}}
    assert changed_keys(old, new) == ["data.num_workers", "model.arch", "train.lr", "train.stop_at"]
    free = ("train.stop_at", "data.num_workers")
    assert describe_change(old, new, free) == "model.arch was 'unet', now 'fpn' (and 1 more)"
    assert describe_change(old, {**new, "model": {"arch": "unet"}}, free) == "train.lr was 0.1, now 0.2"
    assert describe_change(old, {**old, "train": {**old["train"], "stop_at": 9}}, free) is None
    assert describe_change({}, {"a": "x" * 100}) == "a was None, now '" + "x" * 56 + "..."  # long values cut


def test_metrics_are_cut_back_to_the_checkpoint_and_torn_lines_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_jsonl(path) == []
    truncate_jsonl(path, 3)
    assert not path.exists()
    lines = ['{"step": 1, "loss": 0.5}', '{"step":2,  "val": {"miou": 0.1}}', '{"step": 3, "loss": 0.25}',
             '{"step": 4, "loss": 0.2}', '{"step": 5, "lo']  # the last line torn by a kill mid-write
    path.write_text("\n".join(lines) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    truncate_jsonl(path, 3)
    assert path.read_text() == "\n".join(lines[:3]) + "\n"  # kept lines byte for byte
    assert read_jsonl(path)[1] == json.loads(lines[1])


# ---------------------------------------------------------------------------------------------- seeds


def test_seed_streams_keep_their_values() -> None:
    """Rendered datasets and trained runs are reproducible from their seeds only while these stay the same."""
    assert (seeds.POSTPROCESS, seeds.PRETRAIN_ORDER, seeds.PRETRAIN_CROP, seeds.PRETRAIN_AUGMENT) == (1, 0, 1, 2)
    assert (seeds.PROBE_FRAMES, seeds.PROBE_BATCHES, seeds.PROBE_SPLIT) == (3, 4, 5)
    assert (seeds.FINETUNE_COUNTS, seeds.FINETUNE_ORDER, seeds.FINETUNE_WINDOW, seeds.FINETUNE_DROPOUT) == (
        0x5EED, 0xE90C, 0xC209, 0xD209)
    assert seeds.pretrain_augment_seed(0, 0, 0) == 8597659618385908031
    assert seeds.pretrain_augment_seed(7, 3, 1) == 9203004175526977434
    assert seeds.dropout_seed(0, 0) == 3547447203891594273
    assert seeds.dropout_seed(7, 3) == 10948402388435164062
    assert seeds.scene_rng(5, 2).integers(0, 2**31, 3).tolist() == [1702598247, 510501883, 1526928541]
    assert seeds.postprocess_rng(5, 2, 1).integers(0, 2**31, 3).tolist() == [2075759446, 2061885973, 144406216]
    assert seeds.moco_shuffle_seed(3) == 3_000_026
    assert np.random.default_rng([0, seeds.PRETRAIN_ORDER, 0]).permutation(4).tolist() == \
        np.random.default_rng(np.random.SeedSequence([0, 0, 0])).permutation(4).tolist()


def test_code_version_also_hashes_single_core_modules() -> None:
    """Stages whose output depends on a shared core module (seeds, augmentation, schedules) hash it too."""
    import segfactory
    from pipelines.stages import FINETUNE_PACKAGES, PRETRAIN_PACKAGES
    from synth.shard import RENDER_PACKAGES

    seeds_version = segfactory.code_version("segfactory.seeds")
    assert seeds_version.startswith(segfactory.__version__ + "+") and len(seeds_version.rsplit("+", 1)[1]) == 12
    assert seeds_version != segfactory.code_version("segfactory.torchutil")
    assert segfactory.code_version("pretrain", "segfactory.seeds") != segfactory.code_version("pretrain")
    with pytest.raises(ValueError, match=r"no package or module 'segfactory\.nope'"):
        segfactory.code_version("segfactory.nope")
    assert "segfactory.seeds" in RENDER_PACKAGES
    for packages in (PRETRAIN_PACKAGES, FINETUNE_PACKAGES):
        assert {"segfactory.augment", "segfactory.seeds", "segfactory.torchutil"} <= set(packages)


# -------------------------------------------------------------------------------------- jitter and blur


def _images(n: int = 6, c: int = 3, side: int = 24) -> torch.Tensor:
    return torch.rand(n, c, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("op", [ColorJitter(), GaussianBlur()])
def test_sampling_takes_the_same_draws_whether_the_op_is_on_or_off(op: ColorJitter | GaussianBlur) -> None:
    from dataclasses import replace

    off = replace(op, p=0.0)
    g_on, g_off = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    on_params, off_params = op.sample(6, g_on), off.sample(6, g_off)
    assert torch.equal(g_on.get_state(), g_off.get_state())  # the next op's draws are unchanged
    assert on_params["apply"].any() and not off_params["apply"].any()
    assert all(torch.equal(on_params[k], off_params[k]) for k in on_params if k != "apply")
    x = _images()
    assert torch.equal(off.apply(x, off_params), x)


def test_color_jitter_changes_only_the_picked_samples_and_stays_in_range() -> None:
    jitter = ColorJitter(p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
    x = _images()
    params = jitter.sample(6, torch.Generator().manual_seed(1))
    y = jitter.apply(x, params)
    changed = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert torch.equal(changed, params["apply"]) and 0 < int(changed.sum()) < 6
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    gray = _images(c=1)
    yg = jitter.apply(gray, params)  # saturation and hue are skipped on one channel
    assert yg.shape == gray.shape and torch.equal(yg[~params["apply"]], gray[~params["apply"]])


def test_blur_kernel_covers_three_sigma_and_blurs_only_the_picked_samples() -> None:
    blur = GaussianBlur(p=0.5, sigma=(0.5, 2.0))
    assert blur.kernel_size(224) == 13 and blur.kernel_size(10) == 9 and blur.kernel_size(11) == 11
    x = _images()
    params = blur.sample(6, torch.Generator().manual_seed(2))
    y = blur.apply(x, params)
    changed = (y - x).abs().flatten(1).amax(1) > 1e-6
    assert torch.equal(changed, params["apply"]) and changed.any()
    assert float(y[changed].std()) < float(x[changed].std())  # smoother
