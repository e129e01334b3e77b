"""``segfactory bench transfer``: what each part of the recipe buys on real images, with zero real labels.

One run of the ``segfactory run`` pipeline per row, all in one output directory, so the rows share what they have
in common (the rendered dataset, the ingested real images, the SSL encoder) and differ only in the fine-tuning
they name. Every row trains for the same steps from the same seeds on the same synthetic labels, and is scored on
the same real labeled frames next to the classic baselines (which do not depend on the row):

=============  ====================================================================================
row            fine-tuning
=============  ====================================================================================
synthetic      random encoder, synthetic labels only, no adaptation
ssl            + the encoder pretrained (SSL) on the real unlabeled images
selftrain      + self-training on the real unlabeled images (EMA teacher, pseudo-labels, ClassMix)
align          + appearance alignment (histogram matching of synthetic crops to real ones)
scale          + an input scale estimated from the real unlabeled images (``input.scale: auto``)
all            everything above together (the shipped recipe, plus the scale)
=============  ====================================================================================

Each row but ``all`` adds one part to ``synthetic``. Prints one JSON object on stdout and a table on stderr; the
runs stay in ``--out`` (re-running reuses every finished stage).

Label efficiency (``label_efficiency``): for every k of ``label_efficiency.k`` (default 1, 5, 20) and every
encoder init of ``label_efficiency.inits``, a row ``real<k>-<init>`` fine-tunes, with the same steps and seeds,
on k real labeled images *of each* ``eval.real`` set (real labels only by default; with
``label_efficiency.synthetic: true`` next to the synthetic labels). Inits: ``random``, ``ssl`` (the run's
SSL encoder, pretrained on the real unlabeled images) and ``supsyn`` (the encoder of the ``synthetic`` row's
model: supervised on the rendered frames with their labels, exported as an encoder directory by
:func:`finetune.export.export_encoder`). The k images come from frames the eval never scores: for a built-in
sample set, time points of its ``labeled`` split that lie at least ``label_efficiency.gap`` time points before
the first eval frame (the sets ship one time-lapse each, so another sequence is not available); for a folder, the
labeled folder ``label_efficiency.pools`` names for it (checked to share no image with the eval folder). Which
images: a permutation of the candidates drawn from ``label_efficiency.seed`` (:func:`segfactory.seeds.
label_frames_rng`), the first k (so smaller k are subsets of larger ones), recorded in the JSON. These rows keep
their final weights (``train.keep_best: false``) and use every labeled image for training (``data.val_fraction:
0``): no labels are spent on model selection.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pipelines.run import RunConfig
from segfactory.config import StrictModel
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import atomic_write_json
from segfactory.registry import Registry

# Row name -> (init, fine-tune overrides) on top of the config's `finetune` section with every adaptation off.
ROWS: Registry[tuple[str, dict[str, Any]]] = Registry("transfer row")
_OFF = {"adapt": {"enabled": False, "hist_match_p": 0.0, "fda_beta": 0.0, "recalibrate_bn": 0},
        "input": {"scale": 1.0}}
ROWS.register("synthetic")(("random", {}))
ROWS.register("ssl")(("ssl", {}))
ROWS.register("selftrain")(("random", {"adapt": {"enabled": True}}))
ROWS.register("align")(("random", {"adapt": {"hist_match_p": 0.5}}))
ROWS.register("scale")(("random", {"input": {"scale": "auto"}}))
ROWS.register("all")(("ssl", {"adapt": {"enabled": True, "hist_match_p": 0.5}, "input": {"scale": "auto"}}))
ROW_ORDER = ["synthetic", "ssl", "selftrain", "align", "scale", "all"]


INITS = ("random", "ssl", "supsyn")


class LabelEfficiency(StrictModel):
    """``label_efficiency``: rows that fine-tune on k real labeled images per ``eval.real`` set (module docstring)."""

    k: list[int] = Field(default_factory=lambda: [1, 5, 20], description="real labeled images per eval.real set, "
                         "one row per value and init (empty: no label-efficiency rows)")
    inits: list[Literal["random", "ssl", "supsyn"]] = Field(
        default_factory=lambda: list(INITS), description="encoder inits: random, ssl (the run's SSL encoder), supsyn "
        "(the synthetic row's encoder: supervised on the rendered frames)")
    synthetic: bool = Field(False, description="also train on the synthetic labels (false: the k real images only)")
    real_share: float = Field(0.5, gt=0, lt=1, description="with synthetic: true, the share of every batch drawn "
                              "from the real images")
    seed: int = Field(0, ge=0, description="which real images are labeled (a permutation of the candidates)")
    gap: int = Field(6, ge=2, description="sample sets: time points left out between the last training frame and "
                     "the first eval frame (neighbouring frames of a time-lapse look alike)")
    pools: dict[str, str] = Field(default_factory=dict, description="eval.real entry -> labeled folder the k images "
                                  "are drawn from (needed for folders; sample sets use their labeled split)")

    @field_validator("k")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every k must be >= 1 (k = 0 is the synthetic and ssl rows)")
        return sorted(set(v))

    @field_validator("inits")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class TransferBenchConfig(RunConfig):
    """``segfactory bench transfer CONFIG``: a run config (``eval.real`` required) plus the rows to compare."""

    rows: list[str] = Field(default_factory=lambda: list(ROW_ORDER), description="rows to run, in order")
    label_efficiency: LabelEfficiency = Field(default_factory=LabelEfficiency)

    @field_validator("rows")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in ROWS:
                raise ValueError(ROWS.unknown_message(name) + f" (rows: {', '.join(ROW_ORDER)})")
        if not v:
            raise ValueError("needs at least one row")
        return list(dict.fromkeys(v))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def row_config(cfg: TransferBenchConfig, row: str) -> RunConfig:
    """The run config of one row: the bench config's run, its fine-tuning with every adaptation off, plus the
    row's parts."""
    init, parts = ROWS.get(row)
    data = cfg.model_dump(mode="json", exclude={"rows", "label_efficiency"})
    data["finetune"] = _merge(_merge(data["finetune"], _OFF), parts)
    data["finetune"]["data"]["unlabeled"] = []  # the run passes its own real images
    data["init"] = init
    return RunConfig.model_validate(data)


