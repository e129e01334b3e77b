"""Looking at a dataset: contact sheets and class statistics (no Blender)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    out, tmp, fmt = sheet_paths(out)
    fig.savefig(tmp, dpi=110, format=fmt.lower())
    plt.close(fig)
    tmp.replace(out)
    return out


SHEET_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
"""Picture formats of ``segfactory show --out``, by suffix."""


def sheet_paths(out: str | Path) -> tuple[Path, Path, str]:
    """``(out, its temporary sibling with the same suffix, the format)``: a sheet is written in the format its name
    says (``sheet.jpg`` holds JPEG bytes, not PNG), under a temporary name, and renamed last.

    Raises:
        UserError: a suffix that is not a picture format.
    """
    from segfactory.errors import UserError

    out = Path(out)
    fmt = SHEET_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise UserError(f"--out '{out}' does not name a picture file", fix="end it in .png or .jpg")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out, out.with_name(f".{out.stem}.tmp{out.suffix}"), fmt


def real_images(folder: str | Path, n: int, exclude: Sequence[str] = ()) -> list[Path]:
    """``n`` image files picked evenly through a folder's sorted listing (deterministic).

    A labeled folder (``images/`` + ``masks/``) is read from its ``images/``; any other folder recursively.
    Hidden files and folders (``.name``) are skipped.

    Args:
        folder: An image folder.
        n: How many to pick (all of them if the folder holds ``n`` or fewer).
        exclude: Glob patterns (``fnmatch``) on file names; matching files are left out, e.g. ``*bus*``.

    Raises:
        UserError: ``folder`` is not a folder or holds no (not excluded) images.
    """
    from fnmatch import fnmatch

    from segfactory.errors import UserError
    from segfactory.formats.imagefile import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--beside: '{folder}' is not a folder", fix="pass an image folder or a sample reference "
                        "such as sample:street/unlabeled (see `segfactory samples list`)")
    if (root / "images").is_dir():
        root = root / "images"
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts)
                   and not any(fnmatch(p.name, g) for g in exclude))
    if not files:
        left_out = f" (after --exclude {' '.join(exclude)})" if exclude else ""
        raise UserError(f"--beside: folder '{folder}' holds no images{left_out} ({', '.join(IMAGE_SUFFIXES)})",
                        fix="pass a folder of real images")
    if len(files) <= n:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def square_tile(img: np.ndarray, size: int) -> np.ndarray:
    """Any image (gray/RGB, 8/16-bit, see :func:`to_display_rgb`) -> (size, size, 3) uint8: centre crop, resize."""
    from PIL import Image

    rgb = to_display_rgb(img)
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    crop = Image.fromarray(np.ascontiguousarray(rgb[y:y + s, x:x + s]))
    if s != size:
        crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(crop, dtype=np.uint8)


def beside_sheet(ds: Dataset, real: Sequence[tuple[str, str | Path]], out: str | Path, n_frames: int = 6,
                 tile: int = 192, exclude: Sequence[str] = (),
                 on_skip: Callable[[Path, str], None] | None = None) -> Path:
    """Write a PNG grid of rendered RGB frames above real images, to judge realism by eye.

    Row ``rendered``: ``n_frames`` frames picked as :func:`contact_sheet` picks them. Then one row per real
    folder: ``n_frames`` images picked evenly through its sorted listing (:func:`real_images`). Every tile is a
    centre square crop resized to ``tile`` pixels; gray and 16-bit images are shown as :func:`to_display_rgb`
    shows them. Row labels at the left.

    Args:
        ds: The rendered dataset.
        real: (label, folder) per real row; the label is printed at the row's left.
        out: PNG path.
        n_frames: Tiles per row.
        tile: Tile size in pixels.
        exclude: Glob patterns on real file names to leave out (:func:`real_images`).
        on_skip: Called with (file, why) for a picked real image that cannot be read (corrupt, not an image,
            above the pixel limit); the file is left out of its row. Default: a one-line note on the console.

    Raises:
        ValueError: the dataset has no committed frames.
        UserError: a real folder is missing, holds no images, or none of its picked images can be read.
    """
    from PIL import Image, ImageDraw, ImageFont

    from segfactory.errors import UserError
    from segfactory.formats.imagefile import read_image

    frames = pick_frames(ds, n_frames)
    if not frames:
        raise ValueError("dataset has no committed frames")
    picked = [(label, real_images(folder, n_frames, exclude)) for label, folder in real]  # fails before any work
    rows: list[tuple[str, list[np.ndarray]]] = [
        (f"rendered\n{ds.root.name}", [square_tile(load_frame(ref)["rgb"], tile) for ref in frames])]
    if on_skip is None:
        from segfactory.console import console

        def on_skip(path: Path, why: str) -> None:
            console.print(f"--beside: skipped one image: {why}", soft_wrap=True, markup=False)

    for (label, files), (_, folder) in zip(picked, real, strict=True):
        tiles = []
        for p in files:
            try:
                tiles.append(square_tile(read_image(p), tile))
            except UserError as e:
                on_skip(p, e.message)
        if not tiles:
            raise UserError(f"--beside: none of the {len(files)} image(s) picked from '{folder}' could be read",
                            fix="pass a folder of readable JPEG/PNG/TIFF images (or --exclude the broken ones)")
        rows.append((f"real\n{label}", tiles))
    font = ImageFont.load_default(size=14)
    title_font = ImageFont.load_default(size=16)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.multiline_textbbox((0, 0), label, font=font) for label, _ in rows]
    label_w, label_h = max(int(b[2]) for b in boxes), max(int(b[3]) for b in boxes)
    gap, margin, title_h = 6, 10, 28
    row_h = max(tile, label_h)  # tiny tiles: the label still fits its row
    cols = max(len(tiles) for _, tiles in rows)
    x0 = margin + label_w + 2 * gap
    width = x0 + cols * tile + (cols - 1) * gap + margin
    height = margin + title_h + len(rows) * row_h + (len(rows) - 1) * gap + margin
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    for r, (_, tiles) in enumerate(rows):
        y = margin + title_h + r * (row_h + gap) + (row_h - tile) // 2
        for c, t in enumerate(tiles):
            x = x0 + c * (tile + gap)
            canvas[y:y + tile, x:x + tile] = t
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    family = ds.meta.get("family", "")
    draw.text((margin, margin), f"{family}: {ds.root.name}, rendered frames beside real images", fill=(0, 0, 0),
              font=title_font)
    for r, (label, _) in enumerate(rows):
        y = margin + title_h + r * (row_h + gap) + row_h // 2
        draw.multiline_text((margin, y), label, fill=(0, 0, 0), font=font, anchor="lm")
    out, tmp, fmt = sheet_paths(out)
    im.save(tmp, format=fmt, optimize=True, **({"quality": 92} if fmt == "JPEG" else {}))
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
