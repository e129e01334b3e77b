"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections driven to the identity.

On several processes the loss is the single-process loss of the global batch: :class:`GlobalBarlowTwinsLoss`
gathers both views' projections (with gradients) before normalizing them, as the paper's code does (its batch
normalization is synchronized across GPUs and the cross-correlation divided by the global batch size).
lightly's ``BarlowTwinsLoss(gather_distributed=True)`` instead normalizes each rank's projections with that rank's
own batch statistics and averages the ranks' cross-correlations: another loss, far from the single-process one at
small per-rank batches (tests/test_pretrain_ddp.py: with 4 images per rank, losses ~20 % apart and weights 0.37
apart after 3 steps, against 1.4e-5 for this loss).
"""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import heads
from lightly.utils import dist
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, asymmetric_views
from segfactory.config import StrictModel


class GlobalBarlowTwinsLoss(nn.Module):
    """lightly's Barlow Twins loss of the global batch, on one process or several (``torch.distributed``).

    Every rank gathers all ranks' projections (lightly's autograd-aware ``gather``, in rank order) and computes the
    loss of the whole batch, the same value on every rank. The gather's backward sums each rank's gradient over
    ranks (``world_size`` times the gradient of the global loss) and DDP divides by ``world_size``: the gradient
    is that of the single-process loss of the global batch.
    """

    def __init__(self, lambda_param: float):
        super().__init__()
        self.loss = BarlowTwinsLoss(lambda_param=lambda_param, gather_distributed=False)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if dist.world_size() > 1:
            z_a = torch.cat(dist.gather(z_a.contiguous()))
            z_b = torch.cat(dist.gather(z_b.contiguous()))
        out: torch.Tensor = self.loss(z_a, z_b)
        return out


class BarlowTwinsConfig(StrictModel):
    """``method.barlowtwins``."""

    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(2048, ge=1)
    lambda_param: float = Field(5e-3, gt=0)


@register_method("barlowtwins", BarlowTwinsConfig)
class BarlowTwins(SSLMethod[BarlowTwinsConfig]):
    """Barlow Twins: cross-correlation of two views' projections driven to the identity."""

    def __init__(self, encoder: PooledEncoder, cfg: BarlowTwinsConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.BarlowTwinsProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = GlobalBarlowTwinsLoss(cfg.lambda_param)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        return asymmetric_views(crop, min_scale)  # BYOL's views, as in the paper

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)
