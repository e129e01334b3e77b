"""The encoder directory format: ``encoder.safetensors`` + ``encoder.json``, written by pretraining and read by
fine-tuning, probing and anyone loading an encoder into timm or smp.

Layout of an encoder directory::

    ENCODER/encoder.safetensors   state dict of timm.create_model(timm_name, features_only=True,
                                  in_chans=in_chans, pretrained=False) == smp Unet("tu-" + timm_name).encoder.model
    ENCODER/encoder.json          metadata (written last: the directory's commit mark)

``encoder.json``::

    {"format": "segfactory-encoder", "version": 1, "timm_name": "resnet18", "in_chans": 3,
     "feature_channels": [64, 64, 128, 256, 512], "feature_strides": [2, 4, 8, 16, 32],
     "normalization": {"mean": [...], "std": [...]},      # applied to inputs scaled to [0, 1]
     "method": "simclr", "steps": 1000, "data_manifest_hash": "...", "created": "...", "code_version": "...",
     "timm_kwargs": {}, "smp_compatible": true, "weights_sha256": "..."}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segfactory import code_version
from segfactory.errors import UserError
from segfactory.io import atomic_write_bytes, atomic_write_json, sha256_bytes

if TYPE_CHECKING:  # torch is imported only by the functions that need it
    import torch
    from torch import nn

FORMAT = "segfactory-encoder"
VERSION = 1
WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"
REQUIRED_KEYS = ("format", "version", "timm_name", "in_chans", "feature_channels", "feature_strides",
                 "normalization", "method", "steps", "data_manifest_hash", "created", "code_version")


def save_encoder(out_dir: str | os.PathLike[str], body: nn.Module, *, timm_name: str, in_chans: int,
                 normalization: Mapping[str, list[float]], method: str, steps: int,
                 data_manifest_hash: str | None, timm_kwargs: Mapping[str, Any] | None = None,
                 smp_compatible: bool = True, extra: Mapping[str, Any] | None = None) -> Path:
    """Write an encoder directory (weights first, ``encoder.json`` last, both atomically).

    Args:
        out_dir: Directory to write (created if needed; an existing export is replaced).
        body: The ``features_only`` timm model (outputs a list of (B, C_i, H / s_i, W / s_i) maps).
        timm_name: timm model name ``body`` was created from.
        in_chans: Input channels.
        normalization: ``{"mean": [...], "std": [...]}`` (one value per channel) for inputs in [0, 1].
        method: SSL method that trained it ("simclr", ... or "random" for an untrained init).
        steps: Optimizer steps trained.
        data_manifest_hash: ``data_hash`` of the ingested images' ``index.json`` (None if not from ingest).
        timm_kwargs: Extra ``create_model`` kwargs that do not change the state dict (e.g. ViT's
            ``dynamic_img_size``).
        smp_compatible: Whether segmentation-models-pytorch's ``tu-`` encoder accepts this architecture.
        extra: More metadata to record (seed, config hash, ...).

    Returns:
        The encoder directory.
    """
    from safetensors.torch import save
    from timm.models import FeatureInfo

    info = getattr(body, "feature_info", None)
    if not isinstance(info, FeatureInfo):
        raise TypeError(f"save_encoder needs a features_only timm model, got a {type(body).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # contiguous CPU copies: safetensors refuses shared or strided storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in body.state_dict().items()}
    blob = save(state, metadata={"format": FORMAT, "timm_name": timm_name})
    for key in ("mean", "std"):
        if len(normalization[key]) != in_chans:
            raise ValueError(f"normalization {key} has {len(normalization[key])} values for {in_chans} channels")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "timm_name": timm_name,
        "in_chans": int(in_chans),
        "feature_channels": [int(c) for c in info.channels()],
        "feature_strides": [int(r) for r in info.reduction()],
        "normalization": {"mean": [float(v) for v in normalization["mean"]],
                          "std": [float(v) for v in normalization["std"]]},
        "method": method,
        "steps": int(steps),
        "data_manifest_hash": data_manifest_hash,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "code_version": code_version("pretrain"),  # the writer's code
        "timm_kwargs": dict(timm_kwargs or {}),
        "smp_compatible": bool(smp_compatible),
        "weights_sha256": sha256_bytes(blob),
        **dict(extra or {}),
    }
    # the metadata is the commit mark: remove it first so a crash mid-write never pairs old json/new weights
    (out / META_FILE).unlink(missing_ok=True)
    atomic_write_bytes(out / WEIGHTS_FILE, blob)
    atomic_write_json(out / META_FILE, meta)
    return out


def read_encoder_meta(enc_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``encoder.json``.

    Raises:
        UserError: naming the missing or corrupt file.
    """
    d = Path(enc_dir)
    meta_path = d / META_FILE
    fix = "pass the encoder/ directory written by `segfactory pretrain` (it holds encoder.json)"
    if not d.is_dir():
        raise UserError(f"encoder directory '{d}' does not exist", fix=fix)
    if not meta_path.is_file():
        raise UserError(f"'{d}' is not an encoder directory: {META_FILE} is missing", fix=fix)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"'{meta_path}' is corrupt ({e})", fix="re-export the encoder") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"'{meta_path}' is not a segfactory encoder (format={meta.get('format')!r})"
                        if isinstance(meta, dict) else f"'{meta_path}' is not a JSON object", fix=fix)
    if meta.get("version") != VERSION:
        raise UserError(f"'{meta_path}' has version {meta.get('version')!r}; this segfactory reads version {VERSION}",
                        fix="re-export the encoder with this segfactory version")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise UserError(f"'{meta_path}' lacks {', '.join(missing)}", fix="re-export the encoder")
    return meta


def load_encoder(enc_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load an exported encoder.

    Returns:
        ``(meta, state_dict)``: the parsed ``encoder.json`` and the CPU state dict of the ``features_only``
        timm model.

    Raises:
        UserError: naming the missing or corrupt file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = read_encoder_meta(enc_dir)
    wpath = Path(enc_dir) / WEIGHTS_FILE
    if not wpath.is_file():
        raise UserError(f"'{wpath}' is missing", fix="re-export the encoder (`segfactory pretrain ... --resume`)")
    blob = wpath.read_bytes()
    expected = meta.get("weights_sha256")
    if expected and sha256_bytes(blob) != expected:
        raise UserError(f"'{wpath}' is corrupt (its sha256 does not match {META_FILE})", fix="re-export the encoder")
    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"'{wpath}' is corrupt ({e})", fix="re-export the encoder") from None
    return meta, state


def check_state_fits(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], meta: dict[str, Any],
                enc_dir: str | os.PathLike[str], what: str) -> None:
    """Raise a UserError naming the first difference between two state dicts' keys and shapes."""
    fix = (f"build the model with encoder_name='tu-{meta['timm_name']}' and in_channels={meta['in_chans']}, "
           "or pass an encoder of the model's architecture")
    head = f"encoder '{enc_dir}' ({meta['timm_name']}, in_chans={meta['in_chans']}) does not fit {what}"
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"{head}: {len(missing)} missing / {len(unexpected)} unexpected keys ({detail})", fix=fix)
    for k, v in state.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise UserError(f"{head}: '{k}' has shape {tuple(v.shape)}, the model expects {tuple(target[k].shape)}",
                            fix=fix)
