"""SimCLR (Chen et al. 2020): NT-Xent between two views' projections; the rest of the batch are the negatives.

The file to copy for a new method: its config (the ``method.<name>`` section) and its module, registered together.
"""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import heads
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod
from segfactory.config import StrictModel


class SimCLRConfig(StrictModel):
    """``method.simclr``."""

    temperature: float = Field(0.5, gt=0)
    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)


@register_method("simclr", SimCLRConfig)
class SimCLR(SSLMethod[SimCLRConfig]):
    """SimCLR: NT-Xent between two views' projections (negatives: the rest of the batch)."""

    def __init__(self, encoder: PooledEncoder, cfg: SimCLRConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.SimCLRProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature, gather_distributed=True)  # no-op on one process

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        # SimCLR's strong colour distortion (Chen et al. 2020; lightly's SimCLRTransform defaults)
        v = ViewSpec(crop, scale=(min_scale or 0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
        return [v, v]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)
