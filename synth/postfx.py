"""Image-space post-processing of rendered RGB: exposure, gamma, defocus, illumination, shot and read noise, camera
ADC; for street cameras also fog and haze from the depth pass, white balance, motion blur, chromatic aberration,
and lens distortion.

:func:`apply_post` changes pixel values only, never where things are, so the labels stay pixel-exact. Lens
distortion is the one geometric effect: :func:`apply_lens` warps the image and, with the very same map (nearest
neighbour), the object index and depth from which the labels are made.
"""

from __future__ import annotations

import cv2
import numpy as np

from scenes.spec import PostFX

BLUR_STEP = 0.25  # px: per-object blurs are grouped to this precision, one filter per group
SKY_DISTANCE = 1000.0  # scene units of fog in front of the sky (and anything farther): with 0.002/m haze 86 %
DISPLAY_GAMMA = 2.2  # display-referred <-> linear light, the approximation exposure already uses


def apply_post(rgb: np.ndarray, fx: PostFX, rng: np.random.Generator, index: np.ndarray | None = None,
               object_blur: np.ndarray | None = None, out_dtype: type | None = None,
               dark: np.ndarray | None = None, depth: np.ndarray | None = None) -> np.ndarray:
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
        depth: (H, W) float distance from the camera in scene units (inf, NaN or beyond ``SKY_DISTANCE``: the sky),
            needed by ``fx.fog_density``.

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
    if fx.fog_density > 0:
        if depth is None:
            raise ValueError("fog needs the frame's depth pass")
        x = fog(x, depth, fx.fog_density, fx.fog_color, fx.linear)
    balance = x.ndim == 3 and tuple(fx.white_balance) != (1.0, 1.0, 1.0)
    if balance and fx.linear:
        x = x * np.asarray(fx.white_balance, dtype=np.float32)
    if (fx.exposure or balance) and not fx.linear:
        # Exposure and white balance act on linear light; approximate the display transfer by a 2.2 power.
        x = x ** 2.2
        if fx.exposure:
            x = x * (2.0 ** fx.exposure)
        if balance:
            x = x * np.asarray(fx.white_balance, dtype=np.float32)
        x = np.clip(x, 0.0, 1.0) ** (1 / 2.2)
    if fx.gamma != 1.0:
        x = np.clip(x, 0, None) ** fx.gamma
    if fx.chromatic_aberration > 0 and x.ndim == 3:
        x = chromatic_aberration(x, fx.chromatic_aberration)
    if fx.motion_blur >= 1.0:
        x = motion_blur(x, fx.motion_blur, fx.motion_angle)
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


def fog(x: np.ndarray, depth: np.ndarray, density: float, color: tuple[float, float, float] | list[float],
        linear: bool = False) -> np.ndarray:
    """Blend towards the fog colour by distance: ``I * t + fog * (1 - t)`` with ``t = exp(-d * density)``.

    The blend is done in linear light (display values through a 2.2 power unless ``linear``); pixels that hit
    nothing (inf, NaN, or beyond ``SKY_DISTANCE``) count as ``SKY_DISTANCE`` away, so fog veils the sky too.

    Args:
        x: (H, W, 3) or (H, W) float32 image, 0..1.
        depth: (H, W) distance from the camera, scene units.
        density: Extinction per scene unit.
        color: Fog colour, display-referred 0..1 (a single channel uses its mean); linear light when ``linear``.
        linear: ``x`` is linear light (film raw) and is blended as it is.

    Returns:
        Image of ``x``'s shape, float32.
    """
    d = np.nan_to_num(np.asarray(depth, dtype=np.float32), nan=SKY_DISTANCE, posinf=SKY_DISTANCE)
    t = np.exp(-np.float32(density) * np.clip(d, 0.0, SKY_DISTANCE))
    c = np.asarray(color, dtype=np.float32)
    if x.ndim == 2:
        c = c.mean(keepdims=True)
        t3 = t
    else:
        t3 = t[..., None]
    if linear:
        return x * t3 + c * (1 - t3)
    lin = np.clip(x, 0.0, None) ** DISPLAY_GAMMA
    return (lin * t3 + c ** DISPLAY_GAMMA * (1 - t3)) ** (1 / DISPLAY_GAMMA)


