"""Continued pretraining: load an encoder the user already has into the backbone before SSL starts.

``backbone.init`` names one of

* a segfactory encoder directory (``encoder.json`` + ``encoder.safetensors``, written by an earlier
  ``segfactory pretrain``): its keys are already those of the ``features_only`` model;
* a timm checkpoint: a ``.pth`` / ``.pt`` / ``.bin`` state dict (optionally wrapped in ``{"state_dict": ...}`` or
  ``{"model": ...}``, with a ``module.`` prefix from DataParallel stripped) or a ``.safetensors`` file, with the keys
  of the full timm model (``timm.create_model(name)``).

Loading is strict: every weight of the backbone must be in the file with its shape, and every weight in the file
must belong to the backbone, except the modules that ``features_only`` leaves out (classifier heads ``fc.`` /
``head.`` / ``classifier.``, and e.g. EfficientNet's ``conv_head`` / ``bn2`` or a ViT's final ``norm``), which are
dropped and reported. A checkpoint with 3 input channels loaded into a 1-channel backbone (or the reverse) has its
first convolution adapted as timm adapts pretrained weights (:func:`timm.models.adapt_input_conv`: RGB kernels are
summed to gray; a gray kernel is repeated and rescaled), and this is reported.

Nothing is downloaded. The file is read with ``torch.load(weights_only=True)`` (no code runs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segfactory.errors import UserError
from segfactory.io import sha256_file

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pretrain.backbones import BackboneSpec

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PRETRAIN_CHECKPOINT_FORMAT = "segfactory-pretrain-checkpoint"  # the "format" of pretrain's OUT/checkpoints/*.pt


@dataclass
class InitReport:
    """What loading ``backbone.init`` did (printed, and recorded in ``encoder.json`` as ``init``)."""

    path: str
    kind: str  # "encoder" (segfactory encoder directory) or "timm" (checkpoint file)
    sha256: str
    loaded: int = 0
    dropped: list[str] = field(default_factory=list)  # checkpoint keys outside the features_only encoder
    adapted: str | None = None  # the input conv adapted to another channel count

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, "loaded": self.loaded,
                "dropped": len(self.dropped), "dropped_modules": _modules(self.dropped), "adapted": self.adapted}

    def describe(self) -> str:
        s = f"init: loaded {self.loaded} tensors from {self.kind} '{self.path}'"
        if self.dropped:
            s += f"; dropped {len(self.dropped)} keys outside the encoder ({', '.join(_modules(self.dropped))})"
        if self.adapted:
            s += f"; {self.adapted}"
        return s


def _modules(keys: list[str]) -> list[str]:
    return sorted({k.split(".")[0] + "." for k in keys})


def resolve_init(path: str) -> str:
    """``backbone.init`` as the weights to read: a file, or an encoder directory; the run directory of an earlier
    `segfactory pretrain` stands for its ``encoder/``, and that of a `segfactory run` for its newest pretrain
    stage's (:func:`segfactory.formats.locate.resolve_encoder_dir`, as ``finetune --encoder`` accepts them).

    Raises:
        ValueError: naming the path when it is none of those.
    """
    from segfactory.formats.encoder import WEIGHTS_FILE
    from segfactory.formats.locate import resolve_encoder_dir

    p = Path(path)
    if p.is_dir() and not (p / WEIGHTS_FILE).is_file():
        found, _ = resolve_encoder_dir(p)
        if (found / WEIGHTS_FILE).is_file():
            return str(found)
        raise ValueError(f"backbone.init '{path}' is a directory without {WEIGHTS_FILE} (not an encoder "
                         "directory, nor the run directory of `segfactory pretrain` or `segfactory run`)")
    if not p.exists():
        raise ValueError(f"backbone.init '{path}' does not exist")
    return path


def init_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of ``backbone.init``'s weights (an encoder directory: its ``encoder.safetensors``).

    Raises:
        ValueError: naming the path when it is neither a file nor an encoder directory.
    """
    p = Path(path)
    if p.is_dir():
        from segfactory.formats.encoder import WEIGHTS_FILE

        if not (p / WEIGHTS_FILE).is_file():
            raise ValueError(f"backbone.init '{path}' is a directory without {WEIGHTS_FILE} (not an encoder "
                             "directory written by `segfactory pretrain`)")
        return sha256_file(p / WEIGHTS_FILE)
    if not p.is_file():
        raise ValueError(f"backbone.init '{path}' does not exist")
    return sha256_file(p)


