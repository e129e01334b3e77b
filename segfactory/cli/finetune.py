"""CLI glue of the fine-tuning stage: ``finetune``, ``evaluate``, ``predict``, ``export``, ``sweep`` and
``bench train``. Heavy imports (torch, smp) happen inside the handlers so ``segfactory --help`` stays fast.

Every command prints one JSON object on stdout (its summary) and human-readable output on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segfactory.cli.args import out_dir
from segfactory.cli.lazyhelp import Names
from segfactory.errors import PartialFailure, UserError


def _archs() -> list[str]:
    from finetune.archs import ARCHS

    return ARCHS.names()


def _tta_modes() -> tuple[str, ...]:
    from finetune.config import TTA_CHOICES

    return TTA_CHOICES


def _baselines() -> list[str]:
    from finetune.baselines import baseline_names

    return baseline_names()


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def _save_args(path: Path, args: dict[str, Any]) -> None:
    import yaml

    from segfactory.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump({k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()},
                                           sort_keys=False))


def _absolute(value: str | Path) -> str:
    """A path argument as the saved record holds it (:func:`segfactory.config.absolute_path`)."""
    from segfactory.config import absolute_path

    return str(absolute_path(value))


# ---------------------------------------------------------------------------------------------- finetune
def _unlabeled_store(value: str | Path, field: str) -> str:
    """An ``--unlabeled`` / ``data.unlabeled`` entry as an ingest store: ``sample:NAME/unlabeled`` is materialized
    and ingested once, with the default ingest config, next to the split in the sample cache (written under a
    temporary name and renamed when complete, so ranks and re-runs reuse it); other values are returned as given.

    Raises:
        UserError: a sample reference to another split than ``unlabeled`` (or to none).
    """
    import os

    from segfactory.sampledata import is_sample_ref, parse_ref, resolve_path

    if not is_sample_ref(str(value)):
        return str(value)
    name, split = parse_ref(str(value))
    if split != "unlabeled":
        raise UserError(f"{field} '{value}' is not the unlabeled split of sample set '{name}'",
                        fix=f"pass sample:{name}/unlabeled")
    from pipelines.ingest import IngestJob, run_ingest
    from segfactory.config import load_config
    from segfactory.io import canonical_hash, commit_dir, remove_tree

    folder = resolve_path(str(value))
    cfg = load_config(IngestJob, None, [], {"cluster.workers": 1})
    store = folder.parent / f"unlabeled-ingested-{canonical_hash(cfg.stage_config().model_dump(mode='json'), 8)}"
    if not store.is_dir():
        tmp = folder.parent / f".{store.name}.tmp-{os.getpid()}"
        remove_tree(tmp)
        try:
            run_ingest(str(folder), tmp, cfg)
            if not store.is_dir():  # another process (a rank) may have committed it meanwhile
                commit_dir(tmp, store)
        finally:
            remove_tree(tmp)
    return str(store)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from finetune.config import FinetuneConfig, apply_data_flags
    from finetune.train import run_finetune
    from segfactory.config import load_config

    # --synthetic/--real fill the config's entries before validation: an entry with a remap but no path takes its
    # folder from the flag
    cfg = load_config(FinetuneConfig, args.config, args.overrides,
                      paths={"data.synthetic": args.synthetic, "data.real": args.real})
    if args.encoder is not None:
        from segfactory.console import console
        from segfactory.formats.locate import resolve_encoder_dir

        enc_dir, note = resolve_encoder_dir(args.encoder)
        if note:
            console.print(note)
        args.encoder = str(enc_dir)
    cfg = apply_data_flags(cfg, args.encoder, args.arch, args.steps, args.unlabeled)
    if any(str(p).startswith("sample:") for p in cfg.data.unlabeled):
        field = "--unlabeled" if args.unlabeled else "data.unlabeled"
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
            "unlabeled": [Path(_unlabeled_store(p, f"{field}[{i}]")) for i, p in enumerate(cfg.data.unlabeled)]})})
    from finetune.evaluate import resolve_labeled_specs

    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "real": resolve_labeled_specs(cfg.data.real, "--real" if args.real else "data.real"),
        "val": resolve_labeled_specs(cfg.data.val, "data.val")})})
    from finetune.train import check_distributed, lock_run_dir
    from segfactory.distributed import launch_processes, relaunch_under_torchrun

    nproc = launch_processes(cfg.train, lambda n: check_distributed(cfg, n))
    if nproc > 1:  # this command again, as nproc ranks under torchrun; rank 0 prints the summary
        with lock_run_dir(Path(args.out)):  # held here: the ranks inherit it (segfactory.lock.HELD_LOCKS_ENV)
            return relaunch_under_torchrun(nproc, sys.argv[1:])
    from segfactory.cli.args import no_empty_out_on_user_error

    with no_empty_out_on_user_error(args.out):
        summary = run_finetune(cfg, args.out, resume=args.resume)
    if summary:  # ranks other than 0 return none
        _emit(summary)
    return 0


# ---------------------------------------------------------------------------------------------- evaluate
def _parse_remap(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for it in items or []:
        if "=" not in it:
            raise UserError(f"--remap '{it}' is not SOURCE=TARGET", fix="write e.g. --remap car=vehicle")
        k, v = (x.strip() for x in it.split("=", 1))
        if k in out and out[k] != v:
            raise UserError(f"--remap maps '{k}' twice: --remap {k}={out[k]} and --remap {k}={v}",
                            fix=f"keep one --remap for '{k}'")
        out[k] = v
    return out


def _resolve_model(args: argparse.Namespace) -> None:
    """``--model RUN``: use the run's ``model/`` (or a pipeline run's newest finetune stage) and say so."""
    from segfactory.console import console
    from segfactory.formats.locate import resolve_model_dir

    model_dir, note = resolve_model_dir(args.model)
    if note:
        console.print(note)
    args.model = str(model_dir)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from finetune.config import SourceSpec
    from finetune.evaluate import run_evaluate
    from segfactory.console import console

    _resolve_model(args)
    remap = _parse_remap(args.remap)
    specs = [SourceSpec(path=Path(d), remap=remap, on_unknown=args.on_unknown) for d in args.data]
    out = Path(args.out) if args.out else Path(args.model) / "eval"
    report = run_evaluate(args.model, specs, out, device=args.device, tile=args.tile, overlap=args.overlap,
                          batch_size=args.batch_size, baselines=args.baselines, overlays=args.overlays,
                          tta=args.tta, scale=args.scale, min_object=args.min_object)
    _save_args(out / "evaluate.yaml", {**{k: v for k, v in vars(args).items() if k != "func"},
                                       "model": _absolute(args.model), "data": [_absolute(d) for d in args.data],
                                       "out": _absolute(out), "tile": report["tile"], "overlap": report["overlap"],
                                       "batch_size": report["batch_size"]})
    from rich.table import Table

    table = Table(title=f"evaluation of {args.model}")
    for col in ("data", "kind", "mIoU", "pixel acc", *report["classes"]):
        table.add_column(col)

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    def row(name: str, kind: str, m: dict) -> None:
        table.add_row(name, kind, f(m["miou"]), f(m["pixel_accuracy"]),
                      *[f(m["per_class"][c]["iou"]) for c in report["classes"]])

    for name, m in report["sources"].items():
        row(name, m["kind"], m)
    for kind, m in report["by_kind"].items():
        row(f"all {kind}", kind, m)
    row("overall", "", report["overall"])
    console.print(table)
    summary = {"out": str(out), "miou": report["overall"]["miou"],
               "by_kind": {k: m["miou"] for k, m in report["by_kind"].items()},
               "sources": {k: m["miou"] for k, m in report["sources"].items()}}
    if "real" in report:
        console.print(real_table(report["real"]))
        for name, s in report["real"].items():
            if isinstance(s["baselines"], str):
                console.print(f"{name}: baselines {s['baselines']}", soft_wrap=True)
        summary["real"] = {name: {row: {"fg_iou": r["fg_iou"], "f1": _first_f1(r)} for row, r in s["rows"].items()}
                           for name, s in report["real"].items()}
    console.print(f"metrics and confusion matrices in {out}")
    summary |= {"model": args.model, "tta": args.tta, "input": report["input"]}
    _emit(summary)
    return 0


def _first_f1(row: dict) -> float | None:
    inst = row.get("instances") or {}
    return next(iter(inst.values()))["f1"] if inst else None


def real_table(real: dict):
    """A rich table of ``metrics.json``'s ``real`` section: one line per source and row (model, baselines)."""
    from rich.table import Table

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    table = Table(title="model vs classic baselines on real images (reference masks may be automatic: agreement)")
    for col in ("data", "row", "mIoU", "fg IoU", "F1@0.5", "matched IoU", "count err", "objects (true/pred)"):
        table.add_column(col)
    for name, s in real.items():
        for row, r in s["rows"].items():
            inst = next(iter(r["instances"].values()), None) if r["instances"] else None
            table.add_row(name, row, f(r["miou"]), f(r["fg_iou"]), f(inst and inst["f1"]),
                          f(inst and inst["mean_matched_iou"]), f(inst and inst["count_error"]),
                          f"{inst['n_gt']}/{inst['n_pred']}" if inst else "-")
    return table


