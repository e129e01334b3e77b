"""Scoring on real labeled folders: the model next to classic baselines, in the same table, plus overlays.

For every real source ``segfactory evaluate`` scores, rows ``model`` and each baseline (``otsu``,
``blur_otsu``, see :mod:`finetune.baselines`) get: per-class IoU (same confusion-matrix rules as the rest of the
evaluation) and mIoU over **the folder's own classes** (its background and foreground classes after the mapping, listed
as ``miou_classes``; model classes the folder does not label are left out of the mean, their pixels still count as
misses of the true class), **foreground IoU** (the union of the folder's non-background classes vs the rest), and,
for every thing class, **instance F1** at IoU >= 0.5 with one-to-one matching, mean matched IoU and count error
(:mod:`finetune.metrics`).

- Which target classes are foreground and background comes from the folder's own class table mapped onto the
  model's classes: its class named ``background`` (else id 0) is background, the others are foreground; thing
  classes are those marked ``"thing": true`` in ``classes.json`` (all foreground classes when no class says).
- True instances are ``instances/<stem>.png`` when the folder has them (uint16 ids), else the 4-connected
  components of each thing class in the mask (touching objects then count as one).
- Predicted instances of the ``model`` row (and of the baselines) are the 4-connected components of each thing
  class in the predicted class map ("semantic + connected components"). A model with an instance head
  (:mod:`finetune.instances`) gets a second row, ``model_watershed``: the same class map (same IoUs), its
  instances split by the seeded watershed of its distance map with model.json's parameters.
- Baselines apply to foreground/background tasks only (one foreground class after the mapping); for other
  folders the report says they do not apply.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.baselines import BASELINES, DETECTS, POLARITIES
from finetune.data.remap import TargetClasses
from finetune.data.sources import Item, Source, read_instances
from finetune.metrics import (
    InstanceTally,
    components,
    confusion_matrix,
    foreground_counts,
    metrics_from_confusion,
    safe_name,
)
from segfactory.errors import UserError

MODEL_ROW = "model"
WATERSHED_ROW = "model_watershed"
OVERLAY_CROP = 512
GT_COLOR = (0, 230, 0)
ROW_COLORS = {MODEL_ROW: (255, 0, 255), WATERSHED_ROW: (255, 60, 60), "otsu": (255, 160, 0),
              "blur_otsu": (0, 190, 255)}
# A 16-bit image whose values span less than this share of 0..65535 is nearly flat under `dtype` scaling.
FLAT_SHARE = 1 / 8


@dataclass
class RealTask:
    """How one real folder is scored (target ids of the model)."""

    background: int | None
    foreground: list[int]
    things: list[int]
    polarity: str
    polarity_from: str
    instances_dir: Path | None
    labels: str | None = None

    @property
    def binary(self) -> bool:
        return self.background is not None and len(self.foreground) == 1


def real_task(spec: Any, src: Source, targets: TargetClasses) -> RealTask:
    """Read the folder's class table (and ``classes.json``'s ``polarity``/``thing``/``labels``) into a task.

    Raises:
        UserError: ``classes.json`` holds a polarity other than bright, dark or auto.
    """
    from finetune.data.sources import real_class_table
    from segfactory.io import read_json

    classes, _ = real_class_table(spec, src.path, targets)
    extra: dict[str, Any] = {}
    cj = src.path / "classes.json"
    if spec.classes is None and cj.is_file():
        data = read_json(cj)
        extra = data if isinstance(data, dict) else {}
    polarity = str(extra.get("polarity", "auto"))
    if polarity not in POLARITIES:
        raise UserError(f"'{cj}': polarity '{polarity}' is not one of {', '.join(POLARITIES)}",
                        fix="write \"polarity\": \"bright\" (objects brighter than the background), \"dark\" or "
                            "\"auto\"")
    lut = src.remap.lut
    mapped = {int(c["id"]): int(lut[int(c["id"])]) for c in classes if int(lut[int(c["id"])]) != targets.ignore_index}
    names = {int(c["id"]): str(c["name"]) for c in classes}
    bg_src = next((i for i in mapped if names[i].lower() == "background"
                   or targets.names[mapped[i]].lower() == "background"), 0 if 0 in mapped else None)
    background = mapped[bg_src] if bg_src is not None else None
    says_thing = any("thing" in c for c in classes)
    fg: list[int] = []
    things: list[int] = []
    for c in classes:
        sid = int(c["id"])
        tid = mapped.get(sid)
        if tid is None or tid == background:
            continue
        if tid not in fg:
            fg.append(tid)
        if bool(c.get("thing", not says_thing)) and tid not in things:
            things.append(tid)
    inst = src.path / "instances"
    return RealTask(background, sorted(fg), sorted(things), polarity,
                    "classes.json" if "polarity" in extra else "auto (minority side of the threshold)",
                    inst if inst.is_dir() else None, str(extra["labels"]) if "labels" in extra else None)


@dataclass
class _Row:
    cm: np.ndarray
    fg_inter: int = 0
    fg_union: int = 0
    inst: dict[int, InstanceTally] = field(default_factory=dict)


@dataclass
class FrameScore:
    """One image's contribution to a :class:`RealScorer` (:meth:`RealScorer.score`)."""

    value_range: tuple[int, int] | None
    rows: dict[str, _Row]
    overlay: str | None


