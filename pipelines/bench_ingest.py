"""``segfactory bench ingest --files N``: ingest planning at scale (walk, stat, incremental check, shard plan).

The bench writes ``N`` small real image files into a nested tree (``per_folder`` files per folder, 100 folders
per group: ``src/g000/d000/f0000000.jpg``), then runs ``segfactory ingest`` on it twice, each run in a fresh
Python process so that its peak memory is its own:

* ``first``: everything is new. The run walks and stats the tree, checks it against the (empty) store, hashes
  every file on the Dask workers, plans the shards and ingests them.
* ``refresh``: the same tree again, nothing changed: the run walks and stats the tree, checks every file
  against the store's manifests and finds nothing to do (``new_files`` 0, no cluster started).

**Planning** is the driver's work before any file is read: ``discover`` (walk + stat), ``check`` (the
incremental check: read the store's manifests, drop the files already handled) and, on a run with new files,
``plan`` (dedup by content hash and cut into shard specs). Hashing reads every byte of every new file on the
workers; it is reported next to planning (``phases.hash``), not in it. Memory is the driver's (it does all the
planning): ``driver_start_rss_mb`` after its imports, ``driver_run_peak_rss_mb`` the peak during the run
(sampled every 10 ms), ``driver_peak_rss_mb`` the process's ``ru_maxrss`` (start-up included); and
``children_peak_rss_mb``, the largest finished child process (Dask nanny, worker, decoder; 0 when no cluster
was started). ``load_1m`` is the machine's 1-minute load average before and after each run: on a shared
machine the times grow with it.

The files are 48-96 px crops, scaled and flipped at random, of the real photographs that ship with
scikit-image, scikit-learn and matplotlib (:func:`pretrain.bench.sample_photos`), three in four as JPEG
(quality 85), one in four as PNG: small real photographs, not noise. Creating them is not timed.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from segfactory.console import console
from segfactory.errors import UserError

TARGET_FILES = 200_000
TARGET_PLANNING_S = 60.0
TARGET_PEAK_MB = 1024.0
PLANNING_PHASES = ("discover", "check", "plan")
RESULT_PREFIX = "BENCH_INGEST_RESULT "


def file_path(root: Path, i: int, per_folder: int) -> Path:
    """Where file ``i`` of the tree lives: ``per_folder`` files per folder, 100 folders per group."""
    folder = i // per_folder
    ext = ".png" if i % 4 == 3 else ".jpg"
    return root / f"g{folder // 100:03d}" / f"d{folder % 100:03d}" / f"f{i:07d}{ext}"


def make_tree(root: Path, n: int, per_folder: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Write ``n`` small real image files (see the module docstring) under ``root``.

    Returns:
        ``{"files", "folders", "bytes", "seconds"}``.
    """
    import cv2
    import numpy as np

    from pretrain.bench import sample_photos

    rng = np.random.default_rng(seed)
    # each photo once at a few scales, so that a crop costs a slice, not a resize of a full photo
    bases = []
    for photo in sample_photos():
        for short in (160, 256, 384):
            s = short / min(photo.shape[:2])
            bases.append(cv2.resize(photo, (max(96, round(photo.shape[1] * s)), max(96, round(photo.shape[0] * s))),
                                    interpolation=cv2.INTER_AREA))
    t0 = time.perf_counter()
    total = 0
    made: set[Path] = set()
    for i in range(n):
        p = file_path(root, i, per_folder)
        if p.parent not in made:
            p.parent.mkdir(parents=True, exist_ok=True)
            made.add(p.parent)
        img = bases[int(rng.integers(len(bases)))]
        h, w = int(rng.integers(48, 97)), int(rng.integers(48, 97))
        y, x = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
        crop = img[y:y + h, x:x + w]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        bgr = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2BGR)
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if p.suffix == ".png" else [cv2.IMWRITE_JPEG_QUALITY, 85]
        ok, buf = cv2.imencode(p.suffix, bgr, params)
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode {p.name}")
        data = buf.tobytes()
        with open(p, "wb") as f:
            f.write(data)
        total += len(data)
    return {"files": n, "folders": len(made), "bytes": total, "seconds": round(time.perf_counter() - t0, 2)}


