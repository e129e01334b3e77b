"""``segfactory bench train``: training images/s, segfactory's loop vs a plain smp loop with CPU augmentation.

Both pipelines read the same files, train the same smp model with the same loss (CE + Dice) and optimiser
(AdamW) on ``size`` x ``size`` crops, and are timed over the same number of steps after a warm-up:

- ``smp+cpu-aug``: the usual recipe: a DataLoader whose workers decode *and* augment (random resized crop,
  flip, rotation, colour jitter, blur, noise with OpenCV/NumPy), fp32, channels-first.
- ``segfactory``: the real training step of ``finetune.train`` (workers only decode and cut a window; kornia
  augmentation on the training device), once per *variant* (:data:`VARIANTS`): as configured (AMP auto and
  channels_last on GPU), fp32, fp16 with loss scaling, bf16, without channels_last, with ``torch.compile``.

Every row also reports the data wait: the share of the timed wall time the loop spent waiting for the
DataLoader's next batch (from the end of one step, synchronised, to the arrival of the next batch); on CUDA
``gpu_busy_pct`` is ``100 - data_wait_pct``. A variant that fails (out of memory, a compiler error) becomes a row
with ``"error"`` and the bench goes on.

Default data: real sample photographs shipped with scikit-image / scikit-learn / matplotlib, resized so the
short side is 640 px; masks are their Otsu-thresholded luminance (2 classes); throughput does not depend on
what the labels mean. Prints one JSON object on stdout and a table on stderr.
"""

from __future__ import annotations

import contextlib
import gc
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfactory.console import console
from segfactory.workers import loader_context

#: variant -> the ``train`` settings of the segfactory step it times (``default``: as configured).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "fp32": {"amp": "off"},
    "fp16": {"amp": "fp16"},
    "bf16": {"amp": "bf16"},
    "no-channels-last": {"channels_last": "off"},
    "compile": {"compile": True},
}
#: Variants that need a CUDA device (mixed precision runs on CUDA only).
CUDA_ONLY = ("fp16", "bf16")
BASELINE = "smp+cpu-aug"

BENCH_IMAGES = [("skimage", "astronaut.png"), ("skimage", "coffee.png"), ("skimage", "chelsea.png"),
                ("skimage", "rocket.jpg"), ("skimage", "motorcycle_left.png"), ("skimage", "retina.jpg"),
                ("sklearn", "china.jpg"), ("sklearn", "flower.jpg"), ("matplotlib", "grace_hopper.jpg")]


def sample_image_path(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage

        return Path(skimage.__file__).parent / "data" / name
    if package == "sklearn":
        import sklearn

        return Path(sklearn.__file__).parent / "datasets" / "images" / name
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def make_bench_folder(out: Path, short_side: int = 640) -> Path:
    """A labeled folder of real sample photos (see module docstring)."""
    import cv2
    from skimage.filters import threshold_otsu

    from segfactory.formats.imagefile import cv2_imread

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for pkg, name in BENCH_IMAGES:
        path = sample_image_path(pkg, name)
        img = cv2_imread(path, cv2.IMREAD_COLOR)  # without libpng's warnings about skimage's colour profiles
        if img is None:
            continue
        s = short_side / min(img.shape[:2])
        img = cv2.resize(img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_LINEAR)
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        mask = (gray > threshold_otsu(gray)).astype(np.uint8)
        stem = Path(name).stem
        cv2.imwrite(str(out / "images" / f"{stem}.png"), img)
        cv2.imwrite(str(out / "masks" / f"{stem}.png"), mask)
    (out / "classes.json").write_text('{"classes": [{"id": 0, "name": "dark"}, {"id": 1, "name": "bright"}]}')
    return out


class CpuAugDataset(torch.utils.data.Dataset):
    """Baseline: decode + full augmentation in the worker (OpenCV / NumPy), fp32 normalised output."""

    def __init__(self, items: list[tuple[Path, Path]], size: int, seed: int):
        self.items, self.size, self.seed = items, size, seed

    def __len__(self) -> int:
        return 1 << 30  # indexed by a global sample counter

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import cv2

        rng = np.random.default_rng([self.seed, index])
        ip, mp = self.items[index % len(self.items)]
        img = cv2.cvtColor(cv2.imread(str(ip), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        mask = cv2.imread(str(mp), cv2.IMREAD_UNCHANGED)
        h, w = mask.shape
        s = self.size
        area = rng.uniform(0.35, 1.0) * min(h, w) ** 2
        ratio = math.exp(rng.uniform(math.log(0.75), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = cv2.resize(img[y0:y0 + ch, x0:x0 + cw], (s, s), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask[y0:y0 + ch, x0:x0 + cw], (s, s), interpolation=cv2.INTER_NEAREST)
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.3:
            m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-15, 15), 1.0)
            img = cv2.warpAffine(np.ascontiguousarray(img), m, (s, s), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT_101)
            mask = cv2.warpAffine(np.ascontiguousarray(mask), m, (s, s), flags=cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=255)
        x = img.astype(np.float32) / 255
        if rng.random() < 0.8:
            x = x + rng.uniform(-0.2, 0.2)
            mean = x.mean()
            x = (x - mean) * rng.uniform(0.8, 1.2) + mean
            gray = x.mean(2, keepdims=True)
            x = (x - gray) * rng.uniform(0.8, 1.2) + gray
        if rng.random() < 0.2:
            x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.1, 1.5))
        if rng.random() < 0.2:
            x = x + rng.normal(0, 0.03, x.shape).astype(np.float32)
        x = (np.clip(x, 0, 1) - 0.5) / 0.25
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), \
            torch.from_numpy(np.ascontiguousarray(mask).astype(np.int64))


