"""Mask-safe augmentation on the training device with kornia.

Why not ``kornia.augmentation``: its modules draw parameters from torch's global RNG (the project forbids
global RNG; resume must be exact) and pad masks with 0, which is a real class. Here the parameters come from
an explicit ``torch.Generator`` and every geometric change is one affine matrix per sample, applied with
kornia's ``warp_affine`` to the image (bilinear) and to the mask (nearest, out-of-image pixels -> ignore).
Colour jitter and blur are :mod:`segfactory.augment`'s (shared with pretraining). A batch's parameters are all
drawn first, a fixed number whatever ops are on (:meth:`GpuAugment.sample`), then only the enabled ops are
applied (:meth:`GpuAugment.apply`): switching an op off does not shift any other draw.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from kornia.geometry.transform import warp_affine

from finetune.config import AugmentConfig
from segfactory.augment import ColorJitter, GaussianBlur, param_rows

# Columns of the per-sample uniform draw of the geometry (one draw per batch keeps the generator stream simple).
_U_AREA, _U_RATIO, _U_CX, _U_CY, _U_HFLIP, _U_VFLIP, _U_ROT_P, _U_ROT, _U_NOISE_P = range(9)


def crop_matrices(u: torch.Tensor, window: int, size: int, cfg: AugmentConfig, random: bool) -> torch.Tensor:
    """Source->destination pixel affines (B, 2, 3) for random-resized-crop, flips and rotation.

    Pixel-index coordinates (``align_corners=True``): the crop ``[x0, x0 + w)`` of the window maps onto the
    output ``[0, size)``, flipped and rotated about the output centre.

    Args:
        u: (B, 9) uniforms in [0, 1) (the columns ``_U_*``).
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
        self.jitter = ColorJitter(cfg.jitter_p, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        self.blur = GaussianBlur(cfg.blur_p, cfg.blur_sigma)

    def sample(self, b: int, generator: torch.Generator) -> dict[str, Any]:
        """Every random parameter of a batch of ``b``, on the generator's device: the same draws whatever ops
        are on, also with augmentation disabled.

        Returns:
            ``{"u" (b, 9) uniforms (columns ``_U_*``), "jitter", "blur" (:mod:`segfactory.augment` parameters),
            "noise_seed" (1,)}``.
        """
        dev = generator.device
        return {"u": torch.rand(b, 9, generator=generator, device=dev),
                "jitter": self.jitter.sample(b, generator), "blur": self.blur.sample(b, generator),
                # The noise image itself comes from a generator seeded with this, so its size does not matter.
                "noise_seed": torch.randint(0, 2**62, (1,), generator=generator, device=dev)}

    def sample_rows(self, total: int, lo: int, hi: int, generator: torch.Generator) -> dict[str, Any]:
        """Rows ``lo:hi`` of the parameters of a batch of ``total`` (:meth:`sample`): a data-parallel rank's share.

        Every rank draws the global batch's parameters from the same generator (which therefore stays in step
        across ranks and with a single process) and keeps its rows; :meth:`apply` then draws the global batch's
        noise image and keeps the same rows, so each sample is augmented exactly as in a single process.
        """
        params = self.sample(total, generator)
        if (lo, hi) == (0, total):
            return params
        rows: dict[str, Any] = param_rows(params, lo, hi, frozenset({"order", "noise_seed"}))
        rows["noise_rows"] = (lo, total)
        return rows

    @property
    def geometric(self) -> GpuAugment:
        """The same geometric augmentation without any photometric change (a 'weak' view)."""
        return GpuAugment(self.cfg.model_copy(update={"jitter_p": 0.0, "blur_p": 0.0, "noise_p": 0.0}),
                          self.ignore_index)

    @torch.no_grad()
    def apply(self, image: torch.Tensor, mask: torch.Tensor,
              params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Geometric (image + mask) then photometric (image) augmentation with the parameters of :meth:`sample`.

        Args:
            image: (B, C, L, L) float in [0, 1], C = 1 or 3.
            mask: (B, L, L) integer class ids.

        Returns:
            image (B, C, S, S) float in [0, 1], mask (B, S, S) int64 with ``ignore_index`` kept.
        """
        cfg, (b, _, window, _) = self.cfg, image.shape
        size = cfg.crop_size
        u = params["u"].to(image.device)
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
        image = self.jitter.apply(image, params["jitter"])
        image = self.blur.apply(image, params["blur"])
        if cfg.noise_p and cfg.noise_std:
            gen = torch.Generator(device=image.device).manual_seed(int(params["noise_seed"]))
            if "noise_rows" in params:  # a rank's rows of the global batch's noise (sample_rows)
                lo, total = params["noise_rows"]
                noise = torch.randn((total, *image.shape[1:]), generator=gen, device=image.device,
                                    dtype=image.dtype)[lo:lo + b]
            else:
                noise = torch.randn(image.shape, generator=gen, device=image.device, dtype=image.dtype)
            image = image + noise * (cfg.noise_std * (u[:, _U_NOISE_P] < cfg.noise_p).float().view(b, 1, 1, 1))
        return image.clamp_(0, 1), mask

    @torch.no_grad()
    def warp_ids(self, ids: torch.Tensor, params: dict[str, Any], window: int) -> torch.Tensor:
        """Warp an id map (instance ids) exactly like :meth:`apply` warps the class map (nearest, same affine).

        Args:
            ids: (B, L, L) integer ids >= -1 (-1 = unknown), below 2**24 (exact in float32).
            params: The parameters :meth:`apply` got.
            window: L, the side of the input window.

        Returns:
            (B, S, S) int64 ids; pixels from outside the window (or unknown) are -1.
        """
        size = self.cfg.crop_size
        m = crop_matrices(params["u"].to(ids.device), window, size, self.cfg, self.cfg.enabled)
        # Shift by two so that zero padding (outside the image) and unknown (-1 -> 1) stay apart from ids >= 0.
        shifted = warp_affine(ids.unsqueeze(1).float() + 2, m, (size, size), mode="nearest", padding_mode="zeros",
                              align_corners=True).squeeze(1).round().long()
        return torch.where(shifted <= 1, -1, shifted - 2)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sample` from ``generator`` (on the same device as ``image``), then :meth:`apply`."""
        return self.apply(image, mask, self.sample(image.shape[0], generator))
