"""Architectures (segmentation-models-pytorch decoders on timm encoders), encoder loading and model dirs
(the model dir format itself is :mod:`segfactory.formats.model`). The architectures are registered in
:mod:`finetune.archs`.

Encoders are always smp ``tu-<timm name>`` encoders, so an ``encoder.safetensors`` from pretraining (a
``features_only`` timm state dict) loads into ``model.encoder.model`` without renaming.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from finetune.archs import decoder_kwargs
from finetune.config import SIZE_DIVISOR
from segfactory.errors import UserError
from segfactory.formats.encoder import check_state_fits as check_encoder_state
from segfactory.formats.encoder import load_encoder
from segfactory.formats.model import (
    META_FILE,
    MODEL_FORMAT,
    MODEL_VERSION,
    WEIGHTS_FILE,
    read_model_meta,
    read_model_weights,
    write_model_dir,
)


def build_model(arch: dict[str, Any], strict: bool = True) -> nn.Module:
    """Build an untrained model from an architecture record with smp's ``create_model``.

    Args:
        arch: ``{"arch", "encoder", "in_chans", "num_classes", "decoder_channels"}`` (as in model.json), and
            ``instance_channels`` (> 0: an instance head, :func:`finetune.instances.attach_head`).
        strict: ``False`` for a saved model record: its ``decoder_channels`` builds as it did when it was
            written, also where a later check refuses it in a config (:func:`finetune.archs.decoder_kwargs`).

    Returns:
        A module mapping (B, in_chans, H, W) with H, W multiples of 32 to logits (B, num_classes, H, W).
    """
    import segmentation_models_pytorch as smp

    decoder = decoder_kwargs(arch["arch"], arch.get("decoder_channels"), strict)
    if int(arch.get("instance_channels") or 0):
        from finetune.instances import attach_head

        return attach_head(build_model({**arch, "instance_channels": 0}, strict), int(arch["instance_channels"]))
    try:
        return smp.create_model(arch["arch"], encoder_name=f"tu-{arch['encoder']}", encoder_weights=None,
                                in_channels=int(arch["in_chans"]), classes=int(arch["num_classes"]), **decoder)
    except RuntimeError as e:  # timm: unknown model name
        if "Unknown model" in str(e) or "Invalid model" in str(e):
            check_timm_name(str(arch["encoder"]))
        raise


def check_timm_name(name: str, field: str = "model.encoder") -> None:
    """Stop when ``name`` is not a timm model (``field`` names the setting in the error).

    Raises:
        UserError: an unknown name, with the closest of ``timm.list_models()``.
    """
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3)  # timm's registry: the encoder names
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise UserError(f"{field}='{name}' is not a timm model", fix=f"{hint}`timm.list_models()` lists the valid names")


def encoder_module(model: nn.Module) -> nn.Module:
    return model.encoder  # type: ignore[return-value]


def check_smp_compatible(meta: dict[str, Any], encoder_dir: str | os.PathLike) -> None:
    """Stop when an exported encoder cannot be a segmentation-models-pytorch encoder (a plain ViT: its features
    have a single stride, which smp's decoders cannot use).

    Raises:
        UserError: ``encoder.json`` says ``"smp_compatible": false``.
    """
    if not meta.get("smp_compatible", True):
        raise UserError(f"encoder '{encoder_dir}' ({meta['timm_name']}) cannot be used by segmentation-models-pytorch "
                        "(its features have a single stride)", fix="pretrain a CNN backbone (resnet, convnext, "
                        "efficientnet) for fine-tuning with smp")


def check_encoder_fits(meta: dict[str, Any], encoder_dir: Path, encoder: str | None, in_chans: int) -> str:
    """The timm name to build, after checking ``encoder.json`` against the configured encoder and channels.

    Raises:
        UserError: another architecture or another channel count than configured.
    """
    check_smp_compatible(meta, encoder_dir)  # before any other advice: no setting makes smp take it
    if encoder is not None and encoder != meta["timm_name"]:
        raise UserError(f"encoder '{encoder_dir}' is a {meta['timm_name']} but model.encoder={encoder}",
                        fix=f"set model.encoder={meta['timm_name']} (or drop it), or pass an encoder of {encoder}")
    if int(meta["in_chans"]) != in_chans:
        raise UserError(f"encoder '{encoder_dir}' takes {meta['in_chans']} input channel(s) but model.in_chans="
                        f"{in_chans}", fix=f"set model.in_chans={meta['in_chans']}")
    return str(meta["timm_name"])


def load_into_smp(smp_model: nn.Module, enc_dir: str | os.PathLike) -> dict[str, Any]:
    """Load an exported encoder into a segmentation-models-pytorch model built with ``tu-<timm_name>``.

    Args:
        smp_model: e.g. ``smp.Unet(encoder_name="tu-resnet18", encoder_weights=None, in_channels=3)``.
        enc_dir: Encoder directory.

    Returns:
        The encoder's metadata (normalization, strides, ...).

    Raises:
        UserError: if the encoder's architecture or input channels differ from the model's encoder.
    """
    meta, state = load_encoder(enc_dir)
    check_smp_compatible(meta, enc_dir)
    target = getattr(getattr(smp_model, "encoder", None), "model", None)
    if not isinstance(target, nn.Module):
        raise UserError(f"the model ({type(smp_model).__name__}) has no timm universal encoder (.encoder.model)",
                        fix=f"build it with encoder_name='tu-{meta['timm_name']}'")
    check_encoder_state(state, target.state_dict(), meta, enc_dir, what="the smp model's encoder")
    target.load_state_dict(state, strict=True)
    return meta


def load_pretrained_encoder(model: nn.Module, encoder_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``encoder.safetensors`` into the model's encoder.

    Returns:
        The lineage record stored in model.json.

    Raises:
        UserError: the encoder does not fit (architecture, channels) or its files are missing/corrupt.
    """
    meta = load_into_smp(model, encoder_dir)
    # an encoder exported from a fine-tuned model (finetune.export.export_encoder) records method "supervised"
    init = "supervised" if meta.get("method") == "supervised" else "ssl"
    return {"init": init, "dir": str(Path(encoder_dir)),
            **{k: meta.get(k) for k in ("timm_name", "in_chans", "method", "steps", "data_manifest_hash",
                                        "weights_sha256", "created", "code_version")}}


def state_blob(model: nn.Module) -> bytes:
    from safetensors.torch import save

    # Contiguous CPU clones: channels_last and shared storage are refused by safetensors.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": MODEL_FORMAT})


def save_model_dir(out_dir: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write a model dir of ``model`` (see :func:`segfactory.formats.model.write_model_dir`)."""
    return write_model_dir(out_dir, state_blob(model), meta)


def load_model_dir(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a model dir for inference.

    Returns:
        ``(model in eval mode on device, meta)``.

    Raises:
        UserError: missing/corrupt files, or weights that do not fit model.json (e.g. another class count).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(model_dir)
    meta = read_model_meta(d)
    blob = read_model_weights(d, meta)
    try:
        state = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise UserError(f"'{d / WEIGHTS_FILE}' is corrupt ({e})", fix="re-export the model dir") from None
    arch = meta["architecture"]
    if int(arch["num_classes"]) != int(meta["num_classes"]):
        raise UserError(f"'{d / META_FILE}' says num_classes={meta['num_classes']} but its architecture has "
                        f"{arch['num_classes']}", fix="re-export the model dir")
    model = build_model(arch, strict=False)
    check_state_fits(state, model, d, int(meta["num_classes"]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), meta


def check_state_fits(state: dict[str, torch.Tensor], model: nn.Module, where: Path, num_classes: int) -> None:
    """Raise one clear line when weights do not fit a model; a different head size is a class-count mismatch."""
    target = model.state_dict()
    head = [k for k in target if k.startswith("segmentation_head.") and k.endswith("weight")]
    for k in head:
        if k in state and state[k].shape[0] != target[k].shape[0]:
            raise UserError(f"'{where}' holds weights for {state[k].shape[0]} classes but {num_classes} are "
                            "expected", fix="use the model dir's own model.json, or retrain with the class list")
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise UserError(f"weights in '{where}' do not fit the architecture ({detail})",
                        fix="the weights and model.json come from different models; re-export")
    for k, v in state.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise UserError(f"weights in '{where}': '{k}' has shape {tuple(v.shape)}, the architecture expects "
                            f"{tuple(target[k].shape)}", fix="re-export the model dir")


def model_meta(arch: dict[str, Any], targets_json: list[dict], ignore_index: int, input_spec: dict[str, Any],
               predict_spec: dict[str, Any], lineage: dict[str, Any],
               instances: dict[str, Any] | None = None, cleanup: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model.json record (see module docstring); ``instances`` only for a model with an instance head,
    ``cleanup`` (:mod:`finetune.cleanup`) only when training measured object sizes."""
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "architecture": arch, "classes": targets_json,
            "num_classes": int(arch["num_classes"]), "ignore_index": ignore_index,
            "input": {**input_spec, "size_divisor": SIZE_DIVISOR, "layout": "NCHW float32"},
            "predict": predict_spec, "lineage": lineage}
    if instances is not None:
        meta["instances"] = instances
    if cleanup is not None:
        meta["cleanup"] = cleanup
    return meta
