"""The model directory format: what ``segfactory finetune``/``export`` write and predict, evaluate and pipelines read.

A model dir is self-contained::

    MODEL/model.safetensors   state dict of the smp model
    MODEL/model.json          architecture, classes + colours, input normalisation, tiling defaults, lineage
                              (the encoder's origin and the training run), weights sha256 (written last)
    MODEL/model.onnx          optional ONNX export (``segfactory export``)
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any

from segfactory import code_version
from segfactory.errors import UserError
from segfactory.io import atomic_write_bytes, atomic_write_json, read_json, remove_tree, sha256_bytes

MODEL_FORMAT = "segfactory-model"
MODEL_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
ONNX_FILE = "model.onnx"
# The packages and shared core modules whose code decides a model's weights (recorded as its code_version).
WRITER_PACKAGES = ("finetune", "pretrain", "segfactory.augment", "segfactory.seeds", "segfactory.torchutil")


def write_model_dir(out_dir: str | os.PathLike[str], blob: bytes, meta: dict[str, Any]) -> Path:
    """Write a model dir atomically: a complete sibling directory is swapped in place of the old one.

    Args:
        out_dir: Target directory (replaced if it exists).
        blob: The safetensors bytes of the model's state dict.
        meta: model.json content without ``weights_sha256`` / ``created`` (added here).
    """
    out = Path(out_dir)
    full = {**meta, "weights_sha256": sha256_bytes(blob),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "code_version": code_version(*WRITER_PACKAGES)}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    remove_tree(tmp)
    tmp.mkdir(parents=True)
    atomic_write_bytes(tmp / WEIGHTS_FILE, blob)
    atomic_write_json(tmp / META_FILE, full)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    remove_tree(old)
    return out


_REQUIRED = ("format", "version", "architecture", "classes", "num_classes", "ignore_index", "input")


def read_model_meta(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``model.json`` (and that the weights file exists).

    Raises:
        UserError: naming the directory and the missing or corrupt file.
    """
    d = Path(model_dir)
    fix = "pass the model/ directory written by `segfactory finetune` (or `segfactory export`)"
    if not d.is_dir():
        raise UserError(f"model dir '{d}' does not exist", fix=fix)
    if (d / "model").is_dir() and not (d / META_FILE).exists():
        raise UserError(f"'{d}' is a training run, not a model dir", fix=f"pass '{d / 'model'}'")
    missing = [f for f in (META_FILE, WEIGHTS_FILE) if not (d / f).is_file()]
    if missing:
        raise UserError(f"model dir '{d}' is missing {' and '.join(missing)}", fix=fix)
    try:
        meta = read_json(d / META_FILE)
    except (OSError, ValueError) as e:
        raise UserError(f"'{d / META_FILE}' is corrupt ({e})", fix="re-export the model") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise UserError(f"'{d / META_FILE}' is not a segfactory model (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})", fix=fix)
    if meta.get("version") != MODEL_VERSION:
        raise UserError(f"'{d / META_FILE}' has version {meta.get('version')!r}; this segfactory reads "
                        f"{MODEL_VERSION}", fix="re-export the model with this segfactory version")
    lacking = [k for k in _REQUIRED if k not in meta]
    if lacking:
        raise UserError(f"'{d / META_FILE}' lacks {', '.join(lacking)}", fix="re-export the model")
    return meta




def read_model_weights(model_dir: str | os.PathLike[str], meta: dict[str, Any]) -> bytes:
    """The weights file's bytes, checked against model.json's sha256.

    Raises:
        UserError: the weights do not match model.json.
    """
    d = Path(model_dir)
    blob = (d / WEIGHTS_FILE).read_bytes()
    if meta.get("weights_sha256") and sha256_bytes(blob) != meta["weights_sha256"]:
        raise UserError(f"'{d / WEIGHTS_FILE}' does not match model.json (sha256 differs: corrupt or from "
                        "another model)", fix="re-export the model dir")
    return blob
