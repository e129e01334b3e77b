"""Benchmarks: ``segfactory bench ingest`` and ``segfactory bench augment``.

Each prints one JSON object on stdout (returned here) and a table on stderr. Inputs are made from the real
sample photographs that ship with scikit-image, scikit-learn and matplotlib.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segfactory.console import console
from segfactory.workers import loader_context


def sample_photos() -> list[np.ndarray]:
    """Real RGB photographs (H, W, 3) uint8 from installed packages."""
    import matplotlib
    import skimage
    import sklearn

    sk = Path(skimage.__file__).parent / "data"
    paths = [sk / f for f in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "retina.jpg",
                              "hubble_deep_field.jpg", "motorcycle_left.png", "color.png")]
    paths += [Path(sklearn.__file__).parent / "datasets" / "images" / f for f in ("china.jpg", "flower.jpg")]
    paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is not None:
            out.append(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
    return out


def _variant(photo: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A w x h crop of a photo at a random scale/position (so the benchmark does not decode one image N times)."""
    ph, pw = photo.shape[:2]
    s = max(w / pw, h / ph) * rng.uniform(1.0, 1.6)
    img = cv2.resize(photo, (max(w, round(pw * s)), max(h, round(ph * s))), interpolation=cv2.INTER_AREA)
    y = int(rng.integers(0, img.shape[0] - h + 1))
    x = int(rng.integers(0, img.shape[1] - w + 1))
    img = img[y:y + h, x:x + w]
    return img[:, ::-1] if rng.random() < 0.5 else img


def _hardware() -> dict[str, Any]:
    import torch

    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "python": platform.python_version(), "torch": torch.__version__}
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return hw


def _peak_host_mb() -> dict[str, float]:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"peak_host_mb_main": round(self_kb / 1024, 1), "peak_host_mb_child_max": round(child_kb / 1024, 1)}


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.table import Table

    t = Table(title=title)
    for h in header:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    console.print(t)


# ----------------------------------------------------------------------------------------------- ingest


