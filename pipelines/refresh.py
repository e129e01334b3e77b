"""``segfactory refresh``: scheduled, incremental dataset refresh with immutable releases.

Layout under the refresh root::

    ROOT/datasets/<render config hash>/   rendered datasets (one per look of the frames; shards content-addressed)
    ROOT/real/                            ingested real images (optional; only new files are ingested)
    ROOT/stages/<stage>-<key>/            pretrain/finetune/evaluate outputs when ``train.enabled`` (content-keyed)
    ROOT/releases/<seq>-<timestamp>.json  immutable release manifests (sequence number, shard ids, checksums,
                                          hashes, drift, model and promotion decision)
    ROOT/releases/latest                  symlink to the newest release, replaced atomically
    ROOT/last_refresh.json                what the last finished refresh did (published a release, or found
                                          nothing changed), when, and how long it took: for monitoring
    ROOT/.refresh.lock                    held (flock) while a refresh runs

A refresh renders only shards that are missing (ids hash the config, seed range and code version), ingests
only new raw images, re-hashes every shard of the release against its manifest (a corrupt one is moved aside and
rendered again), retrains (``train.enabled``) only when the release's inputs changed (or always), decides whether
the new model is promoted (``train.promotion``), publishes a release, then prunes releases beyond the last
``releases.keep`` together with the shards and models no kept release references. A refresh that finds
nothing changed against the latest release (the same shards, real images and model) publishes no release
(``releases.publish_unchanged`` to publish one anyway), so quiet nights never push meaningful releases out of
``releases.keep``; ``last_refresh.json`` records every finished refresh either way.

Growth (``growth``): each refresh adds ``scenes_per_run`` fresh scene indices (fresh seeds) to the previous
release's, up to ``max_scenes``; or, with ``window``, without end while the release's dataset holds only the
newest ``window`` scene indices (whole shards): the older shards are retired from the release (no longer listed in
``dataset.json``) and deleted by the prune once no kept release references them.

Releases are ordered by their ``sequence`` number (one more than the highest so far), never by wall-clock time:
after a clock step back, the new release is still the newest. The release just published is never pruned.
Pruning rewrites a dataset's ``dataset.json`` before any of its shards goes, and removes units by renaming them
to trash first (:func:`segfactory.io.discard_unit`), so a kill mid-prune never leaves a half-deleted shard that
looks committed; the next refresh empties the trash.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

import segfactory
from finetune.config import FinetuneConfig, check_adapt_config
from pipelines.cluster import ClusterConfig, check_cluster
from pipelines.lock import exclusive_lock
from pipelines.render import RenderStep
from pipelines.stages import HeldOutSet
from pretrain.config import IngestConfig, PretrainConfig
from segfactory.config import StrictModel, save_resolved
from segfactory.console import console
from segfactory.errors import PartialFailure, UserError
from segfactory.io import (
    atomic_write_json,
    canonical_hash,
    empty_trash,
    move_aside,
    move_to_trash,
    read_json,
    remove_tree,
    sha256_file,
)
from segfactory.tracking import TrackingConfig, with_tracking

if TYPE_CHECKING:
    from finetune.data.remap import TargetClasses

LOCK_FILE = ".refresh.lock"
RELEASES_DIR = "releases"
LATEST = "latest"
LAST_REFRESH = "last_refresh.json"
INSTANCE_BINS = [0, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 2**62]  # instance area in pixels
RELEASE_FORMAT_VERSION = 2  # 2: sequence numbers, promotion decisions
FAULT_ENV = "SEGFACTORY_FAULT"


class ReleaseSettings(StrictModel):
    keep: int = Field(5, ge=1, description="releases kept; older ones (and shards only they used) are pruned")
    publish_unchanged: bool = Field(
        False, description="publish a release also when nothing changed against the latest one (the same shards, "
        "real images and model); false: such a refresh only records itself in ROOT/last_refresh.json, so "
        "`keep` counts changes, not runs")


class RealImages(StrictModel):
    """``real``: the unlabeled real images, ingested incrementally (for pretraining and domain adaptation)."""

    src: str | list[str] | None = Field(
        None, description="raw image folder/glob/list file, sample:NAME/unlabeled or skimage:data, or a list of "
        "them ingested into one image set (None = no real data)")
    config: IngestConfig = Field(default_factory=IngestConfig)

    def sources(self) -> list[str]:
        """``src`` as a list (empty without real data)."""
        return [] if not self.src else [self.src] if isinstance(self.src, str) else list(self.src)


class PromotionSettings(StrictModel):
    """``train.promotion``: when a retrained model replaces the previous release's model."""

    max_drop: float = Field(0.02, ge=0, description="largest drop of the held-out mIoU (absolute, 0..1) against "
                            "the promoted model of the previous release that still promotes the new model; the "
                            "same margin applies to the real_eval mIoU")
    real_eval: str | None = Field(
        None, description="a labeled real folder (images/, masks/, classes.json) or sample:NAME/SPLIT: the retrained "
        "model and the previous release's promoted model are both evaluated on it, and the retrained model is not "
        "promoted when its mIoU there is more than max_drop below the other's (None: the held-out mIoU only)")
    remap: dict[str, str] = Field(default_factory=dict, description="real_eval folder class -> model class (or "
                                  "ignore), e.g. {background: road} for a street model")


class RetrainSettings(StrictModel):
    """``train``: pretrain on the real images, fine-tune on the release's dataset, evaluate it."""

    enabled: bool = Field(False, description="retrain as part of the refresh (needs real.src)")
    when: Literal["changed", "always"] = Field(
        "changed", description="changed: only when shards, real images or these configs changed; always: every run")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    test: HeldOutSet = Field(default_factory=HeldOutSet)
    timeout_s: float = Field(3600.0, gt=0, description="a training/evaluation process is killed after this long")
    retries: int = Field(1, ge=0, description="re-runs of a failed training/evaluation task")
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)


