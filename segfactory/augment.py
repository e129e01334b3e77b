"""Colour jitter and Gaussian blur of image batches with kornia, in two halves: sample, then apply.

``sample`` draws every parameter of the op for every sample from an explicit ``torch.Generator``, whether the op
is on or not, so one call always takes the same random numbers from the generator; ``apply`` then does only what
is switched on. Turning an op off (a probability or strength of 0) thus leaves every other op's parameters, and
every later draw, as they were. This is kornia's split of ``generate_parameters`` and ``apply_transform``; its
augmentation modules are not used directly because they draw from torch's global RNG (the project allows
explicit generators only; resumed runs must repeat uninterrupted ones).

Parameters are drawn on the generator's device and moved to the images' device when applied, so a CPU generator
works for images on a GPU and a GPU generator keeps everything on the GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import kornia
import torch

Params = dict[str, torch.Tensor]


def param_rows(params: Any, lo: int, hi: int, per_batch: frozenset[str] = frozenset({"order"})) -> Any:
    """Rows ``lo:hi`` of every per-sample tensor in a (nested) parameter dict of a ``sample`` call.

    Data-parallel training draws a global batch's parameters on every rank (same generator, same draws) and
    keeps its own rows, so the ranks' augmentations together are the single-process ones. Keys in ``per_batch``
    (ColorJitter's op ``order``, drawn once per batch) and 0-d tensors are kept whole.
    """
    if isinstance(params, dict):
        return {k: v if k in per_batch else param_rows(v, lo, hi, per_batch) for k, v in params.items()}
    return params[lo:hi] if isinstance(params, torch.Tensor) and params.ndim > 0 else params


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.to(a.device).view(-1, 1, 1, 1), a, b)


@dataclass(frozen=True)
class ColorJitter:
    """Brightness, contrast, saturation and hue jitter with torchvision's semantics (as lightly's transforms use).

    Attributes:
        p: Probability that a sample is jittered at all.
        brightness, contrast, saturation: Strengths ``s``: factors uniform in ``[max(0, 1 - s), 1 + s]``
            (brightness multiplies, contrast blends with the mean gray, saturation with the grayscale image).
        hue: Shift uniform in ``[-hue, hue]`` of the colour circle (a rotation of the YUV chroma plane).

    The four are applied in one random order per call (torchvision's ``ColorJitter``); saturation and hue only to
    3-channel images.
    """

    p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1

    def sample(self, n: int, gen: torch.Generator) -> Params:
        """``{"apply" (n,) bool, "brightness", "contrast", "saturation" (n,) factors, "hue" (n,) radians,
        "order" (4,)}``: 5n uniforms and one permutation of 4, whatever the settings."""
        u = _rand(gen, n, 5)

        def factor(col: int, s: float) -> torch.Tensor:
            lo = max(0.0, 1 - s)
            return lo + (1 + s - lo) * u[:, col]

        return {"apply": u[:, 0] < self.p, "brightness": factor(1, self.brightness),
                "contrast": factor(2, self.contrast), "saturation": factor(3, self.saturation),
                "hue": (2 * u[:, 4] - 1) * self.hue * 2 * math.pi,
                "order": torch.randperm(4, generator=gen, device=gen.device)}

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Jitter the samples ``params["apply"]`` picks.

        Args:
            x: (B, C, H, W) in [0, 1].
        """
        if self.p <= 0:
            return x
        c = x.shape[1]
        f = {k: params[k].to(x.device, x.dtype) for k in ("brightness", "contrast", "saturation", "hue")}
        y = x
        for k in params["order"].tolist():
            if k == 0 and self.brightness > 0:
                y = (y * f["brightness"].view(-1, 1, 1, 1)).clamp(0, 1)
            elif k == 1 and self.contrast > 0:
                y = kornia.enhance.adjust_contrast_with_mean_subtraction(y, f["contrast"]).clamp(0, 1)
            elif k == 2 and self.saturation > 0 and c == 3:
                s = f["saturation"].view(-1, 1, 1, 1)
                y = (y * s + kornia.color.rgb_to_grayscale(y) * (1 - s)).clamp(0, 1)
            elif k == 3 and self.hue > 0 and c == 3:
                y = rotate_hue(y, f["hue"]).clamp(0, 1)
        return _where(params["apply"], y, x)


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


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with a per-sample sigma.

    Attributes:
        p: Probability that a sample is blurred.
        sigma: Range of the sigma (px), drawn uniformly.

    The kernel covers 3 sigma of the largest sigma each side (capped at the image side), so the blur is the
    Gaussian the sigma says at every image size.
    """

    p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)

    def sample(self, n: int, gen: torch.Generator) -> Params:
        """``{"apply" (n,) bool, "sigma" (n,)}``: 2n uniforms, whatever the settings."""
        u = _rand(gen, n, 2)
        lo, hi = self.sigma
        return {"apply": u[:, 0] < self.p, "sigma": lo + (hi - lo) * u[:, 1]}

    def kernel_size(self, side: int) -> int:
        """Odd kernel side: ``2 * ceil(3 * max sigma) + 1``, at most the largest odd number <= ``side``."""
        return max(1, min(2 * math.ceil(3 * self.sigma[1]) + 1, side - (1 - side % 2)))

    def apply(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        """Blur the samples ``params["apply"]`` picks (only those are computed).

        Args:
            x: (B, C, H, W).
        """
        idx = params["apply"].nonzero().flatten()
        if len(idx) == 0:
            return x
        k = self.kernel_size(min(x.shape[-2:]))
        sigma = params["sigma"][idx].view(-1, 1).expand(-1, 2).to(x.device, x.dtype)
        idx = idx.to(x.device)
        return x.index_copy(0, idx, kornia.filters.gaussian_blur2d(x[idx], (k, k), sigma))
