"""Typed configs of the fine-tuning stage (``configs/finetune*.yaml``).

Only plain pydantic here (no torch), so configs validate instantly and ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from finetune.archs import ARCHS, DecoderWidthError
from segfactory.config import DistributedTrainFields, StrictModel, UnsaidDefaults
from segfactory.errors import UserError
from segfactory.tracking import TrackingConfig

IGNORE_INDEX = 255
# Encoders reduce by 32; every input side the model sees is padded to a multiple of this.
SIZE_DIVISOR = 32

ClassKey = int | str
# The object size input.scale=auto matches: the median equivalent diameter over components, or over pixels.
ScaleBy = Literal["count", "area"]
# Test-time augmentation modes of predict/evaluate (:mod:`finetune.adapt`: dihedral ``flip``/``d4``, multi-scale
# ``ms``/``ms_flip``).
TtaMode = Literal["none", "flip", "d4", "ms", "ms_flip"]
TTA_CHOICES: tuple[str, ...] = get_args(TtaMode)


class ClassSpec(StrictModel):
    """One target class of the model."""

    id: int = Field(ge=0, le=254)
    name: str = Field(min_length=1)
    color: tuple[int, int, int] | None = None


class SourceSpec(StrictModel):
    """A training data source.

    Attributes:
        path: A segfactory dataset (synthetic) or a real labeled folder (``images/`` + ``masks/``).
        weight: Share of every batch drawn from this source (weights are normalised over all sources).
        remap: Source class (name or id) -> target class (name or id) or ``"ignore"``. Source classes not listed
            map onto the target class of the same name.
        fraction: Fraction of this source's training items used (label-efficiency sweeps); 0 drops the source.
        max_items: Upper bound on training items, applied after ``fraction``.
        on_unknown: What a mask value outside the source's class table becomes: ``error`` (names the file and
            value) or ``ignore``.
        classes: Real folders only: mask value -> class name. Default: ``DIR/classes.json``, else mask values are
            the target class ids.
        ignore_index: Real folders only: the mask value meaning "not labeled" (synthetic: from dataset.json).
        name: Label in metrics; default the folder name.
    """

    path: Path
    weight: float = Field(default=1.0, gt=0)
    remap: dict[ClassKey, ClassKey] = Field(default_factory=dict)
    fraction: float = Field(default=1.0, ge=0, le=1)
    max_items: int | None = Field(default=None, ge=1)
    on_unknown: Literal["error", "ignore"] = "error"
    classes: dict[int, str] | None = None
    ignore_index: int = Field(default=IGNORE_INDEX, ge=0, le=65535)
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, value: Any) -> Any:
        """A bare path (``data.real=[DIR]``, as ``eval.real`` takes it) is the source ``{path: DIR}``."""
        return {"path": value} if isinstance(value, str | Path) else value


class RareClassSampling(UnsaidDefaults):
    """Rare class sampling of the rendered training frames (DAFormer, Hoyer et al. 2022, ``data.rcs``).

    Each batch slot of a synthetic source first draws a class ``c`` with probability ``exp((1 - f_c) / T)``
    (normalised; ``f_c`` is the class's share of the source's labeled pixels), then a frame holding at least
    ``min_pixels`` of it, and cuts the CPU window around a random pixel of it (the random-resized crop inside the
    window then keeps it most of the time). Rare classes are seen in more crops, and with the other classes of
    the frames they occur in.

    Attributes:
        temperature: ``T``; smaller draws the rarest classes more (at DAFormer's 0.01, a class whose pixel share
            is one percentage point lower is drawn e times as often).
        classes: The classes it draws from (names of the target classes); default every class of the source
            that some frame holds ``min_pixels`` of.
        min_pixels: Pixels of a class a frame must hold to be drawn for it.
        frames: ``by_class`` (DAFormer): the class is drawn first and then a frame holding it, so frames
            without rare classes are drawn less; ``shuffled``: frames keep the source's shuffled order (each as
            often as without sampling) and only the window's class is drawn, among the classes the frame holds.
        share: With ``frames: by_class``, the share of a source's batch slots drawn by class (each slot draws
            it, ``[seed, step]``-seeded); the other slots take the next frame in the shuffled order, with the
            window's class drawn as ``shuffled`` draws it. Below 1 it keeps frames that hold no rare class
            (the street family's rooms) in training. Only with ``by_class``.
    """

    unsaid_defaults: ClassVar[dict[str, Any]] = {"share": 1.0}

    temperature: float = Field(default=0.01, gt=0)
    classes: list[str] | None = None
    min_pixels: int = Field(default=16, ge=1)
    frames: Literal["by_class", "shuffled"] = "by_class"
    share: float = Field(default=1.0, gt=0, le=1)

    @field_validator("share")
    @classmethod
    def _share_only_by_class(cls, share: float, info: ValidationInfo) -> float:
        frames = info.data.get("frames")
        if share < 1 and frames not in (None, "by_class"):
            raise PydanticCustomError(
                "share_needs_by_class", "it needs frames=by_class (with frames={frames} no frame is drawn by class)",
                {"frames": frames, "fix": "set data.rcs.frames=by_class, or remove data.rcs.share"})
        return share


class DataConfig(UnsaidDefaults):
    """Training and validation data.

    Attributes:
        synthetic: Rendered segfactory datasets.
        real: Real labeled folders.
        val: Extra validation-only sources (kind detected from the folder).
        val_fraction: Share of every training source held out for validation (the frames with the lowest
            stable hash of their name, so the split does not depend on the seed or the file order; rendered
            frames by scene: family, dataset seed and scene index, all views of a scene on one side).
        val_max_items: Cap on validation frames per source (validation cost).
        load_size: Side of the window cut on the CPU from each image (padded when the image is smaller); the
            GPU random-resized-crop then picks the training crop inside it. Default: ``augment.crop_size``.
        num_workers: CPU loader processes (decoding and cropping only; augmentation runs on the device).
        unlabeled: Unlabeled real images for domain adaptation: output directories of ``segfactory ingest``
            (see the ``adapt`` section).
        rcs: Rare class sampling of the synthetic sources (:class:`RareClassSampling`); ``None`` (default):
            each source's frames in shuffled order, windows anywhere.
    """

    unsaid_defaults: ClassVar[dict[str, Any]] = {"rcs": None}

    synthetic: list[SourceSpec] = Field(default_factory=list)
    real: list[SourceSpec] = Field(default_factory=list)
    val: list[SourceSpec] = Field(default_factory=list)
    unlabeled: list[Path] = Field(default_factory=list)
    val_fraction: float = Field(default=0.1, ge=0, lt=1)
    val_max_items: int = Field(default=64, ge=1)
    load_size: int | None = Field(default=None, ge=SIZE_DIVISOR)
    num_workers: int = Field(default=2, ge=0)
    rcs: RareClassSampling | None = None


class ModelConfig(StrictModel):
    """Architecture.

    Attributes:
        arch: Decoder architecture, a name registered in :mod:`finetune.archs` (``segfactory finetune --help``).
        encoder: timm model name (used as smp ``tu-<name>``). Default: the one of ``encoder_dir``.
        encoder_dir: Pretraining output with ``encoder.safetensors`` + ``encoder.json``; none = random init.
        in_chans: Input channels the network sees (gray inputs are repeated to 3, RGB is reduced to luminance
            for 1). Default: the pretrained encoder's, else 3.
        decoder_channels: Decoder width(s); ``None`` = the smp default. Small values give tiny test models.
        freeze_encoder_steps: Train only the decoder for this many steps first (protects a pretrained encoder
            from the random decoder's early gradients), then unfreeze.
    """

    arch: Annotated[str, AfterValidator(ARCHS.validate)] = "unet"
    encoder: str | None = None
    encoder_dir: Path | None = None
    in_chans: Literal[1, 3] | None = None
    decoder_channels: list[int] | int | None = None
    freeze_encoder_steps: int = Field(default=0, ge=0)

    @field_validator("decoder_channels")
    @classmethod
    def _decoder_width_fits_the_arch(cls, v: list[int] | int | None, info: ValidationInfo) -> list[int] | int | None:
        """A width the architecture cannot take is refused when the config is read, not when the fine-tune
        stage builds its model (in ``segfactory run``, after rendering and pretraining)."""
        if v is None:
            return v
        if min([v] if isinstance(v, int) else v or [0]) < 1:
            raise PydanticCustomError("decoder_width", "{message}", {
                "message": "decoder widths are channel counts of at least 1", "fix": "e.g. 16, or null"})
        arch = info.data.get("arch")
        if arch is not None:  # an unknown arch is its own error
            try:
                ARCHS.get(arch)(v)
            except DecoderWidthError as e:
                raise PydanticCustomError("decoder_width", "{message}", {
                    "message": f"model.arch={arch} {e.reason}", "fix": e.fix}) from None
        return v


class InputConfig(UnsaidDefaults):
    """Input normalisation, identical at training and prediction time (recorded in ``model.json``).

    Attributes:
        scaling: ``auto`` (default): chosen per image from its pixel type, the rule ``segfactory ingest``
            applies for pretraining: 8-bit images are divided by 255, deeper ones (16-bit, e.g. 12-bit camera
            data with an offset, or 8-bit values in a 16-bit file) get the ``percentile`` stretch.
            ``dtype``: divide by the dtype maximum (255 or 65535); ``minmax``: stretch each image's own
            min..max to 0..1; ``percentile``: stretch its 0.5..99.5 percentiles to 0..1 and clip.
        scale: Real images (predict, evaluate, real training and unlabeled data) are resized by this factor
            before the network, so that their objects get the pixel size of the rendered ones; synthetic
            frames are always used at their rendered size. ``auto`` estimates it during fine-tuning from the
            unlabeled images (``data.unlabeled``) at the end of the source-only phase (``adapt.warmup_steps``):
            median object size of the thing classes predicted on the real images vs the synthetic labels.
        scale_by: The median object size ``input.scale=auto`` compares (recorded in ``model.json`` with
            ``object_px``, so per-image scales at prediction measure the same): ``count`` (default), the median
            equivalent diameter over the thing classes' connected components; ``area``, the area-weighted median
            (the diameter such that half of the objects' pixels lie in components of at most that diameter), for
            scenes whose components are mostly specks (the street family: distant people and pole parts), whose
            count median does not grow with the image. Unused with a numeric ``scale``.
        mean: Per-channel mean after scaling; default the encoder's (``encoder.json``) or 0.5.
        std: Per-channel std after scaling; default the encoder's or 0.25.
    """

    unsaid_defaults: ClassVar[dict[str, Any]] = {"scale_by": "count"}

    scaling: Literal["auto", "dtype", "minmax", "percentile"] = "auto"
    scale: float | Literal["auto"] = 1.0
    scale_by: ScaleBy = "count"
    mean: list[float] | None = None
    std: list[float] | None = None

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v: float | str) -> float | str:
        if isinstance(v, float | int) and not 0.05 <= v <= 20:
            raise ValueError("must be between 0.05 and 20 (or auto)")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(s <= 0 for s in v):
            raise ValueError("every std must be > 0")
        return v


class AugmentConfig(StrictModel):
    """Mask-safe augmentation run on the training device (kornia).

    Attributes:
        scale: Random-resized-crop area as a fraction of the loaded window (``data.load_size``, default the
            crop size): with the default window this only enlarges objects (by 1 to 1/sqrt(low)).
        zoom: Instead of ``scale``: the factor objects are resized by, log-uniform in ``[low, high]`` (e.g.
            ``[0.5, 2]``); below 1 the crop covers more than the window, so the window defaults to
            ``crop_size / low`` (pixels beyond the image become ignore, the image is reflected).
    """

    enabled: bool = True
    crop_size: int = Field(default=512, ge=SIZE_DIVISOR)
    scale: tuple[float, float] = (0.35, 1.0)
    zoom: tuple[float, float] | None = None
    ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.0, ge=0, le=1)
    rotate_p: float = Field(default=0.3, ge=0, le=1)
    rotate_deg: float = Field(default=15.0, ge=0, le=180)
    jitter_p: float = Field(default=0.8, ge=0, le=1)
    brightness: float = Field(default=0.2, ge=0, le=1)
    contrast: float = Field(default=0.2, ge=0, le=1)
    saturation: float = Field(default=0.2, ge=0, le=1)
    hue: float = Field(default=0.02, ge=0, le=0.5)
    blur_p: float = Field(default=0.2, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 1.5)
    noise_p: float = Field(default=0.2, ge=0, le=1)
    noise_std: float = Field(default=0.03, ge=0, le=1)

    @field_validator("scale", "ratio", "blur_sigma", "zoom")
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v

    @field_validator("scale")
    @classmethod
    def _scale_le_one(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[1] > 1:
            raise ValueError("crop area fractions must be <= 1")
        return v

    @field_validator("crop_size")
    @classmethod
    def _divisible(cls, v: int) -> int:
        if v % SIZE_DIVISOR:
            raise ValueError(f"must be a multiple of {SIZE_DIVISOR}")
        return v


class LossConfig(StrictModel):
    """Cross-entropy + Dice.

    Attributes:
        ce_weight: Weight of cross-entropy.
        dice_weight: Weight of the (multiclass, soft) Dice loss.
        class_weights: Per-class CE weights: a list (one per class), ``auto`` (inverse square root of pixel
            frequency over up to 256 training masks; with ``data.rcs`` drawing frames by class, over the first 256
            windows it draws), or ``None``.
    """

    ce_weight: float = Field(default=1.0, ge=0)
    dice_weight: float = Field(default=1.0, ge=0)
    class_weights: list[float] | Literal["auto"] | None = None


class TrainConfig(DistributedTrainFields):
    """The optimisation loop.

    Attributes:
        steps: Total optimiser steps (the schedule spans them).
        stop_at: Stop after this step with a checkpoint, for time-limited jobs; ``--resume`` continues.
        max_bad_steps: Steps with a NaN/inf loss skipped before the run stops with a clear error (0: the first
            stops it). Nothing of a bad step is applied or saved; weights holding NaN are never written.
        keep_best: Keep the best-by-validation-mIoU model as ``model/`` (else the final one).
        select_on: Which validation mIoU picks the best model: ``real`` (falls back to ``all`` when no real
            validation data exists), ``synthetic`` or ``all``.
    """

    steps: int = Field(default=20000, ge=1)
    batch_size: int = Field(default=8, ge=1, description="images per step (global: split over the ranks of a "
                            "train.devices > 1 run)")
    lr: float = Field(default=1e-3, gt=0)
    encoder_lr_mult: float = Field(default=1.0, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    schedule: Literal["cosine", "poly"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    poly_power: float = Field(default=0.9, gt=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    loss: LossConfig = Field(default_factory=LossConfig)
    amp: Literal["auto", "off", "fp16", "bf16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = Field(default=False, description="run the training forward through torch.compile (the "
                          "first steps pay the compilation; checkpoints, validation and export use the plain "
                          "module, so saved keys are unchanged)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = Field(default=50, ge=1)
    val_every: int = Field(default=1000, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    stop_at: int | None = Field(default=None, ge=1)
    keep_best: bool = True
    select_on: Literal["real", "synthetic", "all"] = "real"
    max_bad_steps: int = Field(default=0, ge=0, description="steps with a NaN or infinite loss skipped (no "
                               "optimizer step) before the run stops; 0 = stop at the first, before anything is saved")


class AdaptConfig(UnsaidDefaults):
    """Domain adaptation to the unlabeled real images of ``data.unlabeled`` (see docs/finetune.md).

    Self-training (DAFormer/DACS recipe): an EMA teacher pseudo-labels weakly augmented real crops; the student
    learns on ClassMix images (half of the classes of a synthetic crop pasted, with their labels, into a real
    crop), strongly augmented, with confidence-weighted cross-entropy. Appearance alignment moves synthetic
    crops toward random real crops (FDA, histogram matching). Nothing here runs without ``data.unlabeled``.

    Attributes:
        enabled: Self-training on (when ``data.unlabeled`` is given).
        ema: Teacher EMA momentum, ramped as ``min(1 - 1 / (k + 1), ema)`` over the k-th self-training step.
        threshold: Pseudo-label confidence threshold tau (max softmax probability).
        pixel_weight: ``quality``: every pseudo-labelled pixel of an image gets its quality weight (the share
            of its pixels above tau; DAFormer); ``confident``: only pixels above tau, with that weight.
        weight: Weight of the self-training loss next to the supervised one.
        warmup_steps: Source-only steps before self-training starts (the teacher then starts as a copy).
        batch_size: Real crops per step; default ``train.batch_size``.
        mix: ``classmix`` pastes synthetic classes into real crops; ``none`` trains on the real crops alone.
        mix_classes: Which classes ClassMix draws half of: ``all`` present in the synthetic crop (DACS), or
            only its ``things`` (objects; the thing classes of the rendered dataset).
        teacher_norm: ``batch``: the teacher's BatchNorm uses the statistics of the real batch it labels;
            ``running``: its running statistics (an EMA of the student's).
        jitter_p: Probability of colour jitter (brightness, contrast, saturation, hue) on a mixed image.
        jitter: Strength of that jitter.
        blur_p: Probability of Gaussian blur on a mixed image.
        blur_sigma: Range of its sigma (pixels).
        fda_beta: Fourier domain adaptation: the low-frequency amplitude (a square of half-width
            ``beta * side`` around zero frequency) of a synthetic crop is replaced by a random real crop's;
            0 = off.
        fda_p: Probability per synthetic crop.
        hist_match_p: Probability that a synthetic crop's histogram is matched to a random real crop's.
        bn_stats: Which batches the student's BatchNorm running statistics (used at inference) follow once
            self-training runs: ``all`` (synthetic and mixed) or ``mixed`` (the real-based mixed images only).
        recalibrate_bn: Batches of real crops the BatchNorm statistics of every saved or validated model are
            re-estimated on (AdaBN); 0 = off (the statistics of the training batches are kept).
        instance_pseudo: Self-training also trains the instance head (``instances.enabled=true``): the
            teacher's distance map (sigmoid of its distance logits) on the real crops is a soft binary
            cross-entropy target on the pixels whose class pseudo-label is confident (above ``threshold``,
            weighted by the image's quality), ClassMix's pasted synthetic pixels keep their exact synthetic
            distance targets (weight 1), weighted by ``instances.weight`` inside the self-training loss.
        mic_ratio: Masked Image Consistency (MIC, Hoyer et al. 2023; :meth:`finetune.selftrain.SelfTraining.
            mic_loss`): each self-training step the student also learns the teacher's pseudo-labels of the real
            crops from a strongly augmented copy of them in which each ``mic_block`` x ``mic_block`` block of the
            network input is dropped (set to 0 in the standardised input) with this probability; 0 = off (MIC
            uses 0.7). Class logits only, also with ``instance_pseudo``.
        mic_block: Side of MIC's mask blocks in network input pixels (MIC: 64 on 512-1024 px crops; the
            default 16 is the same 1/8 of a 128 px crop).
        mic_weight: Weight of the MIC loss (MIC's lambda), added to the self-training loss (so also times
            ``weight``).
    """

    unsaid_defaults: ClassVar[dict[str, Any]] = {"instance_pseudo": False, "mic_ratio": 0.0, "mic_block": 16,
                                                 "mic_weight": 1.0}

    enabled: bool = True
    ema: float = Field(default=0.999, ge=0, lt=1)
    threshold: float = Field(default=0.968, ge=0, le=1)
    pixel_weight: Literal["quality", "confident"] = "quality"
    weight: float = Field(default=1.0, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    batch_size: int | None = Field(default=None, ge=1)
    mix: Literal["classmix", "none"] = "classmix"
    mix_classes: Literal["all", "things"] = "all"
    teacher_norm: Literal["batch", "running"] = "batch"
    jitter_p: float = Field(default=0.2, ge=0, le=1)
    jitter: float = Field(default=0.2, ge=0, le=0.5)
    blur_p: float = Field(default=0.5, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.15, 1.15)
    fda_beta: float = Field(default=0.0, ge=0, le=0.5)
    fda_p: float = Field(default=0.5, ge=0, le=1)
    hist_match_p: float = Field(default=0.5, ge=0, le=1)
    bn_stats: Literal["all", "mixed"] = "all"
    recalibrate_bn: int = Field(default=0, ge=0)
    instance_pseudo: bool = False
    mic_ratio: float = Field(default=0.0, ge=0, lt=1)
    mic_block: int = Field(default=16, ge=1)
    mic_weight: float = Field(default=1.0, ge=0)

    @field_validator("blur_sigma")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("must be [low, high] with 0 < low <= high")
        return v


class PredictDefaults(UnsaidDefaults):
    """Tiling recorded in model.json as the default for ``segfactory predict``, and the speck cleanup.

    Attributes:
        min_object: Predicted components of a thing class whose equivalent diameter is under this share of the
            class's object size in the rendered training labels take their next most probable class
            (:mod:`finetune.cleanup`; model.json ``cleanup``, ``--min-object`` of ``predict``/``evaluate``
            overrides it). 0 = off. The default 0.25 is the share below which the scale estimate already counts
            predicted components as specks (docs/street.md, "Speck cleanup", has what it changed on real frames).
    """

    unsaid_defaults: ClassVar[dict[str, Any]] = {"min_object": 0.25}

    tile: int = Field(default=512, ge=SIZE_DIVISOR)
    overlap: int = Field(default=64, ge=0)
    batch_size: int = Field(default=4, ge=1)
    min_object: float = Field(default=0.25, ge=0, lt=1)

    @model_validator(mode="after")
    def _overlap_lt_tile(self) -> PredictDefaults:
        if self.overlap >= self.tile // 2:
            raise ValueError(f"overlap={self.overlap} must be below half the tile ({self.tile // 2})")
        if self.tile % SIZE_DIVISOR:
            raise ValueError(f"tile={self.tile} must be a multiple of {SIZE_DIVISOR}")
        return self


class InstanceConfig(StrictModel):
    """The instance head (:mod:`finetune.instances`): a normalised distance-to-boundary map predicted next to
    the classes, trained from the instance maps of the thing classes, split into objects by seeded watershed.

    Attributes:
        enabled: Add the head (one extra output channel on the same decoder) and its loss.
        weight: Weight of its binary cross-entropy next to the class loss.
        seed_threshold: Watershed seeds: connected regions where the predicted distance exceeds this (model.json).
        seed_h: Seeds must also be h-maxima of the distance map of this height (0 = off): one seed per object
            where a CPU-sized head predicts a flat, noisy interior (model.json). The defaults (0.5, 0.1, no
            smoothing) were chosen on rendered frames (the quickstart's held-out and training scenes), never on
            real labels.
        smooth: Gaussian sigma (network input pixels) on the distance map before seeding (model.json).
        min_size: Predicted instances with fewer pixels (network input pixels: an image predicted at input scale
            f uses min_size / f**2 at its own size) are dropped (model.json).
        calibrate: At the end of training, choose ``seed_h`` and ``min_size`` from a small grid by the watershed's
            instance F1 on the rendered validation frames (StarDist's ``optimize_thresholds`` idea; never real
            labels); the choice and the grid's scores go into model.json (``instances.calibration``). Off: the
            values above are used as given.
    """

    enabled: bool = False
    weight: float = Field(default=1.0, gt=0)
    seed_threshold: float = Field(default=0.5, ge=0, lt=1)
    seed_h: float = Field(default=0.1, ge=0, lt=1)
    smooth: float = Field(default=0.0, ge=0)
    min_size: int = Field(default=0, ge=0)
    calibrate: bool = True


class FinetuneConfig(StrictModel):
    """``segfactory finetune`` config.

    Attributes:
        classes: Target classes; default the first synthetic dataset's classes (or the first real source's).
        ignore_index: Target "not labeled" id in masks the model sees and writes.
    """

    classes: list[ClassSpec] | None = None
    ignore_index: Literal[255] = IGNORE_INDEX
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapt: AdaptConfig = Field(default_factory=AdaptConfig)
    predict: PredictDefaults = Field(default_factory=PredictDefaults)
    instances: InstanceConfig = Field(default_factory=InstanceConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard/MLflow logging "
                                     "(off by default; never part of a stage key)")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[ClassSpec] | None) -> list[ClassSpec] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one class")
        ids = [c.id for c in v]
        names = [c.name for c in v]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ValueError("class ids and names must be unique")
        return v


def check_adapt_config(cfg: FinetuneConfig, prefix: str = "") -> None:
    """Refuse settings that cannot work, before anything is opened or trained (``segfactory finetune``), or before
    any rendering (``segfactory run`` and ``refresh``, which pass the unlabeled images the stage will get).

    Args:
        cfg: The fine-tuning config as the stage sees it (``data.unlabeled`` set when it gets unlabeled images).
        prefix: Where the section lives in the user's config, put before every field named (``finetune.``,
            ``train.finetune.``; empty for ``segfactory finetune``).

    Raises:
        UserError: ``input.scale=auto`` without unlabeled images, without a source-only phase, or together with
            real labeled training data; ``adapt.instance_pseudo`` without the instance head; ``adapt.mic_ratio``
            without self-training, or with blocks (``adapt.mic_block``) over half the crop.
    """
    p, a = prefix, cfg.adapt
    if a.instance_pseudo and not cfg.instances.enabled:
        raise UserError(f"{p}adapt.instance_pseudo=true trains the instance head on pseudo-labels, but the model has "
                        f"none ({p}instances.enabled=false)",
                        fix=f"set {p}instances.enabled=true, or {p}adapt.instance_pseudo=false")
    if a.mic_ratio > 0 and not a.enabled:
        raise UserError(f"{p}adapt.mic_ratio={a.mic_ratio} (masked image consistency) learns the self-training "
                        f"pseudo-labels, but self-training is off ({p}adapt.enabled=false)",
                        fix=f"set {p}adapt.enabled=true, or {p}adapt.mic_ratio=0")
    if a.mic_ratio > 0 and a.mic_block * 2 > cfg.augment.crop_size:
        raise UserError(f"{p}adapt.mic_block={a.mic_block}: MIC's mask blocks must fit at least twice across the "
                        f"training crop ({p}augment.crop_size={cfg.augment.crop_size}); larger ones mask whole crops "
                        "or nothing, so there is no context left to learn from",
                        fix=f"set {p}adapt.mic_block to {cfg.augment.crop_size // 2} or less (MIC: 64 on 512 px "
                            "crops)")
    if cfg.input.scale != "auto":
        return
    if not cfg.data.unlabeled:
        raise UserError(f"{p}input.scale=auto estimates the scale from unlabeled real images, but "
                        f"{p}data.unlabeled is empty",
                        fix="pass --unlabeled IMAGES (an ingest output) or set input.scale to a number")
    if a.warmup_steps < 1 or a.warmup_steps >= cfg.train.steps:
        raise UserError(f"{p}input.scale=auto needs a source-only phase to estimate from ({p}adapt.warmup_steps="
                        f"{a.warmup_steps} of {p}train.steps={cfg.train.steps})",
                        fix=f"set {p}adapt.warmup_steps to e.g. a third of {p}train.steps")
    if cfg.data.real:
        raise UserError(f"{p}input.scale=auto cannot be used with real labeled training data ({p}data.real): those "
                        "images would be loaded before the scale is known",
                        fix=f"set {p}input.scale to a number (e.g. from a first run with input.scale=auto)")


class SweepAxes(StrictModel):
    """The grid of a label-efficiency sweep; every run gets the same steps x batch size (matched compute).

    Attributes:
        real_fractions: Fractions of the real training labels used (0 = synthetic only).
        synthetic_fractions: Synthetic volume as a fraction of the synthetic frames (0 = real only).
        encoder_inits: ``random``, ``ssl`` (the encoder from ``finetune.model.encoder_dir``/``--encoder``) and/or
            ``synthetic``: the encoder of a model the sweep first trains with supervision on the synthetic datasets
            alone (once per sweep, ``synthetic_init_steps`` steps), the supervised-on-synthetic baseline.
        synthetic_init_steps: Steps of that synthetic-only training; default ``finetune.train.steps``.
        seeds: Repeats with different training seeds.
    """

    real_fractions: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.3, 1.0])
    synthetic_fractions: list[float] = Field(default_factory=lambda: [1.0])
    encoder_inits: list[Literal["random", "ssl", "synthetic"]] = Field(default_factory=lambda: ["random", "ssl"])
    synthetic_init_steps: int | None = Field(default=None, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])

    @field_validator("real_fractions", "synthetic_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= f <= 1 for f in v):
            raise ValueError("needs one or more fractions in [0, 1]")
        return sorted(set(v))

    @field_validator("encoder_inits", "seeds")
    @classmethod
    def _non_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("needs at least one entry")
        return list(dict.fromkeys(v))


class SweepConfig(StrictModel):
    """``segfactory sweep`` config: a finetune config, the grid, and held-out real test folders."""

    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    sweep: SweepAxes = Field(default_factory=SweepAxes)
    test: list[SourceSpec] = Field(default_factory=list)


# --------------------------------------------------------------------------------- command-line flags


def apply_data_flags(cfg: FinetuneConfig, encoder: str | None, arch: str | None, steps: int | None,
                     unlabeled: list[str] | None = None) -> FinetuneConfig:
    """Apply the stable script flags to a :class:`~finetune.config.FinetuneConfig` (returns a new one); the
    repeatable path flags (``--synthetic``/``--real``) are applied by ``load_config(paths=...)``, before validation."""
    from segfactory.config import validation_error_to_user_error

    update: dict[str, Any] = {}
    if unlabeled:
        update["unlabeled"] = [Path(p) for p in unlabeled]
    data = cfg.data.model_copy(update=update)
    model_update: dict[str, Any] = {}
    if encoder is not None:
        model_update["encoder_dir"] = Path(encoder)
    if arch is not None:
        model_update["arch"] = arch
    train = cfg.train.model_copy(update={"steps": steps}) if steps is not None else cfg.train
    raw = cfg.model_copy(update={"data": data, "model": cfg.model.model_copy(update=model_update),
                                 "train": train}).model_dump()
    from pydantic import ValidationError

    try:
        return FinetuneConfig.model_validate(raw)
    except ValidationError as e:
        raise validation_error_to_user_error(e, FinetuneConfig, "flags") from None
