"""``segfactory bench train``: training images/s, segfactory's loop vs a plain smp loop with CPU augmentation.

Both pipelines read the same files, train the same smp model with the same loss (CE + Dice) and optimiser
(AdamW) on ``size`` x ``size`` crops, and are timed over the same number of steps after a warm-up:

- ``smp+cpu-aug``: the usual recipe: a DataLoader whose workers decode *and* augment (random resized crop,
  flip, rotation, colour jitter, blur, noise with OpenCV/NumPy), fp32, channels-first.
- ``segfactory``: the real training step of ``finetune.train`` (workers only decode and cut a window; kornia
  augmentation on the training device; AMP and channels_last on GPU).

Default data: real sample photographs shipped with scikit-image / scikit-learn / matplotlib, resized so the
short side is 640 px; masks are their Otsu-thresholded luminance (2 classes); throughput does not depend on
what the labels mean. Prints one JSON object on stdout and a table on stderr.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segfactory.console import console
from segfactory.workers import loader_context

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

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for pkg, name in BENCH_IMAGES:
        path = sample_image_path(pkg, name)
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
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


def bench_baseline(folder: Path, size: int, batch: int, steps: int, warmup: int, arch: str, encoder: str,
                   device: torch.device, workers: int) -> dict[str, Any]:
    """Plain smp loop: CPU-augmenting DataLoader, fp32, channels-first."""
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = None
    for i, (x, y) in enumerate(loader):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss = ce(logits, y) + dice(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"pipeline": "smp+cpu-aug", "batch_size": batch, "images_per_s": round(steps * batch / dt, 2),
            "seconds": round(dt, 2), "peak_gpu_mib": _peak_mib(device), "amp": "off", "channels_last": False}


def bench_segfactory(folder: Path, size: int, batch: int, steps: int, warmup: int, arch: str, encoder: str,
                     device: torch.device, workers: int) -> dict[str, Any]:
    """The real ``finetune.train`` step: decode-only workers, kornia augmentation on device, AMP, channels_last."""
    from finetune.augment import GpuAugment
    from finetune.config import FinetuneConfig
    from finetune.data.mixing import MixedBatchSampler, WindowDataset, collate, raise_if_error
    from finetune.train import Trainer

    cfg = FinetuneConfig.model_validate({
        "data": {"real": [{"path": str(folder)}], "val_fraction": 0, "num_workers": workers, "load_size": size},
        "model": {"arch": arch, "encoder": encoder},
        "augment": {"crop_size": size},
        "train": {"steps": steps + warmup, "batch_size": batch, "device": device.type, "grad_clip": None},
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
        torch.cuda.reset_peak_memory_stats(device)
    t0 = None
    for i, b in enumerate(loader):
        raise_if_error(b)
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        trainer._train_step(b, augment, i)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"pipeline": "segfactory", "batch_size": batch, "images_per_s": round(steps * batch / dt, 2),
            "seconds": round(dt, 2), "peak_gpu_mib": _peak_mib(device),
            "amp": str(trainer.autocast).replace("torch.", "") if trainer.autocast else "off",
            "channels_last": trainer.channels_last}


def run_bench(size: int = 512, batch_sizes: list[int] | None = None, steps: int = 20, warmup: int = 3,
              arch: str = "unet", encoder: str = "resnet18", device: str = "auto", data: str | None = None,
              workers: int = 2, threads: int | None = None) -> dict[str, Any]:
    """Time both pipelines for every batch size; returns the JSON report."""
    import os
    import platform

    from rich.table import Table

    from finetune.data.sources import detect_kind
    from segfactory.errors import UserError
    from segfactory.torchutil import resolve_device

    if steps < 1 or warmup < 1:
        raise UserError(f"--steps {steps} --warmup {warmup}: both must be >= 1", fix="e.g. --steps 20 --warmup 3")
    dev = resolve_device(device)
    batch_sizes = batch_sizes or [4, 8]
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
        results = []
        for bs in batch_sizes:
            for fn in (bench_baseline, bench_segfactory):
                r = fn(folder, size, bs, steps, warmup, arch, encoder, dev, workers)
                console.print(f"{r['pipeline']:>12} batch {bs}: {r['images_per_s']} img/s")
                results.append(r)
    speedup = {}
    for bs in batch_sizes:
        base = next(r for r in results if r["batch_size"] == bs and r["pipeline"] == "smp+cpu-aug")
        ours = next(r for r in results if r["batch_size"] == bs and r["pipeline"] == "segfactory")
        speedup[str(bs)] = round(ours["images_per_s"] / base["images_per_s"], 3)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    report = {"bench": "train", "size": size, "arch": arch, "encoder": encoder, "device": str(dev), "gpu": gpu,
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "workers": workers,
              "threads": torch.get_num_threads(),
              "steps": steps, "warmup": warmup, "torch": torch.__version__, "results": results, "speedup": speedup}
    table = Table(title=f"bench train: {size}x{size}, {arch}/{encoder}, {dev}" + (f" ({gpu})" if gpu else ""))
    for col in ("pipeline", "batch", "img/s", "peak GPU MiB", "amp", "channels_last", "speedup"):
        table.add_column(col)
    for r in results:
        table.add_row(r["pipeline"], str(r["batch_size"]), f"{r['images_per_s']:.2f}",
                      "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}", r["amp"],
                      str(r["channels_last"]),
                      f"{speedup[str(r['batch_size'])]:.2f}x" if r["pipeline"] == "segfactory" else "")
    console.print(table)
    return report
