"""Evaluation: confusion matrices, mIoU, per-class IoU and pixel accuracy, per data source and per kind.

Conventions: rows of a confusion matrix are ground truth, columns predictions; ignore pixels are left out.
mIoU averages the IoU of classes that occur in the ground truth or the prediction (a class absent from both
has no defined IoU and is reported as ``null``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune.data.sources import Item, Source
from finetune.metrics import confusion_matrix, metrics_from_confusion, safe_name
from segfactory.plotting import figure_png


@torch.no_grad()
def source_confusion(model: nn.Module, meta: dict[str, Any], source: Source, items: list[Item],
                     device: torch.device, tile: int, overlap: int, batch_size: int,
                     autocast: torch.dtype | None = None, channels_last: bool = False,
                     tta: str = "none") -> np.ndarray:
    """Confusion matrix of a model over some items of a source (full frames, tiled like ``predict``).

    Real frames are resized by the model's input scale (each by its own estimate under ``input.scale_mode:
    per_image``, :func:`finetune.predict.image_scale`) and the prediction back; synthetic ones never.
    """
    from finetune.predict import image_scale, predict_mask

    k = int(meta["num_classes"])
    cm = np.zeros((k, k), np.int64)
    for it in items:
        img, mask = source.load(it)
        f = 1.0 if source.kind == "synthetic" else image_scale(model, meta, img, device, tile, overlap,
                                                                batch_size, autocast, channels_last)
        pred = predict_mask(model, meta, img, device, tile, overlap, batch_size, autocast, channels_last, f,
                            tta)
        cm += confusion_matrix(pred, mask, k, int(meta["ignore_index"]))
    return cm


def eval_workers(device: torch.device) -> int:
    """Default post-processing threads of :func:`run_evaluate`: with a GPU the CPU work after the model (argmax,
    watershed, baselines, instance matching) is what bounds the frame rate, so up to 4 threads (one core left for
    the thread that feeds the GPU); on the CPU none (0: inline), since the model's own threads already use every
    core and a worker only competes with them (measured on 2 cores: no gain)."""
    if device.type == "cpu":
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class FramePipeline:
    """Runs each frame's post-processing on worker threads while the caller predicts the next frame, and folds
    the results into the totals in submission order (so totals and report lists do not depend on ``workers``).

    At most ``2 * workers`` frames are in flight (their images and probabilities are held). With ``workers=0``
    everything runs inline.
    """

    def __init__(self, workers: int):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.workers = max(0, int(workers))
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="evaluate") if self.workers else None
        self.pending: deque[tuple[Any, Callable[[Any], None]]] = deque()

    def submit(self, post: Callable[..., Any], fold: Callable[[Any], None], *args: Any) -> None:
        """``fold(post(*args))``, the ``post`` part possibly on a worker thread; folds run on this thread."""
        if self.pool is None:
            fold(post(*args))
            return
        self.pending.append((self.pool.submit(post, *args), fold))
        while len(self.pending) > 2 * self.workers or (self.pending and self.pending[0][0].done()):
            self._fold_next()

    def _fold_next(self) -> None:
        future, fold = self.pending.popleft()
        fold(future.result())

    def drain(self) -> None:
        """Fold every frame still in flight."""
        while self.pending:
            self._fold_next()

    def __enter__(self) -> FramePipeline:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=exc_type is not None)


class SyntheticInstances:
    """Instance F1 of a model on a rendered source's thing classes, against the frames' own instance maps: the
    ``model`` row (semantic + 4-connected components) and, for a model with an instance head, ``model_watershed``.
    """

    def __init__(self, source: Source, targets: Any, watershed: bool):
        from segfactory.formats.dataset import open_dataset

        self.source = source
        self.targets = targets
        lut = source.remap.lut
        self.things = sorted({int(lut[int(c["id"])]) for c in open_dataset(source.path).classes
                              if c.get("thing") and int(lut[int(c["id"])]) != targets.ignore_index})
        from finetune.metrics import InstanceTally

        rows = ["model", "model_watershed"] if watershed else ["model"]
        self.tallies = {r: {c: InstanceTally() for c in self.things} for r in rows}

    def add(self, item: Item, mask: np.ndarray, pred: np.ndarray, inst: np.ndarray | None) -> None:
        """Score one frame: ``mask``/``pred`` (H, W) target ids, ``inst`` the watershed instances (or ``None``)."""
        self.fold(self.score(item, mask, pred, inst))

    def score(self, item: Item, mask: np.ndarray, pred: np.ndarray,
              inst: np.ndarray | None) -> dict[str, dict[int, Any]] | None:
        """One frame's tallies per row and class, totals untouched (worker-thread safe; :meth:`fold` in order)."""
        from finetune.metrics import InstanceTally, components

        true = self.source.load_instances(item, mask)
        if true is None:
            return None
        valid = mask != self.targets.ignore_index
        out: dict[str, dict[int, Any]] = {r: {} for r in self.tallies}
        for c in self.things:
            gt = np.where((mask == c) & valid, true, 0)
            out["model"][c] = InstanceTally.of_image(gt, np.where(valid, components(pred == c), 0))
            if "model_watershed" in self.tallies:
                assert inst is not None
                out["model_watershed"][c] = InstanceTally.of_image(gt, np.where(valid & (pred == c), inst, 0))
        return out

    def fold(self, frame: dict[str, dict[int, Any]] | None) -> None:
        """Add one frame's :meth:`score` to the totals."""
        for row, per in (frame or {}).items():
            for c, one in per.items():
                self.tallies[row][c].merge(one)

    def result(self) -> dict[str, Any]:
        names = self.targets.names
        return {row: {names[c]: t.result() for c, t in per.items()} for row, per in self.tallies.items()}