def _child(src: str, out: str, workers: int) -> None:
    """One ingest run in this (fresh) process; prints its summary, phases and peak memory on one line."""
    import resource

    from pipelines.ingest import IngestJob, run_ingest

    base_mb = _current_rss_mb()  # after the imports: what the planning adds is measured from here
    cfg = IngestJob.model_validate({"cluster": {"workers": workers, "dashboard": False}})
    with _RssSampler() as sampler:
        summary = run_ingest(src, out, cfg)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    phases = summary["phases"]
    result = {"new_files": summary["new_files"], "files_seen": summary["files_seen"],
              "new_images": summary["new_images"], "new_rejected": summary["new_rejected"],
              "rejected_kinds": summary["rejected_kinds"], "total_images": summary["total_images"],
              "planning_s": round(sum(phases.get(k, 0.0) for k in PLANNING_PHASES), 3),
              "run_s": summary["seconds"], "phases": phases,
              "driver_start_rss_mb": base_mb, "driver_run_peak_rss_mb": sampler.peak_mb,
              "driver_peak_rss_mb": round(self_kb / 1024, 1),
              "children_peak_rss_mb": round(child_kb / 1024, 1)}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _current_rss_mb() -> float:
    """This process's resident memory now (MiB), from ``/proc/self/statm``; ``ru_maxrss`` is only the peak."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return float("nan")
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class _RssSampler:
    """The driver's peak resident memory while the run lasts, sampled every 10 ms by a thread (``ru_maxrss``
    also counts the start-up's imports)."""

    def __init__(self, every_s: float = 0.01):
        self.every_s = every_s
        self.peak_mb = _current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_mb = max(self.peak_mb, _current_rss_mb())

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _current_rss_mb())


def _run_child(src: Path, out: Path, workers: int) -> dict[str, Any]:
    code = "import sys; from pipelines.bench_ingest import _child; _child(sys.argv[1], sys.argv[2], int(sys.argv[3]))"
    load_before = os.getloadavg()[0]  # the machine may be shared: the load says how much
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), str(workers)], stdout=subprocess.PIPE,
                          text=True, check=False)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench ingest: the ingest run exited with code {proc.returncode} (its errors are above)")
    return {**json.loads(lines[-1][len(RESULT_PREFIX):]), "process_s": round(wall, 2),
            "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def _hardware() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version()}


def bench_ingest_files(n: int, out: str | os.PathLike[str], workers: int = 2, per_folder: int = 1000,
                       keep: bool = False) -> dict[str, Any]:
    """Create ``n`` files under ``out/src``, ingest them into ``out/store`` twice and report both runs.

    Args:
        n: Files to create.
        out: Scratch folder: its ``src`` and ``store`` are emptied first and removed at the end unless ``keep``.
        workers: Dask LocalCluster workers of the ingest runs.
        per_folder: Files per folder of the tree.
        keep: Keep the tree and the store.

    Returns:
        ``{"files", "tree", "workers", "hardware", "first", "refresh", "targets", "meets_targets"}``: each run
        with ``planning_s``, its ``phases`` (seconds), ``new_files`` and peak RSS in MiB.
    """
    if n < 1:
        raise UserError(f"bench ingest --files {n}: needs at least 1 file", fix="pass --files 200 or more")
    root = Path(out).resolve()
    src, store = root / "src", root / "store"
    for d in (src, store):  # only the bench's own folders: OUT may hold other things
        shutil.rmtree(d, ignore_errors=True)
    src.mkdir(parents=True)
    try:
        console.print(f"bench ingest: writing {n} small image files under {src} ({per_folder} per folder)")
        tree = make_tree(src, n, per_folder)
        console.print(f"bench ingest: first run ({workers} worker(s))")
        first = _run_child(src, store, workers)
        console.print("bench ingest: unchanged re-run (refresh)")
        again = _run_child(src, store, workers)
    finally:
        if not keep:
            for d in (src, store):
                shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):
                root.rmdir()  # only when empty
    peak = max(first["driver_peak_rss_mb"], again["driver_peak_rss_mb"])
    result = {"files": n, "tree": tree, "workers": workers, "hardware": _hardware(), "first": first,
              "refresh": again,
              "targets": {"files": TARGET_FILES, "planning_s": TARGET_PLANNING_S, "driver_peak_rss_mb": TARGET_PEAK_MB,
                          "note": "targets are for 200,000 files on 2 cores"
                          + ("" if n >= TARGET_FILES else f"; meets_targets is null: {n:,} files are too few to "
                             f"judge (--files {TARGET_FILES} or more)")},
              # judged only at the targets' scale: a smaller tree meets them trivially
              "meets_targets": (first["planning_s"] < TARGET_PLANNING_S and again["planning_s"] < TARGET_PLANNING_S
                                and peak < TARGET_PEAK_MB) if n >= TARGET_FILES else None,
              "kept": str(root) if keep else None}
    _print_table(result)
    return result


def _print_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"bench ingest --files {r['files']} ({r['workers']} worker(s))")
    for col in ("run", "new files", "discover s", "check s", "plan s", "planning s", "hash s", "whole run s",
                "driver peak MiB (run / process)"):
        t.add_column(col, justify="right")
    for name in ("first", "refresh"):
        x = r[name]
        ph = x["phases"]
        t.add_row(name, str(x["new_files"]), f"{ph.get('discover', 0):.2f}", f"{ph.get('check', 0):.2f}",
                  f"{ph.get('plan', 0):.2f}", f"{x['planning_s']:.2f}", f"{ph.get('hash', 0):.2f}",
                  f"{x['run_s']:.1f}", f"{x['driver_run_peak_rss_mb']:.0f} / {x['driver_peak_rss_mb']:.0f}")
    console.print(t)
