"""Self-training and appearance alignment inside the fine-tuning loop (``data.unlabeled`` + ``adapt``).

Per training step ``s`` (after the supervised synthetic loss, before the optimizer step):

1. a batch of real crops (:mod:`finetune.unlabeled`) gets the *weak* augmentation: the geometric part of
   ``augment`` (crop, flips, rotation, zoom), no photometric change;
2. from ``adapt.warmup_steps`` on, the teacher (an EMA of the student, :func:`~finetune.adapt.ema_update`)
   labels them (:func:`~finetune.adapt.pseudo_label`: threshold tau, per-image quality weight);
3. ClassMix pastes half of the classes of the (augmented) synthetic crops, with their labels, into the real
   crops; the mixed images get the *strong* augmentation (colour jitter, blur) and the student learns them
   with pixel-weighted cross-entropy (pasted pixels weight 1), scaled by ``adapt.weight``; with
   ``adapt.instance_pseudo`` the instance head also learns the teacher's distance map on confident real pixels
   and the pasted pixels' exact synthetic distance targets (:meth:`SelfTraining.instance_pseudo_pixel_loss`);
4. with ``adapt.mic_ratio`` > 0, Masked Image Consistency (MIC, Hoyer et al. 2023, its ``separatetrgaug`` mode):
   the real crops of step 1 get their own strong view, a random block mask (:func:`~finetune.adapt.block_mask`)
   zeroes blocks of the standardised input, and the student learns the pseudo-labels and weights of step 2 from
   the masked crops (class logits only), scaled by ``adapt.mic_weight``, in a third forward and backward pass
   (:meth:`SelfTraining.mic_loss`; its forward leaves BatchNorm's running statistics alone).

Before step 1 the synthetic crops may be moved toward random real crops (FDA, histogram matching).

Every random choice comes from one generator saved in the checkpoint together with the teacher (MIC's strong view
and mask from a second one, seeded apart, so turning MIC on changes none of the other draws), and the real
crops are a function of ``(seed, step, slot)``, so resume stays exact.

Data-parallel (``train.devices > 1``): ``adapt.batch_size`` is the global real batch and each rank loads its
contiguous slots of it; every draw (weak view, alignment, ClassMix, strong view, MIC's view and mask) is made for
the global batch from the generators, which every rank holds in the same state, and each rank keeps its rows; the
teacher follows the student's weights, equal on all ranks, and labels with the global batch's BatchNorm statistics;
the loss and the logged pseudo-label quality are global sums over ranks. So 2 ranks build the same mixed global
batch as one process, and the teacher, the generators and the logs are identical on every rank (rank 0 checkpoints
them).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.adapt import (
    align_batch,
    block_mask,
    choose_half,
    chosen_mask,
    classmix,
    classmix_distance,
    classmix_masks,
    distance_pseudo_targets,
    ema_alpha,
    ema_update,
    pixel_weights,
    present_classes,
    pseudo_label,
    strong_photometric,
    teacher_mode,
)
from finetune.config import AdaptConfig, FinetuneConfig, ScaleBy
from finetune.data.normalize import standardize
from finetune.scale import SCALE_KEYS, component_sizes, robust_median
from finetune.unlabeled import UnlabeledSet, open_unlabeled, unlabeled_loader
from segfactory import distributed
from segfactory.distributed import DistInfo
from segfactory.errors import UserError

# Added to the training seed for the adaptation generator, so adapting leaves the synthetic stream unchanged.
ADAPT_SEED_SALT = 0xADA9
# Added to the training seed for MIC's generator (adapt.mic_ratio), so MIC leaves the adaptation stream unchanged.
MIC_SEED_SALT = 0x31C0
# Real images predicted per pass of the automatic scale estimate, and synthetic masks measured.
SCALE_IMAGES = 16
SCALE_SYNTHETIC_MASKS = 64
# input.scale=auto refuses rendered thing objects whose median diameter (pixels) is below this: specks.
MIN_SCALE_OBJECT_PX = 8.0
# input.scale=auto estimates one scale per source folder of the unlabeled images, for up to this many folders
# (more: one estimate over all of them, as the cost grows with the folders).
MAX_SCALE_GROUPS = 8


def things_text(thing_ids: list[int], names: list[str] | None = None) -> str:
    """How messages name the thing classes: ``nucleus (1)``, or the bare ids without names; ``none``."""
    if not thing_ids:
        return "none"
    return ", ".join(f"{names[i]} ({i})" if names and 0 <= i < len(names) else str(i) for i in thing_ids)


def check_scale_target(synthetic_masks: list[np.ndarray], thing_ids: list[int], by: ScaleBy = "count",
                       names: list[str] | None = None) -> None:
    """Before training: ``input.scale=auto`` compares median object sizes, which says nothing when the rendered
    thing objects are specks (median under :data:`MIN_SCALE_OBJECT_PX`: distant, occluded or cut objects, as
    in the street family, whose count median estimate ran to 1.53 and later 0.185 where 0.33 is right).

    Args:
        synthetic_masks: Label masks of synthetic frames.
        thing_ids: The thing classes measured.
        by: The median judged (``input.scale_by``): over components (``count``) or pixels (``area``). When the
            count median is a speck's but the area-weighted one is not, the error names ``input.scale_by=area``.
        names: The model's class names (to name the thing classes in the error).

    Raises:
        UserError: one line with the measured size and the fix.
    """
    sizes = [s for m in synthetic_masks for s in component_sizes(m, thing_ids)]
    med = robust_median(sizes, 2.0, by)
    if med is None or med >= MIN_SCALE_OBJECT_PX:
        return
    things = things_text(thing_ids, names)
    area = robust_median(sizes, 2.0, "area") if by == "count" else None
    if area is not None and area >= MIN_SCALE_OBJECT_PX:
        raise UserError(f"input.scale=auto: the rendered objects of the thing classes ({things}) measure "
                        f"{med:.1f} px across (median of {len(sizes)}): mostly specks (distant, occluded or cut "
                        f"objects), whose size does not show the scale of the real images; the median over their "
                        f"pixels (area-weighted) is {area:.1f} px",
                        fix="set input.scale_by=area, or set input.scale to a number (about rendered object size / "
                            "real object size; the street demo uses 0.33)")
    raise UserError(f"input.scale=auto: the rendered objects of the thing classes ({things}) measure {med:.1f} px "
                    f"across ({'area-weighted ' if by == 'area' else ''}median of {len(sizes)}): specks like these "
                    f"(distant, occluded or cut objects) do not show the scale of the real images",
                    fix="set input.scale to a number (about rendered object size / real object size; the street "
                        "demo uses 0.33), or render closer views so that the median thing object is at least "
                        f"{MIN_SCALE_OBJECT_PX:.0f} px across")


def mic_view(real_x: torch.Tensor, generator: torch.Generator, a: AdaptConfig, mean: Any, std: Any,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
    """MIC's student input: the real crops' strong view (:func:`~finetune.adapt.strong_photometric` with the
    ``adapt.jitter*`` / ``adapt.blur*`` settings), standardised, times a block mask
    (:func:`~finetune.adapt.block_mask` with ``adapt.mic_ratio`` and ``adapt.mic_block``). The view is drawn
    first, then the mask, both from ``generator``.

    Args:
        real_x: (R, C, S, S) weakly augmented real crops in [0, 1].
        generator: MIC's generator, on ``real_x``'s device.
        a: The ``adapt`` settings.
        mean: ``input.mean`` of :func:`~finetune.data.normalize.standardize`.
        std: ``input.std``.
        rows: ``(lo, total)``: ``real_x`` is rows ``lo:lo + R`` of a global batch of ``total`` (a data-parallel
            rank's share): every draw is made for the global batch and these rows kept.

    Returns:
        (R, C, S, S) standardised, 0 in the dropped blocks.
    """
    image = strong_photometric(real_x, generator, a.jitter_p, a.jitter, a.blur_p, a.blur_sigma, rows=rows)
    mask = block_mask(real_x.shape[0], real_x.shape[-2], real_x.shape[-1], a.mic_ratio, a.mic_block, generator,
                      rows=rows)
    return standardize(image, mean, std) * mask.to(image.dtype)


class SelfTraining:
    """Teacher, real-crop stream and losses of domain adaptation for one run (built by :meth:`create`)."""

    def __init__(self, cfg: FinetuneConfig, unlabeled: UnlabeledSet, student: nn.Module, device: torch.device,
                 in_chans: int, input_spec: dict[str, Any], num_classes: int, ignore_index: int,
                 synthetic_masks: Callable[[], list[np.ndarray]], thing_ids: list[int],
                 info: DistInfo | None = None, class_names: list[str] | None = None):
        self.cfg = cfg
        self.info = info or DistInfo()  # data-parallel: this rank's place (see the module docstring)
        self.a = cfg.adapt
        self.unlabeled = unlabeled
        self.device = device
        self.in_chans = in_chans
        self.input_spec = input_spec
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.synthetic_masks = synthetic_masks
        self.thing_ids = thing_ids
        self.class_names = class_names
        self.self_training = self.a.enabled
        self.instance_pseudo = self.a.enabled and self.a.instance_pseudo and cfg.instances.enabled
        self.mic = self.a.enabled and self.a.mic_ratio > 0
        self.align = (self.a.fda_beta > 0 and self.a.fda_p > 0) or self.a.hist_match_p > 0
        self.recalibrates = self.a.recalibrate_bn > 0
        self.batch_size = self.a.batch_size or cfg.train.batch_size
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(cfg.train.seed + ADAPT_SEED_SALT)
        self.mic_gen: torch.Generator | None = None
        if self.mic:  # its own stream: MIC on or off leaves self.gen's draws as they were
            self.mic_gen = torch.Generator(device=device)
            self.mic_gen.manual_seed(cfg.train.seed + MIC_SEED_SALT)
        # the step's real crops (R, C, S, S), pseudo-labels (R, S, S) and weights (R, S, S) for mic_loss
        self._mic_target: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._mic_acc = 0.0  # MIC loss (adapt.mic_ratio), summed like _acc
        self.scale_auto = cfg.input.scale == "auto"
        self.scale_report: dict[str, Any] | None = None
        self._acc = np.zeros(3)  # self-training loss, pseudo-label quality, pasted share (per log interval)
        self._n = 0
        self._inst_acc = 0.0  # instance pseudo-label loss (adapt.instance_pseudo), summed like _acc
        self._loader: Any = None
        self._loader_key: tuple | None = None
        self._iter: Any = None

    @classmethod
    def create(cls, cfg: FinetuneConfig, student: nn.Module, device: torch.device, in_chans: int,
               input_spec: dict[str, Any], num_classes: int, ignore_index: int,
               synthetic_masks: Callable[[], list[np.ndarray]], thing_ids: list[int],
               info: DistInfo | None = None, class_names: list[str] | None = None) -> SelfTraining | None:
        """``None`` without ``data.unlabeled`` or with nothing to do; else checked and ready (raises UserError)."""
        if not cfg.data.unlabeled:
            return None
        a = cfg.adapt
        if not a.enabled and not (a.fda_beta > 0 and a.fda_p > 0) and a.hist_match_p <= 0 \
                and a.recalibrate_bn == 0 and cfg.input.scale != "auto":
            return None
        unl = open_unlabeled(cfg.data.unlabeled, in_chans)
        if cfg.input.scale == "auto":
            check_scale_target(synthetic_masks(), thing_ids, cfg.input.scale_by, class_names)
        return cls(cfg, unl, student, device, in_chans, input_spec, num_classes, ignore_index, synthetic_masks,
                   thing_ids, info, class_names)

    # ------------------------------------------------------------------ state
    def active(self, step: int) -> bool:
        """Self-training runs at this (0-based) step."""
        return self.self_training and step >= self.a.warmup_steps

    def needs_real(self, step: int) -> bool:
        return self.align or self.active(step)

    def state_dict(self) -> dict[str, Any]:
        st = {"teacher": self.teacher.state_dict(), "rng": self.gen.get_state(),
              "scale": self.input_spec.get("scale"), "scale_report": self.scale_report,
              "scale_spec": {k: self.input_spec[k] for k in SCALE_KEYS if k in self.input_spec},
              "log_acc": [float(v) for v in self._acc], "log_n": self._n, "log_inst": self._inst_acc}
        if self.mic_gen is not None:  # only with MIC, so checkpoints without it hold what they held before
            st["mic_rng"] = self.mic_gen.get_state()
            st["log_mic"] = self._mic_acc
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.teacher.load_state_dict(st["teacher"])
        self.gen.set_state(st["rng"])
        if st.get("scale") is not None:
            self.input_spec["scale"] = float(st["scale"])
        self.input_spec.update(st.get("scale_spec") or {})
        self.scale_report = st.get("scale_report")
        self._acc = np.asarray(st.get("log_acc", [0, 0, 0]), np.float64)
        self._n = int(st.get("log_n", 0))
        self._inst_acc = float(st.get("log_inst", 0.0))
        if self.mic_gen is not None and "mic_rng" in st:
            self.mic_gen.set_state(st["mic_rng"])
        self._mic_acc = float(st.get("log_mic", 0.0))

    def describe(self) -> dict[str, Any]:
        """What model.json / summary.json record about adaptation."""
        return {"unlabeled": self.unlabeled.describe(), "self_training": self.self_training,
                "settings": self.a.model_dump(mode="json"), "scale": self.input_spec.get("scale"),
                "scale_estimate": self.scale_report}

    def log_fields(self) -> dict[str, float]:
        """Means over the log interval (then reset): ``selftrain_loss``, ``pseudo_quality``, ``pasted`` and,
        with ``adapt.instance_pseudo``, ``instance_pseudo_loss`` (unweighted, also inside ``selftrain_loss``),
        with ``adapt.mic_ratio`` > 0 ``mic_loss`` (unweighted; times ``adapt.mic_weight`` inside
        ``selftrain_loss``)."""
        if not self._n:
            return {}
        m = self._acc / self._n
        out = {"selftrain_loss": round(float(m[0]), 6), "pseudo_quality": round(float(m[1]), 4),
               "pasted": round(float(m[2]), 4)}
        if self.instance_pseudo:
            out["instance_pseudo_loss"] = round(self._inst_acc / self._n, 6)
        if self.mic:
            out["mic_loss"] = round(self._mic_acc / self._n, 6)
        self._acc, self._n, self._inst_acc, self._mic_acc = np.zeros(3), 0, 0.0, 0.0
        return out

    # ------------------------------------------------------------------ real crops
    def real_batch(self, step: int, window: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, L, L) real crops in [0, 1] and their (B, L, L) validity for ``step``, on the device
        (data-parallel: this rank's B / world size slots of the global batch)."""
        from finetune.data.mixing import raise_if_error

        scale = self.image_scales()
        key = (scale if isinstance(scale, float) else tuple(scale), window, end)
        if self._loader_key != key or self._next_step != step:
            # (Re)built at the first step that needs it and when the scale changes (input.scale=auto).
            dc = self.cfg.data
            self._loader = unlabeled_loader(self.unlabeled.images, window, self.in_chans, self.cfg.input.scaling,
                                            scale, self.batch_size, self.cfg.train.seed, step, end, dc.num_workers,
                                            self.device.type == "cuda", rank=self.info.rank,
                                            world_size=self.info.world_size)
            self._iter = iter(self._loader)
            self._loader_key = key
        batch = next(self._iter)
        self._next_step = step + 1
        raise_if_error(batch)
        return (batch["image"].to(self.device, non_blocking=True), batch["valid"].to(self.device, non_blocking=True))

    _next_step = -1

    def weak(self, image: torch.Tensor, valid: torch.Tensor, augment) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric augmentation only (the teacher's view); pixels from outside the image become invalid."""
        mask = torch.where(valid, 0, self.ignore_index).to(torch.uint8)
        lo, total = self._rows(image.shape[0])
        image, mask = augment.apply(image, mask, augment.sample_rows(total, lo, lo + image.shape[0], self.gen))
        return image, mask == 0

    # ------------------------------------------------------------------ steps
    def align_source(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """FDA / histogram matching of synthetic crops (B, C, S, S) toward the step's real crops."""
        if not self.align:
            return x
        # data-parallel: a synthetic crop's reference may be a real crop of another rank
        ref = distributed.all_gather_cat(real, self.info)
        return align_batch(x, ref, self.gen, self.a.fda_beta, self.a.fda_p, self.a.hist_match_p,
                           rows=self._rows(x.shape[0]))

    def loss(self, step: int, student: nn.Module, src_x: torch.Tensor, src_y: torch.Tensor, real_x: torch.Tensor,
             real_valid: torch.Tensor, forward: Callable[[torch.Tensor], Any],
             autocast: torch.dtype | None, channels_last: bool,
             src_dist: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The self-training loss of one step (not yet weighted by ``adapt.weight``).

        Args:
            step: 0-based training step (>= warmup).
            student: The model being trained (the teacher follows it).
            src_x: (B, C, S, S) augmented synthetic crops in [0, 1].
            src_y: (B, S, S) their labels.
            real_x: (R, C, S, S) weakly augmented real crops in [0, 1].
            real_valid: (R, S, S) bool, real pixels with content.
            forward: Runs the student on a standardised batch (dropout seeding, autocast), returns float logits;
                with :attr:`instance_pseudo` the pair (class logits, distance logits (R, 1, S, S)).
            src_dist: With :attr:`instance_pseudo`: the synthetic crops' distance targets (B, 1, S, S) and where
                they are known (B, 1, S, S) bool (:func:`finetune.instances.batch_targets`).

        Returns:
            Scalar loss.
        """
        a = self.a
        ema_update(self.teacher, student, ema_alpha(a.ema, step - a.warmup_steps))
        teacher_mode(self.teacher, a.teacher_norm)
        with torch.no_grad():
            xt = standardize(real_x, self.input_spec["mean"], self.input_spec["std"])
            if channels_last:
                xt = xt.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                t_logits, t_dist = self._teacher(xt)
        pl = pseudo_label(t_logits, a.threshold, real_valid, self.ignore_index)
        weights = pixel_weights(pl, a.pixel_weight)
        labels = pl.labels
        if self.mic:  # MIC learns the same pseudo-labels and weights of the unmixed real crops (mic_loss)
            self._mic_target = (real_x, labels, weights)
        image = real_x
        pasted = torch.zeros_like(real_valid)
        if a.mix == "classmix":
            sx, sy = self._paired_source(src_x, src_y, real_x.shape[0])
            pasted = self._classmix_masks(sy, self.thing_ids if a.mix_classes == "things" else None)
            image, labels, weights = classmix(sx, sy, real_x, labels, weights, pasted)
        image = strong_photometric(image, self.gen, a.jitter_p, a.jitter, a.blur_p, a.blur_sigma,
                                   rows=self._rows(image.shape[0]))
        logits = forward(standardize(image, self.input_spec["mean"], self.input_spec["std"]))
        d_logit = None
        if self.instance_pseudo:
            logits, d_logit = logits
        ce = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none", ignore_index=self.ignore_index)
        loss, quality, share = self._global_means(ce * weights, pl.quality, pasted)
        if d_logit is not None and t_dist is not None:
            if src_dist is None:
                raise ValueError("adapt.instance_pseudo: the synthetic crops' distance targets were not passed")
            # the synthetic rows ClassMix pasted from (data-parallel: gathered as the crops are)
            src = self._paired_source(src_dist[0], src_dist[1].to(src_dist[0].dtype), real_x.shape[0])
            bce = self.instance_pseudo_pixel_loss(d_logit, t_dist, pl, src, pasted if a.mix == "classmix" else None)
            inst = self._global_means(bce, pl.quality, pasted)[0]
            self._inst_acc += float(inst.detach())
            loss = loss + self.cfg.instances.weight * inst
        self._acc += [float(loss.detach()), quality, share]
        self._n += 1
        return loss

    def mic_loss(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Masked Image Consistency (``adapt.mic_ratio`` > 0): the loss of the student on masked real crops
        against the teacher's pseudo-labels of the unmasked ones, not yet weighted by ``adapt.mic_weight`` or
        ``adapt.weight``. Call it after :meth:`loss` of the same step, whose real crops, pseudo-labels and
        per-pixel weights (``adapt.threshold``, ``adapt.pixel_weight``) it uses.

        The crops (R, C, S, S) get a strong view of their own (:func:`~finetune.adapt.strong_photometric` with
        the ``adapt.jitter*`` / ``adapt.blur*`` settings, MIC's ``separatetrgaug``), are standardised and
        multiplied by a block mask (R, 1, S, S) (:func:`~finetune.adapt.block_mask`: ``adapt.mic_block`` px blocks
        dropped with probability ``adapt.mic_ratio``), so dropped pixels are 0, MIC's masking of the normalised
        image. Both draws come from MIC's own generator, for the global batch (data-parallel: this rank's rows).
        The loss is the pixel-weighted cross-entropy of the class logits (R, K, S, S), a mean over all pixels (of
        the global batch when data-parallel), as :meth:`loss`'s. MIC trains the class logits only, also with
        ``adapt.instance_pseudo``.

        Args:
            forward: Runs the student on a standardised batch (R, C, S, S), returns float class logits
                (R, K, S, S) (data-parallel with the instance head: through both heads, see ``Trainer._forward``).

        Returns:
            Scalar loss.
        """
        if self._mic_target is None or self.mic_gen is None:
            raise RuntimeError("SelfTraining.mic_loss: call loss() of the step first, with adapt.mic_ratio > 0")
        real_x, labels, weights = self._mic_target
        self._mic_target = None
        logits = forward(mic_view(real_x, self.mic_gen, self.a, self.input_spec["mean"], self.input_spec["std"],
                                  self._rows(real_x.shape[0])))
        ce = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none", ignore_index=self.ignore_index)
        loss = self._global_mean(ce * weights)
        value = float(loss.detach())
        self._mic_acc += value
        self._acc[0] += self.a.mic_weight * value  # selftrain_loss: the step's whole real-image loss
        return loss

    def _teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The teacher's class logits (R, K, S, S) and, with :attr:`instance_pseudo`, distance logits
        (R, 1, S, S) of one standardised real batch (one decoder pass for both heads)."""
        if not self.instance_pseudo:
            return self.teacher(x), None
        from finetune.instances import forward_both

        return forward_both(self.teacher, x)

    @staticmethod
    def instance_pseudo_targets(t_dist: torch.Tensor, pl: Any, src: tuple[torch.Tensor, torch.Tensor],
                                pasted: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance targets and weights of the mixed batch the student sees (``adapt.instance_pseudo``).

        Args:
            t_dist: (R, 1, S, S) the teacher's distance logits on the weakly augmented real crops (the student's
                crops are the same pixels: the strong augmentation is photometric only).
            pl: The teacher's :class:`~finetune.adapt.PseudoLabels` of the same crops.
            src: Distance targets (R, 1, S, S) and their validity (R, 1, S, S) bool of the synthetic crops
                ClassMix pastes from (row ``i`` pasted into real crop ``i``).
            pasted: (R, S, S) bool ClassMix mask, or None without mixing.

        Returns:
            target (R, 1, S, S) in [0, 1] and weight (R, 1, S, S): real pixels the teacher's sigmoid where its
            class pseudo-label is confident (weight: the image's quality), else weight 0; pasted pixels the
            exact synthetic target, weight 1 where known.
        """
        target, weight = distance_pseudo_targets(t_dist, pl)
        if pasted is not None:
            target, weight = classmix_distance(src[0], src[1], target, weight, pasted)
        return target, weight

    def instance_pseudo_pixel_loss(self, d_logit: torch.Tensor, t_dist: torch.Tensor, pl: Any,
                                   src: tuple[torch.Tensor, torch.Tensor],
                                   pasted: torch.Tensor | None) -> torch.Tensor:
        """(R, 1, S, S) weighted binary cross-entropy of the student's distance logits against
        :meth:`instance_pseudo_targets`; :meth:`loss` takes its mean over all pixels (of the global batch when
        data-parallel), as for the class term's weighted cross-entropy."""
        target, weight = self.instance_pseudo_targets(t_dist, pl, src, pasted)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(d_logit.float(), target, reduction="none")
        return bce * weight

    def image_scales(self) -> float | list[float]:
        """The input scale of the real images: one factor, or one per image when sources got their own."""
        f = float(self.input_spec.get("scale") or 1.0)
        per = self.input_spec.get("scales")
        if not per:
            return f
        return [float(per.get(im.group, f)) for im in self.unlabeled.images]

    def recalibrated(self, model: nn.Module, window: int, scale: float | None = None,
                     autocast: torch.dtype | None = None, indices: list[int] | None = None) -> nn.Module:
        """A copy of ``model`` whose BatchNorm statistics are those of ``adapt.recalibrate_bn`` batches of real
        crops (:func:`finetune.adapt.recalibrate_bn`); the crops are fixed by the seed, not by the step.

        Args:
            scale: One input scale for the crops; default :meth:`image_scales`.
            indices: Only these unlabeled images (default all).
        """
        from finetune.adapt import recalibrate_bn

        m = copy.deepcopy(model)
        if self.info.distributed:
            # every rank recalibrates on all the batches (the same crops), with per-process BatchNorm: no
            # collective, so rank 0 may do it alone when it saves the model
            m = distributed.local_batchnorm(m)
        images = self.unlabeled.images if indices is None else [self.unlabeled.images[i] for i in indices]
        f: float | list[float] = self.image_scales() if scale is None else scale
        if indices is not None and not isinstance(f, float):
            f = [f[i] for i in indices]
        loader = unlabeled_loader(images, window, self.in_chans, self.cfg.input.scaling, f,
                                  self.batch_size, self.cfg.train.seed + ADAPT_SEED_SALT, 0, self.a.recalibrate_bn,
                                  self.cfg.data.num_workers, self.device.type == "cuda")

        def batches():
            for b in loader:
                x = standardize(b["image"].to(self.device), self.input_spec["mean"], self.input_spec["std"])
                with torch.autocast(self.device.type, dtype=autocast, enabled=autocast is not None):
                    yield x

        recalibrate_bn(m, batches())
        return m.eval()

    # ------------------------------------------------------------------ input scale
    def estimate_scale(self, model: nn.Module, tile: int, overlap: int, batch_size: int,
                       autocast: torch.dtype | None, channels_last: bool, window: int,
                       window_size: int | None = None) -> dict[str, Any]:
        """Estimate ``input.scale`` with the current model (see :func:`finetune.scale.estimate_scale`) and use it.

        Each source folder of the unlabeled images (up to :data:`MAX_SCALE_GROUPS`) gets its own estimate
        (``input.scales``; self-training then loads each image at its source's scale); ``input.scale`` is their
        geometric mean weighted by image count (the default for other images). When the sources' scales differ
        by more than 25 % (or a source's estimate stopped because the masks did not track objects, see
        :func:`finetune.scale.fit_scale`), the model records ``input.scale_mode: per_image``: prediction
        estimates each image's scale itself (:func:`finetune.predict.auto_scale`), as no single factor fits both.
        The median compared (``input.scale_by``) is recorded as ``input.scale_by`` next to ``input.object_px``, so
        per-image scales measure the same statistic.

        Args:
            window: Crop side of the BatchNorm recalibration batches (``augment.crop_size``).
            window_size: The training loader's window (for the augmentation's median zoom).

        Returns:
            The estimate's report (also kept for model.json and the checkpoint): the first source's fields
            (``scale`` the pooled one) and, with several sources, ``sources`` (each source's own report).
        """
        from finetune.predict import predict_mask
        from finetune.scale import estimate_scale, pooled_scale, scales_differ, training_zoom
        from finetune.unlabeled import real_views

        meta = {"input": {**self.input_spec, "scale": 1.0}, "num_classes": self.num_classes}
        was = model.training
        model.eval()
        groups = self.unlabeled.groups()
        if len(groups) > MAX_SCALE_GROUPS:
            groups = {"": list(range(len(self.unlabeled.images)))}

        def predict_in(indices: list[int]) -> Callable[[float], list[np.ndarray]]:
            def predict_at(scale: float) -> list[np.ndarray]:
                m = self.recalibrated(model, window, scale, autocast, indices) if self.recalibrates else model
                return [predict_mask(m, meta, img, self.device, tile, overlap, batch_size, autocast, channels_last,
                                     scale=1.0) for img in real_views(self.unlabeled, scale, SCALE_IMAGES, indices)]
            return predict_at

        aug = self.cfg.augment
        zoom = training_zoom(aug.crop_size, window_size or aug.crop_size, aug.scale, aug.zoom) if aug.enabled else 1.0
        syn = self.synthetic_masks()
        by = self.cfg.input.scale_by
        reports = {g: estimate_scale(predict_in(idx), syn, self.thing_ids, train_zoom=zoom, by=by)
                   for g, idx in groups.items()}
        ok = {g: r for g, r in reports.items() if r["ok"]}
        report = dict(next(iter(ok.values())) if ok else next(iter(reports.values())))
        if len(groups) > 1:
            for g, r in reports.items():
                r["images"] = len(groups[g])
            report["sources"] = reports
            if ok:
                report["scale"] = round(pooled_scale([r["scale"] for r in ok.values()],
                                                     [len(groups[g]) for g in ok]), 4)
        # data-parallel: every rank estimated from the same images; rank 0's numbers are used everywhere (GPU
        # float rounding may differ between ranks)
        report = distributed.broadcast_object(report, self.info)
        model.train(was)
        if not report["ok"]:
            things = things_text(self.thing_ids, self.class_names)
            cut = report.get("synthetic_border_objects", 0)
            if report["synthetic_median_px"] is None and cut:
                raise UserError(f"input.scale=auto: all {cut} objects of the thing classes ({things}) in the "
                                "synthetic labels touch the frame border, so their size is unknown",
                                fix="render at a higher resolution (render.resolution) or set input.scale to "
                                    "a number")
            in_labels = report["synthetic_median_px"] is None
            raise UserError(f"input.scale=auto: no objects of the thing classes ({things}) were found "
                            + ("in the synthetic labels" if in_labels
                               else "in the model's predictions on the unlabeled images"),
                            fix="set input.scale to a number (the ratio of object sizes, real to rendered, "
                                "inverted)" + (", or render scenes that hold objects of those classes" if in_labels
                                               else ", or train longer before the estimate (adapt.warmup_steps)"))
        self.input_spec["scale"] = float(report["scale"])
        self.input_spec["object_px"] = float(report["object_px"])
        self.input_spec["object_classes"] = [int(k) for k in self.thing_ids]
        self.input_spec["scale_by"] = by  # absent (models from before input.scale_by) means count
        per = {g: float(r["scale"]) for g, r in report.get("sources", {}).items() if r["ok"]}
        if per:
            self.input_spec["scales"] = per
        # per image when one factor cannot serve the sources, or when a source's estimate stopped untracked (the
        # final model, predicting each image, sees objects better than the model after the warm-up)
        untracked = len(per) > 1 and any(r.get("untracked") for r in report.get("sources", {}).values())
        self.input_spec["scale_mode"] = "per_image" if scales_differ(list(per.values())) or untracked else "fixed"
        self.scale_report = report
        return report

    # ------------------------------------------------------------------ data-parallel helpers
    def _rows(self, n: int) -> tuple[int, int]:
        """``(lo, total)``: this rank's ``n`` rows start at ``lo`` of a global batch of ``total``."""
        return self.info.rank * n, n * self.info.world_size

    def _paired_source(self, src_x: torch.Tensor, src_y: torch.Tensor,
                       r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic crop (B, C, S, S) and labels (B, S, S) pasted into each of this rank's ``r`` real crops:
        global real row ``g`` takes global synthetic row ``g mod B`` (gathered from the other ranks when the
        real and synthetic batches differ in size)."""
        b = src_x.shape[0]
        if r == b:  # the same batch sizes: global row g pairs with g, on the same rank
            return src_x, src_y
        lo, _ = self._rows(r)
        idx = torch.arange(lo, lo + r, device=src_x.device) % (b * self.info.world_size)
        # (the same decision on every rank: the per-rank sizes are equal, so all ranks gather or none does)
        return (distributed.all_gather_cat(src_x, self.info)[idx],
                distributed.all_gather_cat(src_y, self.info)[idx])

    def _classmix_masks(self, sy: torch.Tensor, candidates: list[int] | None) -> torch.Tensor:
        """ClassMix masks (R, S, S) of this rank's rows, drawn as for the global batch (the classes present in
        every rank's rows gathered, one draw per global row in order)."""
        if not self.info.distributed:
            return classmix_masks(sy, self.gen, self.ignore_index, candidates, self.num_classes)
        present = present_classes(sy, self.num_classes, self.ignore_index, candidates)
        lo, _ = self._rows(sy.shape[0])
        chosen = choose_half(distributed.all_gather_cat(present, self.info), self.gen)[lo:lo + sy.shape[0]]
        return chosen_mask(sy, chosen)

    def _global_mean(self, weighted: torch.Tensor) -> torch.Tensor:
        """The global batch's mean of a per-pixel loss (differentiable), from sums over ranks (see
        :meth:`_global_means`)."""
        if not self.info.distributed:
            return weighted.mean()
        total = distributed.all_sum_grad(weighted.sum().view(1), self.info)[0]
        return total / (weighted.numel() * self.info.world_size)

    def _global_means(self, weighted: torch.Tensor, quality: torch.Tensor,
                      pasted: torch.Tensor) -> tuple[torch.Tensor, float, float]:
        """The global batch's mean pixel loss (differentiable; the same value and, with DDP's averaging, the same
        gradients as in one process), mean pseudo-label quality and pasted share, from sums over ranks."""
        if not self.info.distributed:
            return weighted.mean(), float(quality.mean()), float(pasted.float().mean())
        w = self.info.world_size
        sums = distributed.all_sum_grad(torch.stack([weighted.sum(), quality.sum().to(weighted.dtype).detach(),
                                                     pasted.sum().to(weighted.dtype)]), self.info)
        logged = sums[1:].detach()
        return (sums[0] / (weighted.numel() * w), float(logged[0]) / (quality.numel() * w),
                float(logged[1]) / (pasted.numel() * w))
