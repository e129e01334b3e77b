"""Torch helpers every training and inference stage shares: the device, the autocast dtype and the learning-rate
schedule.

Imports torch at module level: only stage code imports this module, never the CLI's start-up path.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from segfactory.errors import UserError


def _fix(setting: str, value: str) -> str:
    return f"pass {setting} {value}" if setting.startswith("-") else f"set {setting}={value}"


def resolve_device(name: str, setting: str = "--device") -> torch.device:
    """The device ``name`` means: ``auto`` is CUDA when available, else the CPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ...
        setting: Where the name comes from (``train.device``, ``--device``), for the error message.

    Raises:
        UserError: a name torch does not know, or a CUDA device that is not there.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{setting}={name!r} is not a device", fix=_fix(setting, "auto, cpu, cuda or cuda:N")) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{setting}={name!r} but no CUDA device is available", fix=_fix(setting, "cpu or auto"))
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{setting}={name!r} but there are {torch.cuda.device_count()} CUDA device(s)",
                            fix=_fix(setting, f"cuda:0 ... cuda:{torch.cuda.device_count() - 1}"))
    return dev


def amp_dtype(device: torch.device, mode: str = "auto", setting: str = "train.amp") -> torch.dtype | None:
    """The autocast dtype, or None for full precision.

    Mixed precision runs on CUDA only (CPU autocast is slower here): ``auto`` is bf16 where the GPU supports it,
    else fp16 (which needs a ``GradScaler`` when training); ``off`` and ``auto`` on a CPU are float32.

    Raises:
        UserError: ``bf16`` or ``fp16`` asked for on a device that is not CUDA.
    """
    if mode in ("bf16", "fp16") and device.type != "cuda":
        raise UserError(f"{setting}={mode} needs a CUDA device (this runs on {device})",
                        fix=_fix(setting, "auto (mixed precision on GPU only) or off"))
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", power: float = 0.9,
              min_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at ``step`` (0-based): linear warm-up, then cosine or poly decay.

    Args:
        step: Optimizer steps taken so far.
        total: Steps of the whole run (the decay ends there).
        warmup: Warm-up steps: step ``s < warmup`` gets ``(s + 1) / warmup``.
        schedule: ``cosine`` or ``poly`` (``(1 - t) ** power``).
        min_ratio: Where the decay ends, as a fraction of the peak.
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    t = min(max((step - warmup) / max(1, total - warmup), 0.0), 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if schedule == "cosine" else (1 - t) ** power
    return min_ratio + (1 - min_ratio) * decay


def warmup_decay(optimizer: torch.optim.Optimizer, total: int, warmup: int, schedule: str = "cosine",
                 power: float = 0.9, min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` of :func:`lr_factor` over each parameter group's own peak rate (its ``lr`` now).

    Call ``step()`` after each optimizer step; save and load its ``state_dict`` with the optimizer's to resume.
    """

    def factor(step: int) -> float:  # a plain function: LambdaLR leaves it out of its state_dict
        return lr_factor(step, total, warmup, schedule, power, min_ratio)

    return LambdaLR(optimizer, factor)
