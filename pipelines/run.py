"""``segfactory run CONFIG``: ingest -> render -> pretrain -> fine-tune -> evaluate -> predict -> report.

Each stage's output lives in ``OUT/stages/<stage>-<key>/`` where the key hashes the stage's config section,
the keys/hashes of its inputs and the version of the code that produces it (:mod:`pipelines.stages`); a stage
whose directory holds ``stage.json`` is skipped, so a re-run only does what changed. Render and ingest are Dask
pipelines of their own; the training stages run as single Dask tasks that ask for a ``GPU`` resource when the
cluster offers one, and the training itself runs in its own process (``segfactory pretrain`` / ``finetune``
...) with a timeout; ``stage.json``, written last, marks a stage finished. Evaluation scores held-out rendered
scenes (``test``) and, when ``eval.real`` lists real labeled folders (or ``sample:NAME/eval``), those folders
too, next to classic baselines (stage ``evaluate_real``; see :mod:`finetune.realeval`).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from finetune.config import FinetuneConfig, TtaMode, check_adapt_config
from pipelines.cluster import ClusterConfig
from pipelines.ingest import SKIMAGE_DATA
from pipelines.lock import exclusive_lock
from pipelines.refresh import RealImages
from pipelines.render import RenderStep
from pipelines.stages import (
    FINETUNE_PACKAGES,
    PRETRAIN_PACKAGES,
    STAGE_FILE,
    HeldOutSet,
    check_class_weights,
    check_encoder_matches,
    check_pretrain_images,
    check_random_init_encoder,
    check_real_eval_classes,
    check_training_folders,
    held_out_seed,
    model_targets,
    render_test_set,
    run_stage_tasks,
    stage_dir,
    training_key,
)
from pretrain.config import PretrainConfig
from segfactory.config import StrictModel, UnsaidDefaults, save_resolved
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import atomic_write_json, ensure_writable_dir, read_json
from segfactory.tracking import TrackingConfig, with_tracking
from synth.shard import RENDER_PACKAGES

LOCK_FILE = ".run.lock"
PREDICT_MAX_SIDE = 512  # predict inputs are cut to at most this (a crop: resizing would change object sizes)


class TrainingExecution(StrictModel):
    timeout_s: float = Field(3600.0, gt=0, description="a training/evaluation process is killed after this long")
    retries: int = Field(1, ge=0, description="re-runs of a failed training/evaluation task")
    predict_images: int = Field(4, ge=0, description="real images the report overlays predictions on (0: no "
                                "predict stage)")


class RealEvalSettings(UnsaidDefaults):
    """``eval``: real labeled folders the model is scored on, next to classic baselines, and the test-time
    augmentation of every evaluation and prediction stage."""

    unsaid_defaults: ClassVar[dict[str, Any]] = {"tta": "none"}  # stage keys of configs without it stay as they were

    real: list[str] = Field(default_factory=list, description="real labeled folders (images/ + masks/) or "
                            "sample:NAME/eval (segfactory samples list); empty = synthetic held-out frames only")
    remap: dict[str, str] = Field(default_factory=dict, description="folder class -> model class (or ignore), "
                                  "for every folder that has the class, e.g. {cell: nucleus}")
    baselines: str = Field("all", description="classic baselines: comma-separated names, all or none")
    overlays: int = Field(4, ge=0, description="overlay PNGs per real folder in the report")
    tta: TtaMode = Field("none", description="test-time augmentation of the evaluate, evaluate_real and predict "
                         "stages (segfactory evaluate --tta): none, flip, d4, or ms / ms_flip (the whole image at "
                         "0.5-1.75x its input scale, ms_flip with its mirror image; 6-12 passes per image)")


class RunConfig(StrictModel):
    """``segfactory run`` config: one section per stage plus the cluster."""

    init: Literal["ssl", "random"] = Field("ssl", description="fine-tuning's encoder: the one pretrained on the real "
                                           "images (ssl), or random initialisation (the pretrain stage is skipped; "
                                           "finetune.model.encoder_dir, when set, is loaded instead)")
    render: RenderStep = Field(default_factory=RenderStep)
    test: HeldOutSet = Field(default_factory=HeldOutSet)
    eval: RealEvalSettings = Field(default_factory=RealEvalSettings)
    real: RealImages = Field(default_factory=lambda: RealImages(src=SKIMAGE_DATA))
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    execution: TrainingExecution = Field(default_factory=TrainingExecution)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard/MLflow logging of "
                                     "the training stages that set none of their own (never part of a stage key)")


def run_all(cfg: RunConfig, out: str | os.PathLike) -> dict[str, Any]:
    """Run every stage, skipping those whose cached output matches; returns a summary with the stage dirs.

    Raises:
        UserError: bad config or input, a stage failed (naming its log), or another run into ``out`` is running
            (exit code EXIT_BUSY).
    """
    out = ensure_writable_dir(Path(out).resolve())
    # Held for the whole run: a second run into `out` would remove this one's unfinished stage dirs as leftovers.
    with exclusive_lock(out / LOCK_FILE, f"another run into '{out}'",
                        fix="wait for it to finish (a re-run then skips every finished stage), or use another --out"):
        return _run_locked(cfg, out)


def check_run_config(cfg: RunConfig) -> dict[str, Path]:
    """Stop before any work on what a stage of the run would refuse (each check names the field and the fix).

    Returns:
        The ``eval.real`` folders (:func:`_real_eval_folders`; ``sample:`` references materialized).

    Raises:
        UserError: bad ``eval.real`` folders, classes or baselines; a missing or empty ``real.src``; a fine-tune
            section the fine-tune stage would refuse at its start (encoder, adaptation, labeled folders and their
            classes, class weights); ``test.seed`` equal to the training seed (the list: docs/pipelines.md).
    """
    from pipelines.ingest import check_sources
    from pipelines.render import rendered_classes, resolve_render_config

    real_eval = _real_eval_folders(cfg.eval)
    if not cfg.real.sources():
        raise UserError("run: real.src is empty; pretraining needs unlabeled real images",
                        fix=f"set real.src=DIR (or real.src={SKIMAGE_DATA} for scikit-image's sample photos)")
    check_sources(cfg.real.sources())  # a missing folder stops here, not after rendering
    if cfg.init == "ssl":
        check_encoder_matches(cfg.pretrain, cfg.finetune, "",
                              " (or init=random: fine-tuning from random init, no pretrain stage)")
    else:
        check_random_init_encoder(cfg.finetune, "finetune.")
    # what the fine-tune stage would refuse at its start, refused before rendering and pretraining: its config as
    # the stage gets it (the run's real images as its unlabeled data, unless the section names its own)
    staged = cfg.finetune.data if cfg.finetune.data.unlabeled else cfg.finetune.data.model_copy(
        update={"unlabeled": [Path("<the run's real images>")]})
    check_adapt_config(cfg.finetune.model_copy(update={"data": staged}), "finetune.")
    render_cfg = resolve_render_config(cfg.render)[0]
    if cfg.test.scenes:
        held_out_seed(render_cfg.dataset.seed, cfg.test)
    # the scene family's classes are the rendered dataset's: what depends on them is checked before rendering
    targets = model_targets(cfg.finetune, rendered_classes(render_cfg))
    check_training_folders(cfg.finetune, "finetune.", targets)
    check_class_weights(cfg.finetune, targets, "finetune.")
    check_real_eval_classes(list(real_eval.values()), targets, cfg.eval.remap, "eval.remap.")
    return real_eval


def _run_locked(cfg: RunConfig, out: Path) -> dict[str, Any]:
    from pipelines.ingest import IngestJob, ingest_sources
    from pipelines.render import resolve_render_config, run_render
    from pipelines.report import write_report

    t0 = time.perf_counter()
    (out / "stages").mkdir(exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    done: dict[str, str] = {}

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - t_stage, 2)
        console.rule(f"[bold]{name}[/] {done.get(name, '')} ({timings[name]:.1f}s)")

    reports = out / "reports"
    run_id = time.strftime("%Y%m%dT%H%M%S")
    real_eval = check_run_config(cfg)  # what a stage would refuse stops here, before any work

    # ingest first (seconds, where rendering takes minutes): what the real images make a later stage refuse stops
    # the run before anything is rendered. Incremental by itself (only new files); its data hash keys pretraining.
    # One directory per source and normalization, so a changed source or normalization starts a new image set
    # instead of mixing into the old.
    t_stage = time.perf_counter()
    ingest_cfg = IngestJob.of(cfg.real.config, cfg.cluster)
    images = ingest_stage_dir(out, cfg.real)
    ing = ingest_sources(cfg.real.sources(), images, ingest_cfg)
    sources = ing["sources"]
    done["ingest"] = f"{ing['new_images']} new image(s), {ing['total_images']} total"
    stage("ingest")
    if cfg.init == "ssl":
        check_pretrain_images(images, cfg.pretrain, "pretrain.")

    # render: the dataset directory is resumable by itself (content-addressed shards).
    t_stage = time.perf_counter()
    render_cfg, render_hash = resolve_render_config(cfg.render)
    size = render_cfg.dataset.model_dump(mode="json")
    dataset = stage_dir(out, "render", {"config": render_hash, "dataset": size}, RENDER_PACKAGES)
    if (dataset / STAGE_FILE).is_file():
        done["render"] = "cached"
    else:
        s = run_render(render_cfg, dataset, cfg.cluster, performance_report=reports / f"{run_id}-dask-render.html")
        atomic_write_json(dataset / STAGE_FILE, {"summary": s, "config_hash": render_hash})
        done["render"] = f"{s['shards_rendered']} shard(s) rendered"
    # Evaluation scores scenes fine-tuning never saw: the same look, another seed.
    test_set = render_test_set(render_cfg, render_hash, cfg.test, out, cfg.cluster,
                               reports / f"{run_id}-dask-render-test.html")
    if test_set is None:
        console.print("[yellow]test.scenes=0: evaluating on the training dataset (scores are optimistic)[/]")
    stage("render")

    eval_data = test_set or dataset
    pre_dir = stage_dir(out, "pretrain", {"config": training_key(cfg.pretrain), "data": ing["data_hash"]},
                        PRETRAIN_PACKAGES)
    # The run's real images are also the fine-tune's unlabeled data (domain adaptation; a no-op with adapt off),
    # unless the config names its own.
    own_unlabeled = bool(cfg.finetune.data.unlabeled)
    pretrained = cfg.init == "ssl"
    ft_dir = stage_dir(out, "finetune", {"config": training_key(cfg.finetune), "render": dataset.name,
                                          "pretrain": pre_dir.name if pretrained else None,
                                          "unlabeled": None if own_unlabeled else ing["data_hash"]}, FINETUNE_PACKAGES)
    tta = cfg.eval.tta
    tta_key = {"tta": tta} if tta != "none" else {}  # keys of runs without TTA stay what they were
    tta_args = ["--tta", tta] if tta != "none" else []
    eval_dir = stage_dir(out, "evaluate", {"model": ft_dir.name, "data": eval_data.name, **tta_key},
                         FINETUNE_PACKAGES)
    real_dir = stage_dir(out, "evaluate_real", {"model": ft_dir.name, "data": [str(p) for p in real_eval.values()],
                                                "settings": cfg.eval.model_dump(mode="json", exclude={"real"})},
                         FINETUNE_PACKAGES) if real_eval else None
    pred_dir = stage_dir(out, "predict", {"model": ft_dir.name, "data": ing["data_hash"],
                                           "n": cfg.execution.predict_images, **tta_key}, FINETUNE_PACKAGES)
    cfg_dir = out / "stages" / "configs"
    cfg_dir.mkdir(exist_ok=True)
    save_resolved(with_tracking(cfg.pretrain, cfg.tracking, pre_dir.name), cfg_dir / f"{pre_dir.name}.yaml")
    save_resolved(with_tracking(cfg.finetune, cfg.tracking, ft_dir.name), cfg_dir / f"{ft_dir.name}.yaml")
    # No predict stage without an image to predict (an empty input folder would fail it after all the training);
    # the report says why there are no predictions.
    no_predictions = "execution.predict_images=0" if not cfg.execution.predict_images else ""
    if not no_predictions:
        pred_in = _predict_inputs(sources, out / "stages" / f"{pred_dir.name}-input", cfg.execution.predict_images)
        if not any(pred_in.iterdir()):
            no_predictions = "no real image of at least 64 x 64 pixels in real.src"
    commands = {
        **({"pretrain": (pre_dir, ["pretrain", str(cfg_dir / f"{pre_dir.name}.yaml"),
                                   "--images", str(images), "--out", "{OUT}"])} if pretrained else {}),
        "finetune": (ft_dir, ["finetune", str(cfg_dir / f"{ft_dir.name}.yaml"), "--synthetic", str(dataset),
                              *(["--encoder", str(pre_dir / "encoder")] if pretrained else []),
                              *([] if own_unlabeled else ["--unlabeled", str(images)]), "--out", "{OUT}"]),
        "evaluate": (eval_dir, ["evaluate", "--model", str(ft_dir / "model"), "--data", str(eval_data),
                                *tta_args, "--out", "{OUT}"]),
    }
    if not no_predictions:
        commands["predict"] = (pred_dir, ["predict", "--model", str(ft_dir / "model"), "--input", str(pred_in),
                                          *tta_args, "--out", "{OUT}"])
    if real_dir is not None:
        commands["evaluate_real"] = (real_dir, [
            "evaluate", "--model", str(ft_dir / "model"), *[a for arg in real_eval for a in ("--data", arg)],
            *[a for k, v in cfg.eval.remap.items() for a in ("--remap", f"{k}={v}")],
            "--baselines", cfg.eval.baselines, "--overlays", str(cfg.eval.overlays), *tta_args, "--out", "{OUT}"])
    t_stage = time.perf_counter()

    def on_done(name: str, r: dict[str, Any]) -> None:
        nonlocal t_stage
        done[name] = "cached" if r["skipped"] else f"done in {r['seconds']:.0f}s"
        stage(name)
        t_stage = time.perf_counter()

    run_stage_tasks(cfg.cluster, cfg.execution.timeout_s, cfg.execution.retries, commands,
                    reports / f"{run_id}-dask-training.html", on_done)
    scored_on = (f"{read_json(test_set / 'dataset.json')['num_frames']} held-out rendered frames (scenes not used in "
                 "fine-tuning)" if test_set else "the training dataset (test.scenes=0)")
    report = write_report(out / "report.html", dataset, pre_dir if pretrained else None, ft_dir, eval_dir,
                          None if no_predictions else pred_dir, scored_on, real_eval=real_dir,
                          no_predictions=no_predictions)
    stage("report")
    summary = {"out": str(out), "report": str(report), "stages": done, "seconds": timings,
               "miou": read_json(eval_dir / "metrics.json")["overall"]["miou"], "miou_on": scored_on,
               "total_s": round(time.perf_counter() - t0, 2), "tta": tta,
               "dirs": {"finetune": str(ft_dir), **({"pretrain": str(pre_dir)} if pretrained else {})}}
    if real_dir is not None:
        summary["real"] = {name: {row: {"fg_iou": r["fg_iou"], "f1": next(iter(r["instances"].values()), {}).get("f1")}
                                  for row, r in s["rows"].items()}
                           for name, s in read_json(real_dir / "metrics.json")["real"].items()}
    atomic_write_json(out / "run.json", summary)
    console.print(f"run finished in {summary['total_s']:.0f}s; report: {report}")
    return summary


def ingest_stage_dir(out: Path, real: RealImages) -> Path:
    """The ingest stage's directory: keyed by the sources and what decides the stored images
    (:meth:`pretrain.config.IngestConfig.output_key`), never by the code version (the image set grows in place)."""
    return stage_dir(out, "ingest", {"src": real.sources(), "config": real.config.output_key()}, ())


def _real_eval_folders(settings: RealEvalSettings) -> dict[str, Path]:
    """``eval.real`` as ``{evaluate --data argument: folder}``, each checked to be a real labeled folder.

    ``sample:NAME/eval`` references are materialized here (so errors come before any work) and passed on as
    references, which name the set in the report; other entries become absolute paths.

    Raises:
        UserError: a missing folder, a rendered dataset, an unknown sample set, or an unknown baseline.
    """
    from finetune.baselines import parse_baselines
    from finetune.data.sources import check_kind
    from segfactory.sampledata import is_sample_ref, resolve_path

    parse_baselines(settings.baselines, "eval.baselines")
    folders: dict[str, Path] = {}
    for i, entry in enumerate(settings.real):
        path = resolve_path(entry).resolve()
        check_kind(path, "real", f"eval.real[{i}]")
        folders[entry if is_sample_ref(entry) else str(path)] = path
    return folders


def _predict_inputs(sources: list[str], folder: Path, n: int) -> Path:
    """Up to ``n`` images of the real sources (spread over them), copied so prediction sees plain image files.

    Gray and 16-bit images are kept as they are (microscopy); an image larger than ``PREDICT_MAX_SIDE`` is cut to
    its centre (never resized: the model must see objects at their real size).
    """
    from segfactory.formats.imagefile import IMAGE_SUFFIXES, read_image, write_image

    if folder.is_dir() and any(folder.iterdir()):
        return folder
    tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    per_source = [sorted(p for p in Path(src).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(src).parts))
                  if Path(src).is_dir() else [] for src in sources]
    picked = 0
    for i in range(max((len(f) for f in per_source), default=0)):
        for files in per_source:
            if picked >= n or i >= len(files):
                continue
            try:
                img = read_image(files[i])
            except UserError:
                continue
            h, w = img.shape[:2]
            if min(h, w) < 64:
                continue
            y, x = max(0, (h - PREDICT_MAX_SIDE) // 2), max(0, (w - PREDICT_MAX_SIDE) // 2)
            write_image(tmp / f"{picked:02d}-{files[i].stem}.png", img[y:y + PREDICT_MAX_SIDE, x:x + PREDICT_MAX_SIDE])
            picked += 1
    os.replace(tmp, folder)
    return folder