class GrowthSettings(StrictModel):
    """``growth``: how a scheduled refresh with an unchanged config still adds data."""

    scenes_per_run: int = Field(0, ge=0, description="new scenes each refresh adds (fresh scene indices, so fresh "
                                "seeds SeedSequence([seed, i])) on top of the previous release's; 0 = the dataset "
                                "only grows when render.dataset.scenes does")
    max_scenes: int | None = Field(None, ge=1, description="cap on the dataset's scene indices (None = no cap): "
                                   "once reached, refreshes add nothing (not with window)")
    window: int | None = Field(
        None, ge=1, description="rolling window: the release's dataset holds only the newest `window` scene indices "
        "and growth never stops; older shards are retired (whole shards: one partly inside the window stays until "
        "all its scenes are out, so a release holds up to window + scenes_per_shard - 1 scenes) and pruned once no "
        "kept release references them. None = keep every scene (not with max_scenes)")

    @field_validator("window")
    @classmethod
    def _window_fits(cls, window: int | None, info: ValidationInfo) -> int | None:
        if window is None:
            return None
        cap, per_run = info.data.get("max_scenes"), info.data.get("scenes_per_run", 0)
        if cap is not None:
            raise PydanticCustomError(
                "growth_conflict", "growth.max_scenes={cap} is set too: a window keeps the newest {window} scenes "
                "and never stops adding, a cap stops adding at {cap} scenes",
                {"cap": cap, "window": window, "fix": "set one of them: growth.max_scenes=null (rolling window) or "
                 "growth.window=null (grow up to the cap, then stop)"})
        if window < per_run:
            raise PydanticCustomError(
                "growth_conflict", "it is below growth.scenes_per_run={per_run}: scenes each run renders would "
                "never be in a release", {"per_run": per_run, "fix": f"set growth.window to at least {per_run}, or "
                                          "lower growth.scenes_per_run"})
        return window


class RefreshConfig(StrictModel):
    """``segfactory refresh`` config: what to render, what to ingest, whether to retrain, releases to keep."""

    render: RenderStep = Field(default_factory=RenderStep)
    growth: GrowthSettings = Field(default_factory=GrowthSettings)
    real: RealImages = Field(default_factory=RealImages)
    train: RetrainSettings = Field(default_factory=RetrainSettings)
    releases: ReleaseSettings = Field(default_factory=ReleaseSettings)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard/MLflow logging of "
                                     "the training stages that set none of their own (never part of a stage key)")

    @field_validator("growth")
    @classmethod
    def _window_holds_first_release(cls, growth: GrowthSettings, info: ValidationInfo) -> GrowthSettings:
        render = info.data.get("render")
        if growth.window is not None and render is not None and growth.window < render.dataset.scenes:
            raise PydanticCustomError(
                "growth_conflict", "growth.window={window} is below render.dataset.scenes={scenes}: no release "
                "could hold the configured scenes",
                {"window": growth.window, "scenes": render.dataset.scenes,
                 "fix": f"set growth.window to at least {render.dataset.scenes}, or lower render.dataset.scenes"})
        return growth


@contextlib.contextmanager
def refresh_lock(root: Path) -> Iterator[None]:
    """Hold ``ROOT/.refresh.lock``; a second refresh gets a UserError with exit code EXIT_BUSY."""
    with exclusive_lock(root / LOCK_FILE, f"another refresh of '{root}'",
                        fix="wait for it to finish (schedules should not overlap: this run is skipped)"):
        yield


def _release_order(path: Path) -> tuple[int, str]:
    """Sort key of a release: its sequence number (releases from before sequence numbers: -1, then by name)."""
    try:
        seq = read_json(path).get("sequence")
    except (OSError, ValueError):
        seq = None
    return (int(seq) if isinstance(seq, int) else -1, path.name)


def list_releases(root: Path) -> list[Path]:
    """Release manifests, oldest first, by sequence number (never by their wall-clock names)."""
    d = root / RELEASES_DIR
    if not d.is_dir():
        return []
    return sorted((p for p in d.glob("*.json") if not p.name.startswith(".")), key=_release_order)


def latest_release(root: Path) -> dict[str, Any] | None:
    link = root / RELEASES_DIR / LATEST
    if link.exists():
        return read_json(link)
    releases = list_releases(root)
    return read_json(releases[-1]) if releases else None


def _point_latest(root: Path, release: Path) -> None:
    """Replace the ``latest`` symlink atomically (rename of a fresh symlink over it)."""
    tmp = root / RELEASES_DIR / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(release.name, tmp)
    os.replace(tmp, root / RELEASES_DIR / LATEST)


def _next_sequence(root: Path) -> int:
    """One more than the highest sequence number of any release (1 for the first; releases from before sequence
    numbers sort before every numbered one)."""
    return max([_release_order(p)[0] for p in list_releases(root)] + [0]) + 1


def _release_name(sequence: int) -> str:
    """``<sequence, 6 digits>-<UTC time>``: the sequence orders releases; the time is for people."""
    return f"{sequence:06d}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}"


def release_stats(dataset: Path, shard_ids: list[str], num_classes: int) -> dict[str, Any]:
    """Class pixel shares and the instance-area histogram over the given shards (from labels and COCO)."""
    from segfactory.formats.imagefile import read_image

    pixels = np.zeros(256, dtype=np.int64)
    hist = np.zeros(len(INSTANCE_BINS) - 1, dtype=np.int64)
    for sid in shard_ids:
        d = dataset / "shards" / sid
        manifest = read_json(d / "manifest.json")
        for fr in manifest["frames"]:
            pixels += np.bincount(read_image(d / fr["files"]["semantic"]["path"]).ravel(), minlength=256)[:256]
        areas = [a["area"] for a in read_json(d / "coco.json")["annotations"]]
        hist += np.histogram(areas, bins=INSTANCE_BINS)[0]
    total = max(1, int(pixels.sum()))
    return {"class_pixel_share": [float(pixels[c]) / total for c in range(num_classes)],
            "ignore_share": float(pixels[255]) / total,
            "instance_area_bins": INSTANCE_BINS[:-1], "instance_area_hist": hist.tolist(),
            "instances": int(hist.sum())}


def drift(prev: dict[str, Any] | None, now: dict[str, Any], classes: list[dict[str, Any]]) -> dict[str, Any]:
    """Compare a release's stats with the previous release's: per-class share change and histogram distance."""
    if prev is None:
        return {"previous": None}
    a, b = prev["stats"], now
    shares = []
    for c in classes:
        i = c["id"]
        old = a["class_pixel_share"][i] if i < len(a["class_pixel_share"]) else 0.0
        new = b["class_pixel_share"][i] if i < len(b["class_pixel_share"]) else 0.0
        shares.append({"id": i, "name": c["name"], "previous": old, "now": new, "change": new - old})
    ha = np.asarray(a["instance_area_hist"], dtype=float)
    hb = np.asarray(b["instance_area_hist"], dtype=float)
    tv = 0.5 * float(np.abs(ha / max(ha.sum(), 1) - hb / max(hb.sum(), 1)).sum()) if len(ha) == len(hb) else None
    return {"previous": prev["release"], "class_shares": shares,
            "max_share_change": max((abs(s["change"]) for s in shares), default=0.0),
            "instance_hist_total_variation": tv}


