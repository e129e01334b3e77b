"""The base of every SSL method: an ``nn.Module`` holding the pooled encoder(s) and heads, with

* ``view_specs(crop_size, local_crop_size, min_scale)``: its augmentation recipe (:class:`ViewSpec` list);
* ``forward(views, step)``: the loss of one micro-batch (views as produced by :class:`ViewMaker`);
* ``on_before_optimizer_step(step)`` / ``on_step_start(step)``: gradient surgery and momentum updates;
* ``export_encoder``: the encoder whose ``body`` is exported (the teacher for DINO, the online net otherwise);
* ``per_rank_batchnorm()``: submodules whose BatchNorm stays per-rank in data-parallel training (MoCo's key branch).

:func:`shuffled_key_forward` is MoCo's shuffled BN (MoCo and DenseCL), on one process and across ranks.

A method is typed by its config class: ``class SimCLR(SSLMethod[SimCLRConfig])`` sees ``self.cfg`` as a
``SimCLRConfig``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar, Generic, Protocol, TypeVar, cast

import torch
from lightly.models.utils import (
    batch_unshuffle_distributed,
    concat_all_gather,
    deactivate_requires_grad,
    update_momentum,
)
from lightly.utils import dist
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from segfactory.config import StrictModel
from segfactory.seeds import moco_shuffle_seed

C = TypeVar("C", bound=StrictModel)
ModuleT = TypeVar("ModuleT", bound=nn.Module)


class _MomentumOptions(Protocol):
    momentum: float


class SSLMethod(nn.Module, Generic[C]):
    """Base class.

    Args:
        encoder: The online/student encoder.
        cfg: The method's options (its section of the ``method`` config).
        total_steps: Planned optimizer steps (for momentum/temperature schedules).
    """

    name: ClassVar[str] = "base"  # set by @register_method
    config_class: ClassVar[type[StrictModel]] = StrictModel  # set by @register_method
    # (online, momentum copy) attribute names; methods with any have a `momentum` option (start of the schedule)
    momentum_pairs: ClassVar[list[tuple[str, str]]] = []
    # Why the method cannot yet train data-parallel (train.devices > 1), or None when it can: its losses gather
    # across ranks (lightly's gather_distributed), its memory banks are fed by every rank's keys and its BatchNorms
    # are synchronized by the training loop (but in per_rank_batchnorm()). Every built-in method can (None); a new
    # method that cannot sets the reason, and `segfactory pretrain` refuses train.devices > 1 with it.
    distributed_unsupported: ClassVar[str | None] = None

    def __init__(self, encoder: PooledEncoder, cfg: C, total_steps: int):
        super().__init__()
        self.encoder = encoder
        self.cfg = cfg
        self.total_steps = total_steps

    @property
    def export_encoder(self) -> PooledEncoder:
        return self.encoder

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.08, 1.0)
        return [ViewSpec(crop, scale=s), ViewSpec(crop, scale=s)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        raise NotImplementedError

    def on_step_start(self, step: int) -> None:
        """Momentum update of the EMA copies (before the forward pass, as in lightly's examples)."""
        if not self.momentum_pairs:
            return
        m = cosine_schedule(step, self.total_steps, cast(_MomentumOptions, self.cfg).momentum, 1.0)
        for online, ema in self.momentum_pairs:
            update_momentum(getattr(self, online), getattr(self, ema), m=m)

    def on_before_optimizer_step(self, step: int) -> None:
        """Hook after backward, before the optimizer step."""

    def per_rank_batchnorm(self) -> list[str]:
        """Names of the child modules whose BatchNorm layers stay per-rank in data-parallel training.

        The training loop synchronizes every other BatchNorm over the global batch; MoCo's key branch keeps its own
        per-rank statistics, which is what its shuffled BN across ranks is made of (:func:`shuffled_key_forward`).
        """
        return []

    def _embed_pairs(self, net: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run views of equal size through ``net`` as one batch (one BN batch, one launch), split back."""
        b = views[0].shape[0]
        return list(net(torch.cat(views)).float().split(b))


def momentum_copy(module: ModuleT) -> ModuleT:
    """A frozen copy of ``module`` for a momentum (EMA) twin."""
    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


def asymmetric_views(crop: int, min_scale: float | None) -> list[ViewSpec]:
    """BYOL's two views (Grill et al. 2020): always blurred vs rarely blurred and sometimes solarized."""
    s = (min_scale or 0.08, 1.0)
    return [ViewSpec(crop, scale=s, blur_p=1.0), ViewSpec(crop, scale=s, blur_p=0.1, solarize_p=0.2)]


def shuffled_key_forward(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, step: int,
                         groups: int) -> torch.Tensor:
    """MoCo's shuffled BN: the key network's outputs for ``x``, each normalized with the statistics of a random group.

    With BatchNorm over the whole batch, the key of sample i would be normalized with the same statistics as its
    query, a shortcut the contrastive loss can exploit. MoCo shuffles the keys across GPUs, each GPU normalizing
    its share with its own statistics. Here the global batch is permuted (the permutation is seeded by ``step``
    alone: the same on every rank and on resume) and cut into ``groups`` BatchNorm groups:

    * one process: the permuted batch goes through ``net`` in ``min(groups, B // 2)`` chunks (a permutation alone
      would change nothing);
    * W processes (``torch.distributed``, lightly's ``concat_all_gather`` / ``batch_unshuffle_distributed``): the
      key views of all ranks are gathered (the global batch, in rank order), rank r takes the r-th W-th of the
      permuted global batch and runs it in ``ceil(groups / W)`` chunks with its own per-rank BatchNorm statistics
      (``per_rank_batchnorm``); the outputs are gathered and each rank keeps those of its own samples. That is
      ``W * ceil(groups / W)`` groups in all: ``groups`` itself when W divides it (the single-process groups,
      so 1 and W processes compute the same keys), else at least one per rank, as MoCo's per-GPU shuffle.
      ``groups=1`` (off): the caller's BatchNorm is synchronized over the global batch; no shuffle.

    Args:
        net: The key network (momentum encoder and whatever follows it in the group), called without gradients.
        x: (b, ...) this rank's key views (b = the global batch B / W).
        step: Optimizer step (seeds the permutation).
        groups: ``shuffle_bn_groups``.

    Returns:
        (b, ...) ``net``'s outputs in the order of ``x``.
    """
    gen = torch.Generator().manual_seed(moco_shuffle_seed(step))
    world = dist.world_size()
    if world == 1:
        perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
        n = min(groups, x.shape[0] // 2) or 1
        return torch.cat([net(g) for g in x[perm].chunk(n)])[torch.argsort(perm)]
    if groups == 1:
        return net(x)
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x_all = concat_all_gather(x.contiguous())  # (W * b, ...): gloo gathers contiguous tensors only
    perm = torch.randperm(x_all.shape[0], generator=gen).to(x.device)
    mine = x_all[perm.view(world, -1)[dist.rank()]]
    if channels_last:
        mine = mine.contiguous(memory_format=torch.channels_last)
    n = min(-(-groups // world), mine.shape[0] // 2) or 1
    out = torch.cat([net(g) for g in mine.chunk(n)])
    unshuffled: torch.Tensor = batch_unshuffle_distributed(out.contiguous(), torch.argsort(perm))
    return unshuffled
