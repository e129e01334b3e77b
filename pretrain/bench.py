"""Benchmarks: ``segfactory bench ingest`` and ``segfactory bench augment``.

Each prints one JSON object on stdout (returned here) and a table on stderr. Inputs are made from the real
sample photographs that ship with scikit-image, scikit-learn and matplotlib.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from segfactory.console import console
from segfactory.formats.imagefile import cv2_imread
from segfactory.workers import loader_context

if TYPE_CHECKING:
    import torch

    from pretrain.augment import ViewSpec


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
        img = cv2_imread(p, cv2.IMREAD_COLOR)  # without libpng's warnings about skimage's colour profiles
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
    if method in ("moco", "densecl"):  # DenseCL trains on MoCo v2's views
        return lt.MoCoV2Transform(input_size=crop)
    if method in ("byol", "barlowtwins"):
        return lt.BYOLTransform(view_1_transform=lt.BYOLView1Transform(input_size=crop),
                                view_2_transform=lt.BYOLView2Transform(input_size=crop))
    if method == "dino":
        return lt.DINOTransform(global_crop_size=crop, local_crop_size=local_crop, n_local_views=n_local)
    if method == "vicreg":
        return lt.VICRegTransform(input_size=crop)
    raise ValueError(method)


class _SquaresDataset:
    """Per-sample baseline: PIL images through lightly's torchvision transform (as lightly's examples do).

    The decoded squares are one (N, L, L, 3) uint8 ``.npy`` file that each DataLoader worker memory-maps, so the
    workers share the page cache instead of receiving a pickled copy of every image at start-up.
    """

    def __init__(self, path: str, transform: Any):
        self.path = path
        self.transform = transform
        self._squares: np.ndarray | None = None

    def __len__(self) -> int:
        return int(np.load(self.path, mmap_mode="r").shape[0])

    def __getitem__(self, i: int) -> list[Any]:
        from PIL import Image

        if self._squares is None:
            self._squares = np.load(self.path, mmap_mode="r")
        return self.transform(Image.fromarray(np.ascontiguousarray(self._squares[i])))


def tv2_transform(spec: ViewSpec) -> Any:
    """One view of ``spec`` for ONE image with ``torchvision.transforms.v2``, on float [0, 1] (C, L, L) tensors.

    The ops, their order and their parameters are :func:`pretrain.augment.apply_view`'s: random resized crop
    (bilinear, no antialias, as kornia's affine warp), flips, colour jitter with probability ``jitter_p``,
    grayscale, Gaussian blur (same kernel size and sigma range), solarize at 0.5. Differences v2 does not let us
    remove: hue is shifted in HSV (kornia path: a rotation of the YUV chroma plane); the jitter order is drawn per
    image (kornia path: per batch); crop boxes are whole pixels, and after 10 failed draws torchvision falls back
    to a central crop (kornia path: sub-pixel boxes, clamped). v2 draws one parameter set per call, so per-sample
    variety takes one call per image.

    Raises:
        NotImplementedError: ``spec.rot90`` (v2 has no random quarter turn; no method's default views use it).
    """
    from torchvision.transforms import v2

    from segfactory.augment import GaussianBlur

    if spec.rot90:
        raise NotImplementedError("rot90: torchvision v2 has no random quarter-turn transform")
    ops: list[Any] = [v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=False)]
    if spec.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(spec.hflip))
    if spec.vflip > 0:
        ops.append(v2.RandomVerticalFlip(spec.vflip))
    if spec.jitter_p > 0 and max(spec.brightness, spec.contrast, spec.saturation, spec.hue) > 0:
        ops.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                                  p=spec.jitter_p))
    if spec.gray_p > 0:
        ops.append(v2.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        k = GaussianBlur(spec.blur_p, spec.sigma).kernel_size(spec.size)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, spec.sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        ops.append(v2.RandomSolarize(0.5, p=spec.solarize_p))
    return v2.Compose(ops)


class TorchvisionV2Views:
    """:class:`pretrain.augment.ViewMaker`'s views made with ``torchvision.transforms.v2``, image by image.

    The pixel work runs on the batch's device; the parameters come from torch's global CPU generator (v2 has no
    generator argument), so callers seed it inside ``torch.random.fork_rng``.

    Args:
        specs: One spec per view.
        mean, std: Per-channel input normalization (length C).
    """

    def __init__(self, specs: list[ViewSpec], mean: list[float], std: list[float]):
        import torch

        self.transforms = [tv2_transform(s) for s in specs]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, batch: torch.Tensor, channels_last: bool = False) -> list[torch.Tensor]:
        """(B, C, L, L) uint8 -> list of (B, C, size_i, size_i) float views, normalized."""
        import torch

        x = batch.float().div_(255.0)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        views = []
        for t in self.transforms:
            v = (torch.stack([t(img) for img in x]) - mean) / std
            views.append(v.contiguous(memory_format=torch.channels_last) if channels_last else v)
        return views


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()[:300]


def _all_cores() -> int:
    """CPU cores this process may run on (the container's share, not the host's count where they differ)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def bench_augment(method: str = "simclr", n_images: int = 256, batch_size: int = 64, crop: int = 224,
                  device: str = "auto", workers: int | None = None, backbone: str | None = "resnet18",
                  steps: int = 3) -> dict[str, Any]:
    """Images/s of view generation: lightly per sample on the CPU vs kornia and torchvision v2 on ``device``.

    Rows (each fail-soft: an exception becomes the row's ``"error"`` and the other rows still run):

    - ``lightly``: lightly's per-sample torchvision transform in a DataLoader over ``workers`` processes (default:
      all cores), on the CPU.
    - ``kornia``: :class:`pretrain.augment.ViewMaker`, batches of ``batch_size`` on ``device`` (what pretraining
      uses); on CUDA also ``kornia_cpu``, the same on the CPU as a reference (one batch of at most 32 images).
    - ``torchvision_v2``: :class:`TorchvisionV2Views`, the same recipe with ``torchvision.transforms.v2`` on
      ``device``, one image at a time (v2 draws one parameter set per call), timed on at most 2 batches.
    - with ``backbone`` set, ``step_kornia`` / ``step_torchvision_v2``: a full pretraining step of the method on
      ``device`` (views, forward, backward, optimizer; bf16 autocast and channels_last on CUDA), median of
      ``steps`` after one warm-up, with ``augment_share_pct`` = view time / step time. Pretraining makes its views
      inside the step, so this share is the step's wait for data beyond the decode workers.

    All rows start from the same decoded (load x load, load = crop * 8 / 7) uint8 squares (at most 256 distinct
    ones, repeated), so decoding is not in any figure. Device timings synchronize CUDA before reading the clock.

    Returns:
        The JSON object: ``rows`` (``name``, ``pipeline``, ``device``, ``images_per_s`` or ``error``, ...), and
        the flat keys of earlier versions (``kornia_images_per_s``, ``speedup``, ``augment_share_of_step_pct``,
        ...; ``None`` where their row failed) plus ``torchvision_v2_*``, ``augment_share_pct`` and
        ``faster_views``.
    """
    import torch

    from pretrain.augment import ViewMaker, adjust_specs
    from pretrain.config import AugmentConfig, MethodConfig
    from pretrain.encoder import build_encoder
    from pretrain.methods import METHODS, build_method
    from segfactory.errors import UserError
    from segfactory.torchutil import resolve_device

    METHODS.get(method)
    for flag, value in (("--images", n_images), ("--batch-size", batch_size), ("--steps", steps)):
        if value < 1:
            raise UserError(f"{flag}={value} must be at least 1", fix=f"pass {flag} 1 or more")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    workers = workers if workers is not None else _all_cores()
    local_crop = max(16, crop * 96 // 224)
    load = round(crop * 8 / 7)
    rng = np.random.default_rng(0)
    photos = sample_photos()
    # at most 256 distinct squares, repeated: neither pipeline caches, and cutting thousands costs seconds
    distinct = [_variant(photos[i % len(photos)], load, load, rng) for i in range(min(n_images, 256))]
    squares = np.stack([distinct[i % len(distinct)] for i in range(n_images)])
    mcfg = MethodConfig(name=method)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_method(method, build_encoder(backbone or "test_resnet", 3), mcfg, 1000)
    specs = adjust_specs(model.view_specs(crop, local_crop, None), AugmentConfig(crop_size=crop), single_channel=False)
    mean, std = [0.5] * 3, [0.25] * 3
    vm = ViewMaker(specs, mean, std)
    u8 = torch.from_numpy(squares).permute(0, 3, 1, 2).contiguous()
    if cuda:
        u8 = u8.pin_memory()
        torch.cuda.reset_peak_memory_stats(dev)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    rows: list[dict[str, Any]] = []

    def row(name: str, pipeline: str, on: str, fn: Any) -> dict[str, Any]:
        r: dict[str, Any] = {"name": name, "pipeline": pipeline, "device": on}
        try:
            r.update(fn())
        except Exception as e:  # fail-soft: a failing row is reported, the others still run
            r.update({"images_per_s": None, "error": _one_line(e)})
            if cuda:
                torch.cuda.empty_cache()
        rows.append(r)
        return r

    # baseline: lightly's torchvision transforms per sample, DataLoader over all cores
    def lightly() -> dict[str, Any]:
        transform = _lightly_transform(method, crop, local_crop, mcfg.dino.n_local_crops)
        with tempfile.TemporaryDirectory(prefix="segfactory-bench-augment-") as tmp:
            path = str(Path(tmp) / "squares.npy")
            np.save(path, squares)
            loader = torch.utils.data.DataLoader(
                _SquaresDataset(path, transform), batch_size=batch_size, num_workers=workers,
                persistent_workers=workers > 0, multiprocessing_context=loader_context(workers))
            for _ in loader:  # warm-up pass: worker start-up is not counted
                pass
            t0 = time.perf_counter()
            n_views = 0
            for batch in loader:
                n_views = len(batch)
            ips = n_images / (time.perf_counter() - t0)
            del loader
        return {"images_per_s": round(ips, 1), "views": n_views, "transform": type(transform).__name__}

    base = row("lightly", "lightly per-sample torchvision transform, DataLoader", "cpu", lightly)
    base_ips = base.get("images_per_s")

    def views_per_s(make: Any, on: torch.device, n: int) -> float:
        """Images/s of ``make`` (uint8 batch on ``on`` -> views) over the first ``n`` squares, after a warm-up."""
        make(u8[:min(batch_size, n)].to(on))  # warm-up (kernels, allocator)
        sync()
        t = time.perf_counter()
        for i in range(0, n, batch_size):
            make(u8[i:min(i + batch_size, n)].to(on, non_blocking=True))
        sync()
        return n / (time.perf_counter() - t)

    def vs_base(ips: float) -> dict[str, Any]:
        return {"images_per_s": round(ips, 1), "vs_lightly": round(ips / base_ips, 2) if base_ips else None}

    def kornia_views(on: torch.device, n: int) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(0)
        return vs_base(views_per_s(lambda b: vm(b, gen), on, n))

    def tv2_views(n: int) -> dict[str, Any]:
        tv = TorchvisionV2Views(specs, mean, std)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return {**vs_base(views_per_s(tv, dev, n)), "images": n}

    kornia = row("kornia", f"kornia batched views (batch {batch_size})", str(dev), lambda: kornia_views(dev, n_images))
    # per image, the rate is steady after a few images: two batches are enough
    n_tv2 = min(n_images, 2 * batch_size)
    tv2 = row("torchvision_v2", "torchvision v2 on device, per image", str(dev), lambda: tv2_views(n_tv2))
    if cuda:  # a reference only, and CPU float ops at full crop size are slow: 32 images
        n_cpu = min(n_images, batch_size, 32)
        kornia_cpu = row("kornia_cpu", f"kornia batched views (batch {n_cpu})", "cpu",
                         lambda: {**kornia_views(torch.device("cpu"), n_cpu), "images": n_cpu})
    else:
        kornia_cpu = kornia

    steps_by: dict[str, dict[str, Any]] = {}
    if backbone:
        train: dict[str, Any] = {}

        def setup() -> dict[str, Any]:
            if not train:
                model.to(dev).train()
                if cuda:
                    model.to(memory_format=torch.channels_last)
                train["opt"] = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                train["x"] = u8[:batch_size].to(dev)
            return train

        def step_row(make: Any) -> dict[str, Any]:
            t = setup()
            opt, x = t["opt"], t["x"]

            def step() -> tuple[float, float]:
                t_a = time.perf_counter()
                views = make(x)
                sync()
                t_b = time.perf_counter()
                model.on_step_start(0)
                with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
                    loss = model(views, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sync()
                return t_b - t_a, time.perf_counter() - t_b

            step()  # warm-up
            timings = [step() for _ in range(steps)]
            aug_s = float(np.median([a for a, _ in timings]))
            step_s = float(np.median([b for _, b in timings]))
            share = 100 * aug_s / (aug_s + step_s)
            return {"images_per_s": round(x.shape[0] / (aug_s + step_s), 1), "backbone": backbone,
                    "batch_size": int(x.shape[0]), "augment_ms_per_batch": round(1000 * aug_s, 1),
                    "train_step_ms": round(1000 * step_s, 1), "augment_share_pct": round(share, 1),
                    "data_bound": share >= 10.0}

        def step_kornia() -> dict[str, Any]:
            gen = torch.Generator().manual_seed(1)
            return step_row(lambda b: vm(b, gen, channels_last=cuda))

        def step_tv2() -> dict[str, Any]:
            tv = TorchvisionV2Views(specs, mean, std)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                return step_row(lambda b: tv(b, channels_last=cuda))

        what = f"{backbone} {method} training step (batch {batch_size}) incl."
        steps_by["kornia"] = row("step_kornia", f"{what} kornia views", str(dev), step_kornia)
        steps_by["torchvision_v2"] = row("step_torchvision_v2", f"{what} torchvision v2 views", str(dev), step_tv2)

    ok = {r["name"]: r["images_per_s"] for r in rows if r.get("images_per_s")}
    contenders = [k for k in ("kornia", "torchvision_v2") if k in ok]
    faster = max(contenders, key=lambda k: ok[k]) if contenders else None
    notes = []
    if workers > 0 and -(-n_images // batch_size) < workers:
        notes.append(f"baseline: {-(-n_images // batch_size)} batches for {workers} workers, so some sat idle; "
                     f"use --images >= {batch_size * workers} (batch size x workers) for a full-machine figure")
    sk = steps_by.get("kornia", {})
    st = steps_by.get("torchvision_v2", {})
    result: dict[str, Any] = {
        "bench": "augment", "method": method, "images": n_images, "batch_size": batch_size, "crop_size": crop,
        "views": [s.size for s in specs], "device": str(dev), "baseline_workers": workers,
        "lightly_torchvision_images_per_s": base_ips, "kornia_images_per_s": kornia.get("images_per_s"),
        "speedup": kornia.get("vs_lightly"), "kornia_cpu_images_per_s": kornia_cpu.get("images_per_s"),
        "baseline_views": base.get("views"),
        "torchvision_v2_images_per_s": tv2.get("images_per_s"), "torchvision_v2_speedup": tv2.get("vs_lightly"),
        "faster_views": faster, "rows": rows,
        "errors": [f"{r['name']}: {r['error']}" for r in rows if "error" in r], "notes": notes,
    }
    if backbone:
        result.update({"backbone": backbone, "train_step_ms": sk.get("train_step_ms"),
                       "augment_ms_per_batch": sk.get("augment_ms_per_batch"),
                       "augment_share_of_step_pct": sk.get("augment_share_pct"),
                       "augment_share_pct": sk.get("augment_share_pct"), "train_images_per_s": sk.get("images_per_s"),
                       "torchvision_v2_augment_ms_per_batch": st.get("augment_ms_per_batch"),
                       "torchvision_v2_augment_share_pct": st.get("augment_share_pct"),
                       "torchvision_v2_train_images_per_s": st.get("images_per_s")})
    if cuda:
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    result.update(_peak_host_mb())
    result["hardware"] = _hardware()

    def note(r: dict[str, Any]) -> str:
        if "error" in r:
            return f"error: {r['error']}"
        if "augment_share_pct" in r:
            return f"views {r['augment_share_pct']}% of the step ({r['augment_ms_per_batch']} ms of " \
                   f"{r['augment_ms_per_batch'] + r['train_step_ms']:.1f} ms)"
        return f"{r['vs_lightly']:.2f}x" if r.get("vs_lightly") else ("1.00x" if r["name"] == "lightly" else "")

    label = {"lightly": f"lightly {base.get('transform', '')} per sample, DataLoader x{workers} workers"}
    _table(f"bench augment: {method}, {n_images} images, crop {crop}, views {[s.size for s in specs]}",
           ["pipeline", "device", "images/s", "note"],
           [[label.get(r["name"], r["pipeline"]), r["device"],
             "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.1f}", note(r)] for r in rows])
    for n in notes:
        console.print(f"note: {n}")
    return result


# ----------------------------------------------------------------------------------------------- loader


def bench_loader(images: str | os.PathLike[str], workers: int | None = None, batch_size: int = 64, crop: int = 224,
                 batches: int = 50, cache_mb: float = 512, order: str = "random", in_chans: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Images/s of the pretraining loader (:func:`pretrain.images.make_loader`) on an ingest store, without and
    with the frame cache, in one run.

    Rows: ``uncached`` (``data.cache_mb=0``: every sample decoded, as before the cache) and ``cached``
    (``cache_mb``), each with 1 worker and with ``workers`` (default: the training default, CPU count - 1, at most
    8). Each row starts its own DataLoader, takes one batch per worker untimed (worker start-up), then times
    ``batches`` batches (host side only: no pinning, no device); ``cache_hit_pct`` is over the whole row. Both
    rows give the same batches (the cache changes no pixel). ``per_image_ms`` breaks one image's cost down in
    this process on one thread (read bytes, decode, resize, cut + write into the batch) over up to 256 images.

    Returns:
        The JSON object: ``rows`` (``name``, ``workers``, ``cache_mb``, ``images_per_s``,
        ``images_per_s_per_worker``, ``cache_hit_pct``, ``cache_mb_used``), ``speedup`` (cached / uncached with
        ``workers``), ``per_image_ms``, the store and the hardware.
    """

    from pretrain.images import cache_stats, cut_square, decode_for, make_loader, new_cache_stats, resize_short
    from segfactory.errors import UserError
    from segfactory.formats.images import open_images, read_entry_bytes

    for flag, value in (("--batch-size", batch_size), ("--batches", batches), ("--crop-size", crop)):
        if value < 1:
            raise UserError(f"{flag}={value} must be at least 1", fix=f"pass {flag} 1 or more")
    if order not in ("random", "stream"):
        raise UserError(f"--order={order} is not an order", fix="pass --order random or --order stream")
    data = open_images(images)
    load = round(crop * 8 / 7)
    entries = [e for e in data.entries if min(e.height, e.width) >= crop] or data.entries
    chans = in_chans or (1 if data.num_gray == len(data.entries) else 3)
    workers = workers if workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))

    cv2.setNumThreads(1)
    sample = entries[:256]
    raw = [read_entry_bytes(e) for e in sample]  # page cache warm for every figure
    t0 = time.perf_counter()
    raw = [read_entry_bytes(e) for e in sample]
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = [decode_for(e, load, chans, b) for e, b in zip(sample, raw, strict=True)]
    t_decode = time.perf_counter() - t0
    t0 = time.perf_counter()
    frames = [resize_short(img, load) for img in decoded]
    t_resize = time.perf_counter() - t0
    out = np.empty((len(frames), chans, load, load), np.uint8)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i, f in enumerate(frames):
        out[i] = cut_square(f, load, rng).transpose(2, 0, 1)
    t_cut = time.perf_counter() - t0
    n = len(sample)
    per_image = {"read_bytes": round(1000 * t_read / n, 3), "decode": round(1000 * t_decode / n, 3),
                 "resize": round(1000 * t_resize / n, 3), "cut_into_batch": round(1000 * t_cut / n, 3)}
    frame_mb = round(float(np.mean([f.nbytes for f in frames])) / 2**20, 4)  # a size: not among the times
    del decoded, frames

    rows: list[dict[str, Any]] = []
    for name, mb in (("uncached", 0.0), ("cached", cache_mb)):
        for w in sorted({1, workers}):
            stats = new_cache_stats(w)
            loader = make_loader(entries, load, chans, batch_size, seed, 0, w, pin_memory=False, prefetch_factor=4,
                                 stream=order == "stream", cache_mb=mb, cache_stats=stats)
            it = iter(loader)
            for _ in range(max(1, w)):  # worker start-up is not counted
                next(it)
            t0 = time.perf_counter()
            for _ in range(batches):
                next(it)
            dt = time.perf_counter() - t0
            del it, loader
            cs = cache_stats(stats)
            ips = batches * batch_size / dt
            rows.append({"name": name, "workers": w, "cache_mb": mb, "images_per_s": round(ips, 1),
                         "images_per_s_per_worker": round(ips / max(1, w), 1),
                         "cache_hit_pct": cs["cache_hit_pct"], "cache_mb_used": cs["cache_mb"]})
    by = {(r["name"], r["workers"]): r["images_per_s"] for r in rows}
    seen = (workers + batches) * batch_size  # samples drawn per row
    result: dict[str, Any] = {
        "bench": "loader", "images_dir": str(images), "images": len(entries), "in_chans": chans, "order": order,
        "load_size": load, "crop_size": crop, "batch_size": batch_size, "batches": batches, "workers": workers,
        "epochs_per_row": round(seen / len(entries), 2), "cache_mb": cache_mb, "per_image_ms": per_image,
        "frame_mb": frame_mb,
        "uncached_images_per_s": by[("uncached", workers)], "cached_images_per_s": by[("cached", workers)],
        "speedup": round(by[("cached", workers)] / by[("uncached", workers)], 2), "rows": rows,
        "hardware": _hardware(), **_peak_host_mb(),
    }
    _table(f"bench loader: {len(entries)} images, load {load}, batch {batch_size}, {batches} batches "
           f"({result['epochs_per_row']} epochs per row), order {order}",
           ["loader", "workers", "images/s", "images/s/worker", "cache hit %"],
           [[f"{r['name']} (cache_mb={r['cache_mb']:g})", str(r["workers"]), f"{r['images_per_s']:.1f}",
             f"{r['images_per_s_per_worker']:.1f}", f"{r['cache_hit_pct']:.1f}"] for r in rows])
    console.print("per image, one thread (ms): " + ", ".join(f"{k} {v}" for k, v in per_image.items())
                  + f"; decoded frame: {frame_mb} MB")
    return result