def run_refresh(cfg: RefreshConfig, root: str | os.PathLike, performance_report: str | None = None) -> dict[str, Any]:
    """One refresh: render missing shards, ingest new images, verify, retrain, publish a release, prune old ones.

    Returns:
        The release manifest that was published, with ``published: True``. When nothing changed against the
        latest release (and ``releases.publish_unchanged`` is off): what this run checked (its render and ingest
        records, nothing new) under the latest release's name, sequence and creation time, ``published: False``.

    Raises:
        UserError: bad config, or another refresh holds the lock (exit code EXIT_BUSY).
        PartialFailure: some shards/images failed (or stayed corrupt); no release is published, a re-run continues.
    """
    from pipelines.render import rendered_classes, resolve_render_config
    from pipelines.stages import (
        check_class_weights,
        check_encoder_matches,
        check_pretrain_images,
        check_training_folders,
        held_out_seed,
        model_targets,
    )
    from synth.shard import render_code_version

    if cfg.train.enabled:  # before the lock and any rendering: what a training or evaluation stage would refuse
        check_encoder_matches(cfg.train.pretrain, cfg.train.finetune, "train.")
        check_adapt_config(cfg.train.finetune, "train.finetune.")
        render_cfg = resolve_render_config(cfg.render)[0]
        targets = model_targets(cfg.train.finetune, rendered_classes(render_cfg))
        check_training_folders(cfg.train.finetune, "train.finetune.", targets)
        check_class_weights(cfg.train.finetune, targets, "train.finetune.")
        if cfg.train.test.scenes:
            held_out_seed(render_cfg.dataset.seed, cfg.train.test, "train.")
        if not cfg.real.sources():
            raise UserError("refresh: train.enabled=true needs unlabeled real images to pretrain on, but real.src "
                            "is empty", fix="set real.src=DIR (a folder, glob, list file or sample:NAME/unlabeled), "
                            "or train.enabled=false")
        if cfg.train.promotion.real_eval is not None:
            check_promotion_real_eval(cfg.train.promotion, targets)
    root = Path(root).resolve()
    if cfg.real.sources():
        from pipelines.ingest import check_sources

        check_sources(cfg.real.sources())  # a missing source fails now, not after rendering
    check_cluster(cfg.cluster)  # a bad --cluster-address fails now, also when nothing is new
    with refresh_lock(root):
        t0 = time.perf_counter()
        render_cfg, config_hash = resolve_render_config(cfg.render)
        prev = latest_release(root)
        scenes_before, scenes = grown_scenes(cfg, render_cfg, config_hash, prev)
        first_scene = window_start(cfg.growth, scenes)
        per_shard = render_cfg.dataset.scenes_per_shard
        if cfg.growth.scenes_per_run % per_shard and scenes > scenes_before:
            console.print(f"[yellow]growth.scenes_per_run={cfg.growth.scenes_per_run} is not a multiple of "
                          f"render.dataset.scenes_per_shard={per_shard}:[/] a partial last shard is rendered again "
                          "whole (a new shard id) once later runs fill it", soft_wrap=True)
        render_cfg = render_cfg.model_copy(update={"dataset": render_cfg.dataset.model_copy(update={"scenes": scenes})})
        dataset = root / "datasets" / config_hash
        sequence = _next_sequence(root)
        name = _release_name(sequence)
        report = performance_report or str(root / ".logs" / f"dask-report-{name}.html")
        # the real images first: a source whose every file is rejected fails before anything is rendered
        real = _ingest_verified(cfg, root) if cfg.real.sources() else None
        if cfg.train.enabled and real is not None:  # images the pretrain stage could not crop: before rendering
            check_pretrain_images(root / "real", cfg.train.pretrain, "train.pretrain.")
        summary, shards = _render_verified(cfg, render_cfg, dataset, report, first_scene)
        growth = growth_record(cfg.growth, prev, config_hash, render_cfg.dataset.seed, scenes_before, shards)
        growth["render_code_changed"] = prev is not None and prev["render"].get("code_version") not in (
            None, render_code_version())
        meta = read_json(dataset / "dataset.json")
        stats = release_stats(dataset, [s["id"] for s in shards], len(meta["classes"]))
        release = {
            "format": "segfactory-release", "format_version": RELEASE_FORMAT_VERSION, "release": name,
            "sequence": sequence,
            "created": datetime.now(UTC).isoformat(timespec="seconds"), "code_version": segfactory.code_version(),
            "render": {"dataset": f"datasets/{config_hash}", "config_hash": config_hash,
                       "code_version": render_code_version(),
                       "seed": render_cfg.dataset.seed, "scenes": render_cfg.dataset.scenes,
                       "first_scene": growth["scene_range"][0],
                       "shards_rendered": summary["shards_rendered"], "shards_repaired": summary["shards_repaired"]},
            "growth": growth,
            "shards": shards, "num_frames": sum(s["frames"] for s in shards), "real": real,
            "inputs_changed": prev is None or [s["id"] for s in prev["shards"]] != [s["id"] for s in shards]
                              or (prev.get("real") or {}).get("data_hash") != (real or {}).get("data_hash"),
            "stats": stats, "drift": drift(prev, stats, meta["classes"]),
        }
        if prev is not None:  # what changed, counted next to the class-share drift
            release["drift"] |= {k: len(growth[k]) for k in ("shards_added", "shards_retired")} | {
                k: growth[k] for k in ("scenes_added", "scenes_retired")}
        if cfg.train.enabled:
            model = retrain(cfg, root, render_cfg, config_hash, shards, real, name)
            if cfg.train.promotion.real_eval is not None:
                model = score_real_eval(cfg, root, model, previous_promoted(prev), name)
            release["model"], release["promoted_model"] = promote(root, model, prev, cfg.train.promotion, name)
        if prev is not None and not cfg.releases.publish_unchanged and same_content(prev, release):
            latest = root / RELEASES_DIR / f"{prev['release']}.json"
            pruned = prune(root, cfg.releases.keep, protect=latest)
            seconds = time.perf_counter() - t0
            unchanged_summary(prev, release, pruned, seconds)
            record_last_refresh(root, release, prev["release"], published=False, seconds=seconds)
            # what this run checked (rendered, repaired, ingested: nothing new), under the latest release's name
            return {**release, "release": prev["release"], "sequence": prev.get("sequence"),
                    "created": prev.get("created"), "published": False}
        path = root / RELEASES_DIR / f"{name}.json"
        save_resolved(cfg, root / RELEASES_DIR / f".{name}.config.yaml")
        atomic_write_json(path, release)
        path.chmod(0o444)  # a published release is immutable
        _point_latest(root, path)
        pruned = prune(root, cfg.releases.keep, protect=path)
        seconds = time.perf_counter() - t0
        release_summary(release, pruned, seconds)
        record_last_refresh(root, release, name, published=True, seconds=seconds)
        return {**release, "published": True}


