"""Batched view generation on the training device with kornia.

Parameters (crop boxes, flip masks, jitter factors, blur sigmas) are drawn from an explicit
``torch.Generator`` on the CPU, a fixed number per view whatever ops are on (:func:`sample_view`), and the pixel
work runs batched with kornia's functional ops on the device of the images (:func:`apply_view`), so
augmentation costs one kernel launch per op per view instead of per-sample Python. Colour jitter and blur are
:mod:`segfactory.augment`'s, shared with fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import kornia
import torch

from segfactory.augment import ColorJitter, GaussianBlur, param_rows

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
    return torch.where(mask.to(a.device).view(-1, 1, 1, 1), a, b)


def _jitter(spec: ViewSpec) -> ColorJitter:
    return ColorJitter(spec.jitter_p, spec.brightness, spec.contrast, spec.saturation, spec.hue)


def _blur(spec: ViewSpec) -> GaussianBlur:
    return GaussianBlur(spec.blur_p, spec.sigma)


def sample_view(n: int, side: int, spec: ViewSpec, gen: torch.Generator) -> dict[str, Any]:
    """Every random parameter of one view of ``n`` images of size (side, side).

    All ops' parameters are drawn, whether the spec switches them on or not, so a view always takes the same
    random numbers from ``gen``: turning one op off changes no other op's parameters and no later view's.

    Returns:
        ``{"boxes" (n, 4, 2), "hflip", "vflip" (n,) bool, "rot90" (n,) quarter turns, "jitter", "blur"
        (:mod:`segfactory.augment` parameters), "gray", "solarize" (n,) bool}``, on the CPU.
    """
    boxes = crop_boxes(n, side, spec, gen)
    u = torch.rand(n, 4, generator=gen)
    return {"boxes": boxes, "hflip": u[:, 0] < spec.hflip, "vflip": u[:, 1] < spec.vflip,
            "rot90": torch.randint(0, 4, (n,), generator=gen), "jitter": _jitter(spec).sample(n, gen),
            "gray": u[:, 2] < spec.gray_p, "blur": _blur(spec).sample(n, gen), "solarize": u[:, 3] < spec.solarize_p}


def apply_view(x: torch.Tensor, spec: ViewSpec, params: dict[str, Any]) -> torch.Tensor:
    """One augmented view of a batch with the parameters of :func:`sample_view`.

    Args:
        x: (B, C, L, L) float images in [0, 1] on the training device.

    Returns:
        (B, C, size, size) in [0, 1] (not yet normalized).
    """
    b, c = x.shape[0], x.shape[1]
    dev = x.device
    boxes = params["boxes"]
    # the box -> output map is axis-aligned: an affine warp is exact and cheaper than crop_and_resize's
    # perspective warp (same pixels to 1e-4)
    x0, y0, x1, y1 = boxes[:, 0, 0], boxes[:, 0, 1], boxes[:, 2, 0], boxes[:, 2, 1]
    sx, sy = (spec.size - 1) / (x1 - x0).clamp_min(1e-3), (spec.size - 1) / (y1 - y0).clamp_min(1e-3)
    m = torch.zeros(b, 2, 3)
    m[:, 0, 0], m[:, 0, 2], m[:, 1, 1], m[:, 1, 2] = sx, -sx * x0, sy, -sy * y0
    v = kornia.geometry.transform.warp_affine(x, m.to(dev, x.dtype), (spec.size, spec.size), align_corners=True)
    if spec.hflip > 0:
        v = _where(params["hflip"], v.flip(-1), v)
    if spec.vflip > 0:
        v = _where(params["vflip"], v.flip(-2), v)
    if spec.rot90:
        k = params["rot90"].to(dev)
        v = torch.stack([v, v.rot90(1, (-2, -1)), v.rot90(2, (-2, -1)), v.rot90(3, (-2, -1))], 0)[
            k, torch.arange(b, device=dev)]
    v = _jitter(spec).apply(v, params["jitter"])
    if spec.gray_p > 0 and c == 3:
        g = kornia.color.rgb_to_grayscale(v).expand(-1, 3, -1, -1)
        v = _where(params["gray"], g, v)
    v = _blur(spec).apply(v, params["blur"])
    if spec.solarize_p > 0:
        v = _where(params["solarize"], torch.where(v >= 0.5, 1.0 - v, v), v)
    return v


def make_view(x: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of a batch: :func:`sample_view` then :func:`apply_view`.

    Args:
        x: (B, C, L, L) float images in [0, 1] on the training device.
        spec: The view recipe.
        gen: CPU generator for the random parameters.

    Returns:
        (B, C, size, size) in [0, 1] (not yet normalized).
    """
    return apply_view(x, spec, sample_view(x.shape[0], x.shape[-1], spec, gen))


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

    def __call__(self, batch: torch.Tensor, gen: torch.Generator, channels_last: bool = False,
                 rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
        """(B, C, L, L) uint8 -> list of (B, C, size_i, size_i) float views, normalized.

        With ``world_size > 1`` the batch is rank ``rank``'s slice of a global batch of ``B * world_size``: the
        parameters are drawn for the global batch and this rank's rows taken, so the ranks' views together are
        the single-process views.
        """
        x = batch.float().div_(255.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        b = x.shape[0]
        views = []
        for spec in self.specs:
            params = sample_view(b * world_size, x.shape[-1], spec, gen)
            if world_size > 1:
                params = param_rows(params, rank * b, (rank + 1) * b)
            v = (apply_view(x, spec, params) - mean) / std
            views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
        return views
