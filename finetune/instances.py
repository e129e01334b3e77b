"""Instances for free: a distance head on the shared decoder, its exact targets, and seeded watershed.

Formulation (the 3-class / distance-map family, not StarDist's star polygons or Cellpose's flows, because it
needs one extra output channel and trains on a CPU in minutes): next to the K class logits, the decoder output
feeds a second smp ``SegmentationHead`` (same kernel and upsampling as the class head) with one channel, the
logit of the **normalised distance to the instance's own boundary**:

    d(p) = edt_i(p) / max_{q in i} edt_i(q)   for p in instance i (of a thing class), 0 elsewhere,

where ``edt_i`` is the Euclidean distance to the nearest pixel that is not instance ``i`` (background, another
instance or outside the crop). Touching objects therefore get 0 on their contact line and 1 at their centres.
Targets are derived after augmentation from the instance map warped with the same affine as the class map
(nearest), so they are exact for the pixels the network sees. Loss: binary cross-entropy with these soft
targets on every pixel whose class and instance labels are known, weighted by ``instances.weight``.

Post-processing (:func:`watershed_instances`, parameters in model.json's ``instances``): for each thing class
``c`` the pixels predicted as ``c`` are flooded by a watershed on ``-d`` from seeds, the connected components of
``{class c and d > seed_threshold}``; a region of class ``c`` that no seed reaches becomes one instance of its
own, and instances smaller than ``min_size`` pixels are dropped (their pixels keep their class). ``min_size`` and
``smooth`` are in the pixels of the network's input: an image predicted at input scale ``f`` (resized by ``f``
before the network, its outputs resized back) uses ``min_size / f**2`` and ``smooth / f`` at its own size, so the
parameters mean the same object size for every source. ``seed_h`` and ``min_size`` are chosen at the end of
training on the rendered validation frames (:func:`calibrate_postprocess`, as StarDist's ``optimize_thresholds``
picks its thresholds on validation data), never on real labels.

Self-training (``adapt``) trains the class logits only by default: the instance head learns from labeled
instance maps (synthetic, and real folders with ``instances/``); the shared decoder still adapts through the class
loss. With ``adapt.instance_pseudo`` it also learns the teacher's distance map on the real crops, gated by the
class pseudo-labels' confidence (a distance map has none of its own), and ClassMix's pasted pixels keep their
exact synthetic targets (:meth:`finetune.selftrain.SelfTraining.instance_pseudo_targets`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from segfactory.errors import UserError

HEAD_ATTR = "instance_head"
TARGET = "distance"
# model.json ``instances`` keys a reader needs.
POSTPROCESS_KEYS = ("target", "channels", "things", "method", "seed_threshold", "min_size")


# --------------------------------------------------------------------------------------------- targets


def distance_targets(inst: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
    """Normalised distance-to-own-boundary map of an instance map (see module docstring).

    Args:
        inst: (H, W) instance ids, ``<= 0`` = no instance.

    Returns:
        (H, W) float32 in [0, 1]: 0 outside instances, ``edt / max edt`` of its instance inside (1 at its centre).
    """
    from scipy.ndimage import distance_transform_edt, find_objects

    inst = np.asarray(inst)
    out = np.zeros(inst.shape, np.float32)
    ids = np.where(inst > 0, inst, 0).astype(np.int64)
    if not ids.any():
        return out
    _, dense = np.unique(ids, return_inverse=True)
    dense = dense.reshape(ids.shape)  # 0 = none, 1..n
    h, w = ids.shape
    for k, box in enumerate(find_objects(dense), start=1):
        if box is None:
            continue
        # The bounding box grown by one pixel: its ring holds no pixel of the instance, so the nearest
        # non-instance pixel of every instance pixel is inside it (exact EDT, frame border counts as boundary).
        y0, y1 = max(box[0].start - 1, 0), min(box[0].stop + 1, h)
        x0, x1 = max(box[1].start - 1, 0), min(box[1].stop + 1, w)
        sub = np.pad(dense[y0:y1, x0:x1] == k, 1)
        d = distance_transform_edt(sub)[1:-1, 1:-1]
        inside = dense[y0:y1, x0:x1] == k
        peak = float(d[inside].max())
        out[y0:y1, x0:x1][inside] = (d[inside] / peak).astype(np.float32)
    return out


def batch_targets(inst: torch.Tensor, mask: torch.Tensor, things: list[int],
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance targets and their validity for an augmented batch.

    Args:
        inst: (B, H, W) int64 instance ids after augmentation; -1 = unknown (outside the image, or a source
            without instance labels).
        mask: (B, H, W) int64 class ids after augmentation (``ignore_index`` = not labeled).
        things: Target ids of the thing classes; instances of other classes are not objects.

    Returns:
        target (B, 1, H, W) float32 in [0, 1] and valid (B, 1, H, W) bool, on ``inst``'s device.
    """
    thing = torch.zeros(max(ignore_index, int(mask.max()) if mask.numel() else 0) + 1, dtype=torch.bool)
    thing[things] = True
    m = mask.cpu()
    on_thing = thing[m.clamp(min=0)]
    ids = inst.cpu()
    objs = torch.where(on_thing, ids, torch.zeros_like(ids)).numpy()
    tgt = np.stack([distance_targets(o) for o in objs])
    valid = (ids >= 0) & (m != ignore_index)
    return (torch.from_numpy(tgt)[:, None].to(inst.device), valid[:, None].to(inst.device))


