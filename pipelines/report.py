"""The HTML run report of ``segfactory run``: one self-contained file (images embedded as base64 PNG/JPEG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from segfactory.config import read_yaml
from segfactory.io import atomic_write_text, read_json
from segfactory.plotting import figure_png


def _fig_png(fig: Any) -> bytes:
    return figure_png(fig, dpi=90, bbox_inches="tight")


def _img(data: bytes, mime: str = "image/png", width: int | None = None, caption: str = "") -> str:
    w = f' width="{width}"' if width else ""
    tag = f'<img{w} alt="{html.escape(caption)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>" if caption else tag


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _curve(points: list[tuple[float, float]], title: str, ylabel: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return _fig_png(fig)


def _bars(names: list[str], values: list[float], title: str, ylabel: str) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names)), 3))
    ax.bar(range(len(names)), values)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set(title=title, ylabel=ylabel)
    return _fig_png(fig)


def _val_miou(record: dict[str, Any]) -> float | None:
    val = record.get("val")
    if isinstance(val, dict):
        for key in ("selected", "miou"):
            if isinstance(val.get(key), int | float):
                return float(val[key])
        overall = val.get("overall")
        if isinstance(overall, dict) and isinstance(overall.get("miou"), int | float):
            return float(overall["miou"])
    return None


def _jpeg(png: bytes, quality: int = 85) -> bytes:
    """Overlay PNGs re-encoded as JPEG for embedding (a few times smaller)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    with Image.open(io.BytesIO(png)) as im:
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _real_section(real_eval: Path) -> str:
    """"Model vs classic baselines on real images": the table, the bar chart and the overlays."""
    report = read_json(real_eval / "metrics.json")
    real = report.get("real", {})
    inp = report.get("input", {})

    def f(v: float | None) -> str:
        return "\u2013" if v is None else f"{v:.3f}"

    rows = []
    notes = []
    for name, s in real.items():
        for row, r in s["rows"].items():
            inst = next(iter(r["instances"].values()), None) if r["instances"] else None
            cells = [name, row, f(r["fg_iou"]), f(inst and inst["f1"]), f(inst and inst["mean_matched_iou"]),
                     f(inst and inst["count_error"]), f(r["miou"])]
            rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        if isinstance(s["baselines"], str):
            notes.append(f"{name}: baselines {s['baselines']}")
        if s.get("labels"):
            notes.append(f"{name}: {s['labels']}")
        notes.extend(f"{name}: {n}" for n in s.get("notes", []))
        per = inp.get("scales", {}).get(name)
        if per:
            notes.append(f"{name}: each image resized by its own estimated input scale, median {per['median']:.3g} "
                         f"(range {per['min']:.3g}-{per['max']:.3g})")
    if any("model_watershed" in s["rows"] for s in real.values()):
        notes.append("model: the model's class map, objects = connected components; model_watershed: the same class "
                     "map, touching objects split by the instance head's watershed (settings chosen on rendered "
                     "frames: model.json 'instances')")
        if note := _seedless_note(report.get("model")):
            notes.append(note)
    if inp.get("scale") is not None and not inp.get("scales"):
        notes.append(f"real images resized by the model's input scale {float(inp['scale']):.3g}")
    if note := _tta_note(report.get("tta")):
        notes.append(f"model rows: {note}")
    if report.get("min_object"):
        notes.append(f"model rows: predicted components of a thing class under {float(report['min_object']):.3g} of "
                     "the class's rendered object size take their next most probable class (speck cleanup: "
                     "model.json 'cleanup')")
    table = ("<table border='1' cellpadding='4' style='border-collapse:collapse'><tr><th>real data</th><th>row</th>"
             "<th>foreground IoU</th><th>instance F1 (IoU &ge; 0.5)</th><th>mean matched IoU</th>"
             "<th>count error / image</th><th>mIoU</th></tr>" + "".join(rows) + "</table>")
    chart = real_eval / "real_scores.png"
    parts = ["<h2>Model vs baselines on real images</h2>",
             "<p>Real labeled images, scored against their reference masks; the classic baselines (Otsu, Gaussian "
             "blur + Otsu, objects = connected components) run on the same images. Where the reference masks are "
             "automatic segmentations (the built-in sample sets), the scores measure agreement, not accuracy.</p>",
             table, "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"]
    if chart.is_file():
        parts.append(_img(chart.read_bytes(), caption="model vs baselines on real images"))
    for name, s in real.items():
        for rel in s.get("overlays", []):
            p = real_eval / rel
            if p.is_file():
                parts.append(_img(_jpeg(p.read_bytes()), "image/jpeg", width=1000,
                                  caption=f"{name} {p.stem}: reference outlines green, each row in its colour"))
    return "".join(parts)


def _seedless_note(model_dir: str | None) -> str:
    """A note when the model's instance head gave the watershed no seed on its rendered validation frames (its
    calibration's ``peak_distance`` at or below ``seed_threshold``), so model_watershed equals model; else ''."""
    meta = Path(model_dir) / "model.json" if model_dir else None
    if meta is None or not meta.is_file():
        return ""
    inst = read_json(meta).get("instances") or {}
    peak = (inst.get("calibration") or {}).get("peak_distance")
    if peak is None or peak > float(inst.get("seed_threshold", 0.5)):
        return ""
    return (f"model_watershed: the instance head's distance map peaked at {float(peak):.2f} on the rendered "
            f"validation frames, not above its seed threshold {float(inst['seed_threshold']):.2f}: no seeds, so it "
            "splits nothing there (train longer or on larger crops)")


