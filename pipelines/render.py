"""``segfactory render``: render a dataset as Dask tasks, one shard per task, resuming finished work."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import Field

from pipelines.cluster import ClusterConfig, check_cluster
from pipelines.lock import exclusive_lock
from scenes import resolve_scene
from segfactory.config import StrictModel, hash_config, save_resolved
from segfactory.console import console
from segfactory.errors import PartialFailure, UserError
from segfactory.formats.dataset import (
    DATASET_FILE,
    DEPTH_MAX,
    DEPTH_SCALE_M,
    IGNORE_INDEX,
    MANIFEST_FILE,
    committed_shards,
    is_committed,
    remove_stale_shard_writes,
    shard_dir,
    write_dataset_meta,
)
from segfactory.io import atomic_write_json, ensure_writable_dir, read_json
from synth.config import RenderConfig
from synth.shard import (
    PROGRESS_PREFIX,
    RENDER_PACKAGES,
    SCRATCH_ENV,
    SCRATCH_PREFIX,
    ShardPlan,
    plan_shards,
    render_code_version,
    scratch_root,
)

PROGRESS_TOPIC = "segfactory-render-progress"
LOCK_FILE = ".render.lock"


class RenderExecution(StrictModel):
    """``execution``: how the render's shard tasks run."""

    timeout_s: float = Field(1800.0, gt=0, description="a shard's render process is killed after this long")
    retries: int = Field(2, ge=0, description="re-runs of a failed or timed-out shard")


class RenderStep(RenderConfig):
    """A render inside a pipeline: the render stage's config plus how its shard tasks run."""

    execution: RenderExecution = Field(default_factory=RenderExecution)

    def stage_config(self) -> RenderConfig:
        """The render stage's own config (what a render process and the dataset's config.yaml see)."""
        return RenderConfig.model_validate(self.model_dump(mode="json", include=set(RenderConfig.model_fields)))


class RenderJob(RenderStep):
    """``segfactory render CONFIG``: a render step and the cluster it runs on."""

    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


@contextlib.contextmanager
def render_scratch() -> Iterator[dict[str, str]]:
    """A scratch directory for one render process, removed when it exits whatever happened to it; yields the
    child's environment (``SCRATCH_ENV`` and ``TMPDIR`` point there, so Blender's session temp dir goes there too).

    A render killed at its timeout, or by a crash, never runs its own clean-up: its intermediate EXR passes (in
    ``/dev/shm``, i.e. memory) and Blender's ``blender_XXXXXX`` temp dir stayed behind for every killed or
    ``os._exit``-ed render process. The directory is named after this process's pid, and directories of pids that
    no longer run (a Dask worker killed with SIGKILL never ran this ``finally``) are removed first.
    """
    import psutil

    root = Path(scratch_root() or tempfile.gettempdir())
    for stale in root.glob(f"{SCRATCH_PREFIX}*-*"):
        owner = stale.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=root)
    try:
        yield {**os.environ, SCRATCH_ENV: scratch, "TMPDIR": scratch}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def render_shard_task(job: dict[str, Any]) -> dict[str, Any]:
    """Dask task: render one shard in a subprocess with a timeout; raises (so Dask retries) on failure."""
    from pipelines.subproc import forward_to_driver, run_logged

    root = Path(job["root"])
    plan = job["plan"]
    if is_committed(shard_dir(root, plan["shard_id"])):
        return {"shard_id": plan["shard_id"], "skipped": True}
    logs = root / ".logs"
    logs.mkdir(parents=True, exist_ok=True)
    job_path = logs / f"{plan['shard_id']}.job.json"
    atomic_write_json(job_path, job)
    def parse(line: str) -> dict[str, Any] | None:
        if not line.startswith(PROGRESS_PREFIX):
            return None
        _, shard_id, frames = line.split()
        return {"shard_id": shard_id, "frames": int(frames)}

    with render_scratch() as env:
        run_logged([sys.executable, "-m", "synth.worker", str(job_path)], job["timeout_s"],
                   logs / f"{plan['shard_id']}.log", on_line=forward_to_driver(PROGRESS_TOPIC, parse), env=env)
    manifest = read_json(shard_dir(root, plan["shard_id"]) / MANIFEST_FILE)
    return {"shard_id": plan["shard_id"], "skipped": False, "frames": manifest["num_frames"],
            "timings": manifest["timings"]}


def dataset_lock(out: Path, what: str) -> contextlib.AbstractContextManager[None]:
    """Hold the dataset directory's writer lock (``.render.lock``): renders and refresh prunes, which rewrite
    ``dataset.json`` and add or remove shards, take it; a second writer gets exit code 4 and changes nothing."""
    return exclusive_lock(out / LOCK_FILE, f"another {what} '{out}'",
                          fix="wait for it to finish (a re-run then renders only missing shards), or use another --out")


