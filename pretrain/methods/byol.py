"""BYOL (Grill et al. 2020): an online predictor regresses a momentum target's projection (symmetrized)."""

from __future__ import annotations

from typing import ClassVar

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import heads
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, asymmetric_views, momentum_copy
from segfactory.config import StrictModel


class BYOLConfig(StrictModel):
    """``method.byol``."""

    hidden_dim: int = Field(4096, ge=1)
    out_dim: int = Field(256, ge=1)
    momentum: float = Field(0.99, ge=0, lt=1)


@register_method("byol", BYOLConfig)
class BYOL(SSLMethod[BYOLConfig]):
    """BYOL: online predictor regresses the momentum target's projection (symmetrized)."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "target_encoder"),
                                                       ("projection", "target_projection")]

    def __init__(self, encoder: PooledEncoder, cfg: BYOLConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.projection = heads.BYOLProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.prediction = heads.BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_encoder = momentum_copy(encoder)
        self.target_projection = momentum_copy(self.projection)
        self.criterion = NegativeCosineSimilarity()

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        return asymmetric_views(crop, min_scale)

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        p0, p1 = self._embed_pairs(nn.Sequential(self.encoder, self.projection, self.prediction), views)
        with torch.no_grad():
            z0, z1 = self._embed_pairs(nn.Sequential(self.target_encoder, self.target_projection), views)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
