"""Export: a self-contained model dir, and ONNX with a parity check under onnxruntime.

The ONNX graph takes the *standardised* input (B, C, H, W) float32 (H, W multiples of 32; batch, height and
width are dynamic) and returns logits (B, K, H, W); a model with an instance head also returns
``instance_logits`` (B, 1, H, W), the logit of the normalised distance map (:mod:`finetune.instances`), turned
into instances by the steps of :data:`INSTANCE_RECIPE`. How to standardise is in model.json (``input``), which is
also embedded in the ONNX file's metadata (key ``segfactory.model``), with the recipe in words (key
``segfactory.recipe``, :data:`RECIPE`): the same steps as :func:`finetune.predict.prepare_input` and
:func:`finetune.predict.predict_mask`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.models import load_model_dir
from segfactory.errors import UserError
from segfactory.formats.model import META_FILE, ONNX_FILE, WEIGHTS_FILE, read_model_meta
from segfactory.io import atomic_write_bytes, ensure_writable_dir

RECIPE = ("1. resize the image by input.scale (area averaging when shrinking, bilinear when enlarging; with "
          "input.scale_mode per_image, by each image's own scale: run steps 1-6 at a scale, measure the median "
          "equivalent diameter of the input.object_classes components at the resized size (components of at least "
          "a quarter of input.object_px, not touching the border; with input.scale_by area the area-weighted "
          "median: the diameter d such that half of their pixels lie in components of diameter <= d), multiply "
          "the scale by input.object_px / that median, repeat up to 3 times from input.scale); "
          "2. scale to [0, 1] by input.scaling per whole image (auto: 8-bit /255, deeper 0.5..99.5 percentile "
          "stretch and clip; dtype: /255 or /65535; minmax; percentile); 3. gray -> 3 equal channels, or RGB -> "
          "BT.601 luma for in_chans 1; 4. (x - mean) / std per channel; 5. pad H, W to multiples of 32 "
          "(reflect), run, crop; 6. resize the softmax back to the image size (bilinear), argmax.")


INSTANCE_RECIPE = ("7. (instance head) sigmoid of instance_logits = normalised distance d, tiled and resized back "
                   "like the softmax; with f the input scale the image was run at: if instances.smooth > 0, "
                   "Gaussian-blur d with sigma instances.smooth / f; 8. for each class id in instances.things: seeds "
                   "= 4-connected components of (argmax == class and d > instances.seed_threshold), and if "
                   "instances.seed_h > 0 only where d (rounded to steps of 1/1000) is an h-maximum of height "
                   "seed_h (skimage.morphology.h_maxima); watershed on -d from the seeds within the class "
                   "(4-connectivity, skimage.segmentation.watershed); class regions no seed reaches are one "
                   "instance each; drop instances under round(instances.min_size / f**2) pixels; number 1..N "
                   "(0 = none).")

CLEANUP_RECIPE = ("6b. (model.json cleanup, when its min_object > 0) for each class id in cleanup.object_px, in "
                  "id order: every 8-connected component of (argmax == id) whose equivalent diameter "
                  "2 sqrt(area / pi) is under cleanup.min_object * object_px[id] / f pixels (f: the input scale "
                  "the image was run at) takes, pixel by pixel, the class of the largest softmax value without "
                  "that id.")


def parity_inputs(meta: dict[str, Any], sizes: list[tuple[int, int, int]]) -> list[np.ndarray]:
    """Standardised real-image inputs (crops of scikit-image's astronaut photo) of the given (B, H, W) sizes."""
    from finetune.predict import prepare_input
    from finetune.samples import skimage_data_path
    from segfactory.formats.imagefile import read_image

    img = read_image(skimage_data_path("astronaut.png"))  # (512, 512, 3) uint8
    # The graph starts after the resize by input.scale; parity needs standardised inputs of given shapes only.
    x = prepare_input(img, meta["input"], torch.device("cpu"), scale=1.0)
    out = []
    for b, h, w in sizes:
        crops = [x[:, 37 * i:37 * i + h, 29 * i:29 * i + w] for i in range(b)]
        out.append(torch.stack(crops).numpy().astype(np.float32))
    return out


# The lowest ONNX opset every architecture exports at: below it, smp's encoders fail on max-pool ceil padding
# (opset 9) and the FPN/DeepLabV3+ decoders on their bilinear upsampling (opset 10).
MIN_OPSET = 11


def max_opset() -> int:
    """The highest opset the installed torch's exporter writes (``torch.onnx`` refuses any above it)."""
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_MAX_OPSET", 20))


def check_export_settings(opset: int, atol: float) -> None:
    """Refuse an opset outside :data:`MIN_OPSET` .. :func:`max_opset` and a negative or NaN ``atol``.

    Raises:
        UserError: naming ``--opset`` or ``--atol``, the value and the valid range.
    """
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise UserError(f"--opset {opset} is outside {MIN_OPSET}..{top} (the opsets the installed torch exporter "
                        "writes for these models)", fix=f"pass --opset {MIN_OPSET}..{top}, e.g. 17 (the default)")
    if not atol >= 0:
        raise UserError(f"--atol {atol} is not a number >= 0",
                        fix="give the allowed max |logit difference|, e.g. --atol 1e-3")


def _one_line(e: BaseException) -> str:
    """An exporter's or onnxruntime's reason in one line (their messages go on with a graph dump)."""
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0]
    for tail in (" Please feel free", " [Caused by"):
        line = line.split(tail)[0]
    return line.strip()[:300]


