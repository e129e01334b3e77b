"""Reading ingested images for training: fixed-size uint8 squares in a resumable, seeded order.

Two orders (``data.order``): ``random`` (:class:`StreamSampler`: one seeded permutation of all images per
epoch, one seek into a shard file per image, independent of the worker count) and ``stream``
(:class:`StreamSquares`: shards read sequentially, shuffled by units and a buffer, see
:mod:`segfactory.streaming`; resumable with the same worker count and world size).

The CPU side only decodes (at reduced DCT scale when the file allows), resizes the short side to the load
size and cuts a square; every other augmentation runs batched on the training device (:mod:`pretrain.augment`).
Decoding dominates that cost (a 512 px PNG: ~2.4 ms of ~3 ms), and pretraining revisits every image hundreds of
times, so each reader keeps the decoded, load-size frames it has seen in a bounded :class:`FrameCache`
(``data.cache_mb``); only the square cut is redone. Squares are written straight into the batch tensor (in
shared memory inside a DataLoader worker), as ``default_collate`` does, instead of one tensor per sample.
"""

from __future__ import annotations

import signal
from collections.abc import Container, Iterator
from typing import Any

import cv2
import numpy as np
import torch

from segfactory import seeds, streaming
from segfactory.errors import UserError
from segfactory.formats.images import ImageEntry, decode_entry
from segfactory.workers import loader_context


def decode_for(entry: ImageEntry, load_size: int, in_chans: int, data: bytes | None = None) -> np.ndarray:
    """Decode one stored image for a load size: (H, W) gray or (H, W, 3) RGB uint8, a JPEG at the smallest DCT
    scale (1/2, 1/4, 1/8) whose short side still reaches ``load_size``. ``data``: the stored bytes when already
    read (default: read them)."""
    gray = in_chans == 1
    flag = cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR
    if entry.ext == ".jpg":
        short = min(entry.height, entry.width)
        for f, (fg, fc) in ((8, (cv2.IMREAD_REDUCED_GRAYSCALE_8, cv2.IMREAD_REDUCED_COLOR_8)),
                            (4, (cv2.IMREAD_REDUCED_GRAYSCALE_4, cv2.IMREAD_REDUCED_COLOR_4)),
                            (2, (cv2.IMREAD_REDUCED_GRAYSCALE_2, cv2.IMREAD_REDUCED_COLOR_2))):
            if short // f >= load_size:
                flag = fg if gray else fc
                break
    return decode_entry(entry, flag, data)  # gray files are expanded to 3 equal channels by IMREAD_COLOR


def resize_short(img: np.ndarray, load_size: int) -> np.ndarray:
    """Resize (H, W[, C]) uint8 so that its short side is ``load_size`` (area filter down, bilinear up)."""
    h, w = img.shape[:2]
    r = load_size / min(h, w)
    nw, nh = max(load_size, round(w * r)), max(load_size, round(h * r))
    interp = cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(img, (nw, nh), interpolation=interp), dtype=np.uint8)


def load_frame(entry: ImageEntry, load_size: int, in_chans: int, data: bytes | None = None) -> np.ndarray:
    """Decode one stored image and resize its short side to ``load_size`` (:func:`decode_for`,
    :func:`resize_short`).

    Returns:
        (H, W) gray or (H, W, 3) RGB uint8 with ``min(H, W) == load_size``.
    """
    return resize_short(decode_for(entry, load_size, in_chans, data), load_size)


def cut_square(frame: np.ndarray, load_size: int, rng: np.random.Generator) -> np.ndarray:
    """A (load_size, load_size, C) view of a :func:`load_frame` frame at a random position along its long side
    (drawn from ``rng``: two draws, y then x)."""
    nh, nw = frame.shape[:2]
    y = int(rng.integers(0, nh - load_size + 1))
    x = int(rng.integers(0, nw - load_size + 1))
    img = frame[y:y + load_size, x:x + load_size]
    return img[:, :, None] if img.ndim == 2 else img


def read_square(entry: ImageEntry, load_size: int, in_chans: int, rng: np.random.Generator,
                data: bytes | None = None) -> np.ndarray:
    """Decode one stored image as a (load_size, load_size, C) uint8 square.

    The short side is resized to ``load_size`` and a square is cut at a random position along the long side
    (drawn from ``rng``), so no part of a wide image is systematically lost. ``data``: the stored bytes when
    already read (default: read them).
    """
    return cut_square(load_frame(entry, load_size, in_chans, data), load_size, rng)


