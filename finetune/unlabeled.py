"""Unlabeled real images for domain adaptation: random crops from ``segfactory ingest`` outputs.

The ingest store is opened through its format module, :mod:`segfactory.formats.images` (``open_images``: the
committed shards' byte ranges in ``images.bin``, as pretraining reads them); the per-image records of the shard
manifests (``iter_manifests``) add what fine-tuning needs on top: the original size (ingest may have
downscaled the image) and the original pixel type and value range (ingest stretches 16-bit images to 8 bit).

A crop is what the model will see at prediction time: the stored image is mapped back to approximately its
original values and resolution, resized by ``input.scale``, scaled to [0, 1] by ``input.scaling`` (on the
whole image) and cut at a random position. Which image and where are pure functions of ``(seed, step, slot)``,
so a resumed run loads exactly the crops an uninterrupted one would, with any number of loader workers.

Sets of :data:`STREAM_MIN_IMAGES` images or more are streamed instead (:class:`UnlabeledStream`): the shards
are read sequentially, shuffled by units and a buffer (:mod:`segfactory.streaming`, as pretraining's
``data.order=stream``); which image a ``(step, slot)`` gets then also depends on the number of loader workers
(a resumed run with the same ``data.num_workers`` loads exactly the same crops); where it is cut does not.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segfactory.distributed import rank_rows
from segfactory.errors import UserError


@dataclass(frozen=True)
class UnlabeledImage:
    """One stored image and what is needed to restore its original scale and values.

    Attributes:
        path: The shard's ``images.bin``.
        offset: Byte offset of the stored file.
        length: Its length in bytes.
        height: Stored height (after ingest's downscaling).
        orig_height: Height of the original image.
        channels: 1 (gray) or 3 (RGB) as stored.
        orig_dtype: Pixel type of the original (``uint8``, ``uint16``, ...).
        value_range: ``(lo, hi)`` original values ingest mapped to 0 and 255 (deeper than 8 bit), else None.
        group: The folder the original file came from (its source, for per-source input scales; "" unknown).
    """

    path: str
    offset: int
    length: int
    height: int
    orig_height: int
    channels: int
    orig_dtype: str
    value_range: tuple[float, float] | None
    group: str = ""


@dataclass
class UnlabeledSet:
    """The opened ``data.unlabeled`` directories."""

    roots: list[Path]
    images: list[UnlabeledImage]
    data_hashes: list[str]

    @property
    def num_rgb(self) -> int:
        return sum(im.channels == 3 for im in self.images)

    def groups(self) -> dict[str, list[int]]:
        """Image indices by source folder (:attr:`UnlabeledImage.group`), in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, im in enumerate(self.images):
            out.setdefault(im.group, []).append(i)
        return out

    def describe(self) -> dict[str, Any]:
        return {"paths": [str(r) for r in self.roots], "data_hashes": self.data_hashes, "images": len(self.images),
                "rgb": self.num_rgb, "gray": len(self.images) - self.num_rgb}


def open_unlabeled(paths: list[Path], in_chans: int, field: str = "data.unlabeled") -> UnlabeledSet:
    """Open ``segfactory ingest`` outputs and check they fit the model.

    Args:
        paths: The ingest ``--out`` directories.
        in_chans: Channels the model takes (1 or 3).
        field: Config field, named in errors.

    Raises:
        UserError: a path is missing, is a rendered dataset or labeled folder instead of an ingest output,
            holds no images, or holds RGB images for a 1-channel model.
    """
    from segfactory.formats import images as store

    roots, images, hashes = [], [], []
    for i, p in enumerate(paths):
        p = Path(p)
        where = f"{field}[{i}]"
        if (p / "dataset.json").is_file() or (p / "images").is_dir():
            labeled = (p / "images").is_dir() and not (p / "dataset.json").is_file()
            kind, src = ("a labeled folder", p / "images") if labeled else ("a rendered dataset", "DIR")
            raise UserError(f"{where} '{p}' is {kind}, not an ingested image set",
                            fix=f"ingest the real images first (`segfactory ingest {src} --out IMAGES`), then pass "
                                "IMAGES")
        opened = store.open_images(p)  # UserError: missing, not an ingest output, or no images
        records = {}
        for sid, man, _ in store.iter_manifests(p):
            pack = str(store.shards_dir(p) / sid / store.PACK_FILE)
            for r in man["images"]:
                records[(pack, int(r["offset"]))] = r
        for e in opened.entries:
            r = records[(e.path, e.offset)]
            vr = r.get("scale")
            images.append(UnlabeledImage(e.path, e.offset, e.length, e.height, int(r.get("orig_height", e.height)),
                                         e.channels, str(r.get("orig_dtype", "uint8")),
                                         (float(vr[0]), float(vr[1])) if vr else None,
                                         str(Path(r["source"]).parent) if r.get("source") else ""))
        roots.append(p)
        hashes.append(opened.data_hash)
    out = UnlabeledSet(roots, images, hashes)
    if in_chans == 1 and out.num_rgb:
        raise UserError(f"{field} holds {out.num_rgb} RGB image(s) but the model takes 1 input channel "
                        "(model.in_chans=1 or a 1-channel encoder)",
                        fix="set model.in_chans=3 (with a 3-channel or no --encoder), or ingest gray images")
    return out


def decode(im: UnlabeledImage, data: bytes | None = None) -> np.ndarray:
    """The stored image as (H, W) or (H, W, 3) RGB uint8.

    Raises:
        OSError: the byte range does not decode (the images directory was modified).
    """
    from segfactory.formats.images import ImageEntry, decode_entry

    entry = ImageEntry(im.path, im.offset, im.length, "", im.height, im.height, im.channels)
    return decode_entry(entry, cv2.IMREAD_GRAYSCALE if im.channels == 1 else cv2.IMREAD_COLOR, data)


def original_like(arr: np.ndarray, im: UnlabeledImage) -> np.ndarray:
    """Undo ingest's 8-bit stretch: a 16-bit original comes back as uint16 ``lo + v (hi - lo) / 255``.

    The tails ingest clipped stay clipped; ``input.scaling`` then treats the image as it treats the original
    file at prediction time (``auto``/``percentile`` give back about ``v / 255``, ``dtype`` divides by 65535).
    """
    if im.value_range is None or im.orig_dtype == "uint8":
        return arr
    lo, hi = im.value_range
    if lo < 0 or hi > 65535:
        return arr  # float/int32 originals: no faithful integer image; keep ingest's 8-bit stretch
    return np.round(lo + arr.astype(np.float32) * ((hi - lo) / 255.0)).astype(np.uint16)


def load_view(im: UnlabeledImage, scale: float, data: bytes | None = None) -> np.ndarray:
    """The image as the model sees real inputs: original-like values, resized by ``scale`` from the original
    resolution (stored pixels x ``scale * orig_height / height``)."""
    from finetune.scale import resize_image

    arr = original_like(decode(im, data), im)
    return resize_image(arr, scale * im.orig_height / im.height)


class UnlabeledDataset(torch.utils.data.Dataset):
    """Loads ``(step, slot, index)`` refs as random windows of real images (see module docstring).

    ``scale``: one resize factor for every image, or one per image (per-source input scales).

    Returns:
        ``{"image": (C, L, L) float32 in [0, 1], "valid": (L, L) bool}``, or ``{"error": (message, fix)}``.
    """

    def __init__(self, images: list[UnlabeledImage], window: int, in_chans: int, scaling: str,
                 scale: float | Sequence[float], seed: int):
        if not isinstance(scale, float | int) and len(scale) != len(images):
            raise ValueError(f"{len(scale)} scales for {len(images)} images")
        self.images = images
        self.window = window
        self.in_chans = in_chans
        self.scaling = scaling
        self.scale = scale
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, ref: tuple[int, int, int]) -> dict:
        return self.load(ref)

    def load(self, ref: tuple[int, int, int], data: bytes | None = None) -> dict:
        """The sample of ``ref``; ``data``: the image's stored bytes when already read."""
        from finetune.data.mixing import random_window

        step, slot, index = ref
        try:
            f = self.scale if isinstance(self.scale, float | int) else self.scale[index]
            arr = load_view(self.images[index], float(f), data)
        except OSError as e:
            return {"error": (str(e), "re-run `segfactory ingest` into a fresh directory")}
        rng = np.random.default_rng([self.seed, step, slot, 0x0A1A])
        x, m = random_window(arr, np.zeros(arr.shape[:2], np.uint8), self.window, rng, self.in_chans, self.scaling,
                             255)
        return {"image": torch.from_numpy(x), "valid": torch.from_numpy(m == 0)}


