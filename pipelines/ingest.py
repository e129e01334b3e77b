"""Dask orchestration of ``segfactory ingest``: hash chunks of files, drop duplicates, ingest shards.

The per-unit work lives in :mod:`pretrain.ingest`; this module only lists the source, plans the shards and
runs the two phases on the cluster from :func:`pipelines.cluster.open_client`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from pipelines.cluster import ClusterConfig, check_cluster, open_client, task_resources
from pipelines.lock import exclusive_lock
from pipelines.tasks import run_tasks
from pretrain import ingest as core
from pretrain.config import IngestConfig
from segfactory.config import hash_config, save_resolved
from segfactory.console import console
from segfactory.errors import PartialFailure, UserError
from segfactory.formats import images as store
from segfactory.io import ensure_writable_dir

CONFIG_FILE = store.CONFIG_FILE
LOCK_FILE = ".ingest.lock"
SKIMAGE_DATA = "skimage:data"


def resolve_source(src: str) -> str:
    """A source as a path: ``skimage:data`` is the folder of sample photos that ships inside scikit-image,
    ``sample:NAME/unlabeled`` a built-in real microscopy set (:mod:`segfactory.sampledata`, materialized here);
    anything else (a folder, glob or list file) is returned as given."""
    from segfactory.sampledata import is_sample_ref, resolve_path

    if is_sample_ref(src):
        return str(resolve_path(src))
    if src == SKIMAGE_DATA:
        import skimage.data

        return str(Path(skimage.data.__file__).parent)
    return src


def check_sources(sources: list[str]) -> list[str]:
    """Resolve every source (materializing ``sample:`` sets) and stop on one that does not exist, before any
    work: a pipeline that ingests after rendering checks its sources first.

    Returns:
        The resolved sources.

    Raises:
        UserError: no source, an unknown sample set, or a path that does not exist.
    """
    from pretrain.ingest import check_source_exists

    if not sources:
        raise UserError("no image source to ingest", fix="name a folder, glob, list file or sample:NAME/unlabeled")
    resolved = [resolve_source(s) for s in sources]
    for src in resolved:
        check_source_exists(src)
    return resolved


def ingest_sources(sources: list[str], out_dir: str | os.PathLike, cfg: IngestJob) -> dict[str, Any]:
    """Ingest several sources, in order, into one image set (each run of :func:`run_ingest` is incremental).

    Returns:
        The summary of the last run (its totals and ``data_hash`` cover every source), with ``new_images`` and
        ``new_rejected`` summed over the sources and ``sources`` the resolved paths.
    """
    resolved = check_sources(sources)
    summary: dict[str, Any] = {}
    new_images = new_rejected = 0
    for src in resolved:
        summary = run_ingest(src, out_dir, cfg)
        new_images += summary["new_images"]
        new_rejected += summary["new_rejected"]
    return {**summary, "new_images": new_images, "new_rejected": new_rejected, "sources": resolved}


class IngestJob(IngestConfig):
    """``segfactory ingest``: the ingest stage's config plus how its tasks run and the cluster they run on."""

    retries: int = Field(1, ge=0, description="re-tries of a failed task before it is reported")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @classmethod
    def of(cls, stage: IngestConfig, cluster: ClusterConfig, retries: int = 1) -> IngestJob:
        """The job that runs ``stage`` on ``cluster``."""
        return cls.model_validate({**stage.model_dump(mode="json"), "retries": retries,
                                   "cluster": cluster.model_dump(mode="json")})

    def stage_config(self) -> IngestConfig:
        """The ingest stage's own config (what the tasks and the store's config.yaml see)."""
        return IngestConfig.model_validate(self.model_dump(mode="json", include=set(IngestConfig.model_fields)))


def check_normalization_unchanged(out: Path, cfg: IngestConfig) -> None:
    """A dump grows over time, but all its shards must share one normalization."""
    prev_path = out / CONFIG_FILE
    if not prev_path.is_file() or not store.committed_shards(out):
        return
    prev = (yaml.safe_load(prev_path.read_text(encoding="utf-8")) or {}).get("normalize", {})
    now = cfg.normalize.model_dump(mode="json")
    changed = [k for k in now if prev.get(k) != now[k]]
    if changed:
        k = changed[0]
        raise UserError(f"'{out}' was ingested with normalize.{k}={prev.get(k)!r}; this run asks for {now[k]!r}",
                        fix=f"re-run with normalize.{k}={prev.get(k)!r}, or ingest into a new --out")


def check_plugins(modules: list[str]) -> None:
    """Fail before the cluster starts when a ``decode.plugins`` module cannot be found."""
    import importlib.util

    for i, name in enumerate(modules):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise UserError(f"decode.plugins[{i}]={name!r} is not an importable module",
                            fix="install the package that provides it, or remove it from decode.plugins")


