"""The base of every SSL method: an ``nn.Module`` holding the pooled encoder(s) and heads, with

* ``view_specs(crop_size, local_crop_size, min_scale)``: its augmentation recipe (:class:`ViewSpec` list);
* ``forward(views, step)``: the loss of one micro-batch (views as produced by :class:`ViewMaker`);
* ``on_before_optimizer_step(step)`` / ``on_step_start(step)``: gradient surgery and momentum updates;
* ``export_encoder``: the encoder whose ``body`` is exported (the teacher for DINO, the online net otherwise).

A method is typed by its config class: ``class SimCLR(SSLMethod[SimCLRConfig])`` sees ``self.cfg`` as a
``SimCLRConfig``.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Generic, Protocol, TypeVar, cast

import torch
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from segfactory.config import StrictModel

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
    # across ranks (lightly's gather_distributed) and its BatchNorms are synchronized by the training loop.
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