def prepare_dataset(out: Path, cfg: RenderConfig, config_hash: str, first_scene: int = 0) -> dict[str, Any]:
    """Check ``out`` can hold this dataset (writable; empty or the same config) and write its metadata (call with
    :func:`dataset_lock` held); ``first_scene`` as in :func:`dataset_plan`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory", fix="choose a directory path for --out")
    meta_path = out / DATASET_FILE
    if meta_path.is_file():
        try:
            old = read_json(meta_path)
        except (OSError, ValueError):
            old = {}
        if old.get("config_hash") != config_hash:
            raise UserError(
                f"'{out}' holds a dataset rendered with a different config "
                f"(config hash {old.get('config_hash')} there, {config_hash} now)",
                fix="use a new --out directory, or render with the config saved in its config.yaml")
    elif out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        raise UserError(f"'{out}' is not empty and holds no segfactory dataset",
                        fix="choose an empty or new --out directory")
    ensure_writable_dir(out)
    resolved = resolve_scene(cfg.scene)
    meta = {
        "family": resolved.family.name,
        "classes": rendered_classes(cfg),
        "ignore_index": IGNORE_INDEX,
        "background_class": resolved.family.background,
        "image": {"format": cfg.output.image_format, "bit_depth": cfg.output.bit_depth,
                  "channels": resolved.family.channels, "resolution": cfg.render.resolution},
        # 1/1000 of a scene unit: millimetres for metre-scale scenes, nanometres for cells.
        "depth": {"dtype": "uint16", "scale_m": DEPTH_SCALE_M * resolved.family.unit_m, "invalid": 0,
                  "saturated": DEPTH_MAX},
        "config_hash": config_hash,
        "code_version": render_code_version(),
    }
    save_resolved(cfg.stage_config() if isinstance(cfg, RenderStep) else cfg, out / "config.yaml")
    write_dataset_meta(out, meta, [p.shard_id for p in dataset_plan(cfg, config_hash, resolved.family.name,
                                                                    first_scene)])
    return meta


def dataset_plan(cfg: RenderConfig, config_hash: str, family: str, first_scene: int = 0) -> list[ShardPlan]:
    """The shards that make up the dataset ``cfg`` (size, seed, shard size) describes; ``family`` is its scene
    family's name (``dataset.json``'s ``family``), passed in because resolving the scene again re-hashes user
    meshes.

    ``first_scene`` > 0 leaves out the shards whose scenes all lie below it (a refresh's rolling window,
    ``growth.window``): shards stay aligned to multiples of ``scenes_per_shard`` from scene 0 (so their ids do not
    change as the window moves), and a shard holding ``first_scene`` is kept whole."""
    d = cfg.dataset
    plans = plan_shards(family, config_hash, d.seed, d.scenes, d.scenes_per_shard, render_code_version())
    return [p for p in plans if p.scene_stop > first_scene]


def rendered_classes(cfg: RenderConfig) -> list[dict[str, Any]]:
    """The classes a render of ``cfg`` writes into ``dataset.json`` (the scene family's, with any the config adds),
    known before rendering."""
    return [asdict(c) for c in resolve_scene(cfg.scene).classes]


def resolve_render_config(cfg: RenderConfig) -> tuple[RenderConfig, str]:
    """Fill in the scene family's defaults and compute the dataset's config hash."""
    resolved = resolve_scene(cfg.scene)
    post = resolved.randomization.post
    if post.max_value() > 2**cfg.output.bit_depth - 1:
        raise UserError(
            f"scene.randomization.post.camera_bits={post.camera_bits} with camera_offset up to "
            f"{post.camera_offset[1]} writes values up to {post.max_value()}, beyond {cfg.output.bit_depth}-bit output",
            fix="set output.bit_depth=16, or lower scene.randomization.post.camera_bits / camera_offset")
    cfg = cfg.model_copy(update={"scene": resolved.as_config()})
    return cfg, hash_config(cfg.identity())


def run_render(cfg: RenderStep, out: str | os.PathLike, cluster: ClusterConfig,
               performance_report: str | os.PathLike | None = None, first_scene: int = 0) -> dict[str, Any]:
    """Render all missing shards of the dataset ``cfg`` describes into ``out``.

    Args:
        cfg: The render step (render config + task execution).
        out: Dataset directory (created, or resumed when it holds the same config).
        cluster: Where the shard tasks run.
        performance_report: Optional path of a Dask performance report (HTML) of the render.
        first_scene: Leave out the shards whose scenes all lie below this scene index (see :func:`dataset_plan`).

    Returns:
        A summary: shards planned/rendered/skipped, frames, seconds, failures.

    Raises:
        UserError: bad config or output directory (before anything is rendered).
        PartialFailure: some shards failed after their retries; the others are committed.
        UserError: another render into ``out`` is running (exit code EXIT_BUSY).
    """
    out = Path(out).resolve()
    cfg, config_hash = resolve_render_config(cfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file, not a directory", fix="choose a directory path for --out")
    ensure_writable_dir(out)  # an empty directory at most: the lock file needs a place
    check_cluster(cluster)  # a bad --cluster-address fails also when every shard is done
    # Held for the whole render, and taken before dataset.json is touched: a render refused because another one
    # runs changes nothing, and a second render would remove this one's shard writes as leftovers.
    with dataset_lock(out, "render into"):
        meta = prepare_dataset(out, cfg, config_hash, first_scene)
        return _render_locked(cfg, out, cluster, meta, config_hash, performance_report, first_scene)


def _render_locked(cfg: RenderStep, out: Path, cluster: ClusterConfig, meta: dict[str, Any], config_hash: str,
                   performance_report: str | os.PathLike | None, first_scene: int = 0) -> dict[str, Any]:
    import time

    plans = dataset_plan(cfg, config_hash, meta["family"], first_scene)
    done = set(committed_shards(out))
    todo = [p for p in plans if p.shard_id not in done]
    unlisted = sorted(done - {p.shard_id for p in plans})
    if unlisted:
        _note_unlisted(out, unlisted)
    stale = remove_stale_shard_writes(out)
    if stale:
        console.print(f"removed {stale} unfinished shard write(s) from an interrupted run")
    frames_per_shard = {p.shard_id: (p.scene_stop - p.scene_start) * cfg.render.views for p in todo}
    console.print(f"render: {len(plans)} shard(s) planned, {len(plans) - len(todo)} already done, "
                  f"{len(todo)} to render ({sum(frames_per_shard.values())} frames) -> {out}")
    t0 = time.perf_counter()
    failures: dict[str, str] = {}
    rendered = 0
    if todo:
        from pipelines.cluster import open_client

        with open_client(cluster, performance_report, shared_dir=out) as client:
            failures, rendered = _submit_and_wait(client, cfg, out, cluster, config_hash, todo, frames_per_shard)
        # Writes of shards whose worker died mid-render (the retry committed elsewhere) leave temp dirs behind.
        for sid in committed_shards(out):
            remove_stale_shard_writes(out, sid)
    meta = write_dataset_meta(out, meta, [p.shard_id for p in plans])
    summary = {"out": str(out), "shards_planned": len(plans), "shards_rendered": rendered,
               "shards_skipped": len(plans) - len(todo), "shards_failed": len(failures),
               "frames_total": meta["num_frames"], "seconds": round(time.perf_counter() - t0, 2)}
    console.print(f"render: {rendered} shard(s) rendered, {summary['shards_skipped']} skipped, {len(failures)} failed; "
                  f"dataset has {meta['num_frames']} frames in {meta['num_shards']} shard(s) "
                  f"({summary['seconds']:.1f}s)")
    if failures:
        raise PartialFailure(f"{len(failures)} shard(s) failed after {cfg.execution.retries} retries "
                             "(the others are complete; re-run the same command to retry them)", failures)
    return summary


def _note_unlisted(out: Path, unlisted: list[str]) -> None:
    """Say why committed shards are not part of this dataset: rendered by another version of the render code
    (an upgrade: every shard id changes, so every shard is rendered again), or another size, seed, shard size or
    window."""
    from segfactory.formats.dataset import MANIFEST_FILE, shard_dir

    now = render_code_version()
    other: dict[str, int] = {}
    for sid in unlisted:
        try:
            version = str(read_json(shard_dir(out, sid) / MANIFEST_FILE).get("code_version"))
        except (OSError, ValueError, AttributeError):
            continue
        if version != now:
            other[version] = other.get(version, 0) + 1
    n = sum(other.values())
    if n:
        versions = ", ".join(sorted(other))
        console.print(f"{n} committed shard(s) in {out} were rendered by render code version {versions}, not "
                      f"{now} (the code of {', '.join(RENDER_PACKAGES)} changed): kept on disk, not part of this "
                      "dataset; the shards of this code version are rendered anew", soft_wrap=True)
    if len(unlisted) > n:
        console.print(f"{len(unlisted) - n} committed shard(s) in {out} belong to another size, seed, shard size or "
                      "window: kept on disk, not part of this dataset", soft_wrap=True)


def _submit_and_wait(client: Any, cfg: RenderStep, out: Path, cluster: ClusterConfig, config_hash: str,
                     todo: list[ShardPlan], frames_per_shard: dict[str, int]) -> tuple[dict[str, str], int]:
    from pipelines.cluster import task_resources
    from pipelines.tasks import run_tasks

    nworkers = max(1, len(client.scheduler_info().get("workers", {})))
    threads = cfg.render.threads or (max(1, (os.cpu_count() or 1) // nworkers) if cluster.backend == "local" else 0)
    code = render_code_version()
    stage = cfg.stage_config().model_dump(mode="json")
    jobs = {p.shard_id: {"root": str(out), "plan": asdict(p), "config": stage, "config_hash": config_hash,
                         "code_version": code, "timeout_s": cfg.execution.timeout_s, "threads": threads}
            for p in todo}

    def on_failure(sid: str, e: BaseException) -> None:
        console.print(f"[red]shard {sid} failed:[/] {e}", soft_wrap=True)

    results, failures = run_tasks(
        client, render_shard_task, jobs, description="rendering", sizes=frames_per_shard,
        keys={sid: f"render-{sid}" for sid in jobs}, retries=cfg.execution.retries,
        resources=task_resources(cluster), topic=PROGRESS_TOPIC,
        parse_event=lambda msg: (msg["shard_id"], msg["frames"], None, None), on_failure=on_failure)
    return failures, sum(not r.get("skipped", False) for r in results.values())
