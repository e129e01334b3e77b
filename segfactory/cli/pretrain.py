"""Commands of the pretraining stage: ``ingest`` (a Dask pipeline), ``pretrain``, ``probe``, ``bench ingest`` /
``bench augment`` / ``bench loader``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segfactory.cli.args import no_empty_out_on_user_error, out_dir
from segfactory.cli.lazyhelp import Names


def _methods() -> list[str]:
    from pretrain.methods import METHODS

    return METHODS.names()


def _backbones() -> list[str]:
    from pretrain.backbones import BACKBONES

    return BACKBONES.names()


def register(commands: Any, benches: Any) -> None:
    p = commands.add_parser("ingest", help="validate, deduplicate and normalize a raw image dump into shards",
                            description="Ingest unlabeled images (JPEG, PNG 8/16-bit, TIFF stacks, WebP, BMP) for "
                            "pretraining. Bad files are reported in rejected.jsonl; re-running ingests only new files.")
    p.add_argument("src", help="folder (recursive), quoted glob ('dump/**/*.tif'), .txt file of paths, or "
                   "sample:NAME/unlabeled (segfactory samples list), or skimage:data (scikit-image's sample photos)")
    p.add_argument("--out", required=True, type=out_dir("--out"),
                   help="output directory (the --images of `segfactory pretrain`)")
    p.add_argument("--config", help="ingest config YAML (default: built-in defaults, see configs/ingest.yaml)")
    p.add_argument("--max-short-side", type=int, help="downscale so the short side is at most N px "
                   "(normalize.max_short_side; 0 keeps full size)")
    p.add_argument("--workers", type=int, help="local Dask worker processes (cluster.workers)")
    p.add_argument("--cluster-address", help="use an existing Dask scheduler (cluster.backend=address)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. files_per_shard=256")
    p.set_defaults(func=cmd_ingest)

    p = commands.add_parser("pretrain", help="self-supervised pretraining of an encoder on ingested images",
                            description=Names("Pretrain a timm encoder with a lightly method ({names}) and kornia "
                                              "augmentation on the training device; exports OUT/encoder/.", _methods))
    p.add_argument("config", help="pretrain config YAML (e.g. configs/pretrain.yaml)")
    p.add_argument("--images", required=True, help="output directory of `segfactory ingest`")
    p.add_argument("--out", required=True, type=out_dir("--out", run=True),
                   help="run directory (checkpoints, metrics, encoder/)")
    p.add_argument("--method", help=Names("SSL method (method.name): {names}", _methods))
    p.add_argument("--backbone", help=Names("backbone (backbone.name): {names}", _backbones))
    p.add_argument("--steps", type=int, help="optimizer steps (train.steps)")
    p.add_argument("--batch-size", type=int, help="images per micro-batch (train.batch_size)")
    # --resume is a plain flag: an optional value would swallow the key=value override after it
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    resume.add_argument("--resume-from", metavar="CKPT",
                        help="continue from checkpoint CKPT (a step_*.pt, e.g. of another run) into OUT")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop (with a checkpoint) after N steps of this run; --resume continues")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=2e-3")
    p.set_defaults(func=cmd_pretrain, rerun="a re-run with --resume resumes")

    p = commands.add_parser("probe", help="frozen-encoder dense linear probe: mIoU of an encoder vs random init",
                            description="Train a 1x1 conv on frozen encoder features of labeled frames, once per "
                            "probe seed (own split, random init, probe init), and print one JSON object: per-seed "
                            "mIoU of the encoder and of a random-init encoder of the same architecture, mean ± std, "
                            "the paired difference and a verdict ('within spread' or not).")
    p.add_argument("--encoder", required=True, help="encoder directory (OUT/encoder of `segfactory pretrain`), or "
                   "the run directory OUT itself (or a `segfactory run` directory: its pretrain stage's encoder)")
    p.add_argument("--data", required=True, help="labeled frames: a rendered dataset (`segfactory render` --out), a "
                   "real labeled folder (images/ + masks/, as fine-tuning reads) or sample:NAME/eval")
    p.add_argument("--steps", type=int, help="probe training steps (steps)")
    p.add_argument("--seeds", type=int, help="probe seeds, each with its own split and init (seeds)")
    p.add_argument("--config", help="probe config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. image_size=192")
    p.set_defaults(func=cmd_probe)

    p = benches.add_parser("ingest", help="ingest core vs a plain PIL open+convert+resize loop (images/s per core); "
                           "with --files N: ingest planning at scale (walk, stat, incremental check; time, memory)")
    p.add_argument("--images", type=int, default=200, help="640x480 JPEGs to generate from sample photos")
    p.add_argument("--short-side", type=int, default=224, help="target short side of both pipelines")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (best is reported)")
    p.add_argument("--files", type=int, help="planning at scale: create N small image files in a nested tree, "
                   "ingest them, ingest them again unchanged; report planning time and peak memory of both runs")
    p.add_argument("--out", default="runs/bench-ingest", type=out_dir("--out"),
                   help="--files: scratch folder (emptied first, removed at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="--files: keep the file tree and the store")
    p.add_argument("--workers", type=int, default=2, help="--files: Dask workers of the ingest runs")
    p.add_argument("--per-folder", type=int, default=1000, help="--files: files per folder of the tree")
    p.set_defaults(func=cmd_bench_ingest)

    p = benches.add_parser("augment", help="kornia batched views and torchvision v2 per-image views on the training "
                           "device vs lightly's per-sample torchvision transforms in a DataLoader; with --backbone, "
                           "the views' share of a pretraining step")
    p.add_argument("--method", default="simclr", help=Names("view spec of this method: {names}", _methods))
    p.add_argument("--images", type=int, default=256,
                   help="source images per pass (>= batch size x workers keeps every baseline worker busy)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch of views")
    p.add_argument("--crop-size", type=int, default=224, help="view side in pixels (augment.crop_size)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--workers", type=int, help="DataLoader workers for the baseline (default: all cores)")
    p.add_argument("--backbone", default="resnet18",
                   help=Names("backbone for the training-step share, or none to skip: {names}", _backbones))
    p.add_argument("--steps", type=int, default=3, help="timed training steps per view pipeline (median)")
    p.set_defaults(func=cmd_bench_augment)

    p = benches.add_parser("loader", help="pretraining loader images/s on an ingest store, without and with the "
                           "decoded-frame cache (data.cache_mb), and one image's CPU cost broken down")
    p.add_argument("--images", required=True, help="output of `segfactory ingest`")
    p.add_argument("--workers", type=int, help="DataLoader workers (default: CPU count - 1, at most 8); 1 worker "
                   "is always measured too")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (train.batch_size)")
    p.add_argument("--crop-size", type=int, default=224, help="augment.crop_size (load size: crop x 8/7)")
    p.add_argument("--batches", type=int, default=50, help="timed batches per row")
    p.add_argument("--cache-mb", type=float, default=512, help="data.cache_mb of the cached rows")
    p.add_argument("--order", default="random", choices=["random", "stream"], help="data.order")
    p.set_defaults(func=cmd_bench_loader)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipelines.ingest import IngestJob, resolve_source, run_ingest
    from segfactory.config import load_config

    extra: dict[str, Any] = {"cluster.workers": args.workers}
    overrides = list(args.overrides)
    if args.max_short_side is not None and args.max_short_side != 0:
        from pretrain.config import NormalizeConfig
        from segfactory.errors import UserError

        least = next(m.ge for m in NormalizeConfig.model_fields["max_short_side"].metadata if hasattr(m, "ge"))
        if args.max_short_side < least:
            raise UserError(f"--max-short-side {args.max_short_side} is too small: a downscaled short side is at "
                            f"least {least} px", fix=f"pass --max-short-side {least} or more, or 0 to keep full size")
    if args.max_short_side == 0:  # load_config skips None extras: "keep full size" goes in as an override
        overrides.append("normalize.max_short_side=null")
    elif args.max_short_side is not None:
        extra["normalize.max_short_side"] = args.max_short_side
    if args.cluster_address:
        extra |= {"cluster.backend": "address", "cluster.address": args.cluster_address}
    cfg = load_config(IngestJob, args.config, overrides, extra)
    summary = run_ingest(resolve_source(args.src), args.out, cfg)
    print(json.dumps(summary))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pretrain.config import PretrainConfig
    from pretrain.train import run_pretrain
    from segfactory.config import load_config

    extra = {"method.name": args.method, "backbone.name": args.backbone, "train.steps": args.steps,
             "train.batch_size": args.batch_size}
    cfg = load_config(PretrainConfig, args.config, args.overrides, extra)
    nproc = _launch_processes(cfg)
    if nproc > 1:  # this command again, as nproc ranks under torchrun; they print the summary (rank 0)
        from pretrain.train import lock_run_dir
        from segfactory.distributed import relaunch_under_torchrun

        with lock_run_dir(Path(args.out)):  # held here: the ranks inherit it (segfactory.lock.HELD_LOCKS_ENV)
            return relaunch_under_torchrun(nproc, sys.argv[1:])
    resume = args.resume_from if args.resume_from is not None else ("last" if args.resume else None)
    with no_empty_out_on_user_error(args.out):
        summary = run_pretrain(cfg, args.images, args.out, resume=resume, stop_after=args.stop_after)
    if summary:  # ranks other than 0 return none
        print(json.dumps(summary))
    return 0


def _launch_processes(cfg: Any) -> int:
    """How many torchrun processes this pretrain command starts (:func:`segfactory.distributed.launch_processes`)."""
    from pretrain.train import check_distributed
    from segfactory.distributed import launch_processes

    return launch_processes(cfg.train, lambda n: check_distributed(cfg, n))


def cmd_probe(args: argparse.Namespace) -> int:
    from pretrain.config import ProbeConfig
    from pretrain.probe import run_probe
    from segfactory.config import load_config
    from segfactory.sampledata import resolve_path

    cfg = load_config(ProbeConfig, args.config, args.overrides, {"steps": args.steps, "seeds": args.seeds})
    from segfactory.console import console
    from segfactory.formats.locate import resolve_encoder_dir  # a run dir stands for its encoder/, as for finetune

    enc_dir, note = resolve_encoder_dir(args.encoder)
    if note:
        console.print(note, soft_wrap=True)
    result = run_probe(enc_dir, resolve_path(args.data), cfg)
    print(json.dumps(result))
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    if args.files is not None:
        from pipelines.bench_ingest import bench_ingest_files

        print(json.dumps(bench_ingest_files(args.files, args.out, args.workers, args.per_folder, args.keep)))
        return 0
    from pretrain.bench import bench_ingest

    print(json.dumps(bench_ingest(args.images, args.short_side, args.repeats)))
    return 0


def cmd_bench_augment(args: argparse.Namespace) -> int:
    from pretrain.bench import bench_augment

    result = bench_augment(args.method, args.images, args.batch_size, args.crop_size, args.device, args.workers,
                           None if args.backbone == "none" else args.backbone, args.steps)
    print(json.dumps(result))
    return 0


def cmd_bench_loader(args: argparse.Namespace) -> int:
    from pretrain.bench import bench_loader

    print(json.dumps(bench_loader(args.images, args.workers, args.batch_size, args.crop_size, args.batches,
                                  args.cache_mb, args.order)))
    return 0
