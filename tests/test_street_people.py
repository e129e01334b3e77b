"""Articulated street people (scenes/street_assets/people.py): sampled without Blender."""

from __future__ import annotations

import colorsys
import itertools

import numpy as np
import pytest

from scenes.randomization import MaterialKnobs
from scenes.spec import footprint_radius
from scenes.street_assets.people import (
    ACCESSORIES,
    HEIGHT_RANGE,
    MIN_GROUP_DISTANCE,
    POSES,
    Figure,
    group_offsets,
    sample_figure,
    sample_person,
)

K = MaterialKnobs()
SEEDS = range(24)
BODY_ROLES = ("skin", "hair", "top", "bottom", "shoes", "coat", "skirt", "legwear")


def figure(seed: int, pose=None, accessory=None) -> Figure:
    return sample_figure(np.random.default_rng(seed), K, pose, accessory)


def body_vertices(f: Figure) -> np.ndarray:
    return np.concatenate([p.mesh.vertices for r, p in f.parts.items() if r in BODY_ROLES])


def test_deterministic_per_seed():
    a = sample_person(np.random.default_rng(5), K)
    b = sample_person(np.random.default_rng(5), K)
    c = sample_person(np.random.default_rng(6), K)
    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        np.testing.assert_array_equal(pa.mesh.vertices, pb.mesh.vertices)
        np.testing.assert_array_equal(pa.mesh.faces, pb.mesh.faces)
        assert pa.material == pb.material
    assert len(a) != len(c) or any(pa.mesh.vertices.shape != pc.mesh.vertices.shape
                                   or not np.array_equal(pa.mesh.vertices, pc.mesh.vertices)
                                   for pa, pc in zip(a, c, strict=True))


@pytest.mark.parametrize("pose", POSES)
def test_soles_on_the_ground_and_nothing_below(pose):
    for seed, acc in itertools.product(SEEDS, ACCESSORIES):
        f = figure(seed, pose, acc)
        soles = f.parts["shoes"].mesh.vertices[:, 2].min()
        assert abs(soles) <= 0.01, (seed, acc, soles)
        lowest = min(p.mesh.vertices[:, 2].min() for p in f.part_list())
        assert lowest >= -1e-5, (seed, acc, lowest)


def test_height_range_children_and_head_on_top():
    heights = []
    for seed in range(150):
        f = figure(seed)
        v = body_vertices(f)
        top = float(v[:, 2].max())
        heights.append(top)
        assert HEIGHT_RANGE[0] - 0.03 <= top <= HEIGHT_RANGE[1] + 0.05, (seed, top)
        assert abs(top - f.body.height) < 0.06 * f.body.height, (seed, top, f.body.height)
        head = f.joints["head"]
        assert head[2] > max(f.joints["shoulder0"][2], f.joints["shoulder1"][2]) + 0.05
        # the top of the body is the head (skin) or its hair/hat, never a hand or a shoulder
        near_top = {r for r in BODY_ROLES if r in f.parts and f.parts[r].mesh.vertices[:, 2].max() > top - 0.02}
        assert near_top <= {"skin", "hair"}, (seed, near_top)
    heights_a = np.array(heights)
    assert (heights_a < 1.45).any() and (heights_a > 1.75).any()  # children and tall adults


def test_walking_legs_apart_and_arms_swing_standing_not():
    for seed in SEEDS:
        w = figure(seed, "walk", "none")
        leg = w.joints["ankle0"][1] - w.joints["ankle1"][1]
        arm = w.joints["wrist0"][1] - w.joints["wrist1"][1]
        assert abs(leg) > 0.2 * w.body.height / 1.75, (seed, leg)
        assert abs(arm) > 0.08, (seed, arm)
        assert leg * arm < 0, (seed, leg, arm)  # the right arm swings with the left leg
        s = figure(seed, "stand", "none")
        assert abs(s.joints["ankle0"][1] - s.joints["ankle1"][1]) < 0.06, seed
        assert abs(s.joints["wrist0"][1] - s.joints["wrist1"][1]) < 0.12, seed


def test_footprint_and_face_budget():
    for seed, pose, acc in itertools.product(range(12), POSES, ACCESSORIES):
        parts = sample_person(np.random.default_rng(seed), K, pose, acc)
        r = footprint_radius(parts)
        assert r <= (0.7 if acc == "umbrella" else 0.6), (seed, pose, acc, r)
        faces = sum(len(p.mesh.faces) for p in parts)
        assert 600 <= faces <= 2000, (seed, pose, acc, faces)


def test_umbrella_over_the_head():
    for seed in SEEDS:
        f = figure(seed, None, "umbrella")
        canopy = f.parts["accessory"].mesh.vertices
        head_top = body_vertices(f)[:, 2].max()
        over_head = np.hypot(*(canopy[:, :2] - f.joints["head"][:2]).T) < 0.2
        assert over_head.any() and canopy[over_head, 2].min() > head_top + 0.05, seed  # covers the head, clear
        assert canopy[:, 2].max() > head_top + 0.2, seed


def test_meshes_valid():
    for seed in range(40):
        for p in sample_person(np.random.default_rng(seed), K):
            v, fc = p.mesh.vertices, p.mesh.faces
            assert v.dtype == np.float32 and v.ndim == 2 and v.shape[1] == 3
            assert np.isfinite(v).all()
            assert fc.ndim == 2 and fc.shape[1] in (3, 4) and fc.dtype == np.int32
            assert fc.min() >= 0 and fc.max() < len(v)
            assert (np.diff(np.sort(fc, axis=1), axis=1) > 0).all()  # no repeated corner in a face
            assert all(0 <= c <= 1 for c in p.material.color)


def test_clothing_mostly_dark_and_skin_range():
    values, skins = [], []
    for seed in range(120):
        f = figure(seed)
        for role in ("coat" if "coat" in f.parts else "top", "bottom"):
            values.append(colorsys.rgb_to_hsv(*f.parts[role].material.color)[2])
        skins.append(float(np.mean(f.parts["skin"].material.color)))
    values_a = np.array(values)
    assert (values_a < 0.25).mean() > 0.5  # mostly dark (linear light)
    assert (values_a > 0.5).any()  # some white or bright
    assert max(skins) / min(skins) > 6  # light to very dark skin


def test_poses_and_accessories_drawn_when_not_given():
    drawn = [figure(seed) for seed in range(60)]
    assert {f.pose for f in drawn} == set(POSES)
    assert {f.accessory for f in drawn} == set(ACCESSORIES)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8])
def test_group_offsets(n):
    for seed in range(20):
        a = group_offsets(np.random.default_rng(seed), n)
        assert a.shape == (n, 2) and np.isfinite(a).all()
        np.testing.assert_array_equal(a, group_offsets(np.random.default_rng(seed), n))
        if n > 1:
            d = np.linalg.norm(a[:, None] - a[None], axis=-1)
            assert d[np.triu_indices(n, 1)].min() >= MIN_GROUP_DISTANCE, seed
            assert np.abs(a).max() < 3.0  # together, not scattered
