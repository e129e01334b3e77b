"""Per-batch mixing of sources with configured ratios, deterministic and resumable by step number.

Everything random here is a pure function of ``(seed, step, slot)``: which source fills each batch slot,
which item it takes and where the CPU window is cut. Resuming at step ``s`` therefore replays exactly the
batches an uninterrupted run would have seen, with any number of loader workers.

Data-parallel training (``train.devices > 1``): every rank builds the same global batch (same seed) and loads
only its own contiguous slots of it; the window of a sample is seeded by its global slot, so the ranks' loads
together are exactly the single-process batch, whatever the world size.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from finetune.config import RareClassSampling
from finetune.data.normalize import image_range, resolve_scaling, to_unit
from finetune.data.sources import Source, class_pixels
from segfactory import seeds
from segfactory.errors import UserError

FINETUNE_RCS = 0x2C5
"""Tag of the rare class sampling stream ``[seed, step, slot, FINETUNE_RCS]`` (``data.rcs``: a slot's class and
frame). It lives here, not with the other tags in :mod:`segfactory.seeds`: render keys and shard ids hash that
module, so a training-only tag added there would have made every existing dataset render anew."""
FINETUNE_RCS_SHARE = 0x2C6
"""Tag of the stream ``[seed, step, FINETUNE_RCS_SHARE]`` that decides which slots of a batch are drawn by class
(``data.rcs.share`` below 1)."""


def batch_counts(weights: np.ndarray, batch_size: int, seed: int, step: int) -> np.ndarray:
    """How many samples each source contributes to batch ``step``.

    Largest-remainder rounding of ``weights * batch_size``; the leftover slots are drawn in proportion to the
    remainders, so over many steps every source gets exactly its share on average.

    Args:
        weights: (S,) normalised source weights.

    Returns:
        (S,) int counts summing to ``batch_size``.
    """
    exact = weights * batch_size
    counts = np.floor(exact).astype(np.int64)
    left = batch_size - int(counts.sum())
    if left:
        rng = np.random.default_rng([seed, step, seeds.FINETUNE_COUNTS])
        rem = exact - counts
        picked = rng.choice(len(weights), size=left, replace=False, p=rem / rem.sum())
        counts[picked] += 1
    return counts


@dataclass(frozen=True)
class SampleRef:
    """What one batch slot loads: source, item, the seed of its random window, and the class the window is cut
    around (``focus``; -1: anywhere)."""

    source: int
    item: int
    step: int
    slot: int
    focus: int = -1


@dataclass(frozen=True)
class RareClasses:
    """Rare class sampling of one source (``data.rcs``, DAFormer): which class a slot draws, then which frame.

    Attributes:
        classes: (C,) target class ids it draws from.
        prob: (C,) their probabilities, ``softmax((1 - freq) / temperature)``.
        freq: (C,) their shares of the source's labeled pixels.
        holds: (N, C) whether each training item holds at least ``min_pixels`` of each class.
        frames: ``by_class``: a slot draws the class, then a frame holding it (DAFormer); ``shuffled``: the frame
            comes in the source's shuffled order and only the window's class is drawn, among those it holds.
        share: With ``by_class``, the share of the source's slots drawn by class; the others are filled as
            ``shuffled`` fills them (:meth:`by_class_slots`).
    """

    classes: np.ndarray
    prob: np.ndarray
    freq: np.ndarray
    holds: np.ndarray
    frames: str = "by_class"
    share: float = 1.0

    @functools.cached_property
    def items(self) -> tuple[np.ndarray, ...]:
        """Per class, the indices of the training items holding it (the columns of :attr:`holds`)."""
        return tuple(np.flatnonzero(h) for h in self.holds.T)

    @classmethod
    def from_counts(cls, counts: np.ndarray, temperature: float, min_pixels: int,
                    allowed: list[int] | None = None, frames: str = "by_class",
                    share: float = 1.0) -> RareClasses | None:
        """The plan from per-frame pixel counts.

        Args:
            counts: (N, K) pixels of each target class in each training frame (ignore excluded).
            allowed: Class ids it may draw (default all K).
            frames: ``by_class`` or ``shuffled`` (:attr:`frames`).
            share: :attr:`share`.

        Returns:
            ``None`` when no allowed class has a frame with ``min_pixels`` of it.
        """
        total = counts.sum(axis=0).astype(np.float64)
        freq = total / max(float(total.sum()), 1.0)
        keep = [c for c in (range(counts.shape[1]) if allowed is None else allowed)
                if (counts[:, c] >= min_pixels).any()]
        if not keep:
            return None
        ids = np.asarray(keep, np.int64)
        logits = (1.0 - freq[ids]) / temperature
        prob = np.exp(logits - logits.max())
        holds = counts[:, ids] >= min_pixels
        return cls(ids, prob / prob.sum(), freq[ids], holds, frames, share)

    def by_class_slots(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """(batch_size,) bool: which global slots of batch ``step`` draw their frame by class (a pure function of
        ``(seed, step)``; all of them with ``share`` 1, none with ``frames: shuffled``)."""
        if self.frames != "by_class":
            return np.zeros(batch_size, dtype=bool)
        if self.share >= 1.0:
            return np.ones(batch_size, dtype=bool)
        return np.random.default_rng([seed, step, FINETUNE_RCS_SHARE]).random(batch_size) < self.share

    def draw(self, seed: int, step: int, slot: int) -> tuple[int, int]:
        """``(item, class id)`` of a batch slot (``frames: by_class``): a pure function of ``(seed, step, slot)``."""
        rng = np.random.default_rng([seed, step, slot, FINETUNE_RCS])
        k = int(rng.choice(len(self.classes), p=self.prob))
        return int(self.items[k][rng.integers(len(self.items[k]))]), int(self.classes[k])

    def draw_focus(self, seed: int, step: int, slot: int, item: int) -> int:
        """The class a given frame's window is cut around (``frames: shuffled``): drawn with the plan's
        probabilities among the classes the frame holds; -1 when it holds none of them."""
        held = self.holds[item]
        if not held.any():
            return -1
        rng = np.random.default_rng([seed, step, slot, FINETUNE_RCS])
        p = np.where(held, self.prob, 0.0)
        return int(self.classes[int(rng.choice(len(self.classes), p=p / p.sum()))])


def rare_class_plans(sources: list[Source], rcs: RareClassSampling, names: list[str]) -> dict[int, RareClasses]:
    """The :class:`RareClasses` plan of every synthetic source (``data.rcs``), by source index.

    Counts every training frame's class pixels (masks only).

    Args:
        names: The target class names (index = id).

    Raises:
        UserError: an unknown class in ``rcs.classes``, no synthetic source, or a source where no frame holds
            ``min_pixels`` of any class it may draw.
    """
    import difflib

    allowed = None
    if rcs.classes is not None:
        allowed = []
        for name in rcs.classes:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UserError(f"data.rcs.classes: '{name}' is not a class of the model{hint}",
                                fix=f"use names of: {', '.join(names)}")
            allowed.append(names.index(name))
    plans = {}
    for i, src in enumerate(sources):
        if src.kind != "synthetic":
            continue
        plan = RareClasses.from_counts(src.class_counts(src.train, len(names)), rcs.temperature, rcs.min_pixels,
                                       allowed, rcs.frames, rcs.share)
        if plan is None:
            raise UserError(f"data.rcs: no training frame of '{src.path}' holds {rcs.min_pixels} pixels of "
                            f"{'any class' if allowed is None else ', '.join(rcs.classes or [])}",
                            fix="lower data.rcs.min_pixels or name other data.rcs.classes")
        plans[i] = plan
    if not plans:
        raise UserError("data.rcs is set but there is no synthetic training source: rare class sampling draws "
                        "rendered frames", fix="add data.synthetic (--synthetic DIR) or remove data.rcs")
    return plans


class MixedBatchSampler:
    """Yields batches of :class:`SampleRef` from ``start_step`` to ``end_step`` (exclusive).

    Each source is walked through its own sequence of per-epoch permutations; the position in that sequence
    after ``s`` steps is the sum of its counts over steps ``0..s-1``, recomputed on construction.

    With ``world_size > 1``, ``batch_size`` is the global batch and rank ``rank`` gets its slots
    ``rank * b .. (rank + 1) * b - 1`` (``b = batch_size / world_size``; a batch that does not split evenly is
    refused); each :class:`SampleRef` keeps its global slot. A source with a :class:`RareClasses` plan in ``rare``
    (by source index) fills its slots by that plan instead of its permutations (``frames: shuffled``: the
    permutations' frames, each window cut around a drawn class; ``share`` below 1: only that share of its slots,
    the others as with ``shuffled``).
    """

    def __init__(self, sizes: list[int], weights: list[float], batch_size: int, seed: int, start_step: int,
                 end_step: int, rank: int = 0, world_size: int = 1, rare: dict[int, RareClasses] | None = None):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise UserError(f"train.batch_size={batch_size} (the global batch) does not split evenly over "
                            f"{world_size} processes", fix=f"set train.batch_size to a multiple of {world_size}")
        self.sizes = sizes
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.batch_size = batch_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.rank = rank
        self.world_size = world_size
        self.rare = rare or {}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 4 * len(self.sizes):
                self._perm_cache.clear()
            rng = np.random.default_rng([self.seed, source, epoch, seeds.FINETUNE_ORDER])
            self._perm_cache[key] = rng.permutation(self.sizes[source])
        return self._perm_cache[key]

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def _ordered(self, step: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of batch ``step`` (source counts ``counts``): (S,) how many slots of each source take the next frame
        in its shuffled order, and (batch_size,) bool which slots draw their frame by class instead."""
        ordered = counts.copy()
        by_class = np.zeros(self.batch_size, dtype=bool)
        for k, plan in self.rare.items():
            lo = int(counts[:k].sum())
            hi = lo + int(counts[k])
            by_class[lo:hi] = plan.by_class_slots(self.seed, step, self.batch_size)[lo:hi]
            ordered[k] -= int(by_class[lo:hi].sum())
        return ordered, by_class

    def __iter__(self) -> Iterator[list[SampleRef]]:
        pos = np.zeros(len(self.sizes), dtype=np.int64)
        for s in range(self.start_step):
            counts = batch_counts(self.weights, self.batch_size, self.seed, s)
            pos += self._ordered(s, counts)[0]
        for s in range(self.start_step, self.end_step):
            counts = batch_counts(self.weights, self.batch_size, self.seed, s)
            by_class = self._ordered(s, counts)[1]
            batch = []
            for k, c in enumerate(counts):
                for _ in range(int(c)):
                    plan = self.rare.get(k)
                    if plan is not None and by_class[len(batch)]:
                        item, focus = plan.draw(self.seed, s, len(batch))
                        batch.append(SampleRef(k, item, s, len(batch), focus))
                        continue
                    epoch, i = divmod(int(pos[k]), self.sizes[k])
                    item = int(self._perm(k, epoch)[i])
                    focus = -1 if plan is None else plan.draw_focus(self.seed, s, len(batch), item)
                    batch.append(SampleRef(k, item, s, len(batch), focus))
                    pos[k] += 1
            if self.world_size > 1:
                per = self.batch_size // self.world_size
                batch = batch[self.rank * per:(self.rank + 1) * per]
            yield batch