# ---------------------------------------------------------------------------------------------- predict
def _cmd_predict(args: argparse.Namespace) -> int:
    from finetune.predict import run_predict
    from segfactory.console import console

    _resolve_model(args)
    failed: PartialFailure | None = None
    try:
        summary = run_predict(args.model, args.input, args.out, device=args.device, tile=args.tile,
                              overlap=args.overlap, batch_size=args.batch_size, overlays=not args.no_overlays,
                              tta=args.tta, scale=args.scale, instances=args.instances,
                              min_object=args.min_object)
    except PartialFailure as e:  # the rest are written: record the settings and print the summary, then exit 3
        if e.summary is None:
            raise
        failed, summary = e, e.summary
    summary["model"] = args.model
    _save_args(Path(args.out) / "predict.yaml", {**{k: v for k, v in vars(args).items() if k != "func"},
                                                 "model": _absolute(args.model), "input_path": _absolute(args.input),
                                                 "out": _absolute(args.out),
                                                 "tile": summary["tile"], "overlap": summary["overlap"],
                                                 "input": summary["input"]})
    console.print(f"{summary['images']} mask(s) in {args.out} ({summary['seconds']:.1f} s on {summary['device']})")
    if summary.get("stacks"):
        stacks = summary["stacks"]
        console.print(f"{len(stacks)} multi-page TIFF(s), {sum(stacks.values())} pages: every page predicted, as "
                      f"<stem>_p<N>.png", soft_wrap=True)
    _emit(summary)
    if failed is not None:
        raise failed
    return 0


