"""The pretraining loop: data -> kornia views on the device -> lightly method -> checkpoints -> export.

Run directory (``--out``)::

    OUT/config.yaml                      resolved config
    OUT/checkpoints/step_<N>.pt          model, optimizer, scheduler, scaler, RNG state (torch.save; loaded with
                                         weights_only=True)
    OUT/metrics.jsonl, OUT/metrics.csv   step, loss, lr, images_per_s, data_wait_pct, elapsed_s
    OUT/loss.png                         loss curve
    OUT/encoder/                         encoder.safetensors + encoder.json (+ config.yaml): segfactory.formats.encoder
    OUT/summary.json                     final numbers of the last run

Distributed (``train.devices > 1``, or any run started by ``torchrun``): DDP over ``torch.distributed``
(:mod:`segfactory.distributed`). ``train.batch_size`` stays the global batch; each rank reads a contiguous slice of
it (same data order, same augmentation parameters), BatchNorm is synchronized over the global batch (but MoCo's
shuffled-BN key branch), lightly's losses and memory banks gather across ranks; rank 0 alone prints, writes metrics,
checkpoints and the encoder.

Determinism: model init is seeded, the data order and each sample's square crop are functions of
``(seed, position)``, and each micro-batch's augmentation parameters come from a generator seeded with
``(seed, step, micro)``; a resumed run therefore repeats an uninterrupted one exactly (on the same device).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.augment import ViewMaker, adjust_specs
from pretrain.backbones import BACKBONES
from pretrain.config import PretrainConfig, crop_too_large
from pretrain.encoder import PooledEncoder, build_encoder
from pretrain.images import cache_stats, make_loader, new_cache_stats, use_stream
from pretrain.init import PRETRAIN_CHECKPOINT_FORMAT, InitReport, load_init
from pretrain.methods import METHODS, build_method
from pretrain.methods.base import SSLMethod
from segfactory import distributed, torchutil
from segfactory.config import hash_config, save_resolved
from segfactory.console import console, progress
from segfactory.distributed import DistInfo
from segfactory.errors import DeferredInterrupt, UserError
from segfactory.formats.encoder import save_encoder
from segfactory.formats.images import ImageEntry, IngestedImages, open_images
from segfactory.io import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir
from segfactory.lock import run_dir_lock
from segfactory.plotting import figure_png
from segfactory.resume import describe_change, read_jsonl, truncate_jsonl
from segfactory.seeds import pretrain_augment_seed
from segfactory.torchutil import LossGuard, check_finite_weights, memory_hint, resolve_device, warmup_decay
from segfactory.tracking import open_tracker, strip_tracking

# What a diverged loss or NaN weights ask the user to change.
DIVERGED_FIX = "lower optim.lr, set optim.grad_clip or train.amp=off"

CKPT_DIR = "checkpoints"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRIC_FIELDS = ["step", "loss", "lr", "images_per_s", "data_wait_pct", "elapsed_s"]
IMAGENET = {3: ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), 1: ([0.449], [0.226])}


# --------------------------------------------------------------------------------------------- helpers


def normalization(kind: str, in_chans: int, data: IngestedImages) -> dict[str, list[float]]:
    if kind == "dataset" and str(in_chans) in data.stats:
        st = data.stats[str(in_chans)]
        return {"mean": list(st["mean"]), "std": [max(s, 1e-3) for s in st["std"]]}
    if kind == "imagenet" or kind == "dataset":
        mean, std = IMAGENET[in_chans]
        return {"mean": mean, "std": std}
    return {"mean": [0.5] * in_chans, "std": [0.5] * in_chans}


def select_entries(entries: list[ImageEntry], crop: int, policy: str) -> list[ImageEntry]:
    """Drop (or keep, to upscale) images whose short side is below the crop size."""
    small = [e for e in entries if min(e.height, e.width) < crop]
    if not small or policy == "upscale":
        return entries
    kept = [e for e in entries if min(e.height, e.width) >= crop]
    if not kept:
        raise crop_too_large(len(entries), max(min(e.height, e.width) for e in entries), crop)
    console.print(f"skipping {len(small)} of {len(entries)} images with a short side below augment.crop_size="
                  f"{crop} (augment.small_images=upscale keeps them)")
    return kept


def build_optimizer(model: torch.nn.Module, cfg: PretrainConfig, peak_lr: float) -> torch.optim.Optimizer:
    # no weight decay on biases and norm parameters (standard for SSL recipes)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    o = cfg.optim
    if o.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=peak_lr)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=peak_lr, momentum=o.momentum)
    from lightly.utils.lars import LARS

    return LARS(groups, lr=peak_lr, momentum=o.momentum)


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_paths(out: Path) -> list[Path]:
    d = out / CKPT_DIR
    return sorted(d.glob("step_*.pt")) if d.is_dir() else []


def _arch(cfg: PretrainConfig, in_chans: int) -> dict[str, Any]:
    return {"method": cfg.method.name, "backbone": cfg.backbone.name,
            "timm_name": BACKBONES.get(cfg.backbone.name).timm_name, "in_chans": in_chans}


def save_checkpoint(out: Path, step: int, model: SSLMethod, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
                    cfg: PretrainConfig, in_chans: int, data_hash: str, keep: int, world_size: int = 1) -> Path:
    check_finite_weights(model, f"the checkpoint at step {step}", DIVERGED_FIX)
    persistent = set(model.state_dict())
    state = {
        "format": PRETRAIN_CHECKPOINT_FORMAT, "step": step, "arch": _arch(cfg, in_chans),
        "model": model.state_dict(),
        # e.g. MoCo's memory bank: lightly registers it non-persistent, but exact resume needs it
        "extra_buffers": {k: v for k, v in model.named_buffers() if k not in persistent},
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        "config": cfg.model_dump(mode="json"), "data_hash": data_hash, "world_size": world_size,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    path = out / CKPT_DIR / f"step_{step:07d}.pt"
    atomic_write_bytes(path, buf.getvalue())
    for old in checkpoint_paths(out)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist", fix="pass a step_*.pt file from OUT/checkpoints")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling refuses, truncated zip, not a torch file...
        raise UserError(f"'{path}' is not a readable segfactory checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''})",
                        fix="pass a step_*.pt file written by `segfactory pretrain`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != PRETRAIN_CHECKPOINT_FORMAT:
        raise UserError(f"'{path}' is not a segfactory pretrain checkpoint",
                        fix="pass a step_*.pt file written by `segfactory pretrain`")
    return ckpt


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a checkpoint's GradScaler state, if it has one.

    A disabled scaler (CPU, bf16 or fp32 run) saves ``{}``; an fp16 run resumed from such a checkpoint starts
    with a fresh loss scale (``load_state_dict({})`` would raise on an enabled scaler).
    """
    if state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled():
        console.print("note: the checkpoint has no fp16 loss-scaler state (it was not an fp16 run); "
                      "starting from the default loss scale")


