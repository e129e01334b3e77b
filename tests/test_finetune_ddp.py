"""Data-parallel fine-tuning on the CPU: 2 gloo processes under torchrun (``train.devices=2 train.backend=gloo``).

* 2 processes with global batch B train the same model as 1 process with batch B: every rank loads its slots of
  the same global batch, augments them with its rows of the global batch's parameters, BatchNorm is synchronized
  and the losses are global (sums over ranks), so the gradients agree up to float32 rounding. AdamW then turns
  the few gradient components that are ~0 (and whose sign rounding decides) into full +-lr steps, so the weights
  are compared element-wise by how many differ, not by the largest difference (see TOL_* below);
* two torchrun "nodes" on localhost (``--nnodes=2``, c10d rendezvous: the documented multi-node command) train
  the single-process model;
* resuming under 2 processes repeats an uninterrupted 2-process run exactly;
* a rank that dies mid-run fails the whole job, promptly;
* the instance head trains the same way on 2 processes;
* domain adaptation (self-training with the EMA teacher and ClassMix, histogram matching and FDA, BatchNorm
  recalibration) on real unlabeled HeLa frames trains the same on 2 processes as on 1, and resumes exactly; so
  does self-training with the instance head (class pseudo-labels only) and masked image consistency (MIC);
* what cannot run data-parallel (a synthetic or real batch that does not split evenly) is refused with one line
  before any process starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.data.mixing import MixedBatchSampler
from finetune.train import CHECKPOINT_FILE
from segfactory.cli import main
from segfactory.distributed import EXIT_HOOK_ENV
from tests.ddp_cli_worker import one_job
from tests.torchrun_nodes import run_nodes

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "finetune_tiny.yaml")
# A small learning rate without warm-up: AdamW's update of a component is about +-lr whatever its gradient's size,
# so the few ~0 gradient components whose sign float rounding decides move by up to 2 lr in opposite directions;
# with a small lr these flips do not feed back into the later steps' forward passes (at lr 3e-3 they do, and after
# 4 steps the runs differ by a median 1.3e-4, 5 % of what the weights moved, in every element).
ARGS = ["train.steps=4", "train.batch_size=8", "train.device=cpu", "train.val_every=2", "train.checkpoint_every=2",
        "train.log_every=1", "train.lr=1e-5", "train.warmup_steps=0"]
TWO = ["train.devices=2", "train.backend=gloo"]
# Measured (see docs/finetune.md, "Distributed"): after 4 steps (the encoder frozen for 2) 3 of 1,041,483 weight
# elements differ by more than 1e-6 (without the freeze 0.05 %: AdamW sign flips of ~0 gradients, up to 2 lr),
# while training moves most weights by ~1e-5 per step; the first-step gradient differs by 5e-4 (relative norm),
# which is float32 BatchNorm rounding of the single process: against a float64 reference the 2-process gradient
# is off by 1e-6 and the single-process one by 1.5e-3. A run whose ranks did not train on the global batch
# differs by ~lr in most elements (augmentation drawn per rank instead of as rows of the global batch: 58 % of the
# elements); per-rank losses averaged by DDP instead of the global ones move the logged loss by 1e-2 (and 0.4 % of
# the elements), hence the tight loss tolerance.
TOL_FRACTION = 0.001
# The share of AdamW sign flips of ~0 gradients (above; mostly in the deepest decoder block) depends on which
# frames train: over four validation splits of the same dataset (2026-12-05) 0.0001-0.84 % of the elements with
# self-training (max difference 3.7e-5, under 4 lr) and 0.009-0.14 % with the instance head, while rank-local
# draws move most elements: per-rank weak views 82 %, per-rank ClassMix masks 68 % (each injected and measured).
TOL_FRACTION_NOISY = 0.02
TOL_GRAD = 5e-3


def finetune_argv(dataset: Path, out: Path, *extra: str) -> list[str]:
    """The arguments of ``segfactory finetune`` for a tiny run on ``dataset`` into ``out``."""
    return ["finetune", TINY, "--out", str(out), "--synthetic", str(dataset), *ARGS, *extra]


def cli(dataset: Path, out: Path, *extra: str, env: dict[str, str] | None = None,
        timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``segfactory finetune`` in a fresh process (it re-launches itself under torchrun for devices > 1)."""
    cmd = [sys.executable, "-m", "segfactory.cli", *finetune_argv(dataset, out, *extra)]
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def failure(r: subprocess.CompletedProcess[str]) -> str:
    """What a failed launch says: each rank's own error lines (torchrun's report of a failed rank is long enough
    to push them out of a plain tail), then the tail."""
    keys = ("terminate", "Error", "error:", "Fatal", "Abort", "Traceback", "UserError")
    lines = [ln for ln in r.stderr.splitlines() if any(k in ln for k in keys)]
    return "\n".join(lines[:30]) + "\n...\n" + r.stderr[-2000:]


def checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def weights(ckpt: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(ckpt["model"].items())
                      if v.is_floating_point() and "running" not in k])


def first_moment(ckpt: dict) -> torch.Tensor:
    """AdamW's exp_avg of every parameter: after one step (1 - beta1) x the gradient of the global batch."""
    st = ckpt["optimizer"]["state"]
    return torch.cat([st[i]["exp_avg"].flatten() for i in sorted(st)])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_trains_the_single_process_model(single: Path, ddp: Path, what: str) -> dict:
    """A 4-step run on 2 processes (``ddp``) against one process with the same global batch (``single``): at most
    TOL_FRACTION of the weights differ by more than 1e-6, the logged losses of the global batch agree to 1e-4 and
    the validations (frames split over ranks, confusions summed) to 0.005 mIoU. Returns ``single``'s checkpoint."""
    a, b = checkpoint(single), checkpoint(ddp)
    assert b["world_size"] == 2 and b["step"] == 4
    wa, wb = weights(a), weights(b)
    differ = float(((wa - wb).abs() > 1e-6).float().mean())
    print(f"{what}, 4 steps: {100 * differ:.3f} % of {wa.numel()} weights differ by > 1e-6 from one process "
          f"(max {float((wa - wb).abs().max()):.3g})")
    assert differ < TOL_FRACTION
    la, lb = metrics(single), metrics(ddp)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for x, y in zip(la, lb, strict=True):
        if "loss" in x:
            assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
        else:
            assert abs(x["val"]["selected_miou"] - y["val"]["selected_miou"]) < 0.005, (x, y)
    return a


# the encoder frozen for 2 steps: DDP is rebuilt when it is unfrozen (steps 3-4 train it)
FROZEN = ["model.freeze_encoder_steps=2"]
# Self-training from step 1 of 4 with a low pseudo-label threshold (the barely trained teacher is never 0.968
# confident, and its labels should count), histogram matching and FDA on every other crop, BatchNorm
# recalibration of the validated and saved models. The real batch is 4 (2 per rank) against 8 synthetic crops (4
# per rank): ClassMix pastes synthetic crops 0-3 into real crops 0-3, so rank 1 pastes crops that rank 0 holds
# (the gathered path; with equal batches each rank pastes its own, measured to match as closely).
ADAPT = ["adapt.warmup_steps=1", "adapt.threshold=0.4", "adapt.hist_match_p=0.5", "adapt.fda_beta=0.05",
         "adapt.fda_p=0.5", "adapt.recalibrate_bn=2", "adapt.batch_size=4", "input.scaling=auto"]
