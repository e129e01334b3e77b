"""Typed configs of ``segfactory ingest``, ``segfactory pretrain`` and ``segfactory probe``."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pretrain.backbones import BACKBONES
from pretrain.init import init_sha256, resolve_init
from pretrain.methods import METHODS, options_model
from segfactory.config import DistributedTrainFields, StrictModel, UnsaidDefaults, validate_section
from segfactory.errors import UserError
from segfactory.tracking import TrackingConfig

# ----------------------------------------------------------------------------------------------- ingest


class NormalizeConfig(StrictModel):
    """How decoded images become stored 8-bit images."""

    max_short_side: int | None = Field(512, ge=8, description="downscale so the short side is at most this; "
                                       "null keeps full size")
    low_percentile: float = Field(0.5, ge=0, lt=50, description="16-bit/float -> 8-bit: this percentile maps to 0")
    high_percentile: float = Field(99.5, gt=50, le=100, description="... and this one to 255")
    store: Literal["auto", "png", "jpeg"] = Field(
        "auto", description="auto: JPEG sources stay JPEG (bytes copied when unchanged), others become PNG")
    jpeg_quality: int = Field(95, ge=50, le=100)


class ValidateConfig(StrictModel):
    """What counts as a bad file. A rejection records these limits; when they change, a re-run re-examines the
    files they rejected (``too_large``, ``bomb``, ``too_small``, ``timeout``, ``memory``, ``crashed``)."""

    max_pixels: int = Field(178_956_970, ge=1, description="larger images (one slice of a stack) are rejected "
                            "as decompression bombs before decoding (Pillow's limit by default)")
    min_side: int = Field(8, ge=1, description="images with a side below this are rejected")
    max_pages: int = Field(1024, ge=1, description="at most this many slices are taken from one TIFF stack (the "
                           "IFD chain is not walked further; later slices are recorded as dropped)")
    max_file_pixels: int = Field(1 << 30, ge=1, description="pixels taken from one file, all slices of a stack "
                                 "together (checked from the page headers before decoding; later slices are "
                                 "recorded as dropped)")
    max_file_mb: float = Field(2048, gt=0, description="larger files are rejected without reading them")
    decode_timeout_s: float = Field(120.0, gt=0, description="wall-clock seconds one file may take to decode and "
                                    "normalize; a decoder that takes longer is killed and the file rejected")
    decode_memory_mb: int | None = Field(4096, ge=64, description="memory one decoder process may allocate; a "
                                         "file that needs more is rejected (null: no cap)")


class DecodeConfig(StrictModel):
    """How files are decoded: isolated in child processes, so that no file can hang or crash a Dask worker."""

    isolate: bool = Field(True, description="read, hash and decode each file in a long-lived child process with "
                          "a timeout and a memory cap (re-spawned after a crash); false does it inside the Dask "
                          "worker, without either")
    plugins: list[str] = Field(default_factory=list, description="modules each decoder imports first: Pillow "
                               "plugins that register more formats (e.g. pillow_heif.HeifImagePlugin)")


class IngestConfig(StrictModel):
    """``segfactory ingest`` config."""

    files_per_shard: int = Field(512, ge=1, description="source files per shard (one Dask task each)")
    hash_chunk: int = Field(2048, ge=1, description="files per hashing task")
    extensions: list[str] | None = Field(
        None, description="folder/glob sources: only files with these suffixes (e.g. ['.png', '.tif']); null "
        "reads every file and recognises images by content, so misnamed and non-image files are reported")
    follow_symlinks: Literal["inside", "always", "never"] = Field(
        "inside", description="folder sources: follow links that stay inside the source folder (inside), all "
        "links (always), or none; a link loop or a folder seen before is never walked twice")
    max_files: int = Field(10_000_000, ge=1, description="a folder source with more files is refused (the walk "
                           "is bounded)")
    walk_timeout_s: float = Field(120.0, gt=0, description="listing the source stops the run (exit 2, one line "
                                  "naming the folder, locks released) when no folder listing or file stat returns "
                                  "for this long (a network filesystem whose server is gone)")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    checks: ValidateConfig = Field(default_factory=ValidateConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)

    def output_key(self) -> dict[str, Any]:
        """What decides the images and rejections an ingest stores, as stage key material (``segfactory run``
        keys its ingest stage on it with the sources): every field but how the work is cut and run
        (``files_per_shard``, ``hash_chunk``, ``max_files``, ``walk_timeout_s``). ``decode`` (its plugins read more
        formats; without ``isolate`` neither timeout nor memory cap applies) is in only when it is not the default, so
        that the keys of configs that never set it stay what they were."""
        key = self.model_dump(mode="json", include={"extensions", "follow_symlinks", "normalize", "checks"})
        decode = self.decode.model_dump(mode="json")
        if decode != DecodeConfig().model_dump(mode="json"):
            key["decode"] = decode
        return key

    @field_validator("extensions")
    @classmethod
    def _dot_lower(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else [e.lower() if e.startswith(".") else "." + e.lower() for e in v]

    @field_validator("follow_symlinks", mode="before")
    @classmethod
    def _bool_policy(cls, v: Any) -> Any:
        # the field was a bool: true meant "every link", false "none"
        return {True: "always", False: "never"}.get(v, v) if isinstance(v, bool) else v


# --------------------------------------------------------------------------------------------- pretrain


class MethodConfig(StrictModel):
    """``method``: which SSL method, and the options of every registered method (only the chosen one's are used).

    ``method.<name>`` is typed by the config class in ``pretrain/methods/<name>.py``; validating it imports the
    method modules (torch, lightly), so this module stays importable without them.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)  # the options sections, typed below

    name: Annotated[str, AfterValidator(METHODS.validate)] = Field(
        "simclr", description="SSL method (`segfactory pretrain --help` lists them)")

    @model_validator(mode="before")
    @classmethod
    def _typed_options(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        options = validate_section(options_model(), data)
        return {**({"name": data["name"]} if "name" in data else {}),
                **{name: getattr(options, name) for name in METHODS.names()}}


class BackboneConfig(StrictModel):
    name: Annotated[str, AfterValidator(BACKBONES.validate)] = Field(
        "resnet18", description="registered backbone (`segfactory pretrain --help` lists them)")
    in_chans: Literal["auto", 1, 3] = Field("auto", description="auto: 1 if every ingested image is gray, else 3")
    init: str | None = Field(None, description="continue pretraining from these weights: a timm checkpoint "
                             "(.pth/.pt/.bin state dict, .safetensors) of backbone.name's architecture, or the "
                             "encoder directory (or run directory) of an earlier `segfactory pretrain`; loaded "
                             "strictly (heads are dropped and reported). null: random init. Unlike --resume, "
                             "optimizer and step start afresh")
    init_sha256: str | None = Field(None, validate_default=True,
                                    description="sha256 of backbone.init's weights, filled in when the config is "
                                    "resolved (so stage keys change with the file); a file that no longer matches "
                                    "is an error")

    @field_validator("init")
    @classmethod
    def _init_weights(cls, v: str | None) -> str | None:
        return None if v is None else resolve_init(v)  # ValueError naming backbone.init

    @field_validator("init_sha256")
    @classmethod
    def _pin_init(cls, v: str | None, info: ValidationInfo) -> str | None:
        path = info.data.get("init")
        if path is None:
            if v is not None:
                raise ValueError("backbone.init_sha256 is set without backbone.init")
            return None
        actual = init_sha256(path)  # ValueError naming the path if it is missing
        if v is not None and v != actual:
            raise ValueError(f"backbone.init '{path}' has changed since this config was resolved (its sha256 is "
                             f"now {actual[:12]}..., the config has {v[:12]}...); restore the file, or remove "
                             "backbone.init_sha256 to start from the new one")
        return actual


class AugmentConfig(StrictModel):
    """``augment``: the view pipeline (each method supplies its view spec; these adjust it)."""

    crop_size: int = Field(224, ge=16, description="global crop side (px)")
    local_crop_size: int = Field(96, ge=8, description="DINO local crop side (px)")
    min_scale: float | None = Field(None, gt=0, le=1, description="smallest global crop area fraction "
                                    "(method default if null: 0.08, DINO 0.4)")
    load_size: int | None = Field(None, ge=16, description="images are loaded as load_size^2 squares before "
                                  "cropping (default: crop_size * 8/7)")
    single_channel: bool | None = Field(None, description="no hue/saturation jitter or grayscale "
                                        "(microscopy, X-ray); null: on when in_chans is 1")
    jitter_strength: float = Field(1.0, ge=0, le=2, description="scales brightness/contrast/saturation/hue")
    vflip: bool = Field(False, description="also flip vertically (orientation-free domains: microscopy, aerial)")
    rot90: bool = Field(False, description="also rotate by multiples of 90 degrees")
    blur: bool = True
    solarize: bool = True
    small_images: Literal["skip", "upscale"] = Field(
        "skip", description="images whose short side is below crop_size: skip them, or upscale them")

    @field_validator("load_size")
    @classmethod
    def _load_size_holds_the_crop(cls, v: int | None, info: ValidationInfo) -> int | None:
        crop = info.data.get("crop_size")
        if v is not None and crop is not None and v < crop:
            raise ValueError(f"is smaller than crop_size={crop} of the same section: set it to {crop} or more "
                             "(or null: crop_size * 8/7)")
        return v


def crop_too_large(images: int, largest: int, crop: int, prefix: str = "") -> UserError:
    """The error for an ingest store whose every image's short side is below ``augment.crop_size`` (with
    ``small_images: skip``): the pretrain stage raises it, and ``run``/``refresh`` before any rendering.

    Args:
        images: How many images the store holds.
        largest: The largest short side among them, in pixels.
        prefix: Where the pretrain section lives in the user's config (``pretrain.``, ``train.pretrain.``).
    """
    return UserError(f"all {images} ingested images are smaller than {prefix}augment.crop_size={crop} "
                     f"(largest short side {largest} px)",
                     fix=f"set {prefix}augment.crop_size={max(16, largest)} or lower, or "
                         f"{prefix}augment.small_images=upscale")


class OptimConfig(StrictModel):
    optimizer: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0, description="learning rate for an effective batch of 256 (scaled linearly)")
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/LARS momentum")
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine schedule ends at lr * this")
    grad_clip: float | None = Field(3.0, gt=0)