# ---------------------------------------------------------------------------------------------- export
def _cmd_export(args: argparse.Namespace) -> int:
    from finetune.export import export_model_dir, export_onnx
    from segfactory.console import console
    from segfactory.formats.model import ONNX_FILE

    _resolve_model(args)  # a run directory stands for its model/, as for evaluate and predict
    model_dir = Path(args.model)
    result: dict[str, Any] = {"model_dir": str(model_dir)}
    info = None
    if args.out:  # the copy and its ONNX are committed together: a failed export leaves nothing
        model_dir, info = export_model_dir(args.model, args.out, onnx=args.onnx, opset=args.opset,
                                           atol=args.atol)
        result["model_dir"] = str(model_dir)
        console.print(f"model dir written to {model_dir}")
    elif not args.onnx:
        raise UserError("nothing to export", fix="pass --onnx and/or --out DIR")
    if args.onnx:
        if info is None:
            info = export_onnx(model_dir, model_dir / ONNX_FILE, opset=args.opset, atol=args.atol)
        console.print(f"ONNX written to {info['onnx']}; onnxruntime vs PyTorch max |diff| = "
                      f"{info['max_abs_diff']:.2e} (atol {args.atol}), argmax agreement "
                      f"{100 * info['argmax_agreement']:.3f} %")
        result["onnx"] = info
    _emit(result)
    return 0


# ---------------------------------------------------------------------------------------------- sweep
def _cmd_sweep(args: argparse.Namespace) -> int:
    from finetune.sweep import load_sweep_config, run_sweep

    cfg = load_sweep_config(args.config, args.overrides, synthetic=args.synthetic, real=args.real, test=args.test,
                            encoder=args.encoder, steps=args.steps)
    result = run_sweep(cfg, args.out)
    _emit({"out": str(args.out), "runs": len(result["rows"]), "table": str(Path(args.out) / "results.csv"),
           "plot": str(Path(args.out) / "label_efficiency.png"), "savings": result.get("savings")})
    return 0


# ---------------------------------------------------------------------------------------------- bench
def _cmd_bench_train(args: argparse.Namespace) -> int:
    from finetune.bench import run_bench

    _emit(run_bench(size=args.size, batch_sizes=args.batch_sizes, steps=args.steps, warmup=args.warmup,
                    arch=args.arch, encoder=args.encoder, device=args.device, data=args.data,
                    workers=args.workers, threads=args.threads, variants=args.variants))
    return 0


