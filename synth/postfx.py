"""Image-space post-processing of rendered RGB (exposure, gamma, defocus, illumination, shot and read noise,
camera ADC). Labels are never touched, so they stay pixel-exact."""

from __future__ import annotations

import cv2
import numpy as np

from scenes.spec import PostFX

BLUR_STEP = 0.25  # px: per-object blurs are grouped to this precision, one filter per group


def apply_post(rgb: np.ndarray, fx: PostFX, rng: np.random.Generator, index: np.ndarray | None = None,
               object_blur: np.ndarray | None = None, out_dtype: type | None = None,
               dark: np.ndarray | None = None) -> np.ndarray:
    """Apply one frame's post-processing.

    Args:
        rgb: (H, W, 3) or (H, W) uint8/uint16 image as rendered: display-referred, or linear light when
            ``fx.linear``.
        fx: The frame's effects.
        rng: Generator for the noise and the illumination field (seeded per frame, so frames are reproducible).
        index: (H, W) int object index of the label pass (0 = nothing), needed by ``object_blur``.
        object_blur: (N + 1,) Gaussian sigma in px per object index (0: sharp): that object's light alone is
            blurred (an out-of-focus nucleus); its labels are not touched.
        out_dtype: uint8 or uint16 for the result (default: the input's).
        dark: (N + 1,) bool, object indices that emit no light of their own (nothing hit, a black slide). Their
            pixels next to a blurred object hold only its anti-aliased edge, which is blurred with it (left
            sharp, that edge would draw the label outline into the image).

    Returns:
        Image of the same shape, ``out_dtype``. With ``fx.camera_bits`` its values are ``fx.camera_offset`` plus
        ADC counts 0..2**bits-1 (light beyond the camera's full scale clips at the top: saturation).
    """
    out_dtype = np.dtype(out_dtype or rgb.dtype)
    x = rgb.astype(np.float32) / float(np.iinfo(rgb.dtype).max)
    if fx.gain != 1.0:
        x = x * np.float32(fx.gain)
    if object_blur is not None and index is not None and np.any(object_blur > 0.05):
        x = _blur_objects(x, index, object_blur, dark)
    if fx.exposure and not fx.linear:
        # Exposure acts on linear light; approximate the display transfer by a 2.2 power.
        x = np.clip(x ** 2.2 * (2.0 ** fx.exposure), 0.0, 1.0) ** (1 / 2.2)
    if fx.gamma != 1.0:
        x = np.clip(x, 0, None) ** fx.gamma
    if fx.blur_sigma > 0.05:
        x = cv2.GaussianBlur(x, (0, 0), fx.blur_sigma, borderType=cv2.BORDER_REFLECT)
    if fx.illumination > 0 or fx.vignetting > 0 or fx.background > 0:
        light = illumination_field(x.shape[:2], fx.illumination, fx.vignetting, rng)
        if x.ndim == 3:
            light = light[..., None]
        x = (x + np.float32(fx.background)) * light
    if fx.exposure and fx.linear:
        x = x * np.float32(2.0 ** fx.exposure)
    if fx.poisson_peak > 0:
        # Light beyond full scale still makes photons: clipping is the ADC's job, below.
        x = rng.poisson(np.clip(x, 0, None) * fx.poisson_peak).astype(np.float32) / fx.poisson_peak
    if fx.noise_std > 0:
        x = x + rng.normal(0.0, fx.noise_std, size=x.shape).astype(np.float32)
    full = float(np.iinfo(out_dtype).max)
    if not fx.camera_bits:
        return np.clip(np.rint(x * full), 0, full).astype(out_dtype)
    top = 2**fx.camera_bits - 1
    if fx.camera_offset + top > full:
        raise ValueError(f"camera offset {fx.camera_offset} + {fx.camera_bits}-bit counts do not fit {out_dtype}")
    return (np.clip(np.rint(x * top), 0, top) + fx.camera_offset).astype(out_dtype)


def illumination_field(shape: tuple[int, int], amplitude: float, vignetting: float, rng: np.random.Generator
                       ) -> np.ndarray:
    """(H, W) float32 multiplicative light field: smooth random unevenness of +-``amplitude`` (a few broad
    bumps across the frame) times a radial vignetting that loses ``vignetting`` of the light in the corners."""
    h, w = shape
    field = np.ones(shape, dtype=np.float32)
    if amplitude > 0:
        coarse = rng.normal(size=(4, 4)).astype(np.float32)
        smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
        smooth /= max(float(np.abs(smooth).max()), 1e-6)
        field *= 1 + amplitude * smooth
    if vignetting > 0:
        cy, cx = (np.array([h, w]) - 1) / 2 + rng.uniform(-0.15, 0.15, 2) * np.array([h, w])
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (((h - 1) / 2) ** 2 + ((w - 1) / 2) ** 2)
        field *= 1 - vignetting * np.clip(r2, 0, 1.5)
    return np.clip(field, 0.0, None)


def _blur_objects(x: np.ndarray, index: np.ndarray, sigma: np.ndarray, dark: np.ndarray | None) -> np.ndarray:
    """Spread each blurred object's light by its sigma; sharp objects and the background keep theirs.

    Fluorescence adds up, so the blurred light of an object also falls on its neighbours and the background.
    The label pass gives a pixel to one object by its centre, but the color pass's reconstruction filter
    (1.5 px wide) mixes an object's light into the pixels just outside its label: dark pixels touching a
    blurred object are blurred with it.
    """
    sig = np.round(np.asarray(sigma, dtype=np.float64) / BLUR_STEP) * BLUR_STEP
    idx = np.clip(index, 0, len(sig) - 1)
    sig_px = sig[idx].astype(np.float32)
    if dark is not None:
        grown = cv2.dilate(sig_px, np.ones((3, 3), np.uint8))
        sig_px = np.where(np.asarray(dark, dtype=bool)[idx], np.maximum(sig_px, grown), sig_px)
    out = np.where((sig_px > 0)[..., None] if x.ndim == 3 else sig_px > 0, 0.0, x).astype(np.float32)
    for s in np.unique(sig_px[sig_px > 0]):
        mask = sig_px == s
        if x.ndim == 3:
            mask = mask[..., None]
        out += cv2.GaussianBlur(np.where(mask, x, 0.0).astype(np.float32), (0, 0), float(s),
                                borderType=cv2.BORDER_CONSTANT)
    return out
