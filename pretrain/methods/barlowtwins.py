"""Barlow Twins (Zbontar et al. 2021): the cross-correlation of two views' projections driven to the identity."""

from __future__ import annotations

import torch
from lightly.loss import BarlowTwinsLoss
from lightly.models.modules import heads
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, asymmetric_views
from segfactory.config import StrictModel


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
        self.criterion = BarlowTwinsLoss(lambda_param=cfg.lambda_param, gather_distributed=True)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        return asymmetric_views(crop, min_scale)  # BYOL's views, as in the paper

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)
