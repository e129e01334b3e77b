"""Tiled, batched prediction: class-id masks of the input's size plus colour overlays.

Contract of ``segfactory predict --model MODEL --input DIR --out OUT``: for every image in DIR (JPEG, PNG,
TIFF; 8/16-bit; gray/RGB), or the one image file ``--input`` names, write ``OUT/<stem>.png`` (uint8 class ids, same
height and width as the input) and ``OUT/overlays/<stem>.jpg``. A multi-page TIFF (a stack: z-slices, time points)
is predicted page by page, as ``segfactory ingest`` takes its slices: ``OUT/<stem>_p<N>.png`` for page N (zero-padded
to the stack's length). A model with an instance head (:mod:`finetune.instances`) also writes
``OUT/instances/<stem>.png`` (uint16 instance ids of its thing classes, 0 = none) and ``OUT/instances.json``
(COCO instances, RLE masks, one image per input image or page: a page's ``file_name`` is ``<stem>_p<N>.tif``, named
like its outputs, with ``stack`` and ``page`` fields), and its overlays outline every instance.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from finetune.config import SIZE_DIVISOR
from finetune.data.normalize import resolve_scaling, standardize, to_unit
from segfactory.errors import PartialFailure, UserError
from segfactory.formats.imagefile import IMAGE_SUFFIXES, image_pages, read_image
from segfactory.formats.model import read_model_meta
from segfactory.io import atomic_write_bytes
from segfactory.torchutil import amp_dtype, memory_hint, resolve_device


def _ceil_to(n: int, k: int) -> int:
    return int(math.ceil(n / k) * k)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` overlapping by at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(tile_h: int, tile_w: int, overlap: int, device: torch.device) -> torch.Tensor:
    """(tile_h, tile_w) weights ramping up over ``overlap`` pixels at the borders, so seams fade out."""
    def ramp(n: int) -> torch.Tensor:
        i = torch.arange(n, device=device, dtype=torch.float32)
        d = torch.minimum(i, n - 1 - i) + 1
        return (d / (overlap + 1)).clamp(min=1e-3, max=1.0) if overlap > 0 else torch.ones(n, device=device)

    return ramp(tile_h)[:, None] * ramp(tile_w)[None, :]


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, tile: int, overlap: int, batch_size: int,
                  autocast: torch.dtype | None = None, channels_last: bool = False,
                  device: torch.device | None = None, tta: str = "none", joint: bool = False) -> torch.Tensor:
    """Class probabilities of one standardised image by overlapping tiles.

    The image and the (K, H, W) accumulator stay where ``x`` is (the CPU, for large images): only batches of
    tiles go to the model's device, so device memory does not grow with the image.

    Args:
        model: Maps (B, C, h, w) (multiples of 32) to logits (B, K, h, w).
        x: (C, H, W) standardised input, best on the CPU.
        tile: Tile side (multiple of 32); images smaller than a tile are run whole (padded to 32).
        overlap: Pixels shared by neighbouring tiles.
        batch_size: Tiles per forward pass.
        device: Where the model runs; default the device of its parameters.
        tta: Test-time augmentation of every tile batch (:func:`finetune.adapt.tta_probs`): ``none``, ``flip``
            or ``d4``.
        joint: The model has an instance head: return its distance map as channel K (after the K class
            probabilities), blended across tiles like them (:func:`finetune.instances.joint_probs`).

    Returns:
        (K, H, W) float32 probabilities on ``x``'s device ((K + 1, H, W) with ``joint``).
    """
    if device is None:
        device = next(model.parameters()).device
    _, h, w = x.shape
    th, tw = min(tile, _ceil_to(h, SIZE_DIVISOR)), min(tile, _ceil_to(w, SIZE_DIVISOR))
    ph, pw = max(th, h), max(tw, w)
    if (ph, pw) != (h, w):
        mode = "reflect" if ph - h < h and pw - w < w else "replicate"
        x = torch.nn.functional.pad(x[None], (0, pw - w, 0, ph - h), mode=mode)[0]
    boxes = [(y0, x0) for y0 in tile_starts(ph, th, overlap) for x0 in tile_starts(pw, tw, overlap)]
    if len(boxes) == 1:
        # One tile: its blend weights are all 1, so the weighted accumulation would return these very numbers.
        return _tile_probs(model, x[None].to(device), autocast, channels_last, device, tta, joint)[0] \
            .to(x.device)[:, :h, :w]
    weight = blend_window(th, tw, overlap if len(boxes) > 1 else 0, device)
    weight_here = weight.to(x.device)
    acc: torch.Tensor | None = None
    norm = torch.zeros((ph, pw), device=x.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        batch = torch.stack([x[:, y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk]).to(device)
        weighted = (_tile_probs(model, batch, autocast, channels_last, device, tta, joint) * weight).to(x.device)
        if acc is None:
            acc = torch.zeros((weighted.shape[1], ph, pw), device=x.device)
        for (y0, x0), p in zip(chunk, weighted, strict=True):
            acc[:, y0:y0 + th, x0:x0 + tw] += p
            norm[y0:y0 + th, x0:x0 + tw] += weight_here
    assert acc is not None
    return (acc / norm)[:, :h, :w]


def _tile_probs(model: nn.Module, batch: torch.Tensor, autocast: torch.dtype | None, channels_last: bool,
                device: torch.device, tta: str, joint: bool) -> torch.Tensor:
    """(B, K, h, w) probabilities of a (B, C, h, w) tile batch on ``device`` (TTA-averaged; + distance with
    ``joint``)."""
    from finetune.adapt import tta_probs

    def probs(b: torch.Tensor) -> torch.Tensor:
        if channels_last:
            b = b.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            if joint:
                from finetune.instances import joint_probs

                return joint_probs(model, b)
            return model(b).float().softmax(1)

    return tta_probs(probs, batch, tta)


def prepare_input(img: np.ndarray, input_spec: dict[str, Any], device: torch.device,
                  scale: float | None = None) -> torch.Tensor:
    """File pixels -> standardised (C, H', W') float32 on ``device``, exactly as in training.

    The recipe (also what an ONNX user must do, see :mod:`finetune.export`): resize by the input scale
    (``input.scale``; area averaging when shrinking, bilinear when enlarging), scale to [0, 1] by
    ``input.scaling`` (``auto``: 8-bit ÷255, deeper: 0.5..99.5 percentile stretch, per whole image), match the
    channel count, then ``(x - mean) / std``.

    Args:
        scale: Resize factor; default ``input_spec["scale"]`` (1 when absent). Synthetic frames use 1.
    """
    from finetune.scale import resize_image

    f = float(input_spec.get("scale", 1.0)) if scale is None else float(scale)
    img = resize_image(img, f)
    x = torch.from_numpy(to_unit(img, int(input_spec["in_chans"]), input_spec["scaling"])).to(device)
    return standardize(x, input_spec["mean"], input_spec["std"])


def predict_mask(model: nn.Module, meta: dict[str, Any], img: np.ndarray, device: torch.device, tile: int,
                 overlap: int, batch_size: int, autocast: torch.dtype | None = None,
                 channels_last: bool = False, scale: float | None = None, tta: str = "none") -> np.ndarray:
    """(H, W) uint8 class ids for an image read by :func:`~finetune.data.normalize.read_image`.

    The whole image and the per-class accumulator stay on the CPU; only tile batches run on ``device``. With an
    input scale other than 1 the image is resized before the network and the class probabilities are resized
    back (bilinear) to the image's own size before the argmax.

    Args:
        scale: Resize factor; default model.json's ``input.scale`` (synthetic frames: pass 1).
        tta: ``none``, ``flip``, ``d4``, ``ms`` or ``ms_flip`` (see :func:`predict_image_probs`).
    """
    return predict_outputs(model, meta, img, device, tile, overlap, batch_size, autocast, channels_last, scale,
                           tta)[0]


def predict_outputs(model: nn.Module, meta: dict[str, Any], img: np.ndarray, device: torch.device, tile: int,
                    overlap: int, batch_size: int, autocast: torch.dtype | None = None,
                    channels_last: bool = False, scale: float | None = None, tta: str = "none",
                    instances: bool = False) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`predict_mask`, and with ``instances`` the instances of a model with an instance head.

    The distance map is blended and resized back with the class probabilities, then
    :func:`finetune.instances.watershed_instances` runs at the image's own size with model.json's ``instances``
    parameters (``things``, ``seed_threshold``, ``min_size``, ``seed_h``, ``smooth``).

    Returns:
        (H, W) uint8 class ids, (H, W) int32 instance ids (0 = none) or ``None``, and the (H, W) float32
        distance map or ``None``.
    """
    probs = predict_image_probs(model, meta, img, device, tile, overlap, batch_size, autocast, channels_last, scale,
                                tta, instances)
    return outputs_from_probs(probs, meta, instances, scale)


