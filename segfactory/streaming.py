"""Streaming order over an ingest store: shards read sequentially, shuffled by a shard-and-buffer scheme.

How WebDataset and MosaicML StreamingDataset read large sample sets, with the state a pure function of
``(seed, epoch, samples consumed)`` so that a run resumes at any step without replaying decode work.

The scheme, per epoch ``e`` (every random draw is seeded by ``(seed, salt, e, ...)``):

1. **Units.** Each shard's images (a contiguous byte range of its ``images.bin``, in storage order) are cut
   into units of at most ``unit_size`` images; fewer units than slots shrinks the units so every slot gets one.
2. **Unit order.** The units are permuted with a seeded Generator.
3. **Slots.** A slot is one reader: ``slots = world_size * workers`` (torchrun ranks x DataLoader workers).
   Slot ``s`` takes the permuted units ``s, s + slots, s + 2 slots, ...``: disjoint, and together every
   image exactly once per epoch.
4. **Sequential read.** The slot concatenates its units in that order: each unit is one contiguous read of
   one file.
5. **Buffer shuffle.** The slot's sequence is cut into windows of ``buffer`` samples and each window is
   permuted (seeded by ``(seed, salt, e, slot, window)``). This mixes as much as a WebDataset shuffle buffer of
   the same size, but needs no history: sample ``k`` of a slot's stream is found by index arithmetic.

Each slot's stream is endless (epoch after epoch). Resume guarantee: with the same store, seed, ``slots``
(ranks x workers), ``unit_size``, ``buffer`` and batch size, the samples from position ``k`` on are exactly
those of an uninterrupted run; nothing before ``k`` is read or decoded (only the byte range of the window that
holds ``k`` is read). A reader holds one window's stored bytes at a time (``buffer`` x the mean stored image
size). With another slot count the order differs (each slot resumes at the same position of
its own, different stream).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from segfactory import seeds

__all__ = ["Located", "SlotStream", "make_units", "read_window", "slot_batches_done"]


class Located(Protocol):
    """A stored image's byte range (``ImageEntry``, fine-tuning's ``UnlabeledImage``)."""

    @property
    def path(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...


def make_units(entries: Sequence[Located], unit_size: int, min_units: int = 1) -> list[tuple[int, int]]:
    """Cut ``entries`` (in shard order) into units: ``[start, stop)`` ranges inside one shard file.

    Args:
        entries: Stored images, grouped by ``path`` (shard file) as the store lists them.
        unit_size: Most images per unit.
        min_units: Shrink the units until there are at least this many (one per slot), as far as images allow.

    Returns:
        The units in storage order.
    """
    shards: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(entries) + 1):
        if i == len(entries) or entries[i].path != entries[start].path:
            shards.append((start, i))
            start = i
    size = max(1, unit_size)
    while True:
        units = [(a, min(a + size, b)) for s, b in shards for a in range(s, b, size)]
        if len(units) >= min_units or size == 1:
            return units
        size = max(1, size // 2)


class SlotStream:
    """The endless sample stream of one slot (see the module docstring).

    Args:
        units: From :func:`make_units`.
        seed: Run seed.
        buffer: Shuffle window, in samples (1: storage order within the slot's units).
        slot: This reader, ``rank * workers + worker``.
        num_slots: ``world_size * workers``.
        salt: Distinguishes independent streams of one seed (e.g. :data:`segfactory.seeds.STREAM_ORDER`).
    """

    def __init__(self, units: list[tuple[int, int]], seed: int, buffer: int, slot: int, num_slots: int,
                 salt: int = seeds.STREAM_ORDER):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is outside 0..{num_slots - 1}")
        if len(units) < num_slots:
            raise ValueError(f"{len(units)} unit(s) cannot feed {num_slots} slots (fewer images than readers)")
        self.units, self.seed, self.buffer = units, seed, max(1, buffer)
        self.slot, self.num_slots, self.salt = slot, num_slots, salt

    def unit_order(self, epoch: int) -> npt.NDArray[np.int64]:
        """All unit ids in epoch ``epoch``'s order (every slot computes the same)."""
        return np.random.default_rng([self.seed, self.salt, epoch]).permutation(len(self.units))

    def epoch_sequence(self, epoch: int) -> npt.NDArray[np.int64]:
        """Entry indices this slot reads in ``epoch``, in read (storage) order, before the buffer shuffle."""
        mine = self.unit_order(epoch)[self.slot::self.num_slots]
        parts = [np.arange(*self.units[u]) for u in mine]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    def windows(self, position: int) -> Iterator[tuple[npt.NDArray[np.int64], int]]:
        """Endless ``(window, skip)``: each shuffled window's entry indices in stream order, and how many of
        its first samples lie before ``position`` (non-zero for the first window only)."""
        sizes = np.array([b - a for a, b in self.units], np.int64)
        epoch = 0
        while True:  # find the epoch holding `position` (per-epoch lengths only: no reads)
            n = int(sizes[self.unit_order(epoch)[self.slot::self.num_slots]].sum())
            if position < n:
                break
            position -= n
            epoch += 1
        seq = self.epoch_sequence(epoch)
        w, skip = divmod(position, self.buffer)
        while True:
            for k in range(w, -(-len(seq) // self.buffer)):
                idx = seq[k * self.buffer:(k + 1) * self.buffer]
                perm = np.random.default_rng([self.seed, self.salt, epoch, self.slot, k]).permutation(len(idx))
                yield idx[perm], skip
                skip = 0
            epoch, w = epoch + 1, 0
            seq = self.epoch_sequence(epoch)

    def indices(self, position: int) -> Iterator[int]:
        """Endless entry indices from stream position ``position`` on."""
        for window, skip in self.windows(position):
            yield from (int(i) for i in window[skip:])


def slot_batches_done(start_batch: int, worker: int, workers: int) -> int:
    """Batches logical worker ``worker`` produced before global batch ``start_batch`` (batch ``b`` is worker
    ``b % workers``'s, as a DataLoader takes its workers' outputs in turn)."""
    return max(0, -(-(start_batch - worker) // workers))


def read_window(entries: Sequence[Located], idx: Sequence[int]) -> dict[int, bytes]:
    """The stored bytes of ``entries[i]`` for every ``i`` in ``idx``: one open and one contiguous read per
    shard file spanned (the window's images lie in a few units, each contiguous in its file)."""
    by_path: dict[str, list[int]] = {}
    for i in sorted(set(int(i) for i in idx), key=lambda i: (entries[i].path, entries[i].offset)):
        by_path.setdefault(entries[i].path, []).append(i)
    out: dict[int, bytes] = {}
    for path, ids in by_path.items():
        with open(path, "rb") as f:
            run: list[int] = []
            for i in [*ids, -1]:  # contiguous runs; a gap (a unit of another slot) starts a new read
                e = entries[i] if i >= 0 else None
                if run and (e is None or e.offset != entries[run[-1]].offset + entries[run[-1]].length):
                    lo = entries[run[0]].offset
                    f.seek(lo)
                    blob = f.read(entries[run[-1]].offset + entries[run[-1]].length - lo)
                    for j in run:
                        data = blob[entries[j].offset - lo:entries[j].offset - lo + entries[j].length]
                        if len(data) != entries[j].length:
                            raise OSError(f"'{path}' is truncated (image at offset {entries[j].offset})")
                        out[j] = data
                    run = []
                if e is not None:
                    run.append(i)
    return out