# Self-training with the instance head but without adapt.instance_pseudo (its forward through DDP around the joint
# heads learns the class logits only), plus masked image consistency (a third forward, with both heads).
MIC_INSTANCES = ["instances.enabled=true", "adapt.mic_ratio=0.5", "adapt.mic_block=8"]
Runs = tuple[Path, dict[str, subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="module")
def single_runs(tiny_dataset: Path, hela_unlabeled: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The 1-process references of the 2-process runs below (``RUNS/<name>``) and their launches' results by name,
    in one process (:func:`tests.ddp_cli_worker.one_job` with ``nproc=1``: one interpreter and torch start instead
    of one per run): the encoder frozen for 2 steps (FROZEN; the reference of the single-node and the two-node
    tests: a deterministic run, the same weights and logs each time, so it runs once), one step, the instance
    head, domain adaptation."""
    runs = tmp_path_factory.mktemp("single_runs")
    plan = {"single": FROZEN, "s1": ["train.steps=1"], "instances": ["instances.enabled=true", *FROZEN],
            "adapt": ["--unlabeled", str(hela_unlabeled), *ADAPT],
            "adapt_mic": ["--unlabeled", str(hela_unlabeled), *ADAPT, *MIC_INSTANCES]}
    return runs, one_job({name: finetune_argv(tiny_dataset, runs / name, *extra) for name, extra in plan.items()},
                         runs / "job", nproc=1)


@pytest.fixture(scope="module")
def ddp_runs(tiny_dataset: Path, hela_unlabeled: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """The 2-process runs of the tests below that train to the end or stop at a step (``RUNS/<name>``), and their
    launches' results by name: real ``segfactory finetune`` runs on 2 gloo processes under torchrun, all in one
    torchrun job (:func:`tests.ddp_cli_worker.one_job`: the interpreter, torch and the job start once instead of
    once per run; each run joins the job's ranks as the ranks of a command that re-launched itself do). The
    resumes stay launches of their own, through the command line's re-launch: a stopped run resumes in new
    processes."""
    runs = tmp_path_factory.mktemp("ddp_runs")
    adapt = ["--unlabeled", str(hela_unlabeled), *ADAPT]
    plan = {"ddp": [*TWO, *FROZEN], "d1": ["train.steps=1", *TWO],
            "instances": [*TWO, "instances.enabled=true", *FROZEN],
            "full": [*TWO], "part": [*TWO, "train.stop_at=2"],
            "adapt": [*TWO, *adapt], "adapt_part": [*TWO, *adapt, "train.stop_at=2"],
            "adapt_mic": [*TWO, *adapt, *MIC_INSTANCES]}
    return runs, one_job({name: finetune_argv(tiny_dataset, runs / name, *extra) for name, extra in plan.items()},
                         runs / "job")


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(single_runs: Runs, ddp_runs: Runs) -> None:
    (ones, singles), (runs, done) = single_runs, ddp_runs
    single, ddp = ones / "single", runs / "ddp"  # the encoder frozen for 2 steps (FROZEN)
    r1, r2 = singles["single"], done["ddp"]
    assert r1.returncode == 0, failure(r1)
    assert r2.returncode == 0, r2.stdout[-3000:] + failure(r2)
    assert "2 processes (gloo), global batch 8 (4 per process)" in r2.stderr.replace("\n", " ")
    wa = weights(assert_trains_the_single_process_model(single, ddp, "2 processes"))
    # rank 0 alone wrote the run: one summary line (stdout), the model
    assert r2.stdout.count('"finished": true') == 1
    assert (ddp / "model" / "model.safetensors").is_file()
    # the first step's gradient (a 1-step run of each, encoder trained)
    r1, r2 = singles["s1"], done["d1"]
    assert r1.returncode == 0 and r2.returncode == 0, failure(r2)
    s1 = checkpoint(ones / "s1")
    moved = float(((weights(s1) - wa).abs() > 1e-6).float().mean())  # training moves most weights measurably
    print(f"the 1-step and the 4-step runs differ in {100 * moved:.1f} % of the weights by > 1e-6")
    assert moved > 0.5
    ga, gb = first_moment(s1), first_moment(checkpoint(runs / "d1"))
    rel = float((ga - gb).norm() / ga.norm())
    print(f"first-step gradient: relative difference {rel:.3g}")
    assert rel < TOL_GRAD


@pytest.mark.slow
def test_two_nodes_through_the_c10d_rendezvous_train_the_single_process_model(tiny_dataset: Path, single_runs: Runs,
                                                                             tmp_path: Path) -> None:
    """The multi-node command docs/finetune.md documents, on localhost: two ``torchrun --nnodes=2 --node-rank=0/1
    --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT -m segfactory.cli finetune ...``
    launches with the same ``--out`` (the shared file system), started by hand (no ``train.devices``, no
    ``train.backend``: the ranks see torchrun's environment, do not re-launch, and join with gloo on the CPU).
    Both finish; rank 0 alone writes the run; it trained the single-process model of the same global batch, with
    the tolerances of the single-node 2-process test (share of weights that differ, logged losses, validation)."""
    extra = FROZEN  # as the single-node test: DDP is rebuilt when the encoder thaws
    out = tmp_path / "nodes"
    res = run_nodes(finetune_argv(tiny_dataset, out, *extra))
    for rc, o, e in res:
        assert rc == 0, o[-3000:] + e[-3000:]
    logs = "".join(o + e for _, o, e in res)
    assert "2 processes (gloo), global batch 8 (4 per process)" in " ".join(logs.split())
    assert logs.count('"finished": true') == 1 and (out / "model" / "model.safetensors").is_file()
    ones, singles = single_runs
    r1 = singles["single"]  # one process, FROZEN too
    assert r1.returncode == 0, failure(r1)
    assert_trains_the_single_process_model(ones / "single", out, "two nodes")


@pytest.mark.slow
def test_the_instance_head_trains_the_same_on_two_processes(single_runs: Runs, ddp_runs: Runs) -> None:
    """DDP around both heads' joint forward; the distance loss is the global batch's mean BCE."""
    (ones, singles), (runs, done) = single_runs, ddp_runs
    r1, r2 = singles["instances"], done["instances"]  # instances.enabled=true and FROZEN; with TWO
    assert r1.returncode == 0 and r2.returncode == 0, failure(r2)
    wa, wb = weights(checkpoint(ones / "instances")), weights(checkpoint(runs / "instances"))
    differ = float(((wa - wb).abs() > 1e-6).float().mean())
    print(f"instance head, 4 steps: {100 * differ:.4f} % of the weights differ by > 1e-6")
    assert differ < TOL_FRACTION_NOISY
    la, lb = metrics(ones / "instances"), metrics(runs / "instances")
    for x, y in zip(la, lb, strict=True):
        if "loss" in x:
            assert abs(x["instance_loss"] - y["instance_loss"]) < 1e-4 and abs(x["loss"] - y["loss"]) < 1e-4, (x, y)


@pytest.mark.slow
def test_resume_under_two_processes_equals_uninterrupted(tiny_dataset: Path, ddp_runs: Runs, tmp_path: Path) -> None:
    runs, done = ddp_runs
    full, part = done["full"], done["part"]  # TWO; TWO and train.stop_at=2
    assert full.returncode == 0, failure(full)
    assert part.returncode == 0, failure(part)
    assert checkpoint(runs / "part")["step"] == 2
    shutil.copytree(runs / "full", tmp_path / "full")
    shutil.copytree(runs / "part", tmp_path / "part")  # resumed here: the fixture's runs stay as they were
    shutil.copytree(tmp_path / "part", tmp_path / "one")
    rest = cli(tiny_dataset, tmp_path / "part", *TWO, "--resume")
    assert rest.returncode == 0, failure(rest)
    assert "resuming" in rest.stderr
    a, b = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "part")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    def logged(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(out)]

    assert logged(tmp_path / "full") == logged(tmp_path / "part")
    # another world size: allowed, said in a note, the same training up to float rounding (and AdamW sign flips)
    one = cli(tiny_dataset, tmp_path / "one", "--resume")
    assert one.returncode == 0, failure(one)
    assert "written by a run of 2 process(es), this one has 1" in one.stderr.replace("\n", " ")
    differ = float(((weights(a) - weights(checkpoint(tmp_path / "one"))).abs() > 1e-6).float().mean())
    assert differ < TOL_FRACTION


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_without_hanging(tiny_dataset: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = cli(tiny_dataset, tmp_path / "dead", *TWO, "train.dist_timeout_s=60", env={EXIT_HOOK_ENV: "1:2",
                                                                                  "TMPDIR": str(tmp)}, timeout=180)
    took = time.monotonic() - t0
    assert r.returncode != 0
    assert "rank 1 exits at step 2" in r.stderr
    assert took < 120, took
    assert not (tmp_path / "dead" / "summary.json").exists()
    assert not list(tmp.glob("torchelastic_*")) and not list(tmp.glob("segfactory-torchrun-*"))  # its log dir went


@pytest.mark.slow
def test_a_stopped_launcher_outlives_its_ranks_and_they_checkpoint(tiny_dataset: Path, tmp_path: Path) -> None:
    """SIGTERM to the launching process (what a pipeline's stage process gets when its Dask worker dies): torchrun
    passes it on, rank 0 checkpoints at its step boundary, and the launcher (the holder of a pipeline's stage
    lock) exits only after every rank is gone."""
    import psutil

    out = tmp_path / "stopped"
    args = [a for a in ARGS if not a.startswith(("train.steps=", "train.checkpoint_every=", "train.val_every="))]
    cmd = [sys.executable, "-m", "segfactory.cli", "finetune", TINY, "--out", str(out), "--synthetic",
           str(tiny_dataset), *args, "train.steps=100000", "train.checkpoint_every=100000",
           "train.val_every=100000", *TWO]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 3):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read() if \
                launcher.poll() is not None else "no training steps logged in time"
            time.sleep(0.1)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert len([p for p in tree if "segfactory.cli" in " ".join(p.cmdline())]) >= 2  # the ranks
        launcher.terminate()
        launcher.wait(timeout=120)
        # at the moment the launcher is gone, no rank runs on any more, and rank 0 left the checkpoint of the
        # interruption (the only one: checkpoint_every is far away)
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert checkpoint(out)["step"] >= 3
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for p in [*tree, *psutil.Process().children(recursive=True)]:  # ranks left behind are no children of ours
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_what_cannot_run_data_parallel_is_refused_before_launch(tiny_dataset: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    base = ["finetune", TINY, "--out", str(tmp_path / "x"), "--synthetic", str(tiny_dataset), *ARGS, *TWO]
    assert main([*base, "train.batch_size=7"]) == 2
    err = capsys.readouterr()
    assert "train.batch_size=7 (the global batch) does not split evenly over 2 processes" in err.err.replace("\n", " ")
    assert main([*base, "--unlabeled", str(tmp_path / "none"), "adapt.batch_size=5"]) == 2
    assert "adapt.batch_size=5 (the global batch of real crops) does not split evenly over 2 processes" in \
        capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_rank_slots_and_augmentation_rows_make_the_single_process_batch() -> None:
    from finetune.augment import GpuAugment

    whole = list(MixedBatchSampler([5, 7], [1.0, 2.0], 8, 3, 2, 4))
    parts = [list(MixedBatchSampler([5, 7], [1.0, 2.0], 8, 3, 2, 4, rank=r, world_size=2)) for r in (0, 1)]
    for s, batch in enumerate(whole):
        assert parts[0][s] + parts[1][s] == batch and len(parts[1][s]) == 4
    cfg = FinetuneConfig.model_validate({"augment": {"crop_size": 32, "noise_p": 0.5, "blur_p": 0.5}}).augment
    aug = GpuAugment(cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(8, 3, 40, 40, generator=g), torch.randint(0, 3, (8, 40, 40), generator=g)
    ref = aug(x, y, torch.Generator().manual_seed(5))
    got = [aug.apply(x[4 * r:4 * r + 4], y[4 * r:4 * r + 4],
                     aug.sample_rows(8, 4 * r, 4 * r + 4, torch.Generator().manual_seed(5))) for r in (0, 1)]
    assert torch.allclose(torch.cat([gx for gx, _ in got]), ref[0], atol=1e-6)
    assert torch.equal(torch.cat([gy for _, gy in got]), ref[1])


def test_rank_slots_of_real_crops_and_classmix_draws_make_the_single_process_batch() -> None:
    """The unlabeled sampler's rank slots and ClassMix drawn from the gathered class lists of the global batch."""
    from finetune.adapt import choose_half, chosen_mask, classmix_masks, present_classes
    from finetune.unlabeled import UnlabeledSampler

    whole = list(UnlabeledSampler(5, 8, 3, 2, 6))
    parts = [list(UnlabeledSampler(5, 8, 3, 2, 6, rank=r, world_size=2)) for r in (0, 1)]
    for s, batch in enumerate(whole):  # (step, global slot, image): the slot seeds the window
        assert parts[0][s] + parts[1][s] == batch and len(parts[1][s]) == 4
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (8, 16, 16), generator=g)
    y[:, :2] = 255
    y[5] = 255  # no class at all: no draw
    ref = classmix_masks(y, torch.Generator().manual_seed(7), 255, num_classes=4)
    gen = torch.Generator().manual_seed(7)
    present = torch.cat([present_classes(y[4 * r:4 * r + 4], 4, 255) for r in (0, 1)])  # all_gather_cat
    chosen = choose_half(present, gen)
    got = torch.cat([chosen_mask(y[4 * r:4 * r + 4], chosen[4 * r:4 * r + 4]) for r in (0, 1)])
    assert torch.equal(got, ref)
    # per-rank draws (each rank from the same generator state, for its own rows) would differ
    local = [classmix_masks(y[4 * r:4 * r + 4], torch.Generator().manual_seed(7), 255, num_classes=4)
             for r in (0, 1)]
    assert not torch.equal(torch.cat(local), ref)


def test_local_batchnorm_undoes_the_synchronized_one() -> None:
    from segfactory.distributed import CPUSyncBatchNorm, local_batchnorm

    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8, generator=g)
    ref = net(x)
    synced = CPUSyncBatchNorm.convert(net)
    sync_cls = type(synced[1])
    assert sync_cls is not torch.nn.BatchNorm2d
    plain = local_batchnorm(synced)
    assert not any(isinstance(m, (sync_cls, torch.nn.SyncBatchNorm)) for m in plain.modules())
    assert plain[1].weight is net[1].weight and plain[1].running_mean is net[1].running_mean  # shared
    assert torch.allclose(plain(x), ref, atol=1e-6)


def test_global_losses_equal_torch_and_smp_in_one_process() -> None:
    from segmentation_models_pytorch.losses import DiceLoss

    from finetune.train import global_losses
    from segfactory.distributed import DistInfo

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 16, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (4, 16, 16), generator=g)
    y[:, :3] = 255
    for w in (None, torch.tensor([0.5, 1.0, 2.0])):
        ce, dice = global_losses(logits, y, w, 255, DistInfo())
        ce_ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=255)(logits, y)
        dice_ref = DiceLoss("multiclass", from_logits=True, ignore_index=255)(logits, y)
        assert torch.allclose(ce, ce_ref, atol=1e-6) and torch.allclose(dice, dice_ref, atol=1e-6)
        ga = torch.autograd.grad(ce + dice, logits)[0]
        gb = torch.autograd.grad(ce_ref + dice_ref, logits)[0]
        assert torch.allclose(ga, gb, atol=1e-7)


# ------------------------------------------------------------------------------------------ domain adaptation

# ADAPT (above): the domain adaptation settings of these tests.


@pytest.fixture(scope="module")
def hela_unlabeled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 real HeLa frames (the ctc-hela sample set's unlabeled split) ingested as unlabeled images."""
    from test_finetune_adapt import ingest_files

    from segfactory.sampledata import materialize

    frames = materialize("ctc-hela", split="unlabeled", out=tmp_path_factory.mktemp("hela"))["unlabeled"]
    files = sorted(frames.glob("hela_t*.png"))[:4]
    return ingest_files(files, tmp_path_factory.mktemp("hela_ingested") / "images", 128)


def test_each_rank_loads_its_slots_of_the_global_real_batch(hela_unlabeled: Path) -> None:
    """Real crops from the unlabeled store, in random order and streamed: rank 0's then rank 1's crops are the
    single-process batch, pixel for pixel."""
    from finetune.unlabeled import open_unlabeled, unlabeled_loader

    images = open_unlabeled([hela_unlabeled], 3).images
    for stream in (False, True):
        def batches(rank: int, world: int, stream: bool = stream) -> list[dict]:
            return list(unlabeled_loader(images, 48, 3, "auto", 1.0, 4, 0, 1, 3, 0, False, stream=stream,
                                         rank=rank, world_size=world))

        whole, parts = batches(0, 1), [batches(r, 2) for r in (0, 1)]
        assert len(whole) == 2
        for s, b in enumerate(whole):
            for key in ("image", "valid"):
                assert torch.equal(torch.cat([parts[0][s][key], parts[1][s][key]]), b[key]), (stream, s, key)


def teacher(ckpt: dict) -> torch.Tensor:
    return torch.cat([v.float().flatten() for k, v in sorted(ckpt["adapt"]["teacher"].items())
                      if v.is_floating_point() and "running" not in k])


def assert_adapts_like_one_process(single_runs: Runs, ddp_runs: Runs, name: str, what: str) -> tuple[dict, dict]:
    """The self-training run ``name`` on 2 processes against one: both launches succeeded, the student and the
    teacher (an EMA of the students) differ in under TOL_FRACTION_NOISY of their weights by more than 1e-6, and
    the adaptation generator has made the same draws (for the global batch, on every rank). Returns the
    checkpoints (one process, two)."""
    (ones, singles), (runs, done) = single_runs, ddp_runs
    r1, r2 = singles[name], done[name]
    assert r1.returncode == 0, failure(r1)
    assert r2.returncode == 0, r2.stdout[-3000:] + failure(r2)
    a, b = checkpoint(ones / name), checkpoint(runs / name)
    assert b["world_size"] == 2 and b["step"] == 4
    for net, (wa, wb) in {"student": (weights(a), weights(b)), "teacher": (teacher(a), teacher(b))}.items():
        differ = float(((wa - wb).abs() > 1e-6).float().mean())
        print(f"{what}, 4 steps: {net} {100 * differ:.4f} % of {wa.numel()} weights differ by > 1e-6 "
              f"(max {float((wa - wb).abs().max()):.3g})")
        assert differ < TOL_FRACTION_NOISY, net
    assert torch.equal(a["adapt"]["rng"], b["adapt"]["rng"])
    return a, b


@pytest.mark.slow
def test_domain_adaptation_trains_the_same_on_two_processes_and_resumes_exactly(
        tiny_dataset: Path, hela_unlabeled: Path, single_runs: Runs, ddp_runs: Runs, tmp_path: Path) -> None:
    ones, (runs, done) = single_runs[0], ddp_runs
    extra = ["--unlabeled", str(hela_unlabeled), *ADAPT]
    b = assert_adapts_like_one_process(single_runs, ddp_runs, "adapt", "adaptation")[1]  # extra; with TWO
    la, lb = metrics(ones / "adapt"), metrics(runs / "adapt")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    st = 0
    for x, y in zip(la, lb, strict=True):
        if "loss" in x:
            for k in ("loss", "ce", "dice", "selftrain_loss"):  # relative 1e-4: a pseudo-label pixel at the
                # threshold may flip with float noise (3e-5 of the loss on one split); per-rank means: ~3e-3
                v = x.get(k, 0)
                assert (k in x) == (k in y) and abs(v - y.get(k, 0)) < 1e-4 * max(1.0, abs(v)), (k, x, y)
            # pseudo-label quality and the pasted share, global means (logged to 4 digits)
            for k in ("pseudo_quality", "pasted"):
                assert (k in x) == (k in y) and abs(x.get(k, 0) - y.get(k, 0)) < 2e-4, (k, x, y)
            st += "selftrain_loss" in x
        else:  # validated with the BatchNorm-recalibrated model
            assert abs(x["val"]["selected_miou"] - y["val"]["selected_miou"]) < 0.005, (x, y)
    assert st == 3  # steps 2, 3, 4 self-trained
    assert all(0 < r["pseudo_quality"] <= 1 and 0 < r["pasted"] < 1 for r in lb if "pasted" in r)  # it did adapt
    # resume under 2 processes: bit for bit the uninterrupted 2-process run (student, teacher, generator, logs)
    part = done["adapt_part"]  # TWO, extra and train.stop_at=2
    assert part.returncode == 0, failure(part)
    shutil.copytree(runs / "adapt_part", tmp_path / "part")  # resumed here: the fixture's runs stay as they were
    rest = cli(tiny_dataset, tmp_path / "part", *TWO, *extra, "--resume")
    assert rest.returncode == 0, failure(rest)
    c = checkpoint(tmp_path / "part")
    assert all(torch.equal(b["model"][k], c["model"][k]) for k in b["model"])
    assert all(torch.equal(b["adapt"]["teacher"][k], c["adapt"]["teacher"][k]) for k in b["adapt"]["teacher"])
    assert torch.equal(b["adapt"]["rng"], c["adapt"]["rng"])

    def logged(out: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in metrics(out)]

    assert logged(runs / "adapt") == logged(tmp_path / "part")


@pytest.mark.slow
def test_masked_image_consistency_with_the_instance_head_trains_the_same_on_two_processes(
        single_runs: Runs, ddp_runs: Runs) -> None:
    """Self-training with the instance head (class pseudo-labels only) and MIC (adapt.mic_ratio): the class-only
    forward goes through DDP around both heads, MIC's masked view and mask are rows of the global batch's draws."""
    (ones, _), (runs, _) = single_runs, ddp_runs
    # ADAPT and MIC_INSTANCES; with TWO
    a, b = assert_adapts_like_one_process(single_runs, ddp_runs, "adapt_mic", "MIC with the instance head")
    assert torch.equal(a["adapt"]["mic_rng"], b["adapt"]["mic_rng"])  # MIC's draws made for the global batch
    mic = 0
    for x, y in zip(metrics(ones / "adapt_mic"), metrics(runs / "adapt_mic"), strict=True):
        for k in ("loss", "selftrain_loss", "mic_loss"):  # relative 1e-3: measured up to 3.7e-4 on the MIC loss
            # (its masked batches through the synchronized BatchNorm; 6e-5 without the instance head)
            v = x.get(k, 0)
            assert (k in x) == (k in y) and abs(v - y.get(k, 0)) < 1e-3 * max(1.0, abs(v)), (k, x, y)
        mic += "mic_loss" in x
    assert mic == 3  # steps 2, 3, 4 self-trained, each with MIC


def test_in_process_callers_train_one_process_and_say_so(tiny_dataset: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    from finetune.train import run_finetune
    from segfactory.config import load_config

    cfg = load_config(FinetuneConfig, TINY, [*ARGS, "train.steps=1", *TWO],
                      paths={"data.synthetic": [str(tiny_dataset)]})
    summary = run_finetune(cfg, tmp_path / "run", show_progress=False)
    assert summary["finished"]
    assert "train.devices=2 but this process was not started by torchrun" in capsys.readouterr().err.replace("\n", " ")
    assert checkpoint(tmp_path / "run")["world_size"] == 1


TEARDOWN_PROBE = """
import gc, os, sys, weakref
import torch, torch.distributed as dist
from segfactory import distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
gc.disable()  # what decides the race: whether the cyclic collector has run before the interpreter shuts down
dist.init_process_group("gloo", rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 3))
ddp(torch.randn(2, 3)).sum().backward()
alive = weakref.ref(ddp)
del ddp  # what Trainer.release_distributed and pretraining do before teardown
distributed.teardown()
print("freed" if alive() is None else "alive")
"""


def test_teardown_frees_the_process_group_before_interpreter_shutdown() -> None:
    """A DDP wrapper sits in a reference cycle and holds the gloo group: left to interpreter shutdown, the
    group's destruction sometimes aborted a finished rank (SIGABRT, "terminate called without an active
    exception"; 1 in ~20 two-rank resumed fine-tunes here). teardown frees the dropped wrapper, and the group with
    it, while the interpreter is alive."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-c", TEARDOWN_PROBE, str(port)], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "freed"
