"""DenseCL (Wang et al. 2021, "Dense Contrastive Learning for Self-Supervised Visual Pre-Training"): MoCo v2 plus a
dense contrastive loss between the two views' feature grids, for dense prediction (segmentation, detection).

Built from lightly's pieces as lightly's DenseCL example does:
:class:`~lightly.models.modules.heads.DenseCLProjectionHead` for the global and the dense head (the dense one applied
per grid cell, i.e. a 1x1 conv),
:func:`~lightly.models.utils.select_most_similar` for the correspondence, :class:`~lightly.loss.NTXentLoss` with a
memory bank for the global loss. Unlike lightly's example (whose dense memory bank stores every matched grid cell)
the dense negatives follow the paper and the authors' code: a second queue of one vector per key image, its dense
projections averaged over the grid (a :class:`~lightly.models.modules.memory_bank.MemoryBankModule`).

Per micro-batch, with query view x_q (online encoder) and key view x_k (momentum encoder):

* F_q, F_k (B, C, S) last-stage backbone features on the S = h*w grid (h*w = 7*7 at 224 px on a stride-32 net);
* global: z_q = g(mean F_q), z_k = g_m(mean F_k); loss L_q = InfoNCE(z_q, z_k; negatives: global queue);
* correspondence: cell i of the query is matched to the key cell j = argmax_j cos(F_q[:, i], F_k[:, j]) (backbone
  features, as in the paper);
* dense: r_q = d(F_q) (B, S, D), r_k = d_m(F_k); loss L_r = InfoNCE(r_q[i], r_k[j(i)]; negatives: dense queue);
* loss = (1 - lambda) L_q + lambda L_r; then z_k joins the global queue and mean_S r_k the dense queue.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss
from lightly.models.modules.heads import DenseCLProjectionHead
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.models.utils import select_most_similar
from pydantic import Field

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, momentum_copy, shuffled_key_forward
from segfactory.config import StrictModel
from segfactory.console import console
from segfactory.errors import UserError


class DenseCLConfig(StrictModel):
    """``method.densecl``: MoCo v2 + a dense contrastive loss on the last feature grid (Wang et al. 2021)."""

    loss_lambda: float = Field(0.5, ge=0, le=1, description="weight of the dense loss: loss = (1 - lambda) * "
                               "global + lambda * dense (the paper's 0.5; 0 is MoCo v2, 1 dense only)")
    dense_start_step: int = Field(0, ge=0, description="global loss only (lambda = 0) before this step, while the "
                                  "features that decide the correspondence are still random (the authors' code "
                                  "uses 1000 iterations)")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature of both losses")
    hidden_dim: int = Field(2048, ge=1, description="hidden width of both projection heads")
    out_dim: int = Field(128, ge=1, description="projection size of both heads")
    memory_bank_size: int = Field(4096, ge=1, description="length of each queue of negatives: one global and one "
                                  "dense key per past image (the paper: 65536)")
    grid_size: int | None = Field(None, ge=1, description="average-pool the last feature map to this many cells "
                                  "per side; null keeps the backbone's own grid (7x7 at 224 px crops on a "
                                  "stride-32 backbone, the paper's setting)")
    momentum: float = Field(0.99, ge=0, lt=1, description="start of the cosine momentum schedule (ends at 1; the "
                            "paper: 0.999 fixed)")
    shuffle_bn_groups: int = Field(2, ge=1, description="shuffled BN, as method.moco: the key encoder sees the "
                                   "shuffled global batch in this many groups (1 = off; on N processes "
                                   "ceil(groups / N) per process)")


@register_method("densecl", DenseCLConfig)
class DenseCL(SSLMethod[DenseCLConfig]):
    """DenseCL: MoCo v2 (global head, momentum key encoder, queue) plus a dense head on the feature grid whose
    positives are found by backbone-feature correspondence and whose negatives come from a second queue."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [
        ("encoder", "key_encoder"), ("head", "key_head"), ("dense_head", "key_dense_head")]

    def __init__(self, encoder: PooledEncoder, cfg: DenseCLConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = DenseCLProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.dense_head = DenseCLProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.key_encoder = momentum_copy(encoder)
        self.key_head = momentum_copy(self.head)
        self.key_dense_head = momentum_copy(self.dense_head)
        # both queues start as random unit vectors (lightly's init), drawn from the seeded init RNG
        # on several processes both queues are fed by every rank's keys (gathered in rank order), the same on every rank
        self.criterion = NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.memory_bank_size, cfg.out_dim),
                                    gather_distributed=True)
        self.dense_bank = MemoryBankModule(size=(cfg.memory_bank_size, cfg.out_dim), gather_distributed=True,
                                           feature_dim_first=False)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        side = -(-crop // self.encoder.feature_strides[-1])  # the last feature map's side at this crop
        g = self.cfg.grid_size
        if g is not None and g > side:
            raise UserError(f"method.densecl.grid_size={g} is larger than the {side}x{side} feature grid of "
                            f"{self.encoder.spec.timm_name} at augment.crop_size={crop}",
                            fix=f"set method.densecl.grid_size to {side} or less (or null), or raise augment.crop_size")
        if (g or side) == 1:
            console.print(f"note: densecl at augment.crop_size={crop} has a 1x1 feature grid: the dense loss is a "
                          "second global loss; raise augment.crop_size for a real grid")
        # MoCo v2's views (the paper's): crops of 20-100 %, jitter (0.4, 0.4, 0.4, 0.1) p=0.8, gray 0.2, blur 0.5
        v = ViewSpec(crop, scale=(min_scale or 0.2, 1.0), saturation=0.4)
        return [v, v]

    def loss_lambda(self, step: int) -> float:
        """The dense loss weight at ``step`` (0 before ``dense_start_step``)."""
        return self.cfg.loss_lambda if step >= self.cfg.dense_start_step else 0.0

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        loss_global, loss_dense = self.losses(views, step)
        lam = self.loss_lambda(step)
        return (1.0 - lam) * loss_global + lam * loss_dense

    def losses(self, views: list[torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global and the dense loss of one micro-batch (both queues are updated when gradients are on).

        Args:
            views: [query view, key view], each (B, C, H, W).
            step: Optimizer step (seeds the shuffled-BN permutation).

        Returns:
            (global InfoNCE, dense InfoNCE averaged over the B * S query cells), scalars.
        """
        fq = self._grid(self.encoder.feature_map(views[0]))  # (B, C, S)
        q_global = self.head(fq.mean(dim=2)).float()  # (B, D)
        fq_cells = fq.transpose(1, 2)  # (B, S, C)
        q_dense = self.dense_head(fq_cells).float()  # (B, S, D)
        with torch.no_grad():
            fk = self._key_features(views[1], step)  # (B, C, S)
            k_global = self.key_head(fk.mean(dim=2)).float()
            fk_cells = fk.transpose(1, 2)
            k_dense = self.key_dense_head(fk_cells).float()  # (B, S, D)
            # correspondence on the backbone features (cosine argmax), as the paper
            k_matched = select_most_similar(fq_cells.detach().float(), fk_cells.float(), k_dense)  # (B, S, D)
        loss_global = self.criterion(q_global, k_global)
        loss_dense = self._dense_loss(q_dense, k_matched, k_dense.mean(dim=1))
        return loss_global, loss_dense

    def _dense_loss(self, q: torch.Tensor, k: torch.Tensor, k_pooled: torch.Tensor) -> torch.Tensor:
        """InfoNCE of each query cell against its matched key cell, negatives from the dense queue.

        Args:
            q: (B, S, D) query projections; k: (B, S, D) matched key projections; k_pooled: (B, D) grid-averaged
                key projections (enqueued, one per image).
        """
        q = F.normalize(q.flatten(0, 1), dim=1)  # (B*S, D)
        k = F.normalize(k.flatten(0, 1), dim=1)
        _, negatives = self.dense_bank(F.normalize(k_pooled, dim=1), update=q.requires_grad)  # (K, D)
        assert negatives is not None  # memory_bank_size >= 1
        pos = (q * k).sum(dim=1, keepdim=True)  # (B*S, 1)
        neg = q @ negatives.to(q.device, q.dtype).T  # (B*S, K)
        logits = torch.cat([pos, neg], dim=1) / self.cfg.temperature
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=q.device))

    def _grid(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, S): the feature grid, pooled to ``grid_size`` cells a side if set."""
        if self.cfg.grid_size is not None:
            fmap = F.adaptive_avg_pool2d(fmap, self.cfg.grid_size)
        return fmap.flatten(2)

    def _key_features(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """Key-encoder feature grid (B, C, S) with shuffled BN (:func:`pretrain.methods.base.shuffled_key_forward`)."""
        return shuffled_key_forward(lambda g: self._grid(self.key_encoder.feature_map(g)), x, step,
                                    self.cfg.shuffle_bn_groups)

    def per_rank_batchnorm(self) -> list[str]:
        """The key encoder (shuffled BN); the key heads run after the unshuffle, on this rank's own samples."""
        return ["key_encoder"] if self.cfg.shuffle_bn_groups > 1 else []
