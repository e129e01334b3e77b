"""The pretraining loader's frame cache and in-place batches: the pixels stay those of a plain decode per sample."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import skimage
import torch

from pretrain.images import StreamSampler, StreamSquares, cache_stats, make_loader, new_cache_stats
from pretrain.train import run_pretrain
from segfactory import seeds
from segfactory.config import load_config
from segfactory.formats import images as store
from segfactory.formats.images import ImageEntry, open_images, read_entry_bytes

LOAD, BATCH, SEED = 12, 5, 7
SHARDS = [6, 4, 7]  # 17 images in 3 shards


@pytest.fixture(scope="module")
def tiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ingest store of non-square tiles (PNG and JPEG, both orientations) of two real photos, so that the
    square cut lands at a random place along the long side."""
    root = tmp_path_factory.mktemp("loader_store")
    gray, rgb = skimage.data.camera(), skimage.data.astronaut()
    n = 0
    for s, size in enumerate(SHARDS):
        with store.ImageShardWriter(root, f"000001-{s:05d}") as w:
            for _ in range(size):
                h, w_ = (20, 31) if n % 2 else (33, 18)
                src = gray if n % 3 else rgb
                tile = np.ascontiguousarray(src[7 * n:7 * n + h, 11 * n:11 * n + w_])
                ext = ".jpg" if n % 4 == 1 else ".png"
                bgr = cv2.cvtColor(tile, cv2.COLOR_RGB2BGR) if tile.ndim == 3 else tile
                ok, enc = cv2.imencode(ext, bgr)
                assert ok
                c = 3 if tile.ndim == 3 else 1
                luma = {"luma_mean": float(tile.mean()), "luma_std": 1.0} if c == 3 else {}
                w.add(enc.tobytes(), ext, {"source": f"t{n}{ext}", "size": 1, "mtime_ns": n, "sha256": str(n),
                                           "height": h, "width": w_, "channels": c,
                                           "mean": tile.reshape(-1, c).mean(0).tolist(), "std": [1.0] * c, **luma})
                n += 1
            w.commit(1, {}, [])
    store.build_index(root)
    return root


def plain_square(entry: ImageEntry, in_chans: int, position: int) -> torch.Tensor:
    """The square of one stream position as the loader cut it before the cache: decode, resize, cut, (C, L, L)."""
    flag = cv2.IMREAD_GRAYSCALE if in_chans == 1 else cv2.IMREAD_COLOR
    img = cv2.imdecode(np.frombuffer(read_entry_bytes(entry), np.uint8), flag)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    h, w = img.shape[:2]
    r = LOAD / min(h, w)
    nw, nh = max(LOAD, round(w * r)), max(LOAD, round(h * r))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
    rng = np.random.default_rng([SEED, seeds.PRETRAIN_CROP, position])
    y, x = int(rng.integers(0, nh - LOAD + 1)), int(rng.integers(0, nw - LOAD + 1))
    sq = img[y:y + LOAD, x:x + LOAD]
    return torch.from_numpy(np.ascontiguousarray((sq[:, :, None] if sq.ndim == 2 else sq).transpose(2, 0, 1)))


