"""A few training steps of MoCo / DenseCL on one rank's slice of a fixed global batch: what
``tests/test_pretrain_ddp.py`` runs as 2 gloo ranks under torchrun and, for reference, as one process.

``python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.ddp_queue_worker OUT`` writes
``OUT/<case>_rank<r>.pt`` per rank: the loss each step (this rank's, and the mean over ranks), the memory banks and
the weights after the last step. The model is built, its BatchNorms synchronized (but the shuffled-BN key branch)
and wrapped in DDP as ``pretrain.train.run_pretrain`` does; the views are random tensors, the same global batch on
every rank, sliced by rank as the loader and the view maker slice theirs.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch

# case -> the method's options (tiny heads, queues of 16 that wrap around within STEPS steps of BATCH keys)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "moco": ("moco", {"hidden_dim": 32, "out_dim": 16, "memory_bank_size": 16}),
    "moco_inbatch": ("moco", {"hidden_dim": 32, "out_dim": 16, "memory_bank_size": 0}),
    "moco_nogroups": ("moco", {"hidden_dim": 32, "out_dim": 16, "memory_bank_size": 16, "shuffle_bn_groups": 1}),
    "densecl": ("densecl", {"hidden_dim": 32, "out_dim": 16, "memory_bank_size": 16}),
    # 3 groups on 2 ranks: ceil(3 / 2) = 2 per rank, 4 in all; the single-process reference uses 4 (REFERENCE)
    "moco_3groups": ("moco", {"hidden_dim": 32, "out_dim": 16, "memory_bank_size": 16, "shuffle_bn_groups": 3}),
}
# the options a single process needs to train what 2 ranks train with the case's options
REFERENCE: dict[str, dict[str, Any]] = {"moco_3groups": {"shuffle_bn_groups": 4}}
BATCH, STEPS = 8, 3  # the global batch; every step draws new views
LR = 0.05  # SGD: weight differences stay proportional to gradient ones
# crop sizes; densecl: a 2x2 grid on the stride-32 test_resnet; moco_3groups: BatchNorm groups of 2 images, whose
# statistics at 1x1 feature maps (32 px) would amplify float rounding (two values normalized to +-1)
SIZE = {"moco": 32, "moco_inbatch": 32, "moco_nogroups": 32, "densecl": 64, "moco_3groups": 64}


def run_case(case: str, rank: int = 0, world_size: int = 1, steps: int = STEPS) -> dict[str, Any]:
    """``steps`` SGD steps of ``case`` on this rank's slice of the global batch (0: the initial weights).

    Returns:
        ``loss`` (steps,) this rank's losses, ``global_loss`` (steps,) their mean over ranks, ``banks`` (name ->
        (K, D) queue and its pointer), ``weights`` (name -> tensor, floating point state after the last step).
    """
    from pretrain.config import PretrainConfig
    from pretrain.encoder import build_encoder
    from pretrain.methods import build_method
    from pretrain.train import sync_batchnorm
    from segfactory.distributed import DistInfo, all_mean

    name, options = CASES[case]
    if world_size == 1:
        options = {**options, **REFERENCE.get(case, {})}
    cfg = PretrainConfig.model_validate({"method": {"name": name, name: options}})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_method(name, build_encoder("test_resnet", 3), cfg.method, 10)
    info = DistInfo(rank, world_size, rank, "gloo" if world_size > 1 else "none")
    forward: torch.nn.Module = model
    if info.distributed:
        sync_batchnorm(model, torch.device("cpu"))
        with warnings.catch_warnings():  # torch 2.14 deprecates broadcast_buffers (what pretrain.train passes)
            warnings.simplefilter("ignore", FutureWarning)
            forward = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    gen = torch.Generator().manual_seed(1)
    b = BATCH // world_size
    losses: list[float] = []
    global_losses: list[float] = []
    for step in range(steps):
        s = SIZE[case]
        views = [torch.rand(BATCH, 3, s, s, generator=gen) for _ in range(2)]
        model.on_step_start(step)
        loss = forward([v[rank * b:(rank + 1) * b] for v in views], step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        global_losses.append(float(all_mean(loss, info)))
    banks = {k.removesuffix(".bank"): (v.clone(), int(dict(model.named_buffers())[k + "_ptr"]))
             for k, v in model.named_buffers() if k.endswith(".bank") and v.numel()}
    return {"loss": torch.tensor(losses), "global_loss": torch.tensor(global_losses), "banks": banks,
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}}


def main(out: str) -> None:
    from segfactory.distributed import setup, teardown, torchrun_env

    torch.set_num_threads(1)
    info = torchrun_env()
    assert info is not None, "run under torchrun"
    setup(info, "gloo", torch.device("cpu"), 120)
    try:
        for case in CASES:
            torch.save(run_case(case, info.rank, info.world_size), Path(out) / f"{case}_rank{info.rank}.pt")
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1])