def run_ingest(src: str, out_dir: str | os.PathLike, cfg: IngestJob) -> dict[str, Any]:
    """Ingest (or incrementally extend) an image folder into ``out_dir``.

    Args:
        src: Folder, glob or text file of paths.
        out_dir: Output directory (see :mod:`pretrain.ingest` for the layout).
        cfg: The ingest config, task retries and cluster.

    Returns:
        Summary: new images/rejections of this run and totals of the output.

    Raises:
        UserError: empty source, unwritable output, changed normalization, every file rejected, or another
            ingest into ``out_dir`` is running (exit code EXIT_BUSY; it holds ``OUT/.ingest.lock``).
        PartialFailure: some shard tasks failed after retries (the others are committed).
    """
    from segfactory.formats import output_kind

    t0 = time.perf_counter()
    core.check_source_exists(src)  # not there, or a rendered dataset / an ingest store: one line, nothing done
    check_cluster(cfg.cluster)  # a bad --cluster-address fails also when nothing is new
    if output_kind(Path(out_dir)) == "a rendered dataset":  # an ingest store is this command's own output
        raise UserError(f"--out '{out_dir}' is a rendered dataset, not an image store",
                        fix="ingest into a folder of its own (a new one, or an earlier ingest's --out)")
    out = ensure_writable_dir(out_dir)
    # held for the whole run: a second run would remove this run's temp shard folders as leftovers and
    # plan shards with the same run number
    with exclusive_lock(out / LOCK_FILE, f"another ingest into '{out}'",
                        fix="wait for it to finish (a re-run then ingests only new files), or use another --out"):
        return _ingest_locked(src, out, cfg, t0)


def _images_of_labeled_folder(src: str) -> str:
    """A labeled folder (``images/`` + ``masks/``, e.g. ``sample:NAME/eval``) as a source: its ``images/`` only,
    said once; its class masks and instance maps are not images to learn from. Anything else as given."""
    from segfactory.formats.labeled import is_labeled_folder

    p = Path(src).expanduser()
    if p.is_dir() and is_labeled_folder(p) and (p / "masks").is_dir():
        console.print(f"'{src}' is a labeled folder: ingesting its images/ only (not its masks/ or instances/)")
        return str(p / "images")
    return src


def _outside_of(files: list[core.SourceFile], out: Path) -> list[core.SourceFile]:
    """``files`` without those inside the output folder ``out`` (an ``--out`` inside the source would otherwise
    ingest the store's own packs on every later run); string prefixes only, no system call per file."""
    prefixes = tuple({os.path.join(os.path.abspath(out), ""), os.path.join(os.path.realpath(out), "")})
    kept = [f for f in files if not f.path.startswith(prefixes)]
    if len(kept) < len(files):
        console.print(f"skipped {len(files) - len(kept)} file(s) inside the output folder '{out}' (this ingest's "
                      "own store)")
    return kept


