"""VICReg (Bardes et al. 2022): invariance + variance + covariance regularization of two views' projections."""

from __future__ import annotations

import torch
from lightly.loss import VICRegLoss
from lightly.models.modules import heads
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod
from segfactory.config import StrictModel


class VICRegConfig(StrictModel):
    """``method.vicreg``."""

    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(2048, ge=1)


@register_method("vicreg", VICRegConfig)
class VICReg(SSLMethod[VICRegConfig]):
    """VICReg: invariance + variance + covariance regularization of two views' projections."""

    def __init__(self, encoder: PooledEncoder, cfg: VICRegConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.VICRegProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim, num_layers=2)
        self.criterion = VICRegLoss(gather_distributed=True)  # no-op on one process

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.08, 1.0)
        return [ViewSpec(crop, scale=s, blur_p=0.5), ViewSpec(crop, scale=s, blur_p=0.5, solarize_p=0.1)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)