class WindowDataset(torch.utils.data.Dataset):
    """Loads a :class:`SampleRef`: decode, remap, cut a random ``window`` x ``window`` crop (padded when smaller).

    Errors a user can fix are returned, not raised, so the main process re-raises them as one clean line
    (DataLoader workers would wrap them in a traceback).
    """

    def __init__(self, sources: list[Source], window: int, in_chans: int, scaling: str, seed: int,
                 ignore_index: int = 255, real_scale: float = 1.0, instances: bool = False):
        self.sources = sources
        self.window = window
        self.in_chans = in_chans
        self.scaling = scaling
        self.seed = seed
        self.ignore_index = ignore_index
        self.real_scale = real_scale  # input.scale: real frames are resized by it, synthetic ones never
        # Also load instance maps (-1 = unknown: padding, or a source without instance labels).
        self.instances = instances

    def __len__(self) -> int:
        return sum(len(s.train) for s in self.sources)

    def __getitem__(self, ref: SampleRef) -> dict:
        src = self.sources[ref.source]
        item = src.train[ref.item]
        try:
            img, mask = src.load(item)
            inst = src.load_instances(item, mask) if self.instances else None
        except UserError as e:
            return {"error": (e.message, e.fix)}
        if self.instances and inst is None:
            inst = np.full(mask.shape, -1, np.int32)
        if src.kind == "real" and self.real_scale != 1:
            from finetune.scale import resize_image, resize_mask

            img = resize_image(img, self.real_scale)
            mask = resize_mask(mask, img.shape[:2])
            inst = None if inst is None else resize_mask(inst, img.shape[:2])
        rng = np.random.default_rng([self.seed, ref.step, ref.slot, seeds.FINETUNE_WINDOW])
        x, y, iw = random_windows(img, mask, self.window, rng, self.in_chans, self.scaling, self.ignore_index, inst,
                                  focus=ref.focus)
        out = {"image": torch.from_numpy(x), "mask": torch.from_numpy(y), "source": ref.source}
        if iw is not None:
            out["instance"] = torch.from_numpy(iw)
        return out