def export_onnx(model_dir: str | os.PathLike, out_path: str | os.PathLike | None = None, *, opset: int = 17,
                atol: float = 1e-3) -> dict[str, Any]:
    """Write ``model.onnx`` and check it against PyTorch with onnxruntime (CPU).

    Args:
        model_dir: The model dir to export.
        out_path: ONNX file; default ``MODEL_DIR/model.onnx``.
        opset: ONNX opset.
        atol: Largest allowed absolute logit difference.

    Returns:
        ``{"onnx", "max_abs_diff", "argmax_agreement", "checked_shapes"}``.

    Raises:
        UserError: ``opset`` or ``atol`` is out of range (:func:`check_export_settings`), the exporter or
            onnxruntime fails (their one-line reason), or the exported graph disagrees with PyTorch beyond
            ``atol`` (nothing is written).
    """
    import onnx
    import onnxruntime as ort

    check_export_settings(opset, atol)
    from finetune.instances import JointOutputs

    model, meta = load_model_dir(model_dir, "cpu")
    joint = bool(meta.get("instances"))
    graph = JointOutputs(model).eval() if joint else model
    outputs = ["logits", "instance_logits"] if joint else ["logits"]
    recipe = RECIPE + (" " + CLEANUP_RECIPE if meta.get("cleanup") else "") + (" " + INSTANCE_RECIPE if joint else "")
    out_path = Path(out_path) if out_path else Path(model_dir) / ONNX_FILE
    c = int(meta["input"]["in_chans"])
    export_x = torch.from_numpy(parity_inputs(meta, [(1, 128, 160)])[0])
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo export, which needs onnxscript (not in
        # the pinned stack); it still produces correct graphs for these CNNs, as the parity check below proves.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, (export_x,), buf, dynamo=False, opset_version=opset, input_names=["image"],
                              output_names=outputs, do_constant_folding=True,
                              dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"},
                                            **{o: {0: "batch", 2: "height", 3: "width"} for o in outputs}})
        except (torch.onnx.OnnxExporterError, RuntimeError) as e:
            raise UserError(f"the ONNX exporter cannot write '{model_dir}' at opset {opset}: {_one_line(e)}",
                            fix=f"try another --opset ({MIN_OPSET}..{max_opset()}, default 17)") from None
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = "segfactory.model", json.dumps(meta)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "segfactory.recipe", recipe
    onnx.checker.check_model(proto)
    blob = proto.SerializeToString()
    try:
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (e.g. an opset newer than it runs)
        raise UserError(f"onnxruntime cannot load the ONNX graph of '{model_dir}' at opset {opset}: {_one_line(e)}",
                        fix=f"try a lower --opset ({MIN_OPSET}..{max_opset()}, default 17)") from None
    shapes = [(1, 128, 160), (2, 96, 64), (1, 256, 224)]
    max_diff, agree, total = 0.0, 0, 0
    with torch.no_grad():
        for x in parity_inputs(meta, shapes):
            refs = graph(torch.from_numpy(x))
            refs = [r.numpy() for r in (refs if joint else (refs,))]
            gots = sess.run(outputs, {"image": x})
            for r, g in zip(refs, gots, strict=True):
                max_diff = max(max_diff, float(np.abs(r - g).max()))
            ref, got = refs[0], gots[0]
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += ref.shape[0] * ref.shape[2] * ref.shape[3]
    if max_diff > atol:
        raise UserError(f"ONNX export of '{model_dir}' differs from PyTorch by {max_diff:.2e} > atol={atol:g} "
                        f"(argmax agreement {100 * agree / total:.3f} %); nothing was written",
                        fix=f"accept it with --atol {max_diff * 1.5:.1e}, or try another --opset (now {opset})")
    atomic_write_bytes(out_path, blob)
    return {"onnx": str(out_path), "max_abs_diff": max_diff, "argmax_agreement": agree / total, "atol": atol,
            "input_scale": float(meta["input"].get("scale", 1.0)),
            "input_scale_mode": meta["input"].get("scale_mode", "fixed"), "recipe": recipe, "outputs": outputs,
            "opset": opset, "checked_shapes": [[b, c, h, w] for b, h, w in shapes]}


