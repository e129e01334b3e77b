"""``segfactory bench render``: segfactory's render path against a naive BlenderProc baseline, in one run.

Both render the same scenes and views at the same resolution:

* **baseline**: a fresh Blender process per scene, BlenderProc's default settings (1024 max samples, noise
  threshold 0.01, denoiser), labels from the color render, HDF5 output (``synth.bench_baseline``);
* **segfactory**: one render process for all scenes (``synth.worker``, exactly what a Dask task runs) with
  segfactory's defaults: few adaptive samples + OpenImageDenoise, a 1-sample label pass, PNG shards.

PSNR of every segfactory RGB is taken against the baseline's 1024-sample render of the same view (the
high-sample reference). Every post-processing effect is switched off (:func:`no_post`), so the PSNR measures
rendering only.
Also measured: frames/min through the Dask pipeline with 1 and 2 workers, and the memory of one long shard.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.render import RenderJob
from segfactory.config import load_config
from segfactory.console import console
from segfactory.formats.imagefile import read_image
from segfactory.io import atomic_write_json, read_json

# Post-processing knobs that change a rendered frame, each at its no-effect value: every other knob of
# ``scenes.randomization.PostKnobs`` is a range (or share) at 0. Built from the model's fields so that a knob added
# later is switched off too (a family's vignetting once slipped through a hand-written list and darkened the corners).
_POST_IDENTITY = {"gamma": [1, 1], "camera_bits": 0, "camera_offset": [0, 0]}


def no_post() -> dict[str, Any]:
    """Every post-processing knob at its no-effect value, as a ``scene.randomization.post`` override."""
    from scenes.randomization import PostKnobs

    out: dict[str, Any] = {}
    for name, field in PostKnobs.model_fields.items():
        if name in _POST_IDENTITY:
            out[name] = _POST_IDENTITY[name]
        else:
            out[name] = [0, 0] if isinstance(field.default, tuple) else 0
    return out


# The street family's weather adds fog/haze and a dusk camera's exposure and noise after rendering: off, so that the
# PSNR measures rendering only (the sun, sky, lamps and wet materials still vary as in a real dataset).
NO_WEATHER_POST = {"fog_prob": 0, "haze_prob": 0, "haze_density": [0, 0], "dusk_exposure": [0, 0],
                   "dusk_noise": [0, 0]}


def hardware() -> dict[str, Any]:
    import psutil

    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": None, "platform": platform.platform()}


def bench_config(family: str, resolution: int, scenes: int, views: int, **extra: Any) -> RenderJob:
    overrides = [f"scene.family={family}", f"render.resolution={resolution}", f"render.views={views}",
                 f"dataset.scenes={scenes}", f"dataset.scenes_per_shard={scenes}",
                 f"scene.randomization.post={json.dumps(no_post())}"] + [f"{k}={v}" for k, v in extra.items()]
    if family == "street":
        overrides += [f"scene.params.environment.{k}={json.dumps(v)}" for k, v in NO_WEATHER_POST.items()]
    from pipelines.render import resolve_render_config

    return resolve_render_config(load_config(RenderJob, None, overrides))[0]


def _run_child(cmd: list[str], what: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a render process; if it fails, raise with the end of its output (the reason is in there, not in the
    exit status: a Blender child often segfaults in its teardown after a Python error)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit status {proc.returncode}); the end of its output:\n{tail}")
    return proc


def _result_line(stdout: str) -> dict[str, Any]:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("SEGFACTORY-RESULT "))
    return json.loads(line.split(" ", 1)[1])


def run_segfactory(cfg: RenderJob, work: Path) -> dict[str, Any]:
    """One render process for all scenes, exactly as a pipeline task runs it; wall time includes start-up."""
    from pipelines.render import dataset_plan, prepare_dataset, render_scratch, resolve_render_config
    from segfactory.formats.dataset import MANIFEST_FILE, shard_dir
    from synth.shard import render_code_version

    cfg, config_hash = resolve_render_config(cfg)
    cfg = cfg.model_copy(update={"dataset": cfg.dataset.model_copy(update={"scenes_per_shard": cfg.dataset.scenes})})
    root = work / "segfactory"
    shutil.rmtree(root, ignore_errors=True)
    meta = prepare_dataset(root, cfg, config_hash)
    plan = dataset_plan(cfg, config_hash, meta["family"])[0]
    job = {"root": str(root), "plan": asdict(plan), "config": cfg.stage_config().model_dump(mode="json"),
           "config_hash": config_hash,
           "code_version": render_code_version(), "timeout_s": 1e9, "threads": 0}
    job_path = work / "segfactory-job.json"
    atomic_write_json(job_path, job)
    t0 = time.perf_counter()
    with render_scratch() as env:
        _run_child([sys.executable, "-m", "synth.worker", str(job_path)], "segfactory's render process", env=env)
    wall = time.perf_counter() - t0
    manifest = read_json(shard_dir(root, plan.shard_id) / MANIFEST_FILE)
    t = manifest["timings"]
    frames = manifest["num_frames"]
    return {"frames": frames, "wall_s": wall, "fpm": 60 * frames / wall,
            "split_s": {"startup": wall - t["total_s"] + t["startup_s"], "build": t["sample_s"] + t["build_s"],
                        "render": t["color_s"] + t["labels_s"], "write": t["write_s"]},
            "rgb": {f["name"]: shard_dir(root, plan.shard_id) / f["files"]["rgb"]["path"] for f in manifest["frames"]},
            "post": {f["name"]: f["post"] for f in manifest["frames"]}}


def run_baseline(cfg: RenderJob, work: Path) -> dict[str, Any]:
    out = work / "baseline"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    job_path = work / "baseline-job.json"
    atomic_write_json(job_path, {"config": cfg.stage_config().model_dump(mode="json"), "out": str(out)})
    split = {"startup": 0.0, "build": 0.0, "render": 0.0, "write": 0.0}
    frames, wall = 0, 0.0
    for scene in range(cfg.dataset.scenes):
        console.print(f"  baseline scene {scene + 1}/{cfg.dataset.scenes} (fresh process, 1024 max samples)...")
        t0 = time.perf_counter()
        proc = _run_child([sys.executable, "-m", "synth.bench_baseline", str(job_path), str(scene)],
                          f"the baseline's process for scene {scene}")
        wall += time.perf_counter() - t0
        r = _result_line(proc.stdout)
        frames += r["frames"]
        for k in split:
            split[k] += r[f"{k}_s"]
    split["startup"] += wall - sum(split.values())  # interpreter start and exit count as start-up
    rgb = {f"s{s:06d}_v{v:02d}": out / f"baseline_s{s:06d}_v{v:02d}.png"
           for s in range(cfg.dataset.scenes) for v in range(cfg.render.views)}
    return {"frames": frames, "wall_s": wall, "fpm": 60 * frames / wall, "split_s": split, "rgb": rgb}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of ``a`` against ``b`` (same shape and dtype), peak the dtype's maximum (255 for 8 bits)."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    peak = float(np.iinfo(a.dtype).max)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def reference_frame(baseline: np.ndarray, post: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """The baseline's render as segfactory delivers a render with every effect off: display-referred frames as
    they are; linear light (film raw) scaled by the family's ``gain`` into the dataset's bit depth.

    Args:
        baseline: (H, W) or (H, W, 3) uint8/uint16 frame as the baseline wrote it.
        post: The segfactory frame's post-processing record (its manifest entry's ``post``).
        dtype: The segfactory frame's dtype.
    """
    from scenes.spec import PostFX
    from synth.postfx import apply_post

    fx = PostFX(linear=bool(post.get("linear", False)), gain=float(post.get("gain", 1.0)))
    return apply_post(baseline, fx, np.random.default_rng(0), out_dtype=dtype)


def run_pipeline(cfg: RenderJob, out: Path, workers: int) -> dict[str, Any]:
    from pipelines.render import run_render

    shutil.rmtree(out, ignore_errors=True)
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"workers": workers})})
    t0 = time.perf_counter()
    summary = run_render(cfg, out, cfg.cluster)
    wall = time.perf_counter() - t0
    return {"workers": workers, "frames": summary["frames_total"], "wall_s": round(wall, 2),
            "fpm": round(60 * summary["frames_total"] / wall, 2)}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cfg = bench_config(args.family, args.resolution, args.scenes, args.views)
    console.print(f"bench render: {args.family}, {args.scenes} scene(s) x {args.views} view(s) at "
                  f"{args.resolution}px on {hardware()['cores']} cores")
    console.print("segfactory defaults (one process)...")
    ours = run_segfactory(cfg, work)
    console.print("naive BlenderProc baseline...")
    base = run_baseline(cfg, work)
    psnrs = {}
    for name, path in ours["rgb"].items():
        frame = read_image(path)
        psnrs[name] = psnr(frame, reference_frame(read_image(base["rgb"][name]), ours["post"][name], frame.dtype))
    result: dict[str, Any] = {
        "family": args.family, "resolution": args.resolution, "scenes": args.scenes, "views": args.views,
        "baseline_fpm": round(base["fpm"], 3), "segfactory_fpm": round(ours["fpm"], 3),
        "speedup": round(ours["fpm"] / base["fpm"], 2),
        "psnr_db": round(float(np.mean(list(psnrs.values()))), 2), "psnr_db_min": round(min(psnrs.values()), 2),
        "reference": "baseline render (BlenderProc defaults: 1024 max samples, noise threshold 0.01, denoiser)",
        "split_s": {"baseline": {k: round(v, 2) for k, v in base["split_s"].items()},
                    "segfactory": {k: round(v, 2) for k, v in ours["split_s"].items()}},
        "segfactory_settings": cfg.render.model_dump(mode="json"),
        "hardware": hardware(),
    }
    if args.workers:
        scale_cfg = bench_config(args.family, args.scaling_resolution, args.scaling_scenes, 1,
                                 **{"dataset.scenes_per_shard": 1})
        result["scaling"] = {"resolution": args.scaling_resolution, "scenes": args.scaling_scenes, "runs": [
            run_pipeline(scale_cfg, work / f"pipeline-w{w}", int(w)) for w in str(args.workers).split(",")]}
    if args.memory_scenes:
        mem_cfg = bench_config(args.family, 96, args.memory_scenes, 1)
        run_pipeline(mem_cfg, work / "memory", 1)
        from segfactory.formats.dataset import open_dataset

        ds = open_dataset(work / "memory")
        rss = ds.manifest(ds.shard_ids[0])["rss_mb_per_scene"]
        at5, last = rss[min(4, len(rss) - 1)], rss[-1]
        result["memory"] = {"scenes": len(rss), "peak_rss_mb": max(rss), "rss_after_scene5_mb": at5,
                            f"rss_after_scene{len(rss)}_mb": last, "growth_pct": round(100 * (last - at5) / at5, 1)}
    _print_table(result)
    atomic_write_json(work / "result.json", result)
    return result


def _print_table(r: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"render bench: {r['family']} at {r['resolution']}px, {r['scenes']}x{r['views']} frames "
                    f"({r['hardware']['cores']} cores, {r['hardware']['cpu']})")
    for col in ("", "frames/min", "start-up s", "build s", "render s", "write s", "PSNR dB"):
        t.add_column(col, justify="right", no_wrap=True)
    for name, key in (("baseline", "baseline"), ("segfactory", "segfactory")):
        s = r["split_s"][key]
        quality = "reference" if key == "baseline" else f"{r['psnr_db']:.1f}/{r['psnr_db_min']:.1f} min"
        t.add_row(name, f"{r[f'{key}_fpm']:.2f}", f"{s['startup']:.1f}", f"{s['build']:.1f}", f"{s['render']:.1f}",
                  f"{s['write']:.1f}", quality)
    console.print(t)
    console.print(f"speed-up: {r['speedup']:.1f}x")
    for run in r.get("scaling", {}).get("runs", []):
        console.print(f"pipeline, {run['workers']} worker(s): {run['fpm']:.1f} frames/min "
                      f"({run['frames']} frames at {r['scaling']['resolution']}px)")
    if "memory" in r:
        m = r["memory"]
        console.print(f"memory: peak RSS {m['peak_rss_mb']:.0f} MB, "
                      f"growth scene 5 -> {m['scenes']}: {m['growth_pct']}%")