def label_rows(cfg: TransferBenchConfig) -> list[tuple[str, int, str]]:
    """The label-efficiency rows as ``(name, k, init)``, by k then init."""
    return [(f"real{k}-{init}", k, init) for k in cfg.label_efficiency.k for init in cfg.label_efficiency.inits]


def label_row_config(cfg: TransferBenchConfig, k: int, init: str, folders: list[Path],
                     encoder: Path | None = None) -> RunConfig:
    """The run config of a label-efficiency row: the ``synthetic`` row (``ssl`` for the ssl init) with the k-image
    real folders as ``finetune.data.real``, every labeled image for training and the final weights kept.

    Args:
        folders: One labeled folder of k images per ``eval.real`` set (:func:`write_label_folder`).
        encoder: The supsyn encoder directory (init ``supsyn`` only).
    """
    le = cfg.label_efficiency
    data = row_config(cfg, "ssl" if init == "ssl" else "synthetic").model_dump(mode="json")
    ft = data["finetune"]
    share = le.real_share / (1 - le.real_share) / len(folders) if le.synthetic else 1.0
    ft["data"]["real"] = [{"path": str(f), "weight": share} for f in folders]
    if not le.synthetic:
        # The run passes its rendered dataset as --synthetic, which takes this entry's place and keeps fraction 0:
        # the classes still come from it, its frames are never trained on.
        ft["data"]["synthetic"] = [{"path": "rendered-dataset", "fraction": 0.0}]
    ft["data"]["val_fraction"] = 0.0
    ft["train"]["keep_best"] = False
    if init == "supsyn":
        if encoder is None:
            raise ValueError("init supsyn needs the encoder directory")
        ft["model"]["encoder_dir"] = str(encoder)  # init random: no pretrain stage, the fine-tune loads this one
    return RunConfig.model_validate(data)


def _set_name(entry: str) -> str:
    from segfactory.sampledata import is_sample_ref, parse_ref

    return parse_ref(entry)[0] if is_sample_ref(entry) else Path(entry).name


