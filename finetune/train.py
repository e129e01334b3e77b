"""The fine-tuning loop: mixed sources, GPU augmentation, AMP + channels_last, checkpoints and exact resume.

Run directory::

    OUT/config.yaml       resolved config
    OUT/data.json         sources, item counts and class mappings
    OUT/checkpoint.pt     model + optimizer + lr scheduler + scaler + augmentation RNG + step (torch.save,
                          weights only)
    OUT/metrics.jsonl     one line per log interval ({"step", "loss", ...}) and per validation ({"step", "val"})
    OUT/curves.png        loss and validation mIoU against steps
    OUT/model/            best-by-validation-mIoU model dir (model.safetensors + model.json)
    OUT/summary.json      written when the run reaches train.steps

Distributed (``train.devices > 1``, or any run started by ``torchrun``): DDP over ``torch.distributed``
(:mod:`segfactory.distributed`). ``train.batch_size`` stays the global batch; each rank loads its slots of the same
global batch (:class:`~finetune.data.mixing.MixedBatchSampler`), augments them with its rows of the global batch's
parameters, BatchNorm is synchronized over the global batch, and the losses are computed from sums over all ranks
(:func:`global_losses`), so the gradients are the single-process ones. Validation splits the frames over the ranks
and sums the confusion matrices; rank 0 alone prints, logs and writes checkpoints and the model. Domain
adaptation (``data.unlabeled``) splits its real batch the same way and keeps the teacher, its generator and its
losses global (:mod:`finetune.selftrain`).

Exact resume: every random choice is either a pure function of (seed, step, slot) (data; dropout, drawn from
a forked global RNG seeded per step) or comes from one explicit generator saved in the checkpoint
(augmentation), so on CPU a resumed run is bit-identical to an uninterrupted one. (On GPU, cuDNN autotuning
makes float results differ in the last bits.)
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.adapt import frozen_bn_stats
from finetune.config import FinetuneConfig
from finetune.data.mixing import (
    MixedBatchSampler,
    RareClasses,
    WindowDataset,
    collate,
    drawn_class_counts,
    raise_if_error,
    rare_class_plans,
)
from finetune.data.normalize import standardize
from finetune.data.remap import TargetClasses
from finetune.data.sources import Source, open_training_sources, resolve_targets
from finetune.scale import scale_summary
from segfactory import distributed
from segfactory.config import hash_config, save_resolved
from segfactory.console import console, progress
from segfactory.distributed import DistInfo
from segfactory.errors import DeferredInterrupt, UserError
from segfactory.io import atomic_write_bytes, atomic_write_json, ensure_writable_dir, read_json
from segfactory.lock import run_dir_lock
from segfactory.plotting import figure_png
from segfactory.resume import describe_change, read_jsonl, truncate_jsonl
from segfactory.seeds import dropout_seed
from segfactory.torchutil import LossGuard, check_finite_weights, memory_hint, warmup_decay
from segfactory.tracking import Tracker, open_tracker, strip_tracking
from segfactory.workers import loader_context

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "segfactory-finetune-checkpoint"
DEFAULT_MEAN, DEFAULT_STD = 0.5, 0.25
# Keys that may differ between a run and its resume: they change when to stop, not what is computed.
# The number of processes is one of them: the global batch, data order, augmentations and schedule do not depend
# on it (a note says what changes: floating-point reduction order).
RESUME_FREE_KEYS = ("train.stop_at", "data.num_workers", "train.max_bad_steps", "train.devices", "train.backend",
                    "train.dist_timeout_s")
# What a diverged loss or NaN weights ask the user to change.
DIVERGED_FIX = "lower train.lr, set train.grad_clip (e.g. 1.0) or train.amp=off"


def config_change(run_dir: Path, cfg: FinetuneConfig) -> str | None:
    """How ``cfg`` differs from the config a run in ``run_dir`` was started with, ignoring ``RESUME_FREE_KEYS``.

    Returns:
        ``"KEY was A, now B (and N more)"`` naming the first differing key, or ``None`` when nothing that matters
        changed or ``run_dir`` holds no ``config.yaml``.
    """
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return None
    import yaml
    from pydantic import ValidationError

    from segfactory.config import resolved_dump

    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    # paths compared absolute on both sides: config.yaml saves them so (older runs' relative ones resolve here);
    # a saved config that no longer validates is compared as it is (describe_change names what differs)
    with contextlib.suppress(ValidationError):
        saved = resolved_dump(type(cfg).model_validate(saved))
    return describe_change(strip_tracking(saved), strip_tracking(resolved_dump(cfg)), ignore=RESUME_FREE_KEYS)


def check_distributed(cfg: FinetuneConfig, world_size: int) -> None:
    """Refuse what cannot fine-tune data-parallel on ``world_size`` processes (before any process starts).

    Raises:
        UserError: a batch the ranks cannot split evenly (``train.batch_size``, or with domain adaptation the
            real batch ``adapt.batch_size``).
    """
    if world_size <= 1:
        return
    if cfg.train.batch_size % world_size:
        raise UserError(f"train.batch_size={cfg.train.batch_size} (the global batch) does not split evenly over "
                        f"{world_size} processes", fix=f"set train.batch_size to a multiple of {world_size}")
    if cfg.data.unlabeled and cfg.adapt.batch_size and cfg.adapt.batch_size % world_size:
        raise UserError(f"adapt.batch_size={cfg.adapt.batch_size} (the global batch of real crops) does not split "
                        f"evenly over {world_size} processes",
                        fix=f"set adapt.batch_size to a multiple of {world_size} (or unset: train.batch_size)")


def global_losses(logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None, ignore_index: int,
                  info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and Dice of the global batch, on every rank of a data-parallel run.

    Both are ratios of sums over the batch (CE: weighted NLL sum / weight sum over labelled pixels; smp's
    multiclass Dice: per-class intersection and cardinality, summed over the batch), so each rank computes its
    sums, they are summed over ranks with a differentiable all-reduce, and the ratios taken: the same values as
    ``nn.CrossEntropyLoss`` and smp's ``DiceLoss`` on the whole batch in one process, and (with DDP's gradient
    averaging, see :func:`segfactory.distributed.all_sum_grad`) the same gradients.

    Args:
        logits: (B, K, H, W) float logits of this rank's samples.
        y: (B, H, W) int64 targets (``ignore_index`` = not labelled).
        class_weights: (K,) CE weights or None.

    Returns:
        ``(ce, dice)`` scalars (CE is 0 when no pixel of the global batch is labelled).
    """
    import torch.nn.functional as F

    b, k = logits.shape[:2]
    valid = y != ignore_index
    nll = F.cross_entropy(logits, y, weight=class_weights, ignore_index=ignore_index, reduction="sum")
    den = (class_weights[y[valid]].sum() if class_weights is not None else valid.sum()).to(nll.dtype)
    # smp DiceLoss (multiclass, from_logits, ignore_index; smooth 0, eps 1e-7) with its batch sums made global
    p = logits.log_softmax(dim=1).exp().reshape(b, k, -1)
    m = valid.reshape(b, 1, -1)
    p = p * m
    t = (F.one_hot((y.reshape(b, -1) * valid.reshape(b, -1)).long(), k).permute(0, 2, 1) * m).type_as(p)
    inter = (p * t).sum((0, 2))
    fp = (p * (1.0 - t)).sum((0, 2))
    fn = ((1 - p) * t).sum((0, 2))
    packed = distributed.all_sum_grad(torch.cat([nll.view(1), den.view(1), inter, fp, fn, t.sum((0, 2))]), info)
    nll_g, den_g = packed[0], packed[1]
    inter, fp, fn, present = packed[2:2 + k], packed[2 + k:2 + 2 * k], packed[2 + 2 * k:2 + 3 * k], packed[2 + 3 * k:]
    ce = nll_g / den_g if float(den_g.detach()) > 0 else nll_g * 0
    score = inter / (inter + 0.5 * fp + 0.5 * fn).clamp_min(1e-7)
    dice = ((1.0 - score) * (present > 0).to(score.dtype)).mean()
    return ce, dice