def summarize(cms: dict[str, np.ndarray], kinds: dict[str, str], names: list[str],
              labeled: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Per-source metrics plus pooled ``by_kind`` (synthetic / real) and ``overall`` metrics.

    Args:
        cms: (K, K) confusion per source.
        kinds: ``synthetic`` or ``real`` per source.
        names: The K class names.
        labeled: The class ids each source labels (:meth:`~finetune.data.remap.Remap.labeled`); a source's mIoU
            averages those, a pooled one their union. Missing: all classes.
    """
    labeled = labeled or {}
    all_ids = list(range(len(names)))

    def scored(sources: list[str]) -> list[int]:
        return sorted({c for n in sources for c in labeled.get(n, all_ids)})

    out: dict[str, Any] = {"sources": {}, "by_kind": {}}
    for name, cm in cms.items():
        out["sources"][name] = {"kind": kinds[name], **metrics_from_confusion(cm, names, scored([name])),
                                "confusion": cm.tolist()}
    for kind in sorted(set(kinds.values())):
        members = [n for n in cms if kinds[n] == kind]
        pooled = sum(cms[n] for n in members)
        out["by_kind"][kind] = {**metrics_from_confusion(pooled, names, scored(members)), "confusion": pooled.tolist()}
    pooled = sum(cms.values())
    out["overall"] = {**metrics_from_confusion(pooled, names, scored(list(cms))),
                      "confusion": np.asarray(pooled).tolist()}
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


def _evaluation_key(meta: dict[str, Any], model_dir: Path, data: list, tile: int, overlap: int,
                    tta: str = "none") -> str:
    from segfactory.formats.model import WEIGHTS_FILE
    from segfactory.io import canonical_hash, sha256_file

    weights = meta.get("weights_sha256") or sha256_file(model_dir / WEIGHTS_FILE)
    specs = [{**spec.model_dump(mode="json"), "path": str(Path(spec.path).resolve())} for spec in data]
    material = {"weights": weights, "architecture": meta["architecture"], "classes": meta["classes"],
                "ignore_index": meta["ignore_index"], "input": meta["input"], "data": specs, "tile": tile,
                "overlap": overlap}
    if tta != "none":  # keys of plain evaluations stay what they were
        material["tta"] = tta
    if meta.get("cleanup"):  # models without object sizes keep their keys
        material["cleanup"] = meta["cleanup"]
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
    from finetune.predict import inference_settings
    from segfactory.formats.model import read_model_meta

    meta = read_model_meta(model_dir)
    tile, overlap, _ = inference_settings(meta, tile, overlap, None)
    return _evaluation_key(meta, Path(model_dir), resolve_sample_specs(data), tile, overlap, tta)


def resolve_sample_specs(data: list) -> list:
    """The specs with ``sample:NAME/SPLIT`` paths materialized (:mod:`segfactory.sampledata`)."""
    from segfactory.sampledata import is_sample_ref, parse_ref, resolve_path

    out = []
    for spec in data:
        if is_sample_ref(spec.path):
            # Named after the set (its folder is just `eval`), unless the spec names it.
            spec = spec.model_copy(update={"path": resolve_path(spec.path),
                                           "name": spec.name or parse_ref(str(spec.path))[0]})
        out.append(spec)
    return out


def resolve_labeled_specs(specs: list, field: str) -> list:
    """Labeled-folder specs (fine-tuning's ``data.real`` / ``data.val``, a sweep's ``test``) with
    ``sample:NAME/SPLIT`` paths materialized and named after the set, as evaluate's ``--data``
    (:func:`resolve_sample_specs`); other specs are returned as given.

    Args:
        specs: :class:`~finetune.config.SourceSpec` list.
        field: How errors name the list (``--real``, ``data.val``, ``test``).

    Raises:
        UserError: a sample reference to the ``unlabeled`` split (images without masks) or to no split.
    """
    from segfactory.errors import UserError
    from segfactory.sampledata import SAMPLE_SETS, is_sample_ref, parse_ref, splits_of

    for i, spec in enumerate(specs):
        if not is_sample_ref(spec.path):
            continue
        name, split = parse_ref(str(spec.path))
        if split in (None, "unlabeled"):
            labeled = sorted((s for s in splits_of(SAMPLE_SETS.get(name)) if s != "unlabeled"),
                             key=lambda s: s != "labeled")  # the training frames first, eval frames last
            what = "names no split" if split is None else "is images without masks"
            raise UserError(f"{field}[{i}] '{spec.path}' {what}: a labeled folder is needed",
                            fix=f"pass {' or '.join(f'sample:{name}/{s}' for s in labeled)}"
                                + (" (unlabeled images go to --unlabeled)" if split else ""))
    return resolve_sample_specs(specs)


def check_real_classes(spec: Any, targets: Any, flag: str = "--remap ") -> None:
    """Every class of a real folder must map onto a model class (by name or ``remap``), before any work.

    Args:
        spec: The folder's :class:`~finetune.config.SourceSpec` (its ``remap`` counts).
        targets: The model's classes.
        flag: How the fix spells a mapping (``--remap `` on the command line, ``eval.remap.`` for a run).

    Raises:
        UserError: naming the folder, the class and the model's classes, with the ``--remap`` that fixes it.
    """
    from finetune.data.sources import real_class_table
    from segfactory.errors import UserError

    classes, _ = real_class_table(spec, Path(spec.path), targets)
    remapped = {str(k) for k in spec.remap}
    missing = [c for c in classes if targets.id_of(str(c["name"])) is None
               and str(c["name"]) not in remapped and str(c["id"]) not in remapped]
    if not missing:
        return
    c = missing[0]
    fg_model = [n for n in targets.names if n != "background"]
    guess = fg_model[0] if len(fg_model) == 1 else f"<one of {', '.join(targets.names)}>"
    raise UserError(f"real folder '{spec.path}': its class '{c['name']}' (id {c['id']}) is not a class of the model "
                    f"({', '.join(targets.names)})",
                    fix=f"map it: {flag}{c['name']}={guess} (or {flag}{c['name']}=ignore)")


def run_evaluate(model_dir: str | os.PathLike, data: list, out_dir: str | os.PathLike, *, device: str = "auto",
                 tile: int | None = None, overlap: int | None = None, batch_size: int | None = None,
                 show_progress: bool = True, baselines: str | list[str] | None = None,
                 overlays: int = 4, tta: str = "none", scale: float | str | None = None,
                 workers: int | None = None, min_object: float | None = None, data_field: str = "--data",
                 remap_flag: str | None = "--remap ") -> dict[str, Any]:
    """Evaluate a model dir on labeled sources and write ``metrics.json`` + confusion PNGs to ``out_dir``.

    The outputs are written into a fresh attempt directory next to ``out_dir`` and renamed into place when
    complete (:mod:`segfactory.io`'s commit protocol), so ``out_dir`` holds only this evaluation: a previous
    evaluation there (a folder with ``metrics.json`` or ``evaluate.yaml``) is replaced as a whole, never mixed
    with the new files; a failed evaluation leaves it as it was. See :func:`_evaluate_into` for the rest.

    Raises:
        UserError: ``out_dir`` is a non-empty folder that is not an evaluation (it would be replaced), and the
            errors of :func:`_evaluate_into`.
    """
    import shutil

    from segfactory.errors import UserError
    from segfactory.io import (
        commit_unit,
        empty_trash,
        ensure_writable_dir,
        move_to_trash,
        new_attempt_dir,
        remove_stale_attempts,
    )

    final = Path(out_dir).absolute()
    if final.exists() and not final.is_dir():
        raise UserError(f"--out '{out_dir}' is a file", fix="pass a folder for the evaluation's outputs")
    if final.is_dir() and any(final.iterdir()) and not any((final / f).exists() for f in EVALUATION_MARKS):
        raise UserError(f"--out '{out_dir}' holds files that are not an evaluation (no metrics.json); the "
                        "evaluation replaces its --out as a whole", fix="pass a new or empty folder")
    parent = ensure_writable_dir(final.parent)
    remove_stale_attempts(parent, final.name)
    tmp = new_attempt_dir(parent, final.name)
    try:
        report = _evaluate_into(model_dir, data, tmp, device=device, tile=tile, overlap=overlap,
                                batch_size=batch_size, show_progress=show_progress, baselines=baselines,
                                overlays=overlays, tta=tta, scale=scale, workers=workers, min_object=min_object,
                                data_field=data_field, remap_flag=remap_flag)
        if final.exists():
            move_to_trash(final)
        commit_unit(tmp, final, mark="metrics.json")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    empty_trash(parent)
    return report


# What marks a folder as an evaluation's --out (replaced as a whole by the next evaluation into it).
EVALUATION_MARKS = ("metrics.json", "evaluate.yaml")


def _evaluate_into(model_dir: str | os.PathLike, data: list, out_dir: str | os.PathLike, *, device: str = "auto",
                 tile: int | None = None, overlap: int | None = None, batch_size: int | None = None,
                 show_progress: bool = True, baselines: str | list[str] | None = None,
                 overlays: int = 4, tta: str = "none", scale: float | str | None = None,
                 workers: int | None = None, min_object: float | None = None, data_field: str = "--data",
                 remap_flag: str | None = "--remap ") -> dict[str, Any]:
    """Evaluate a model dir on labeled sources and write ``metrics.json`` + confusion PNGs to ``out_dir``.

    Real labeled folders are also scored by :mod:`finetune.realeval`: the model next to the classic baselines
    (foreground IoU, instance F1, ...) in ``metrics.json``'s ``real`` section, ``real_scores.png`` and
    ``overlays/<source>/<stem>.png``; a model with an instance head adds the ``model_watershed`` row. Rendered
    sources with thing classes get instance F1 against their instance maps in the ``instances`` section
    (``model`` = semantic + connected components, and ``model_watershed``).

    Args:
        model_dir: A model dir.
        data: :class:`~finetune.config.SourceSpec` per evaluation folder (kind detected; ``sample:NAME/SPLIT``
            paths are materialized).
        baselines: Baselines scored on real folders (names, comma-separated, ``all``/``none``; default all).
        overlays: Overlay PNGs per real folder.
        tta: Test-time augmentation: ``none``, ``flip``, ``d4``, ``ms`` or ``ms_flip``
            (:data:`finetune.config.TTA_CHOICES`).
        scale: Input scale for the real folders instead of model.json's: a factor, or ``auto`` for each
            image's own estimate (:func:`finetune.predict.resolve_scale`).
        workers: Threads that post-process and score frames (argmax, watershed, baselines, instance matching,
            overlays) while the model predicts the next frame; default :func:`eval_workers`; 0 = all inline.
            The report is the same for every value: frames are folded into the totals in order.
        data_field: How ``data`` was given, for errors: ``--data`` (``--data[0]``), or a config field
            (``test``: ``test[0]``).
        remap_flag: The option the sources' ``remap`` came from, as a mapping's prefix (``--remap ``: fixes say
            ``--remap sky=ignore``), or None for remaps from a config (fixes name ``<data_field>[i].remap``).
        min_object: Speck cleanup share instead of model.json's ``cleanup.min_object`` (0 = off;
            :mod:`finetune.cleanup`); the report's ``min_object`` says which was used.

    Returns:
        The report written to ``metrics.json`` (``key``: see :func:`evaluation_key`).
    """
    from finetune.baselines import parse_baselines
    from finetune.data.remap import make_targets
    from finetune.data.sources import detect_kind, open_source
    from finetune.models import load_model_dir
    from finetune.predict import (
        check_tta,
        image_scale,
        inference_settings,
        memory_settings,
        outputs_from_probs,
        per_image_scales,
        predict_image_probs,
        resolve_scale,
    )
    from finetune.realeval import RealScorer, plot_real_scores
    from segfactory.console import console, progress
    from segfactory.errors import UserError
    from segfactory.io import atomic_write_bytes, atomic_write_json
    from segfactory.torchutil import amp_dtype, memory_hint, resolve_device

    if not data:
        raise UserError("no evaluation data", fix="pass --data DIR (a rendered dataset or images/ + masks/ folder)")
    if overlays < 0:
        raise UserError(f"overlays={overlays} is negative", fix="pass --overlays 0 or more")
    baseline_names = parse_baselines(baselines)
    data = resolve_sample_specs(data)
    dev = resolve_device(device)
    model, meta = load_model_dir(model_dir, dev)
    tile, overlap, batch_size = inference_settings(meta, tile, overlap, batch_size)
    check_tta(tta)
    meta = resolve_scale(meta, scale)
    from finetune.cleanup import with_min_object

    meta = with_min_object(meta, min_object)
    targets = make_targets(meta["classes"], int(meta["ignore_index"]))
    if targets.num_classes != int(meta["num_classes"]):
        raise UserError(f"model.json of '{model_dir}' lists {targets.num_classes} classes but num_classes="
                        f"{meta['num_classes']}", fix="re-export the model dir")
    sources = []
    names: set[str] = set()
    for i, spec in enumerate(data):
        field = f"{data_field}[{i}]"
        kind = detect_kind(Path(spec.path), field)
        if kind == "real":
            if remap_flag:
                check_real_classes(spec, targets, remap_flag)
            else:
                check_real_classes(spec, targets)
        src = open_source(spec, kind, targets, "eval", field_hint=field, lenient_remap=True, remap_flag=remap_flag)
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
    watershed = bool(meta.get("instances"))
    scorers = {src.name: RealScorer(spec, src, targets, baseline_names, overlays, Path(out_dir),
                                    meta["input"]["scaling"], watershed=watershed)
               for spec, src in zip(data, sources, strict=True) if src.kind == "real"}
    out = Path(out_dir)  # a fresh attempt directory (run_evaluate commits it)
    cms: dict[str, np.ndarray] = {}
    synth_inst = {src.name: SyntheticInstances(src, targets, watershed) for src in sources
                  if src.kind == "synthetic"}
    synth_inst = {n: si for n, si in synth_inst.items() if si.things}
    k = int(meta["num_classes"])
    ignore = int(meta["ignore_index"])
    n_workers = eval_workers(dev) if workers is None else int(workers)
    image_scales: dict[str, list[float]] = {}
    with progress(transient=not show_progress) as bar, memory_hint("evaluation", memory_settings(batch_size, tile)), \
            FramePipeline(n_workers) as pipe:
        task = bar.add_task("evaluate", total=sum(len(s.val) for s in sources))
        for src in sources:
            cm = np.zeros((k, k), np.int64)
            scorer = scorers.get(src.name)
            si = synth_inst.get(src.name)
            # Synthetic frames are never rescaled; plain synthetic sources (no thing classes) need no instances.
            scale_here = 1.0 if src.kind == "synthetic" else None
            with_inst = watershed and (si is not None or scorer is not None)

            def post(it: Item, img: np.ndarray, mask: np.ndarray, probs: torch.Tensor, f: float | None,
                     scorer: Any = scorer, si: Any = si, with_inst: bool = with_inst) -> tuple[np.ndarray, Any]:
                # Everything of a frame after the model: runs in a worker thread while the model does the next one.
                pred, inst, _ = outputs_from_probs(probs, meta, with_inst, f)
                frame_cm = confusion_matrix(pred, mask, k, ignore)
                if si is not None:
                    return frame_cm, si.score(it, mask, pred, inst)
                if scorer is not None:
                    return frame_cm, scorer.score(it, img, mask, pred, inst)
                return frame_cm, None

            def fold(result: tuple[np.ndarray, Any], cm: np.ndarray = cm, scorer: Any = scorer,
                     si: Any = si) -> None:
                frame_cm, frame = result
                cm += frame_cm  # in place: this source's matrix
                if si is not None:
                    si.fold(frame)
                elif scorer is not None:
                    scorer.fold(frame)
                bar.advance(task)

            for it in src.val:
                img, mask = src.load(it)
                f = scale_here if src.kind == "synthetic" else image_scale(model, meta, img, dev, tile, overlap,
                                                                           batch_size, amp_dtype(dev))
                if f is not None and src.kind != "synthetic":
                    image_scales.setdefault(src.name, []).append(f)
                probs = predict_image_probs(model, meta, img, dev, tile, overlap, batch_size, amp_dtype(dev),
                                            scale=f, tta=tta, instances=with_inst)
                pipe.submit(post, fold, it, img, mask, probs, f)
            pipe.drain()
            cms[src.name] = cm
    report = {"model": str(model_dir), "key": _evaluation_key(meta, Path(model_dir), data, tile, overlap, tta),
              "classes": targets.names, "tta": tta, "min_object": (meta.get("cleanup") or {}).get("min_object"),
              "tile": tile, "overlap": overlap, "batch_size": batch_size,
              "input": {**{k: meta["input"].get(k) for k in ("scaling", "scale")},
                        "scale_mode": "per_image" if per_image_scales(meta) else "fixed",
                        **({"scales": {n: {"median": round(float(np.median(v)), 4),
                                           "min": round(min(v), 4), "max": round(max(v), 4)}
                                       for n, v in image_scales.items()}} if image_scales else {})},
              "data": {s.name: {"kind": s.kind, "path": str(s.path), "images": len(s.val)} for s in sources},
              **summarize(cms, {s.name: s.kind for s in sources}, targets.names,
                          {s.name: s.remap.labeled(targets.ignore_index) for s in sources})}
    if synth_inst:
        report["instances"] = {name: si.result() for name, si in synth_inst.items()}
    if scorers:
        report["real"] = {name: sc.result() for name, sc in scorers.items()}
        for name, r in report["real"].items():
            for note in r["notes"]:
                console.print(f"[yellow]{name}: {note}[/]", soft_wrap=True)
        atomic_write_bytes(out / "real_scores.png", plot_real_scores(report["real"]))
    for name, cm in cms.items():
        atomic_write_bytes(out / f"confusion_{safe_name(name)}.png", plot_confusion(cm, targets.names, name))
    atomic_write_bytes(out / "confusion_overall.png",
                       plot_confusion(np.asarray(report["overall"]["confusion"]), targets.names, "overall"))
    atomic_write_json(out / "metrics.json", report)
    return report