def export_model_dir(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, onnx: bool = False,
                     opset: int = 17, atol: float = 1e-3) -> tuple[Path, dict[str, Any] | None]:
    """Copy a model dir (validated by loading it) to ``out_dir``, with ``model.onnx`` inside when ``onnx``.

    Everything is written to a hidden sibling of ``out_dir`` and swapped into place last, so a failed export
    (a refused opset, an exporter error, a parity check beyond ``atol``) leaves nothing behind (an earlier
    export in ``out_dir`` stays as it was).

    Returns:
        ``(out_dir, the ONNX report of :func:`export_onnx` or None)``.

    Raises:
        UserError: bad settings, ``out_dir`` holds something other than a model dir, or the ONNX export fails.
    """
    from finetune.models import save_model_dir
    from segfactory.io import commit_dir, remove_tree

    if onnx:
        check_export_settings(opset, atol)
    model, meta = load_model_dir(model_dir, "cpu")
    src, dst = Path(model_dir).resolve(), Path(out_dir).resolve()
    if src == dst:
        return dst, (export_onnx(dst, dst / ONNX_FILE, opset=opset, atol=atol) if onnx else None)
    if dst.exists() and any(dst.iterdir()) and not (dst / META_FILE).exists():
        raise UserError(f"export target '{dst}' exists and is not a model dir", fix="choose an empty --out")
    created = next((p for p in reversed((dst.parent, *dst.parent.parents)) if not p.exists()), None)
    ensure_writable_dir(dst.parent)
    keep = {k: v for k, v in meta.items() if k not in ("weights_sha256", "created", "code_version")}
    keep["lineage"] = {**meta.get("lineage", {}), "exported_from": str(src)}
    stage = dst.parent / f".{dst.name}.export-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    remove_tree(stage)
    try:
        save_model_dir(stage, model, keep)
        read_model_meta(stage)
        assert (stage / WEIGHTS_FILE).is_file()
        info = export_onnx(stage, stage / ONNX_FILE, opset=opset, atol=atol) if onnx else None
        if dst.exists():
            os.replace(dst, old)
        commit_dir(stage, dst)
    except BaseException:
        remove_tree(stage)
        if created is not None and not any(p.is_file() for p in created.rglob("*")):  # folders made for it
            remove_tree(created)
        raise
    remove_tree(old)
    if info is not None:
        info["onnx"] = str(dst / ONNX_FILE)
    return dst, info


def export_encoder(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the encoder of a fine-tuned model dir as an encoder directory (:mod:`segfactory.formats.encoder`),
    the format fine-tuning initialises from (``model.encoder_dir`` / ``--encoder``): e.g. an encoder trained with
    supervision on rendered frames, to compare with a self-supervised one on equal terms.

    The weights are the smp ``tu-`` encoder's timm ``features_only`` model (``model.encoder.model``); in_chans and
    the input standardisation are the model's own (model.json ``input``), so a fine-tune from it sees its inputs
    as the model did.

    Returns:
        The encoder directory.

    Raises:
        UserError: ``model_dir`` is not a loadable model dir.
    """
    from segfactory.formats.encoder import save_encoder

    model, meta = load_model_dir(model_dir, "cpu")
    body = model.encoder.model  # type: ignore[union-attr]
    arch, inp = meta["architecture"], meta["input"]
    lineage = meta.get("lineage") or {}
    return save_encoder(out_dir, body, timm_name=str(arch["encoder"]), in_chans=int(arch["in_chans"]),
                        normalization={"mean": list(inp["mean"]), "std": list(inp["std"])},
                        method="supervised", steps=int((lineage.get("training") or {}).get("step") or 0),
                        data_manifest_hash=None,
                        extra={"source_model": str(Path(model_dir).resolve()),
                               "source_weights_sha256": meta.get("weights_sha256"),
                               "source_classes": [c.get("name") for c in meta.get("classes", [])]})
