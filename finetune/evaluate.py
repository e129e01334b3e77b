"""Evaluation: confusion matrices, mIoU, per-class IoU and pixel accuracy, per data source and per kind.

Conventions: rows of a confusion matrix are ground truth, columns predictions; ignore pixels are left out.
mIoU averages the IoU of classes that occur in the ground truth or the prediction (a class absent from both
has no defined IoU and is reported as ``null``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data.sources import Item, Source
from segfactory.plotting import figure_png


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(K, K) int64 counts; ``cm[t, p]`` pixels of true class t predicted as p.

    Args:
        pred: (H, W) or any shape of predicted ids in ``0..K-1``.
        target: Same shape, true ids, ``ignore_index`` left out.
    """
    t = target.reshape(-1).astype(np.int64)
    p = pred.reshape(-1).astype(np.int64)
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.size and (t.max() >= num_classes or p.max() >= num_classes):
        raise ValueError(f"ids beyond num_classes={num_classes}: target max {t.max()}, pred max {p.max()}")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(cm: np.ndarray, names: list[str]) -> dict[str, Any]:
    """mIoU, per-class IoU/accuracy, pixel accuracy from a confusion matrix.

    Returns:
        ``{"miou", "pixel_accuracy", "mean_accuracy", "pixels", "per_class": {name: {"iou", "accuracy",
        "gt_pixels", "pred_pixels"}}}``; undefined values are ``None``.
    """
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    gt = cm.sum(1)
    pr = cm.sum(0)
    union = gt + pr - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    total = cm.sum()

    def val(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x), 6)

    return {
        "miou": val(np.nanmean(iou)) if np.any(~np.isnan(iou)) else None,
        "pixel_accuracy": val(tp.sum() / total) if total else None,
        "mean_accuracy": val(np.nanmean(acc)) if np.any(~np.isnan(acc)) else None,
        "pixels": int(total),
        "per_class": {n: {"iou": val(iou[i]), "accuracy": val(acc[i]), "gt_pixels": int(gt[i]),
                          "pred_pixels": int(pr[i])} for i, n in enumerate(names)},
    }


@torch.no_grad()
def source_confusion(model: nn.Module, meta: dict[str, Any], source: Source, items: list[Item],
                     device: torch.device, tile: int, overlap: int, batch_size: int,
                     autocast: torch.dtype | None = None, channels_last: bool = False,
                     tta: str = "none") -> np.ndarray:
    """Confusion matrix of a model over some items of a source (full frames, tiled like ``predict``).

    Real frames are resized by the model's input scale (and the prediction back), synthetic ones never.
    """
    from finetune.predict import predict_mask

    k = int(meta["num_classes"])
    cm = np.zeros((k, k), np.int64)
    scale = 1.0 if source.kind == "synthetic" else None
    for it in items:
        img, mask = source.load(it)
        pred = predict_mask(model, meta, img, device, tile, overlap, batch_size, autocast, channels_last, scale,
                            tta)
        cm += confusion_matrix(pred, mask, k, int(meta["ignore_index"]))
    return cm


def summarize(cms: dict[str, np.ndarray], kinds: dict[str, str], names: list[str]) -> dict[str, Any]:
    """Per-source metrics plus pooled ``by_kind`` (synthetic / real) and ``overall`` metrics."""
    out: dict[str, Any] = {"sources": {}, "by_kind": {}}
    for name, cm in cms.items():
        out["sources"][name] = {"kind": kinds[name], **metrics_from_confusion(cm, names), "confusion": cm.tolist()}
    for kind in sorted(set(kinds.values())):
        pooled = sum(cm for n, cm in cms.items() if kinds[n] == kind)
        out["by_kind"][kind] = {**metrics_from_confusion(pooled, names), "confusion": pooled.tolist()}
    pooled = sum(cms.values())
    out["overall"] = {**metrics_from_confusion(pooled, names), "confusion": np.asarray(pooled).tolist()}
    return out


