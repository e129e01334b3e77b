"""Mask-safe augmentation on the training device with kornia.

Why not ``kornia.augmentation``: its modules draw parameters from torch's global RNG (the project forbids
global RNG; resume must be exact) and pad masks with 0, which is a real class. Here the parameters come from
an explicit ``torch.Generator`` and every geometric change is one affine matrix per sample, applied with
kornia's ``warp_affine`` to the image (bilinear) and to the mask (nearest, out-of-image pixels -> ignore).
"""

from __future__ import annotations

import math

import torch
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import warp_affine

from finetune.config import AugmentConfig

# Columns of the per-sample uniform draw (one draw per batch keeps the generator stream simple).
_U_AREA, _U_RATIO, _U_CX, _U_CY, _U_HFLIP, _U_VFLIP, _U_ROT_P, _U_ROT, _U_JIT_P, _U_BRI, _U_CON, _U_SAT, \
    _U_HUE, _U_BLUR_P, _U_BLUR, _U_NOISE_P = range(16)


def crop_matrices(u: torch.Tensor, window: int, size: int, cfg: AugmentConfig, random: bool) -> torch.Tensor:
    """Source->destination pixel affines (B, 2, 3) for random-resized-crop, flips and rotation.

    Pixel-index coordinates (``align_corners=True``): the crop ``[x0, x0 + w)`` of the window maps onto the
    output ``[0, size)``, flipped and rotated about the output centre.

    Args:
        u: (B, 16) uniforms in [0, 1).
        window: Side of the input window L.
        size: Side of the output crop S.
        random: ``False`` gives the deterministic whole-window resize (augmentation disabled).
    """
    b, dev = u.shape[0], u.device
    if random:
        log_r = math.log(cfg.ratio[0]) + (math.log(cfg.ratio[1]) - math.log(cfg.ratio[0])) * u[:, _U_RATIO]
        r = torch.exp(log_r)
        if cfg.zoom is not None:
            # Objects are resized by z (log-uniform): the crop covers size / z window pixels, which may exceed
            # the window (zooming out); what lies beyond the image becomes ignore.
            lz = math.log(cfg.zoom[0]) + (math.log(cfg.zoom[1]) - math.log(cfg.zoom[0])) * u[:, _U_AREA]
            side = size / torch.exp(lz)
            w, h = side * torch.sqrt(r), side / torch.sqrt(r)
        else:
            lo, hi = cfg.scale
            area = lo + (hi - lo) * u[:, _U_AREA]
            w = (window * torch.sqrt(area * r)).clamp(max=window)
            h = (window * torch.sqrt(area / r)).clamp(max=window)
        # A crop larger than the window is centred with a random offset of up to its excess.
        cx = w / 2 + (window - w) * u[:, _U_CX]
        cy = h / 2 + (window - h) * u[:, _U_CY]
        fx = torch.where(u[:, _U_HFLIP] < cfg.hflip, -1.0, 1.0)
        fy = torch.where(u[:, _U_VFLIP] < cfg.vflip, -1.0, 1.0)
        theta = torch.where(u[:, _U_ROT_P] < cfg.rotate_p,
                            (2 * u[:, _U_ROT] - 1) * math.radians(cfg.rotate_deg), torch.zeros((), device=dev))
    else:
        w = h = torch.full((b,), float(window), device=dev)
        cx = cy = torch.full((b,), window / 2, device=dev)
        fx = fy = torch.ones(b, device=dev)
        theta = torch.zeros(b, device=dev)
    sx, sy = fx * size / w, fy * size / h
    cos, sin = torch.cos(theta), torch.sin(theta)
    a = torch.stack([torch.stack([cos * sx, -sin * sy], -1), torch.stack([sin * sx, cos * sy], -1)], -2)  # (B,2,2)
    c_src = torch.stack([cx - 0.5, cy - 0.5], -1)  # crop centre in pixel-index coordinates
    c_dst = torch.full((b, 2), size / 2 - 0.5, device=dev)
    t = c_dst - (a @ c_src.unsqueeze(-1)).squeeze(-1)
    return torch.cat([a, t.unsqueeze(-1)], -1)


class GpuAugment:
    """Augment a batch on its device.

    Args:
        cfg: Augmentation settings (``crop_size`` is the output side S).
        ignore_index: Mask value for "not labeled"; also given to pixels that come from outside the image.
    """

    def __init__(self, cfg: AugmentConfig, ignore_index: int = 255):
        self.cfg = cfg
        self.ignore_index = ignore_index

    @property
    def geometric(self) -> GpuAugment:
        """The same geometric augmentation without any photometric change (a 'weak' view)."""
        return GpuAugment(self.cfg.model_copy(update={"jitter_p": 0.0, "blur_p": 0.0, "noise_p": 0.0}),
                          self.ignore_index)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply geometric (image + mask) then photometric (image) augmentation.

        Args:
            image: (B, C, L, L) float in [0, 1], C = 1 or 3.
            mask: (B, L, L) integer class ids.
            generator: On the same device as ``image``.

        Returns:
            image (B, C, S, S) float in [0, 1], mask (B, S, S) int64 with ``ignore_index`` kept.
        """
        cfg, (b, c, window, _) = self.cfg, image.shape
        size = cfg.crop_size
        u = torch.rand(b, 16, generator=generator, device=image.device)
        m = crop_matrices(u, window, size, cfg, cfg.enabled)
        image = warp_affine(image, m, (size, size), mode="bilinear", padding_mode="reflection",
                            align_corners=True)
        # Shift ids by one so that zero padding marks "outside the image" instead of class 0.
        shifted = warp_affine(mask.unsqueeze(1).float() + 1, m, (size, size), mode="nearest",
                              padding_mode="zeros", align_corners=True)
        shifted = shifted.squeeze(1).round().long()
        mask = torch.where(shifted == 0, self.ignore_index, shifted - 1)
        if not cfg.enabled:
            return image, mask
        jit = (u[:, _U_JIT_P] < cfg.jitter_p).float()
        if cfg.brightness:
            image = adjust_brightness(image, (2 * u[:, _U_BRI] - 1) * cfg.brightness * jit)
        if cfg.contrast:
            image = adjust_contrast(image, 1 + (2 * u[:, _U_CON] - 1) * cfg.contrast * jit)
        if c == 3 and cfg.saturation:
            image = adjust_saturation(image, 1 + (2 * u[:, _U_SAT] - 1) * cfg.saturation * jit)
        if c == 3 and cfg.hue:
            image = adjust_hue(image, (2 * u[:, _U_HUE] - 1) * cfg.hue * 2 * math.pi * jit)
        if cfg.blur_p:
            lo, hi = cfg.blur_sigma
            k = min(2 * math.ceil(3 * hi) + 1, size - (1 - size % 2))
            sigma = (lo + (hi - lo) * u[:, _U_BLUR]).unsqueeze(1).expand(b, 2).contiguous()
            blurred = gaussian_blur2d(image, (k, k), sigma)
            image = torch.where((u[:, _U_BLUR_P] < cfg.blur_p).view(b, 1, 1, 1), blurred, image)
        if cfg.noise_p and cfg.noise_std:
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=image.dtype)
            image = image + noise * (cfg.noise_std * (u[:, _U_NOISE_P] < cfg.noise_p).float().view(b, 1, 1, 1))
        return image.clamp_(0, 1), mask