class Trainer:
    """One fine-tuning run (see module docstring). Build with :meth:`prepare`, then :meth:`run`."""

    def __init__(self, cfg: FinetuneConfig, out: Path, show_progress: bool = True):
        self.cfg = cfg
        self.out = out
        self.show_progress = show_progress
        self.tracker = Tracker()  # run() opens the configured one
        self.info = DistInfo()  # prepare() joins the torchrun job, if any
        self.ddp: nn.Module | None = None
        self.loss_guard = LossGuard(cfg.train.max_bad_steps, "train.max_bad_steps", DIVERGED_FIX)

    # ------------------------------------------------------------------ setup
    def prepare(self, resume: bool) -> None:
        from finetune.config import check_adapt_config
        from finetune.models import build_model, check_encoder_fits, load_pretrained_encoder
        from segfactory.formats.encoder import read_encoder_meta
        from segfactory.torchutil import amp_dtype, resolve_device

        cfg = self.cfg
        t = cfg.train
        check_adapt_config(cfg)
        self.device = resolve_device(t.device, "train.device")
        self.info, self.device = distributed.join(t, self.device, lambda n: check_distributed(cfg, n))
        if not self.info.is_main:  # progress, notes and the summary from rank 0 only (run_finetune restores it)
            console.quiet = True
        if t.devices > 1 and not self.info.distributed and (self.device.type == "cuda" or t.backend == "gloo"):
            console.print(f"note: train.devices={t.devices} but this process was not started by torchrun: one "
                          "process (`segfactory finetune` re-launches itself under torchrun; in-process callers "
                          "such as `segfactory sweep` train with one)")
        self.autocast = amp_dtype(self.device, t.amp, "train.amp")
        self.channels_last = t.channels_last == "on" or (t.channels_last == "auto" and self.device.type == "cuda")
        self.ckpt_path = self.out / CHECKPOINT_FILE
        self.resume_state: dict[str, Any] | None = None
        if self.ckpt_path.exists() and not resume:
            raise UserError(f"'{self.out}' already holds a training run ({CHECKPOINT_FILE})",
                            fix="pass --resume to continue it, or choose another --out")
        if resume and not self.ckpt_path.exists():
            # a pipeline's retry resumes a stage that may have failed before its first checkpoint: not an error
            console.print(f"note: --resume: '{self.out}' holds no {CHECKPOINT_FILE} yet; starting at step 0")
        if resume and self.ckpt_path.exists():
            self._check_resume_config()
            self.resume_state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
            if self.resume_state.get("format") != CHECKPOINT_FORMAT:
                raise UserError(f"'{self.ckpt_path}' is not a segfactory fine-tuning checkpoint",
                                fix="choose another --out")
            saved_ws = int(self.resume_state.get("world_size", 1))
            if saved_ws != self.info.world_size:
                console.print(f"note: {CHECKPOINT_FILE} was written by a run of {saved_ws} process(es), this one "
                              f"has {self.info.world_size}: the global batch, data order, augmentations and schedule "
                              "continue unchanged; results match an uninterrupted run up to floating-point "
                              "reduction order")

        self.targets: TargetClasses = resolve_targets(cfg)
        if self.targets.num_classes > 255:
            raise UserError(f"{self.targets.num_classes} classes do not fit uint8 masks", fix="use at most 255 classes")
        self.train_sources, self.val_sources = open_training_sources(cfg, self.targets)

        enc_meta = None
        timm_name = cfg.model.encoder
        c = cfg.model.in_chans or 3
        if cfg.model.encoder_dir is not None:
            enc_meta = read_encoder_meta(cfg.model.encoder_dir)
            c = cfg.model.in_chans or int(enc_meta["in_chans"])
            timm_name = check_encoder_fits(enc_meta, Path(cfg.model.encoder_dir), cfg.model.encoder, c)
        self.in_chans = c
        if timm_name is None:
            raise UserError("model.encoder is not set and no pretrained encoder was given",
                            fix="pass --encoder DIR (from `segfactory pretrain`) or set model.encoder=resnet18")
        self.arch = {"arch": cfg.model.arch, "encoder": timm_name, "in_chans": c,
                     "num_classes": self.targets.num_classes, "decoder_channels": cfg.model.decoder_channels}
        self.things = self._thing_targets()
        self._object_px: dict[str, float] | None = None  # the thing classes' sizes (_cleanup), measured once
        if cfg.instances.enabled:
            if not self.things:
                names = ", ".join(str(s.path) for s in self.train_sources)
                raise UserError(f"instances.enabled=true but no training source has a thing class ({names})",
                                fix="train on a dataset whose classes mark objects with \"thing\": true, or set "
                                    "instances.enabled=false")
            self.arch["instance_channels"] = 1
        # Module init draws from torch's global RNG; fork it so the seed decides the init and nothing leaks.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(t.seed)
            self.model = build_model(self.arch)
        self.lineage_encoder = {"init": "random", "seed": t.seed}
        if cfg.model.encoder_dir is not None:
            self.lineage_encoder = load_pretrained_encoder(self.model, cfg.model.encoder_dir)
        norm = (enc_meta or {}).get("normalization", {})
        mean = cfg.input.mean or norm.get("mean") or [DEFAULT_MEAN] * c
        std = cfg.input.std or norm.get("std") or [DEFAULT_STD] * c
        for name, v in (("mean", mean), ("std", std)):
            if len(v) != c:
                raise UserError(f"input.{name} has {len(v)} values for {c} input channel(s)",
                                fix=f"give {c} value(s) or leave input.{name} unset")
        self.input_spec = {"in_chans": c, "scaling": cfg.input.scaling, "mean": [float(v) for v in mean],
                           "std": [float(v) for v in std],
                           # input.scale=auto: 1 until estimated at the end of the source-only phase
                           "scale": 1.0 if cfg.input.scale == "auto" else float(cfg.input.scale)}
        if self.info.distributed:  # BatchNorm over the global batch
            self.model = distributed.convert_sync_batchnorm(self.model, self.device)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # train.compile: only the training forward goes through the compiled wrapper; it shares the parameters
        # of self.model, which stays the module that is checkpointed, validated and exported (no `_orig_mod.`).
        self.train_model: nn.Module = torch.compile(self.model) if t.compile else self.model  # type: ignore[assignment]
        self.rare = self._build_rare()
        self._build_loss()
        self._build_optimizer()
        self.adapt = self._build_adapt()

    def _thing_targets(self) -> list[int]:
        """Target ids of the classes marked ``thing`` in the synthetic training datasets and in the class tables
        of real training folders that have instance masks."""
        from finetune.config import SourceSpec
        from finetune.data.sources import real_class_table
        from segfactory.formats.dataset import open_dataset

        things: set[int] = set()
        for src in self.train_sources:
            if src.kind == "synthetic":
                classes = open_dataset(src.path).classes
            elif any(it.instances is not None for it in src.train):
                classes, _ = real_class_table(SourceSpec(path=src.path), src.path, self.targets)
            else:
                continue
            for c in classes:
                tid = int(src.remap.lut[int(c["id"])])
                if c.get("thing") and tid != self.targets.ignore_index:
                    things.add(tid)
        return sorted(things)

    def _build_adapt(self):
        """Domain adaptation to ``data.unlabeled`` (:class:`finetune.selftrain.SelfTraining`), or ``None``."""
        from finetune.selftrain import SelfTraining

        return SelfTraining.create(self.cfg, self.model, self.device, self.in_chans, self.input_spec,
                                   self.targets.num_classes, self.targets.ignore_index, self._synthetic_masks,
                                   sorted(self.things), info=self.info, class_names=self.targets.names)

    def _synthetic_masks(self, n: int = 64) -> list[np.ndarray]:
        """Label masks (target ids) of up to ``n`` synthetic training frames, spread over all of them."""
        items = [(s, it) for s in self.train_sources if s.kind == "synthetic" for it in s.train]
        step = max(1, len(items) // n)
        return [s.load(it)[1] for s, it in items[::step][:n]]

    def _cleanup(self) -> dict[str, Any] | None:
        """model.json's ``cleanup`` (:mod:`finetune.cleanup`): the thing classes' object sizes in the rendered
        training labels (measured once) and ``predict.min_object``; ``None`` without rendered thing objects."""
        if self._object_px is None:
            from finetune.cleanup import SAMPLE_FRAMES, object_sizes
            from finetune.scale import training_zoom

            aug = self.cfg.augment
            window = getattr(self, "_window", None) or aug.crop_size
            zoom = training_zoom(aug.crop_size, window, aug.scale, aug.zoom) if aug.enabled else 1.0
            self._object_px = object_sizes(self._synthetic_masks(SAMPLE_FRAMES), sorted(self.things), zoom) \
                if self.things else {}
        from finetune.cleanup import cleanup_spec

        return cleanup_spec(self.cfg.predict.min_object, self._object_px)

    def _check_resume_config(self) -> None:
        change = config_change(self.out, self.cfg)
        if change is not None:
            raise UserError(f"--resume with a different config: {change}",
                            fix=f"resume with the run's own config ({self.out / 'config.yaml'}) or start a new --out")

    def _build_loss(self) -> None:
        from segmentation_models_pytorch.losses import DiceLoss

        lc = self.cfg.train.loss
        k = self.targets.num_classes
        weights = None
        if isinstance(lc.class_weights, list):
            if len(lc.class_weights) != k:
                raise UserError(f"train.loss.class_weights has {len(lc.class_weights)} values for {k} classes",
                                fix=f"give {k} weights ({', '.join(self.targets.names)}) or use auto")
            weights = torch.tensor(lc.class_weights, dtype=torch.float32)
        elif lc.class_weights == "auto" and any(plan.frames == "by_class" for plan in self.rare.values()):
            # Rare class sampling draws the frames by class: weigh the classes by what training sees, the windows
            # it draws, not by the frames (on the street demo the frames' weights turned the CCTV walkers into
            # pole_sign and vehicle; docs/street.md "Rare class sampling"). With `frames: shuffled` the frames are those
            # counted below and the windows' focus moved the weights by under 10 % there: they stay.
            counts = drawn_class_counts(self.train_sources, self._sampler(0, self.cfg.train.steps),
                                        self._train_window(), self.cfg.train.seed, k, self.targets.ignore_index,
                                        real_scale=float(self.input_spec["scale"]))
            weights = torch.from_numpy(class_weights_from_counts(counts))
            if self.info.is_main:
                console.print("class weights (auto, over the first 256 windows rare class sampling draws): "
                              + ", ".join(f"{n} {w:.2f}" for n, w in zip(self.targets.names, weights.tolist(),
                                                                         strict=True)), soft_wrap=True)
        elif lc.class_weights == "auto":
            weights = torch.from_numpy(auto_class_weights(self.train_sources, k))
        self.class_weights = weights
        self.ce = nn.CrossEntropyLoss(weight=None if weights is None else weights.to(self.device),
                                      ignore_index=self.targets.ignore_index)
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=self.targets.ignore_index)

    def _build_optimizer(self) -> None:
        t = self.cfg.train
        enc_ids = {id(p) for p in self.model.encoder.parameters()}
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for p in self.model.parameters():
            # No weight decay on norms and biases (1-D): it only fights the normalisation.
            groups.setdefault((id(p) in enc_ids, p.ndim <= 1), []).append(p)
        param_groups = []
        for (is_enc, no_wd), params in sorted(groups.items()):
            lr = t.lr * (t.encoder_lr_mult if is_enc else 1.0)
            param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_wd else t.weight_decay})
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups, lr=t.lr, fused=fused)
        self.scheduler = warmup_decay(self.optimizer, t.steps, t.warmup_steps, t.schedule, t.poly_power,
                                      t.min_lr_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast == torch.float16)

    # ------------------------------------------------------------------ helpers
    def _set_frozen(self, frozen: bool) -> None:
        for p in self.model.encoder.parameters():
            p.requires_grad_(not frozen)

    def _metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _log(self, record: dict[str, Any]) -> None:
        if not self.info.is_main:
            return
        with open(self._metrics_path(), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.tracker.log_metrics(record)

    def _save_checkpoint(self, step: int) -> None:
        if not self.info.is_main:  # every rank holds the same state; rank 0 writes it
            return
        check_finite_weights(self.model, f"the checkpoint at step {step}", DIVERGED_FIX)
        state = {"format": CHECKPOINT_FORMAT, "step": step, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(),
                 "aug_rng": self.gen.get_state(), "best_miou": self.best_miou, "best_step": self.best_step,
                 # The loss average of a log interval spans the interruption, so resumed logs match too.
                 "log_acc": [float(v) for v in self._loss_acc], "log_n": self._n_log,
                 "world_size": self.info.world_size}
        if self.adapt is not None:
            state["adapt"] = self.adapt.state_dict()
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(self.ckpt_path, buf.getvalue())

    def _save_model(self, step: int, val: dict[str, Any] | None) -> None:
        """Write ``OUT/model`` as validated at ``step``; never weights holding NaN or infinities."""
        from finetune.models import save_model_dir

        if not self.info.is_main:
            return
        model = self.inference_model(step)
        check_finite_weights(model, f"the model at step {step}", DIVERGED_FIX)
        save_model_dir(self.out / "model", model, self._model_meta(step, val, self._calibrated(model, step)))

    def _calibrated(self, model: nn.Module, step: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """With ``instances.calibrate``: the watershed's ``seed_h`` and ``min_size`` chosen on the rendered
        validation frames with their instance maps (:func:`finetune.instances.calibrate_postprocess`), and its
        report; ``None`` when off or no such frame exists."""
        ic = self.cfg.instances
        if not (ic.enabled and ic.calibrate):
            return None
        if getattr(self, "_calib_step", None) == step:
            return self._calib
        from finetune.instances import calibrate_postprocess, instance_spec
        from finetune.predict import predict_image_probs

        was_training = model.training
        model.eval()
        meta = {"input": self.input_spec}
        p, k = self.cfg.predict, self.targets.num_classes
        frames = []
        for src in self.val_sources:
            if src.kind != "synthetic":
                continue
            for it in src.val:
                img, mask = src.load(it)
                true = src.load_instances(it, mask)
                if true is None:
                    continue
                probs = predict_image_probs(model, meta, img, self.device, p.tile, p.overlap, p.batch_size,
                                            self.autocast, self.channels_last, 1.0, instances=True)
                frames.append((probs[:k].numpy().argmax(0), probs[k].numpy(), mask, true))
        model.train(was_training)
        if was_training and self._frozen:
            model.encoder.eval()
        spec = instance_spec(self.things, ic.seed_threshold, ic.min_size, ic.seed_h, ic.smooth)
        result = calibrate_postprocess(frames, spec, ignore_index=self.targets.ignore_index) if frames else None
        chosen = result[1]["chosen"] if result is not None else None
        if chosen is None:
            console.print("instances.calibrate: no rendered validation frame with objects of the thing classes; "
                          f"seed_h {ic.seed_h} and min_size {ic.min_size} kept as configured")
        else:
            assert result is not None
            console.print(f"instances.calibrate: seed_h {chosen['seed_h']}, min_size {chosen['min_size']} "
                          f"(watershed F1 {chosen['f1']:.3f} on {len(frames)} rendered validation frames, "
                          f"{result[1]['objects']} objects)")
        peak = result[1].get("peak_distance") if result is not None else None
        if peak is not None and peak <= ic.seed_threshold:
            console.print(f"[yellow]instances: the head's distance map stays at or below instances.seed_threshold "
                          f"{ic.seed_threshold} on every rendered validation frame (peak {peak:.2f}): no seeds, so "
                          "the watershed splits nothing and its instances are the connected components; train "
                          "longer or on larger crops (or lower instances.seed_threshold)[/yellow]")
        self._calib_step, self._calib = step, result
        return result

    def _train_window(self) -> int:
        """The CPU window cut from each training frame (``data.load_size``, default from the crop and zoom)."""
        cfg = self.cfg
        return cfg.data.load_size or default_window(cfg.augment.crop_size, cfg.augment.zoom)

    def _sampler(self, start: int, end: int, rank: int = 0, world_size: int = 1) -> MixedBatchSampler:
        """The training's batch sampler over steps ``start..end-1`` (this rank's slots of the global batch)."""
        t = self.cfg.train
        return MixedBatchSampler([len(s.train) for s in self.train_sources], [s.weight for s in self.train_sources],
                                 t.batch_size, t.seed, start, end, rank, world_size, self.rare)

    def _build_rare(self) -> dict[int, RareClasses]:
        """``data.rcs``: each synthetic source's rare class sampling plan (empty when off), printed once."""
        rcs = self.cfg.data.rcs
        if rcs is None:
            return {}
        t0 = time.perf_counter()
        plans = rare_class_plans(self.train_sources, rcs, self.targets.names)
        if self.info.is_main:
            names = self.targets.names
            for i, plan in plans.items():
                share = f" in {rcs.share:.0%} of the slots" if rcs.share < 1 else ""  # below 1 only by_class
                console.print(f"rare class sampling (T={rcs.temperature:g}, frames {rcs.frames}{share}) of "
                              f"{self.train_sources[i].name}, "
                              f"{len(self.train_sources[i].train)} frames ({time.perf_counter() - t0:.1f} s):",
                              soft_wrap=True)
                console.print(f"  {'class':<16} {'drawn':>6} {'pixels':>6} {'frames':>6}")
                for c, p, f, it in sorted(zip(plan.classes, plan.prob, plan.freq, plan.items, strict=True),
                                          key=lambda r: -r[1]):
                    console.print(f"  {names[c]:<16} {p:6.1%} {f:6.1%} {len(it):6d}")
        return plans

    def _model_meta(self, step: int, val: dict[str, Any] | None,
                    calibrated: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
        from finetune.models import model_meta

        training = {"run": str(self.out), "step": step, "steps": self.cfg.train.steps, "seed": self.cfg.train.seed,
                    "config_hash": hash_config(self.cfg), "val": _val_brief(val),
                    "sources": [s.describe() for s in self.train_sources]}
        if self.adapt is not None:
            training["adapt"] = self.adapt.describe()
        if self.rare:
            names = self.targets.names
            training["rcs"] = {self.train_sources[i].name: {names[c]: round(float(p), 4) for c, p in
                                                            zip(plan.classes, plan.prob, strict=True)}
                               for i, plan in self.rare.items()}
        inst = None
        if self.cfg.instances.enabled:
            from finetune.instances import instance_spec

            ic = self.cfg.instances
            inst = instance_spec(self.things, ic.seed_threshold, ic.min_size, ic.seed_h, ic.smooth)
            if calibrated is not None:
                inst = {**calibrated[0], "calibration": calibrated[1]}
        predict_spec = {k: v for k, v in self.cfg.predict.model_dump().items() if k != "min_object"}
        return model_meta(self.arch, self.targets.to_json(), self.targets.ignore_index, self.input_spec,
                          predict_spec, {"encoder": self.lineage_encoder, "training": training}, inst,
                          self._cleanup())

    def inference_model(self, step: int) -> nn.Module:
        """The model as validated and saved at ``step``: the training model, or with adaptation's BatchNorm
        recalibration on real crops (``adapt.recalibrate_bn``) a recalibrated copy (made once per step)."""
        if self.adapt is None or not self.adapt.recalibrates:
            return self.model
        if getattr(self, "_infer_step", None) != step:
            self._infer = self.adapt.recalibrated(self.model, self.cfg.augment.crop_size, autocast=self.autocast)
            self._infer_step = step
        return self._infer

    def validate(self, step: int = -1) -> dict[str, Any] | None:
        """Per-source metrics on the validation items; ``None`` without validation data."""
        from finetune.evaluate import source_confusion, summarize

        if not self.val_sources:
            return None
        was_training = self.model.training
        model = self.inference_model(step)
        model.eval()
        meta = {"num_classes": self.targets.num_classes, "ignore_index": self.targets.ignore_index,
                "input": self.input_spec}
        p = self.cfg.predict
        # data-parallel: each rank scores every world_size-th frame; the confusion matrices are summed over ranks
        r, w = self.info.rank, self.info.world_size
        cms = {s.name: source_confusion(model, meta, s, s.val[r::w], self.device, p.tile, p.overlap, p.batch_size,
                                        self.autocast, self.channels_last) for s in self.val_sources}
        if self.info.distributed:
            names = list(cms)
            total = distributed.all_sum(torch.from_numpy(np.stack([cms[n] for n in names])).to(self._dist_device),
                                        self.info).cpu().numpy()
            cms = {n: total[i] for i, n in enumerate(names)}
        self.model.train(was_training)
        if was_training and self._frozen:
            self.model.encoder.eval()
        report = summarize(cms, {s.name: s.kind for s in self.val_sources}, self.targets.names,
                           {s.name: s.remap.labeled(self.targets.ignore_index) for s in self.val_sources})
        sel = self.cfg.train.select_on
        pick = report["by_kind"].get(sel) if sel != "all" else None
        report["selected"] = (pick or report["overall"])["miou"]
        return report

    # ------------------------------------------------------------------ loop
    def run(self) -> dict[str, Any]:
        from finetune.augment import GpuAugment

        cfg, t = self.cfg, self.cfg.train
        out = self.out
        main = self.info.is_main
        if main:
            save_resolved(cfg, out / "config.yaml")
            atomic_write_json(out / "data.json", {"classes": self.targets.to_json(),
                                                  "train": [s.describe() for s in self.train_sources],
                                                  "val": [s.describe() for s in self.val_sources]})
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(t.seed)
        self.best_miou, self.best_step = -1.0, -1
        start = 0
        if self.resume_state is not None:
            st = self.resume_state
            self.model.load_state_dict(st["model"])
            self.optimizer.load_state_dict(st["optimizer"])
            start = int(st["step"])
            if "scheduler" in st:
                self.scheduler.load_state_dict(st["scheduler"])
            else:  # a checkpoint from before the scheduler was saved: the schedule is a function of the step
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()"
                    for _ in range(start):
                        self.scheduler.step()
            self.scaler.load_state_dict(st["scaler"])
            self.gen.set_state(st["aug_rng"])
            self.best_miou, self.best_step = float(st["best_miou"]), int(st["best_step"])
            if self.adapt is not None:
                self.adapt.load_state_dict(st["adapt"])
            if main:
                truncate_jsonl(self._metrics_path(), start)
            console.print(f"resuming {out} at step {start}/{t.steps}")
        elif main and self._metrics_path().exists():
            self._metrics_path().unlink()
        end = min(t.steps, t.stop_at) if t.stop_at else t.steps
        summary_path = out / "summary.json"
        if start >= t.steps and summary_path.exists():
            console.print(f"{out} already finished {t.steps} steps")
            return read_json(summary_path) if main else {}
        self.tracker = open_tracker(cfg.tracking, out, start if self.resume_state is not None else None)
        self.tracker.log_params(cfg.model_dump(mode="json"))

        window = self._train_window()
        self._window, self._end = window, end
        dataset = WindowDataset(self.train_sources, window, self.in_chans, cfg.input.scaling, t.seed,
                                self.targets.ignore_index, real_scale=float(self.input_spec["scale"]),
                                instances=cfg.instances.enabled)
        sampler = self._sampler(start, end, self.info.rank, self.info.world_size)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=cfg.data.num_workers,
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=4 if cfg.data.num_workers else None,
                                             multiprocessing_context=loader_context(cfg.data.num_workers))
        augment = GpuAugment(cfg.augment, self.targets.ignore_index)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model.train()
        self._frozen = start < cfg.model.freeze_encoder_steps
        self._set_frozen(self._frozen)
        if self._frozen:
            self.model.encoder.eval()  # frozen encoder keeps its BatchNorm statistics too
        self._wrap_ddp()
        if self.info.distributed:
            console.print(f"finetune: {self.info.world_size} processes ({self.info.backend}), global batch "
                          f"{t.batch_size} ({t.batch_size // self.info.world_size} per process)")

        step = start
        t_run = time.perf_counter()
        t_log = time.perf_counter()
        self._loss_acc, self._n_log = np.zeros(3), 0
        if self.resume_state is not None and "log_acc" in self.resume_state:
            self._loss_acc = np.asarray(self.resume_state["log_acc"], np.float64)
            self._n_log = int(self.resume_state["log_n"])
        n_timed = 0
        last_val: dict[str, Any] | None = None
        keep_best = t.keep_best
        if self.adapt is not None and self.adapt.self_training and not any(s.kind == "real" for s in self.val_sources):
            # Synthetic validation scores do not follow the adaptation to real images (they would pick a
            # source-only model): without real validation labels the final model is kept, as DAFormer does.
            keep_best = False
            console.print("self-training without real validation labels: the final model is kept (train.keep_best "
                          "applies to real validation mIoU only)")
        saved = start  # the step of the newest checkpoint
        interrupt = DeferredInterrupt(lambda sig: console.print(
            f"{sig}: stopping after this step with a checkpoint (a second Ctrl-C stops at once, without one)"))
        lower = (f"train.batch_size ({t.batch_size}), augment.crop_size ({cfg.augment.crop_size}) or, for "
                 f"validation, predict.tile ({cfg.predict.tile}) and predict.batch_size ({cfg.predict.batch_size})")
        with progress(transient=not self.show_progress) as bar, interrupt, memory_hint("fine-tuning", lower):
            task = bar.add_task("finetune", total=t.steps, completed=start)
            for batch in loader:
                distributed.exit_hook(self.info, step)
                # at a step boundary: the state is exactly that after `step` steps (all ranks stop together)
                if distributed.any_rank(bool(interrupt.requested), self.info):
                    if step > saved:
                        self._save_checkpoint(step)
                        console.print(f"checkpoint at step {step} saved; --resume continues")
                    raise interrupt.stop()
                raise_if_error(batch)
                if self._frozen and step >= cfg.model.freeze_encoder_steps:
                    self._frozen = False
                    self._set_frozen(False)
                    self.model.encoder.train()
                    self._wrap_ddp()  # DDP syncs the parameters that required gradients when it was built
                if self.adapt is not None and self.adapt.scale_auto and step == cfg.adapt.warmup_steps \
                        and self.adapt.scale_report is None:
                    p = cfg.predict
                    rep = self.adapt.estimate_scale(self.model, p.tile, p.overlap, p.batch_size, self.autocast,
                                                    self.channels_last, cfg.augment.crop_size, self._window)
                    console.print(scale_summary(rep), soft_wrap=True)
                    self._log({"step": step, "input_scale": rep})
                losses = self._train_step(batch, augment, step)
                if losses is not None:  # None: a non-finite loss skipped (train.max_bad_steps)
                    self._loss_acc += losses
                    self._n_log += 1
                n_timed += 1
                step += 1
                bar.update(task, advance=1, description=f"finetune loss {np.nan if losses is None else losses[0]:.3f}")
                if step % t.log_every == 0 or step == t.steps:
                    dt = time.perf_counter() - t_log
                    lr = self._lr
                    mean = self._loss_acc / max(self._n_log, 1)
                    self._log({"step": step, "loss": round(float(mean[0]), 6), "ce": round(float(mean[1]), 6),
                               "dice": round(float(mean[2]), 6), "lr": lr,
                               "images_per_s": round(n_timed * t.batch_size / dt, 2),
                               **({"instance_loss": round(float(self._inst_loss.detach()), 6)}
                                  if cfg.instances.enabled else {}),
                               **(self.adapt.log_fields() if self.adapt is not None else {})})
                    t_log, n_timed = time.perf_counter(), 0
                    self._loss_acc, self._n_log = np.zeros(3), 0
                if step % t.val_every == 0 or step == t.steps:
                    last_val = self.validate(step)
                    if last_val is not None:
                        self._log({"step": step, "val": _val_brief(last_val)})
                        sel = last_val["selected"]
                        if keep_best and sel is not None and sel > self.best_miou:
                            self.best_miou, self.best_step = float(sel), step
                            self._save_model(step, last_val)
                    self._write_curves()
                if step % t.checkpoint_every == 0 or step == end:
                    self._save_checkpoint(step)
                    saved = step
        seconds = time.perf_counter() - t_run
        if not main:  # rank 0 writes the model and the summary
            return {}
        if step < t.steps:
            console.print(f"stopped at step {step}/{t.steps} (train.stop_at); continue with --resume")
            self.tracker.close("KILLED")  # paused: --resume continues the same MLflow run
            return {"finished": False, "step": step, "steps": t.steps, "out": str(out)}
        model_step = self.best_step
        if not keep_best or self.best_step < 0:
            # No validation data (or keep_best off): the final weights are the model.
            self._save_model(step, last_val)
            model_step = step
        self._write_curves()
        summary = {"finished": True, "steps": t.steps, "model_dir": str(out / "model"), "model_step": model_step,
                   "best_val_miou": None if self.best_miou < 0 else round(self.best_miou, 6),
                   "final_val": _val_brief(last_val), "seconds_this_run": round(seconds, 2),
                   "images_per_s_this_run": round((step - start) * t.batch_size / max(seconds, 1e-9), 2),
                   "device": str(self.device), "amp": str(self.autocast).replace("torch.", "") if self.autocast
                   else "off", "channels_last": self.channels_last, "compile": t.compile,
                   "cpu_threads": torch.get_num_threads(), "encoder": self.lineage_encoder,
                   "train_items": {s.name: len(s.train) for s in self.train_sources},
                   "val_items": {s.name: len(s.val) for s in self.val_sources}}
        if self.adapt is not None:
            summary["adapt"] = self.adapt.describe()
        self.tracker.log_artifact(out / "model", "model")
        self.tracker.log_summary(summary)
        self.tracker.close()
        if self.tracker.errors:
            summary["tracking_errors"] = self.tracker.errors
        atomic_write_json(summary_path, summary)
        print_summary(summary)
        return summary

    def _train_step(self, batch: dict, augment, step: int) -> np.ndarray | None:
        """One optimizer step; returns ``[loss, ce, dice]``, or None for a non-finite loss that was skipped."""
        t = self.cfg.train
        x = batch["image"].to(self.device, non_blocking=True)
        y = batch["mask"].to(self.device, non_blocking=True)
        inst = batch.get("instance")
        # the same draws as augment(x, y, gen); data-parallel: this rank's rows of the global batch's parameters
        b, r = x.shape[0], self.info.rank
        params = augment.sample_rows(b * self.info.world_size, r * b, (r + 1) * b, self.gen)
        window = x.shape[-1]
        x, y = augment.apply(x, y, params)
        if inst is not None:  # the instance map is warped like the class map
            inst = augment.warp_ids(inst.to(self.device), params, window)
        adapting = self.adapt is not None and self.adapt.needs_real(step)
        if adapting:
            real, valid = self.adapt.real_batch(step, self._window, self._end)
            real, valid = self.adapt.weak(real, valid, augment.geometric)
            x = self.adapt.align_source(x, real)
        x_unit = x
        x = standardize(x, self.input_spec["mean"], self.input_spec["std"])
        with frozen_bn_stats(self.model, adapting and self.adapt.active(step) and self.cfg.adapt.bn_stats == "mixed"):
            logits = self._forward(x, step, instances=inst is not None)
        if inst is not None:
            logits, dist_logit = logits
        if self.info.distributed:  # the global batch's losses (values and gradients)
            w = None if self.class_weights is None else self.class_weights.to(self.device)
            ce, dice = global_losses(logits, y, w, self.targets.ignore_index, self.info)
            ce = ce if t.loss.ce_weight else logits.new_zeros(())
            dice = dice if t.loss.dice_weight else logits.new_zeros(())
        else:
            ce = self.ce(logits, y) if t.loss.ce_weight else logits.new_zeros(())
            dice = self.dice(logits, y) if t.loss.dice_weight else logits.new_zeros(())
        if not torch.isfinite(ce):  # every pixel ignored: CE is 0/0
            ce = logits.sum() * 0
        loss = t.loss.ce_weight * ce + t.loss.dice_weight * dice
        if inst is not None:
            from finetune.instances import batch_targets, instance_loss

            target, known = batch_targets(inst, y, self.things, self.targets.ignore_index)
            if self.info.distributed:  # the global batch's mean BCE: sums over ranks, as global_losses does
                bce = nn.functional.binary_cross_entropy_with_logits(dist_logit.float(), target, reduction="none")
                sums = distributed.all_sum_grad(torch.stack([(bce * known).sum(), known.sum().to(bce.dtype)]),
                                                self.info)
                self._inst_loss = sums[0] / sums[1] if float(sums[1].detach()) > 0 else sums[0] * 0
            else:
                self._inst_loss = instance_loss(dist_logit, target, known)
            loss = loss + self.cfg.instances.weight * self._inst_loss
        self.optimizer.zero_grad(set_to_none=True)
        if not self.loss_guard.check(loss, step):  # data-parallel: the global loss, so every rank skips
            if self.ddp is not None:  # DDP expects the backward of each forward; its gradients are dropped
                (loss * 0).backward()
            return self._skip_step()
        self.scaler.scale(loss).backward()
        if adapting and self.adapt.active(step):
            # A second backward into the same gradients (DAFormer's order): the source graph is freed first.
            both = self.adapt.instance_pseudo  # adapt.instance_pseudo: the distance head learns there too
            st = self.adapt.loss(step, self.model, x_unit, y, real, valid,
                                 lambda z: self._forward(z, step, 1, instances=both), self.autocast,
                                 self.channels_last, src_dist=(target, known) if both else None)
            if not self.loss_guard.check(st, step):  # data-parallel: the global loss, so every rank skips
                if self.ddp is not None:  # the second forward went through DDP too
                    (st * 0).backward()
                return self._skip_step()
            self.scaler.scale(self.cfg.adapt.weight * st).backward()
            loss = loss.detach() + self.cfg.adapt.weight * st.detach()
            if self.adapt.mic:
                # Masked Image Consistency: a third backward, on masked real crops (class logits). Masked batches
                # never occur at inference: they normalise with their own statistics but leave the running ones alone.
                with frozen_bn_stats(self.model):
                    mic = self.adapt.mic_loss(lambda z: self._forward(z, step, 2))
                if not self.loss_guard.check(mic, step):  # data-parallel: the global loss, so every rank skips
                    if self.ddp is not None:
                        (mic * 0).backward()
                    return self._skip_step()
                w = self.cfg.adapt.weight * self.cfg.adapt.mic_weight
                self.scaler.scale(w * mic).backward()
                loss = loss + w * mic.detach()
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._lr = self.optimizer.param_groups[-1]["lr"]  # the rate this step used (logged)
        self.scheduler.step()
        return np.array([loss.item(), float(ce.detach()), float(dice.detach())])

    def _skip_step(self) -> None:
        """Drop a bad step's gradients; the schedule still advances, so it stays a function of the step."""
        self.optimizer.zero_grad(set_to_none=True)
        self._lr = self.optimizer.param_groups[-1]["lr"]
        self.scheduler.step()

    def _forward(self, x: torch.Tensor, step: int, salt: int = 0, instances: bool = False) -> Any:
        """Float logits of the model on a standardised batch (channels_last and autocast as configured); with
        ``instances`` the pair (class logits, distance logits) of :func:`finetune.instances.forward_both`."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        # Dropout (FPN, DeepLabV3+) and stochastic depth draw from torch's global RNG of the training device.
        # Seeding a forked copy per step makes them a function of (seed, step): same seed, same run, and a
        # resumed run is exact, while the caller's global RNG is left untouched. Backward reuses the saved masks.
        cuda = self.device.type == "cuda"
        index = (self.device.index if self.device.index is not None else torch.cuda.current_device()) if cuda else None
        with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
            s = dropout_seed(self.cfg.train.seed, step, salt, self.info.rank)
            torch.default_generator.manual_seed(s)
            if cuda:  # this device only (CUDA is initialised: the model is on it); fork_rng restores just this one
                torch.cuda.default_generators[index].manual_seed(s)
            with ctx:
                if instances:
                    from finetune.instances import forward_both

                    # data-parallel: through DDP around JointOutputs (see _wrap_ddp)
                    logits, dist = self.train_model(x) if self.ddp is not None else forward_both(self.model, x)
                    return logits.float(), dist.float()
                if self.ddp is not None and self.cfg.instances.enabled:
                    # DDP wraps JointOutputs, which returns both heads; a forward whose loss uses the class logits
                    # only (self-training without adapt.instance_pseudo) gives the distance head a zero gradient,
                    # so DDP's reducer sees every parameter of the forward used
                    logits, dist = self.train_model(x)
                    return (logits + dist.sum() * 0).float()
                logits = self.train_model(x)
        return logits.float()

    def _wrap_ddp(self) -> None:
        """Data-parallel: (re)wrap the model in DDP, which all-reduces the gradients of the parameters that
        require them when it is built (so again after the encoder is unfrozen); the training forward runs
        through it (compiled with ``train.compile``). Checkpoints, validation and export use ``self.model``."""
        if not self.info.distributed:
            return
        dev = self.device
        module = self.model
        self.release_distributed()  # the frozen-encoder wrapper goes before the new one is built
        if self.cfg.instances.enabled:  # one forward for both heads (forward_both), so DDP sees every parameter
            from finetune.instances import JointOutputs

            module = JointOutputs(self.model)
        self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda"
                                                       else None, broadcast_buffers=False)
        self.train_model = torch.compile(self.ddp) if self.cfg.train.compile else self.ddp  # type: ignore[assignment]

    def release_distributed(self) -> None:
        """Drop the DDP wrapper (it holds the process group; see :func:`segfactory.distributed.teardown`)."""
        if self.ddp is not None:
            self.ddp = None
            self.train_model = self.model
            gc.collect()

    @property
    def _dist_device(self) -> torch.device:
        """Where collectives' tensors live: the GPU with nccl, the CPU with gloo."""
        return self.device if self.info.backend == "nccl" else torch.device("cpu")

    def _write_curves(self) -> None:
        if not self.info.is_main:
            return
        path = self._metrics_path()
        if path.exists():
            atomic_write_bytes(self.out / "curves.png", plot_curves(read_jsonl(path)))


def default_window(crop_size: int, zoom: tuple[float, float] | None) -> int:
    """CPU window side: the crop size, or enough for the widest zoomed-out crop (a multiple of 32)."""
    if zoom is None or zoom[0] >= 1:
        return crop_size
    return int(math.ceil(crop_size / zoom[0] / 32) * 32)


def auto_class_weights(sources: list[Source], num_classes: int, max_masks: int = 256) -> np.ndarray:
    """(K,) CE weights ∝ 1/sqrt(pixel frequency) over up to ``max_masks`` training masks, mean 1."""
    counts = np.zeros(num_classes, np.float64)
    per = max(1, max_masks // max(1, len(sources)))
    for src in sources:
        step = max(1, len(src.train) // per)
        counts += src.class_counts(src.train[::step][:per], num_classes).sum(axis=0)
    return class_weights_from_counts(counts)


def class_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """(K,) CE weights ∝ 1/sqrt(pixel frequency) of (K,) class pixel counts (frequencies floored at 1e-4),
    mean 1: ``train.loss.class_weights=auto``."""
    freq = counts / max(float(counts.sum()), 1.0)
    w = 1 / np.sqrt(np.maximum(freq, 1e-4))
    return (w / w.mean()).astype(np.float32)


def _val_brief(val: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validation record without confusion matrices (those go to `segfactory evaluate`)."""
    if val is None:
        return None

    def brief(m: dict[str, Any]) -> dict[str, Any]:
        return {"miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"],
                "per_class_iou": {n: c["iou"] for n, c in m["per_class"].items()}}

    return {"selected_miou": val["selected"], "overall": brief(val["overall"]),
            "by_kind": {k: brief(m) for k, m in val["by_kind"].items()},
            "sources": {k: brief(m) for k, m in val["sources"].items()}}


def plot_curves(records: list[dict[str, Any]]) -> bytes:
    """PNG bytes: training loss (left) and validation mIoU per data kind (right) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    tr = [r for r in records if "loss" in r]
    if tr:
        a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="total")
        a.plot([r["step"] for r in tr], [r["ce"] for r in tr], label="cross-entropy", alpha=0.7)
        a.plot([r["step"] for r in tr], [r["dice"] for r in tr], label="dice", alpha=0.7)
        a.legend()
    a.set_xlabel("step")
    a.set_title("training loss")
    va = [r for r in records if r.get("val")]
    series: dict[str, list[tuple[int, float]]] = {}
    for r in va:
        for kind, m in r["val"]["by_kind"].items():
            if m["miou"] is not None:
                series.setdefault(kind, []).append((r["step"], m["miou"]))
    for kind, pts in series.items():
        b.plot(*zip(*pts, strict=True), marker="o", label=f"{kind} val mIoU")
    if series:
        b.legend()
    b.set_ylim(0, 1)
    b.set_xlabel("step")
    b.set_title("validation mIoU")
    fig.tight_layout()
    return figure_png(fig)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="fine-tuning finished", show_header=False)
    table.add_row("steps", str(summary["steps"]))
    table.add_row("model", f"{summary['model_dir']} (step {summary['model_step']})")
    table.add_row("best val mIoU", "-" if summary["best_val_miou"] is None else f"{summary['best_val_miou']:.4f}")
    fv = summary.get("final_val") or {}
    for kind, m in (fv.get("by_kind") or {}).items():
        table.add_row(f"final {kind} mIoU", "-" if m["miou"] is None else f"{m['miou']:.4f}")
    table.add_row("time (this run)", f"{summary['seconds_this_run']:.1f} s, {summary['images_per_s_this_run']} img/s")
    table.add_row("device", f"{summary['device']} (amp {summary['amp']}, channels_last {summary['channels_last']}"
                  f"{', compiled' if summary.get('compile') else ''}, {summary.get('cpu_threads')} CPU threads)")
    table.add_row("encoder", str(summary["encoder"].get("init")))
    console.print(table)


def lock_run_dir(out: Path) -> AbstractContextManager[None]:
    """The run lock of ``OUT`` (:func:`segfactory.lock.run_dir_lock`): a second fine-tune into it stops with exit 4.
    The CLI takes it before it re-runs itself under torchrun; :func:`run_finetune` takes it otherwise."""
    return run_dir_lock(out, "finetune", fix="wait for it to finish (--resume then continues it), or use another "
                        "--out")


def run_finetune(cfg: FinetuneConfig, out_dir: str | Path, resume: bool = False,
                 show_progress: bool = True) -> dict[str, Any]:
    """Train a segmentation model, holding ``OUT``'s run lock (:func:`lock_run_dir`); see the module docstring for
    the output layout.

    Returns:
        The summary (also ``OUT/summary.json`` when finished).

    Raises:
        UserError: exit code 4 while another fine-tune writes ``OUT``.
    """
    out = ensure_writable_dir(out_dir)
    with lock_run_dir(out):
        trainer = Trainer(cfg, out, show_progress)
        try:
            trainer.prepare(resume)
            return trainer.run()
        finally:
            console.quiet = False
            trainer.release_distributed()
            distributed.teardown()