def label_candidates(entry: str, le: LabelEfficiency) -> tuple[Path, list[dict[str, Any]], list[int] | None]:
    """Where the k images of one ``eval.real`` entry come from.

    Returns:
        ``(labeled folder, candidate frames [{"stem", "t", "z"}], eval time points or None for folders)``.

    Raises:
        UserError: a folder entry without ``label_efficiency.pools`` entry, a pool sharing an image with the eval
            folder, or no candidates.
    """
    from segfactory.formats.imagefile import IMAGE_SUFFIXES
    from segfactory.io import sha256_file
    from segfactory.sampledata import EVAL_FRAMES, LABELED, is_sample_ref, materialize, parse_ref, read_manifest

    if is_sample_ref(entry):
        name, _ = parse_ref(entry)
        pool = materialize(name, LABELED)[LABELED]
        eval_dir = materialize(name, "eval")["eval"]
        eval_t = sorted({int(f["t"]) for f in (read_manifest(eval_dir) or {})["frames"]})
        last = min(eval_t, default=EVAL_FRAMES[0]) - le.gap - 1
        frames = [{"stem": f["stem"], "t": f["t"], "z": f["z"]} for f in (read_manifest(pool) or {})["frames"]
                  if int(f["t"]) <= last]
        if not frames:
            raise UserError(f"label_efficiency.gap={le.gap} leaves no training frame of '{entry}' (its eval frames "
                            f"start at t={min(eval_t)})", fix="lower label_efficiency.gap")
        return pool, frames, eval_t
    if entry not in le.pools:
        raise UserError(f"label_efficiency: eval.real entry '{entry}' is a folder; the bench cannot tell which other "
                        "frames are safe to label", fix=f"set label_efficiency.pools={{{entry}: LABELED_FOLDER}} "
                        "(frames far from the eval frames), or label_efficiency.k=[]")
    pool = Path(le.pools[entry]).resolve()

    def images(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted((d / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
                and not p.name.startswith(".")} if (d / "images").is_dir() else {}

    found = images(pool)
    if not found:
        raise UserError(f"label_efficiency.pools['{entry}']='{pool}' has no images/", fix="point it at a labeled "
                        "folder (images/ + masks/)")
    from segfactory.sampledata import resolve_path

    shared = {sha256_file(p) for p in images(resolve_path(entry).resolve()).values()} & \
        {sha256_file(p) for p in found.values()}
    if shared:
        raise UserError(f"label_efficiency.pools['{entry}']='{pool}' holds {len(shared)} image(s) of the eval folder",
                        fix="label frames the eval never scores")
    return pool, [{"stem": stem, "t": None, "z": None} for stem in found], None


def pick_frames(candidates: list[dict[str, Any]], k: int, seed: int, set_name: str) -> list[dict[str, Any]]:
    """The first ``k`` of a seeded permutation of the candidates (sorted by stem first): nested over k."""
    from segfactory.io import canonical_hash
    from segfactory.seeds import label_frames_rng

    ordered = sorted(candidates, key=lambda f: f["stem"])
    perm = label_frames_rng(seed, int(canonical_hash(set_name, 8), 16)).permutation(len(ordered))
    return [ordered[i] for i in perm[:k]]


def write_label_folder(out: Path, set_name: str, pool: Path, frames: list[dict[str, Any]]) -> Path:
    """A labeled folder holding exactly ``frames`` of ``pool`` (images, masks, instances, classes.json) and
    ``selection.json``; named by a hash of its content's origin, reused when it exists."""
    from segfactory.io import atomic_write_json, canonical_hash, commit_dir
    from segfactory.sampledata import read_manifest

    stems = [f["stem"] for f in frames]
    origin = {"pool": str(pool), "pool_key": (read_manifest(pool) or {}).get("key"), "stems": stems}
    final = out / "labels" / f"{set_name}-{len(stems)}-{canonical_hash(origin, 10)}"
    if (final / "selection.json").is_file():
        return final
    tmp = out / "labels" / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for sub in ("images", "masks", "instances"):
        for stem in stems:
            src = next((p for p in sorted((pool / sub).glob(f"{stem}.*")) if p.stem == stem), None) \
                if (pool / sub).is_dir() else None
            if src is not None:
                (tmp / sub).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, tmp / sub / src.name)
    if (pool / "classes.json").is_file():
        shutil.copyfile(pool / "classes.json", tmp / "classes.json")
    atomic_write_json(tmp / "selection.json", {**origin, "frames": frames})
    try:
        commit_dir(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "selection.json").is_file():
            raise
    return final


def supsyn_encoder(out: Path, model_dir: Path) -> Path:
    """The ``supsyn`` init: the encoder of ``model_dir`` (the synthetic row's fine-tuned model) as an encoder
    directory, in stage ``OUT/stages/supsyn-<key of the model's stage>`` (reused when committed)."""
    from finetune.export import export_encoder
    from pipelines.stages import FINETUNE_PACKAGES, commit_stage, stage_dir, stage_done
    from segfactory.io import new_attempt_dir

    final = stage_dir(out, "supsyn", {"model": model_dir.parent.name}, FINETUNE_PACKAGES)
    if not stage_done(final):
        attempt = new_attempt_dir(final.parent, final.name)
        export_encoder(model_dir, attempt / "encoder")
        commit_stage(attempt, final, {"model": str(model_dir)})
    return final / "encoder"


def _hardware() -> dict[str, Any]:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu}