def expected_batches(entries: list[ImageEntry], in_chans: int, stream: bool, workers: int, n: int
                     ) -> list[torch.Tensor]:
    """Batches 0..n-1 from the unchanged order logic and a plain decode per sample."""
    if stream:
        ds = StreamSquares(entries, LOAD, in_chans, SEED, BATCH, 0, workers, 8, 3)
        per_worker = [list(itertools.islice(ds.samples(w), BATCH * n)) for w in range(ds.workers)]
        out = []
        for b in range(n):
            part = per_worker[b % ds.workers][(b // ds.workers) * BATCH:(b // ds.workers + 1) * BATCH]
            out.append(torch.stack([plain_square(entries[i], in_chans, p) for p, i, _ in part]))
        return out
    sampler = iter(StreamSampler(len(entries), BATCH, SEED))
    return [torch.stack([plain_square(entries[i], in_chans, p) for p, i in next(sampler)]) for _ in range(n)]


def load(entries: list[ImageEntry], in_chans: int, stream: bool, workers: int, cache_mb: float, start: int, n: int,
         stats: torch.Tensor | None = None) -> list[torch.Tensor]:
    loader = make_loader(entries, LOAD, in_chans, BATCH, SEED, start, workers, pin_memory=False, prefetch_factor=2,
                         stream=stream, buffer=8, unit_size=3, cache_mb=cache_mb, cache_stats=stats)
    return [b.clone() for b in itertools.islice(loader, n)]


@pytest.mark.parametrize(("stream", "workers", "in_chans"),
                         [(False, 0, 1), (False, 0, 3), (True, 0, 1), (True, 0, 3), (False, 2, 1), (True, 2, 1)])
def test_cached_batches_are_the_uncached_ones_and_resume_exactly(tiles: Path, stream: bool, workers: int,
                                                                 in_chans: int) -> None:
    entries = open_images(tiles).entries
    n, k = 12, 7  # 60 samples: more than three epochs of 17 images; resume at an odd batch
    want = expected_batches(entries, in_chans, stream, workers, n)
    off, on = new_cache_stats(workers), new_cache_stats(workers)
    uncached = load(entries, in_chans, stream, workers, 0, 0, n, off)
    cached = load(entries, in_chans, stream, workers, 64, 0, n, on)
    resumed = load(entries, in_chans, stream, workers, 64, k, n - k)
    assert all(b.shape == (BATCH, in_chans, LOAD, LOAD) and b.dtype == torch.uint8 for b in cached)
    for i in range(n):
        assert torch.equal(uncached[i], want[i]), f"batch {i} (cache off) differs from a plain decode"
        assert torch.equal(cached[i], want[i]), f"batch {i} (cache on) differs from a plain decode"
    for i in range(k, n):
        assert torch.equal(resumed[i - k], want[i]), f"batch {i} after a resume at {k} differs"
    s_off, s_on = cache_stats(off), cache_stats(on)
    assert s_off["cache_hit_pct"] == 0 and s_off["cache_mb"] == 0
    assert s_on["cache_hit_pct"] > 50, s_on  # the later epochs are served from the cache
    assert int(on[:, 1].sum()) <= len(entries) * max(1, workers)  # each reader decodes an image once at most


def test_a_small_budget_keeps_what_fits_and_still_gives_the_same_batches(tiles: Path) -> None:
    entries = open_images(tiles).entries
    want = expected_batches(entries, 1, False, 0, 10)
    stats = new_cache_stats(0)
    budget = 4 * 18 * LOAD / 2**20  # four frames of at most 12x18 px
    got = load(entries, 1, False, 0, budget, 0, 10, stats)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert 0 < int(stats[0, 2]) <= budget * 2**20
    assert 0 < cache_stats(stats)["cache_hit_pct"] < 50


def test_pretrain_summary_reports_the_cache(tiles: Path, tmp_path: Path) -> None:
    from pretrain.config import PretrainConfig

    over: list[Any] = ["backbone.name=test_resnet", "train.steps=3", "train.batch_size=8", "train.log_every=1",
                       "augment.crop_size=16", "augment.local_crop_size=8", "data.num_workers=0",
                       "optim.warmup_steps=1", "method.simclr.hidden_dim=16", "method.simclr.out_dim=8",
                       "train.device=cpu"]
    s = run_pretrain(load_config(PretrainConfig, None, over), tiles, tmp_path / "run")
    assert s["loader_cache_hit_pct"] > 0 and s["loader_cache_mb"] > 0 and s["loader_cache_mb_limit"] == 512
    off = run_pretrain(load_config(PretrainConfig, None, [*over, "data.cache_mb=0"]), tiles, tmp_path / "off")
    assert off["loader_cache_hit_pct"] == 0 and off["final_loss"] == s["final_loss"]


def test_bench_loader_compares_uncached_and_cached_rows(tiles: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from segfactory.cli import main

    assert main(["bench", "loader", "--images", str(tiles), "--workers", "0", "--batches", "4", "--batch-size", "4",
                 "--crop-size", "10"]) == 0
    cap = capsys.readouterr()
    r = json.loads(cap.out)
    assert r["bench"] == "loader" and r["images"] == 17 and r["load_size"] == 11
    rows = {(row["name"], row["workers"]): row for row in r["rows"]}
    assert set(rows) == {("uncached", 0), ("uncached", 1), ("cached", 0), ("cached", 1)}
    assert all(row["images_per_s"] > 0 for row in rows.values())
    assert rows["uncached", 0]["cache_hit_pct"] == 0 and rows["cached", 0]["cache_hit_pct"] > 0
    assert r["speedup"] == round(r["cached_images_per_s"] / r["uncached_images_per_s"], 2)
    assert set(r["per_image_ms"]) == {"read_bytes", "decode", "resize", "cut_into_batch"}  # times only
    assert r["frame_mb"] > 0
    ms_line = next(line for line in cap.err.splitlines() if "(ms)" in line)
    assert "frame_mb" not in ms_line.split(";")[0] and "decoded frame:" in cap.err  # a size is not under ms


def test_cache_mb_at_its_default_leaves_dumps_and_hashes_as_they_were() -> None:
    from pretrain.config import PretrainConfig

    default = PretrainConfig()  # the dump (so the config hash and stage keys) is that of the config before the field
    assert default.data.cache_mb == 512 and "cache_mb" not in default.model_dump(mode="json")["data"]
    off = load_config(PretrainConfig, None, ["data.cache_mb=0"])
    assert off.model_dump(mode="json")["data"]["cache_mb"] == 0
    assert PretrainConfig.model_validate(off.model_dump(mode="json")).data.cache_mb == 0