def motion_kernel(length: float, angle: float) -> np.ndarray:
    """(K, K) float32 kernel of a straight streak ``length`` px long at ``angle`` (radians from +x, +y down),
    anti-aliased by bilinear splatting, summing to 1."""
    half = length / 2
    k = 2 * int(np.ceil(half)) + 3
    c = k // 2
    n = max(int(np.ceil(length * 4)), 2)
    t = np.linspace(-half, half, n)
    px, py = c + t * np.cos(angle), c + t * np.sin(angle)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    fx, fy = px - x0, py - y0
    kernel = np.zeros((k, k), dtype=np.float64)
    for dy, dx, w in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(kernel, (y0 + dy, x0 + dx), w)
    return (kernel / kernel.sum()).astype(np.float32)


def motion_blur(x: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Average the image along a straight streak (camera shake or pan during the exposure)."""
    return cv2.filter2D(x, -1, motion_kernel(length, angle), borderType=cv2.BORDER_REFLECT)


def chromatic_aberration(x: np.ndarray, px: float) -> np.ndarray:
    """Lateral chromatic aberration: red scaled about the image centre so the corners move ``px`` outwards, blue
    so they move ``px`` inwards; green (the reference) stays. (H, W, 3) float32 in and out."""
    h, w = x.shape[:2]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corner = float(np.hypot(cx, cy))
    out = x.copy()
    for ch, sign in ((0, 1.0), (2, -1.0)):
        s = 1 + sign * px / corner  # this channel's image is s times the green one
        # Output pixel p shows the channel's source at c + (p - c) / s.
        m = np.array([[1 / s, 0, cx - cx / s], [0, 1 / s, cy - cy / s]], dtype=np.float64)
        out[..., ch] = cv2.warpAffine(np.ascontiguousarray(x[..., ch]), m, (w, h),
                                      flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT)
    return out


def lens_maps(shape: tuple[int, int], k1: float) -> tuple[np.ndarray, np.ndarray]:
    """Where each output pixel of a radially distorted frame samples the undistorted render.

    Radii are measured from the image centre in units of its half-diagonal. A point of the render at radius r
    appears at ``r * (1 + k1 * r**2) / s`` with ``s = 1 + min(k1, 0)``: barrel (k1 < 0) bows straight lines
    outwards and is zoomed so the corners stay the render's corners; pincushion (k1 > 0) pulls the corners in
    and loses the render's outer corners. Either way every output pixel samples inside the render (no empty
    border), for ``-1/3 < k1``.

    Args:
        shape: (H, W).
        k1: Radial coefficient.

    Returns:
        (map_x, map_y): (H, W) float32 source coordinates (pixel centres at integers), for ``cv2.remap``.
    """
    if not -1 / 3 < k1 < 1:
        raise ValueError(f"lens_k1 must lie within (-1/3, 1), got {k1}")
    h, w = shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    norm = float(np.hypot(cx, cy)) or 1.0
    s = 1 + min(k1, 0.0)
    # The radial map is monotonic: tabulate output radius -> source radius / output radius once, finely.
    r_src = np.linspace(0.0, 1.0, 4097)
    r_out = r_src * (1 + k1 * r_src**2) / s
    ratio = np.empty_like(r_src)
    ratio[1:] = r_src[1:] / r_out[1:]
    ratio[0] = s
    xx = (np.arange(w, dtype=np.float32) - np.float32(cx)) / np.float32(norm)
    yy = (np.arange(h, dtype=np.float32) - np.float32(cy)) / np.float32(norm)
    dx, dy = np.broadcast_arrays(xx[None, :], yy[:, None])
    f = np.interp(np.hypot(dx, dy), r_out, ratio).astype(np.float32) * np.float32(norm)
    return (np.float32(cx) + dx * f).astype(np.float32), (np.float32(cy) + dy * f).astype(np.float32)


def apply_lens(rgb: np.ndarray, k1: float, *labels: np.ndarray) -> tuple[np.ndarray, ...]:
    """Radial lens distortion of a frame and its label maps with one map (:func:`lens_maps`).

    The image is resampled bilinearly; each label map (object index, depth, any dtype) takes the value of the
    source pixel nearest to the same sample point, so it keeps only values it had and stays aligned with the
    image.

    Args:
        rgb: (H, W, 3) or (H, W) image.
        k1: Radial coefficient (0: everything returned unchanged).
        *labels: (H, W) maps.

    Returns:
        The warped image followed by the warped label maps, same shapes and dtypes.
    """
    if k1 == 0:
        return (rgb, *labels)
    map_x, map_y = lens_maps(rgb.shape[:2], k1)
    h, w = rgb.shape[:2]
    image = cv2.remap(rgb, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    xi = np.clip(np.rint(map_x), 0, w - 1).astype(np.intp)
    yi = np.clip(np.rint(map_y), 0, h - 1).astype(np.intp)
    return (image, *(lab[yi, xi] for lab in labels))
