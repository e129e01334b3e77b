"""Commands of the pipelines: ``run`` (end to end), ``refresh`` (incremental dataset refresh), ``bench pipeline``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from segfactory.cli.args import out_dir

TRANSFER_CONFIG = "configs/bench_transfer.yaml"


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, help="local Dask worker processes (cluster.workers)")
    p.add_argument("--cluster-address", help="use an existing Dask scheduler (cluster.backend=address)")


def _cluster_extra(args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {"cluster.workers": args.workers}
    if args.cluster_address:
        extra |= {"cluster.backend": "address", "cluster.address": args.cluster_address}
    return extra


def register(commands: Any, benches: Any) -> None:
    p = commands.add_parser(
        "run", help="end to end: render, ingest, pretrain, fine-tune, evaluate, predict, HTML report (cached)",
        description="Run every stage as Dask work; a stage whose config, inputs and code are unchanged is skipped.")
    p.add_argument("config", help="run config YAML (e.g. configs/quickstart.yaml)")
    p.add_argument("--out", required=True, type=out_dir("--out"), help="run directory (stages/, report.html, run.json)")
    _cluster_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.train.steps=100")
    p.set_defaults(func=cmd_run)

    p = commands.add_parser(
        "refresh", help="incremental dataset refresh: render missing shards, ingest new images, publish a release",
        description="Render only missing shards, ingest only new raw images, publish ROOT/releases/<seq>-<ts>.json, "
                    "move ROOT/releases/latest, prune old releases. Nothing changed since the latest release (the "
                    "same shards, real images and model): no release is published (releases.publish_unchanged=true "
                    "publishes one anyway); ROOT/last_refresh.json records every finished refresh. A second refresh "
                    "of the same ROOT exits with code 4.")
    p.add_argument("config", help="refresh config YAML (e.g. configs/refresh.yaml)")
    p.add_argument("--root", required=True, type=out_dir("--root"), help="refresh root (datasets/, real/, releases/)")
    p.add_argument("--keep", type=int, help="releases kept (releases.keep)")
    _cluster_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. render.dataset.scenes=64")
    p.set_defaults(func=cmd_refresh)

    p = commands.add_parser(
        "verify", help="re-hash every committed shard, stage and release file against its manifest",
        description="Check a dataset, ingest output, run directory or refresh root: every file of every committed "
                    "unit against the sha256 its manifest (or stage.json) recorded. Exit code 3 lists the bad units; "
                    "--repair moves them aside so that re-running the command that made them rebuilds them.")
    p.add_argument("dir", help="dataset, ingest output, run directory or refresh root")
    p.add_argument("--repair", action="store_true",
                   help="move corrupt units aside (.bad-*) so a re-run of render/ingest/run/refresh rebuilds them")
    p.set_defaults(func=cmd_verify)

    p = benches.add_parser("pipeline", help="render frames/min through Dask with 1 and 2 workers, scheduling overhead")
    p.add_argument("--workers", default="1,2", help="worker counts to measure")
    p.add_argument("--scenes", type=int, default=8, help="scenes (1 view each, 1 scene per shard)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (render.resolution)")
    p.add_argument("--cluster-address", help="measure on an existing scheduler instead of LocalClusters")
    p.add_argument("--out", default="runs/bench-pipeline", type=out_dir("--out"), help="scratch directory")
    p.set_defaults(func=cmd_bench_pipeline)

    p = benches.add_parser(
        "transfer", help="what each part of the recipe buys on real labeled images with zero real labels: "
        "classic baselines, synthetic only, + SSL, + self-training, + alignment, + scale, all",
        description="One `segfactory run` per row in one directory (shared render, ingest and pretraining), each "
                    "scored on eval.real next to the classic baselines. One JSON object on stdout.")
    p.add_argument("config", nargs="?", default=TRANSFER_CONFIG,
                   help="bench config: a run config plus `rows` (default: configs/bench_transfer.yaml, CPU-sized; "
                        "configs/bench_transfer_gpu.yaml for a GPU)")
    p.add_argument("--out", default="runs/bench-transfer", type=out_dir("--out"),
                   help="run directory (re-running reuses finished stages)")
    p.add_argument("--rows", help="comma-separated rows (synthetic, ssl, selftrain, align, scale, all)")
    _cluster_flags(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. finetune.train.steps=300")
    p.set_defaults(func=cmd_bench_transfer)


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import RunConfig, run_all
    from segfactory.config import load_config

    cfg = load_config(RunConfig, args.config, args.overrides, _cluster_extra(args))
    print(json.dumps(run_all(cfg, args.out)))
    return 0


def cmd_refresh(args: argparse.Namespace) -> int:
    from pipelines.refresh import RefreshConfig, run_refresh
    from segfactory.config import load_config

    cfg = load_config(RefreshConfig, args.config, args.overrides, {**_cluster_extra(args), "releases.keep": args.keep})
    release = run_refresh(cfg, args.root)
    print(json.dumps({"release": release["release"], "published": release["published"],
                      "shards": len(release["shards"]), "frames": release["num_frames"],
                      "inputs_changed": release["inputs_changed"]}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipelines.verify import run_verify
    from segfactory.errors import PartialFailure

    report = run_verify(args.dir, repair=args.repair)
    print(json.dumps(report.as_json()))
    if report.problems:
        what = "moved aside; re-run the command that made them to rebuild them" if args.repair else \
            "run `segfactory verify --repair` to move them aside, then re-run the command that made them"
        raise PartialFailure(f"{len(report.problems)} unit(s) are missing or corrupt ({what})",
                             {unit: "; ".join(p) for unit, p in report.problems.items()})
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from pipelines.bench import run_bench

    print(json.dumps(run_bench(args)))
    return 0


def cmd_bench_transfer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipelines.bench_transfer import run_bench

    if "=" in args.config and not Path(args.config).exists():  # no config given: its first override took its place
        args.overrides = [args.config, *args.overrides]
        args.config = TRANSFER_CONFIG

    print(json.dumps(run_bench(args)))
    return 0