def predict_image_probs(model: nn.Module, meta: dict[str, Any], img: np.ndarray, device: torch.device, tile: int,
                        overlap: int, batch_size: int, autocast: torch.dtype | None = None,
                        channels_last: bool = False, scale: float | None = None, tta: str = "none",
                        instances: bool = False) -> torch.Tensor:
    """The model's part of :func:`predict_outputs`: (K, H, W) float32 CPU class probabilities at the image's own
    size ((K + 1, H, W) with ``instances``: the distance map last); :func:`outputs_from_probs` does the rest.

    ``tta`` ``ms`` / ``ms_flip`` (:data:`finetune.adapt.MS_MODES`) predicts the whole image at each ratio of its
    input scale (mmsegmentation's test-time ratios 0.5..1.75; ``ms_flip`` also its horizontal flip) and averages
    the class probabilities resized back to the image's size; the distance map is the one at the scale itself."""
    from finetune.adapt import MS_MODES

    h, w = img.shape[:2]
    f = float(meta["input"].get("scale", 1.0)) if scale is None else float(scale)
    ratios, dihedral = MS_MODES.get(tta, ((1.0,), tta))
    acc: torch.Tensor | None = None
    for r in ratios:
        x = prepare_input(img, meta["input"], torch.device("cpu"), f * r)
        probs = predict_probs(model, x, tile, overlap, batch_size, autocast, channels_last, device, dihedral,
                              joint=instances)
        if probs.shape[-2:] != (h, w):
            probs = torch.nn.functional.interpolate(probs[None], size=(h, w), mode="bilinear",
                                                    align_corners=False)[0]
        if len(ratios) == 1:
            return probs
        k = probs.shape[0] - int(instances)  # the class channels (the distance map is last)
        if acc is None:
            acc = torch.zeros_like(probs)
        acc[:k] += probs[:k]
        if r == 1.0:
            acc[k:] = probs[k:]  # the distance map is in network pixels: taken at the input scale itself only
    assert acc is not None
    acc[:acc.shape[0] - int(instances)] /= len(ratios)
    return acc