def check_same_arch(ckpt: dict[str, Any], arch: dict[str, Any], path: Path) -> None:
    for key in ("backbone", "timm_name", "in_chans", "method"):
        if ckpt["arch"].get(key) != arch[key]:
            c = ckpt["arch"]
            raise UserError(
                f"checkpoint '{path}' is a {c['method']} / {c['backbone']} (in_chans={c['in_chans']}) run; "
                f"the config asks for {arch['method']} / {arch['backbone']} (in_chans={arch['in_chans']})",
                fix=f"pass --method {c['method']} --backbone {c['backbone']} (and the same images), "
                    "or start a new --out without --resume")


# ------------------------------------------------------------------------------------------- distributed


def check_distributed(cfg: PretrainConfig, world_size: int) -> None:
    """Refuse what cannot run data-parallel on ``world_size`` processes (before any process starts).

    Raises:
        UserError: a method without a correct multi-process version, or a batch the ranks cannot split evenly.
    """
    if world_size <= 1:
        return
    tr = cfg.train
    why = METHODS.get(cfg.method.name).distributed_unsupported
    if why:
        ok = [n for n in METHODS.names() if not METHODS.get(n).distributed_unsupported]
        raise UserError(f"method.name={cfg.method.name} cannot train on {world_size} processes yet: {why}",
                        fix=f"set train.devices=1, or use one of {', '.join(ok)}")
    if tr.batch_size % world_size:
        raise UserError(f"train.batch_size={tr.batch_size} (the global batch) does not split evenly over "
                        f"{world_size} processes", fix=f"set train.batch_size to a multiple of {world_size}")


