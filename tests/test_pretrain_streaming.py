"""data.order=stream: shards read sequentially, shuffled by units and a buffer, resumable at any batch."""

from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage
import torch

from pretrain.images import StreamSquares, make_loader, use_stream
from segfactory.formats import images as store
from segfactory.formats.images import ImageEntry, open_images, read_entry_bytes
from segfactory.streaming import SlotStream, make_units, read_window, slot_batches_done

SHARD_SIZES = [7, 12, 5, 9, 3, 8]  # 44 images in 6 shards of uneven size


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ingest store (the real format, written with its writer) of 16x16 gray tiles of a real photo."""
    root = tmp_path_factory.mktemp("stream_store")
    photo = skimage.data.camera()  # (512, 512) uint8
    n = 0
    for s, size in enumerate(SHARD_SIZES):
        with store.ImageShardWriter(root, f"000001-{s:05d}") as w:
            for _ in range(size):
                y, x = divmod(n, 32)
                tile = np.ascontiguousarray(photo[y * 16:(y + 1) * 16, x * 16:(x + 1) * 16])
                ok, enc = cv2.imencode(".png", tile)
                assert ok
                w.add(enc.tobytes(), ".png", {"source": f"tile{n}.png", "size": 1, "mtime_ns": n, "sha256": str(n),
                                              "height": 16, "width": 16, "channels": 1,
                                              "mean": [float(tile.mean())], "std": [float(tile.std())]})
                n += 1
            w.commit(1, {}, [])
    store.build_index(root)
    return root


def fake_entries() -> list[ImageEntry]:
    """Entries of the same layout without files (the order logic never opens them)."""
    out = []
    for s, size in enumerate(SHARD_SIZES):
        out += [ImageEntry(f"shard{s}", 100 * i, 100, ".png", 16, 16, 1) for i in range(size)]
    return out


def shard_of(entries: list[ImageEntry], i: int) -> str:
    return entries[i].path


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_each_epoch_is_a_permutation_split_disjointly_over_slots(slots: int) -> None:
    entries = fake_entries()
    units = make_units(entries, 4, min_units=slots)
    assert all(entries[a].path == entries[b - 1].path and b - a <= 4 for a, b in units)
    orders = []
    for epoch in range(3):
        per_slot = [SlotStream(units, 7, 5, s, slots).epoch_sequence(epoch) for s in range(slots)]
        together = np.concatenate(per_slot)
        assert sorted(together.tolist()) == list(range(len(entries)))  # every image exactly once, slots disjoint
        orders.append(together.tolist())
    assert orders[0] != orders[1] != orders[2]  # reshuffled each epoch
    # the shuffled stream of a slot (windows) is, epoch by epoch, a permutation of its epoch sequence
    st = SlotStream(units, 7, 5, 0, slots)
    stream = list(itertools.islice(st.indices(0), len(st.epoch_sequence(0)) + len(st.epoch_sequence(1))))
    n0 = len(st.epoch_sequence(0))
    assert sorted(stream[:n0]) == sorted(st.epoch_sequence(0).tolist())
    assert sorted(stream[n0:]) == sorted(st.epoch_sequence(1).tolist())


def test_shards_are_read_contiguously_within_the_buffer_window() -> None:
    entries = fake_entries()
    units = make_units(entries, 4)
    # buffer 1: the read order itself: each unit contiguous, in storage order, one shard change per unit at most
    st = SlotStream(units, 3, 1, 0, 1)
    seq = list(itertools.islice(st.indices(0), len(entries)))
    unit_of = {i: u for u, (a, b) in enumerate(units) for i in range(a, b)}
    runs = [(u, [i for _, i in g]) for u, g in itertools.groupby(((unit_of[i], i) for i in seq), key=lambda t: t[0])]
    assert sorted(u for u, _ in runs) == list(range(len(units)))  # each unit read once, in one piece
    for u, ids in runs:
        assert ids == list(range(*units[u]))  # forward through contiguous byte ranges of one shard file
    shard_runs = [p for p, _ in itertools.groupby(shard_of(entries, i) for i in seq)]
    assert len(shard_runs) <= len(units)  # the shard id changes only at unit boundaries
    assert seq != sorted(seq)  # but the units themselves are shuffled
    # buffer 8 over units of 4: a window mixes at most the 3 units (so <= 3 shards) that overlap it
    st8 = SlotStream(units, 3, 8, 0, 1)
    for window, skip in itertools.islice(st8.windows(0), 6):
        assert skip == 0
        assert len({shard_of(entries, int(i)) for i in window}) <= 3
        order = st8.epoch_sequence(0).tolist()
        w_sorted = sorted(window.tolist(), key=order.index)
        assert window.tolist() != w_sorted or len(window) < 3  # shuffled inside the window


def test_resume_position_by_index_arithmetic() -> None:
    entries = fake_entries()
    st = SlotStream(make_units(entries, 4), 11, 6, 1, 2)
    full = list(itertools.islice(st.indices(0), 200))  # over several epochs
    for k in (0, 1, 5, 6, 17, 23, 61, 150):
        assert list(itertools.islice(st.indices(k), 200 - k)) == full[k:]
    # batch b is worker b % W's: the batches a worker made before batch `start`
    for start, workers in itertools.product(range(9), (1, 2, 3)):
        for w in range(workers):
            assert slot_batches_done(start, w, workers) == sum(1 for b in range(start) if b % workers == w)


def test_worker_and_rank_split_disjoint_and_complete(small_store: Path) -> None:
    entries = open_images(small_store).entries
    seen = []
    for rank, worker in itertools.product(range(2), range(2)):
        ds = StreamSquares(entries, 8, 1, 5, 4, 0, workers=2, buffer=8, unit_size=4, rank=rank, world_size=2)
        slot, _ = ds._stream(worker)
        seen.append(slot.epoch_sequence(0).tolist())
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(len(entries)))
    assert all(seen)  # every rank x worker has data
    with pytest.raises(ValueError, match="rank 2"):
        StreamSquares(entries, 8, 1, 5, 4, 0, workers=2, buffer=8, unit_size=4, rank=2, world_size=2)


def test_window_reads_return_the_stored_bytes(small_store: Path) -> None:
    entries = open_images(small_store).entries
    idx = [3, 0, 1, 9, 8, 30, 2]
    got = read_window(entries, idx)
    assert set(got) == set(idx)
    assert all(got[i] == read_entry_bytes(entries[i]) for i in idx)


def test_resume_through_a_dataloader_with_two_workers(small_store: Path) -> None:
    entries = open_images(small_store).entries
    kw = {"load_size": 8, "in_chans": 1, "batch_size": 4, "seed": 3, "pin_memory": False, "prefetch_factor": 2,
          "stream": True, "buffer": 8, "unit_size": 4}
    n, k = 14, 5  # 56 samples: more than one epoch (44); resume at an odd batch (the workers rotate)
    full = list(itertools.islice(make_loader(entries, start_batch=0, num_workers=2, **kw), n))
    resumed = list(itertools.islice(make_loader(entries, start_batch=k, num_workers=2, **kw), n - k))
    assert all(b.shape == (4, 1, 8, 8) and b.dtype == torch.uint8 for b in full)
    for a, b in zip(full[k:], resumed, strict=True):
        assert torch.equal(a, b)
    # the main-process reader (num_workers=0) is slot 0 of 1: its first epoch covers every image once
    one = list(itertools.islice(make_loader(entries, start_batch=0, num_workers=0, **kw), 11))
    ds = StreamSquares(entries, 8, 1, 3, 4, 0, workers=0, buffer=8, unit_size=4)
    firsts = [i for _, i, _ in itertools.islice(ds.samples(0), 44)]
    assert sorted(firsts) == list(range(44))
    assert len(one) == 11 and not torch.equal(one[0], full[1])


def test_unlabeled_stream_resumes_exactly(small_store: Path) -> None:
    from finetune.unlabeled import open_unlabeled, unlabeled_loader

    unl = open_unlabeled([small_store], 1)
    args = (unl.images, 8, 1, "auto", 1.0, 4, 9)

    def run(start: int, end: int, workers: int, stream: bool) -> list[torch.Tensor]:
        return [b["image"] for b in unlabeled_loader(*args, start, end, workers, False, stream=stream)]

    full = run(0, 13, 2, True)  # 52 crops: past one epoch of 44
    assert len(full) == 13 and all(b.shape == (4, 1, 8, 8) for b in full)
    resumed = run(5, 13, 2, True)
    assert all(torch.equal(a, b) for a, b in zip(full[5:], resumed, strict=True))
    assert len(run(0, 11, 0, True)) == 11 and len(run(0, 3, 0, False)) == 3


def test_too_few_images_for_the_readers_is_a_user_error(small_store: Path) -> None:
    from segfactory.errors import UserError

    entries = open_images(small_store).entries[:3]
    with pytest.raises(UserError, match="3 images cannot feed 4 loader worker"):
        StreamSquares(entries, 8, 1, 0, 2, 0, workers=4, buffer=8, unit_size=4)


def test_order_option() -> None:
    assert use_stream("stream", 10, 50_000) and not use_stream("random", 10**6, 50_000)
    assert use_stream("auto", 50_000, 50_000) and not use_stream("auto", 49_999, 50_000)


def test_a_streamed_pretraining_run_resumes_exactly(small_store: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from pretrain.config import PretrainConfig
    from pretrain.train import run_pretrain
    from segfactory.config import load_config

    cfg = load_config(PretrainConfig, None, [
        "backbone.name=test_resnet", "method.name=simclr", "method.simclr.hidden_dim=16", "method.simclr.out_dim=8",
        "train.steps=4", "train.batch_size=4", "train.log_every=1", "train.checkpoint_every=2",
        "augment.crop_size=16", "augment.load_size=16", "augment.local_crop_size=8", "optim.warmup_steps=1",
        "data.num_workers=0", "data.order=stream", "data.stream_buffer=8", "data.stream_unit=4"])
    straight = run_pretrain(cfg, small_store, tmp_path / "straight")
    run_pretrain(cfg, small_store, tmp_path / "resumed", stop_after=2)
    second = run_pretrain(cfg, small_store, tmp_path / "resumed", resume="last")
    assert second["finished"] and straight["final_loss"] == second["final_loss"]
    assert straight["data_wait_pct"] is not None
    a = load_file(tmp_path / "straight" / "encoder" / "encoder.safetensors")
    b = load_file(tmp_path / "resumed" / "encoder" / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