class FrameCache:
    """A bounded cache of decoded, load-size frames (:func:`load_frame`) of one reader process.

    Fill-once: frames are kept until ``budget_mb`` is used, then later misses are decoded and not kept. Under a
    uniformly random order the hit rate is then the cached share of the images, as with LRU, and under a
    cyclic (streamed) order it stays that share where LRU would evict every frame before its next use. A frame
    is a pure function of its stored bytes and the load size, so a hit gives exactly the pixels a decode would.

    Args:
        budget_mb: Most megabytes of frames kept (0: nothing is kept).
        stats: Optional shared (readers, 3) int64 tensor; row ``slot`` receives this cache's hits, misses and
            bytes kept at each :meth:`publish`, so that the training process can report them for its workers.
        slot: This reader's row of ``stats``.
    """

    def __init__(self, budget_mb: float, stats: torch.Tensor | None = None, slot: int = 0):
        self.budget = int(budget_mb * 2**20)
        self.frames: dict[int, np.ndarray] = {}
        self.used = self.hits = self.misses = 0
        self.stats, self.slot = stats, slot

    def __contains__(self, idx: int) -> bool:
        return idx in self.frames

    def frame(self, idx: int, entry: ImageEntry, load_size: int, in_chans: int, data: bytes | None = None
              ) -> np.ndarray:
        """Image ``idx``'s frame: cached, or decoded (and kept while the budget allows)."""
        f = self.frames.get(idx)
        if f is not None:
            self.hits += 1
        else:
            self.misses += 1
            f = load_frame(entry, load_size, in_chans, data)
            if self.used + f.nbytes <= self.budget:
                self.frames[idx] = f
                self.used += f.nbytes
        return f

    def publish(self) -> None:
        """Write the counters to row ``slot`` of ``stats`` (once per batch: a per-sample write costs ~8 us)."""
        if self.stats is not None:
            self.stats[self.slot] = torch.tensor([self.hits, self.misses, self.used])


def cache_stats(stats: torch.Tensor) -> dict[str, float]:
    """``cache_hit_pct`` and ``cache_mb`` (kept, all readers together) from the shared counters of
    :func:`make_loader`'s ``cache_stats``."""
    hits, misses, used = (int(v) for v in stats.sum(0))
    return {"cache_hit_pct": round(100 * hits / max(1, hits + misses), 2), "cache_mb": round(used / 2**20, 3)}


def _reader_slot() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _batch_tensor(n: int, in_chans: int, load_size: int) -> torch.Tensor:
    """An empty (n, C, L, L) uint8 batch; in a DataLoader worker it is allocated in shared memory, so that
    passing it to the training process copies nothing (what ``default_collate`` does)."""
    out = torch.empty((n, in_chans, load_size, load_size), dtype=torch.uint8)
    return out.share_memory_() if torch.utils.data.get_worker_info() is not None else out


def _put(batch: np.ndarray, i: int, square: np.ndarray) -> None:
    """Write one (L, L, C) square into row ``i`` of a (B, C, L, L) array (one copy, no temporaries)."""
    batch[i] = square.transpose(2, 0, 1)


class SquareDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by ``(position, entry_index)`` pairs from :class:`StreamSampler`.

    ``dataset[item]`` is one (C, L, L) uint8 tensor; ``dataset.__getitems__(batch)`` (what a DataLoader with a
    batch sampler calls) the whole (B, C, L, L) batch, written in place. The random square is a function of
    ``(seed, position)`` only, so a resumed run sees exactly the pixels an uninterrupted one would, with or
    without the frame cache.

    Args:
        entries: The images.
        load_size: Square side.
        in_chans: 1 or 3.
        seed: Run seed.
        cache_mb: :class:`FrameCache` budget of each reader process (0: off).
        stats: Optional shared (readers, 3) int64 counters of the caches (see :class:`FrameCache`).
    """

    def __init__(self, entries: list[ImageEntry], load_size: int, in_chans: int, seed: int, cache_mb: float = 0,
                 stats: torch.Tensor | None = None):
        self.entries = entries
        self.load_size = load_size
        self.in_chans = in_chans
        self.seed = seed
        self.cache_mb, self.stats = cache_mb, stats
        self._cache: FrameCache | None = None  # made in the reader process (each DataLoader worker has its own)

    @property
    def cache(self) -> FrameCache:
        if self._cache is None:
            self._cache = FrameCache(self.cache_mb, self.stats, _reader_slot())
        return self._cache

    def __len__(self) -> int:
        return len(self.entries)

    def _square(self, position: int, idx: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, seeds.PRETRAIN_CROP, position])
        frame = self.cache.frame(idx, self.entries[idx], self.load_size, self.in_chans)
        return cut_square(frame, self.load_size, rng)

    def __getitem__(self, item: tuple[int, int]) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._square(*item).transpose(2, 0, 1)))

    def __getitems__(self, items: list[tuple[int, int]]) -> torch.Tensor:
        out = _batch_tensor(len(items), self.in_chans, self.load_size)
        arr = out.numpy()
        for i, (position, idx) in enumerate(items):
            _put(arr, i, self._square(position, idx))
        self.cache.publish()
        return out


class StreamSampler(torch.utils.data.Sampler):
    """Endless batches of ``(position, index)``: epoch ``e`` is a permutation seeded by ``(seed, e)``.

    Batch ``b`` holds stream positions ``b * batch_size ... (b + 1) * batch_size - 1``, so resuming at a batch
    number reproduces the uninterrupted order exactly. With ``world_size > 1`` ``batch_size`` is the global batch
    and this rank gets the contiguous slice ``rank * batch_size / world_size ...`` of it: the ranks' slices, in
    rank order, are the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.start_batch = start_batch
        self.lo, self.hi = rank_slice(batch_size, rank, world_size)
        self._perm_epoch = -1
        self._perm: np.ndarray = np.empty(0, np.int64)

    def _index(self, position: int) -> int:
        epoch, k = divmod(position, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, seeds.PRETRAIN_ORDER, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[k])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start_batch
        while True:
            start = b * self.batch_size
            yield [(p, self._index(p)) for p in range(start + self.lo, start + self.hi)]
            b += 1

    def __len__(self) -> int:  # endless; DataLoader only needs it for len(loader), which we never call
        return 2**62


