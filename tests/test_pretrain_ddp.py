"""Data-parallel pretraining on the CPU: 2 gloo processes under torchrun (``train.devices=2 train.backend=gloo``).

* 2 processes with global batch B train the same weights as 1 process with batch B (SimCLR: NT-Xent gathered over
  ranks; BatchNorm synchronized over the global batch, so the statistics are the single-process ones);
* resuming under 2 processes repeats an uninterrupted 2-process run exactly;
* a rank that dies mid-run fails the whole job, promptly;
* what cannot run data-parallel (MoCo, DenseCL; an uneven batch) is refused with one line before any process starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.train import checkpoint_paths, run_pretrain
from segfactory.cli import main
from segfactory.distributed import EXIT_HOOK_ENV
from tests.test_pretrain import REAL, ingest_inline, tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
# SGD, not AdamW: Adam's first steps divide by sqrt(v), so gradients that are ~0 in both runs (1e-9 apart from
# float reduction order) could move weights by up to lr; SGD keeps weight differences proportional to gradient ones
DDP = ["train.steps=4", "train.batch_size=8", "train.checkpoint_every=2", "optim.optimizer=sgd", "optim.lr=0.5",
       "train.device=cpu", "method.simclr.temperature=0.2"]
TOL = 1e-4  # max |w_ddp - w_single| over all weights and buffers after 4 steps (measured: see the report)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ingest_inline(REAL[:8], tmp_path_factory.mktemp("images"))


def cli(images: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``segfactory pretrain`` in a fresh process (it re-launches itself under torchrun for devices > 1)."""
    cmd = [sys.executable, "-m", "segfactory.cli", "pretrain", str(ROOT / "configs" / "pretrain.yaml"),
           "--images", str(images), "--out", str(out), "backbone.name=test_resnet",
           *tiny_args(), *DDP, *extra]
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def tiny_args() -> list[str]:
    from tests.test_pretrain import TINY

    return [a for a in TINY if not a.startswith(("train.steps", "train.batch_size", "train.checkpoint_every"))]


def weights(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(checkpoint_paths(out)[-1], map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in ckpt["model"].items() if v.is_floating_point()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(images: Path, tmp_path: Path) -> None:
    single = tmp_path / "single"
    run_pretrain(tiny_cfg(*DDP), images, single)
    r = cli(images, tmp_path / "ddp", "train.devices=2", "train.backend=gloo")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 processes (gloo)" in r.stdout + r.stderr
    ddp = weights(tmp_path / "ddp")
    start = weights(single)  # sanity: training moved the weights a measurable amount
    init = tmp_path / "init"
    run_pretrain(tiny_cfg(*DDP, "train.steps=1", "optim.lr=1e-12"), images, init)
    moved = max_diff(start, weights(init))
    diff = max_diff(ddp, weights(single))
    print(f"max |w_ddp - w_single| = {diff:.3g} (weights moved up to {moved:.3g})")
    assert moved > 100 * TOL
    assert diff < TOL
    # rank 0 alone wrote the run: one summary line, the encoder, metrics of the global batch
    assert (tmp_path / "ddp" / "encoder" / "encoder.safetensors").is_file()
    assert r.stdout.count('"world_size": 2') == 1


@pytest.mark.slow
def test_resume_under_two_processes_equals_uninterrupted(images: Path, tmp_path: Path, capsys) -> None:
    two = ["train.devices=2", "train.backend=gloo"]
    full = cli(images, tmp_path / "full", *two)
    assert full.returncode == 0, full.stderr[-3000:]
    part = cli(images, tmp_path / "part", *two, "--stop-after", "2")
    assert part.returncode == 0, part.stderr[-3000:]
    # another world size: allowed, said in a note, and the same training up to float reduction order
    shutil.copytree(tmp_path / "part", tmp_path / "one")
    run_pretrain(tiny_cfg(*DDP), images, tmp_path / "one", resume="last")
    assert "written by a run of 2 process(es), this one has 1" in capsys.readouterr().err.replace("\n", " ")
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "one")) < TOL
    rest = cli(images, tmp_path / "part", *two, "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "resuming from" in rest.stdout + rest.stderr
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "part")) == 0.0


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_without_hanging(images: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = cli(images, tmp_path / "dead", "train.devices=2", "train.backend=gloo", "train.dist_timeout_s=60",
            env={EXIT_HOOK_ENV: "1:2"}, timeout=180)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank 1 exits at step 2" in r.stderr
    assert took < 120, took
    # rank 0 went on to step 2 at most: the checkpoint of step 2 may be there, never a finished run
    assert not (tmp_path / "dead" / "summary.json").exists()


def test_moco_and_uneven_batches_are_refused_before_launch(images: Path, tmp_path: Path, capsys) -> None:
    base = ["pretrain", str(ROOT / "configs" / "pretrain.yaml"), "--images", str(images), "--out",
            str(tmp_path / "x"), "backbone.name=test_resnet", *tiny_args(), *DDP, "train.devices=2",
            "train.backend=gloo"]
    assert main([*base, "method.name=moco"]) == 2
    err = capsys.readouterr()
    assert "method.name=moco cannot train on 2 processes yet" in err.out + err.err
    assert main([*base, "method.name=densecl"]) == 2
    assert main([*base, "train.batch_size=7"]) == 2
    err = capsys.readouterr()
    assert "does not split evenly over 2 processes" in err.out + err.err


def test_rank_slices_of_the_data_and_views_make_the_single_process_batch(images: Path) -> None:
    from pretrain.augment import ViewMaker, adjust_specs
    from pretrain.config import AugmentConfig
    from pretrain.images import make_loader
    from pretrain.methods.simclr import SimCLR
    from segfactory.formats.images import open_images

    entries = open_images(images).entries
    kw = {"num_workers": 0, "pin_memory": False, "prefetch_factor": 2}
    whole = next(iter(make_loader(entries, 36, 3, 8, 3, 5, **kw)))
    parts = [next(iter(make_loader(entries, 36, 3, 8, 3, 5, rank=r, world_size=2, **kw))) for r in (0, 1)]
    assert parts[0].shape[0] == 4 and torch.equal(torch.cat(parts), whole)
    specs = adjust_specs(SimCLR.view_specs(None, 32, 16, None), AugmentConfig(), False)  # type: ignore[arg-type]
    views = ViewMaker(specs, [0.5] * 3, [0.5] * 3)
    ref = views(whole, torch.Generator().manual_seed(7))
    got = [views(p, torch.Generator().manual_seed(7), rank=r, world_size=2) for r, p in enumerate(parts)]
    for i in range(len(ref)):
        assert torch.allclose(torch.cat([g[i] for g in got]), ref[i], atol=1e-5)
    # the test can fail: parameters drawn for the rank's own 4 images (no slicing) give other views
    local = views(parts[1], torch.Generator().manual_seed(7))
    assert not torch.allclose(local[0], ref[0][4:], atol=1e-3)


def test_devices_without_a_gpu_run_one_process_unless_gloo_is_asked(capsys) -> None:
    from pretrain.config import PretrainConfig
    from segfactory.cli.pretrain import _launch_processes
    from segfactory.config import load_config

    cfg = load_config(PretrainConfig, None, ["train.devices=2", "train.device=cpu"])
    assert _launch_processes(cfg) == 1
    assert "one process" in capsys.readouterr().err
    cfg = load_config(PretrainConfig, None, ["train.devices=2", "train.device=cpu", "train.backend=gloo"])
    assert _launch_processes(cfg) == 2