def check_rows(cfg: TransferBenchConfig) -> None:
    """Check every row's run config (:func:`pipelines.run.check_run_config`) and the label-efficiency pools before
    the first row runs: a later row's mistake would otherwise stop the bench after the earlier rows had trained.
    The label-efficiency rows are checked through the rows they extend (``synthetic``, ``ssl``); their k-image
    folders are written later.

    Raises:
        UserError: the first problem, naming its row.
    """
    from pipelines.run import check_run_config

    le = cfg.label_efficiency
    bases = [("ssl" if init == "ssl" else "synthetic") for init in le.inits] if le.k else []
    for row in dict.fromkeys([*cfg.rows, *bases]):
        try:
            check_run_config(row_config(cfg, row))
        except UserError as e:
            raise UserError(f"bench transfer row {row}: {e.message}", fix=e.fix) from None
    if le.k and le.inits:
        for entry in cfg.eval.real:
            label_candidates(entry, le)


def run_transfer_bench(cfg: TransferBenchConfig, out: str | os.PathLike) -> dict[str, Any]:
    """Run every row (see the module docstring) and collect their real-image scores.

    Returns:
        ``{"hardware", "config", "seeds", "steps", "baselines": {set: {name: scores}}, "rows": {row: {"seconds",
        "sets": {set: scores}}}, "total_s"}``; scores are ``fg_iou``, ``f1`` (instance F1 at IoU 0.5 of the
        class map's connected components), ``f1_watershed`` (of the instance head's watershed, for a model with
        ``finetune.instances``) and ``miou``.
    """
    from pipelines.run import run_all

    if not cfg.eval.real:
        raise UserError("bench transfer: eval.real is empty; the bench scores real labeled images",
                        fix="set eval.real=[sample:ctc-hela/eval, ...] or folders of images/ + masks/")
    check_rows(cfg)
    out = Path(out).resolve()
    t0 = time.perf_counter()
    result: dict[str, Any] = {"hardware": _hardware(), "out": str(out),
                              "seeds": {"render": cfg.render.dataset.seed, "train": cfg.finetune.train.seed,
                                        "pretrain": cfg.pretrain.train.seed},
                              "steps": cfg.finetune.train.steps, "eval": list(cfg.eval.real), "tta": cfg.eval.tta,
                              "rows": {}, "baselines": {}}
    def record(row: str, rcfg: RunConfig, t_row: float, **extra: Any) -> dict[str, Any]:
        summary = run_all(rcfg, out)
        sets = {}
        for name, rows in summary.get("real", {}).items():
            model = rows["model"]
            sets[name] = {"fg_iou": model["fg_iou"], "f1": model["f1"]}
            if "model_watershed" in rows:  # the instance head's objects (finetune.instances), next to the CC ones
                sets[name]["f1_watershed"] = rows["model_watershed"]["f1"]
            for b, scores in rows.items():
                if b not in ("model", "model_watershed"):
                    result["baselines"].setdefault(name, {})[b] = {"fg_iou": scores["fg_iou"], "f1": scores["f1"]}
        result["rows"][row] = {"seconds": round(time.perf_counter() - t_row, 1), "sets": sets,
                               "synthetic_miou": summary["miou"],
                               "finetune_dir": summary.get("dirs", {}).get("finetune"), **extra}
        atomic_write_json(out / "bench_transfer.json", result)  # partial results survive an interruption
        return summary

    for row in cfg.rows:
        console.rule(f"[bold]bench transfer: row {row}[/]")
        record(row, row_config(cfg, row), time.perf_counter())
    if cfg.label_efficiency.k and cfg.label_efficiency.inits:
        _label_efficiency(cfg, out, result, record)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "bench_transfer.json", result)
    _print_table(result)
    return result