class UnlabeledSampler(torch.utils.data.Sampler):
    """Batches of ``(step, slot, index)`` for steps ``start..end-1``: epoch ``e`` is a permutation seeded by
    ``(seed, e)`` and batch ``s`` takes stream positions ``s * B .. (s + 1) * B - 1``.

    Data-parallel (``world_size > 1``): ``B`` is the global batch and rank ``r`` yields only its contiguous slots
    ``r * B / W .. (r + 1) * B / W - 1`` of it (with their global slot numbers, which seed the windows)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, end: int, rank: int = 0,
                 world_size: int = 1):
        self.n, self.batch_size, self.seed, self.start, self.end = n, batch_size, seed, start, end
        self.slots = rank_rows(batch_size, rank, world_size)
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def _index(self, pos: int) -> int:
        epoch, k = divmod(pos, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0x0A1B]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[k])

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for s in range(self.start, self.end):
            yield [(s, j, self._index(s * self.batch_size + j)) for j in range(*self.slots)]


STREAM_MIN_IMAGES = 50_000  # streamed from this many images on (pretraining's data.stream_min_images default)
STREAM_BUFFER = 2048
STREAM_UNIT = 256


class UnlabeledStream(torch.utils.data.IterableDataset):
    """Batches for steps ``start..end-1`` streamed from the shards: step ``s`` is logical worker
    ``s % workers``'s (workers rotated so that step ``start`` comes first); each worker is one slot of
    :class:`segfactory.streaming.SlotStream`, and its ``k``-th batch takes stream positions ``k * B ...``.
    Windows are cut as :class:`UnlabeledDataset` cuts them (seeded by ``(seed, step, slot)``). Data-parallel:
    every rank streams the global batches and decodes only its slots (:func:`segfactory.distributed.rank_rows`)."""

    def __init__(self, ds: UnlabeledDataset, batch_size: int, seed: int, start: int, end: int, workers: int,
                 buffer: int = STREAM_BUFFER, unit_size: int = STREAM_UNIT, rank: int = 0, world_size: int = 1):
        from segfactory import seeds, streaming

        self.ds, self.batch_size, self.start, self.end = ds, batch_size, start, end
        self.slots = rank_rows(batch_size, rank, world_size)
        self.workers, self.buffer, self.seed, self.salt = max(1, workers), buffer, seed, seeds.FINETUNE_STREAM
        self.units = streaming.make_units(ds.images, unit_size, min_units=self.workers)

    def refs(self, worker: int) -> Iterator[tuple[int, list[tuple[int, int, int]], dict[int, bytes]]]:
        """``(step, [(step, slot, index)] * B, stored bytes by index)`` of logical worker ``worker``."""
        from segfactory import streaming

        slot = streaming.SlotStream(self.units, self.seed, self.buffer, worker, self.workers, self.salt)
        done = streaming.slot_batches_done(self.start, worker, self.workers)
        step = done * self.workers + worker
        batch: list[tuple[int, int, int]] = []
        data: dict[int, bytes] = {}
        for window, skip in slot.windows(done * self.batch_size):
            todo = window[skip:]
            got = streaming.read_window(self.ds.images, todo)
            for i in todo:
                if step >= self.end:
                    return
                batch.append((step, len(batch), int(i)))
                data[int(i)] = got[int(i)]
                if len(batch) == self.batch_size:
                    yield step, batch, data
                    step, batch, data = step + self.workers, [], {}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = ((info.id if info is not None else 0) + self.start) % self.workers
        lo, hi = self.slots
        for _, refs, data in self.refs(worker):
            yield collate_unlabeled([self.ds.load(ref, data[ref[2]]) for ref in refs[lo:hi]])


def collate_unlabeled(samples: list[dict]) -> dict:
    for s in samples:
        if "error" in s:
            return {"error": s["error"]}
    return {"image": torch.stack([s["image"] for s in samples]), "valid": torch.stack([s["valid"] for s in samples])}


def unlabeled_loader(images: list[UnlabeledImage], window: int, in_chans: int, scaling: str,
                     scale: float | Sequence[float],
                     batch_size: int, seed: int, start: int, end: int, num_workers: int,
                     pin_memory: bool, stream: bool | None = None, rank: int = 0,
                     world_size: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of real-crop batches for steps ``start..end-1`` (one batch per step).

    ``stream``: :class:`UnlabeledStream` (sequential shard reads); ``None``: from :data:`STREAM_MIN_IMAGES`
    images on; else the random order of :class:`UnlabeledSampler`. ``scale``: one factor or one per image.
    ``batch_size`` is the global batch; with
    ``world_size > 1`` each batch holds rank ``rank``'s slots of it (:func:`segfactory.distributed.rank_rows`).
    """
    from segfactory.workers import loader_context

    ds = UnlabeledDataset(images, window, in_chans, scaling, scale, seed)
    kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory,
                          "prefetch_factor": 4 if num_workers else None,
                          "multiprocessing_context": loader_context(num_workers)}
    if stream if stream is not None else len(images) >= STREAM_MIN_IMAGES:
        return torch.utils.data.DataLoader(UnlabeledStream(ds, batch_size, seed, start, end, num_workers,
                                                           rank=rank, world_size=world_size),
                                           batch_size=None, **kw)
    sampler = UnlabeledSampler(len(images), batch_size, seed, start, end, rank, world_size)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_unlabeled, **kw)


def real_views(unl: UnlabeledSet, scale: float, max_images: int,
               indices: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """Up to ``max_images`` whole real images (evenly spread over the set, or over ``indices`` of it) as the
    model sees them at ``scale``."""
    pick = list(range(len(unl.images))) if indices is None else list(indices)
    step = max(1, len(pick) // max(1, max_images))
    for i in pick[::step][:max_images]:
        yield load_view(unl.images[i], scale)
