"""Camera effects of synth.postfx (no Blender): old effects unchanged, fog, white balance, motion blur, chromatic
aberration, and lens distortion that moves image and labels alike."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import ndimage

from scenes.randomization import PostKnobs, sample_post
from scenes.spec import PostFX
from synth.postfx import SKY_DISTANCE, apply_lens, apply_post, lens_maps, motion_kernel


def _golden_cases():
    rng = np.random.default_rng(123)
    rgb8 = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (48, 40), dtype=np.uint16)
    index = rng.integers(0, 3, (48, 40)).astype(np.int32)
    yield "plain8", rgb8, PostFX(), {}
    yield "street8", rgb8, PostFX(exposure=0.3, blur_sigma=0.4, noise_std=0.01, gamma=1.1), {}
    yield "street8neg", rgb8, PostFX(exposure=-0.35, blur_sigma=0.0, noise_std=0.005), {}
    yield "cam16", g16, PostFX(linear=True, gain=4.0, background=0.02, illumination=0.2, vignetting=0.3,
                               poisson_peak=500.0, noise_std=0.003, camera_bits=12, camera_offset=100,
                               exposure=0.2, blur_sigma=0.8), \
        {"index": index, "object_blur": np.array([0.0, 2.0, 0.0]), "dark": np.array([True, False, False])}


# sha256 prefixes of apply_post's output for these cases, computed with the implementation before the street
# camera effects existed (commit 7ccaa84), numpy 2 / opencv 4 of constraints.txt.
GOLDEN = {"plain8": "94e68ea227bd23d9", "street8": "240c7c36f5989624", "street8neg": "8f06b23be9aa5a3d",
          "cam16": "4b000dcbe01acf71"}


def test_new_effects_off_by_default_leave_frames_bit_identical():
    for name, img, fx, kw in _golden_cases():
        out = apply_post(img, fx, np.random.default_rng(7), **kw)
        assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == GOLDEN[name], name
        # A depth pass at hand changes nothing without fog.
        again = apply_post(img, fx, np.random.default_rng(7), depth=np.full(img.shape[:2], 5.0), **kw)
        assert np.array_equal(out, again)


def _gray(value: int = 128, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def test_fog_grows_with_depth_and_veils_the_sky():
    depth = np.tile(np.linspace(0.0, 200.0, 32, dtype=np.float32), (32, 1))
    depth[:4] = np.inf  # sky
    color = (0.9, 0.9, 0.9)
    out = apply_post(_gray(40), PostFX(fog_density=0.02, fog_color=color), np.random.default_rng(0), depth=depth)
    row = out[10, :, 0].astype(int)
    assert row[0] == 40 and np.all(np.diff(row) >= 0) and row[-1] > 200  # clear in front, thick far away
    # The formula in linear light at d = 100 (column with depth nearest 100).
    j = int(np.argmin(np.abs(depth[10] - 100.0)))
    t = np.exp(-0.02 * depth[10, j])
    expect = ((40 / 255) ** 2.2 * t + 0.9**2.2 * (1 - t)) ** (1 / 2.2) * 255
    assert abs(int(out[10, j, 0]) - expect) <= 1
    sky = 1 - np.exp(-0.02 * SKY_DISTANCE)
    assert sky > 0.99 and np.all(np.abs(out[:4].astype(int) - round(0.9 * 255)) <= 1)
    with pytest.raises(ValueError, match="depth"):
        apply_post(_gray(), PostFX(fog_density=0.01), np.random.default_rng(0))


def test_white_balance_scales_channels_in_linear_light():
    out = apply_post(_gray(128), PostFX(white_balance=(1.3, 1.0, 0.7)), np.random.default_rng(0))
    r, g, b = (out[..., c].astype(float).mean() for c in range(3))
    assert g == 128
    lin = (np.array([r, g, b]) / 255) ** 2.2
    assert lin[0] / lin[1] == pytest.approx(1.3, rel=0.02) and lin[2] / lin[1] == pytest.approx(0.7, rel=0.02)
    # Linear frames: a plain factor per channel.
    lin16 = np.full((8, 8, 3), 20000, dtype=np.uint16)
    out16 = apply_post(lin16, PostFX(linear=True, white_balance=(1.5, 1.0, 0.5)), np.random.default_rng(0))
    assert tuple(out16[0, 0]) == (30000, 20000, 10000)


@pytest.mark.parametrize("angle", [0.0, np.pi / 2, np.pi / 4])
def test_motion_blur_streaks_along_its_angle_only(angle: float):
    img = np.zeros((41, 41, 3), dtype=np.uint16)
    img[20, 20] = 60000
    out = apply_post(img, PostFX(motion_blur=9.0, motion_angle=angle), np.random.default_rng(0))
    ys, xs = np.nonzero(out[..., 1])
    dx, dy = xs - 20, ys - 20
    # Every lit pixel lies on the streak's line (within the anti-aliasing), and the streak is ~9 px long.
    across = np.abs(-dx * np.sin(angle) + dy * np.cos(angle))
    along = dx * np.cos(angle) + dy * np.sin(angle)
    assert across.max() <= 1.0
    assert 8 <= along.max() - along.min() <= 12
    assert out[..., 1].astype(float).sum() == pytest.approx(60000, rel=0.01)  # light spread, not lost
    k = motion_kernel(9.0, angle)
    assert k.sum() == pytest.approx(1.0) and k.min() >= 0


def test_chromatic_aberration_moves_red_out_and_blue_in_green_stays():
    img = np.zeros((65, 65, 3), dtype=np.uint8)
    img[31:34, 31:34] = 255  # centre dot
    img[4:7, 4:7] = 255  # near the top-left corner
    out = apply_post(img, PostFX(chromatic_aberration=2.0), np.random.default_rng(0))
    assert np.array_equal(out[..., 1], img[..., 1])

    def centroid(ch: np.ndarray, sl: tuple[slice, slice]) -> np.ndarray:
        w = ch[sl].astype(float)
        yy, xx = np.mgrid[sl]
        return np.array([(w * yy).sum(), (w * xx).sum()]) / w.sum()

    corner, centre = (slice(0, 15), slice(0, 15)), (slice(25, 40), slice(25, 40))
    g = centroid(out[..., 1], corner)
    r, b = centroid(out[..., 0], corner), centroid(out[..., 2], corner)
    # The dot sits at 27/32 of the way to the corner: it moves ~2 * 27/32 px along the diagonal.
    shift = 2.0 * np.hypot(27, 27) / np.hypot(32, 32) / np.sqrt(2)
    assert np.allclose(r, g - shift, atol=0.15) and np.allclose(b, g + shift, atol=0.15)
    for c in (0, 2):
        assert np.allclose(centroid(out[..., c], centre), [32, 32], atol=0.05)


@pytest.mark.parametrize("k1", [-0.2, 0.15])
def test_lens_distortion_maps_points_where_k1_says(k1: float):
    h, w = 60, 80
    map_x, map_y = lens_maps((h, w), k1)
    cx, cy, norm = (w - 1) / 2, (h - 1) / 2, np.hypot((w - 1) / 2, (h - 1) / 2)
    s = 1 + min(k1, 0.0)
    # Each output pixel samples the source point whose radius r satisfies r (1 + k1 r^2) / s = output radius.
    for y, x in ((5, 7), (30, 60), (59, 0), (29, 39)):
        r_out = np.hypot(x - cx, y - cy) / norm
        r_src = np.hypot(map_x[y, x] - cx, map_y[y, x] - cy) / norm
        assert r_src * (1 + k1 * r_src**2) / s == pytest.approx(r_out, abs=1e-5)
        if r_out > 0.1:  # same direction from the centre
            cos = ((x - cx) * (map_x[y, x] - cx) + (y - cy) * (map_y[y, x] - cy)) / (r_out * r_src * norm**2)
            assert cos == pytest.approx(1.0, abs=1e-6)
    # No empty border: every output pixel samples inside the render.
    assert map_x.min() >= -1e-3 and map_x.max() <= w - 1 + 1e-3
    assert map_y.min() >= -1e-3 and map_y.max() <= h - 1 + 1e-3
    # A dot of the render lands where the model puts it.
    src = np.array([12.0, 15.0])  # (y, x)
    img = np.zeros((h, w), dtype=np.uint16)
    img[12, 15] = 60000
    out, = apply_lens(img, k1)
    r = np.hypot(src[1] - cx, src[0] - cy) / norm
    expect = np.array([cy, cx]) + (src - [cy, cx]) * (1 + k1 * r**2) / s
    yy, xx = np.nonzero(out)
    wts = out[yy, xx].astype(float)
    got = np.array([(yy * wts).sum(), (xx * wts).sum()]) / wts.sum()
    assert np.allclose(got, expect, atol=0.35), (got, expect)
    if k1 < 0:  # barrel: straight lines through the frame bow outwards, the corners stay
        assert map_x[0, 0] == pytest.approx(0, abs=1e-3) and map_y[0, 0] == pytest.approx(0, abs=1e-3)


def test_lens_distortion_warps_labels_with_the_image_by_nearest_neighbour():
    rng = np.random.default_rng(0)
    # Blocky label map (values 3, 7, 11) and an image that shows exactly those labels.
    labels = rng.choice(np.array([3, 7, 11], dtype=np.int32), size=(16, 16)).repeat(8, 0).repeat(8, 1)
    image = (labels * 5000).astype(np.uint16)
    depth = np.where(labels == 3, np.inf, labels.astype(np.float32))
    out_img, out_lab, out_depth = apply_lens(image, -0.2, labels, depth)
    assert out_lab.dtype == labels.dtype and out_depth.dtype == depth.dtype and out_img.shape == image.shape
    assert set(np.unique(out_lab)) <= {3, 7, 11}  # nearest neighbour: no new (in-between) labels
    assert set(np.unique(out_depth[np.isfinite(out_depth)])) <= {7.0, 11.0}
    assert np.array_equal(np.isinf(out_depth), out_lab == 3)  # depth moved exactly as the labels did
    assert not np.array_equal(out_lab, labels)  # it did move
    # Same warp: inside every warped label region (5 x 5 uniform labels), the warped image shows that label.
    inside = (ndimage.maximum_filter(out_lab, 5, mode="constant", cval=0)
              == ndimage.minimum_filter(out_lab, 5, mode="constant", cval=0))  # the 2 px border is never inside
    assert inside.mean() > 0.3
    assert np.array_equal(out_img[inside], out_lab[inside] * 5000)
    # RGB too, and k1 = 0 is the identity (same objects returned).
    rgb = np.stack([image] * 3, -1)
    assert np.array_equal(apply_lens(rgb, -0.2, labels)[0][..., 0], out_img)
    same = apply_lens(rgb, 0.0, labels)
    assert same[0] is rgb and same[1] is labels
    with pytest.raises(ValueError, match="lens_k1"):
        lens_maps((8, 8), -0.4)


def test_street_camera_knobs_default_off_and_sample_in_range():
    fx = sample_post(np.random.default_rng(0), PostKnobs())
    assert (fx.white_balance, fx.motion_blur, fx.chromatic_aberration, fx.lens_k1, fx.fog_density) == \
        ((1.0, 1.0, 1.0), 0.0, 0.0, 0.0, 0.0)
    k = PostKnobs(white_balance=(-0.1, 0.1), tint=(-0.05, 0.05), motion_blur_prob=1.0, motion_blur=(2.0, 6.0),
                  chromatic_aberration=(0.5, 1.5), lens_k1=(-0.2, -0.05))
    for seed in range(20):
        fx = sample_post(np.random.default_rng(seed), k)
        r, g, b = fx.white_balance
        assert 0.9 <= r <= 1.1 and r + b == pytest.approx(2.0) and 0.95 <= g <= 1.05
        assert 2.0 <= fx.motion_blur <= 6.0 and 0.5 <= fx.chromatic_aberration <= 1.5 and -0.2 <= fx.lens_k1 <= -0.05
    with pytest.raises(ValueError, match="lens_k1"):
        PostKnobs(lens_k1=(-0.5, 0.0))


def test_fog_distance_is_along_each_ray():
    """The depth pass is distance along the view axis; fog attenuates with distance along the pixel's ray."""
    from scenes.spec import Camera
    from synth.worker import ray_distance

    depth = np.full((65, 65), 10.0, dtype=np.float32)
    d = ray_distance(depth, Camera((0.0, 0.0, 0.0), np.eye(3), fov=np.pi / 2))
    assert d[32, 32] == pytest.approx(10.0)
    # Corner pixel centres lie 32 of 32.5 half-pixels out, at tan(45 deg) = 1 at the image edge.
    t = 32 / 32.5
    assert d[0, 0] == pytest.approx(10.0 * np.sqrt(1 + 2 * t**2), rel=1e-5)
    assert d[32, 0] == pytest.approx(10.0 * np.sqrt(1 + t**2), rel=1e-5)
    ortho = Camera((0.0, 0.0, 0.0), np.eye(3), projection="orthographic")
    assert ray_distance(depth, ortho) is depth
