"""``segfactory bench render`` compares rendering only: its configs switch every post-processing effect off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.bench_render import bench_config
from scenes import families, resolve_scene, sample_scene, scene_rng
from scenes.spec import PostFX
from segfactory.cli import main
from synth.postfx import apply_lens, apply_post
from synth.worker import object_blur_px


@pytest.mark.parametrize("family", sorted(families()))
def test_bench_frames_are_the_render_unchanged(family):
    """Each view's post-processing, as the render worker applies it, returns the rendered image untouched (PSNR
    against the baseline's frames, which get none, measures rendering alone)."""
    cfg = bench_config(family, 64, 3, 2)
    resolved = resolve_scene(cfg.scene)
    rng = np.random.default_rng(0)
    for scene in range(cfg.dataset.scenes):
        spec = sample_scene(resolved, scene_rng(cfg.dataset.seed, scene), cfg.render.views, cfg.render.resolution)
        for v, fx in enumerate(spec.post):
            rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            index = np.ones((64, 64), np.int32)
            warped, _ = apply_lens(rgb, fx.lens_k1, index)
            np.testing.assert_array_equal(warped, rgb)
            out = apply_post(rgb, fx, np.random.default_rng(1), index, object_blur_px(spec, v, index), np.uint8,
                             spec.dark_objects(), np.ones((64, 64)))
            # Linear light (film raw) keeps the family's gain, which scales the rendered light as the render does.
            expected = apply_post(rgb, PostFX(linear=True, gain=fx.gain), np.random.default_rng(1)) \
                if fx.linear else rgb
            np.testing.assert_array_equal(out, expected, err_msg=f"{family}: {fx}")


@pytest.mark.render
def test_bench_render_of_a_grayscale_linear_family_scores_the_delivered_frames(tmp_path: Path, capsys) -> None:
    """``cells`` renders one-channel linear light, which BlenderProc's own loader cannot read back (it indexes 3
    channels): the baseline renders RGB and keeps one channel, and its frames are scaled by the family's gain into
    the dataset's bit depth before the PSNR, as segfactory delivers them."""
    assert main(["bench", "render", "--family", "cells", "--scenes", "1", "--resolution", "32", "--workers", "",
                 "--memory-scenes", "0", "--out", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["family"] == "cells" and r["baseline_fpm"] > 0 and r["segfactory_fpm"] > 0
    # The same scene at 32 vs 1024 samples: close, and not identical (a sign that both were rendered).
    assert 30 < r["psnr_db"] < float("inf"), r["psnr_db"]