DEFAULT_CACHE_MB = 512.0


class DataConfig(UnsaidDefaults):
    unsaid_defaults: ClassVar[dict[str, Any]] = {"cache_mb": DEFAULT_CACHE_MB}  # changes no batch

    num_workers: int | None = Field(None, ge=0, description="DataLoader decode workers (default: CPU count - 1)")
    normalization: Literal["dataset", "imagenet", "half"] = Field(
        "dataset", description="input mean/std: the ingested data's own statistics, ImageNet's, or 0.5/0.5")
    prefetch_factor: int = Field(4, ge=1)
    order: Literal["auto", "stream", "random"] = Field(
        "auto", description="stream: read the shards sequentially, shuffled by units and a buffer "
        "(segfactory.streaming); random: one seeded permutation of all images, one file seek per image; auto: "
        "stream from stream_min_images images on")
    stream_min_images: int = Field(50_000, ge=0, description="data.order=auto streams stores this large")
    stream_buffer: int = Field(2048, ge=1, description="data.order=stream: shuffle window per reader, in images")
    stream_unit: int = Field(256, ge=1, description="data.order=stream: images per shuffled unit (a contiguous "
                             "read of one shard)")
    cache_mb: float = Field(DEFAULT_CACHE_MB, ge=0, description="each loader worker keeps the decoded, load-size "
                            "frames it has seen, up to this many MB (host memory: up to num_workers x cache_mb; a "
                            "10k-image dump at 256 px gray is ~650-800 MB); later epochs then skip the decode. "
                            "Batches are the same with any value; 0 = off")


