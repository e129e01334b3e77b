"""Commands of the synthetic-data stage: ``render`` (a Dask pipeline), ``show``, ``coco``, ``stats`` and
``bench render``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segfactory.cli.args import out_dir
from segfactory.cli.lazyhelp import Names


def _families() -> list[str]:
    from scenes import families

    return families()


def register(commands: Any, benches: Any) -> None:
    p = commands.add_parser("render", help="render a labeled synthetic dataset (resumes an interrupted run)",
                            description=Names("Render procedural scenes with BlenderProc into dataset shards. Scene "
                                              "families (scene.family): {names}.", _families))
    p.add_argument("config", help="render config YAML (e.g. configs/street.yaml)")
    p.add_argument("--out", required=True, type=out_dir("--out"), help="dataset directory")
    p.add_argument("--scenes", type=int, help="number of scenes (dataset.scenes)")
    p.add_argument("--views", type=int, help="camera views per scene (render.views)")
    p.add_argument("--resolution", type=int, help="image size in pixels (render.resolution)")
    p.add_argument("--seed", type=int, help="base seed (dataset.seed)")
    p.add_argument("--workers", type=int, help="local Dask worker processes (cluster.workers)")
    p.add_argument("--cluster-address", help="use an existing Dask scheduler (cluster.backend=address)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. render.samples=64")
    p.set_defaults(func=cmd_render)

    p = commands.add_parser("show", help="write a contact sheet PNG (RGB | semantic | instances | depth), or with "
                                         "--beside rendered frames beside real images")
    p.add_argument("dataset")
    p.add_argument("--out", help="PNG or JPEG path, by its suffix (default: DATASET/contact_sheet.png, with --beside "
                                 "DATASET/rendered_vs_real.png)")
    p.add_argument("--frames", type=int, default=6, help="rows in the sheet (with --beside: tiles per row)")
    p.add_argument("--beside", action="append", metavar="REAL",
                   help="real images to show in a row below N rendered RGB frames: an image folder or "
                        "sample:NAME/SPLIT (e.g. sample:street/unlabeled); repeat for more rows. Tiles are centre "
                        "square crops, real images picked evenly through the sorted folder; an unreadable image "
                        "is left out with a one-line note")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="with --beside: leave out real files whose name matches (e.g. '*bus*'); repeatable")
    p.add_argument("--tile", type=int, default=192, help="with --beside: tile size in pixels")
    p.set_defaults(func=cmd_show)

    p = commands.add_parser(
        "coco", help="one COCO instances file for a whole dataset (merged from its shards, ids numbered afresh)",
        description="Merge the shards' coco.json into one COCO instances file (RLE masks of the thing classes) "
                    "with unique image and annotation ids; file_name is relative to the dataset, so a COCO loader "
                    "takes the dataset directory as its image root (detectron2: register_coco_instances(name, {}, "
                    "FILE, DATASET)). Prints one JSON line.")
    p.add_argument("dataset")
    p.add_argument("--out", help="the file to write (default: DATASET/coco.json)")
    p.set_defaults(func=cmd_coco)

    p = commands.add_parser("stats", help="print class pixel shares and instance counts")
    p.add_argument("dataset")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    p.set_defaults(func=cmd_stats)

    p = benches.add_parser("render", help="segfactory's render defaults vs a naive BlenderProc baseline")
    p.add_argument("--family", default="street", help=Names("scene family to render: {names}", _families))
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels (render.resolution) of both")
    p.add_argument("--scenes", type=int, default=2, help="scenes rendered by both (baseline: a process each)")
    p.add_argument("--views", type=int, default=1, help="views per scene")
    p.add_argument("--workers", default="1,2", help="worker counts for the pipeline scaling run ('' = skip)")
    p.add_argument("--scaling-scenes", type=int, default=4, help="scenes (1 view each) in the scaling run")
    p.add_argument("--scaling-resolution", type=int, default=256, help="image side in pixels in the scaling run")
    p.add_argument("--memory-scenes", type=int, default=50, help="scenes in one shard for the memory run (0 = skip)")
    p.add_argument("--out", default="runs/bench-render", type=out_dir("--out"), help="scratch directory")
    p.set_defaults(func=cmd_bench_render)


def cmd_render(args: argparse.Namespace) -> int:
    from pipelines.render import RenderJob, run_render
    from segfactory.config import load_config

    extra = {"dataset.scenes": args.scenes, "render.views": args.views, "render.resolution": args.resolution,
             "dataset.seed": args.seed, "cluster.workers": args.workers}
    if args.cluster_address:
        extra |= {"cluster.backend": "address", "cluster.address": args.cluster_address}
    job = load_config(RenderJob, args.config, args.overrides, extra)
    run_render(job, args.out, job.cluster)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from segfactory.console import console
    from segfactory.errors import UserError
    from segfactory.formats.dataset import hold_for_reading, open_dataset
    from synth.viz import contact_sheet, sheet_paths

    if args.out:
        sheet_paths(args.out)  # a name that is no picture format fails before any work
    if args.frames < 1:  # with or without --beside
        raise UserError(f"--frames must be at least 1, got {args.frames}", fix="pass --frames 6")
    hold_for_reading(args.dataset)  # before the listing: a refresh's prune deletes none of its shards meanwhile
    ds = open_dataset(args.dataset)
    if not ds.shard_ids:
        raise UserError(f"dataset '{args.dataset}' has no finished shards yet", fix="run `segfactory render` first")
    if args.beside:
        from segfactory.sampledata import resolve_path
        from synth.viz import beside_sheet

        if args.tile < 16:
            raise UserError(f"--tile must be at least 16 pixels, got {args.tile}", fix="pass --tile 192")
        real = [(ref, resolve_path(ref)) for ref in args.beside]
        path = beside_sheet(ds, real, args.out or ds.root / "rendered_vs_real.png", args.frames, args.tile,
                            args.exclude)
    else:
        if args.exclude:
            raise UserError("--exclude only applies with --beside", fix="add --beside REAL or drop --exclude")
        path = contact_sheet(ds, args.out or ds.root / "contact_sheet.png", args.frames)
    console.print(f"contact sheet: {path}")
    print(path)
    return 0


def cmd_coco(args: argparse.Namespace) -> int:
    from segfactory.console import console
    from segfactory.errors import UserError
    from segfactory.formats.coco import dataset_coco
    from segfactory.formats.dataset import hold_for_reading, open_dataset
    from segfactory.io import atomic_write_json

    hold_for_reading(args.dataset)  # before the listing: a refresh's prune deletes none of its shards meanwhile
    ds = open_dataset(args.dataset)
    if not ds.shard_ids:
        raise UserError(f"dataset '{args.dataset}' has no finished shards yet", fix="run `segfactory render` first")
    out = Path(args.out) if args.out else ds.root / "coco.json"
    doc = dataset_coco(ds, f"segfactory dataset {ds.root.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    cats = [c["name"] for c in doc["categories"]]
    console.print(f"COCO instances of {len(doc['images'])} images from {len(ds.shard_ids)} shard(s): "
                  f"{len(doc['annotations'])} annotations of {', '.join(cats) or 'no thing class'} -> {out} "
                  f"(image root: {ds.root})", soft_wrap=True)
    print(json.dumps({"coco": str(out), "image_root": str(ds.root), "images": len(doc["images"]),
                      "annotations": len(doc["annotations"]), "categories": cats, "shards": len(ds.shard_ids)}))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from rich.table import Table

    from segfactory.console import console
    from segfactory.formats.dataset import hold_for_reading, open_dataset
    from synth.viz import dataset_stats

    hold_for_reading(args.dataset)  # before the listing: a refresh's prune deletes none of its shards meanwhile
    stats = dataset_stats(open_dataset(args.dataset))
    if args.json:
        json.dump(stats, sys.stdout, indent=2)
        print()
        return 0
    table = Table(title=f"{args.dataset}: {stats['frames']} frames in {stats['shards']} shard(s)")
    for col in ("id", "class", "pixels %", "instances", "mean inst. area px"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for r in stats["classes"]:
        table.add_row(str(r["id"]), r["name"], f"{100 * r['pixel_share']:.2f}",
                      "-" if r["instances"] is None else str(r["instances"]),
                      "-" if r["mean_instance_area_px"] is None else f"{r['mean_instance_area_px']:.0f}")
    console.print(table)
    console.print(f"ignore (255): {100 * stats['ignore_share']:.3f} % of pixels")
    return 0


def cmd_bench_render(args: argparse.Namespace) -> int:
    from pipelines.bench_render import run_bench

    result = run_bench(args)
    print(json.dumps(result))
    return 0
