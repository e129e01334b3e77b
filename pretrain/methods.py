"""SSL methods built from lightly's heads, losses and momentum utilities, registered by name.

Every method is an ``nn.Module`` holding the pooled encoder(s) and heads, with:

* ``view_specs(crop_size, local_crop_size, min_scale)``: its augmentation recipe (:class:`ViewSpec` list);
* ``forward(views, step)``: the loss of one micro-batch (views as produced by :class:`ViewMaker`);
* ``on_before_optimizer_step(step)`` / ``on_step_start(step)``: gradient surgery and momentum updates;
* ``export_encoder``: the encoder whose ``body`` is exported (the teacher for DINO, the online net otherwise).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from lightly.loss import BarlowTwinsLoss, DINOLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
from lightly.models.modules import heads
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.backbones import PooledEncoder
from segfactory.registry import Registry

METHODS: Registry[type[SSLMethod]] = Registry("method")


def register_method(name: str):
    return METHODS.register(name)


class SSLMethod(nn.Module):
    """Base class.

    Args:
        encoder: The online/student encoder.
        cfg: The method's config section.
        total_steps: Planned optimizer steps (for momentum/temperature schedules).
    """

    name = "base"
    momentum_pairs: ClassVar[list[tuple[str, str]]] = []  # (online, momentum copy) attribute names

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
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
        m = cosine_schedule(step, self.total_steps, self.cfg.momentum, 1.0)
        for online, ema in self.momentum_pairs:
            update_momentum(getattr(self, online), getattr(self, ema), m=m)

    def on_before_optimizer_step(self, step: int) -> None:
        """Hook after backward, before the optimizer step."""

    def _embed_pairs(self, net: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run views of equal size through ``net`` as one batch (one BN batch, one launch), split back."""
        b = views[0].shape[0]
        return list(net(torch.cat(views)).float().split(b))


def _momentum_copy(module: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(module)
    deactivate_requires_grad(twin)
    return twin


@register_method("simclr")
class SimCLR(SSLMethod):
    """SimCLR: NT-Xent between two views' projections (negatives: the rest of the batch)."""

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.SimCLRProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = NTXentLoss(temperature=cfg.temperature)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        # SimCLR's strong colour distortion (Chen et al. 2020; lightly's SimCLRTransform defaults)
        v = ViewSpec(crop, scale=(min_scale or 0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2)
        return [v, v]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)


@register_method("moco")
class MoCo(SSLMethod):
    """MoCo v2: query encoder vs momentum key encoder, negatives from a memory bank."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "key_encoder"), ("head", "key_head")]

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.MoCoProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.key_encoder = _momentum_copy(encoder)
        self.key_head = _momentum_copy(self.head)
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
        return torch.Generator().manual_seed(1_000_003 * step + 17)


@register_method("byol")
class BYOL(SSLMethod):
    """BYOL: online predictor regresses the momentum target's projection (symmetrized)."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "target_encoder"),
                                                       ("projection", "target_projection")]

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.projection = heads.BYOLProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.prediction = heads.BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim)
        self.target_encoder = _momentum_copy(encoder)
        self.target_projection = _momentum_copy(self.projection)
        self.criterion = NegativeCosineSimilarity()

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.08, 1.0)
        return [ViewSpec(crop, scale=s, blur_p=1.0), ViewSpec(crop, scale=s, blur_p=0.1, solarize_p=0.2)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        p0, p1 = self._embed_pairs(nn.Sequential(self.encoder, self.projection, self.prediction), views)
        with torch.no_grad():
            z0, z1 = self._embed_pairs(nn.Sequential(self.target_encoder, self.target_projection), views)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


@register_method("dino")
class DINO(SSLMethod):
    """DINO: student matches the centered, sharpened momentum teacher across 2 global + N local crops."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "teacher_encoder"), ("head", "teacher_head")]

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        kw = {"input_dim": encoder.dim, "hidden_dim": cfg.hidden_dim, "bottleneck_dim": cfg.bottleneck_dim,
              "output_dim": cfg.out_dim}
        self.head = heads.DINOProjectionHead(**kw, freeze_last_layer=cfg.freeze_last_layer_steps)
        self.teacher_encoder = _momentum_copy(encoder)
        # a fresh head loaded from the student: deepcopy of weight-normed layers is not supported
        self.teacher_head = heads.DINOProjectionHead(**kw)
        self.teacher_head.load_state_dict(self.head.state_dict())
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=cfg.out_dim, teacher_temp=cfg.teacher_temp,
                                  warmup_teacher_temp=cfg.warmup_teacher_temp, warmup_teacher_temp_epochs=1,
                                  student_temp=cfg.student_temp)

    @property
    def export_encoder(self) -> PooledEncoder:
        return self.teacher_encoder  # the teacher is DINO's better encoder (Caron et al. 2021)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        g = ViewSpec(crop, scale=(min_scale or 0.4, 1.0), blur_p=1.0)
        local = ViewSpec(local_crop, scale=(0.05, min_scale or 0.4), blur_p=0.5)
        return [g, replace(g, blur_p=0.1, solarize_p=0.2)] + [local] * self.cfg.n_local_crops

    def _teacher_temp(self, step: int) -> float:
        n = self.cfg.warmup_teacher_temp_steps
        if step >= n:
            return self.cfg.teacher_temp
        return self.cfg.warmup_teacher_temp + (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp) * step / n

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        globals_, locals_ = views[:2], views[2:]
        with torch.no_grad():
            t_out = self._embed_pairs(nn.Sequential(self.teacher_encoder, self.teacher_head), globals_)
        student = nn.Sequential(self.encoder, self.head)
        s_out = self._embed_pairs(student, globals_)
        if locals_:
            s_out += self._embed_pairs(student, locals_)
        return self.criterion(t_out, s_out, teacher_temp=self._teacher_temp(step))

    def on_before_optimizer_step(self, step: int) -> None:
        self.head.cancel_last_layer_gradients(current_epoch=step)


@register_method("barlowtwins")
class BarlowTwins(SSLMethod):
    """Barlow Twins: cross-correlation of two views' projections driven to the identity."""

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.BarlowTwinsProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim)
        self.criterion = BarlowTwinsLoss(lambda_param=cfg.lambda_param)

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        return BYOL.view_specs(self, crop, local_crop, min_scale)  # type: ignore[arg-type]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)


@register_method("vicreg")
class VICReg(SSLMethod):
    """VICReg: invariance + variance + covariance regularization of two views' projections."""

    def __init__(self, encoder: PooledEncoder, cfg: Any, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        self.head = heads.VICRegProjectionHead(encoder.dim, cfg.hidden_dim, cfg.out_dim, num_layers=2)
        self.criterion = VICRegLoss()

    def view_specs(self, crop: int, local_crop: int, min_scale: float | None) -> list[ViewSpec]:
        s = (min_scale or 0.08, 1.0)
        return [ViewSpec(crop, scale=s, blur_p=0.5), ViewSpec(crop, scale=s, blur_p=0.5, solarize_p=0.1)]

    def forward(self, views: list[torch.Tensor], step: int) -> torch.Tensor:
        z0, z1 = self._embed_pairs(nn.Sequential(self.encoder, self.head), views)
        return self.criterion(z0, z1)


def build_method(name: str, encoder: PooledEncoder, cfg_method: Any, total_steps: int) -> SSLMethod:
    """Instantiate a registered method with its options section ``cfg_method.<name>``.

    Raises:
        UserError: for an unknown name (listing the valid ones).
    """
    return METHODS.get(name)(encoder, getattr(cfg_method, name), total_steps)