def _model_dir_of(record: dict[str, Any] | None) -> str | None:
    return None if not record else record.get("model")


def same_content(prev: dict[str, Any], release: dict[str, Any]) -> bool:
    """Whether a new ``release`` would hold exactly what ``prev`` holds: the same shards (ids and manifest
    checksums), the same real images (data hash), render config and model (the fine-tune stage of ``model`` and of
    ``promoted_model``: a retrained or newly promoted model is a change, an unchanged training config reuses the
    previous release's stages and is not)."""
    def shards(r: dict[str, Any]) -> list[tuple[str, str | None]]:
        return [(s["id"], s.get("manifest_sha256")) for s in r["shards"]]

    return (shards(prev) == shards(release)
            and (prev.get("real") or {}).get("data_hash") == (release.get("real") or {}).get("data_hash")
            and prev["render"].get("config_hash") == release["render"]["config_hash"]
            and _model_dir_of(prev.get("model")) == _model_dir_of(release.get("model"))
            and _model_dir_of(prev.get("promoted_model")) == _model_dir_of(release.get("promoted_model")))


RUN_KEYS = ("render", "real", "growth", "inputs_changed", "shards", "num_frames", "model")
"""The parts of a release record that say what one refresh did and checked (``last_refresh.json``'s ``run``)."""


def record_last_refresh(root: Path, release: dict[str, Any], latest: str, *, published: bool,
                        seconds: float) -> None:
    """Write ``ROOT/last_refresh.json``: when the last refresh finished, whether it published a release or found
    nothing changed, the release that is latest now, how long it took (for a schedule's monitoring) and what the
    run did (``run``: what it rendered, repaired and ingested, its shards; :data:`RUN_KEYS` of ``release``)."""
    atomic_write_json(root / LAST_REFRESH, {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"), "published": published,
        "latest_release": latest, "seconds": round(seconds, 1), "code_version": segfactory.code_version(),
        "run": {k: release[k] for k in RUN_KEYS if k in release}})  # no model without train.enabled


def grown_scenes(cfg: RefreshConfig, render_cfg: RenderStep, config_hash: str,
                 prev: dict[str, Any] | None) -> tuple[int, int]:
    """The scene indices of this refresh's dataset under ``growth``: ``scenes_per_run`` more than the previous
    release's (when it rendered the same look and seed), at least ``render.dataset.scenes``, at most
    ``growth.max_scenes``. With ``growth.window`` (never together with ``max_scenes``) the count keeps growing and
    the release holds only its newest ``window`` (:func:`window_start`).

    Returns:
        ``(scene index stop of the previous release of this dataset (0 if none), scene index stop now)``: scenes
        ``0..stop-1`` have been drawn, each with its own seed ``SeedSequence([seed, i])``.
    """
    d = render_cfg.dataset
    before = 0
    if prev is not None and prev["render"].get("config_hash") == config_hash and prev["render"].get("seed") == d.seed:
        before = int(prev["render"]["scenes"])
    scenes = max(d.scenes, before + cfg.growth.scenes_per_run) if before else d.scenes
    if cfg.growth.max_scenes is not None:
        scenes = min(scenes, max(cfg.growth.max_scenes, 1))
    return before, scenes


def window_start(growth: GrowthSettings, scenes: int) -> int:
    """The first scene index of the rolling window over scenes ``0..scenes-1`` (0 without ``growth.window``).

    The release holds the shards with a scene at or above it (whole shards: see
    :func:`pipelines.render.dataset_plan`).
    """
    return 0 if growth.window is None else max(0, scenes - growth.window)


def _range_minus(a: list[int], b: list[int] | None) -> list[list[int]]:
    """Scene ranges ``[start, stop)`` of ``a`` outside ``b`` (at most two; empty ranges dropped)."""
    if b is None:
        return [a] if a[1] > a[0] else []
    parts = [[a[0], min(a[1], b[0])], [max(a[0], b[1]), a[1]]]
    return [r for r in parts if r[1] > r[0]]


def _held_range(release: dict[str, Any]) -> list[int] | None:
    """The scene indices ``[start, stop)`` a release's shards hold (releases from before windows: from 0)."""
    held = (release.get("growth") or {}).get("scene_range")
    if held is not None:
        return [int(held[0]), int(held[1])]
    scenes = release.get("render", {}).get("scenes")
    return None if scenes is None else [0, int(scenes)]