def _tta_note(tta: str | None) -> str:
    """"test-time augmentation MODE (what it averages)" for a recorded mode; "" for none."""
    return f"test-time augmentation {tta} ({tta_words(tta)})" if tta and tta != "none" else ""


def tta_words(tta: str) -> str:
    """What a test-time augmentation mode (``segfactory evaluate --tta``) averages, in words."""
    return {"flip": "mean of the identity, horizontal, vertical and both flips",
            "d4": "mean of the 8 flips and quarter turns",
            "ms": "mean of the whole image at 0.5-1.75x its input scale",
            "ms_flip": "mean of the whole image and its mirror image at 0.5-1.75x its input scale"}.get(tta, tta)


def write_report(path: Path, dataset: Path, pretrain: Path | None, finetune: Path, evaluate: Path,
                 predict: Path | None, scored_on: str, real_eval: Path | None = None, no_predictions: str = "") -> Path:
    """Write the run report: contact sheet, class histogram, loss/mIoU curves, IoU bars, confusion, overlays.

    ``scored_on`` says what the evaluation scored (held-out frames or the training data); ``real_eval`` is the
    evaluation dir of the real labeled folders (``eval.real``), reported first, next to the classic baselines;
    ``pretrain`` is None when fine-tuning started from a random encoder, ``predict`` when the run predicted no
    real image (``no_predictions`` says why). The test-time augmentation of each
    evaluation and of the predictions is the one their outputs record (``metrics.json``, ``predict.yaml``).
    """
    import tempfile

    from segfactory.formats.dataset import open_dataset
    from synth.viz import contact_sheet, dataset_stats

    ds = open_dataset(dataset)
    sections: list[str] = []
    if real_eval is not None:  # what users come for: the model on their real images, next to the baselines
        sections.append(_real_section(real_eval))
    with tempfile.TemporaryDirectory() as tmp:
        sheet = contact_sheet(ds, Path(tmp) / "sheet.png", 4)
        sheet_img = _img(sheet.read_bytes(), width=700, caption="contact sheet")
        sections.append(f"<h2>Synthetic data</h2><p>{ds.meta['num_frames']} frames in {ds.meta['num_shards']} "
                        f"shard(s), family {html.escape(ds.meta['family'])}</p>{sheet_img}")
    stats = dataset_stats(ds)
    shares = [100 * c["pixel_share"] for c in stats["classes"]]
    sections.append(_img(_bars([c["name"] for c in stats["classes"]], shares, "class pixel shares", "% of pixels"),
                         caption="class pixel shares"))
    if pretrain is not None:
        pre = [(r["step"], r["loss"]) for r in _jsonl(pretrain / "metrics.jsonl") if "loss" in r]
        curve = _img(_curve(pre, "pretraining loss", "loss"), caption="pretraining loss")
        sections.append(f"<h2>Pretraining</h2>{curve}")
    else:
        sections.append("<h2>Pretraining</h2><p>none: fine-tuning started from a randomly initialised encoder "
                        "(init: random)</p>")
    ft = _jsonl(finetune / "metrics.jsonl")
    loss = [(r["step"], r["loss"]) for r in ft if "loss" in r]
    miou = [(r["step"], m) for r in ft if (m := _val_miou(r)) is not None]
    sections.append(f"<h2>Fine-tuning</h2>{_img(_curve(loss, 'fine-tuning loss', 'loss'), caption='fine-tuning loss')}"
                    f"{_img(_curve(miou, 'validation mIoU', 'mIoU'), caption='validation mIoU')}")
    metrics = read_json(evaluate / "metrics.json")
    with_tta = f", {note}" if (note := _tta_note(metrics.get("tta"))) else ""
    overall = metrics["overall"]
    names = list(metrics["classes"])
    ious = [overall["per_class"][c]["iou"] or 0.0 for c in names]
    conf = evaluate / "confusion_overall.png"
    sections.append(f"<h2>Evaluation on synthetic frames</h2><p>Synthetic: mIoU {overall['miou']:.4f}, pixel accuracy "
                    f"{overall['pixel_accuracy']:.4f} on {html.escape(scored_on)}{with_tta}</p>"
                    f"{_img(_bars(names, ious, 'per-class IoU', 'IoU'), caption='per-class IoU')}"
                    + (_img(conf.read_bytes(), width=500, caption="confusion matrix") if conf.is_file() else ""))
    if predict is None:
        sections.append(f"<h2>Predictions on real images</h2><p>none: {html.escape(no_predictions)}</p>")
    else:
        overlays = sorted((predict / "overlays").glob("*.jpg"))
        recorded = predict / "predict.yaml"
        pred_note = _tta_note(read_yaml(recorded).get("tta")) if recorded.is_file() else ""
        sections.append("<h2>Predictions on real images</h2>"
                        + (f"<p>{html.escape(pred_note[0].upper() + pred_note[1:])}</p>" if pred_note else "")
                        + "".join(_img(p.read_bytes(), "image/jpeg", width=256, caption=p.stem) for p in overlays))
    doc = ("<!doctype html><html><head><meta charset='utf-8'><title>segfactory run report</title>"
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{margin:4px}</style></head><body>"
           "<h1>segfactory run report</h1>" + "\n".join(sections) + "</body></html>")
    atomic_write_text(path, doc)
    return path
