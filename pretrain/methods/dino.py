"""DINO (Caron et al. 2021): a student matches the centered, sharpened momentum teacher across 2 global and N local
crops."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import heads
from lightly.models.utils import deactivate_requires_grad
from pydantic import Field
from torch import nn

from pretrain.augment import ViewSpec
from pretrain.encoder import PooledEncoder
from pretrain.methods import register_method
from pretrain.methods.base import SSLMethod, momentum_copy
from segfactory.config import StrictModel


class DINOConfig(StrictModel):
    """``method.dino``."""

    hidden_dim: int = Field(2048, ge=1)
    bottleneck_dim: int = Field(256, ge=1)
    out_dim: int = Field(65536, ge=1, description="prototypes; 4096-16384 is plenty for small data")
    momentum: float = Field(0.996, ge=0, lt=1)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_steps: int = Field(0, ge=0)
    student_temp: float = Field(0.1, gt=0)
    n_local_crops: int = Field(6, ge=0)
    freeze_last_layer_steps: int = Field(0, ge=0, description="keep the prototypes fixed this many steps")


@register_method("dino", DINOConfig)
class DINO(SSLMethod[DINOConfig]):
    """DINO: student matches the centered, sharpened momentum teacher across 2 global + N local crops."""

    momentum_pairs: ClassVar[list[tuple[str, str]]] = [("encoder", "teacher_encoder"), ("head", "teacher_head")]

    def __init__(self, encoder: PooledEncoder, cfg: DINOConfig, total_steps: int):
        super().__init__(encoder, cfg, total_steps)
        kw = {"input_dim": encoder.dim, "hidden_dim": cfg.hidden_dim, "bottleneck_dim": cfg.bottleneck_dim,
              "output_dim": cfg.out_dim}
        self.head = heads.DINOProjectionHead(**kw, freeze_last_layer=cfg.freeze_last_layer_steps)
        self.teacher_encoder = momentum_copy(encoder)
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
