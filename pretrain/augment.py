"""Batched view generation on the training device with kornia.

Parameters (crop boxes, flip masks, jitter factors, blur sigmas) are drawn from an explicit
``torch.Generator`` on the CPU and the pixel work runs batched with kornia's functional ops on the device
of the images, so augmentation costs one kernel launch per op per view instead of per-sample Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import kornia
import torch

if TYPE_CHECKING:  # the config module imports the method registry, which imports this module
    from pretrain.config import AugmentConfig


@dataclass(frozen=True)
class ViewSpec:
    """One view of a method's augmentation recipe (torchvision/lightly semantics).

    Attributes:
        size: Output side (px).
        scale: Range of the crop's area fraction of the image.
        ratio: Range of the crop's aspect ratio.
        hflip, vflip: Flip probabilities.
        rot90: Rotate by a random multiple of 90 degrees.
        jitter_p: Probability of colour jitter.
        brightness, contrast, saturation, hue: Jitter strengths (hue as a fraction of the colour circle).
        gray_p: Probability of converting to grayscale.
        blur_p: Probability of Gaussian blur; ``sigma`` its range in px.
        solarize_p: Probability of solarization (threshold 0.5).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: bool = False
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def adjust_specs(specs: list[ViewSpec], aug: AugmentConfig, single_channel: bool) -> list[ViewSpec]:
    """Apply the user's ``augment`` switches to a method's view specs."""
    out = []
    s = aug.jitter_strength
    for v in specs:
        v = replace(v, brightness=v.brightness * s, contrast=v.contrast * s, saturation=v.saturation * s,
                    hue=v.hue * s, vflip=0.5 if aug.vflip else v.vflip, rot90=aug.rot90 or v.rot90)
        if single_channel:
            # one-channel intensities (microscopy, X-ray): hue, saturation and grayscale have no meaning
            v = replace(v, saturation=0.0, hue=0.0, gray_p=0.0)
        if not aug.blur:
            v = replace(v, blur_p=0.0)
        if not aug.solarize:
            v = replace(v, solarize_p=0.0)
        out.append(v)
    return out


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def crop_boxes(n: int, side: int, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """Random-resized-crop boxes for ``n`` images of size (side, side).

    Returns:
        (n, 4, 2) corner points (x, y): top-left, top-right, bottom-right, bottom-left, in pixels
        (kornia's box format).
    """
    area = _uniform(n, *spec.scale, gen) * side * side
    log_r = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), gen)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(1, side)
    h = torch.sqrt(area / r).clamp(1, side)
    x0 = torch.rand(n, generator=gen) * (side - w)
    y0 = torch.rand(n, generator=gen) * (side - h)
    x1, y1 = x0 + w - 1, y0 + h - 1
    return torch.stack([torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
                        torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], 1)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def color_jitter(x: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """Brightness/contrast/saturation/hue jitter on a random subset, in a random order (torchvision style).

    Args:
        x: (B, C, H, W) in [0, 1]; saturation and hue only apply when C == 3.
    """
    b, c = x.shape[:2]
    dev = x.device
    apply = (torch.rand(b, generator=gen) < spec.jitter_p).to(dev)
    factors = {
        "brightness": _uniform(b, max(0.0, 1 - spec.brightness), 1 + spec.brightness, gen).to(dev),
        "contrast": _uniform(b, max(0.0, 1 - spec.contrast), 1 + spec.contrast, gen).to(dev),
        "saturation": _uniform(b, max(0.0, 1 - spec.saturation), 1 + spec.saturation, gen).to(dev),
        "hue": (_uniform(b, -spec.hue, spec.hue, gen) * 2 * math.pi).to(dev),
    }
    order = torch.randperm(4, generator=gen).tolist()
    y = x
    for k in order:
        if k == 0 and spec.brightness > 0:
            y = (y * factors["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
        elif k == 1 and spec.contrast > 0:
            y = kornia.enhance.adjust_contrast_with_mean_subtraction(y, factors["contrast"]).clamp(0, 1)
        elif k == 2 and spec.saturation > 0 and c == 3:
            # torchvision's definition (blend with the grayscale image), as lightly's transforms use
            f = factors["saturation"].view(-1, 1, 1, 1)
            y = (y * f + kornia.color.rgb_to_grayscale(y) * (1 - f)).clamp(0, 1)
        elif k == 3 and spec.hue > 0 and c == 3:
            y = rotate_hue(y, factors["hue"]).clamp(0, 1)
    return _where(apply, y, x)


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Hue shift as a rotation of the chroma plane in YUV (linear; ~5x cheaper than an HSV round trip).

    Args:
        x: (B, 3, H, W) RGB in [0, 1].
        angle: (B,) radians.
    """
    yuv = kornia.color.rgb_to_yuv(x)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    u, v = yuv[:, 1], yuv[:, 2]
    return kornia.color.yuv_to_rgb(torch.stack([yuv[:, 0], cos * u - sin * v, sin * u + cos * v], 1))


def make_view(x: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch.

    Args:
        x: (B, C, L, L) float images in [0, 1] on the training device.
        spec: The view recipe.
        gen: CPU generator for the random parameters.

    Returns:
        (B, C, size, size) in [0, 1] (not yet normalized).
    """
    b, c, side = x.shape[0], x.shape[1], x.shape[-1]
    dev = x.device
    boxes = crop_boxes(b, side, spec, gen)
    # the box -> output map is axis-aligned: an affine warp is exact and cheaper than crop_and_resize's
    # perspective warp (same pixels to 1e-4)
    x0, y0, x1, y1 = boxes[:, 0, 0], boxes[:, 0, 1], boxes[:, 2, 0], boxes[:, 2, 1]
    sx, sy = (spec.size - 1) / (x1 - x0).clamp_min(1e-3), (spec.size - 1) / (y1 - y0).clamp_min(1e-3)
    m = torch.zeros(b, 2, 3)
    m[:, 0, 0], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2] = sx, -sx * x0, sy, -sy * y0
    v = kornia.geometry.transform.warp_affine(x, m.to(dev, x.dtype), (spec.size, spec.size), align_corners=True)
    if spec.hflip > 0:
        v = _where((torch.rand(b, generator=gen) < spec.hflip).to(dev), v.flip(-1), v)
    if spec.vflip > 0:
        v = _where((torch.rand(b, generator=gen) < spec.vflip).to(dev), v.flip(-2), v)
    if spec.rot90:
        k = torch.randint(0, 4, (b,), generator=gen).to(dev)
        v = torch.stack([v, v.rot90(1, (-2, -1)), v.rot90(2, (-2, -1)), v.rot90(3, (-2, -1))], 0)[
            k, torch.arange(b, device=dev)]
    if spec.jitter_p > 0:
        v = color_jitter(v, spec, gen)
    if spec.gray_p > 0 and c == 3:
        g = kornia.color.rgb_to_grayscale(v).expand(-1, 3, -1, -1)
        v = _where((torch.rand(b, generator=gen) < spec.gray_p).to(dev), g, v)
    if spec.blur_p > 0:
        mask = torch.rand(b, generator=gen) < spec.blur_p
        sig = _uniform(b, *spec.sigma, gen)
        idx = mask.nonzero().flatten()
        if len(idx):
            # kernel ~ 10% of the view side (23 px at 224, as in SimCLR/BYOL), odd, >= 3
            k = max(3, int(0.1 * spec.size) // 2 * 2 + 1)
            sigma = sig[idx].view(-1, 1).expand(-1, 2).to(dev, v.dtype)
            idx_d = idx.to(dev)
            v = v.index_copy(0, idx_d, kornia.filters.gaussian_blur2d(v[idx_d], (k, k), sigma))
    if spec.solarize_p > 0:
        mask = (torch.rand(b, generator=gen) < spec.solarize_p).to(dev)
        v = _where(mask, torch.where(v >= 0.5, 1.0 - v, v), v)
    return v


class ViewMaker:
    """Turns a uint8 batch into a method's normalized views, batched on the batch's device.

    Args:
        specs: One spec per view.
        mean, std: Per-channel input normalization (length C).
    """

    def __init__(self, specs: list[ViewSpec], mean: list[float], std: list[float]):
        self.specs = specs
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, gen: torch.Generator, channels_last: bool = False) -> list[torch.Tensor]:
        """(B, C, L, L) uint8 -> list of (B, C, size_i, size_i) float views, normalized."""
        x = batch.float().div_(255.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        views = []
        for spec in self.specs:
            v = (make_view(x, spec, gen) - mean) / std
            views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
        return views
