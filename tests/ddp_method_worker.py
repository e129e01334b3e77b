"""A few training steps of BYOL / DINO / VICReg / Barlow Twins on one rank's slice of a fixed global batch: what
``tests/test_pretrain_ddp.py`` runs as 2 gloo ranks under torchrun and, for reference, as one process.

``python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.ddp_method_worker OUT`` writes
``OUT/<method>_rank<r>.pt`` per rank: the loss each step (this rank's, and the mean over ranks) and the floating
point state after the last step (weights, BatchNorm statistics, the momentum twins, DINO's center). The model is
built, its BatchNorms synchronized and wrapped in DDP as ``pretrain.train.run_pretrain`` does, and stepped as its
loop steps it (``on_step_start``, forward, backward, ``on_before_optimizer_step``, SGD); the views are random
tensors, the same global batch on every rank, sliced by rank as the loader and the view maker slice theirs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

# method -> its options (tiny heads; DINO: 2 global views of 32 px and 2 local ones of 16 px, warm-up of the
# teacher temperature and a frozen last layer for the first step, so every schedule is exercised)
CASES: dict[str, dict[str, Any]] = {
    "byol": {"hidden_dim": 32, "out_dim": 16},
    "dino": {"hidden_dim": 32, "bottleneck_dim": 16, "out_dim": 64, "n_local_crops": 2,
             "warmup_teacher_temp": 0.02, "warmup_teacher_temp_steps": 2, "freeze_last_layer_steps": 1},
    "vicreg": {"hidden_dim": 32, "out_dim": 32},
    "barlowtwins": {"hidden_dim": 32, "out_dim": 32},
}
# controls, the bugs the test must catch: lightly's Barlow Twins loss with gather_distributed=True (each rank
# normalizes its projections with its own batch statistics), a DINO center updated from each rank's own batch, and
# VICReg's variance and covariance terms on each rank's own projections (gather_distributed=False)
CONTROLS: dict[str, str] = {"barlowtwins_per_rank": "barlowtwins", "dino_per_rank_center": "dino",
                            "vicreg_per_rank": "vicreg"}
BATCH, STEPS = 8, 3  # the global batch; every step draws new views
# SGD (weight differences stay proportional to gradient ones), small enough that the steps stay stable: a step that
# overshoots (Barlow Twins' loss 35 -> 64 at lr 0.05) amplifies float32 reduction-order differences 50-fold
LR = {"byol": 0.05, "dino": 0.01, "vicreg": 0.005, "barlowtwins": 0.001}
CROP, LOCAL_CROP = 64, 32


def run_case(case: str, rank: int = 0, world_size: int = 1, steps: int = STEPS) -> dict[str, Any]:
    """``steps`` SGD steps of method ``case`` (or control) on this rank's slice of the global batch (0: the
    initial state).

    Returns:
        ``loss`` (steps,) this rank's losses, ``global_loss`` (steps,) their mean over ranks, ``state`` (name ->
        tensor: the floating point state after the last step, buffers included).
    """
    from pretrain.config import PretrainConfig
    from pretrain.encoder import build_encoder
    from pretrain.methods import build_method
    from pretrain.train import sync_batchnorm
    from segfactory.distributed import DistInfo, all_mean

    name = CONTROLS.get(case, case)
    cfg = PretrainConfig.model_validate({"method": {"name": name, name: CASES[name]}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_method(name, build_encoder("test_resnet", 3), cfg.method, 10)
    if case == "barlowtwins_per_rank":
        from lightly.loss import BarlowTwinsLoss

        model.criterion = BarlowTwinsLoss(lambda_param=cfg.method.barlowtwins.lambda_param, gather_distributed=True)
    elif case == "dino_per_rank_center":
        model.criterion._center_fn = lambda x, dim: x.mean(dim=dim, keepdim=True)
    elif case == "vicreg_per_rank":
        from lightly.loss import VICRegLoss

        model.criterion = VICRegLoss(gather_distributed=False)
    sizes = [s.size for s in model.view_specs(CROP, LOCAL_CROP, None)]
    info = DistInfo(rank, world_size, rank, "gloo" if world_size > 1 else "none")
    forward: torch.nn.Module = model
    if info.distributed:
        sync_batchnorm(model, torch.device("cpu"))
        with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers (what pretrain.train passes)
            warnings.simplefilter("ignore", FutureWarning)
            forward = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR[name])
    gen = torch.Generator().manual_seed(1)
    b = BATCH // world_size
    losses: list[float] = []
    global_losses: list[float] = []
    for step in range(steps):
        views = [_images(s, gen) for s in sizes]
        model.on_step_start(step)
        loss = forward([v[rank * b:(rank + 1) * b] for v in views], step)
        loss.backward()
        model.on_before_optimizer_step(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        global_losses.append(float(all_mean(loss, info)))
    del forward  # DDP's wrapper holds the process group (segfactory.distributed.teardown)
    return {"loss": torch.tensor(losses), "global_loss": torch.tensor(global_losses),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}}


def _images(size: int, gen: torch.Generator) -> torch.Tensor:
    """(BATCH, 3, size, size) noise images of distinct contrast and colour: uniform noise alone gives nearly the
    same features to every image, whose batch-normalized projections (Barlow Twins) then amplify float rounding."""
    scale = torch.rand(BATCH, 3, 1, 1, generator=gen) * 2
    shift = torch.randn(BATCH, 3, 1, 1, generator=gen)
    return torch.rand(BATCH, 3, size, size, generator=gen) * scale + shift


def main(out: str) -> None:
    from segfactory.distributed import setup, teardown, torchrun_env

    torch.set_num_threads(1)
    info = torchrun_env()
    assert info is not None, "run under torchrun"
    setup(info, "gloo", torch.device("cpu"), 120)
    try:
        for case in [*CASES, *CONTROLS]:
            torch.save(run_case(case, info.rank, info.world_size), Path(out) / f"{case}_rank{info.rank}.pt")
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])