def outputs_from_probs(probs: torch.Tensor, meta: dict[str, Any], instances: bool = False,
                       scale: float | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The CPU part of :func:`predict_outputs` (no model: safe in a worker thread): class ids from
    :func:`predict_image_probs`'s probabilities, their speck components relabelled (model.json ``cleanup``,
    :func:`finetune.cleanup.drop_specks`), and with ``instances`` the watershed instances and distance map
    (``scale``: the input scale the image was predicted at, default model.json's ``input.scale``; the cleanup's
    and the watershed's sizes are in the network's input pixels)."""
    k = int(meta["num_classes"])
    # numpy's argmax over the class axis (first maximum on ties, like torch's) is ~10x faster than torch's
    # reduction over the outer dimension of a (K, H, W) tensor.
    p = probs[:k].numpy()
    labels = p.argmax(0).astype(np.uint8)
    if not meta.get("cleanup") and not instances:
        return labels, None, None
    f = float(meta["input"].get("scale", 1.0)) if scale is None else float(scale)
    if meta.get("cleanup"):
        from finetune.cleanup import drop_specks

        labels = drop_specks(labels, p, meta["cleanup"], f)
    if not instances:
        return labels, None, None
    from finetune.instances import postprocess

    dist = probs[k].numpy()
    return labels, postprocess(labels, dist, meta["instances"], f), dist


def memory_settings(batch_size: int, tile: int) -> str:
    """What to lower when prediction runs out of memory (:func:`segfactory.torchutil.memory_hint`'s ``lower``)."""
    return (f"--batch-size ({batch_size}) or --tile ({tile}, a multiple of 32); for very large images "
            "also --scale (the whole image's class probabilities are held at once)")


def inference_settings(meta: dict[str, Any], tile: int | None, overlap: int | None,
                       batch_size: int | None) -> tuple[int, int, int]:
    """Tile, overlap and batch size for ``predict``/``evaluate``: the flags, else model.json's ``predict``.

    Raises:
        UserError: the tile is not a multiple of 32, the overlap is negative or not below half the tile, or
            the batch size is below 1.
    """
    pdef = meta.get("predict", {})
    # A value given (0 included) is checked, never replaced by the default: it is what predict.yaml records.
    bs_name = "--batch-size" if batch_size is not None else "model.json predict.batch_size"
    tile = int(pdef.get("tile", 512) if tile is None else tile)
    overlap = int(overlap if overlap is not None else pdef.get("overlap", 64))
    batch_size = int(pdef.get("batch_size", 4) if batch_size is None else batch_size)
    if tile <= 0 or tile % SIZE_DIVISOR or not 0 <= overlap < tile // 2:
        raise UserError(f"--tile {tile}, --overlap {overlap}: the tile must be a positive multiple of "
                        f"{SIZE_DIVISOR} and the overlap at least 0 and below half of it",
                        fix="e.g. --tile 512 --overlap 64")
    if batch_size < 1:
        raise UserError(f"{bs_name} {batch_size} is below 1", fix="e.g. --batch-size 4")
    return tile, overlap, batch_size


def check_tta(tta: str) -> str:
    """Raise a UserError for an unknown test-time augmentation mode."""
    from finetune.config import TTA_CHOICES

    if tta not in TTA_CHOICES:
        raise UserError(f"unknown TTA mode '{tta}'", fix=f"use one of {', '.join(TTA_CHOICES)}")
    return tta


def check_scale(scale: float) -> float:
    """Raise a UserError for an input scale outside 0.05..20."""
    if not 0.05 <= scale <= 20:
        raise UserError(f"input scale {scale} is outside 0.05..20", fix="e.g. --scale 0.5 (objects half as big)")
    return float(scale)


# An image with fewer objects than this keeps model.json's input.scale under per-image scales.
AUTO_MIN_OBJECTS = 3


def resolve_scale(meta: dict[str, Any], scale: float | str | None) -> dict[str, Any]:
    """Apply a ``--scale`` choice to a model's meta (per-image scales: ``input.scale_mode: per_image``).

    Args:
        scale: A factor (every real image is resized by it), ``"auto"`` (each image's own estimate, see
            :func:`auto_scale`) or ``None``: model.json's choice (``input.scale_mode: per_image`` when training
            found sources of different magnification, else ``input.scale``).

    Raises:
        UserError: a factor outside 0.05..20, a word other than auto, or ``auto`` for a model that does not
            know its objects' size (not trained with ``input.scale=auto``).
    """
    spec = meta["input"]
    if scale is None:
        return meta
    if isinstance(scale, str) and scale.strip().lower() != "auto":
        try:
            scale = float(scale)
        except ValueError:
            raise UserError(f"--scale '{scale}' is neither a number nor auto",
                            fix="pass --scale 0.5 (a factor) or --scale auto (each image's own)") from None
    if isinstance(scale, str):
        if not spec.get("object_px") or not spec.get("object_classes"):
            raise UserError("--scale auto: this model does not record the object size it was trained for "
                            "(model.json input.object_px; models trained with input.scale=auto do)",
                            fix="pass --scale with a number, or train with input.scale=auto")
        return {**meta, "input": {**spec, "scale_mode": "per_image"}}
    return {**meta, "input": {**spec, "scale": check_scale(float(scale)), "scale_mode": "fixed"}}


def per_image_scales(meta: dict[str, Any]) -> bool:
    """Whether real images are predicted at their own scale (:func:`image_scale`)."""
    return meta["input"].get("scale_mode") == "per_image"


def image_scale(model: nn.Module, meta: dict[str, Any], img: np.ndarray, device: torch.device, tile: int,
                overlap: int, batch_size: int, autocast: torch.dtype | None = None,
                channels_last: bool = False) -> float | None:
    """The scale a real image is predicted at: its own (:func:`auto_scale`) under ``input.scale_mode:
    per_image``, else ``None`` (model.json's ``input.scale``)."""
    if not per_image_scales(meta):
        return None
    return float(auto_scale(model, meta, img, device, tile, overlap, batch_size, autocast, channels_last)["scale"])


def auto_scale(model: nn.Module, meta: dict[str, Any], img: np.ndarray, device: torch.device, tile: int,
               overlap: int, batch_size: int, autocast: torch.dtype | None = None,
               channels_last: bool = False) -> dict[str, Any]:
    """One image's own input scale: the model's masks on it, resized by the current estimate, are measured and
    the estimate moved until its objects have the size the model saw most in training (model.json
    ``input.object_px``; :func:`finetune.scale.fit_scale`, at most 3 passes from ``input.scale``). An image with
    fewer than :data:`AUTO_MIN_OBJECTS` objects keeps ``input.scale``. The estimate stays within half the
    smallest and twice the largest scale of the training sources (``input.scales``): outside what the model was
    adapted to, a few specks can drive the fixed point to the end of its range. Objects are measured by the
    median training used (``input.scale_by``: ``count``, also when absent, or ``area``).

    Returns:
        ``{"scale", "passes", "ok"}`` (``scale`` is ``input.scale`` when not ``ok``).

    Raises:
        UserError: ``input.scale_by`` in model.json is neither ``count`` nor ``area``.
    """
    from finetune.scale import SCALE_BY, fit_scale, resize_image

    spec = meta["input"]
    by = spec.get("scale_by") or "count"
    if by not in SCALE_BY:
        raise UserError(f"model.json input.scale_by is {by!r}: per-image scales know only {' and '.join(SCALE_BY)}",
                        fix="set input.scale_by in model.json to count or area (what the model was trained with), "
                            "or pass --scale with a number")
    # the estimate measures the raw masks, as in training (no speck cleanup: it has its own speck rule)
    fixed = {**{k: v for k, v in meta.items() if k != "cleanup"}, "input": {**spec, "scale": 1.0}}

    def predict_at(f: float) -> list[np.ndarray]:
        return [predict_mask(model, fixed, resize_image(img, f), device, tile, overlap, batch_size, autocast,
                             channels_last, scale=1.0)]

    start = float(spec.get("scale", 1.0))
    known = [start, *(float(v) for v in (spec.get("scales") or {}).values())]
    limits = (max(0.05, min(known) / 2), min(20.0, max(known) * 2))
    return fit_scale(predict_at, float(spec["object_px"]), [int(k) for k in spec["object_classes"]],
                     start=start, limits=limits, min_objects=AUTO_MIN_OBJECTS, by=by)


def display_rgb(img: np.ndarray, scaling: str = "dtype") -> np.ndarray:
    """(H, W, 3) uint8 for overlays: 16-bit and gray inputs shown with the model's own scaling."""
    return (np.moveaxis(to_unit(img, 3, scaling), 0, -1) * 255 + 0.5).astype(np.uint8)


def overlay(img: np.ndarray, mask: np.ndarray, colors: list, alpha: float = 0.5, scaling: str = "dtype",
            instances: np.ndarray | None = None) -> np.ndarray:
    """Blend class colours over the image: (H, W, 3) uint8; with ``instances`` (H, W) ids, every instance's
    outline (its pixels next to another id) is drawn in white."""
    rgb = display_rgb(img, scaling).astype(np.float32)
    palette = np.zeros((256, 3), np.float32)
    palette[: len(colors)] = np.asarray(colors, np.float32)
    out = rgb * (1 - alpha) + palette[mask] * alpha
    if instances is not None:
        from skimage.segmentation import find_boundaries

        out[find_boundaries(instances, mode="inner") & (instances > 0)] = 255
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def model_palette(meta: dict[str, Any]) -> list[list[int]]:
    """Colour per class id from model.json (ids without an entry get the default palette)."""
    from finetune.data.remap import default_color

    palette = [list(default_color(i)) for i in range(int(meta["num_classes"]))]
    for c in meta["classes"]:
        if c.get("color") is not None and 0 <= int(c["id"]) < len(palette):
            palette[int(c["id"])] = [int(v) for v in c["color"]]
    return palette


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encode_jpeg(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def list_images(input_path: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Images directly inside the folder ``input_path``, sorted; or ``[input_path]`` when it is one image file.

    Returns:
        (the image files, notes: one per link to an image name whose target is missing, skipped as ``segfactory
        ingest`` skips it).

    Raises:
        UserError: missing path, a file that is not an image (:data:`IMAGE_SUFFIXES`), or a folder without images
            (naming its subfolders that hold some: predict reads only the folder itself).
    """
    d = Path(input_path)
    kinds = ", ".join(IMAGE_SUFFIXES)
    if d.is_file():
        if d.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"--input '{d}' is not an image file ({kinds})",
                            fix="pass an image (PNG, JPEG, TIFF, WebP, BMP) or a folder of them")
        return [d], []
    if d.is_symlink() and d.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"--input '{d}' is a symbolic link whose target does not exist", fix="fix or remove the link")
    if not d.is_dir():
        raise UserError(f"--input '{d}' does not exist", fix="pass a folder of images or one image file")
    files: list[Path] = []
    notes: list[str] = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.is_file():
            files.append(p)
        elif p.is_symlink() and not p.exists():
            notes.append(f"skipped '{p}': a symbolic link whose target does not exist")
    if not files:
        subs = _subfolders_with_images(d)
        where = f"; its subfolder(s) {', '.join(s + '/' for s in subs)} hold images" if subs else ""
        links = f" ({len(notes)} link(s) to missing files)" if notes else ""
        raise UserError(f"input folder '{d}' holds no images ({kinds}){links}{where}",
                        fix=(f"predict reads only the folder itself: pass --input {d / subs[0]}" if subs
                             else "point --input at a folder of images (PNG, JPEG, TIFF, WebP, BMP)"))
    return files, notes


def _subfolders_with_images(d: Path, limit: int = 5) -> list[str]:
    """Names of up to ``limit`` subfolders of ``d`` (at any depth, relative) that hold image files."""
    found: list[str] = []
    for root, dirs, names in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if Path(root) != d and any(Path(n).suffix.lower() in IMAGE_SUFFIXES and not n.startswith(".") for n in names):
            found.append(Path(root).relative_to(d).as_posix())
            if len(found) >= limit:
                break
    return found


@dataclass(frozen=True)
class InputImage:
    """One image predict reads: a file, or one page of a multi-page TIFF.

    Attributes:
        path: The file.
        page: The page of a TIFF stack, ``None`` for a file holding one image.
        stem: The name of its outputs: the file's stem, ``<stem>_p<N>`` for page N of a stack.
    """

    path: Path
    page: int | None
    stem: str

    @property
    def name(self) -> str:
        """How summaries name it: the file name, ``<name> page <N>`` for a stack's page."""
        return self.path.name if self.page is None else f"{self.path.name} page {self.page}"

    @property
    def coco_file_name(self) -> str:
        """Its ``file_name`` in ``instances.json``: the file's name, ``<stem>_p<N><suffix>`` for a stack's page (its
        outputs' name: each page its own COCO image; the entry's ``stack`` and ``page`` say where it is read)."""
        return self.path.name if self.page is None else f"{self.stem}{self.path.suffix}"


def input_images(files: list[Path]) -> tuple[list[InputImage], dict[str, str]]:
    """Every image of ``files``: a multi-page TIFF gives one per page (named ``<stem>_p<N>``, N zero-padded to the
    stack's length), as ``segfactory ingest`` takes a stack's slices.

    Returns:
        (the images in order, ``{file name: why}`` for TIFFs whose pages could not be counted).

    Raises:
        UserError: two images would write the same output (files sharing a stem, or a file named like a page).
    """
    out: list[InputImage] = []
    failures: dict[str, str] = {}
    for p in files:
        try:
            n = image_pages(p)
        except UserError as e:
            failures[p.name] = e.message
            continue
        if n == 1:
            out.append(InputImage(p, None, p.stem))
        else:
            width = len(str(n - 1))
            out += [InputImage(p, i, f"{p.stem}_p{i:0{width}d}") for i in range(n)]
    seen: dict[str, InputImage] = {}
    for im in out:
        if im.stem in seen:
            raise UserError(f"'{seen[im.stem].name}' and '{im.name}' would both write {im.stem}.png",
                            fix="rename one of them")
        seen[im.stem] = im
    return out, failures


def stacks_of(images: list[InputImage]) -> dict[str, int]:
    """``{file name: pages}`` of the multi-page TIFFs among ``images``."""
    stacks: dict[str, int] = {}
    for im in images:
        if im.page is not None:
            stacks[im.path.name] = stacks.get(im.path.name, 0) + 1
    return stacks


# Failures listed in the one-line error when no image could be predicted (the rest are counted).
MAX_LISTED = 20

# The folders predict writes images into, relative to --out: masks, instance masks, overlays.
OUTPUT_IMAGE_DIRS = (".", "instances", "overlays")


def resolve_input(value: str | os.PathLike) -> tuple[Path, str | None]:
    """The folder (or image file) ``--input`` names: a path, or ``sample:NAME/SPLIT`` materialized
    (:mod:`segfactory.sampledata`); of a folder in the labeled layout (``images/`` and ``masks/``, as a sample's
    ``eval`` and ``labeled`` splits) its ``images/``.

    Returns:
        (the folder or file, a note when a labeled folder's ``images/`` is taken for a path the user gave).

    Raises:
        UserError: an unknown sample set or split, or a reference without a split.
    """
    from segfactory.sampledata import is_sample_ref, resolve_path

    if not is_sample_ref(value):
        folder = Path(value)
        if (folder / "images").is_dir() and (folder / "masks").is_dir():
            return folder / "images", (f"--input '{folder}' is a labeled folder: predicting its images/ "
                                       f"({folder / 'images'})")
        return folder, None
    folder = resolve_path(value)
    return (folder / "images" if (folder / "images").is_dir() else folder), None


def check_input_not_output(input_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuse an ``--input`` folder (or an image file in a folder) predict writes images into (``OUT``,
    ``OUT/instances``, ``OUT/overlays``): a mask or overlay could replace an input image of the same name.

    Raises:
        UserError: naming both folders.
    """
    src, out = Path(input_dir).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if src.is_file():
        src = src.parent
    for sub in OUTPUT_IMAGE_DIRS:
        if src == (out / sub).resolve():
            where = "is --out" if sub == "." else f"is --out's {sub}/ (predict writes there)"
            raise UserError(f"--input '{input_dir}' {where}: the masks would replace the input images",
                            fix="pass another --out, e.g. a new folder next to the images")


def run_predict(model_dir: str | os.PathLike, input_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                device: str = "auto", tile: int | None = None, overlap: int | None = None,
                batch_size: int | None = None, overlays: bool = True, show_progress: bool = True,
                tta: str = "none", scale: float | str | None = None, instances: str = "auto",
                min_object: float | None = None) -> dict:
    """Predict every image of ``input_dir`` into ``out_dir`` (every page of a multi-page TIFF: :func:`input_images`).

    Args:
        input_dir: A folder of images, one image file, or ``sample:NAME/SPLIT`` (:func:`resolve_input`).
        tta: Test-time augmentation: ``none``, ``flip``, ``d4``, ``ms`` or ``ms_flip`` (:func:`predict_image_probs`).
        scale: Input scale instead of model.json's: a factor, or ``auto`` for each image's own estimate
            (:func:`resolve_scale`).
        instances: ``auto`` (write instances when the model has an instance head), ``on`` (required: a
            UserError for a model without one) or ``off``.
        min_object: Speck cleanup share instead of model.json's ``cleanup.min_object`` (0 = off;
            :mod:`finetune.cleanup`).

    Returns:
        Summary ``{"images", "failed", "seconds", "device", "tile", "overlap", "tta", "min_object", "input"}``
        (``images``: images and TIFF pages predicted; ``min_object``: the cleanup share used, ``None`` for a model
        without object sizes); ``input`` has the scale and the scaling, and with ``auto`` scaling how many images got
        each rule; with per-image scales ``scales`` (each image's, also in ``scales.json``); with multi-page TIFFs
        ``stacks`` (``{file name: pages predicted}``).

    Raises:
        UserError: a bad setting, or ``input_dir`` is a folder predict writes into (:func:`check_input_not_output`).
        PartialFailure: some images could not be read (the rest are written); its ``summary`` is this summary
            plus ``failures`` (why, by file name).
    """
    from finetune.instances import require_head
    from finetune.models import load_model_dir
    from segfactory.console import progress
    from segfactory.io import ensure_writable_dir

    if instances not in ("auto", "on", "off"):
        raise UserError(f"instances='{instances}' is not auto, on or off", fix="pass --instances auto|on|off")
    input_dir, input_note = resolve_input(input_dir)
    check_input_not_output(input_dir, out_dir)
    meta0 = read_model_meta(model_dir)
    if instances == "on":
        require_head(meta0, model_dir)
    with_inst = instances != "off" and bool(meta0.get("instances"))
    dev = resolve_device(device)
    model, meta = load_model_dir(model_dir, dev)
    tile, overlap, batch_size = inference_settings(meta, tile, overlap, batch_size)
    check_tta(tta)
    meta = resolve_scale(meta, scale)
    from finetune.cleanup import with_min_object

    meta = with_min_object(meta, min_object)
    per_image = per_image_scales(meta)
    files, notes = list_images(input_dir)
    notes = ([input_note] if input_note else []) + notes
    from segfactory.console import console

    for note in notes:
        console.print(note, soft_wrap=True, markup=False)
    images, failures = input_images(files)
    out_existed = Path(out_dir).exists()
    out = ensure_writable_dir(out_dir)
    cl = dev.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    palette = model_palette(meta)
    coco_images: list[dict[str, Any]] = []
    coco_anns: list[dict[str, Any]] = []
    rules: dict[str, int] = {}
    image_scales: dict[str, float] = {}
    t0 = time.perf_counter()
    with progress(transient=not show_progress) as bar, memory_hint("prediction", memory_settings(batch_size, tile)):
        task = bar.add_task("predict", total=len(images))
        for im in images:
            try:
                img = read_image(im.path, page=im.page or 0)
                rule = resolve_scaling(img, meta["input"]["scaling"])
            except UserError as e:
                failures[im.name] = e.message
                bar.advance(task)
                continue
            rules[rule] = rules.get(rule, 0) + 1
            f = image_scale(model, meta, img, dev, tile, overlap, batch_size, amp_dtype(dev), cl)
            if f is not None:
                image_scales[im.name] = f
            mask, inst, _ = predict_outputs(model, meta, img, dev, tile, overlap, batch_size, amp_dtype(dev), cl,
                                            scale=f, tta=tta, instances=with_inst)
            atomic_write_bytes(out / f"{im.stem}.png", encode_png(mask))
            if inst is not None:
                from segfactory.formats.coco import frame_annotations

                if int(inst.max()) > 65535:
                    raise UserError(f"'{im.name}' has {int(inst.max())} instances, more than a uint16 PNG holds",
                                    fix="predict smaller images (tile the input)")
                inst16 = inst.astype(np.uint16)
                atomic_write_bytes(out / "instances" / f"{im.stem}.png", encode_png(inst16))
                image_id = len(coco_images) + 1
                coco_images.append({"id": image_id, "file_name": im.coco_file_name, "height": int(mask.shape[0]),
                                    "width": int(mask.shape[1]),
                                    **({} if im.page is None else {"stack": im.path.name, "page": im.page})})
                coco_anns += frame_annotations(inst16, mask, image_id, len(coco_anns) + 1)
            if overlays:
                ov = overlay(img, mask, palette, scaling=meta["input"]["scaling"], instances=inst)
                atomic_write_bytes(out / "overlays" / f"{im.stem}.jpg", encode_jpeg(ov))
            bar.advance(task)
    read = len(images) - sum(1 for im in images if im.name in failures)
    summary = {"images": read, "failed": len(failures),
               "seconds": round(time.perf_counter() - t0, 3), "device": str(dev), "tile": tile, "overlap": overlap,
               "tta": tta, "min_object": (meta.get("cleanup") or {}).get("min_object"),
               "input": {"scaling": meta["input"]["scaling"], "scaling_used": rules,
                                     "scale": "per_image" if per_image else float(meta["input"].get("scale", 1.0))},
               "out": str(out), "instances": None}
    if stacks := stacks_of(images):
        summary["stacks"] = stacks
    if per_image:
        from segfactory.io import atomic_write_json

        summary["input"]["scales"] = image_scales
        atomic_write_json(out / "scales.json", image_scales)
    if with_inst:
        from segfactory.formats.coco import coco_document
        from segfactory.io import atomic_write_json

        things = {int(c) for c in meta["instances"]["things"]}
        classes = [{**c, "thing": int(c["id"]) in things} for c in meta["classes"]]
        atomic_write_json(out / "instances.json",
                          coco_document(coco_images, coco_anns, classes, f"segfactory predict {model_dir}"))
        summary["instances"] = {"objects": len(coco_anns), "coco": str(out / "instances.json"),
                                "method": meta["instances"]["method"]}
    if notes:
        summary["notes"] = notes
    if failures and not read:  # nothing predicted: a user error, as ingest's "every file was rejected"
        if not out_existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when this run made it and wrote nothing into it
        shown = list(failures.items())[:MAX_LISTED]
        more = f"\n  ... and {len(failures) - len(shown)} more" if len(failures) > len(shown) else ""
        raise UserError(f"none of {len(failures)} image(s) could be predicted:\n"
                        + "\n".join(f"  {name}: {why}" for name, why in shown) + more,
                        fix="check the files named above (convert or re-save them) and run again")
    if failures:
        summary["failures"] = failures
        total = read + len(failures)
        raise PartialFailure(f"{len(failures)} of {total} image(s) could not be predicted", failures, summary)
    return summary