def read_state(path: str | os.PathLike[str]) -> tuple[str, dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read ``backbone.init`` into a CPU state dict.

    Returns:
        ``(kind, state, meta)``: kind "encoder" (with its ``encoder.json`` as meta) or "timm" (meta None).

    Raises:
        UserError: naming the file when it cannot be read as weights.
    """
    import torch

    p = Path(path)
    if p.is_dir():
        from segfactory.formats.encoder import load_encoder

        meta, state = load_encoder(p)
        return "encoder", dict(state), meta
    fix = "pass a timm state dict (.pth/.pt/.bin), a .safetensors file or an encoder directory"
    _refuse_own_files(p)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return "timm", dict(load_file(str(p))), None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise UserError(f"backbone.init '{p}' is not a readable safetensors file ({e})", fix=fix) from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refuses, truncated zip, not a torch file...
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise UserError(f"backbone.init '{p}' is not a readable torch state dict ({type(e).__name__}: {msg})",
                        fix=fix) from None
    if isinstance(obj, Mapping) and obj.get("format") == PRETRAIN_CHECKPOINT_FORMAT:
        run = p.parent.parent if p.parent.name == "checkpoints" else None
        enc = f"'{run / 'encoder'}'" if run is not None else "its run directory's encoder/ (OUT/encoder)"
        raise UserError(f"backbone.init '{p}' is a segfactory pretrain checkpoint (step {obj.get('step')}: the "
                        "whole SSL method, its optimizer and RNG), not encoder weights",
                        fix=f"to start a new run from its encoder, set backbone.init to {enc} (a run stopped before "
                            f"its export: finish it with --resume first); to continue that run, pass --resume-from "
                            f"'{p}' instead of backbone.init")
    for _ in range(2):  # {"state_dict": {...}} or {"model": {...}} (nested once at most in practice)
        if isinstance(obj, Mapping) and not _is_state(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
    if not isinstance(obj, Mapping) or not _is_state(obj) or not obj:
        raise UserError(f"backbone.init '{p}' holds no state dict of tensors (top-level keys: "
                        f"{list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__})", fix=fix)
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return "timm", state, None


def _refuse_own_files(p: Path) -> None:
    """A fine-tuned model's weights (``segfactory finetune``'s ``OUT/model/model.safetensors``) hold a whole
    segmentation model under the architecture's own prefixes, not an encoder: one line naming what to pass.

    Raises:
        UserError: for a file of a segfactory model directory.
    """
    from segfactory.formats import model

    if p.name != model.WEIGHTS_FILE or not (p.parent / model.META_FILE).is_file():
        return
    try:
        meta = model.read_model_meta(p.parent)
    except UserError:
        return
    lineage = (meta.get("lineage") or {}).get("encoder") or {}
    enc = lineage.get("dir") if lineage.get("init") == "ssl" else None
    arch = meta.get("architecture") or {}
    raise UserError(f"backbone.init '{p}' is the weights of a fine-tuned segmentation model (segfactory finetune, "
                    f"{arch.get('arch')} / {arch.get('encoder')}), not encoder weights",
                    fix="set backbone.init to the encoder it was fine-tuned from"
                        + (f" ('{enc}')" if enc else "") + " or another pretrain run's OUT/encoder; to train that "
                        "model further, use `segfactory finetune --resume` on its run directory")


def _is_state(obj: Mapping[Any, Any]) -> bool:
    import torch

    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _full_keys(spec: BackboneSpec, in_chans: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the full timm model (built on the meta device: no memory, no init)."""
    import timm
    import torch

    with torch.device("meta"):
        full = timm.create_model(spec.timm_name, in_chans=in_chans, pretrained=False, **spec.timm_kwargs)
    return {k: tuple(v.shape) for k, v in full.state_dict().items()}


