"""Torch helpers every training and inference stage shares: the device, the autocast dtype, the learning-rate
schedule, and the guards against a diverged loss (:class:`LossGuard`, :func:`check_finite_weights`) and running out
of memory (:func:`memory_hint`).

Imports torch at module level: only stage code imports this module, never the CLI's start-up path.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

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


class LossGuard:
    """Stops a training run at a NaN or infinite loss, before the step is applied or anything is saved.

    Call :meth:`check` with each step's loss before its optimizer step: it returns True for a finite loss. A
    non-finite one is skipped (the caller drops the step's gradients and takes no optimizer step) while fewer
    than ``max_bad_steps`` steps of this run were skipped; the next one raises.

    Args:
        max_bad_steps: Non-finite steps skipped before the run stops (0: stop at the first).
        setting: The config key of ``max_bad_steps`` (``train.max_bad_steps``), for the message.
        fix: What to lower or change, for the message (e.g. ``"lower train.lr or set train.grad_clip"``).
    """

    def __init__(self, max_bad_steps: int, setting: str, fix: str):
        self.max_bad_steps, self.setting, self.fix = max_bad_steps, setting, fix
        self.skipped: list[int] = []

    def check(self, loss: torch.Tensor, step: int) -> bool:
        """Whether the loss of step ``step`` (0-based) is finite (one host sync).

        Raises:
            UserError: the loss is NaN or infinite and ``max_bad_steps`` steps were skipped already.
        """
        value = float(loss.detach().float())
        if math.isfinite(value):
            return True
        if len(self.skipped) >= self.max_bad_steps:
            skipped = f" after skipping {len(self.skipped)} bad step(s) ({self.setting}={self.max_bad_steps})" \
                if self.skipped else ""
            raise UserError(f"the training loss became {value} at step {step + 1}{skipped}; the run stopped and "
                            "nothing of that step was applied or saved",
                            fix=f"{self.fix}; or set {self.setting}=N to skip up to N such steps")
        self.skipped.append(step + 1)
        from segfactory.console import console

        console.print(f"[yellow]warning:[/] loss {value} at step {step + 1}: step skipped "
                      f"({len(self.skipped)}/{self.max_bad_steps} of {self.setting})", soft_wrap=True)
        return False


def check_finite_weights(module: torch.nn.Module, what: str, fix: str) -> None:
    """Refuse to save ``module`` when any parameter or buffer holds a NaN or infinity (one host sync).

    Args:
        module: The model about to be written.
        what: What would have been written, e.g. ``"the checkpoint at step 120"``.
        fix: The fix line.

    Raises:
        UserError: naming the first non-finite tensor.
    """
    tensors = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_floating_point()]
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    if bool(finite.all()):
        return
    name = tensors[int((~finite).nonzero()[0])][0]
    raise UserError(f"the model's weights hold NaN or infinite values ('{name}'); {what} was not written", fix=fix)


# What a failed allocation says when it does not come from torch's caching allocator: the host allocator, and
# cuDNN / cuBLAS workspaces on the GPU (they raise RuntimeError with their status name).
OUT_OF_MEMORY_MARKS = ("out of memory", "can't allocate memory", "CUDNN_STATUS_NOT_ENOUGH_MEMORY",
                       "CUBLAS_STATUS_ALLOC_FAILED")
GPU_MARKS = ("CUDA", "CUDNN", "CUBLAS")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is torch running out of memory: CUDA (``torch.cuda.OutOfMemoryError``), a cuDNN or cuBLAS
    workspace that could not be allocated, or a failed host allocation (``DefaultCPUAllocator: can't allocate
    memory``)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in OUT_OF_MEMORY_MARKS)


@contextlib.contextmanager
def memory_hint(what: str, lower: str) -> Iterator[None]:
    """Turn running out of (GPU or host) memory inside the block into one line saying what to lower.

    Args:
        what: What ran out, e.g. ``"fine-tuning"``.
        lower: The settings to lower, with their values, e.g. ``"train.batch_size (8) or augment.crop_size (512)"``.

    Raises:
        UserError: instead of the out-of-memory error (its first line is kept in the message).
    """
    try:
        yield
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e):
            raise
        where = "GPU" if isinstance(e, torch.cuda.OutOfMemoryError) or any(m in str(e) for m in GPU_MARKS) else "host"
        size = re.search(r"[Tt]ried to allocate ([\d.]+ ?[KMGT]i?B|\d+ bytes)", str(e))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise UserError(f"{what} ran out of {where} memory" + (f" allocating {size[1]}" if size else ""),
                        fix=f"lower {lower}") from None
