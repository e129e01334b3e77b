"""MoCo v2 (Chen et al. 2020): a query encoder against a momentum key encoder, negatives from a memory bank."""

from __future__ import annotations

from typing import ClassVar

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import heads
from pydantic import Field

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, momentum_copy, shuffled_key_forward
from segfactory.config import StrictModel


class MoCoConfig(StrictModel):
    """``method.moco``: momentum key encoder + memory bank of negatives."""

    temperature: float = Field(0.2, gt=0)
    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)
    memory_bank_size: int = Field(4096, ge=0, description="negatives kept from past batches (0: in-batch only)")
    momentum: float = Field(0.99, ge=0, lt=1, description="start of the cosine momentum schedule (ends at 1)")
    shuffle_bn_groups: int = Field(2, ge=1, description="shuffled BN: the key encoder sees the shuffled global "
                                   "batch in this many groups, each with its own BatchNorm statistics (what "
                                   "MoCo's per-GPU shuffle does; 1 = off). On N processes each process's share is "
                                   "ceil(groups / N) of them (N groups at least, one per process)")


@register_method("moco", MoCoConfig)
class MoCo(SSLMethod[MoCoConfig]):
    """MoCo v2: query encoder vs momentum key encoder, negatives from a memory bank."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "key_encoder"), ("head", "key_head")]

    def __init__(self, encoder: PooledEncoder, cfg: MoCoConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.MoCoProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.key_encoder = momentum_copy(encoder)
        self.key_head = momentum_copy(self.head)
        bank = (cfg.memory_bank_size, cfg.out_dim) if cfg.memory_bank_size else 0
        # on several processes the queue is fed by every rank's keys (gathered in rank order: the global batch's
        # order), so every rank holds the same queue; without a queue the in-batch negatives are the global batch's
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=bank, gather_distributed=True)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.2, 1.0)  # MoCo v2 crops
        return [ViewSpec(crop, scale=s), ViewSpec(crop, scale=s)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        q = self.head(self.encoder(views[0])).float()
        with torch.no_grad():
            k = shuffled_key_forward(lambda x: self.key_head(self.key_encoder(x)), views[1], step,
                                     self.cfg.shuffle_bn_groups).float()
        return self.criterion(q, k)

    def per_rank_batchnorm(self) -> list[str]:
        """The key branch: its per-rank statistics on each rank's share of the shuffled batch are the shuffled BN."""
        return ["key_encoder", "key_head"] if self.cfg.shuffle_bn_groups > 1 else []
