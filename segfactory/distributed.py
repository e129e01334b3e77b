"""Data-parallel training with ``torch.distributed`` under ``torchrun``: the one home of process-group setup that
every training stage shares (``segfactory pretrain`` and ``segfactory finetune``).

* :func:`torchrun_env` tells whether this process is a rank started by ``torchrun`` (``RANK`` / ``WORLD_SIZE``).
* :func:`relaunch_under_torchrun` re-runs the current CLI command under ``python -m torch.distributed.run`` with
  ``--nproc-per-node=N`` (single node, ``--standalone`` rendezvous); multi-node runs call ``torchrun`` directly
  with its standard rendezvous flags (``--nnodes``, ``--rdzv-endpoint`` ...).
* :func:`launch_processes` decides how many processes a training command starts from its ``train.devices`` /
  ``train.backend`` / ``train.device`` settings (the CLI then calls :func:`relaunch_under_torchrun`).
* :func:`join` (:func:`setup` underneath) joins the process group (nccl on CUDA, gloo on the CPU) with a
  timeout, so that a rank that dies makes the others fail instead of waiting forever; :func:`teardown` leaves it.
* :func:`convert_sync_batchnorm` makes every BatchNorm normalize with the statistics of the global batch:
  ``torch.nn.SyncBatchNorm`` on CUDA; on the CPU (which ``SyncBatchNorm`` refuses) :class:`CPUSyncBatchNorm`,
  the same computation with an autograd all-reduce over gloo.

Only the CLI's launch path imports this module without torch: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol, TypeVar

from segfactory.errors import UserError

if TYPE_CHECKING:
    import torch

# Test hook: "RANK:STEP" makes that rank exit (status 3) when it reaches that optimizer step, as a crashed or
# killed process would (tests/test_pretrain_ddp.py checks that the whole job then fails, without hanging).
EXIT_HOOK_ENV = "SEGFACTORY_TEST_RANK_EXIT"

# Set by a pipeline's stage task (pipelines.stages.stage_env): the CPU threads of the whole stage, which
# relaunch_under_torchrun splits among its ranks (OMP_NUM_THREADS alone means threads per process, torchrun's way).
STAGE_THREADS_ENV = "SEGFACTORY_STAGE_THREADS"

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0 ... world_size - 1).
        world_size: Number of processes.
        local_rank: Rank on this node (the GPU index on CUDA).
        backend: ``nccl``, ``gloo``, or ``none`` for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def torchrun_env() -> DistInfo | None:
    """The rank/world size ``torchrun`` set in the environment, or None outside torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def choose_backend(backend: str, device_type: str, setting: str = "train.backend") -> str:
    """``auto`` is nccl on CUDA and gloo on the CPU; nccl on a CPU device is refused."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise UserError(f"{setting}=nccl needs CUDA devices (this runs on {device_type})",
                        fix=f"set {setting}=gloo (or auto)")
    return backend


class LaunchSettings(Protocol):
    """The ``train`` section fields the launch needs (pretraining's and fine-tuning's ``TrainConfig``)."""

    devices: int
    backend: str
    device: str
    dist_timeout_s: float


def launch_processes(tr: LaunchSettings, check: Callable[[int], None]) -> int:
    """How many torchrun processes a training command starts.

    1 inside torchrun already (the ranks join its job); else ``train.devices`` on GPUs, or on the CPU with
    ``train.backend=gloo``; ``devices > 1`` on a machine without a GPU and without ``train.backend=gloo`` runs one
    process (a note says so).

    Args:
        tr: The config's ``train`` section.
        check: Refuses (UserError) what cannot run on that many processes, before any process starts.
    """
    from segfactory.console import console
    from segfactory.torchutil import resolve_device

    if tr.devices <= 1 or torchrun_env() is not None:
        return 1
    device = resolve_device(tr.device, "train.device")
    if device.type != "cuda" and tr.backend != "gloo":
        console.print(f"note: train.devices={tr.devices} but training runs on the CPU ({device}): one process "
                      "(train.backend=gloo runs several CPU processes)")
        return 1
    if device.type == "cuda":
        import torch

        if tr.devices > torch.cuda.device_count():
            raise UserError(f"train.devices={tr.devices} but this node has {torch.cuda.device_count()} GPU(s)",
                            fix=f"set train.devices={torch.cuda.device_count()} or less (processes per node)")
    check(tr.devices)
    return int(tr.devices)


# How long a stopped launcher waits for torchrun to stop its ranks (torchrun itself SIGKILLs ranks that ignore
# SIGTERM for 30 s).
STOP_WAIT_S = 60.0


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``segfactory <argv>`` as ``nproc`` processes under ``torchrun`` on this node; wait; return its status.

    Each child sees ``RANK``/``WORLD_SIZE`` set and so does not re-launch. torchrun stops every rank when one
    fails and exits non-zero (1).

    When this process is stopped (Ctrl-C, or SIGTERM: what a pipeline's stage process gets when its Dask worker
    dies), torchrun gets SIGTERM, passes it on to the ranks (rank 0 checkpoints at its step boundary) and is
    waited for, up to ``STOP_WAIT_S``: this process, which holds the stage lock in a pipeline, outlives every rank,
    so a retry never takes over the run directory while rank 0 still writes. A second interrupt, or the wait
    running out, kills torchrun at once.
    """
    # torchrun's log dir (each rank's error file) is a fresh temporary dir that goes with the job: left to
    # itself, torchrun makes one in $TMPDIR per launch and never removes it.
    log_dir = tempfile.TemporaryDirectory(prefix="segfactory-torchrun-")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--log-dir={log_dir.name}", "-m", "segfactory.cli", *argv]
    env = dict(os.environ)
    if STAGE_THREADS_ENV in env:  # a pipeline stage's budget: each rank gets its share
        share = str(max(1, int(env[STAGE_THREADS_ENV]) // nproc))
        env.update(OMP_NUM_THREADS=share, MKL_NUM_THREADS=share, OPENBLAS_NUM_THREADS=share)
    else:  # a user's OMP_NUM_THREADS is per process, as torchrun takes it
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with log_dir:
        proc = subprocess.Popen(cmd, env=env)
        try:
            return proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except BaseException:
                proc.kill()
                proc.wait()
            raise


def setup(info: DistInfo, backend: str, device: torch.device, timeout_s: float) -> torch.device:
    """Join the process group of a torchrun job and return this rank's device.

    Args:
        info: From :func:`torchrun_env`.
        backend: ``nccl`` or ``gloo`` (see :func:`choose_backend`).
        device: The configured device; on CUDA each rank takes ``cuda:<local_rank>``.
        timeout_s: Collectives that wait longer fail (a dead rank makes the others fail, not hang).
    """
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        if info.local_rank >= torch.cuda.device_count():
            raise UserError(f"rank {info.rank} needs GPU {info.local_rank} but this node has "
                            f"{torch.cuda.device_count()}", fix=f"set train.devices={torch.cuda.device_count()} "
                            "or less (processes per node)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def join(tr: LaunchSettings, device: torch.device,
         check: Callable[[int], None]) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job this process belongs to (none: one process); return its place and device.

    Args:
        tr: The config's ``train`` section (``backend``, ``dist_timeout_s``).
        device: The resolved ``train.device``.
        check: Refuses what cannot run on the job's world size (called with it).
    """
    info = torchrun_env()
    if info is None or info.world_size <= 1:
        return DistInfo(), device
    check(info.world_size)
    backend = choose_backend(tr.backend, device.type)
    device = setup(info, backend, device, tr.dist_timeout_s)
    return DistInfo(info.rank, info.world_size, info.local_rank, backend), device


def teardown() -> None:
    """Leave the process group, and free it while the interpreter is fully alive.

    ``destroy_process_group`` only drops ``torch.distributed``'s own references: a ``DistributedDataParallel``
    wrapper (it sits in a reference cycle, so only the cyclic garbage collector frees it) keeps the group alive,
    and a gloo group first freed during interpreter shutdown can abort the process ("terminate called without an
    active exception", SIGABRT: an exit-time failure of a rank that had finished). Callers drop their DDP
    wrappers first; the collections here free them, and the group with them, now.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def all_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of ``x`` over ranks (no gradient; a copy)."""
    import torch.distributed as dist

    y = x.detach().clone()
    if info.distributed:
        dist.all_reduce(y)  # SUM: gloo has no AVG
        y /= info.world_size
    return y


def all_sum(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``x`` over ranks (no gradient; a copy)."""
    import torch.distributed as dist

    y = x.detach().clone()
    if info.distributed:
        dist.all_reduce(y)
    return y


def all_sum_grad(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``x`` over ranks, differentiable: the backward sums the gradients over ranks too.

    A loss built from these global sums has the same value on every rank; with DDP's gradient averaging over
    ``world_size`` ranks, the gradient each parameter gets is exactly that of the single-process loss on the
    global batch (the world-size factor of the summed backward cancels DDP's division).
    """
    if not info.distributed:
        return x
    return _autograd_all_reduce(x)


def _autograd_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """``torch.distributed.nn.functional.all_reduce`` (SUM; its backward all-reduces the gradient), without its
    FutureWarning (its suggested replacement, ``_functional_collectives``, is private and has no gloo autograd)."""
    import warnings

    import torch.distributed.nn.functional as dist_fn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out: torch.Tensor = dist_fn.all_reduce(x)  # type: ignore[no-untyped-call]
    return out


def any_rank(flag: bool, info: DistInfo) -> bool:
    """Whether ``flag`` is true on any rank (one tiny all-reduce): keeps the ranks' control flow identical."""
    if not info.distributed:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return bool(t.item())


def exit_hook(info: DistInfo, step: int) -> None:
    """The :data:`EXIT_HOOK_ENV` test hook: exit abruptly at ``step`` on the named rank."""
    spec = os.environ.get(EXIT_HOOK_ENV)
    if spec and spec == f"{info.rank}:{step}":
        sys.stderr.write(f"{EXIT_HOOK_ENV}: rank {info.rank} exits at step {step}\n")
        sys.stderr.flush()
        os._exit(3)


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Replace every BatchNorm of ``module`` by one that normalizes with the global batch's statistics."""
    import torch

    if device.type == "cuda":
        converted: torch.nn.Module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)  # type: ignore[no-untyped-call]
        return converted
    return CPUSyncBatchNorm.convert(module)


@functools.cache
def _cpu_sync_bn_class() -> type:
    import torch
    import torch.distributed as dist

    class _CPUSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
        """BatchNorm over the union of all ranks' batches on the CPU (gloo), for any input rank (N, C, ...).

        Per-channel sum and count, then the sum of squared deviations from the global mean, are all-reduced with
        autograd (the backward all-reduces the gradients, as ``SyncBatchNorm``'s does); running statistics are
        updated with the global unbiased variance.
        """

        def _check_input_dim(self, input: torch.Tensor) -> None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
                return super().forward(input)
            c = input.shape[1]
            dims = [0, *range(2, input.dim())]
            x = input.float()
            shape = [1, c] + [1] * (input.dim() - 2)
            count = torch.tensor([x.numel() / c], dtype=torch.float32)
            # two passes (sum, then squared deviations from the global mean), like BatchNorm's own centred
            # variance: E[x^2] - E[x]^2 in float32 cancels catastrophically in near-constant channels, which
            # moved a U-Net's gradients by 0.5 % (relative norm) against single-process BatchNorm
            packed = _autograd_all_reduce(torch.cat([x.sum(dims), count]))
            n = packed[-1]
            mean = packed[:c] / n
            xc = x - mean.view(shape)
            var = _autograd_all_reduce((xc * xc).sum(dims)) / n
            if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
                with torch.no_grad():
                    assert self.num_batches_tracked is not None
                    self.num_batches_tracked.add_(1)
                    m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                    self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                    self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
            y = xc * torch.rsqrt(var.view(shape) + self.eps)
            if self.affine:
                y = y * self.weight.view(shape) + self.bias.view(shape)
            out: torch.Tensor = y.to(input.dtype)
            return out

    return _CPUSyncBatchNorm


class CPUSyncBatchNorm:
    """Namespace: :meth:`convert` swaps a module's BatchNorm layers for the gloo-synchronized CPU version."""

    @staticmethod
    def convert(module: torch.nn.Module) -> torch.nn.Module:
        import torch

        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            out = _rebuilt_batchnorm(module, _cpu_sync_bn_class())
        for name, child in module.named_children():
            out.add_module(name, CPUSyncBatchNorm.convert(child))
        return out


# ------------------------------------------------------------------------------------------------------------------
# Collectives of data-parallel domain adaptation (finetune/selftrain.py): gathering a global batch, sharing a per-run
# statistic, and a per-process BatchNorm for work every rank repeats on its own.


def rank_rows(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``lo:hi`` of a global batch of ``total`` that data-parallel rank ``rank`` of ``world_size`` holds
    (contiguous, as :class:`finetune.data.mixing.MixedBatchSampler` splits the labeled batch; all of them in a
    single process).

    Raises:
        ValueError: ``total`` does not split evenly (the training command refuses such a batch before launch).
    """
    if total % world_size:
        raise ValueError(f"a batch of {total} does not split over {world_size} ranks")
    per = total // world_size
    return rank * per, (rank + 1) * per


def all_gather_cat(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The ranks' ``x`` (equal shapes) concatenated along dim 0 in rank order: the global batch (no gradient).

    Args:
        x: (b, ...) this rank's rows, on the collective's device (the GPU with nccl, any with gloo: moved to the
            CPU for gloo and back).

    Returns:
        (world_size * b, ...) on ``x``'s device; ``x`` itself in a single process.
    """
    if not info.distributed:
        return x
    import torch
    import torch.distributed as dist

    src = x.detach().contiguous()
    if info.backend != "nccl":
        src = src.cpu()
    parts = [torch.empty_like(src) for _ in range(info.world_size)]
    dist.all_gather(parts, src)
    return torch.cat(parts).to(x.device)


def broadcast_object(obj: T, info: DistInfo, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (picklable) on every rank: a per-run value computed on every rank, made identical."""
    if not info.distributed:
        return obj
    import torch.distributed as dist

    box: list[T] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@functools.cache
def _local_bn_class() -> type:
    import torch

    class _LocalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
        """Plain (per-process) BatchNorm for inputs of any rank (N, C, ...)."""

        def _check_input_dim(self, input: torch.Tensor) -> None:
            if input.dim() < 2:
                raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    return _LocalBatchNorm


def local_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`: synchronized BatchNorm layers (``SyncBatchNorm``,
    :class:`CPUSyncBatchNorm`) become per-process ones sharing their parameters and buffers.

    For work one rank does alone, or every rank repeats identically on the same data (BatchNorm recalibration on
    a copy of the model), where a collective would wait for ranks that never join it.
    """
    import torch

    out = module
    if isinstance(module, (torch.nn.SyncBatchNorm, _cpu_sync_bn_class())):
        out = _rebuilt_batchnorm(module, _local_bn_class())
    for name, child in module.named_children():
        out.add_module(name, local_batchnorm(child))
    return out


def _rebuilt_batchnorm(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A ``cls`` BatchNorm layer with ``module``'s settings that shares its parameters, buffers and mode."""
    out: torch.nn.Module = cls(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
    if module.affine:
        out.weight = module.weight
        out.bias = module.bias
    out.running_mean = module.running_mean
    out.running_var = module.running_var
    out.num_batches_tracked = module.num_batches_tracked
    out.training = module.training
    return out