def _ingest_locked(src: str, out: Path, cfg: IngestJob, t0: float) -> dict[str, Any]:
    phases = _Phases()
    check_normalization_unchanged(out, cfg)
    leftovers = store.clean_uncommitted(out)
    if leftovers:
        console.print(f"removed {len(leftovers)} interrupted shard(s) of an earlier run")
    check_plugins(cfg.decode.plugins)
    phases.lap("prepare")
    src = _images_of_labeled_folder(src)
    found = core.discover(src, cfg.extensions, cfg.follow_symlinks, cfg.max_files, cfg.walk_timeout_s)
    files, skipped_links = found.files, found.skipped_links
    del found
    files = _outside_of(files, out)
    phases.lap("discover")
    if skipped_links:
        path, why = skipped_links[0]
        console.print(f"[yellow]skipped {len(skipped_links)} link(s) or folder(s) of the source, e.g. "
                      f"'{path}': {why}[/]")
    checks = cfg.checks.model_dump(mode="json")
    decoders = core.decoder_set(cfg.decode.plugins)  # a not_image judged under other decoders is looked at again
    scan = store.scan_manifests(out)  # one read of the store's manifests
    known = scan.known(lambda rec: core.needs_reexamination(rec, checks, decoders))
    known_shas, last_run = scan.shas, scan.last_run
    # stacks ingested without their later slices, under limits raised since: those slices are offered again
    resume = {key: int(note["dropped_from"]) for key, note in scan.page_notes.items()
              if core.needs_reexamination(note, checks)}
    del scan
    new = [f for f in files if f.key not in known or f.key in resume]
    del known
    phases.lap("check")
    stage = cfg.stage_config()
    save_resolved(stage, out / CONFIG_FILE)
    console.print(f"{len(files)} file(s) in source, {len(files) - len(new)} already handled, {len(new)} new or "
                  "re-examined")
    summary: dict[str, Any] = {"source": src, "out": str(out), "files_seen": len(files), "new_files": len(new),
                               "new_images": 0, "new_rejected": 0, "rejected_kinds": {}, "failed_shards": {},
                               "skipped_links": [{"path": p, "why": w} for p, w in skipped_links]}
    failures: dict[str, str] = {}
    if new:
        cfg_dict = stage.model_dump(mode="json")
        with open_client(cfg.cluster, shared_dir=out) as client:
            phases.lap("setup")
            hashed, hash_failures = _hash_phase(client, new, cfg, cfg_dict)
            failures.update(hash_failures)
            phases.lap("hash")
            # packed: the hash records go (a third of the memory, here and in the scheduler)
            specs = [{**core.pack_spec(s), "decoders": decoders}
                     for s in core.plan_shards(hashed, known_shas, last_run + 1, cfg.files_per_shard, resume)]
            del hashed
            phases.lap("plan")
            results, shard_failures = _shard_phase(client, specs, str(out), cfg_dict, cfg.retries,
                                                   task_resources(cfg.cluster))
            del specs
            failures.update(shard_failures)
            phases.lap("shards")
        for r in results:
            summary["new_images"] += r["images"]
            summary["new_rejected"] += r["rejected"]
            for k, v in r["rejected_kinds"].items():
                summary["rejected_kinds"][k] = summary["rejected_kinds"].get(k, 0) + v
    phases.lap("shards" if new else "setup")
    del files, new, known_shas  # not needed any more: the index rebuild reads the manifests again
    index = store.build_index(out)
    phases.lap("index")
    dt = time.perf_counter() - t0
    summary.update(total_images=index["num_images"], total_rejected=index["num_rejected"],
                   data_hash=index["data_hash"], seconds=round(dt, 2), config_hash=hash_config(stage),
                   failed_shards=failures, phases=phases.seconds)
    _print_summary(summary, index)
    if failures:
        raise PartialFailure(f"{len(failures)} ingest task(s) failed; the rest is committed and a re-run retries "
                             "them", failures)
    if index["num_images"] == 0:
        raise UserError(f"every file was rejected ({index['num_rejected']} file(s); reasons in "
                        f"{out / store.REJECTED_FILE})", fix="point SRC at image files (JPEG, PNG, TIFF, WebP, BMP)")
    return summary


class _Phases:
    """Wall-clock seconds of the phases of one run (``summary["phases"]``): ``prepare`` (lock, leftovers),
    ``discover`` (walk + stat), ``check`` (the incremental check against the store), ``setup`` (config, cluster
    start), ``hash``, ``plan`` (dedup and shard plan), ``shards`` (ingesting), ``index`` (index rebuild)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now


def _hash_phase(client: Any, files: list[core.SourceFile], cfg: IngestJob, cfg_dict: dict[str, Any]
                ) -> tuple[list[dict[str, Any]], dict[str, str]]:
    chunks = {f"hash chunk starting at {files[i].path}": files[i:i + cfg.hash_chunk]
              for i in range(0, len(files), cfg.hash_chunk)}
    results, failures = run_tasks(client, core.hash_files, chunks, description="hashing",
                                  sizes={k: len(c) for k, c in chunks.items()}, retries=cfg.retries,
                                  resources=task_resources(cfg.cluster), max_file_mb=cfg.checks.max_file_mb,
                                  cfg=cfg_dict)
    return [h for r in results.values() for h in r], failures


def _shard_phase(client: Any, specs: list[dict[str, Any]], out: str, cfg: dict[str, Any], retries: int,
                 resources: dict[str, float] | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    units = {f"shard {s['shard_id']}": s for s in specs}
    results, failures = run_tasks(client, core.ingest_shard, units, description="ingesting",
                                  sizes={k: len(s["files"]) for k, s in units.items()}, retries=retries,
                                  resources=resources, out_root=out, cfg=cfg)
    return list(results.values()), failures


def _print_summary(s: dict[str, Any], index: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="ingest", show_header=False)
    t.add_row("new files", str(s["new_files"]))
    t.add_row("new images", str(s["new_images"]))
    t.add_row("new rejected", ", ".join(f"{k}={v}" for k, v in sorted(s["rejected_kinds"].items()))
              or "0")
    t.add_row("total images", f"{index['num_images']} ({index['num_rgb']} RGB, {index['num_gray']} gray)")
    t.add_row("total rejected", f"{index['num_rejected']} (see {store.REJECTED_FILE})")
    t.add_row("time", f"{s['seconds']:.1f} s")
    console.print(t)