class RealScorer:
    """Accumulates the model's and the baselines' scores over one real source, and writes its overlays.

    Args:
        spec: The source's :class:`~finetune.config.SourceSpec`.
        src: The opened source.
        targets: The model's classes.
        baselines: Baseline names to score (ignored when the task is not foreground/background).
        overlays: How many of the source's images get an overlay PNG (spread over the items).
        out_dir: The evaluation's output dir (overlays go to ``overlays/<source>/<stem>.png``).
        scaling: The model's ``input.scaling`` (for the flat-input warning).
    """

    def __init__(self, spec: Any, src: Source, targets: TargetClasses, baselines: list[str], overlays: int,
                 out_dir: Path, scaling: str, watershed: bool = False):
        self.src = src
        self.targets = targets
        self.task = real_task(spec, src, targets)
        self._check_instance_sizes()
        self.baselines = list(baselines) if self.task.binary else []
        self.notes: list[str] = []
        fg = [targets.names[c] for c in self.task.foreground]
        for name in [b for b in self.baselines if b in DETECTS and DETECTS[b] not in fg]:
            self.baselines.remove(name)
            self.notes.append(f"baseline {name} not scored: it detects '{DETECTS[name]}', this folder's foreground "
                              f"is {', '.join(fg) or 'none'}")
        self.k = targets.num_classes
        model_rows = [MODEL_ROW, WATERSHED_ROW] if watershed else [MODEL_ROW]
        self.rows = {name: _Row(np.zeros((self.k, self.k), np.int64)) for name in [*model_rows, *self.baselines]}
        n = len(src.val)
        picks = np.unique(np.linspace(0, n - 1, min(overlays, n)).round().astype(int)) if overlays > 0 and n else []
        self.overlay_keys = {src.val[i].key for i in picks}
        self.out_dir = out_dir
        self.overlay_files: list[str] = []
        self.scaling = scaling
        self.value_range: tuple[int, int] | None = None

    def _check_instance_sizes(self) -> None:
        """Instance masks of another size than their mask fail here, before any work (PNG headers only)."""
        from PIL import Image

        if self.task.instances_dir is None:
            return
        for it in self.src.train + self.src.val:
            path = self.task.instances_dir / f"{it.key}.png"
            if not path.is_file():
                continue
            try:
                with Image.open(path) as im, Image.open(it.mask) as mk:
                    same = im.size == mk.size
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read instance mask '{path}': {e}",
                                fix="re-save it as a single-channel PNG") from None
            if not same:
                raise UserError(f"instance mask '{path}' is not the size of its mask '{it.mask}'",
                                fix="make instances/<stem>.png the size of the image")

    # -------------------------------------------------------------------------------------------- scoring
    def _gt_instances(self, item: Item, gt: np.ndarray, cls: int) -> np.ndarray:
        if self.task.instances_dir is not None:
            path = self.task.instances_dir / f"{item.key}.png"
            if path.is_file():
                inst = read_instances(path, gt.shape)
                return np.where(gt == cls, inst, 0)
        return components(gt == cls)

    def add(self, item: Item, img: np.ndarray, gt: np.ndarray, pred: np.ndarray,
            pred_instances: np.ndarray | None = None) -> None:
        """Score one image: ``gt`` and ``pred`` are (H, W) target ids (``gt`` with the ignore index);
        ``pred_instances`` (H, W) the model's watershed instance ids (the ``model_watershed`` row)."""
        self.fold(self.score(item, img, gt, pred, pred_instances))

    def score(self, item: Item, img: np.ndarray, gt: np.ndarray, pred: np.ndarray,
              pred_instances: np.ndarray | None = None) -> FrameScore:
        """One image's scores (and its overlay PNG when it is one of the chosen images), without touching the
        totals: safe in a worker thread; :meth:`fold` the results in image order. Arguments as in :meth:`add`."""
        value_range = (int(img.min()), int(img.max())) if img.dtype == np.uint16 else None
        valid = gt != self.targets.ignore_index
        task = self.task
        fg_ids = np.asarray(task.foreground, np.int64)
        gt_fg = np.isin(gt, fg_ids)
        preds: dict[str, np.ndarray] = {MODEL_ROW: pred}
        if WATERSHED_ROW in self.rows:
            if pred_instances is None:
                raise ValueError("this scorer has a watershed row: pass pred_instances")
            preds[WATERSHED_ROW] = pred
        for name in self.baselines:
            fg = BASELINES.get(name)(img, task.polarity)
            assert task.background is not None
            preds[name] = np.where(fg, task.foreground[0], task.background).astype(np.uint8)
        gt_inst = {c: np.where(valid, self._gt_instances(item, gt, c), 0) for c in task.things}
        per_image: dict[str, dict[str, Any]] = {}
        pred_inst: dict[str, np.ndarray] = {}
        rows: dict[str, _Row] = {}
        for name, p in preds.items():
            row = rows[name] = _Row(confusion_matrix(p, gt, self.k, self.targets.ignore_index))
            row.fg_inter, row.fg_union = foreground_counts(np.isin(p, fg_ids), gt_fg, valid)
            img_scores: dict[str, Any] = {"fg_iou": row.fg_inter / row.fg_union if row.fg_union else None}
            labels = np.zeros(gt.shape, np.int32)
            for c in task.things:
                own = components(p == c) if name != WATERSHED_ROW else np.where(p == c, pred_instances, 0)
                pi = np.where(valid, own, 0)
                one = row.inst[c] = InstanceTally.of_image(gt_inst[c], pi)
                img_scores.setdefault("f1", one.result()["f1"])
                labels = np.where(pi > 0, pi + labels.max(), labels) if labels.any() else pi
            per_image[name] = img_scores
            pred_inst[name] = labels
        rel = None
        if item.key in self.overlay_keys:
            gt_all = np.zeros(gt.shape, np.int32)
            for c in task.things:
                gt_all = np.where(gt_inst[c] > 0, gt_inst[c] + gt_all.max(), gt_all) if gt_all.any() else gt_inst[c]
            if not task.things:  # no thing class: outline the foreground regions
                gt_all = components(gt_fg)
                pred_inst = {n: components(np.isin(p, fg_ids)) for n, p in preds.items()}
            rel = f"overlays/{safe_name(self.src.name)}/{safe_name(item.key)}.png"
            from segfactory.io import atomic_write_bytes

            atomic_write_bytes(self.out_dir / rel, overlay_png(img, gt_all, pred_inst, per_image, item.key))
        return FrameScore(value_range, rows, rel)

    def fold(self, frame: FrameScore) -> None:
        """Add one image's :meth:`score` to the totals (call in image order: the report lists follow it)."""
        if frame.value_range is not None:
            lo, hi = frame.value_range
            self.value_range = (lo, hi) if self.value_range is None else (min(lo, self.value_range[0]),
                                                                          max(hi, self.value_range[1]))
        for name, one in frame.rows.items():
            row = self.rows[name]
            row.cm += one.cm
            row.fg_inter += one.fg_inter
            row.fg_union += one.fg_union
            for c, t in one.inst.items():
                row.inst.setdefault(c, InstanceTally()).merge(t)
        if frame.overlay is not None:
            self.overlay_files.append(frame.overlay)

    # -------------------------------------------------------------------------------------------- results
    @property
    def miou_classes(self) -> list[int]:
        """The target ids a row's mIoU averages: the folder's own classes (its background and foreground), not
        every class of the model. A model class the folder does not label would otherwise score IoU 0 from a few
        stray pixels and pull the model's mIoU below baselines that only ever predict the folder's classes; those
        stray pixels still count, as misses of the true class they cover. The same classes as the per-source
        mIoU of :func:`finetune.evaluate.summarize`."""
        return self.src.remap.labeled(self.targets.ignore_index)

    def result(self) -> dict[str, Any]:
        names = self.targets.names
        task = self.task
        if self.value_range is not None and self.scaling == "dtype":
            lo, hi = self.value_range
            if hi - lo < FLAT_SHARE * 65535:
                self.notes.append(
                    f"input.scaling=dtype (from model.json) maps these 16-bit images (values {lo}..{hi}) to "
                    f"{lo / 65535:.3f}..{hi / 65535:.3f}: the model sees a nearly flat image; a model for such data "
                    "is better trained with input.scaling=percentile")
        rows: dict[str, Any] = {}
        for name, row in self.rows.items():
            m = metrics_from_confusion(row.cm, names, self.miou_classes)
            rows[name] = {
                "miou": m["miou"],
                "per_class_iou": {n: m["per_class"][n]["iou"] for n in names},
                "fg_iou": round(row.fg_inter / row.fg_union, 6) if row.fg_union else None,
                "instances": {names[c]: t.result() for c, t in row.inst.items()},
            }
        if task.binary:
            applies: str | list[str] = self.baselines
        else:
            applies = (f"not applicable: {len(task.foreground)} foreground classes after mapping "
                       f"({', '.join(names[c] for c in task.foreground) or 'none'}); the classic baselines score "
                       "foreground/background tasks only")
        return {
            "path": str(self.src.path), "images": len(self.src.val),
            "background": None if task.background is None else names[task.background],
            "foreground_classes": [names[c] for c in task.foreground],
            "thing_classes": [names[c] for c in task.things],
            "miou_classes": [names[c] for c in self.miou_classes],
            "true_instances": "instances/<stem>.png" if task.instances_dir is not None
            else "4-connected components of the mask",
            "polarity": task.polarity, "polarity_from": task.polarity_from,
            "labels": task.labels, "baselines": applies, "rows": rows, "overlays": self.overlay_files,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------------ drawing
def _display_gray(img: np.ndarray) -> np.ndarray:
    """(H, W) uint8 for display: the 0.5..99.5 percentiles stretched (the raw offset would hide everything)."""
    from finetune.data.normalize import to_unit

    return (to_unit(img, 1, "percentile")[0] * 255 + 0.5).astype(np.uint8)


def _crop_box(objects: np.ndarray, size: int = OVERLAY_CROP) -> tuple[slice, slice]:
    """A window of at most ``size`` px centred on the objects' centre of mass (the image centre if none)."""
    h, w = objects.shape[:2]
    ys, xs = np.nonzero(objects)
    cy, cx = (int(ys.mean()), int(xs.mean())) if ys.size else (h // 2, w // 2)
    y0 = min(max(0, cy - size // 2), max(0, h - size))
    x0 = min(max(0, cx - size // 2), max(0, w - size))
    return slice(y0, y0 + min(size, h)), slice(x0, x0 + min(size, w))


def _title(scores: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    return f"fg IoU {f(scores.get('fg_iou'))}  F1 {f(scores.get('f1'))}"


def overlay_png(img: np.ndarray, gt: np.ndarray, preds: dict[str, np.ndarray], scores: dict[str, dict[str, Any]],
                title: str) -> bytes:
    """One PNG: a panel per row (model, baselines) over the same crop of the image (at most 512 px, centred on
    the true objects).

    Each panel shows the true outlines in green (inside the objects) and that row's outlines in its colour
    (just outside its objects, so matching outlines lie side by side instead of hiding each other).
    """
    from PIL import Image, ImageDraw
    from skimage.segmentation import find_boundaries

    ys, xs = _crop_box(gt > 0)
    base = _display_gray(img)[ys, xs]
    g_edge = find_boundaries(gt[ys, xs], mode="inner")
    panels = []
    header = 30
    for name, lab in preds.items():
        rgb = np.repeat(base[..., None], 3, axis=2)
        rgb[find_boundaries(lab[ys, xs], mode="outer")] = ROW_COLORS.get(name, (255, 255, 0))
        rgb[g_edge] = GT_COLOR
        canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + header), (255, 255, 255))
        canvas.paste(Image.fromarray(rgb), (0, header))
        draw = ImageDraw.Draw(canvas)
        draw.text((4, 1), f"{title}: {name} (green = reference)", fill=(0, 0, 0))
        draw.text((4, 13), _title(scores.get(name, {})), fill=(0, 0, 0))
        draw.rectangle((0, header - 4, canvas.width, header - 1), fill=ROW_COLORS.get(name, (255, 255, 0)))
        panels.append(canvas)
    gap = 6
    out = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), max(p.height for p in panels)),
                    (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def plot_real_scores(real: dict[str, Any]) -> bytes:
    """Grouped bars per real source: foreground IoU, instance F1 and mean matched IoU of every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segfactory.plotting import figure_png

    names = list(real)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    metrics = [("fg IoU", lambda r: r["fg_iou"]), ("instance F1", lambda r: _first(r, "f1")),
               ("matched IoU", lambda r: _first(r, "mean_matched_iou"))]
    for ax, name in zip(axes[0], names, strict=True):
        rows = real[name]["rows"]
        width = 0.8 / max(len(rows), 1)
        for j, (row, r) in enumerate(rows.items()):
            vals = [fn(r) for _, fn in metrics]
            xs = np.arange(len(metrics)) + (j - (len(rows) - 1) / 2) * width
            color = np.asarray(ROW_COLORS.get(row, (120, 120, 120))) / 255
            bars = ax.bar(xs, [v or 0 for v in vals], width, label=row, color=color)
            for b, v in zip(bars, vals, strict=True):
                ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 0.01, "-" if v is None else f"{v:.2f}",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(metrics)), [m[0] for m in metrics])
        ax.set_ylim(0, 1.3)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(f"{name} ({real[name]['images']} images)", fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=len(rows), frameon=False)
    fig.suptitle("model vs classic baselines on real images", fontsize=10)
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def _first(row: dict[str, Any], key: str) -> float | None:
    inst = row.get("instances") or {}
    return next(iter(inst.values()))[key] if inst else None
