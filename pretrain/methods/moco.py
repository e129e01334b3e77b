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
from pretrain.methods.base import SSLMethod, momentum_copy
from segfactory.config import StrictModel
from segfactory.seeds import moco_shuffle_seed


class MoCoConfig(StrictModel):
    """``method.moco``: momentum key encoder + memory bank of negatives."""

    temperature: float = Field(0.2, gt=0)
    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)
    memory_bank_size: int = Field(4096, ge=0, description="negatives kept from past batches (0: in-batch only)")
    momentum: float = Field(0.99, ge=0, lt=1, description="start of the cosine momentum schedule (ends at 1)")
    shuffle_bn_groups: int = Field(2, ge=1, description="shuffled BN on one device: the key encoder sees the "
                                   "shuffled batch in this many groups, each with its own BatchNorm statistics "
                                   "(what MoCo's per-GPU shuffle does; 1 = off)")


@register_method("moco", MoCoConfig)
class MoCo(SSLMethod[MoCoConfig]):
    """MoCo v2: query encoder vs momentum key encoder, negatives from a memory bank."""

    distributed_unsupported: ClassVar[str | None] = (
        "shuffled BN across ranks (batch_shuffle_distributed) and a memory bank fed by all ranks' keys are "
        "not implemented yet: per-rank shuffled BN and per-rank queues would train a different method")
    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "key_encoder"), ("head", "key_head")]

    def __init__(self, encoder: PooledEncoder, cfg: MoCoConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.MoCoProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.key_encoder = momentum_copy(encoder)
        self.key_head = momentum_copy(self.head)
        bank = (cfg.memory_bank_size, cfg.out_dim) if cfg.memory_bank_size else 0
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=bank)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.2, 1.0)  # MoCo v2 crops
        return [ViewSpec(crop, scale=s), ViewSpec(crop, scale=s)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        q = self.head(self.encoder(views[0])).float()
        with torch.no_grad():
            # Shuffled BN: with BatchNorm over the whole batch, the key of sample i would be normalized with the
            # same statistics as its query, a shortcut the contrastive loss can exploit. MoCo shuffles keys across
            # GPUs; on one device the shuffled batch goes through the key encoder in groups, so each key is
            # normalized with the statistics of a random subset (a permutation alone would change nothing).
            x1 = views[1]
            perm = torch.randperm(x1.shape[0], generator=self._shuffle_gen(step)).to(x1.device)
            groups = min(self.cfg.shuffle_bn_groups, x1.shape[0] // 2) or 1
            k = torch.cat([self.key_head(self.key_encoder(g)) for g in x1[perm].chunk(groups)]).float()
            k = k[torch.argsort(perm)]
        return self.criterion(q, k)

    @staticmethod
    def _shuffle_gen(step: int) -> torch.Generator:
        return torch.Generator().manual_seed(moco_shuffle_seed(step))