def drawn_class_counts(sources: list[Source], sampler: MixedBatchSampler, window: int, seed: int,
                       num_classes: int, ignore_index: int = 255, real_scale: float = 1.0,
                       windows: int = 256) -> np.ndarray:
    """(K,) class pixels in the label windows of training's first ``windows`` draws: ``sampler``'s own batches
    (source mixing and rare class sampling included), each window cut as :class:`WindowDataset` cuts it (same
    seed stream, focus and real-frame scale), from the masks alone (no image is decoded).

    Args:
        sources: The training sources (``sampler``'s, by index).
        sampler: The training's batch sampler, from step 0 (its ``rank``/``world_size`` should be 0/1: the counts
            are the global batch's).
        window: The CPU window size.
        seed: ``train.seed`` (the window stream's seed).
        num_classes: K; ids ``>= K`` (ignore) are not counted.
        real_scale: ``input.scale`` of real frames (their masks are resized by it, as in training).
        windows: How many windows to count (the first ones of the first batches).
    """
    from finetune.scale import resize_mask, scaled_shape

    counts = np.zeros(num_classes, np.int64)
    n = 0
    for batch in sampler:
        for ref in batch:
            src = sources[ref.source]
            mask = src.load_mask(src.train[ref.item])
            if src.kind == "real" and real_scale != 1:
                mask = resize_mask(mask, scaled_shape(mask.shape[0], mask.shape[1], real_scale))
            rng = np.random.default_rng([seed, ref.step, ref.slot, seeds.FINETUNE_WINDOW])
            y = cut_window(mask, focus_offsets(mask, window, rng, ref.focus), window, ignore_index)
            counts += class_pixels(y, num_classes)
            n += 1
            if n >= windows:
                return counts
    return counts