def plot_confusion(cm: np.ndarray, names: list[str], title: str) -> bytes:
    """PNG bytes of the row-normalised confusion matrix (each row: where that true class went)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, np.float64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(names)
    side = max(4.0, 0.55 * k + 2)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return figure_png(fig)


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "source"


def _evaluation_key(meta: dict[str, Any], model_dir: Path, data: list, tile: int, overlap: int,
                    tta: str = "none") -> str:
    from finetune.models import WEIGHTS_FILE
    from segfactory.io import canonical_hash, sha256_file

    weights = meta.get("weights_sha256") or sha256_file(model_dir / WEIGHTS_FILE)
    specs = [{**spec.model_dump(mode="json"), "path": str(Path(spec.path).resolve())} for spec in data]
    material = {"weights": weights, "architecture": meta["architecture"], "classes": meta["classes"],
                "ignore_index": meta["ignore_index"], "input": meta["input"], "data": specs, "tile": tile,
                "overlap": overlap}
    if tta != "none":  # keys of plain evaluations stay what they were
        material["tta"] = tta
    return canonical_hash(material, 32)


def evaluation_key(model_dir: str | os.PathLike, data: list, tile: int | None = None,
                   overlap: int | None = None, tta: str = "none") -> str:
    """Hash of what an evaluation's numbers depend on, as stored under ``key`` in ``metrics.json``.

    It covers the model (weights sha256, architecture, classes, input normalisation), every evaluation spec
    (resolved path, remap, class table, ...) and the tiling; not the files inside the evaluation folders.

    Args:
        model_dir: A model dir.
        data: :class:`~finetune.config.SourceSpec` per evaluation folder.
        tile: Tile side, default model.json's.
        overlap: Tile overlap, default model.json's.
        tta: Test-time augmentation mode.
    """
    from finetune.models import read_model_meta
    from finetune.predict import inference_settings

    meta = read_model_meta(model_dir)
    tile, overlap, _ = inference_settings(meta, tile, overlap, None)
    return _evaluation_key(meta, Path(model_dir), data, tile, overlap, tta)


def run_evaluate(model_dir: str | os.PathLike, data: list, out_dir: str | os.PathLike, *, device: str = "auto",
                 tile: int | None = None, overlap: int | None = None, batch_size: int | None = None,
                 show_progress: bool = True, tta: str = "none", scale: float | None = None) -> dict[str, Any]:
    """Evaluate a model dir on labeled sources and write ``metrics.json`` + confusion PNGs to ``out_dir``.

    Args:
        model_dir: A model dir.
        data: :class:`~finetune.config.SourceSpec` per evaluation folder (kind detected).
        tta: Test-time augmentation: ``none``, ``flip`` or ``d4``.
        scale: Input scale for the real folders instead of model.json's ``input.scale``.

    Returns:
        The report written to ``metrics.json`` (``key``: see :func:`evaluation_key`).
    """
    from finetune.data.remap import make_targets
    from finetune.data.sources import detect_kind, open_source
    from finetune.models import load_model_dir
    from finetune.predict import amp_dtype, check_scale, check_tta, inference_settings, resolve_device
    from segfactory.console import progress
    from segfactory.errors import UserError
    from segfactory.io import atomic_write_bytes, atomic_write_json, ensure_writable_dir

    if not data:
        raise UserError("no evaluation data", fix="pass --data DIR (a rendered dataset or images/ + masks/ folder)")
    dev = resolve_device(device)
    model, meta = load_model_dir(model_dir, dev)
    tile, overlap, batch_size = inference_settings(meta, tile, overlap, batch_size)
    check_tta(tta)
    if scale is not None:
        meta = {**meta, "input": {**meta["input"], "scale": check_scale(scale)}}
    targets = make_targets(meta["classes"], int(meta["ignore_index"]))
    if targets.num_classes != int(meta["num_classes"]):
        raise UserError(f"model.json of '{model_dir}' lists {targets.num_classes} classes but num_classes="
                        f"{meta['num_classes']}", fix="re-export the model dir")
    sources = []
    names: set[str] = set()
    for i, spec in enumerate(data):
        field = f"--data[{i}]"
        src = open_source(spec, detect_kind(Path(spec.path), field), targets, "eval", field_hint=field,
                          lenient_remap=True)
        base, k = src.name, 2
        while src.name in names:
            src.name, k = f"{base}-{k}", k + 1
        names.add(src.name)
        sources.append(src)
    used = {k for s in sources for k in s.remap.mapping}
    for key in {k for spec in data for k in spec.remap}:
        if not any(m.startswith(f"{key} (") or m.endswith(f"({key})") for m in used):
            raise UserError(f"--remap '{key}=...': no evaluation folder has a class '{key}'",
                            fix="check the class names in dataset.json / classes.json")
    out = ensure_writable_dir(out_dir)
    cms: dict[str, np.ndarray] = {}
    with progress(transient=not show_progress) as bar:
        task = bar.add_task("evaluate", total=sum(len(s.val) for s in sources))
        for src in sources:
            k = int(meta["num_classes"])
            cm = np.zeros((k, k), np.int64)
            for it in src.val:
                cm += source_confusion(model, meta, src, [it], dev, tile, overlap, batch_size, amp_dtype(dev),
                                       tta=tta)
                bar.advance(task)
            cms[src.name] = cm
    report = {"model": str(model_dir), "key": _evaluation_key(meta, Path(model_dir), data, tile, overlap, tta),
              "classes": targets.names, "tta": tta,
              "input": {k: meta["input"].get(k) for k in ("scaling", "scale")},
              "data": {s.name: {"kind": s.kind, "path": str(s.path), "images": len(s.val)} for s in sources},
              **summarize(cms, {s.name: s.kind for s in sources}, targets.names)}
    for name, cm in cms.items():
        atomic_write_bytes(out / f"confusion_{safe_name(name)}.png", plot_confusion(cm, targets.names, name))
    atomic_write_bytes(out / "confusion_overall.png",
                       plot_confusion(np.asarray(report["overall"]["confusion"]), targets.names, "overall"))
    atomic_write_json(out / "metrics.json", report)
    return report