def _peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _preload_forkserver() -> None:
    """Import the workers' modules once in the forkserver, so that each row's DataLoader workers fork ready
    instead of importing torch and OpenCV again (about 6 s to a first batch per row on 2 busy cores, 0.3 s
    preloaded). Only start-up changes (untimed, both pipelines alike); no effect once the forkserver runs."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(["__main__", "torch", "cv2", "numpy", "finetune.bench",
                                            "finetune.data.mixing"])


def _free(device: torch.device) -> None:
    """Release what the previous row left (models, optimizer state, compiled graphs) and reset peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class _Timer:
    """Wall time of the timed steps and the part of it spent waiting for the DataLoader.

    ``start()`` after the last warm-up step (synchronised); then per step ``got_batch()`` when the loader hands
    over a batch and ``step_done()`` after the step (synchronised): the wait is the sum of the gaps between a
    ``step_done`` (or ``start``) and the next ``got_batch``.
    """

    def __init__(self) -> None:
        self.t0: float | None = None
        self.last = 0.0
        self.wait = 0.0
        self.end = 0.0

    def start(self) -> None:
        self.t0 = self.last = time.perf_counter()

    def got_batch(self) -> None:
        if self.t0 is not None:
            self.wait += time.perf_counter() - self.last

    def step_done(self) -> None:
        self.last = self.end = time.perf_counter()

    def fields(self, steps: int, batch: int, device: torch.device) -> dict[str, Any]:
        if self.t0 is None:
            raise RuntimeError("the loader ended before the timed steps")
        dt = self.end - self.t0
        wait = round(100 * self.wait / dt, 1) if dt > 0 else 0.0
        return {"images_per_s": round(steps * batch / dt, 2), "seconds": round(dt, 2),
                "data_wait_pct": wait, "gpu_busy_pct": round(100 - wait, 1) if device.type == "cuda" else None,
                "peak_gpu_mib": _peak_mib(device)}