def instance_loss(logit: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of the distance logit (B, 1, H, W) against soft targets on valid pixels."""
    bce = nn.functional.binary_cross_entropy_with_logits(logit.float(), target, reduction="none")
    n = valid.sum()
    return (bce * valid).sum() / n if n > 0 else logit.sum() * 0


# --------------------------------------------------------------------------------------------- the head


def attach_head(model: nn.Module, channels: int = 1) -> nn.Module:
    """Add ``model.instance_head``: a copy of the smp class head's layout with ``channels`` outputs.

    The model's own ``forward`` is unchanged (class logits only), so every consumer of class logits keeps
    working; :func:`forward_both` runs the decoder once for both heads.
    """
    import copy

    seg = model.segmentation_head
    conv = seg[0]
    head = copy.deepcopy(seg)
    head[0] = nn.Conv2d(conv.in_channels, channels, kernel_size=conv.kernel_size, padding=conv.padding)
    model.add_module(HEAD_ATTR, head)
    return model


def has_head(model: nn.Module) -> bool:
    return isinstance(getattr(model, HEAD_ATTR, None), nn.Module)


def forward_both(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (B, K, H, W) and distance logits (B, 1, H, W) of an smp model with an instance head."""
    features = model.encoder(x)
    dec = model.decoder(features)
    return model.segmentation_head(dec), getattr(model, HEAD_ATTR)(dec)


class JointOutputs(nn.Module):
    """Wraps a model with an instance head: ``forward(x)`` -> (class logits, distance logits) (ONNX export)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_both(self.model, x)


def joint_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, K + 1, H, W): the class softmax, then the sigmoid of the distance logit."""
    logits, dist = forward_both(model, x)
    return torch.cat([logits.float().softmax(1), dist.float().sigmoid()], 1)


# --------------------------------------------------------------------------------------------- model.json


def instance_spec(things: list[int], seed_threshold: float, min_size: int, seed_h: float = 0.0,
                  smooth: float = 0.0) -> dict[str, Any]:
    """The ``instances`` record of model.json: what the head predicts and how predict/evaluate/ONNX users
    turn it into instances (the keyword arguments of :func:`watershed_instances`)."""
    return {"target": TARGET, "channels": 1, "things": sorted(int(t) for t in things), "method": "watershed",
            "seed_threshold": float(seed_threshold), "min_size": int(min_size), "seed_h": float(seed_h),
            "smooth": float(smooth)}


def postprocess(labels: npt.NDArray[np.integer], dist: npt.NDArray[np.floating],
                spec: dict[str, Any], scale: float = 1.0) -> npt.NDArray[np.int32]:
    """:func:`watershed_instances` with model.json's ``instances`` parameters, for an image predicted at input
    scale ``scale``: ``min_size`` (pixels) and ``smooth`` (sigma) are in the network's input pixels and are
    converted to the image's own size (``min_size / scale**2``, ``smooth / scale``)."""
    f = float(scale) if scale and scale > 0 else 1.0
    return watershed_instances(labels, dist, [int(c) for c in spec["things"]], float(spec["seed_threshold"]),
                               round(int(spec["min_size"]) / f**2), float(spec.get("seed_h", 0.0)),
                               float(spec.get("smooth", 0.0)) / f)


# Candidates for :func:`calibrate_postprocess`: seed heights and minimum sizes (network input pixels).
CALIBRATION_SEED_H = (0.05, 0.1, 0.2, 0.3)
CALIBRATION_MIN_SIZE = (0, 15, 30, 60, 120)


def calibrate_postprocess(frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], spec: dict[str, Any],
                          seed_h: tuple[float, ...] = CALIBRATION_SEED_H,
                          min_size: tuple[int, ...] = CALIBRATION_MIN_SIZE,
                          ignore_index: int = 255) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose ``seed_h`` and ``min_size`` by the watershed's instance F1 (IoU >= 0.5) on labeled frames.

    Every combination is scored on all frames pooled (one-to-one matching per frame and thing class, as
    ``evaluate`` does); the best F1 wins, ties going to the earlier combination in grid order (lower ``seed_h``,
    then lower ``min_size``). ``seed_threshold`` and ``smooth`` stay as given.

    Args:
        frames: Per frame ``(labels, dist, mask, true)``: (H, W) predicted class ids, (H, W) predicted distance,
            (H, W) target class ids (ignore index where unknown) and (H, W) true instance ids, all at the network's
            input size (scale 1).
        spec: model.json's ``instances`` record (``things``, ``seed_threshold``, ``smooth``, ...).

    Returns:
        The record with the chosen ``seed_h`` and ``min_size``, and a report: ``frames``, ``objects``, the
        ``grid`` of ``[seed_h, min_size, f1]``, the ``chosen`` pair with its F1 (``None``, and the record
        unchanged, when the frames hold no object of a thing class), and what the head gives the watershed to
        work with: ``peak_distance``, the highest predicted distance on pixels predicted as a thing class (``None``
        without such pixels), and ``seeded``, the share of predicted objects (4-connected regions of a thing class)
        that hold a pixel above ``seed_threshold``. A peak below ``seed_threshold`` means no seed anywhere: the
        watershed then returns the connected components unchanged.
    """
    from finetune.metrics import InstanceTally

    things = [int(c) for c in spec["things"]]
    seed_report = seed_coverage(frames, things, float(spec["seed_threshold"]), float(spec.get("smooth", 0.0)))
    grid: list[list[float]] = []
    best: tuple[float, float, int] | None = None
    objects = 0
    for h in seed_h:
        # One watershed per frame and seed height: min_size only drops whole instances afterwards, which is
        # what watershed_instances(min_size=m) does to the same instances.
        split = [watershed_instances(labels, dist, things, float(spec["seed_threshold"]), 0, float(h),
                                     float(spec.get("smooth", 0.0))) for labels, dist, _, _ in frames]
        for m in min_size:
            tally = InstanceTally()
            for (labels, _, mask, true), inst in zip(frames, split, strict=True):
                if m > 0:
                    inst = np.where(np.bincount(inst.ravel())[inst] >= m, inst, 0)
                for c in things:
                    pred = np.where((labels == c) & (mask != ignore_index), inst, 0)
                    tally.merge(InstanceTally.of_image(np.where(mask == c, true, 0), pred))
            f1 = tally.result()["f1"] or 0.0
            objects = tally.n_gt
            grid.append([float(h), int(m), round(float(f1), 6)])
            if best is None or f1 > best[0]:
                best = (float(f1), float(h), int(m))
    if best is None or objects == 0:  # nothing to learn from: keep the configured values
        return dict(spec), {"frames": len(frames), "objects": objects, "grid": grid, "chosen": None, **seed_report}
    chosen = {"seed_h": best[1], "min_size": best[2], "f1": round(best[0], 6)}
    report = {"frames": len(frames), "objects": objects, "grid": grid, "chosen": chosen, **seed_report}
    return {**spec, "seed_h": best[1], "min_size": best[2]}, report


def seed_coverage(frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], things: list[int],
                  seed_threshold: float, smooth: float = 0.0) -> dict[str, float | None]:
    """What a distance head gives the watershed on frames (as :func:`calibrate_postprocess` takes them), on the
    distance map as :func:`watershed_instances` seeds from it (smoothed by ``smooth`` first).

    Returns:
        ``peak_distance``: the highest predicted distance on pixels predicted as a thing class; ``seeded``: the
        share of predicted objects (4-connected regions of a thing class) with a pixel above ``seed_threshold``.
        Both ``None`` when no pixel is predicted as a thing class.
    """
    peak: float | None = None
    regions = seeded = 0
    for labels, dist, _, _ in frames:
        comp = component_instances(labels, things)
        n = int(comp.max())
        if n == 0:
            continue
        dist = seeding_map(dist, smooth)
        on = comp > 0
        top = float(np.max(dist[on]))
        peak = top if peak is None else max(peak, top)
        has_seed = np.zeros(n + 1, bool)
        has_seed[comp[on & (dist > seed_threshold)]] = True
        regions += n
        seeded += int(has_seed[1:].sum())
    return {"peak_distance": None if peak is None else round(peak, 4),
            "seeded": round(seeded / regions, 4) if regions else None}


def require_head(meta: dict[str, Any], model_dir: str | os.PathLike) -> dict[str, Any]:
    """model.json's ``instances`` record, or a UserError for a model trained without the instance head."""
    spec = meta.get("instances")
    if not spec or not int(meta.get("architecture", {}).get("instance_channels") or 0):
        raise UserError(f"model '{model_dir}' has no instance head, so it cannot output instances",
                        fix="retrain it with instances.enabled=true (or run predict without --instances)")
    return dict(spec)


