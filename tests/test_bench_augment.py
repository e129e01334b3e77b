"""``segfactory bench augment``: its rows (lightly, kornia, torchvision v2, training steps), fail-soft rows, the
JSON keys, and the torchvision v2 view recipe."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from pretrain import bench
from pretrain.augment import ViewSpec
from segfactory.cli import main

TINY = ["--images", "8", "--batch-size", "4", "--crop-size", "32", "--workers", "0", "--backbone", "test_resnet",
        "--steps", "1"]
# the keys of the JSON object before the torchvision v2 rows existed: scripts read them
LEGACY_KEYS = {"bench", "method", "images", "batch_size", "crop_size", "views", "device", "baseline_workers",
               "lightly_torchvision_images_per_s", "kornia_images_per_s", "speedup", "kornia_cpu_images_per_s",
               "baseline_views", "backbone", "train_step_ms", "augment_ms_per_batch", "augment_share_of_step_pct",
               "train_images_per_s", "peak_host_mb_main", "peak_host_mb_child_max", "hardware"}


def _run(capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    assert main(["bench", "augment", "--device", "cpu", *TINY, *extra]) == 0
    out: dict[str, Any] = json.loads(capsys.readouterr().out)
    return out


def test_bench_augment_reports_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    r = _run(capsys)
    rows = {row["name"]: row for row in r["rows"]}
    assert list(rows) == ["lightly", "kornia", "torchvision_v2", "step_kornia", "step_torchvision_v2"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["images_per_s"] > 0, row
    assert r["errors"] == []
    assert set(r) >= LEGACY_KEYS
    assert r["kornia_images_per_s"] == rows["kornia"]["images_per_s"]
    assert r["kornia_cpu_images_per_s"] == r["kornia_images_per_s"]  # --device cpu: the same row
    assert r["torchvision_v2_images_per_s"] == rows["torchvision_v2"]["images_per_s"]
    assert r["baseline_views"] == 2 and r["views"] == [32, 32]
    assert r["faster_views"] in ("kornia", "torchvision_v2")
    for name, prefix in (("step_kornia", ""), ("step_torchvision_v2", "torchvision_v2_")):
        step = rows[name]
        assert 0 < step["augment_share_pct"] < 100
        assert r[f"{prefix}augment_share_pct"] == step["augment_share_pct"]
        total = step["augment_ms_per_batch"] + step["train_step_ms"]
        # both times are rounded to 0.1 ms: allow what that rounding moves the share by, plus the share's own 0.05
        slack = 100 * 0.05 * 2 / total + 0.05
        assert step["augment_share_pct"] == pytest.approx(100 * step["augment_ms_per_batch"] / total, abs=slack)
        assert step["data_bound"] == (step["augment_share_pct"] >= 10)
    assert r["augment_share_of_step_pct"] == r["augment_share_pct"]
    assert "peak_gpu_mb" not in r  # CPU run
    assert r["notes"] == []  # no workers, nothing idle


def test_a_failing_row_becomes_an_error_row(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(spec: ViewSpec) -> Any:
        raise RuntimeError("no v2 here\nsecond line of the message")

    monkeypatch.setattr(bench, "tv2_transform", broken)
    r = bench.bench_augment(n_images=8, batch_size=4, crop=32, device="cpu", workers=0, backbone="test_resnet",
                            steps=1)
    rows = {row["name"]: row for row in r["rows"]}
    assert rows["torchvision_v2"]["error"] == "RuntimeError: no v2 here"
    assert rows["step_torchvision_v2"]["error"] == "RuntimeError: no v2 here"
    assert rows["torchvision_v2"]["images_per_s"] is None
    for name in ("lightly", "kornia", "step_kornia"):
        assert "error" not in rows[name] and rows[name]["images_per_s"] > 0
    assert r["errors"] == ["torchvision_v2: RuntimeError: no v2 here", "step_torchvision_v2: RuntimeError: no v2 here"]
    assert r["torchvision_v2_images_per_s"] is None and r["torchvision_v2_augment_share_pct"] is None
    assert r["faster_views"] == "kornia"
    assert set(r) >= LEGACY_KEYS
    json.dumps(r)  # still one JSON object


def test_a_failing_baseline_leaves_the_ratios_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Any:
        raise ValueError("lightly is gone")

    monkeypatch.setattr(bench, "_lightly_transform", broken)
    r = bench.bench_augment(n_images=4, batch_size=4, crop=32, device="cpu", workers=0, backbone=None)
    assert [row["name"] for row in r["rows"]] == ["lightly", "kornia", "torchvision_v2"]
    assert r["lightly_torchvision_images_per_s"] is None and r["speedup"] is None
    assert r["kornia_images_per_s"] > 0 and r["rows"][1]["vs_lightly"] is None
    assert "backbone" not in r


def test_baseline_workers_default_to_all_cores() -> None:
    assert bench._all_cores() == len(os.sched_getaffinity(0))
    import inspect

    assert inspect.signature(bench.bench_augment).parameters["workers"].default is None


def _x(n: int = 3, side: int = 40) -> torch.Tensor:
    photo = bench.sample_photos()[0]
    import numpy as np

    rng = np.random.default_rng(0)
    return torch.from_numpy(np.stack([bench._variant(photo, side, side, rng) for _ in range(n)])).permute(0, 3, 1, 2)


def test_tv2_views_identity_recipe_returns_the_normalized_input() -> None:
    x = _x()
    spec = ViewSpec(40, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    (v,) = bench.TorchvisionV2Views([spec], [0.5] * 3, [0.25] * 3)(x)
    assert v.shape == (3, 3, 40, 40) and v.dtype == torch.float32
    torch.testing.assert_close(v, (x.float() / 255 - 0.5) / 0.25)


def test_tv2_views_follow_the_spec_per_image() -> None:
    x = _x(6).clone()
    x[:] = x[0]  # six copies of one image
    tv = bench.TorchvisionV2Views([ViewSpec(24, gray_p=1.0), ViewSpec(16, jitter_p=0.0, gray_p=0.0, solarize_p=1.0)],
                                  [0.0] * 3, [1.0] * 3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        gray, sol = tv(x, channels_last=True)
    assert gray.shape == (6, 3, 24, 24) and sol.shape == (6, 3, 16, 16)
    assert gray.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])  # grayscale with p=1: equal channels
    assert sol.max() <= 0.5 + 1e-6  # solarized with p=1 at 0.5: nothing above the threshold stays
    # one parameter set per image: the six copies get different crops
    assert len({round(float(v.sum()), 3) for v in gray}) == 6


def test_tv2_transform_refuses_rot90() -> None:
    with pytest.raises(NotImplementedError, match="rot90"):
        bench.tv2_transform(ViewSpec(32, rot90=True))


def test_bench_augment_rejects_zero_steps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "augment", "--device", "cpu", *TINY[:-1], "0"]) == 2
    assert "--steps=0" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_augment_on_cuda_all_rows() -> None:
    """On the GPU box: every row runs, the baseline uses all cores by default."""
    r = bench.bench_augment(n_images=64, batch_size=16, crop=64, device="cuda", backbone="resnet18", steps=2)
    rows = {row["name"]: row for row in r["rows"]}
    assert list(rows) == ["lightly", "kornia", "torchvision_v2", "kornia_cpu", "step_kornia", "step_torchvision_v2"]
    for row in rows.values():
        assert "error" not in row, row
        assert row["images_per_s"] > 0, row
    assert rows["kornia"]["device"].startswith("cuda") and rows["torchvision_v2"]["device"].startswith("cuda")
    assert r["baseline_workers"] == bench._all_cores()
    assert r["peak_gpu_mb"] > 0 and r["errors"] == []
    assert 0 < r["augment_share_pct"] < 100 and 0 < r["torchvision_v2_augment_share_pct"] < 100