def growth_record(growth: GrowthSettings, prev: dict[str, Any] | None, config_hash: str, seed: int,
                  scenes_before: int, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The release's ``growth`` block: what it holds and what it adds and retires against the previous release.

    Args:
        growth: ``growth`` settings.
        prev: The previous release, or None.
        config_hash, seed: This release's render config hash and base seed (scene indices of another dataset, or
            another seed, are other scenes: then every previous scene is retired and every scene now is added).
        scenes_before: The previous release's scene index stop (0 for another dataset), from :func:`grown_scenes`.
        shards: This release's shard records (``id``, ``scenes`` = ``[start, stop)``), in scene order.

    Returns:
        ``scenes_before``/``scenes`` (scene index stops), ``window``, ``scene_range`` (indices held, whole shards),
        ``scenes_added_ranges``/``scenes_retired_ranges`` (``[start, stop)`` lists) with their scene counts
        ``scenes_added``/``scenes_retired``, ``same_dataset``, ``shards_added``/``shards_retired`` (ids).
    """
    held = [shards[0]["scenes"][0], shards[-1]["scenes"][1]] if shards else [0, 0]
    same = prev is not None and prev["render"].get("config_hash") == config_hash and prev["render"].get("seed") == seed
    before = _held_range(prev) if prev is not None else None
    added = _range_minus(held, before if same else None)
    retired = [] if before is None else _range_minus(before, held if same else None)
    changes = shard_changes(prev, shards)
    # shards added for scenes the previous release held already (same dataset): rendered again, e.g. by new
    # render code (every shard id changes) or another shard size; they replace shards, they add no scenes
    def overlaps(scenes: Any, r: list[int] | None) -> bool:
        return same and r is not None and isinstance(scenes, list) and scenes[0] < r[1] and scenes[1] > r[0]

    rerendered = [s for s in shards if s["id"] in changes["shards_added"] and overlaps(s["scenes"], before)]
    superseded = [s["id"] for s in (prev or {}).get("shards", [])
                  if s["id"] in changes["shards_retired"] and overlaps(s.get("scenes"), held)]
    return {"scenes_before": scenes_before, "scenes": held[1], "window": growth.window, "scene_range": held,
            "scenes_added": sum(b - a for a, b in added), "scenes_added_ranges": added,
            "scenes_retired": sum(b - a for a, b in retired), "scenes_retired_ranges": retired,
            "same_dataset": same, **changes, "shards_rerendered": [s["id"] for s in rerendered],
            "shards_superseded": superseded,
            "scenes_rerendered_ranges": _merged([[max(s["scenes"][0], before[0]), min(s["scenes"][1], before[1])]
                                                 for s in rerendered] if before is not None else [])}


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    """Sorted ``[start, stop)`` ranges with touching or overlapping ones joined."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def shard_changes(prev: dict[str, Any] | None, shards: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Shards this release adds and retires against the previous release (``shards_added``, ``shards_retired``)."""
    old = [s["id"] for s in prev["shards"]] if prev is not None else []
    now = [s["id"] for s in shards]
    return {"shards_added": [s for s in now if s not in old], "shards_retired": [s for s in old if s not in now]}


