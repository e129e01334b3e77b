"""Is the encoder any good? A frozen-encoder dense linear probe against a random-init encoder.

Both encoders see the same frames, split, steps and probe-init seed. Features of every stage are resampled to
one grid (``feature_stride``), concatenated and standardized with train-set statistics; a single 1x1 conv
(the linear probe) is trained on them and its logits are upsampled bilinearly to the label resolution.
"""

from __future__ import annotations

import math
import os
import time
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
    """Load (and resize) up to ``max_frames`` frames of a rendered dataset.

    Returns:
        ``(images (N, C, S, S) float32, labels (N, S, S) int64, num_classes, ignore_index, class_names)``.
    """
    from segfactory.formats.dataset import load_frame, open_dataset

    ds = open_dataset(data_dir)
    refs = list(ds.frames())
    if len(refs) < 2:
        raise UserError(f"dataset '{data_dir}' has {len(refs)} finished frame(s); the probe needs at least 2",
                        fix="render more frames (or let the render finish)")
    if len(refs) > cfg.max_frames:
        pick = np.random.default_rng([cfg.seed, seeds.PROBE_FRAMES]).choice(len(refs), cfg.max_frames, replace=False)
        refs = [refs[i] for i in sorted(pick)]
    images, labels = [], []
    for ref in refs:
        fr = load_frame(ref)
        images.append(prepare_image(fr["rgb"], in_chans, cfg.image_size))
        labels.append(cv2.resize(fr["semantic"], (cfg.image_size, cfg.image_size), interpolation=cv2.INTER_NEAREST))
    return (np.stack(images), np.stack(labels).astype(np.int64), ds.num_classes, ds.ignore_index, ds.class_names)


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
                cfg: ProbeConfig, device: torch.device, desc: str) -> torch.nn.Module:
    """Fit the 1x1 conv on standardized features (labels (N, S, S))."""
    tr = feats[train_idx].float()
    mu = tr.mean(dim=(0, 2, 3), keepdim=True)
    sd = tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-4)
    g = torch.Generator().manual_seed(cfg.seed)
    conv = torch.nn.Conv2d(feats.shape[1], num_classes, 1)
    with torch.no_grad():
        conv.weight.normal_(0, 0.01, generator=g)
        conv.bias.zero_()
    probe = torch.nn.Sequential(_Standardize(mu, sd), conv).to(device)
    opt = torch.optim.AdamW(conv.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    rng = np.random.default_rng([cfg.seed, seeds.PROBE_BATCHES])
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


def run_probe(encoder_dir: str | os.PathLike, data_dir: str | os.PathLike, cfg: ProbeConfig) -> dict[str, Any]:
    """Probe an exported encoder and a random-init encoder of the same architecture on a labeled dataset.

    Returns:
        ``{"miou_encoder", "miou_random", ...}`` (per-class IoUs, split sizes, settings).
    """
    t0 = time.perf_counter()
    meta, body = create_timm_encoder(encoder_dir)
    in_chans = meta["in_chans"]
    device = resolve_device(cfg.device, "device")
    images, labels, num_classes, ignore, names = load_frames(data_dir, cfg, in_chans)
    n = len(images)
    perm = np.random.default_rng([cfg.seed, seeds.PROBE_SPLIT]).permutation(n)
    n_val = max(1, round(n * cfg.val_fraction))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    console.print(f"probe: {meta['timm_name']} ({meta['method']}, {meta['steps']} steps) on {len(train_idx)} train / "
                  f"{len(val_idx)} val frames at {cfg.image_size} px, {num_classes} classes, {cfg.steps} steps, "
                  f"{device}")
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    mean = torch.tensor(meta["normalization"]["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta["normalization"]["std"], device=device).view(1, -1, 1, 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        random_body = create_features_model(meta["timm_name"], in_chans, meta.get("timm_kwargs"))
    result: dict[str, Any] = {}
    for tag, net in (("encoder", body), ("random", random_body)):
        feats = dense_features(net, x, mean, std, cfg.feature_stride, device)
        probe = train_probe(feats, y, train_idx, num_classes, ignore, cfg, device, f"probe ({tag})")
        miou, ious = evaluate(probe, feats, y, val_idx, num_classes, ignore, device)
        result[f"miou_{tag}"] = round(miou, 4)
        result[f"iou_{tag}"] = {names[c]: (round(v, 4) if v is not None else None) for c, v in enumerate(ious)}
    result.update({"encoder": str(encoder_dir), "data": str(data_dir), "timm_name": meta["timm_name"],
                   "method": meta["method"], "encoder_steps": meta["steps"], "steps": cfg.steps,
                   "train_frames": len(train_idx), "val_frames": len(val_idx), "image_size": cfg.image_size,
                   "num_classes": num_classes, "seconds": round(time.perf_counter() - t0, 2)})
    console.print(f"mIoU: encoder {result['miou_encoder']:.4f} vs random init {result['miou_random']:.4f}")
    return result