def _full_name(fkey: str, full: Mapping[str, Any]) -> str | None:
    """The full-model key of a ``features_only`` key: timm's feature wrappers keep names (ResNet, EfficientNet),
    flatten sequentials (``stages_0.`` for ``stages.0.``) or hold the model as ``model.`` (ViT)."""
    head, _, rest = fkey.partition(".")
    cands = [fkey, fkey.removeprefix("model.")]
    if "_" in head:
        a, _, b = head.rpartition("_")
        cands.append(f"{a}.{b}.{rest}" if rest else f"{a}.{b}")
    return next((c for c in cands if c in full), None)


def load_init(body: nn.Module, spec: BackboneSpec, backbone: str, in_chans: int, path: str,
              sha256: str | None = None) -> InitReport:
    """Load ``backbone.init`` into ``body`` (the ``features_only`` model) strictly.

    Args:
        body: The encoder module SSL trains and exports.
        spec: Its backbone spec.
        backbone: The configured backbone name (for messages).
        in_chans: The run's input channels.
        path: File or encoder directory.
        sha256: The hash resolved with the config (checked: a file changed since then is refused).

    Returns:
        What was loaded, dropped and adapted.

    Raises:
        UserError: one line naming the file, the first mismatching keys / shapes, the backbone and the fix.
    """

    actual = init_sha256(path)
    if sha256 is not None and sha256 != actual:
        raise UserError(f"backbone.init '{path}' has changed since the config was resolved (sha256 now "
                        f"{actual[:12]}..., the config has {sha256[:12]}...)",
                        fix="restore the file, or remove backbone.init_sha256 to start from the new one")
    kind, state, meta = read_state(path)
    report = InitReport(path=str(path), kind=kind, sha256=actual)
    target = body.state_dict()
    arch = f"backbone '{backbone}' ({spec.timm_name}, in_chans={in_chans})"
    fix = "set backbone.name to the checkpoint's architecture (and backbone.in_chans to its input channels)"
    if meta is not None:
        fix = (f"set backbone.name to the encoder's architecture (it is timm '{meta['timm_name']}', "
               f"in_chans={meta['in_chans']})")
        mapped = {k: k for k in target}
        outside: set[str] = set()
    else:
        full = _full_keys(spec, in_chans)
        mapped = {}
        for k in target:
            name = _full_name(k, full)
            if name is None:  # a features_only key we cannot place: our bug, not the user's
                raise RuntimeError(f"cannot map features_only key {k!r} of {spec.timm_name} to the full model")
            mapped[k] = name
        outside = set(full) - set(mapped.values())
    src = {v: k for k, v in mapped.items()}  # file key -> body key
    missing = [v for v in mapped.values() if v not in state]
    unexpected = [k for k in state if k not in src and k not in outside]
    head = f"backbone.init '{path}' does not fit {arch}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        raise UserError(f"{head}: {' / '.join(parts)} of {len(state)} keys", fix=fix)
    report.dropped = sorted(k for k in state if k in outside)
    new: dict[str, torch.Tensor] = {}
    first_conv = next((k for k, v in target.items() if v.ndim == 4), None)
    for k, t in target.items():
        v = state[mapped[k]]
        if tuple(v.shape) != tuple(t.shape):
            if (k == first_conv and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]
                    and {int(v.shape[1]), int(t.shape[1])} == {1, 3}):
                from timm.models import adapt_input_conv

                report.adapted = f"adapted {mapped[k]!r} from {v.shape[1]} to {t.shape[1]} input channels"
                v = adapt_input_conv(int(t.shape[1]), v)
            else:
                raise UserError(f"{head}: {mapped[k]!r} has shape {tuple(v.shape)}, the backbone expects "
                                f"{tuple(t.shape)}", fix=fix)
        new[k] = v.to(dtype=t.dtype)
    body.load_state_dict(new, strict=True)
    report.loaded = len(new)
    return report
