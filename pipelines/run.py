"""``segfactory run CONFIG``: render -> ingest -> pretrain -> fine-tune -> evaluate -> predict -> report.

Each stage's output lives in ``OUT/stages/<stage>-<key>/`` where the key hashes the stage's config section,
the keys/hashes of its inputs and the code version; a stage whose directory holds ``stage.json`` is skipped,
so a re-run only does what changed. Render and ingest are Dask pipelines of their own; the training stages run
as single Dask tasks that ask for a ``GPU`` resource when the cluster offers one, and the training itself runs
in its own process (``segfactory pretrain`` / ``finetune`` ...) with a timeout, written to a temp dir and renamed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from finetune.config import FinetuneConfig
from pipelines.cluster import ClusterConfig, open_client, training_resources
from pipelines.refresh import RealImages
from pretrain.config import PretrainConfig
from segfactory import __version__
from segfactory.config import StrictModel, save_resolved
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import atomic_write_json, canonical_hash, commit_dir, ensure_writable_dir, read_json
from synth.config import RenderConfig

STAGE_FILE = "stage.json"
SKIMAGE_DATA = "skimage:data"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class TrainingExecution(StrictModel):
    timeout_s: float = Field(3600.0, gt=0, description="a training/evaluation process is killed after this long")
    retries: int = Field(1, ge=0, description="re-runs of a failed training/evaluation task")
    predict_images: int = Field(4, ge=0, description="real images the report overlays predictions on")


class RunConfig(StrictModel):
    """``segfactory run`` config: one section per stage plus the cluster."""

    render: RenderConfig = Field(default_factory=RenderConfig)
    real: RealImages = Field(default_factory=lambda: RealImages(src=SKIMAGE_DATA))
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    execution: TrainingExecution = Field(default_factory=TrainingExecution)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)


def resolve_real_src(src: str) -> str:
    """``skimage:data`` is the folder of sample photos that ships inside the scikit-image package."""
    if src == SKIMAGE_DATA:
        import skimage.data

        return str(Path(skimage.data.__file__).parent)
    return src


def training_task(argv: list[str], final: str, timeout_s: float) -> dict[str, Any]:
    """Dask task: run one ``segfactory`` stage command in its own process, writing into a temp dir that is
    renamed to ``final`` when the command succeeds. ``{OUT}`` in ``argv`` is replaced by the temp dir."""
    from pipelines.subproc import run_logged

    final_p = Path(final)
    if (final_p / STAGE_FILE).is_file():
        return {"skipped": True}
    tmp = final_p.parent / f".tmp-{final_p.name}-{uuid.uuid4().hex[:8]}"
    log = final_p.parent / f"{final_p.name}.log"
    cmd = [sys.executable, "-m", "segfactory.cli", *[a.replace("{OUT}", str(tmp)) for a in argv]]
    t0 = time.perf_counter()
    try:
        run_logged(cmd, timeout_s, log)
        atomic_write_json(tmp / STAGE_FILE, {"argv": argv, "seconds": round(time.perf_counter() - t0, 2),
                                             "host": os.uname().nodename, "code_version": __version__})
        if final_p.exists():  # an uncommitted leftover of a killed run
            shutil.rmtree(final_p)
        commit_dir(tmp, final_p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"skipped": False, "seconds": round(time.perf_counter() - t0, 2)}


def run_stage_tasks(cluster: ClusterConfig, timeout_s: float, retries: int, commands: dict[str, tuple[Path, list[str]]],
                    performance_report: Path, on_done: Any = None) -> dict[str, dict[str, Any]]:
    """Run stage commands in order, each as a Dask task (a GPU task when the cluster has GPUs).

    Args:
        commands: ``{stage: (final dir, segfactory argv)}``; a final dir holding ``stage.json`` is reused.
        on_done: Called with ``(stage, result)`` after each stage.

    Returns:
        ``{stage: {"skipped": bool, "seconds": float}}``.

    Raises:
        UserError: a stage failed after its retries (naming its log); a re-run resumes at that stage.
    """
    results: dict[str, dict[str, Any]] = {}
    with open_client(cluster, performance_report=performance_report) as client:
        resources = training_resources(client, cluster)
        console.print(f"training tasks ask for {resources or 'no special resources (CPU fallback)'}")
        for name, (final, argv) in commands.items():
            fut = client.submit(training_task, argv, str(final), timeout_s, key=f"{name}-{final.name}",
                                pure=False, retries=retries, resources=resources)
            try:
                results[name] = fut.result()
            except Exception as e:
                raise UserError(f"stage {name} failed: {e}",
                                fix=f"see {final.parent / (final.name + '.log')}; re-running resumes here") from None
            if on_done is not None:
                on_done(name, results[name])
    return results


def stage_dir(out: Path, name: str, key_material: dict[str, Any]) -> Path:
    return out / "stages" / f"{name}-{canonical_hash({**key_material, 'code': __version__}, 12)}"


def run_all(cfg: RunConfig, out: str | os.PathLike) -> dict[str, Any]:
    """Run every stage, skipping those whose cached output matches; returns a summary with the stage dirs."""
    from pipelines.ingest import run_ingest
    from pipelines.render import resolve_render_config, run_render
    from pipelines.report import write_report

    t0 = time.perf_counter()
    out = ensure_writable_dir(Path(out).resolve())
    (out / "stages").mkdir(exist_ok=True)
    save_resolved(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    done: dict[str, str] = {}

    def stage(name: str) -> None:
        timings[name] = round(time.perf_counter() - t_stage, 2)
        console.rule(f"[bold]{name}[/] {done.get(name, '')} ({timings[name]:.1f}s)")

    # render: the dataset directory is resumable by itself (content-addressed shards).
    t_stage = time.perf_counter()
    render_cfg, render_hash = resolve_render_config(cfg.render.model_copy(update={"cluster": cfg.cluster}))
    size = render_cfg.dataset.model_dump(mode="json")
    dataset = stage_dir(out, "render", {"config": render_hash, "dataset": size})
    if (dataset / STAGE_FILE).is_file():
        done["render"] = "cached"
    else:
        s = run_render(render_cfg, dataset, performance_report=out / "reports" / "dask-render.html")
        atomic_write_json(dataset / STAGE_FILE, {"summary": s, "config_hash": render_hash})
        done["render"] = f"{s['shards_rendered']} shard(s) rendered"
    stage("render")

    # ingest: incremental by itself (only new files); its data hash keys pretraining.
    t_stage = time.perf_counter()
    src = resolve_real_src(cfg.real.src or "")
    if not cfg.real.src:
        raise UserError("run: real.src is empty; pretraining needs unlabeled real images",
                        fix=f"set real.src=DIR (or real.src={SKIMAGE_DATA} for scikit-image's sample photos)")
    ingest_cfg = cfg.real.config.model_copy(update={"cluster": cfg.cluster})
    ing = run_ingest(src, out / "stages" / "real", ingest_cfg)
    done["ingest"] = f"{ing['new_images']} new image(s), {ing['total_images']} total"
    stage("ingest")

    pre_dir = stage_dir(out, "pretrain", {"config": cfg.pretrain.model_dump(mode="json"), "data": ing["data_hash"]})
    ft_dir = stage_dir(out, "finetune", {"config": cfg.finetune.model_dump(mode="json"), "render": dataset.name,
                                          "pretrain": pre_dir.name})
    eval_dir = stage_dir(out, "evaluate", {"model": ft_dir.name, "data": dataset.name})
    pred_dir = stage_dir(out, "predict", {"model": ft_dir.name, "data": ing["data_hash"],
                                           "n": cfg.execution.predict_images})
    cfg_dir = out / "stages" / "configs"
    cfg_dir.mkdir(exist_ok=True)
    save_resolved(cfg.pretrain, cfg_dir / f"{pre_dir.name}.yaml")
    save_resolved(cfg.finetune, cfg_dir / f"{ft_dir.name}.yaml")
    pred_in = _predict_inputs(src, out / "stages" / f"{pred_dir.name}-input", cfg.execution.predict_images)
    commands = {
        "pretrain": (pre_dir, ["pretrain", str(cfg_dir / f"{pre_dir.name}.yaml"),
                               "--images", str(out / "stages" / "real"), "--out", "{OUT}"]),
        "finetune": (ft_dir, ["finetune", str(cfg_dir / f"{ft_dir.name}.yaml"), "--synthetic", str(dataset),
                              "--encoder", str(pre_dir / "encoder"), "--out", "{OUT}"]),
        "evaluate": (eval_dir, ["evaluate", "--model", str(ft_dir / "model"), "--data", str(dataset),
                                "--out", "{OUT}"]),
        "predict": (pred_dir, ["predict", "--model", str(ft_dir / "model"), "--input", str(pred_in),
                               "--out", "{OUT}"]),
    }
    t_stage = time.perf_counter()

    def on_done(name: str, r: dict[str, Any]) -> None:
        nonlocal t_stage
        done[name] = "cached" if r["skipped"] else f"done in {r['seconds']:.0f}s"
        stage(name)
        t_stage = time.perf_counter()

    run_stage_tasks(cfg.cluster, cfg.execution.timeout_s, cfg.execution.retries, commands,
                    out / "reports" / "dask-training.html", on_done)
    report = write_report(out / "report.html", dataset, pre_dir, ft_dir, eval_dir, pred_dir)
    stage("report")
    summary = {"out": str(out), "report": str(report), "stages": done, "seconds": timings,
               "miou": read_json(eval_dir / "metrics.json")["overall"]["miou"],
               "total_s": round(time.perf_counter() - t0, 2)}
    atomic_write_json(out / "run.json", summary)
    console.print(f"run finished in {summary['total_s']:.0f}s; report: {report}")
    return summary


def _predict_inputs(src: str, folder: Path, n: int) -> Path:
    """Up to ``n`` colour images of the real source, copied so prediction sees only plain photos."""
    if folder.is_dir() and any(folder.iterdir()):
        return folder
    tmp = folder.parent / f".{folder.name}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    from PIL import Image

    picked = 0
    for p in sorted(Path(src).rglob("*")) if Path(src).is_dir() else []:
        if picked >= n or p.suffix.lower() not in IMAGE_EXTS:
            continue
        try:
            with Image.open(p) as im:
                if im.mode != "RGB" or min(im.size) < 64:
                    continue
                im.thumbnail((256, 256))
                im.save(tmp / f"{p.stem}.png")
        except OSError:
            continue
        picked += 1
    os.replace(tmp, folder)
    return folder


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
