"""Image-space post-processing of rendered RGB (exposure, gamma, defocus, shot and read noise). Labels are
never touched, so they stay pixel-exact."""

from __future__ import annotations

import cv2
import numpy as np

from scenes.spec import PostFX


def apply_post(rgb: np.ndarray, fx: PostFX, rng: np.random.Generator) -> np.ndarray:
    """Apply one frame's post-processing.

    Args:
        rgb: (H, W, 3) or (H, W) uint8/uint16 display-referred image.
        fx: The frame's effects.
        rng: Generator for the noise (seeded per frame, so frames are reproducible).

    Returns:
        Image of the same shape and dtype.
    """
    full = float(np.iinfo(rgb.dtype).max)
    x = rgb.astype(np.float32) / full
    if fx.exposure:
        # Exposure acts on linear light; approximate the display transfer by a 2.2 power.
        x = np.clip(x ** 2.2 * (2.0 ** fx.exposure), 0.0, 1.0) ** (1 / 2.2)
    if fx.gamma != 1.0:
        x = x ** fx.gamma
    if fx.blur_sigma > 0.05:
        x = cv2.GaussianBlur(x, (0, 0), fx.blur_sigma, borderType=cv2.BORDER_REFLECT)
    if fx.poisson_peak > 0:
        x = rng.poisson(np.clip(x, 0, 1) * fx.poisson_peak).astype(np.float32) / fx.poisson_peak
    if fx.noise_std > 0:
        x = x + rng.normal(0.0, fx.noise_std, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x * full), 0, full).astype(rgb.dtype)