def _render_verified(cfg: RefreshConfig, render_cfg: RenderStep, dataset: Path, report: str,
                     first_scene: int = 0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Render the release's missing shards (those with a scene at or above ``first_scene``), then re-hash every
    file of every shard against its manifest; a corrupt or incomplete shard is moved aside and rendered again
    (once).

    Returns:
        The render summary (plus ``shards_repaired``) and the release's shard records.

    Raises:
        PartialFailure: shards still corrupt after rendering them again.
    """
    from pipelines.render import dataset_plan, run_render
    from segfactory.formats.dataset import MANIFEST_FILE, shard_dir, verify_shard

    summary = run_render(render_cfg, dataset, cfg.cluster, performance_report=report, first_scene=first_scene)
    plans = dataset_plan(render_cfg, read_json(dataset / "dataset.json")["config_hash"],
                         read_json(dataset / "dataset.json")["family"], first_scene)
    repaired = 0
    for attempt in range(2):
        bad = {p.shard_id: problems for p in plans if (problems := verify_shard(dataset, p.shard_id))}
        if not bad:
            break
        for sid, problems in bad.items():
            console.print(f"[red]shard {sid} is corrupt:[/] {'; '.join(problems[:3])}", soft_wrap=True)
            if attempt == 0:
                move_aside(shard_dir(dataset, sid))
        if attempt == 1:
            raise PartialFailure(f"{len(bad)} shard(s) are still corrupt after rendering them again; nothing was "
                                 "published (check the disk)", {sid: "; ".join(p) for sid, p in bad.items()})
        repaired = len(bad)
        again = run_render(render_cfg, dataset, cfg.cluster, performance_report=report, first_scene=first_scene)
        summary = {**summary, "shards_rendered": summary["shards_rendered"] + again["shards_rendered"]}
    shards = []
    for p in plans:
        manifest = shard_dir(dataset, p.shard_id) / MANIFEST_FILE
        shards.append({"id": p.shard_id, "manifest_sha256": sha256_file(manifest),
                       "frames": read_json(manifest)["num_frames"], "scenes": [p.scene_start, p.scene_stop]})
    return {**summary, "shards_repaired": repaired}, shards


def _ingest_verified(cfg: RefreshConfig, root: Path) -> dict[str, Any]:
    """Ingest the new real images into ``ROOT/real``, then re-hash every shard of the store (as the release's
    rendered shards are): a corrupt one is moved aside (:func:`segfactory.formats.images.verify_store`, as
    ``segfactory verify --repair`` does) and its images are ingested again (once).

    Returns:
        The release's ``real`` record.

    Raises:
        PartialFailure: shards still corrupt after ingesting them again.
    """
    from pipelines.ingest import LOCK_FILE as INGEST_LOCK
    from pipelines.ingest import IngestJob, ingest_sources
    from segfactory.formats.images import verify_store

    store = root / "real"
    ingest_cfg = IngestJob.of(cfg.real.config, cfg.cluster)
    s = ingest_sources(cfg.real.sources(), store, ingest_cfg)
    new_images = s["new_images"]
    for attempt in range(2):
        with exclusive_lock(store / INGEST_LOCK, f"an ingest into '{store}'",
                            fix="wait for it to finish (schedules should not overlap: this run is skipped)"):
            bad, moved = verify_store(store, repair=attempt == 0)
        if not bad:
            break
        units = {f"real/shards/{sid}": problems for sid, problems in bad.items()}
        for sid, problems in bad.items():
            console.print(f"[red]real image shard real/shards/{sid} is corrupt:[/] {'; '.join(problems[:3])}"
                          + (f"; moved aside to real/shards/{moved[sid].name}" if sid in moved else ""),
                          soft_wrap=True)
        if attempt == 1:
            raise PartialFailure(f"{len(bad)} real image shard(s) of '{store}' are still corrupt after "
                                 "ingesting them again; nothing was published (check the disk)",
                                 {u: "; ".join(p) for u, p in units.items()})
        s = ingest_sources(cfg.real.sources(), store, ingest_cfg)  # the moved shards' images are new again
    return {"dir": "real", "data_hash": s["data_hash"], "images": s["total_images"], "new_images": new_images,
            "config_hash": s["config_hash"]}


def model_is_finite(model_dir: Path) -> bool:
    """Whether every floating-point weight of a model dir's ``model.safetensors`` is finite (no NaN or inf)."""
    import torch
    from safetensors.torch import load_file

    from segfactory.formats.model import WEIGHTS_FILE

    weights = load_file(str(model_dir / WEIGHTS_FILE))
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def previous_promoted(prev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The model the previous release served (its promoted model; its ``model`` for releases from before
    promotion), with ``release`` naming the release that promoted it; None without one."""
    if prev is None:
        return None
    previous = prev.get("promoted_model", prev.get("model"))
    if previous is not None and "release" not in previous:
        previous = {**previous, "release": prev["release"]}
    return previous


def real_eval_data(ref: str) -> tuple[str, dict[str, Any]]:
    """``train.promotion.real_eval`` as the ``--data`` argument of ``segfactory evaluate`` and its stage key
    material: a ``sample:`` reference as given (package data, fixed), a folder as an absolute path with a hash of
    its files' names, sizes and mtimes (labels added or fixed since: new scores).

    Raises:
        UserError: the folder does not exist.
    """
    if ref.startswith("sample:"):
        return ref, {"ref": ref}
    path = Path(ref).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"train.promotion.real_eval='{ref}' is not a folder",
                        fix="point it at a labeled folder (images/, masks/, classes.json) or a sample:NAME/SPLIT "
                            "reference, or leave it unset")
    files = sorted((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns)
                   for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") for st in [p.stat()])
    return str(path), {"ref": str(path), "files": canonical_hash(files)}


def check_promotion_real_eval(promotion: PromotionSettings, targets: TargetClasses) -> None:
    """``train.promotion.real_eval`` before any work: a folder that is there (a ``sample:`` reference materialized,
    as the evaluation would) and, for a labeled real folder, only classes the model has (``targets``,
    :func:`pipelines.stages.model_targets`) or ``train.promotion.remap`` maps.

    Raises:
        UserError: a missing folder, a sample set's images without masks, a class the model lacks.
    """
    from finetune.data.sources import detect_kind
    from pipelines.stages import check_real_eval_classes
    from segfactory.sampledata import SAMPLE_SETS, is_sample_ref, parse_ref, resolve_path, splits_of

    ref = promotion.real_eval
    assert ref is not None
    real_eval_data(ref)
    if is_sample_ref(ref):
        name, split = parse_ref(ref)
        if split in (None, "unlabeled"):
            labeled = [f"sample:{name}/{s}" for s in splits_of(SAMPLE_SETS.get(name)) if s != "unlabeled"]
            raise UserError(f"train.promotion.real_eval='{ref}' is not labeled images: the models are scored on "
                            "labels", fix=f"use {' or '.join(labeled)}")
    path = resolve_path(ref).resolve()
    if detect_kind(path, "train.promotion.real_eval") == "real":
        check_real_eval_classes([path], targets, promotion.remap, "train.promotion.remap.")


def score_real_eval(cfg: RefreshConfig, root: Path, model: dict[str, Any], previous: dict[str, Any] | None,
                    release: str) -> dict[str, Any]:
    """Evaluate the retrained ``model`` and the ``previous`` promoted model on ``train.promotion.real_eval``
    (each an ``evaluate`` stage keyed by its model and the data, so an unchanged pair is scored once), so that
    :func:`promote` compares the two on the same labeled real images.

    Returns:
        ``model`` with ``real_eval`` (``on``, ``miou``, ``stage``; ``previous_miou`` and ``previous_stage`` when
        the previous promoted model is still there) and the candidate's evaluation stage added to its ``stages``.
    """
    from pipelines.stages import FINETUNE_PACKAGES, run_stage_tasks, stage_dir

    ref = cfg.train.promotion.real_eval
    assert ref is not None
    data, key = real_eval_data(ref)

    remap = cfg.train.promotion.remap
    mapped = {"remap": remap} if remap else {}  # the keys of configs without a mapping stay what they were

    def stage_for(model_rel: str) -> Path:
        return stage_dir(root, "evaluate", {"model": Path(model_rel).parent.name, "data": key, **mapped},
                         FINETUNE_PACKAGES)

    def command(model_rel: str) -> list[str]:
        return ["evaluate", "--model", str(root / model_rel), "--data", data,
                *[a for k, v in remap.items() for a in ("--remap", f"{k}={v}")], "--out", "{OUT}"]

    commands = {"evaluate-real": (stage_for(model["model"]), command(model["model"]))}
    other = (previous or {}).get("model")
    if other is not None and other != model["model"] and (root / other).is_dir():
        commands["evaluate-real-previous"] = (stage_for(other), command(other))
    run_stage_tasks(cfg.cluster, cfg.train.timeout_s, cfg.train.retries, commands,
                    root / ".logs" / f"dask-report-{release}-real-eval.html")
    cand = commands["evaluate-real"][0]
    record: dict[str, Any] = {"on": ref, "miou": read_json(cand / "metrics.json")["overall"]["miou"],
                              "stage": f"stages/{cand.name}"}
    if "evaluate-real-previous" in commands:
        prev_stage = commands["evaluate-real-previous"][0]
        record |= {"previous_miou": read_json(prev_stage / "metrics.json")["overall"]["miou"],
                   "previous_stage": f"stages/{prev_stage.name}"}
    elif other is not None and other == model["model"]:
        record["previous_miou"] = record["miou"]  # the same model
    stages = list(model.get("stages", []))
    return {**model, "real_eval": record, "stages": [*stages, record["stage"]] if record["stage"] not in stages
            else stages}


def promote(root: Path, model: dict[str, Any], prev: dict[str, Any] | None, settings: PromotionSettings,
            release: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Decide whether the retrained ``model`` replaces the previous release's promoted model.

    It is refused when its weights or its score are not finite (a NaN model is never promoted), or when its
    held-out mIoU is more than ``settings.max_drop`` below the previous promoted model's, or (``real_eval``, see
    :func:`score_real_eval`) its mIoU on the labeled real images is more than ``settings.max_drop`` below the
    previous promoted model's on the same images. The decision and its reason are recorded in the candidate
    (``promotion``).

    Args:
        root: The refresh root (model paths are relative to it).
        model: The retrained model's record (``model``, ``miou``, ``stages``, ...).
        prev: The previous release, or None.
        settings: ``train.promotion``.
        release: The name of the release being published.

    Returns:
        ``(candidate with its promotion record, the promoted model)``: the candidate if promoted, else the
        previous release's promoted model (with ``release`` naming where it was promoted), or None.
    """
    previous = previous_promoted(prev)
    miou = model.get("miou")
    finite_score = isinstance(miou, int | float) and math.isfinite(miou)
    real = model.get("real_eval")
    real_miou = None if real is None else real.get("miou")
    real_prev = None if real is None else real.get("previous_miou")
    reason: str
    if not finite_score:
        promoted, reason = False, f"its held-out mIoU is {miou} (not finite)"
    elif real is not None and not (isinstance(real_miou, int | float) and math.isfinite(real_miou)):
        promoted, reason = False, f"its mIoU on the real_eval images {real['on']} is {real_miou} (not finite)"
    elif not model_is_finite(root / model["model"]):
        promoted, reason = False, "its weights hold NaN or infinite values"
    elif (real is not None and previous is not None and isinstance(real_prev, int | float)
          and math.isfinite(real_prev) and real_miou < real_prev - settings.max_drop):
        promoted, reason = False, (f"mIoU on the real_eval images {real['on']} {real_miou:.4f} dropped by "
                                   f"{real_prev - real_miou:.4f} from {real_prev:.4f} (the model of release "
                                   f"{previous['release']}, scored on the same images), more than "
                                   f"train.promotion.max_drop={settings.max_drop}")
    elif previous is None or not isinstance(previous.get("miou"), int | float):
        promoted, reason = True, "no earlier promoted model to compare with"
    elif miou < previous["miou"] - settings.max_drop:
        promoted, reason = False, (f"held-out mIoU {miou:.4f} dropped by {previous['miou'] - miou:.4f} from "
                                   f"{previous['miou']:.4f} (release {previous['release']}), more than "
                                   f"train.promotion.max_drop={settings.max_drop}")
    else:
        promoted, reason = True, (f"held-out mIoU {miou:.4f} against {previous['miou']:.4f} of release "
                                  f"{previous['release']} (allowed drop {settings.max_drop})")
        if isinstance(real_prev, int | float) and math.isfinite(real_prev):
            reason += f"; real_eval mIoU {real_miou:.4f} against {real_prev:.4f}"
    candidate = {**model, "promotion": {"promoted": promoted, "reason": reason,
                                        "previous": None if previous is None else previous["release"]}}
    if promoted:
        return candidate, {**model, "release": release}
    console.print(f"[yellow]model not promoted:[/] {reason}", soft_wrap=True)
    return candidate, previous


def retrain(cfg: RefreshConfig, root: Path, render_cfg: RenderStep, config_hash: str, shards: list[dict[str, Any]],
            real: dict[str, Any] | None, release: str) -> dict[str, Any]:
    """Pretrain, fine-tune and evaluate, each keyed by a hash of its config and inputs (the release's shard ids,
    the real images' data hash, the upstream stage): with ``when=changed`` unchanged inputs reuse the previous
    release's stages and nothing is trained. Fine-tuning sees the release's shards (the dataset's listed shards);
    evaluation scores the held-out test set (``train.test``)."""
    from pipelines.stages import (
        FINETUNE_PACKAGES,
        PRETRAIN_PACKAGES,
        render_test_set,
        run_stage_tasks,
        stage_dir,
        training_key,
    )

    assert real is not None, "run_refresh checks real.src before the lock"
    t = cfg.train
    dataset = root / "datasets" / config_hash
    always = {"release": release} if t.when == "always" else {}
    shard_key = canonical_hash(sorted(s["id"] for s in shards))
    test_set = render_test_set(render_cfg, config_hash, t.test, root, cfg.cluster,
                               root / ".logs" / f"dask-report-{release}-test.html", prefix="train.")
    pre = stage_dir(root, "pretrain", {"config": training_key(t.pretrain), "data": real["data_hash"],
                                       **always}, PRETRAIN_PACKAGES)
    ft = stage_dir(root, "finetune", {"config": training_key(t.finetune), "shards": shard_key,
                                       "pretrain": pre.name, **always}, FINETUNE_PACKAGES)
    eval_data = test_set or dataset
    ev = stage_dir(root, "evaluate", {"model": ft.name, "data": eval_data.name if test_set else shard_key},
                   FINETUNE_PACKAGES)
    configs = root / "stages" / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    save_resolved(with_tracking(t.pretrain, cfg.tracking, pre.name), configs / f"{pre.name}.yaml")
    save_resolved(with_tracking(t.finetune, cfg.tracking, ft.name), configs / f"{ft.name}.yaml")
    commands = {
        "pretrain": (pre, ["pretrain", str(configs / f"{pre.name}.yaml"), "--images", str(root / "real"),
                           "--out", "{OUT}"]),
        "finetune": (ft, ["finetune", str(configs / f"{ft.name}.yaml"), "--synthetic", str(dataset),
                          "--encoder", str(pre / "encoder"), "--out", "{OUT}"]),
        "evaluate": (ev, ["evaluate", "--model", str(ft / "model"), "--data", str(eval_data), "--out", "{OUT}"]),
    }
    results = run_stage_tasks(cfg.cluster, t.timeout_s, t.retries, commands,
                              root / ".logs" / f"dask-report-{release}-train.html")
    stages = [d for d in (test_set, pre, ft, ev) if d is not None]
    return {"stages": [f"stages/{d.name}" for d in stages], "model": f"stages/{ft.name}/model",
            "trained": not all(r["skipped"] for r in results.values()),
            "miou": read_json(ev / "metrics.json")["overall"]["miou"],
            "miou_on": f"stages/{test_set.name}" if test_set else "the release's training shards (train.test.scenes=0)"}


def _fault_mid_delete(trash: Path) -> None:
    """Test hook: ``SEGFACTORY_FAULT=kill-mid-prune`` SIGKILLs this process in the middle of deleting the first unit
    it prunes (one file of it already deleted), as a kill or power loss would."""
    if os.environ.get(FAULT_ENV) == "kill-mid-prune":
        files = sorted(p for p in trash.rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        os.kill(os.getpid(), signal.SIGKILL)


def _delete(path: Path) -> None:
    """Delete a unit crash-safely (trash first, see :func:`segfactory.io.discard_unit`)."""
    trash = move_to_trash(path)
    _fault_mid_delete(trash)
    remove_tree(trash)


def prune(root: Path, keep: int, protect: Path | None = None) -> dict[str, int]:
    """Delete releases beyond the newest ``keep`` and every shard, dataset and stage no kept release references.

    Args:
        root: The refresh root.
        keep: Releases kept (by sequence number).
        protect: A release that is kept whatever its position (the one just published).

    Returns:
        How many releases, shards, datasets and models were removed.
    """
    from pipelines.render import dataset_lock
    from segfactory.formats.dataset import committed_shards, no_readers, write_dataset_meta

    for parent in (root / RELEASES_DIR, root / "stages", root / "datasets", *(root / "datasets").glob("*/shards")):
        empty_trash(parent)  # deletions a kill interrupted
    releases = list_releases(root)
    kept = releases[-keep:]
    if protect is not None and protect not in kept:
        kept.append(protect)
    old = [p for p in releases if p not in kept]
    for p in old:  # the references go first: a kill after this point leaves only unreferenced units
        p.unlink()
        (p.parent / f".{p.stem}.config.yaml").unlink(missing_ok=True)
    referenced: dict[str, set[str]] = {}
    stages: set[str] = set()
    for p in kept:
        r = read_json(p)
        referenced.setdefault(r["render"]["dataset"], set()).update(s["id"] for s in r["shards"])
        for model in (r.get("model"), r.get("promoted_model")):
            stages.update((model or {}).get("stages", []))
            scored_previous = ((model or {}).get("real_eval") or {}).get("previous_stage")
            if scored_previous:  # the served model's score on the real_eval images: reused while they last
                stages.add(scored_previous)
    stages_removed = 0
    for d in sorted((root / "stages").glob("*-*")) if (root / "stages").is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and f"stages/{d.name}" not in stages:
            _delete(d)
            for leftover in (d.parent / f"{d.name}.log", d.parent / "configs" / f"{d.name}.yaml",
                             d.parent / f".{d.name}.lock"):
                leftover.unlink(missing_ok=True)
            stages_removed += 1
    shards_removed = datasets_removed = 0
    for ds in sorted((root / "datasets").glob("*")) if (root / "datasets").is_dir() else []:
        if ds.name.startswith("."):
            continue
        rel = f"datasets/{ds.name}"
        if rel not in referenced:
            with no_readers(ds) as free:
                if free:
                    _delete(ds)
                    datasets_removed += 1
                else:
                    console.print(f"[yellow]dataset '{ds}' is no longer used by any release but is kept for now:"
                                  "[/] a process reading it has it in use; a later refresh deletes it",
                                  soft_wrap=True)
            continue
        with dataset_lock(ds, "prune of"):
            doomed = [sid for sid in committed_shards(ds) if sid not in referenced[rel]]
            if not doomed:
                continue
            # dataset.json first: from here on no reader opens a shard that is about to go.
            meta = read_json(ds / "dataset.json")
            if any(s["id"] in doomed for s in meta["shards"]):
                write_dataset_meta(ds, meta, [s["id"] for s in meta["shards"] if s["id"] not in doomed])
            # A process that started reading before (a fine-tune) may still read them: they go with a later prune.
            with no_readers(ds) as free:
                if not free:
                    console.print(f"[yellow]{len(doomed)} retired shard(s) of '{ds}' are kept for now:[/] a "
                                  "process reading the dataset (fine-tuning, evaluation) has them in use; a later "
                                  "refresh deletes them", soft_wrap=True)
                    continue
                for sid in doomed:
                    _delete(ds / "shards" / sid)
                    shards_removed += 1
    return {"releases": len(old), "shards": shards_removed, "datasets": datasets_removed, "models": stages_removed}


def _ranges(ranges: list[list[int]]) -> str:
    """``[[0, 2], [5, 6]]`` -> ``"0-1, 5"`` (inclusive scene indices, for people)."""
    return ", ".join(f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges)


def _scenes_note(growth: dict[str, Any], what: str) -> str:
    ranges = growth.get(f"scenes_{what}_ranges")
    return f" (scenes {_ranges(ranges)})" if ranges else ""


def unchanged_summary(prev: dict[str, Any], release: dict[str, Any], pruned: dict[str, int],
                      seconds: float) -> None:
    """The one line of a refresh that found nothing changed against the latest release ``prev``."""
    model = " and model" if release.get("model") else ""
    console.print(f"nothing changed since release {prev['release']} (the same {len(prev['shards'])} shard(s), real "
                  f"images{model}): no release published (releases.publish_unchanged=true publishes one "
                  f"anyway); pruned {pruned['releases']} release(s), {pruned['shards']} shard(s), "
                  f"{pruned['datasets']} dataset(s) ({seconds:.1f}s)", soft_wrap=True)


def release_summary(release: dict[str, Any], pruned: dict[str, int], seconds: float) -> None:
    from rich.table import Table

    d = release["drift"]
    g = release.get("growth") or {}
    again, superseded = len(g.get("shards_rerendered", [])), len(g.get("shards_superseded", []))
    added = len(g.get("shards_added", [])) - again  # shards of scenes the previous release did not hold
    retired = len(g.get("shards_retired", [])) - superseded  # shards whose scenes left the release
    held = g.get("scene_range")
    window = f", window {g['window']}" if g.get("window") else ""
    holds = f" (scenes {_ranges([held])}{window})" if held else ""
    why = " by new render code" if g.get("render_code_changed") else ""
    replaced = (f"{again} rendered again{why}{_scenes_note(g, 'rerendered')} in place of {superseded}, "
                if again or superseded else "")
    versus = (f"vs the previous release {added} shard(s) added{_scenes_note(g, 'added')}, {replaced}{retired} "
              f"retired{_scenes_note(g, 'retired')}" if d.get("previous") else "the first release")
    console.print(f"release {release['release']}: {len(release['shards'])} shard(s){holds}, {release['num_frames']} "
                  f"frames ({release['render']['shards_rendered']} shard(s) rendered; {versus}),"
                  f" inputs changed: "
                  f"{'yes' if release['inputs_changed'] else 'no'}; pruned {pruned['releases']} release(s), "
                  f"{pruned['shards']} shard(s), {pruned['datasets']} dataset(s) ({seconds:.1f}s)", soft_wrap=True)
    if d.get("previous"):
        t = Table(title=f"drift vs {d['previous']}")
        for col in ("class", "share before %", "share now %", "change (pp)"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for s in d["class_shares"]:
            t.add_row(s["name"], f"{100 * s['previous']:.2f}", f"{100 * s['now']:.2f}", f"{100 * s['change']:+.2f}")
        console.print(t)
        tv = d["instance_hist_total_variation"]
        console.print(f"instance-size histogram total variation: {tv:.3f}" if tv is not None else "")