def _label_efficiency(cfg: TransferBenchConfig, out: Path, result: dict[str, Any], record: Any) -> None:
    """Run the label-efficiency rows (module docstring) through ``record(row, run config, t0, **extra)``."""
    le = cfg.label_efficiency
    info: dict[str, Any] = {"labels": "real+synthetic" if le.synthetic else "real", "k": le.k, "inits": le.inits,
                            "seed": le.seed, "gap": le.gap, "sets": {}, "supsyn_encoder": None}
    result["label_efficiency"] = info
    pools = {}
    for entry in cfg.eval.real:
        name = _set_name(entry)
        pool, candidates, eval_t = label_candidates(entry, le)
        pools[entry] = (name, pool, candidates)
        info["sets"][name] = {"entry": entry, "pool": str(pool), "candidates": len(candidates), "eval_t": eval_t,
                              "train_t": sorted({c["t"] for c in candidates}) if eval_t is not None else None,
                              "frames": {}}
    folders: dict[int, list[Path]] = {}
    for k in le.k:
        folders[k] = []
        for name, pool, candidates in pools.values():
            frames = pick_frames(candidates, k, le.seed, name)
            if len(frames) < k:
                console.print(f"[yellow]label efficiency: {name} has {len(frames)} candidate frame(s), fewer than "
                              f"k={k}: all of them are used (recorded as 'frames')[/]")
            folders[k].append(write_label_folder(out, name, pool, frames))
            info["sets"][name]["frames"][str(k)] = frames
    atomic_write_json(out / "bench_transfer.json", result)  # the chosen frames, before any row trains
    encoder = None
    if "supsyn" in le.inits:
        console.rule("[bold]bench transfer: supsyn encoder (from the synthetic row's model)[/]")
        if "synthetic" not in result["rows"]:
            record("synthetic", row_config(cfg, "synthetic"), time.perf_counter())
        ft_dir = Path(result["rows"]["synthetic"]["finetune_dir"])
        encoder = supsyn_encoder(out, ft_dir / "model")
        info["supsyn_encoder"] = str(encoder)
    for row, k, init in label_rows(cfg):
        console.rule(f"[bold]bench transfer: row {row} ({k} real labeled image(s) per set, init {init})[/]")
        record(row, label_row_config(cfg, k, init, folders[k], encoder), time.perf_counter(), k=k, init=init,
               labels=info["labels"])


def _print_table(result: dict[str, Any]) -> None:
    from rich.table import Table

    sets = list(result["baselines"]) or sorted({s for r in result["rows"].values() for s in r["sets"]})
    t = Table(title="bench transfer: real images, zero real labels (fg IoU / instance F1 at IoU 0.5 of connected "
                    "components / of the instance head's watershed, where the model has one)")
    t.add_column("row")
    for s in sets:
        t.add_column(s, justify="right")
    t.add_column("seconds", justify="right")

    def cell(scores: dict[str, Any] | None) -> str:
        if not scores:
            return "-"
        f1, ws = scores.get("f1"), scores.get("f1_watershed")
        return (f"{scores['fg_iou']:.3f} / " + ("-" if f1 is None else f"{f1:.3f}")
                + ("" if ws is None else f" / {ws:.3f}"))

    for b in sorted({b for s in result["baselines"].values() for b in s}):
        t.add_row(f"baseline {b}", *[cell(result["baselines"].get(s, {}).get(b)) for s in sets], "")
    for row, r in result["rows"].items():
        t.add_row(row, *[cell(r["sets"].get(s)) for s in sets], f"{r['seconds']:.0f}")
    console.print(t)
    le = result.get("label_efficiency")
    if le:
        # k = 0 is the zero-real-label rows: synthetic (random init) and ssl; supsyn at k = 0 would be the
        # synthetic row's own model.
        zero = {"random": "synthetic", "ssl": "ssl"}
        g = Table(title=f"label efficiency: fine-tuned on k real labeled images per set ({le['labels']} labels; "
                        "k=0: synthetic labels only); fg IoU / instance F1 (connected components / watershed) on the "
                        "held-out real frames")
        g.add_column("init")
        for s in sets:
            for k in [0, *le["k"]]:
                n = len(le["sets"].get(s, {}).get("frames", {}).get(str(k), [])) if k else 0
                short = f" ({n} used)" if 0 < n < k else ""
                g.add_column(f"{s} k={k}{short}", justify="right")
        for init in le["inits"]:
            cells = []
            for s in sets:
                for k in [0, *le["k"]]:
                    name = zero.get(init) if k == 0 else f"real{k}-{init}"
                    cells.append(cell((result["rows"].get(name) or {}).get("sets", {}).get(s)) if name else "-")
            g.add_row(init, *cells)
        console.print(g)
    console.print(f"hardware: {result['hardware']}; total {result.get('total_s', 0):.0f}s; results in "
                  f"{result['out']}/bench_transfer.json")


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """``segfactory bench transfer`` from its parsed arguments."""
    from segfactory.config import load_config

    extra: dict[str, Any] = {"cluster.workers": args.workers}
    if args.rows:
        extra["rows"] = [r.strip() for r in args.rows.split(",") if r.strip()]
    cfg = load_config(TransferBenchConfig, args.config, args.overrides, extra)
    return run_transfer_bench(cfg, args.out)