def rank_slice(batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s part ``[lo, hi)`` of a global batch of ``batch_size`` (a multiple of ``world_size``)."""
    per = batch_size // world_size
    return rank * per, (rank + 1) * per


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # one decode per worker process; OpenCV's own pool would oversubscribe the cores
    # a terminal's Ctrl-C reaches the whole process group; the training loop finishes its step (and needs
    # these workers for it) before it stops with a checkpoint, and shuts them down itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamSquares(torch.utils.data.IterableDataset):
    """``data.order=stream``: endless (B, C, L, L) uint8 batches from sequential shard reads.

    Each DataLoader worker is one slot of :class:`segfactory.streaming.SlotStream` (slot ``rank * workers +
    worker``); it reads its windows' bytes in storage order and decodes them in shuffled order. Batch ``b``
    (micro-batch number from the run's start) holds stream positions ``b * B ... (b + 1) * B - 1`` of worker
    ``b % workers`` (the DataLoader takes its workers' batches in turn; on resume the workers are rotated so
    that batch ``start_batch`` comes first). Square crops are seeded by the global position as in
    :class:`SquareDataset`.

    Args:
        entries: The images, in the store's shard order.
        load_size: Square side.
        in_chans: 1 or 3.
        seed: Run seed.
        batch_size: Images per micro-batch.
        start_batch: First micro-batch to produce (resume).
        workers: DataLoader workers (0: the main process is the one reader).
        buffer: Shuffle window per reader, in images.
        unit_size: Images per shuffled unit.
        rank: This process's rank.
        world_size: Processes reading the same store (each gets disjoint units).
        cache_mb: :class:`FrameCache` budget of each reader (0: off); cached images' bytes are not read again.
        stats: Optional shared (readers, 3) int64 counters of the caches (see :class:`FrameCache`).
    """

    def __init__(self, entries: list[ImageEntry], load_size: int, in_chans: int, seed: int, batch_size: int,
                 start_batch: int, workers: int, buffer: int, unit_size: int, rank: int = 0, world_size: int = 1,
                 cache_mb: float = 0, stats: torch.Tensor | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.entries, self.load_size, self.in_chans, self.seed = entries, load_size, in_chans, seed
        self.batch_size, self.start_batch, self.buffer = batch_size, start_batch, buffer
        self.workers, self.rank, self.world_size = max(1, workers), rank, world_size
        if len(entries) < self.workers * world_size:
            raise UserError(f"data.order=stream: {len(entries)} images cannot feed {self.workers} loader worker(s) "
                            f"x {world_size} process(es)", fix="set data.order=random or fewer data.num_workers")
        self.units = streaming.make_units(entries, unit_size, min_units=self.workers * world_size)
        self.cache_mb, self.stats = cache_mb, stats

    def _stream(self, worker: int) -> tuple[streaming.SlotStream, int]:
        """The slot stream of logical worker ``worker`` and its first global micro-batch number."""
        slot = streaming.SlotStream(self.units, self.seed, self.buffer, self.rank * self.workers + worker,
                                    self.workers * self.world_size)
        return slot, streaming.slot_batches_done(self.start_batch, worker, self.workers)

    def samples(self, worker: int, cached: Container[int] = ()) -> Iterator[tuple[int, int, bytes | None]]:
        """Endless ``(global position, entry index, stored bytes)`` of logical worker ``worker``; the bytes of
        images in ``cached`` are not read (``None``)."""
        slot, done = self._stream(worker)
        pos = done * self.batch_size
        batch = done * self.workers + worker  # global micro-batch number
        k = 0
        for window, skip in slot.windows(pos):
            todo = window[skip:]
            data = streaming.read_window(self.entries, [i for i in todo if int(i) not in cached])
            for i in todo:
                yield batch * self.batch_size + k, int(i), data.get(int(i))
                k += 1
                if k == self.batch_size:
                    batch, k = batch + self.workers, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        phys = info.id if info is not None else 0
        worker = (phys + self.start_batch) % self.workers  # rotation: the DataLoader starts at worker 0
        cache = FrameCache(self.cache_mb, self.stats, phys)
        out, k = _batch_tensor(self.batch_size, self.in_chans, self.load_size), 0
        for position, idx, data in self.samples(worker, cache):
            rng = np.random.default_rng([self.seed, seeds.PRETRAIN_CROP, position])
            frame = cache.frame(idx, self.entries[idx], self.load_size, self.in_chans, data)
            _put(out.numpy(), k, cut_square(frame, self.load_size, rng))
            k += 1
            if k == self.batch_size:
                cache.publish()
                yield out
                out, k = _batch_tensor(self.batch_size, self.in_chans, self.load_size), 0


def use_stream(order: str, num_images: int, min_images: int) -> bool:
    """Whether ``data.order`` (``auto``: from ``min_images`` images on) streams."""
    return order == "stream" or (order == "auto" and num_images >= min_images)


def make_loader(entries: list[ImageEntry], load_size: int, in_chans: int, batch_size: int, seed: int,
                start_batch: int, num_workers: int, pin_memory: bool, prefetch_factor: int, stream: bool = False,
                buffer: int = 2048, unit_size: int = 256, rank: int = 0, world_size: int = 1, cache_mb: float = 0,
                cache_stats: torch.Tensor | None = None) -> torch.utils.data.DataLoader[Any]:
    """An endless DataLoader of (B, C, L, L) uint8 batches starting at micro-batch ``start_batch``.

    ``stream``: :class:`StreamSquares` (``buffer``, ``unit_size``; each of ``world_size`` ranks reads disjoint
    units); else the random order of :class:`StreamSampler`. With ``world_size > 1``, B = batch_size / world_size:
    in random order this rank's slice of each global batch (the ranks together are exactly the single-process
    batch); streamed, this rank's own B images. ``cache_mb``: each reader's :class:`FrameCache` budget (the
    batches are the same with any budget). ``cache_stats``: a (max(1, num_workers), 3) int64 tensor in shared
    memory (:func:`new_cache_stats`) that the readers fill with their hits, misses and bytes kept.
    """
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = {"prefetch_factor": prefetch_factor, "persistent_workers": True, "worker_init_fn": _worker_init,
              "multiprocessing_context": loader_context(num_workers)}
    if stream:
        sds = StreamSquares(entries, load_size, in_chans, seed, batch_size // world_size, start_batch, num_workers,
                            buffer, unit_size, rank, world_size, cache_mb, cache_stats)
        return torch.utils.data.DataLoader(sds, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                           **kw)
    ds = SquareDataset(entries, load_size, in_chans, seed, cache_mb, cache_stats)
    sampler = StreamSampler(len(entries), batch_size, seed, start_batch, rank, world_size)
    # SquareDataset.__getitems__ returns the whole batch: the collate step has nothing left to do
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                                       collate_fn=_as_batch, **kw)


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch


def new_cache_stats(num_workers: int) -> torch.Tensor:
    """Zeroed (max(1, num_workers), 3) int64 counters in shared memory for :func:`make_loader`'s readers."""
    return torch.zeros((max(1, num_workers), 3), dtype=torch.int64).share_memory_()