def register(commands: argparse._SubParsersAction, benches: argparse._SubParsersAction) -> None:
    """Add the fine-tuning sub-commands and the ``bench train`` entry."""
    p = commands.add_parser("finetune", help="train a segmentation model on synthetic + real data",
                            description="Fine-tune a segmentation model. --synthetic/--real replace the paths of "
                                        "the config's data entries in order (keeping their weights and remaps; "
                                        "an entry without a path, e.g. data.real: [{remap: {...}}], takes the "
                                        "flag's folder).")
    p.add_argument("config", help="YAML config (e.g. configs/finetune.yaml)")
    p.add_argument("--out", required=True, type=out_dir("--out", run=True), help="run directory")
    p.add_argument("--synthetic", action="append", metavar="DATASET", help="rendered dataset (repeatable)")
    p.add_argument("--real", action="append", metavar="DIR", help="labeled folder images/ + masks/, or "
                   "sample:NAME/labeled (a sample set's labeled training frames; see `segfactory samples list`) "
                   "(repeatable)")
    p.add_argument("--encoder", metavar="DIR", help="pretrained encoder dir (encoder.safetensors + encoder.json), "
                   "or a pretraining run holding one")
    p.add_argument("--unlabeled", action="append", metavar="IMAGES",
                   help="unlabeled real images for domain adaptation: a `segfactory ingest` output, or "
                        "sample:NAME/unlabeled (ingested once into the sample cache) (repeatable; replaces "
                        "data.unlabeled)")
    p.add_argument("--arch", help=Names("decoder architecture (model.arch): {names}", _archs))
    p.add_argument("--steps", type=int, help="total optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=_cmd_finetune, rerun="a re-run with --resume resumes")

    def inference_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--device", default="auto", help="auto, cpu or cuda")
        q.add_argument("--tile", type=int, help="tile side for large images (default: model.json)")
        q.add_argument("--overlap", type=int, help="tile overlap in pixels (default: model.json)")
        q.add_argument("--batch-size", type=int, help="tiles per forward pass (default: model.json)")
        q.add_argument("--tta", nargs="?", const="d4", default="none", metavar="MODE",
                       help=Names("test-time augmentation ({names}): average over flips (flip) or flips and "
                                  "quarter turns (d4, the default of a bare --tta), or over the whole image at "
                                  "0.5-1.75x its input scale (ms; ms_flip: and its horizontal flip; "
                                  "mmsegmentation's ratios, 6-12 passes)", _tta_modes))
        q.add_argument("--scale", help="resize real images by this factor before the model, or 'auto': each "
                       "image by its own estimate (models trained with input.scale=auto; default: model.json, "
                       "input.scale or, when its sources differ in magnification, auto)")
        q.add_argument("--min-object", type=float, metavar="SHARE",
                       help="speck cleanup: predicted components of a thing class under this share of the class's "
                            "object size in training take their next most probable class; 0 = off (default: "
                            "model.json cleanup.min_object, 0.25 for models trained on rendered objects)")

    e = commands.add_parser("evaluate", help="mIoU, per-class IoU, confusion matrices of a model dir; on real "
                            "folders also foreground IoU and instance F1 next to classic baselines",
                            description="Score a model dir on rendered datasets and real labeled folders (images/ + "
                                        "masks/). An image is one 2-D frame with one mask: a multi-page TIFF in "
                                        "images/ is refused (split the stack into one image per page, each with "
                                        "its mask; `segfactory predict` reads every page of a stack).")
    e.add_argument("--model", required=True, metavar="MODEL_DIR", help="model dir, or a run holding one")
    e.add_argument("--data", required=True, action="append", metavar="DIR",
                   help="rendered dataset or labeled folder, or sample:NAME/eval (see `segfactory samples list`); "
                        "repeatable, reported per source and per kind")
    e.add_argument("--out", type=out_dir("--out", run=True), help="report directory (default MODEL_DIR/eval)")
    e.add_argument("--remap", action="append", metavar="SRC=DST", help="map a data class onto a model class "
                   "(or 'ignore'); repeatable")
    e.add_argument("--on-unknown", choices=["error", "ignore"], default="error",
                   help="mask values outside the class map: error (default) or ignore")
    e.add_argument("--baselines", default="all", metavar="NAMES",
                   help=Names("classic baselines scored next to the model on real labeled folders "
                              "(foreground/background tasks): comma-separated names of {names}; 'all' (default: every "
                              "one but the opt-in people detector hog_people, which runs only when named, e.g. "
                              "all,hog_people) or 'none'", _baselines))
    e.add_argument("--overlays", type=int, default=4, metavar="N",
                   help="overlay PNGs (prediction, baselines and reference outlines) per real folder (default 4)")
    inference_flags(e)
    e.set_defaults(func=_cmd_evaluate)

    r = commands.add_parser("predict", help="write class-id masks and overlays for a folder of images",
                            description="Predict class-id masks (and overlays, instances) for every image of a "
                                        "folder, or one image file. A multi-page TIFF (z-slices, time points) is "
                                        "predicted page by page, as `segfactory ingest` takes a stack's slices: "
                                        "page N's mask is OUT/<stem>_p<N>.png (N zero-padded to the stack's length).")
    r.add_argument("--model", required=True, metavar="MODEL_DIR", help="model dir, or a run holding one")
    r.add_argument("--input", required=True, metavar="PATH", help="a folder of JPEG/PNG/TIFF images (8/16-bit, gray "
                   "or RGB; every page of a multi-page TIFF), one such image file, or sample:NAME/SPLIT (see "
                   "`segfactory samples list`; of eval and labeled: their images/)")
    r.add_argument("--out", required=True, type=out_dir("--out", run=True), metavar="DIR",
                   help="OUT/<stem>.png masks (OUT/<stem>_p<N>.png for page N of a TIFF stack), "
                        "OUT/overlays/<stem>.jpg")
    r.add_argument("--no-overlays", action="store_true", help="skip the overlay JPEGs")
    r.add_argument("--instances", choices=("auto", "on", "off"), default="auto",
                   help="OUT/instances/<stem>.png + OUT/instances.json (COCO): auto = when the model has an "
                        "instance head, on = require one (default auto)")
    inference_flags(r)
    r.set_defaults(func=_cmd_predict)

    x = commands.add_parser("export", help="self-contained model dir and/or ONNX (parity-checked)")
    x.add_argument("--model", required=True, metavar="MODEL_DIR")
    x.add_argument("--out", type=out_dir("--out", run=True), metavar="DIR",
                   help="write a copy of the model dir here (ONNX goes inside it)")
    x.add_argument("--onnx", action="store_true", help="write model.onnx and check it under onnxruntime")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset, 11 up to the newest the installed torch "
                   "exporter writes (default 17)")
    x.add_argument("--atol", type=float, default=1e-3, help="allowed max |logit difference| ONNX vs PyTorch")
    x.set_defaults(func=_cmd_export)

    s = commands.add_parser("sweep", help="label-efficiency sweep: real-label fraction x synthetic volume x "
                                          "encoder init at matched compute")
    s.add_argument("config", help="YAML sweep config (e.g. configs/finetune_sweep.yaml)")
    s.add_argument("--out", required=True, type=out_dir("--out"))
    s.add_argument("--synthetic", action="append", metavar="DATASET")
    s.add_argument("--real", action="append", metavar="DIR", help="real labeled training folder (or "
                   "sample:NAME/labeled)")
    s.add_argument("--test", action="append", metavar="DIR", help="held-out real labeled folder for the mIoU (or "
                   "sample:NAME/eval)")
    s.add_argument("--encoder", metavar="DIR", help="pretrained encoder for the 'ssl' init")
    s.add_argument("--steps", type=int, help="steps of every run (matched compute)")
    s.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. sweep.real_fractions=[0,0.5,1]")
    s.set_defaults(func=_cmd_sweep)

    b = benches.add_parser("train", help="training images/s: segfactory loop vs plain smp + CPU augmentation")
    b.add_argument("--size", type=int, default=512, help="crop side")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8], help="batch sizes measured, one row each")
    b.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    b.add_argument("--arch", default="unet", help=Names("decoder architecture: {names}", _archs))
    b.add_argument("--encoder", default="resnet18", help="timm encoder name")
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--data", metavar="DIR", help="labeled folder of real images (images/ + masks/; not a rendered "
                   "dataset) (default: a folder of scikit-image/scikit-learn/matplotlib sample photos)")
    b.add_argument("--workers", type=int, help="DataLoader workers for both pipelines (default: all cores but one, "
                   "at most 16)")
    b.add_argument("--variants", nargs="+", metavar="V",
                   help="segfactory settings to time against the baseline: default, fp32, fp16, bf16, "
                        "no-channels-last, compile (default: all on CUDA, 'default' on a CPU)")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    b.set_defaults(func=_cmd_bench_train)