def setup_distributed(cfg: PretrainConfig, device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the torchrun job this process belongs to (none: one process) and return its place and device."""
    return distributed.join(cfg.train, device, lambda n: check_distributed(cfg, n))


def sync_batchnorm(model: SSLMethod, device: torch.device) -> SSLMethod:
    """Make the method's BatchNorms normalize over the global batch, except in its ``per_rank_batchnorm()``
    children (MoCo's key branch, whose per-rank statistics are its shuffled BN). In place; returns ``model``."""
    keep = set(model.per_rank_batchnorm())
    for name, child in list(model.named_children()):
        if name not in keep:
            setattr(model, name, distributed.convert_sync_batchnorm(child, device))
    return model


def note_world_size(ckpt: dict[str, Any], info: DistInfo, path: Path) -> None:
    """What resuming with another number of processes means (said, not refused)."""
    saved = int(ckpt.get("world_size", 1))
    if saved != info.world_size:
        console.print(f"note: checkpoint {path.name} was written by a run of {saved} process(es), this one has "
                      f"{info.world_size}: the global batch, data order, augmentations and schedule continue "
                      "unchanged; results match an uninterrupted run up to floating-point reduction order")


def _sync_context(ddp: torch.nn.Module | None, last_micro: bool) -> Any:
    """DDP's gradient all-reduce runs on the last micro-batch of a step only (``no_sync`` before it)."""
    if ddp is None or last_micro:
        return contextlib.nullcontext()
    return ddp.no_sync()  # type: ignore[operator]


# ------------------------------------------------------------------------------------------- the loop


def lock_run_dir(out: Path) -> contextlib.AbstractContextManager[None]:
    """The run lock of ``OUT`` (:func:`segfactory.lock.run_dir_lock`): a second pretrain into it stops with exit 4.
    The CLI takes it before it re-runs itself under torchrun; :func:`run_pretrain` takes it otherwise."""
    return run_dir_lock(out, "pretrain", fix="wait for it to finish (--resume then continues it), or use another "
                        "--out")


def run_pretrain(cfg: PretrainConfig, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 resume: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Pretrain, checkpoint and export an encoder, holding ``OUT``'s run lock (:func:`lock_run_dir`).

    Args:
        cfg: Validated config.
        images_dir: Output of ``segfactory ingest``.
        out_dir: Run directory.
        resume: None (fresh run), "last" (OUT's latest checkpoint) or a checkpoint path.
        stop_after: Stop after this many steps of this invocation (a checkpoint and an export are written;
            ``resume`` continues). Lets a long run fit scheduler time slots.

    Returns:
        Summary (steps, final loss, throughput, data-wait share, encoder path).

    Raises:
        UserError: exit code 4 while another pretrain writes ``OUT``.
    """
    with lock_run_dir(ensure_writable_dir(out_dir)):
        return _run_pretrain(cfg, images_dir, out_dir, resume, stop_after)


def _run_pretrain(cfg: PretrainConfig, images_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  resume: str | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """:func:`run_pretrain` inside the run lock."""
    t_start = time.perf_counter()
    data = open_images(images_dir)
    out = ensure_writable_dir(out_dir)
    ckpt_path: Path | None = None
    if resume is None and checkpoint_paths(out):
        last = checkpoint_paths(out)[-1]
        raise UserError(f"'{out}' already holds a run (checkpoint {last.name})",
                        fix="pass --resume to continue it, or choose another --out")
    if resume is not None:
        if resume == "last":
            if not checkpoint_paths(out):
                raise UserError(f"--resume: '{out / CKPT_DIR}' holds no checkpoint", fix="run without --resume")
            ckpt_path = checkpoint_paths(out)[-1]
        else:
            ckpt_path = Path(resume)

    in_chans = cfg.backbone.in_chans if cfg.backbone.in_chans != "auto" else (
        1 if data.num_gray == len(data.entries) else 3)
    aug = cfg.augment
    single = aug.single_channel if aug.single_channel is not None else (
        in_chans == 1 or data.num_gray == len(data.entries))
    entries = select_entries(data.entries, aug.crop_size, aug.small_images)
    load_size = aug.load_size or round(aug.crop_size * 8 / 7)  # at least crop_size (AugmentConfig checks it)
    device = resolve_device(cfg.train.device, "train.device")
    info, device = setup_distributed(cfg, device)
    if not info.is_main:  # progress, notes and summary from rank 0 only (restored before any error is printed)
        console.quiet = True
    amp_dtype = torchutil.amp_dtype(device, cfg.train.amp, "train.amp")
    tr = cfg.train
    total = tr.steps
    arch = _arch(cfg, in_chans)

    ckpt = None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if int(ckpt["step"]) > total:  # nothing to train and nothing to rewrite: config.yaml and encoder/ stay
            raise UserError(f"train.steps={total} is below the step of checkpoint '{ckpt_path}' ({ckpt['step']}): "
                            "the run is already past it; nothing was done",
                            fix=f"set train.steps above {ckpt['step']} to train on (its encoder is in the run's "
                                "encoder/ when it finished or stopped cleanly)")
        check_same_arch(ckpt, arch, ckpt_path)
        note_world_size(ckpt, info, ckpt_path)
        if ckpt["data_hash"] != data.data_hash:
            console.print(f"note: the images changed since checkpoint {ckpt_path.name} (new data is mixed in from "
                          "here on)")

    # seeded, scoped init: the global RNG is forked so nothing outside sees the seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tr.seed)
        encoder = build_encoder(cfg.backbone.name, in_chans)
        init = _load_init(encoder, cfg, in_chans) if ckpt is None else None  # before momentum twins copy it
        model = build_method(cfg.method.name, encoder, cfg.method, total)
    specs = adjust_specs(model.view_specs(aug.crop_size, aug.local_crop_size, aug.min_scale), aug, single)
    norm = normalization(cfg.data.normalization, in_chans, data)
    views = ViewMaker(specs, norm["mean"], norm["std"])
    if info.distributed:
        sync_batchnorm(model, device)
    model.to(device)
    if tr.channels_last:
        model.to(memory_format=torch.channels_last)
    eff_batch = tr.batch_size * tr.accumulate
    peak_lr = cfg.optim.lr * eff_batch / 256
    opt = build_optimizer(model, cfg, peak_lr)
    sched = warmup_decay(opt, total, cfg.optim.warmup_steps, min_ratio=cfg.optim.min_lr_ratio)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start = 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint '{ckpt_path}' does not fit this config's model ({str(e).splitlines()[0]})",
                            fix="resume with the config the run was started with (see OUT/config.yaml)") from None
        named = dict(model.named_buffers())
        for k, v in ckpt["extra_buffers"].items():
            named[k].copy_(v)
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        restore_scaler(scaler, ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start = int(ckpt["step"])
        changed = describe_change(strip_tracking(ckpt["config"]), strip_tracking(cfg.model_dump(mode="json")))
        if changed:
            console.print(f"note: config changed since the checkpoint: {changed}")
        if info.is_main:
            truncate_jsonl(out / METRICS_JSONL, start)
        console.print(f"resuming from {ckpt_path} at step {start}")
    if start >= total:
        console.print(f"already at step {start} of train.steps={total}; nothing to train")
    if info.is_main:
        save_resolved(cfg, out / "config.yaml")
    tracker = open_tracker(cfg.tracking, out, start if ckpt is not None else None)  # a no-op on ranks but 0
    tracker.log_params(cfg.model_dump(mode="json"))
    ddp: torch.nn.Module | None = None
    if info.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    forward = ddp if ddp is not None else model

    workers = cfg.data.num_workers if cfg.data.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    dc = cfg.data
    stream = use_stream(dc.order, len(entries), dc.stream_min_images)
    cache_counts = new_cache_stats(workers)  # the loader workers' frame-cache hits, misses and bytes
    loader = make_loader(entries, load_size, in_chans, tr.batch_size, tr.seed, start * tr.accumulate, workers,
                         pin_memory=device.type == "cuda", prefetch_factor=dc.prefetch_factor, stream=stream,
                         buffer=dc.stream_buffer, unit_size=dc.stream_unit, rank=info.rank,
                         world_size=info.world_size, cache_mb=dc.cache_mb, cache_stats=cache_counts)
    end = total if stop_after is None else min(total, start + stop_after)
    console.print(f"pretrain: {cfg.method.name} / {cfg.backbone.name} (in_chans={in_chans}) on {len(entries)} images, "
                  f"{device}{' ' + str(amp_dtype).removeprefix('torch.') if amp_dtype else ''}, steps {start}->{end} "
                  f"of {total}, batch {tr.batch_size}x{tr.accumulate}, views {[s.size for s in specs]}, "
                  f"data order {'stream' if stream else 'random'}"
                  + (f", {info.world_size} processes ({info.backend})" if info.distributed else ""))
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    step = start
    last_row: dict[str, Any] = {}
    win_loss = torch.zeros((), device=device)
    win_n, win_wait, win_t0 = 0, 0.0, time.perf_counter()
    total_wait, total_t0, total_images = 0.0, time.perf_counter(), 0
    metrics_f = open(out / METRICS_JSONL if info.is_main else os.devnull, "a", encoding="utf-8")  # noqa: SIM115
    it = iter(loader)
    model.train()
    saved = start  # the step of the newest checkpoint of this run
    try:
        guard = LossGuard(tr.max_bad_steps, "train.max_bad_steps", DIVERGED_FIX)
        interrupt = DeferredInterrupt(lambda sig: console.print(
            f"{sig}: stopping after this step with a checkpoint (a second Ctrl-C stops at once, without one)"))
        lower = f"train.batch_size ({tr.batch_size}; train.accumulate keeps the effective batch) or the crop sizes"
        with progress() as bar, interrupt, memory_hint("pretraining", lower):
            task = bar.add_task("pretrain", total=total, completed=start)
            while step < end:
                distributed.exit_hook(info, step)
                # at a step boundary: the state is exactly that after `step` steps (all ranks stop together)
                if distributed.any_rank(bool(interrupt.requested), info):
                    if step > saved and info.is_main:
                        save_checkpoint(out, step, model, opt, sched, scaler, cfg, in_chans, data.data_hash,
                                        tr.keep_checkpoints, info.world_size)
                        saved = step
                        console.print(f"checkpoint at step {step} saved; --resume continues")
                    raise interrupt.stop()
                model.on_step_start(step)
                for micro in range(tr.accumulate):
                    t0 = time.perf_counter()
                    batch = next(it)
                    wait = time.perf_counter() - t0
                    win_wait += wait
                    total_wait += wait
                    batch = batch.to(device, non_blocking=True)
                    gen = torch.Generator().manual_seed(pretrain_augment_seed(tr.seed, step, micro))
                    with torch.no_grad():
                        v = views(batch, gen, channels_last=tr.channels_last, rank=info.rank,
                                  world_size=info.world_size)
                    with _sync_context(ddp, micro == tr.accumulate - 1):
                        with autocast():
                            loss = forward(v, step)
                        # the global batch's loss (mean over ranks): every rank takes the same decision below
                        loss_all = distributed.all_mean(loss, info)
                        if not guard.check(loss_all, step):  # one host sync per micro-batch: nothing is kept
                            if ddp is not None:  # DDP expects the backward of each forward; its grads are dropped
                                (loss * 0).backward()
                            bad = True
                            break
                        scaler.scale(loss / tr.accumulate).backward()
                    win_loss += loss_all.float()
                    win_n += 1
                else:
                    bad = False
                if bad:  # skipped (train.max_bad_steps): no optimizer step; the schedule follows the step count
                    opt.zero_grad(set_to_none=True)
                    sched.step()
                    step += 1
                    bar.update(task, completed=step)
                    continue
                model.on_before_optimizer_step(step)
                if cfg.optim.grad_clip:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                total_images += eff_batch
                bar.update(task, completed=step)
                if step % tr.log_every == 0 or step == end:
                    now = time.perf_counter()
                    loss_v = (win_loss / max(1, win_n)).item()  # finite: LossGuard checked every micro-batch
                    dt = now - win_t0
                    last_row = {"step": step, "loss": round(loss_v, 6), "lr": opt.param_groups[0]["lr"],
                                "images_per_s": round(win_n * tr.batch_size / dt, 2),
                                "data_wait_pct": round(100 * win_wait / dt, 2),
                                "elapsed_s": round(now - total_t0, 2)}
                    metrics_f.write(json.dumps(last_row) + "\n")
                    metrics_f.flush()
                    tracker.log_metrics(last_row)
                    bar.update(task, description=f"pretrain loss {loss_v:.4f}")
                    win_loss.zero_()
                    win_n, win_wait, win_t0 = 0, 0.0, now
                if step % tr.checkpoint_every == 0 and step < end:
                    if info.is_main:
                        save_checkpoint(out, step, model, opt, sched, scaler, cfg, in_chans, data.data_hash,
                                        tr.keep_checkpoints, info.world_size)
                    saved = step
    except KeyboardInterrupt:
        # a mid-step interrupt (second Ctrl-C) leaves half-updated state: never checkpointed
        if step > saved:
            last = checkpoint_paths(out)
            console.print(f"stopped during step {step + 1} without a checkpoint; --resume continues from "
                          f"{last[-1].name if last else 'the start'}")
        raise
    finally:
        metrics_f.close()
        del it, loader
        console.quiet = False
        if not info.is_main:
            ddp = forward = None  # it holds the process group (see distributed.teardown)
            distributed.teardown()

    if not info.is_main:
        return {}  # rank 0 writes the checkpoint, the encoder and the summary
    if step > start or ckpt is None:
        save_checkpoint(out, step, model, opt, sched, scaler, cfg, in_chans, data.data_hash, tr.keep_checkpoints,
                        info.world_size)
    ddp = forward = None
    distributed.teardown()
    enc = model.export_encoder
    enc_dir = save_encoder(out / "encoder", enc.body, timm_name=enc.spec.timm_name, in_chans=in_chans,
                           normalization=norm, method=cfg.method.name, steps=step, data_manifest_hash=data.data_hash,
                           timm_kwargs=enc.spec.timm_kwargs, smp_compatible=enc.spec.smp_compatible,
                           extra={"backbone": cfg.backbone.name, "seed": tr.seed, "config_hash": hash_config(cfg),
                                  "crop_size": aug.crop_size,
                                  **_init_meta(cfg, init)})
    save_resolved(cfg, enc_dir / "config.yaml")
    rows = read_jsonl(out / METRICS_JSONL)
    _write_csv(out, rows)
    _plot_loss(out, rows, f"{cfg.method.name} / {cfg.backbone.name}")
    wall = time.perf_counter() - total_t0
    summary = {
        "out": str(out), "encoder": str(enc_dir), "method": cfg.method.name, "backbone": cfg.backbone.name,
        "in_chans": in_chans, "device": str(device), "world_size": info.world_size,
        "cpu_threads": torch.get_num_threads(),  # per process
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else None,
        "steps": step, "total_steps": total, "finished": step >= total,
        "final_loss": last_row.get("loss"), "images_per_s": round(total_images / wall, 2) if wall > 0 else None,
        "data_wait_pct": round(100 * total_wait / wall, 2) if wall > 0 else None,
        "images": len(entries), "data_hash": data.data_hash, "seconds": round(time.perf_counter() - t_start, 2),
        "loader_workers": workers, "loader_cache_mb_limit": dc.cache_mb,
        **{f"loader_{k}": v for k, v in cache_stats(cache_counts).items()},  # this rank's readers (rank 0)
    }
    tracker.log_artifact(enc_dir, "encoder")
    tracker.log_summary(summary)
    tracker.close("FINISHED" if step >= total else "KILLED")  # KILLED: paused (stop_after); --resume continues it
    if tracker.errors:
        summary["tracking_errors"] = tracker.errors
    atomic_write_json(out / "summary.json", summary)
    _print_summary(summary)
    return summary


def _load_init(encoder: PooledEncoder, cfg: PretrainConfig, in_chans: int) -> InitReport | None:
    """Load ``backbone.init`` (continued pretraining) into the encoder; a resumed run's checkpoint holds them."""
    if cfg.backbone.init is None:
        return None
    report = load_init(encoder.body, encoder.spec, cfg.backbone.name, in_chans, cfg.backbone.init,
                       cfg.backbone.init_sha256)
    console.print(report.describe())
    return report


def _init_meta(cfg: PretrainConfig, init: InitReport | None) -> dict[str, Any]:
    """``encoder.json``'s ``init`` entry (a resumed run names the file and hash its config started from)."""
    if init is not None:
        return {"init": init.as_json()}
    if cfg.backbone.init is not None:
        return {"init": {"path": cfg.backbone.init, "sha256": cfg.backbone.init_sha256}}
    return {}


# ------------------------------------------------------------------------------------------- metrics


def _write_csv(out: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / METRICS_CSV, buf.getvalue())


def _plot_loss(out: Path, rows: list[dict[str, Any]], title: str) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:gray", lw=1, ls="--")
    ax2.set_ylabel("lr", color="tab:gray")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write_bytes(out / "loss.png", figure_png(fig))


def _print_summary(s: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="pretrain", show_header=False)
    for k in ("method", "backbone", "device", "steps", "final_loss", "images_per_s", "data_wait_pct",
              "loader_cache_hit_pct", "encoder", "seconds"):
        t.add_row(k, str(s[k]))
    console.print(t)