def window_offsets(h: int, w: int, window: int, rng: np.random.Generator,
                   around: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """Where :func:`random_window` cuts an (h, w) frame: ``(y0, x0)`` of the crop in the frame and ``(py, px)``
    of the crop in the padded window (0 unless the frame is smaller than the window). With ``around`` (a pixel's
    ``(y, x)``), among the crops that hold that pixel, uniformly."""
    if around is None:
        y0 = int(rng.integers(0, h - window + 1)) if h > window else 0
        x0 = int(rng.integers(0, w - window + 1)) if w > window else 0
    else:
        y0, x0 = (int(rng.integers(max(0, p - window + 1), min(n - window, p) + 1)) if n > window else 0
                  for p, n in zip(around, (h, w), strict=True))
    ch, cw = min(h, window), min(w, window)
    # Random placement of the small frame inside the window, so padding is not always bottom-right.
    py = int(rng.integers(0, window - ch + 1)) if (ch, cw) != (window, window) else 0
    px = int(rng.integers(0, window - cw + 1)) if (ch, cw) != (window, window) else 0
    return y0, x0, py, px


def focus_offsets(mask: np.ndarray, window: int, rng: np.random.Generator,
                  focus: int = -1) -> tuple[int, int, int, int]:
    """:func:`window_offsets` of an (H, W) class mask's window; with ``focus`` (a class id, -1: none), around a
    random pixel of that class (the frame has none: anywhere). Draws from ``rng`` exactly as
    :func:`random_windows` does (it calls this)."""
    around = None
    if focus >= 0:
        ys, xs = np.nonzero(mask == focus)
        if len(ys):
            k = int(rng.integers(len(ys)))
            around = (int(ys[k]), int(xs[k]))
    return window_offsets(mask.shape[0], mask.shape[1], window, rng, around)


def cut_window(arr: np.ndarray, offsets: tuple[int, int, int, int], window: int, fill: int | float) -> np.ndarray:
    """The (window, window) label window of an (H, W) map at :func:`window_offsets`, padded with ``fill``."""
    y0, x0, py, px = offsets
    crop = arr[y0:y0 + window, x0:x0 + window]
    if crop.shape == (window, window):
        return np.ascontiguousarray(crop)
    out = np.full((window, window), fill, arr.dtype)
    out[py:py + crop.shape[0], px:px + crop.shape[1]] = crop
    return out


def random_window(img: np.ndarray, mask: np.ndarray, window: int, rng: np.random.Generator, in_chans: int,
                  scaling: str, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut a ``window`` square at a random position; pad images with 0 and masks with ``ignore_index``.

    Returns:
        image (C, window, window) float32 in [0, 1], mask (window, window) uint8.
    """
    return random_windows(img, mask, window, rng, in_chans, scaling, ignore_index)[:2]


def random_windows(img: np.ndarray, mask: np.ndarray, window: int, rng: np.random.Generator, in_chans: int,
                   scaling: str, ignore_index: int, instances: np.ndarray | None = None,
                   focus: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`random_window`, plus the same window of an (H, W) instance map (padded with -1 = unknown).

    Args:
        focus: A class id: the window holds a random pixel of it (the frame has none: anywhere); -1: anywhere.

    Returns:
        image (C, window, window) float32 in [0, 1], mask (window, window) uint8, instances (window, window)
        int32 or ``None``.
    """
    value_range = image_range(img, scaling) if resolve_scaling(img, scaling) != "dtype" else None
    off = focus_offsets(mask, window, rng, focus)
    y0, x0, py, px = off
    crop = img[y0:y0 + window, x0:x0 + window]
    x = to_unit(crop, in_chans, scaling, value_range)
    ch, cw = crop.shape[:2]
    if (ch, cw) != (window, window):
        xp = np.zeros((x.shape[0], window, window), np.float32)
        xp[:, py:py + ch, px:px + cw] = x
        x = xp
    y = cut_window(mask, off, window, ignore_index)
    inst = None if instances is None else cut_window(instances.astype(np.int32, copy=False), off, window, -1)
    return x, y, inst


def collate(samples: list[dict]) -> dict:
    """Stack samples; re-raise the first user error a worker returned.

    Returns:
        ``image`` (B, C, L, L) float32, ``mask`` (B, L, L) uint8, ``source`` (B,) int64, and ``instance``
        (B, L, L) int32 when the samples carry instance maps.
    """
    for s in samples:
        if "error" in s:
            return {"error": s["error"]}
    out = {"image": torch.stack([s["image"] for s in samples]),
           "mask": torch.stack([s["mask"] for s in samples]),
           "source": torch.tensor([s["source"] for s in samples], dtype=torch.int64)}
    if all("instance" in s for s in samples):
        out["instance"] = torch.stack([s["instance"] for s in samples])
    return out


def raise_if_error(batch: dict) -> None:
    if "error" in batch:
        message, fix = batch["error"]
        raise UserError(message, fix=fix)
