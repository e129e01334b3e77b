"""Looking at a dataset: contact sheets and class statistics (no Blender)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from segfactory.formats.dataset import Dataset, FrameRef, load_frame
from segfactory.io import read_json


def colorize_semantic(semantic: np.ndarray, classes: list[dict[str, Any]], ignore_index: int = 255) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 using the dataset's class colors (ignore = gray)."""
    lut = np.full((256, 3), 128, dtype=np.uint8)
    for c in classes:
        lut[c["id"]] = c["color"]
    lut[ignore_index] = (128, 128, 128)
    return lut[semantic]


def colorize_instances(instance: np.ndarray) -> np.ndarray:
    """(H, W) instance ids -> (H, W, 3) uint8, a distinct stable color per id, black for 0."""
    ids = instance.astype(np.int64)
    hue = (ids * 0.618033988749895) % 1.0
    import matplotlib.colors as mcolors

    hsv = np.stack([hue, np.full_like(hue, 0.75), np.full_like(hue, 0.95)], axis=-1)
    rgb = (mcolors.hsv_to_rgb(hsv) * 255).astype(np.uint8)
    rgb[ids == 0] = 0
    return rgb


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) uint16 depth -> (H, W, 3) uint8 (near = bright); 0 (no surface) is black."""
    import matplotlib

    valid = (depth > 0) & (depth < 65535)
    out = np.zeros((*depth.shape, 3), dtype=np.uint8)
    if valid.any():
        d = np.log(depth[valid].astype(np.float64))
        lo, hi = np.percentile(d, [1, 99])
        t = 1 - np.clip((d - lo) / max(hi - lo, 1e-9), 0, 1)
        out[valid] = (matplotlib.colormaps["magma"](t)[:, :3] * 255).astype(np.uint8)
    out[depth == 65535] = (20, 0, 30)
    return out


def to_display_rgb(rgb: np.ndarray) -> np.ndarray:
    """Any dataset RGB (gray/RGB, 8/16-bit) -> (H, W, 3) uint8.

    Single-channel images (microscopy) are auto-contrasted, as microscopy viewers show them: their 0.1th to
    99.9th percentiles span the display (a 12-bit camera frame with an offset of 32768 would be a flat gray
    otherwise). RGB keeps its values.
    """
    if rgb.ndim == 2:
        return np.repeat(stretch(rgb)[..., None], 3, axis=-1)
    if rgb.dtype == np.uint16:
        rgb = (rgb / 257).astype(np.uint8)
    return rgb


def stretch(img: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """(H, W) image -> uint8, mapping ``low``..``high`` (default: its 0.1th and 99.9th percentiles) to 0..255."""
    x = img.astype(np.float64)
    lo = float(np.percentile(x, 0.1)) if low is None else low
    hi = float(np.percentile(x, 99.9)) if high is None else high
    return np.clip(np.rint((x - lo) / max(hi - lo, 1e-9) * 255), 0, 255).astype(np.uint8)


def pick_frames(ds: Dataset, n: int) -> list[FrameRef]:
    frames = list(ds.frames())
    if len(frames) <= n:
        return frames
    idx = np.linspace(0, len(frames) - 1, n).round().astype(int)
    return [frames[i] for i in idx]


def contact_sheet(ds: Dataset, out: str | Path, n_frames: int = 6) -> Path:
    """Write a PNG grid: one row per frame with RGB | semantic | instances | depth, plus a class legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    frames = pick_frames(ds, n_frames)
    if not frames:
        raise ValueError("dataset has no committed frames")
    cols = ["RGB", "semantic", "instances", "depth"]
    fig, axes = plt.subplots(len(frames), 4, figsize=(10, 2.5 * len(frames) + 0.8), squeeze=False)
    for r, ref in enumerate(frames):
        f = load_frame(ref)
        panels = [to_display_rgb(f["rgb"]), colorize_semantic(f["semantic"], ds.classes, ds.ignore_index),
                  colorize_instances(f["instance"]), colorize_depth(f["depth"])]
        for c, img in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
        axes[r][0].set_ylabel(f"{ref.shard_id[:18]}\n{ref.name}", fontsize=6)
    handles = [Patch(color=np.array(c["color"]) / 255, label=c["name"]) for c in ds.classes]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    fig.suptitle(f"{ds.meta.get('family', '')} — {ds.root.name} ({len(ds.shard_ids)} shards)", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def dataset_stats(ds: Dataset) -> dict[str, Any]:
    """Class pixel shares and instance counts over all committed frames."""
    n = 256
    pixels = np.zeros(n, dtype=np.int64)
    frames = 0
    for ref in ds.frames():
        from segfactory.formats.imagefile import read_image

        pixels += np.bincount(read_image(ref.semantic).ravel(), minlength=n)
        frames += 1
    instances: dict[int, int] = {}
    areas: dict[int, list[float]] = {}
    for sid in ds.shard_ids:
        for a in read_json(ds.shard_dir(sid) / "coco.json")["annotations"]:
            instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
            areas.setdefault(a["category_id"], []).append(a["area"])
    total = max(int(pixels.sum()), 1)
    rows = []
    for c in ds.classes:
        rows.append({"id": c["id"], "name": c["name"], "pixel_share": pixels[c["id"]] / total,
                     "instances": instances.get(c["id"], 0) if c.get("thing") else None,
                     "mean_instance_area_px": float(np.mean(areas[c["id"]])) if areas.get(c["id"]) else None})
    return {"frames": frames, "shards": len(ds.shard_ids), "pixels": int(pixels.sum()),
            "ignore_share": pixels[ds.ignore_index] / total, "classes": rows}