class TrainConfig(DistributedTrainFields):
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=2, description="images per micro-batch (global: split over the ranks of a "
                            "train.devices > 1 run)")
    accumulate: int = Field(1, ge=1, description="micro-batches per optimizer step (gradient accumulation)")
    seed: int = 0
    device: str = Field("auto", description="auto (cuda if present), cpu, cuda, cuda:1 ...")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field("auto", description="auto: bf16/fp16 on GPU, off on CPU")
    channels_last: bool = True
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(0, ge=0, description="steps with a NaN or infinite loss skipped (no optimizer step) "
                               "before the run stops; 0 = stop at the first, before anything is saved")


class PretrainConfig(StrictModel):
    """``segfactory pretrain`` config."""

    method: MethodConfig = Field(default_factory=MethodConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard/MLflow logging "
                                     "(off by default; never part of a stage key)")


# ------------------------------------------------------------------------------------------------ probe


class ProbeConfig(StrictModel):
    """``segfactory probe``: a frozen-encoder dense linear probe."""

    steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-2, gt=0)
    image_size: int = Field(128, ge=32, description="frames are resized to this square")
    max_frames: int = Field(400, ge=2)
    val_fraction: float = Field(0.25, gt=0, lt=1)
    feature_stride: int = Field(8, ge=1, description="all encoder stages are resampled to this stride and "
                                "concatenated before the 1x1 conv")
    seed: int = Field(0, description="first probe seed; seed i of `seeds` is seed + i")
    seeds: int = Field(3, ge=1, le=100, description="probe seeds: each draws its own train/val split, random-init "
                       "encoder and probe init; mean ± std over them and a within-spread verdict on the paired "
                       "encoder - random differences are reported")
    device: str = "auto"