# --------------------------------------------------------------------------------------------- post-processing


def component_instances(labels: npt.NDArray[np.integer], things: list[int]) -> npt.NDArray[np.int32]:
    """(H, W) int32 instance ids: the 4-connected components of every thing class, numbered 1.. over classes."""
    from skimage.measure import label

    out = np.zeros(labels.shape, np.int32)
    n = 0
    for c in things:
        cc = label(labels == c, connectivity=1).astype(np.int32)
        out = np.where(cc > 0, cc + n, out)
        n += int(cc.max())
    return out


def seeding_map(dist: npt.NDArray[np.floating], smooth: float = 0.0) -> npt.NDArray[np.float64]:
    """(H, W) float64 distance map as the watershed seeds from it: smoothed by a Gaussian of sigma ``smooth``
    (pixels; 0 = as predicted)."""
    d = dist.astype(np.float64)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        d = gaussian_filter(d, smooth, mode="nearest")
    return d


def watershed_instances(labels: npt.NDArray[np.integer], dist: npt.NDArray[np.floating], things: list[int],
                        seed_threshold: float = 0.5, min_size: int = 0, seed_h: float = 0.0,
                        smooth: float = 0.0) -> npt.NDArray[np.int32]:
    """Instances from a class map and a predicted distance map (see module docstring).

    Args:
        labels: (H, W) class ids (the argmax of the class probabilities).
        dist: (H, W) predicted normalised distance in [0, 1].
        things: Thing class ids.
        seed_threshold: Seeds are the connected components of ``dist > seed_threshold`` within a class.
        min_size: Instances with fewer pixels are dropped.
        seed_h: > 0: seeds are only the maxima of the distance map that rise at least ``seed_h`` above every
            path to a higher one (h-maxima; they must still exceed ``seed_threshold``): a weakly trained head's
            flat, noisy interior then gives one seed per object instead of many.
        smooth: Gaussian sigma (pixels) applied to the distance map first; 0 = none.

    Returns:
        (H, W) int32 instance ids, 0 = none, numbered 1..N in order of class then seed.
    """
    from skimage.measure import label
    from skimage.segmentation import watershed

    from finetune.metrics import unique_inverse

    d = seeding_map(dist, smooth)
    peaks = None
    if seed_h > 0:
        from skimage.morphology import h_maxima

        # Integer steps of 1/1000: h_maxima on floats is sensitive to rounding.
        q = np.round(np.clip(d, 0, 1) * 1000).astype(np.int32)
        peaks = h_maxima(q, max(1, round(seed_h * 1000))).astype(bool)
    out = np.zeros(labels.shape, np.int32)
    n = 0
    for c in things:
        fg = labels == c
        if not fg.any():
            continue
        cand = fg & (d > seed_threshold)
        seeds = label(cand if peaks is None else cand & peaks, connectivity=1)
        ws = watershed(-d, markers=seeds, mask=fg, connectivity=1) if seeds.any() \
            else np.zeros(fg.shape, np.int64)
        # Regions of the class without any seed (small or flat objects) are objects of their own.
        rest = label(fg & (ws == 0), connectivity=1)
        inst = np.where(rest > 0, rest + int(ws.max()), ws)
        if min_size > 0:
            sizes = np.bincount(inst.ravel())
            inst = np.where(sizes[inst] >= min_size, inst, 0)
        ids, dense, _ = unique_inverse(inst.reshape(-1))
        dense = dense.reshape(inst.shape)
        if ids[0] != 0:
            dense = dense + 1
        out = np.where(dense > 0, dense + n, out)
        n += int(dense.max())
    return out


def instance_classes(inst: npt.NDArray[np.integer], labels: npt.NDArray[np.integer]) -> dict[int, int]:
    """Instance id -> its class (the majority class of its pixels)."""
    out: dict[int, int] = {}
    for i in np.unique(inst):
        if i == 0:
            continue
        vals, counts = np.unique(labels[inst == i], return_counts=True)
        out[int(i)] = int(vals[np.argmax(counts)])
    return out
