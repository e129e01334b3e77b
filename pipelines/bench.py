"""``segfactory bench pipeline``: render throughput through Dask with 1 and 2 workers, and Dask's scheduling
overhead as a share of task time (target: under 2 %).

Overhead is measured from the scheduler's task stream: on each worker, the idle gaps between one render task
ending and the next starting (while tasks were still queued) are time Dask spent scheduling, shipping results
and dispatching; their sum is divided by the summed compute time of the tasks.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from segfactory.console import console

TARGET_OVERHEAD = 0.02


def overhead_from_stream(stream: list[dict[str, Any]]) -> dict[str, float]:
    """Per-worker inter-task gaps vs compute time from ``get_task_stream`` records (render tasks only)."""
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for t in stream:
        if not str(t.get("key", "")).startswith("render-"):
            continue
        for s in t.get("startstops", ()):
            if s.get("action") == "compute":
                by_worker.setdefault(t["worker"], []).append((s["start"], s["stop"]))
    compute = gaps = 0.0
    for spans in by_worker.values():
        spans.sort()
        compute += sum(b - a for a, b in spans)
        gaps += sum(max(0.0, spans[i + 1][0] - spans[i][1]) for i in range(len(spans) - 1))
    return {"task_compute_s": round(compute, 3), "scheduling_gaps_s": round(gaps, 4),
            "overhead_share": gaps / compute if compute else 0.0, "tasks": sum(len(v) for v in by_worker.values())}


def measure(workers: int | None, address: str | None, scenes: int, resolution: int, out: Path) -> dict[str, Any]:
    from distributed import Client, LocalCluster, get_task_stream

    from pipelines.render import RenderJob, run_render

    shutil.rmtree(out, ignore_errors=True)
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None)
        address = cluster.scheduler_address
    cfg = RenderJob.model_validate({
        "scene": {"family": "street"}, "render": {"resolution": resolution, "views": 1, "samples": 8},
        "dataset": {"scenes": scenes, "scenes_per_shard": 1},
        "cluster": {"backend": "address", "address": address}})
    try:
        with Client(address) as client:
            n = len(client.scheduler_info()["workers"])
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                summary = run_render(cfg, out, cfg.cluster)
                wall = time.perf_counter() - t0
            stream = list(ts.data)
    finally:
        if cluster is not None:
            cluster.close()
    return {"workers": n, "frames": summary["frames_total"], "seconds": round(wall, 2),
            "frames_per_min": round(60 * summary["frames_total"] / wall, 2), **overhead_from_stream(stream)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from rich.table import Table

    out = Path(args.out)
    rows = []
    counts = [None] if args.cluster_address else [int(w) for w in str(args.workers).split(",") if w.strip()]
    for n in counts:
        console.print(f"bench pipeline: {args.scenes} scenes at {args.resolution} px with "
                      f"{n or 'all'} worker(s)")
        rows.append(measure(n, args.cluster_address, args.scenes, args.resolution, out / f"w{n or 'addr'}"))
    t = Table(title="bench pipeline (render through Dask)")
    for col in ("workers", "frames", "seconds", "frames/min", "task compute s", "sched. gaps s", "overhead %"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(str(r["workers"]), str(r["frames"]), f"{r['seconds']:.1f}", f"{r['frames_per_min']:.1f}",
                  f"{r['task_compute_s']:.1f}", f"{r['scheduling_gaps_s']:.3f}", f"{100 * r['overhead_share']:.2f}")
    console.print(t)
    worst = max((r["overhead_share"] for r in rows), default=0.0)
    console.print(f"scheduling overhead {100 * worst:.2f}% of task time (target < {100 * TARGET_OVERHEAD:.0f}%)")
    result: dict[str, Any] = {"runs": rows, "max_overhead_share": worst, "target_overhead_share": TARGET_OVERHEAD}
    if len(rows) >= 2 and rows[0]["frames_per_min"]:
        result["speedup"] = round(rows[-1]["frames_per_min"] / rows[0]["frames_per_min"], 2)
    return result