def bench_baseline(folder: Path, size: int, batch: int, steps: int, warmup: int, arch: str, encoder: str,
                   device: torch.device, workers: int) -> dict[str, Any]:
    """Plain smp loop: CPU-augmenting DataLoader, fp32, channels-first (reads the loss each step, as a loop
    that logs it does)."""
    from segmentation_models_pytorch.losses import DiceLoss

    from finetune.data.sources import _scan_real
    from finetune.models import build_model

    items = [(it.image, it.mask) for it in _scan_real(folder)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model({"arch": arch, "encoder": encoder, "in_chans": 3, "num_classes": 2}).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ce, dice = torch.nn.CrossEntropyLoss(ignore_index=255), DiceLoss("multiclass", ignore_index=255)
    sampler = torch.utils.data.BatchSampler(range((steps + warmup) * batch), batch, drop_last=True)
    loader = torch.utils.data.DataLoader(CpuAugDataset(items, size, 0), batch_sampler=sampler, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         multiprocessing_context=loader_context(workers))
    timer = _Timer()
    for i, (x, y) in enumerate(loader):
        timer.got_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = ce(logits, y) + dice(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # synchronises
        timer.step_done()
        if i == warmup - 1:
            timer.start()
    return {"pipeline": BASELINE, "variant": None, "batch_size": batch, **timer.fields(steps, batch, device),
            "amp": "off", "channels_last": False, "compile": False}


def bench_segfactory(folder: Path, size: int, batch: int, steps: int, warmup: int, arch: str, encoder: str,
                     device: torch.device, workers: int, variant: str = "default") -> dict[str, Any]:
    """The real ``finetune.train`` step under one of :data:`VARIANTS`: decode-only workers, kornia augmentation
    on the device, AMP / channels_last / torch.compile as the variant sets them.

    ``compile`` rows warm up for at least 3 steps (compilation happens in the first) and report the first
    step's time as ``compile_s``.
    """
    from finetune.augment import GpuAugment
    from finetune.config import FinetuneConfig
    from finetune.data.mixing import MixedBatchSampler, WindowDataset, collate, raise_if_error
    from finetune.train import Trainer

    train = {"steps": steps + warmup, "batch_size": batch, "device": device.type, "grad_clip": None,
             **VARIANTS[variant]}
    if train.get("compile"):
        warmup = max(warmup, 3)
        train["steps"] = steps + warmup
    cfg = FinetuneConfig.model_validate({
        "data": {"real": [{"path": str(folder)}], "val_fraction": 0, "num_workers": workers, "load_size": size},
        "model": {"arch": arch, "encoder": encoder},
        "augment": {"crop_size": size},
        "train": train,
    })
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp), show_progress=False)
        trainer.prepare(resume=False)
    trainer.gen = torch.Generator(device=trainer.device)
    trainer.gen.manual_seed(0)
    trainer._frozen = False
    trainer.model.train()
    srcs = trainer.train_sources
    dataset = WindowDataset(srcs, size, trainer.in_chans, "dtype", 0)
    sampler = MixedBatchSampler([len(s.train) for s in srcs], [1.0] * len(srcs), batch, 0, 0, steps + warmup)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None,
                                         multiprocessing_context=loader_context(workers))
    augment = GpuAugment(cfg.augment)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    timer = _Timer()
    first_step = None
    for i, b in enumerate(loader):
        timer.got_batch()
        raise_if_error(b)
        t_step = time.perf_counter()
        trainer._train_step(b, augment, i)  # ends with loss.item(): synchronised
        _sync(device)
        timer.step_done()
        if i == 0:
            first_step = time.perf_counter() - t_step
        if i == warmup - 1:
            timer.start()
    row = {"pipeline": "segfactory", "variant": variant, "batch_size": batch, **timer.fields(steps, batch, device),
           "amp": str(trainer.autocast).replace("torch.", "") if trainer.autocast else "off",
           "channels_last": trainer.channels_last, "compile": cfg.train.compile}
    if cfg.train.compile:
        row["compile_s"] = round(first_step or 0.0, 2)
        row["warmup"] = warmup
    return row


def _error_row(pipeline: str, variant: str | None, batch: int, exc: BaseException) -> dict[str, Any]:
    lines = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
    return {"pipeline": pipeline, "variant": variant, "batch_size": batch, "error": msg}


def default_workers() -> int:
    """DataLoader workers when ``--workers`` is not given: all cores but one, at most 16."""
    import os

    return max(0, min(16, (os.cpu_count() or 1) - 1))


def check_variants(variants: list[str] | None, device: torch.device) -> list[str]:
    """The variants to run: as asked (validated), else all on CUDA and ``default`` on a CPU.

    Raises:
        UserError: an unknown variant, or a CUDA-only one (fp16, bf16) on a CPU.
    """
    from segfactory.errors import UserError

    if not variants:
        return list(VARIANTS) if device.type == "cuda" else ["default"]
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"--variants {v}: unknown variant", fix=f"choose from {', '.join(VARIANTS)}")
        if v in CUDA_ONLY and device.type != "cuda":  # mixed precision runs on CUDA only
            here = [name for name in VARIANTS if name not in CUDA_ONLY]
            raise UserError(f"--variants {v} needs a CUDA device (this runs on {device})",
                            fix=f"on this device pass --variants with {', '.join(here)}, or run on a GPU "
                                "(--device cuda)")
    return list(dict.fromkeys(variants))