def bench_ingest(n_images: int = 200, short_side: int = 224, repeats: int = 3) -> dict[str, Any]:
    """Images/s per core of the ingest core vs ``Image.open(p).convert("RGB").resize(...)`` on 640x480 JPEGs.

    Both produce an image with short side ``short_side`` from each file; ours also validates, hashes,
    computes channel statistics and encodes the stored JPEG. One process, one thread each.
    """
    from PIL import Image

    from pretrain.config import IngestConfig
    from pretrain.ingest import SourceFile, hash_files, ingest_shard, process_bytes, sha256_bytes

    cv2.setNumThreads(1)  # per-core figures: OpenCV's own thread pool would make it per-machine
    rng = np.random.default_rng(0)
    photos = sample_photos()
    cfg = IngestConfig(normalize={"max_short_side": short_side}).model_dump(mode="json")
    target = (round(640 * short_side / 480), short_side)
    with tempfile.TemporaryDirectory(prefix="segfactory-bench-ingest-") as tmp:
        paths = []
        for i in range(n_images):
            img = _variant(photos[i % len(photos)], 640, 480, rng)
            p = Path(tmp) / f"img{i:05d}.jpg"
            cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
            paths.append(p)
        for p in paths:  # page cache warm for both contenders
            p.read_bytes()

        def plain() -> None:
            for p in paths:
                with Image.open(p) as im:
                    im.convert("RGB").resize(target)

        def ours() -> None:
            for p in paths:
                data = p.read_bytes()
                sha256_bytes(data)
                process_bytes(data, cfg)

        def best(fn: Any) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return n_images / min(times)

        plain_ips = best(plain)
        ours_ips = best(ours)
        # the whole shard task: read, hash, decode, normalize, write, fsync, manifest
        files = [SourceFile(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        hashed = hash_files(files, 100)
        t0 = time.perf_counter()
        ingest_shard({"shard_id": "0001-00000", "run": 1, "files": hashed, "rejected": []}, tmp + "/out", cfg)
        shard_ips = n_images / (time.perf_counter() - t0)
    result = {
        "bench": "ingest", "images": n_images, "source": "640x480 JPEG q90", "short_side": short_side,
        "plain_pil_images_per_s_per_core": round(plain_ips, 1), "ingest_core_images_per_s_per_core": round(ours_ips, 1),
        "speedup": round(ours_ips / plain_ips, 2), "ingest_shard_task_images_per_s_per_core": round(shard_ips, 1),
        "hardware": _hardware(), **_peak_host_mb(),
    }
    _table(f"bench ingest: {n_images} x 640x480 JPEG -> short side {short_side}, one core",
           ["pipeline", "images/s/core", "vs plain"],
           [["plain PIL open+convert+resize", f"{plain_ips:.1f}", "1.00x"],
            ["segfactory ingest core (reduced DCT decode, validate, hash, stats, encode)", f"{ours_ips:.1f}",
             f"{ours_ips / plain_ips:.2f}x"],
            ["  + shard task (file writes, fsync, manifest)", f"{shard_ips:.1f}", f"{shard_ips / plain_ips:.2f}x"]])
    return result


# ---------------------------------------------------------------------------------------------- augment


def _lightly_transform(method: str, crop: int, local_crop: int, n_local: int) -> Any:
    from lightly import transforms as lt

    if method == "simclr":
        return lt.SimCLRTransform(input_size=crop)
    if method == "moco":
        return lt.MoCoV2Transform(input_size=crop)
    if method in ("byol", "barlowtwins"):
        return lt.BYOLTransform(view_1_transform=lt.BYOLView1Transform(input_size=crop),
                                view_2_transform=lt.BYOLView2Transform(input_size=crop))
    if method == "dino":
        return lt.DINOTransform(global_crop_size=crop, local_crop_size=local_crop, n_local_views=n_local)
    if method == "vicreg":
        return lt.VICRegTransform(input_size=crop)
    raise ValueError(method)


class _PILDataset:
    """Per-sample baseline: PIL images through lightly's torchvision transform (as lightly's examples do)."""

    def __init__(self, images: list[Any], transform: Any):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[Any]:
        return self.transform(self.images[i])


def bench_augment(method: str = "simclr", n_images: int = 256, batch_size: int = 64, crop: int = 224,
                  device: str = "auto", workers: int | None = None, backbone: str | None = "resnet18"
                  ) -> dict[str, Any]:
    """Images/s of the kornia batched view pipeline vs lightly's per-sample transforms in a DataLoader.

    Both start from the same decoded (load_size x load_size) images, so decoding is not part of either figure.
    With ``backbone`` set, one training step (forward, backward, optimizer) of the method on the same views is
    timed too, giving the augmentation's share of a step on the device.
    """
    import torch
    from PIL import Image

    from pretrain.augment import ViewMaker, adjust_specs
    from pretrain.config import AugmentConfig, MethodConfig
    from pretrain.encoder import build_encoder
    from pretrain.methods import METHODS, build_method
    from segfactory.torchutil import resolve_device

    METHODS.get(method)
    dev = resolve_device(device)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    local_crop = max(16, crop * 96 // 224)
    load = round(crop * 8 / 7)
    rng = np.random.default_rng(0)
    photos = sample_photos()
    squares = [_variant(photos[i % len(photos)], load, load, rng) for i in range(n_images)]
    mcfg = MethodConfig(name=method)
    n_local = mcfg.dino.n_local_crops

    # baseline: lightly's torchvision transforms per sample, DataLoader over all cores
    pil = [Image.fromarray(s) for s in squares]
    ds = _PILDataset(pil, _lightly_transform(method, crop, local_crop, n_local))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                                         multiprocessing_context=loader_context(workers))
    for _ in loader:  # warm-up pass: worker start-up is not counted
        pass
    t0 = time.perf_counter()
    n_views_base = 0
    for batch in loader:
        n_views_base = len(batch)
    base_ips = n_images / (time.perf_counter() - t0)
    del loader

    # ours: uint8 batches -> device -> kornia views
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_method(method, build_encoder(backbone or "test_resnet", 3), mcfg, 1000)
    specs = adjust_specs(model.view_specs(crop, local_crop, None), AugmentConfig(crop_size=crop), single_channel=False)
    vm = ViewMaker(specs, [0.5] * 3, [0.25] * 3)
    u8 = torch.from_numpy(np.stack(squares)).permute(0, 3, 1, 2).contiguous()
    if dev.type == "cuda":
        u8 = u8.pin_memory()

    def run_views(d: torch.device) -> float:
        gen = torch.Generator().manual_seed(0)
        vm(u8[:batch_size].to(d), gen)  # warm-up (kernels, allocator)
        if d.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(0, n_images, batch_size):
            vm(u8[i:i + batch_size].to(d, non_blocking=True), gen)
        if d.type == "cuda":
            torch.cuda.synchronize()
        return n_images / (time.perf_counter() - t)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours_ips = run_views(dev)
    ours_cpu_ips = ours_ips if dev.type == "cpu" else run_views(torch.device("cpu"))
    result: dict[str, Any] = {
        "bench": "augment", "method": method, "images": n_images, "batch_size": batch_size, "crop_size": crop,
        "views": [s.size for s in specs], "device": str(dev), "baseline_workers": workers,
        "lightly_torchvision_images_per_s": round(base_ips, 1), "kornia_images_per_s": round(ours_ips, 1),
        "speedup": round(ours_ips / base_ips, 2), "kornia_cpu_images_per_s": round(ours_cpu_ips, 1),
        "baseline_views": n_views_base,
    }
    rows = [[f"lightly {type(ds.transform).__name__} per sample, DataLoader x{workers} workers", "cpu",
             f"{base_ips:.1f}", "1.00x"],
            [f"kornia batched views (batch {batch_size})", str(dev), f"{ours_ips:.1f}", f"{ours_ips / base_ips:.2f}x"]]
    if dev.type == "cuda":
        rows.append([f"kornia batched views (batch {batch_size})", "cpu", f"{ours_cpu_ips:.1f}",
                     f"{ours_cpu_ips / base_ips:.2f}x"])
    if backbone:
        model.to(dev).train()
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None
        gen = torch.Generator().manual_seed(1)
        x = u8[:batch_size].to(dev)

        def step() -> tuple[float, float]:
            t_a = time.perf_counter()
            views = vm(x, gen, channels_last=dev.type == "cuda")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_b = time.perf_counter()
            model.on_step_start(0)
            if amp is not None:
                with amp:
                    loss = model(views, 0)
            else:
                loss = model(views, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return t_b - t_a, time.perf_counter() - t_b

        step()  # warm-up
        timings = [step() for _ in range(3)]
        aug_s = float(np.median([a for a, _ in timings]))
        step_s = float(np.median([b for _, b in timings]))
        share = 100 * aug_s / (aug_s + step_s)
        result.update({"backbone": backbone, "train_step_ms": round(1000 * step_s, 1),
                       "augment_ms_per_batch": round(1000 * aug_s, 1), "augment_share_of_step_pct": round(share, 1),
                       "train_images_per_s": round(batch_size / (aug_s + step_s), 1)})
        rows.append([f"training step {backbone} ({method}, batch {batch_size}) incl. views", str(dev),
                     f"{batch_size / (aug_s + step_s):.1f}", f"views {share:.1f}% of the step"])
    if dev.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result.update(_peak_host_mb())
    result["hardware"] = _hardware()
    _table(f"bench augment: {method}, {n_images} images, crop {crop}, views {[s.size for s in specs]}",
           ["pipeline", "device", "images/s", "note"], rows)
    return result