def run_bench(size: int = 512, batch_sizes: list[int] | None = None, steps: int = 20, warmup: int = 3,
              arch: str = "unet", encoder: str = "resnet18", device: str = "auto", data: str | None = None,
              workers: int | None = None, threads: int | None = None,
              variants: list[str] | None = None) -> dict[str, Any]:
    """Time the baseline and every segfactory variant for every batch size; returns the JSON report.

    ``speedup[bs]`` is the ``default`` variant's images/s over the baseline's (the first variant's when
    ``default`` is not run); ``speedup_by_variant[bs][variant]`` has them all (``None`` where a row failed).
    """
    import os
    import platform

    from finetune.data.sources import detect_kind
    from segfactory.errors import UserError
    from segfactory.torchutil import resolve_device

    if steps < 1 or warmup < 1:
        raise UserError(f"--steps {steps} --warmup {warmup}: both must be >= 1", fix="e.g. --steps 20 --warmup 3")
    dev = resolve_device(device)
    variants = check_variants(variants, dev)
    workers = default_workers() if workers is None else workers
    batch_sizes = batch_sizes or [4, 8]
    if workers > 0 and loader_context(workers) == "forkserver":
        _preload_forkserver()
    if threads is not None:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            folder = make_bench_folder(Path(tmp) / "bench")
        else:
            folder = Path(data)
            if detect_kind(folder) != "real":
                raise UserError(f"--data '{folder}' must be a labeled folder (images/ + masks/)",
                                fix="omit --data to use the built-in sample photos")
        results: list[dict[str, Any]] = []
        for bs in batch_sizes:
            runs: list[tuple[str, str | None]] = [(BASELINE, None)] + [("segfactory", v) for v in variants]
            for pipeline, variant in runs:
                _free(dev)
                try:
                    if variant is None:
                        r = bench_baseline(folder, size, bs, steps, warmup, arch, encoder, dev, workers)
                    else:
                        r = bench_segfactory(folder, size, bs, steps, warmup, arch, encoder, dev, workers, variant)
                except Exception as exc:  # one failed row must not lose the others
                    r = _error_row(pipeline, variant, bs, exc)
                if variant is not None and VARIANTS[variant].get("compile"):
                    _reset_dynamo()
                name = pipeline if variant is None else f"{pipeline} {variant}"
                status = f"error: {r['error']}" if "error" in r else f"{r['images_per_s']} img/s"
                console.print(f"{name:>27} batch {bs}: {status}", markup=False)
                results.append(r)
    _free(dev)
    speedup: dict[str, float | None] = {}
    by_variant: dict[str, dict[str, float | None]] = {}
    for bs in batch_sizes:
        base = next(r for r in results if r["batch_size"] == bs and r["pipeline"] == BASELINE)
        by_variant[str(bs)] = {}
        for r in results:
            if r["batch_size"] != bs or r["pipeline"] == BASELINE:
                continue
            ok = "error" not in r and "error" not in base and base["images_per_s"] > 0
            r["speedup"] = round(r["images_per_s"] / base["images_per_s"], 3) if ok else None
            by_variant[str(bs)][r["variant"]] = r["speedup"]
        main_variant = "default" if "default" in variants else variants[0]
        speedup[str(bs)] = by_variant[str(bs)].get(main_variant)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    report = {"bench": "train", "size": size, "arch": arch, "encoder": encoder, "device": str(dev), "gpu": gpu,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "workers": workers,
              "threads": torch.get_num_threads(), "variants": variants,
              "steps": steps, "warmup": warmup, "torch": torch.__version__, "results": results, "speedup": speedup,
              "speedup_by_variant": by_variant}
    from rich.console import Console

    # rich wraps a table to the console width (80 columns when stderr is a file): give the 12 columns room
    Console(file=console.file, width=max(console.width, 150), highlight=False).print(results_table(report))
    return report


def _reset_dynamo() -> None:
    """Drop torch.compile's caches after a compile row (its graphs hold the row's model), best effort."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


def results_table(report: dict[str, Any]) -> Any:
    """The rich table of a :func:`run_bench` report (stderr)."""
    from rich.table import Table

    gpu = report["gpu"]
    table = Table(title=f"bench train: {report['size']}x{report['size']}, {report['arch']}/{report['encoder']}, "
                        f"{report['device']}" + (f" ({gpu})" if gpu else "") + f", {report['workers']} workers")
    for col in ("pipeline", "variant", "batch", "img/s", "s", "peak GPU MiB", "wait %", "GPU busy %", "amp",
                "ch_last", "compile", "speedup"):
        table.add_column(col)

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in report["results"]:
        if "error" in r:
            table.add_row(r["pipeline"], r["variant"] or "", str(r["batch_size"]), f"error: {r['error']}",
                          *[""] * 8)
            continue
        comp = ("yes" + (f" ({r['compile_s']:.1f} s)" if "compile_s" in r else "")) if r["compile"] else "no"
        table.add_row(r["pipeline"], r["variant"] or "", str(r["batch_size"]), f"{r['images_per_s']:.2f}",
                      f"{r['seconds']:.2f}", num(r["peak_gpu_mib"], ".0f"), f"{r['data_wait_pct']:.1f}",
                      num(r["gpu_busy_pct"], ".1f"), r["amp"], str(r["channels_last"]), comp,
                      "" if r["pipeline"] == BASELINE or r.get("speedup") is None else f"{r['speedup']:.2f}x")
    return table
