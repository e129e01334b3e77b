"""Cached pipeline stages shared by ``segfactory run`` and ``segfactory refresh``.

A stage's output lives in ``ROOT/stages/<stage>-<key>/``, where the key hashes the stage's config section, the
keys of its inputs and the version of the code that produces it; a directory holding ``stage.json`` is finished
and reused. Training, evaluation and prediction run as single Dask tasks (asking for a ``GPU`` resource when the
cluster offers one; a stage with ``train.devices = N`` asks for N and runs its N torchrun processes inside that one
task), each in its own ``segfactory`` process with a timeout, writing into an attempt directory
``ROOT/stages/.tmp-<stage>-<key>-<random>/`` that is committed with the shared unit protocol
(:func:`segfactory.io.commit_unit`: ``stage.json`` with every file's sha256 written last, fsync, rename) only
when the command really finished. A killed attempt's directory is adopted by the next attempt, which resumes
the training from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

import segfactory
from pipelines.cluster import GPU_RESOURCE, ClusterConfig, open_client, training_resources
from pipelines.render import RenderStep
from segfactory.config import StrictModel
from segfactory.console import PROGRESS_LINES_ENV, console, parse_progress_line, progress
from segfactory.distributed import STAGE_THREADS_ENV
from segfactory.errors import EXIT_USER, STAGE_LOG_ENV, PartialFailure, UserError
from segfactory.io import (
    ATTEMPT_PREFIX,
    atomic_write_json,
    canonical_hash,
    check_files,
    commit_unit,
    empty_trash,
    file_checksums,
    is_committed,
    new_attempt_dir,
    read_json,
    waiting_lock,
)
from segfactory.tracking import strip_tracking
from synth.shard import RENDER_PACKAGES

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig
    from finetune.data.remap import TargetClasses
    from pretrain.config import PretrainConfig

STAGE_FILE = "stage.json"
STAGE_PROGRESS_TOPIC = "segfactory-stage-progress"
# The packages whose code decides each stage's output: editing them invalidates the stage's cache.
# The shared core modules that training code draws its augmentation, seeds and schedules from count too.
TRAINING_CORE = ("segfactory.augment", "segfactory.seeds", "segfactory.torchutil")
PRETRAIN_PACKAGES = ("pretrain", *TRAINING_CORE)
FINETUNE_PACKAGES = ("finetune", "pretrain", "synth", *TRAINING_CORE)


class HeldOutSet(StrictModel):
    """``test``: held-out rendered scenes that evaluation scores (never seen in fine-tuning)."""

    scenes: int = Field(4, ge=0, description="held-out scenes, rendered like the training dataset "
                        "(0 = evaluate on the training dataset itself)")
    seed: int | None = Field(None, ge=0, description="their base seed (default: the training seed + 1); must differ "
                             "from the training seed")


def stage_dir(root: Path, name: str, key_material: dict[str, Any], packages: tuple[str, ...]) -> Path:
    """``ROOT/stages/<name>-<key>``: the key hashes ``key_material`` and the code version of ``packages`` (none:
    the output is not tied to a code version, e.g. an incrementally grown image set)."""
    code = segfactory.code_version(*packages) if packages else None
    return root / "stages" / f"{name}-{canonical_hash({**key_material, 'code': code}, 12)}"


def training_key(cfg: StrictModel) -> dict[str, Any]:
    """A training config as stage key material: everything but ``train.stop_at``, which only says where an
    invocation pauses (a run stopped there and re-run without it resumes the same stage), ``tracking``, which
    only says where the run is watched, and pretraining's ``data.cache_mb``, which changes no batch."""
    dump = strip_tracking(cfg.model_dump(mode="json"))
    if isinstance(dump.get("train"), dict) and "stop_at" in dump["train"]:
        dump["train"]["stop_at"] = None  # as if unset: keys of runs that never set it stay what they were
    if isinstance(dump.get("data"), dict):
        dump["data"].pop("cache_mb", None)  # already absent at its default (see pretrain.config)
    return dump


def check_encoder_matches(pretrain: PretrainConfig, finetune: FinetuneConfig, prefix: str, fix_more: str = "") -> None:
    """Stop before any work when fine-tuning names another encoder than the one pretraining trains.

    Fine-tuning starts from the pretrained encoder (``--encoder``), which would stop the fine-tune stage only
    after rendering and pretraining have run; ``prefix`` is where the sections live in the config (``""``,
    ``"train."``).

    Raises:
        UserError: ``finetune.model.encoder`` is set and is not ``pretrain.backbone.name``'s architecture, or the
            backbone is one that fine-tuning cannot use (a plain ViT).
    """
    from pretrain.backbones import BACKBONES

    want, name = finetune.model.encoder, pretrain.backbone.name
    spec = BACKBONES.get(name)
    got = spec.timm_name
    if not spec.smp_compatible:
        cnns = ", ".join(n for n in BACKBONES if BACKBONES.get(n).smp_compatible and not BACKBONES.get(n).tiny)
        raise UserError(f"{prefix}pretrain.backbone.name={name} is a plain ViT, which fine-tuning cannot start from "
                        "(segmentation-models-pytorch needs features at several strides)",
                        fix=f"set {prefix}pretrain.backbone.name to a CNN ({cnns}){fix_more}")
    if want is not None and want != got:
        raise UserError(f"{prefix}finetune.model.encoder={want} but {prefix}pretrain.backbone.name={name} trains a "
                        f"{got}: fine-tuning starts from the pretrained encoder, so both must be one architecture",
                        fix=f"set {prefix}pretrain.backbone.name={want} or {prefix}finetune.model.encoder={got}"
                        f"{fix_more}")


def check_random_init_encoder(finetune: FinetuneConfig, prefix: str) -> None:
    """Stop before any work when fine-tuning from random init (``init=random``: no pretrained encoder to take the
    architecture from) names no encoder, or one that timm does not know: the fine-tune stage would refuse it only
    after rendering. A registered backbone's architecture (resnet18, ...) is known without importing timm (and
    torch) into the driver.

    Raises:
        UserError: ``finetune.model.encoder`` is unset or not a timm model name.
    """
    from pretrain.backbones import BACKBONES

    name = finetune.model.encoder
    if name is None:
        raise UserError(f"{prefix}model.encoder is not set: with init=random there is no pretrained encoder to take "
                        "the architecture from", fix=f"set {prefix}model.encoder=resnet18 (a timm model name), or "
                        "init=ssl (fine-tune the encoder the pretrain stage trains)")
    if name in {BACKBONES.get(n).timm_name for n in BACKBONES}:
        return
    from finetune.models import check_timm_name

    check_timm_name(name, f"{prefix}model.encoder")


def model_targets(finetune: FinetuneConfig, rendered: list[dict[str, Any]]) -> TargetClasses:
    """The classes a fine-tune on a rendered dataset trains: ``finetune.classes``, else ``rendered``, the classes
    the render writes (:func:`pipelines.render.rendered_classes`; the fine-tune stage's rule,
    :func:`finetune.data.sources.resolve_targets`, with the rendered dataset its first synthetic source)."""
    from finetune.data.remap import make_targets

    classes = [c.model_dump() for c in finetune.classes] if finetune.classes is not None else rendered
    return make_targets(classes, finetune.ignore_index)


def check_real_eval_classes(folders: list[Path], targets: TargetClasses, remap: dict[str, Any], flag: str) -> None:
    """Stop before any work when a labeled real folder to score the model on has a class the model lacks
    (``targets``, :func:`model_targets`) that ``remap`` does not map.

    Args:
        flag: How the fix spells a mapping (``eval.remap.``, ``train.promotion.remap.``).

    Raises:
        UserError: naming the folder, its class and the model's classes.
    """
    from finetune.config import SourceSpec
    from finetune.evaluate import check_real_classes

    for folder in folders:
        check_real_classes(SourceSpec(path=folder, remap=remap), targets, flag=flag)


def check_class_weights(finetune: FinetuneConfig, targets: TargetClasses, prefix: str) -> None:
    """Stop before any work when ``train.loss.class_weights`` is a list with another length than the model's
    classes (``targets``, :func:`model_targets`): the fine-tune stage refused it when it built its loss.

    Raises:
        UserError: naming the field, the counts and the classes.
    """
    weights = finetune.train.loss.class_weights
    if isinstance(weights, list) and len(weights) != targets.num_classes:
        raise UserError(f"{prefix}train.loss.class_weights has {len(weights)} values for {targets.num_classes} "
                        "classes", fix=f"give {targets.num_classes} weights ({', '.join(targets.names)}) or use auto")


def check_training_folders(finetune: FinetuneConfig, prefix: str, targets: TargetClasses) -> None:
    """Stop before any work when a labeled folder the fine-tune section names is missing, of the other kind, or
    has a class the model lacks (``targets``, :func:`model_targets`) that its ``remap`` does not map.

    The fine-tune stage opens ``data.real`` and ``data.val`` at its start, which in a run or refresh is after
    rendering and pretraining; ``sample:NAME/SPLIT`` references are materialized here, as the stage would, and each
    folder gets the stage's own check (:func:`finetune.data.sources.source_remap`). ``prefix`` is where the section
    lives in the config (``finetune.``, ``train.finetune.``).

    Raises:
        UserError: a folder that does not exist, is neither a dataset nor a labeled folder, or (``data.real``) is
            a rendered dataset; a sample reference to images without masks; a class with no target class.
    """
    if not (finetune.data.real or finetune.data.val):
        return  # the usual run: nothing to open, and the driver need not import torch (finetune.evaluate does)
    from finetune.data.sources import check_kind, detect_kind, source_remap
    from finetune.evaluate import resolve_labeled_specs

    for i, spec in enumerate(resolve_labeled_specs(finetune.data.real, f"{prefix}data.real")):
        check_kind(Path(spec.path), "real", f"{prefix}data.real[{i}]")
        source_remap(spec, "real", targets, f"{prefix}data.real[{i}]", classes_field=f"{prefix}classes")
    for i, spec in enumerate(resolve_labeled_specs(finetune.data.val, f"{prefix}data.val")):
        field = f"{prefix}data.val[{i}]"
        source_remap(spec, detect_kind(Path(spec.path), field), targets, field, classes_field=f"{prefix}classes")


def check_pretrain_images(store: Path, pretrain: PretrainConfig, prefix: str) -> None:
    """Stop before rendering when the pretrain stage would find no image to crop: every image of the ingest store
    ``store`` has a short side below ``augment.crop_size`` and ``augment.small_images`` is ``skip``
    (:func:`pretrain.config.crop_too_large`, the stage's own error, with the fields as ``prefix`` places them:
    ``pretrain.``, ``train.pretrain.``). Called right after an ingest run, so the store's ``index.json`` (rebuilt
    at the end of every run) is current.

    Raises:
        UserError: naming the crop size, the largest short side and the fix.
    """
    from pretrain.config import crop_too_large
    from segfactory.formats.images import INDEX_FILE

    aug = pretrain.augment
    index = read_json(store / INDEX_FILE)
    largest = index.get("max_short_side")  # None: no image
    if aug.small_images == "skip" and largest is not None and largest < aug.crop_size:
        raise crop_too_large(index["num_images"], largest, aug.crop_size, prefix)


def held_out_seed(train_seed: int, test: HeldOutSet, prefix: str = "") -> int:
    """The held-out test set's base seed (``test.seed``, default the training seed + 1); checked before any work
    by ``run`` and ``refresh`` (``prefix``: where the ``test`` section lives, ``""`` or ``"train."``).

    Raises:
        UserError: ``test.seed`` is the training seed (``render.dataset.seed``).
    """
    seed = train_seed + 1 if test.seed is None else test.seed
    if seed == train_seed:
        raise UserError(f"{prefix}test.seed={seed} is the training seed: the test scenes would be training scenes",
                        fix=f"set {prefix}test.seed to another value than render.dataset.seed={train_seed}")
    return seed


def render_test_set(render_cfg: RenderStep, config_hash: str, test: HeldOutSet, root: Path, cluster: ClusterConfig,
                    performance_report: Path, prefix: str = "") -> Path | None:
    """Render (or reuse) the held-out test set: the training render config with other scenes (another seed;
    ``prefix`` as in :func:`held_out_seed`).

    Returns:
        The test dataset directory, or None when ``test.scenes`` is 0.
    """
    from pipelines.render import run_render

    if test.scenes == 0:
        return None
    train = render_cfg.dataset
    seed = held_out_seed(train.seed, test, prefix)
    dataset = train.model_copy(update={"scenes": test.scenes, "seed": seed,
                                       "scenes_per_shard": min(test.scenes, train.scenes_per_shard)})
    d = stage_dir(root, "testset", {"config": config_hash, "dataset": dataset.model_dump(mode="json")},
                  RENDER_PACKAGES)
    if not (d / STAGE_FILE).is_file():
        console.print(f"held-out test set: {test.scenes} scene(s) with seed {seed}")
        summary = run_render(render_cfg.model_copy(update={"dataset": dataset}), d, cluster,
                             performance_report=performance_report)
        atomic_write_json(d / STAGE_FILE, {"summary": summary, "config_hash": config_hash})
    return d


# Files whose presence (and content) proves a command's stage really finished, per command. A fine-tune stopped by
# train.stop_at exits 0 without summary.json; a pretrain stopped early writes summary.json with finished=false.
_FINISHED: dict[str, tuple[str, bool]] = {"pretrain": ("summary.json", True), "finetune": ("summary.json", True),
                                          "evaluate": ("metrics.json", False)}
# Text files whose recorded paths are rewritten from the attempt directory to the stage's final place on commit.
_RELOCATE_SUFFIXES = (".json", ".jsonl", ".yaml")


class StageIncomplete(UserError):
    """A stage's command ended without finishing its work (e.g. ``train.stop_at``); its attempt is kept."""


def stage_done(d: Path) -> bool:
    """Whether the stage directory ``d`` is committed (holds ``stage.json``)."""
    return is_committed(d, STAGE_FILE)


def finished_state(command: str, out: Path) -> tuple[bool, str]:
    """Whether a stage command's output in ``out`` is complete, and if not, why (from its own records)."""
    spec = _FINISHED.get(command)
    if spec is None:
        return True, ""
    name, needs_flag = spec
    path = out / name
    if not path.is_file():
        return False, f"no {name} (stopped before the end, e.g. by train.stop_at)"
    if needs_flag:
        summary = read_json(path)
        if not summary.get("finished", False):
            return False, (f"stopped at step {summary.get('steps')} of {summary.get('total_steps')} "
                           "(pretrain --stop-after)")
    return True, ""


def _has_checkpoint(command: str, attempt: Path) -> bool:
    if command == "finetune":
        return (attempt / "checkpoint.pt").is_file()
    if command == "pretrain":
        return any((attempt / "checkpoints").glob("step_*.pt"))
    return False


def _resume_point(command: str, attempt: Path) -> str:
    if command == "finetune":
        return "checkpoint.pt"
    return max((p.name for p in (attempt / "checkpoints").glob("step_*.pt")), default="?")


def _adopt_attempt(final: Path, command: str) -> tuple[Path, bool]:
    """A fresh attempt directory for stage ``final``: the newest earlier attempt that holds a checkpoint, renamed
    to a new attempt name (so a training resumes where a killed attempt stopped), or an empty one. Every other
    earlier attempt is removed. Call with the stage lock held."""
    import uuid

    parent = final.parent
    earlier = sorted(parent.glob(f"{ATTEMPT_PREFIX}{final.name}-*"), key=lambda p: p.stat().st_mtime)
    resumable = [p for p in earlier if p.is_dir() and _has_checkpoint(command, p)]
    take = resumable[-1] if resumable else None
    for p in earlier:
        if p != take:
            shutil.rmtree(p, ignore_errors=True)
    empty_trash(parent)  # e.g. a foreign directory that stood where a stage was committed
    if take is None:
        return new_attempt_dir(parent, final.name), False
    attempt = parent / f"{ATTEMPT_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    os.replace(take, attempt)
    return attempt, True


def _relocate(attempt: Path, final: Path) -> None:
    """Rewrite the attempt directory's path to the stage's final path in the outputs' text records (model
    lineage, summaries), so a committed stage names itself where it lives."""
    from segfactory.io import atomic_write_text

    old, new = str(attempt), str(final)
    for p in attempt.rglob("*"):
        if p.is_file() and p.suffix in _RELOCATE_SUFFIXES:
            text = p.read_text(encoding="utf-8", errors="surrogateescape")
            if old in text:
                atomic_write_text(p, text.replace(old, new))


def commit_stage(attempt: Path, final: Path, record: dict[str, Any]) -> bool:
    """Commit a finished stage: its files' sha256 and ``record`` go into ``stage.json`` (the commit mark, last),
    then :func:`segfactory.io.commit_unit` (fsync, rename). False if another attempt committed it first."""
    atomic_write_json(attempt / STAGE_FILE, {**record, "files": file_checksums(attempt, exclude=(STAGE_FILE,))})
    return commit_unit(attempt, final, mark=STAGE_FILE)


def verify_stage(d: Path, max_bytes: int | None = None) -> list[str]:
    """Re-hash a committed stage's files against its ``stage.json`` (stages committed before checksums were
    recorded, and the render stages, whose datasets are verified shard by shard, have none to check);
    ``max_bytes``: only the files up to that size (and those missing)."""
    try:
        record = read_json(d / STAGE_FILE)
        files = dict(record.get("files") or {})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        return [f"{STAGE_FILE}: unreadable ({type(e).__name__}: {e})"]
    if max_bytes is not None:
        def small(rel: str) -> bool:
            try:
                return (d / rel).stat().st_size <= max_bytes
            except OSError:
                return True  # missing or unreadable: check_files says so
        files = {rel: digest for rel, digest in files.items() if small(rel)}
    return check_files(d, files)


# Before a committed stage is reused, its files up to this size are re-hashed against its stage.json: the records
# a pipeline reads back (metrics, summaries, configs, lineage) cost nothing to check; weights and checkpoints are
# left to `segfactory verify`.
REUSE_CHECK_BYTES = 8 << 20


def reusable(name: str, final: Path) -> bool:
    """Whether the committed stage ``final`` can be reused: committed, and its small files (``REUSE_CHECK_BYTES``)
    still what its ``stage.json`` recorded. A corrupt one is moved aside (``.bad-<name>-<random>``, kept for
    inspection, as ``segfactory verify --repair`` would), with a note, so that it is built again."""
    from segfactory.io import move_aside

    if not stage_done(final):
        return False
    problems = verify_stage(final, REUSE_CHECK_BYTES)
    if not problems:
        return True
    moved = move_aside(final)
    console.print(f"[yellow]stage {name}'s cached output '{final}' changed since it was committed[/] "
                  f"({'; '.join(problems[:2])}): moved aside to '{moved.name}', running the stage again",
                  soft_wrap=True)
    return False


@contextlib.contextmanager
def _stage_lock(final: Path) -> Iterator[int]:
    """Hold ``.<stage>.lock`` next to the stage (blocking) and yield its file descriptor: one attempt of a stage at
    a time, also across a killed driver's still-running task and the re-run's (the kernel drops the lock when
    every process holding the descriptor has exited). The task hands it down to its stage process, so a retry
    after a lost worker waits until the killed attempt's stage process (which outlives its worker by a step, to
    write a checkpoint) has exited, and then resumes from that checkpoint."""
    with waiting_lock(final.parent / f".{final.name}.lock") as fd:
        yield fd


def stage_env(threads: int) -> dict[str, str]:
    """The environment of a stage's process: this worker's, without what a Dask nanny set for its own tasks.

    A nanny starts its worker with ``OMP_NUM_THREADS=1`` (and MKL's, OpenBLAS's) and ``MALLOC_TRIM_THRESHOLD_=65536``
    (``distributed.nanny.pre-spawn-environ``): right for many small tasks side by side, wrong for a training,
    evaluation or prediction process that inherits them. It trained on one core of a machine whose other cores sat
    idle (stages run one at a time), and glibc, told to hand every freed 64 KiB back to the system, unmapped and
    re-faulted the tensors' memory every step: the quickstart's fine-tune ran at half the images/s of the same
    command outside Dask (15.5 against 30.4 img/s, 2 threads). The stage gets ``threads`` CPU threads (0: every
    CPU dask counts here: affinity and cgroup quota) and glibc's default trimming. ``STAGE_THREADS_ENV`` tells
    :func:`segfactory.distributed.relaunch_under_torchrun` that the count is the stage's budget, to split among
    its ranks.
    """
    import dask
    import dask.system

    env = dict(os.environ)
    nanny = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    trim = nanny.get("MALLOC_TRIM_THRESHOLD_")
    if trim is not None and env.get("MALLOC_TRIM_THRESHOLD_") == str(trim):
        del env["MALLOC_TRIM_THRESHOLD_"]
    n = str(threads or dask.system.CPU_COUNT)
    return env | {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, STAGE_THREADS_ENV: n}


def training_task(argv: list[str], final: str, timeout_s: float, threads: int = 0) -> dict[str, Any]:
    """Dask task: run one ``segfactory`` stage command in its own process with ``--out`` = an attempt directory
    (``{OUT}`` in ``argv``) and commit it as ``final`` with the shared unit protocol once it really finished.

    An earlier attempt that was killed (worker lost, driver and worker killed, timeout) keeps its directory; this
    attempt adopts it and the training resumes from its last checkpoint (``--resume``). A command that exits
    without finishing (``train.stop_at``) is not committed: its attempt stays for the next run to resume, and the
    task returns ``finished: False``. The child's progress lines are forwarded to the driver as
    ``STAGE_PROGRESS_TOPIC`` events. The process gets ``threads`` CPU threads and none of the Dask nanny's
    settings (:func:`stage_env`).
    """
    from pipelines.subproc import SubprocessFailed, forward_to_driver, run_logged

    final_p = Path(final)
    if stage_done(final_p):
        return {"skipped": True, "finished": True}

    def parse(line: str) -> dict[str, Any] | None:
        msg = parse_progress_line(line)
        return None if msg is None else {"stage": final_p.name, **msg}

    command = argv[0]
    final_p.parent.mkdir(parents=True, exist_ok=True)
    with _stage_lock(final_p) as lock_fd:
        if stage_done(final_p):  # the attempt we waited for committed it
            return {"skipped": True, "finished": True}
        attempt, resumed = _adopt_attempt(final_p, command)
        log = final_p.parent / f"{final_p.name}.log"
        args = [a.replace("{OUT}", str(attempt)) for a in argv]
        if resumed:
            args.append("--resume")
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"segfactory: resuming {final_p.name} from an earlier attempt's "
                        f"{_resume_point(command, attempt)}\n")
        cmd = [sys.executable, "-m", "segfactory.cli", *args]
        t0 = time.perf_counter()
        try:
            env = stage_env(threads) | {PROGRESS_LINES_ENV: "1", STAGE_LOG_ENV: str(log)}
            run_logged(cmd, timeout_s, log, on_line=forward_to_driver(STAGE_PROGRESS_TOPIC, parse), env=env,
                       pass_fds=(lock_fd,))
        except SubprocessFailed as e:
            if e.returncode == EXIT_USER and e.error:  # the same config fails the same way: no retry, exit 2
                return {"skipped": False, "finished": False, "user_error": e.error, "fix": e.fix}
            raise
        seconds = round(time.perf_counter() - t0, 2)
        finished, why = finished_state(command, attempt)
        if not finished:
            return {"skipped": False, "finished": False, "why": why, "seconds": seconds, "resumed": resumed}
        _relocate(attempt, final_p)
        commit_stage(attempt, final_p, {"argv": argv, "seconds": seconds, "resumed": resumed,
                                        "host": os.uname().nodename, "code_version": segfactory.code_version()})
    return {"skipped": False, "finished": True, "seconds": seconds, "resumed": resumed}


def run_stage_tasks(cluster: ClusterConfig, timeout_s: float, retries: int, commands: dict[str, tuple[Path, list[str]]],
                    performance_report: Path, on_done: Any = None) -> dict[str, dict[str, Any]]:
    """Run stage commands in order, each as a Dask task (a GPU task when the cluster has GPUs).

    Args:
        commands: ``{stage: (final dir, segfactory argv)}``; a final dir holding ``stage.json`` is reused.
        on_done: Called with ``(stage, result)`` after each stage.

    Returns:
        ``{stage: {"skipped": bool, "finished": True, "seconds": float}}``.

    Raises:
        StageIncomplete: a stage's command ended before finishing (``train.stop_at``); a re-run resumes it.
        UserError: a stage's command refused its config or input (its own one-line error, not retried).
        PartialFailure: a stage crashed, ran out of memory, timed out or lost its worker after its retries
            (listed with its log); a re-run resumes at that stage.
    """
    results: dict[str, dict[str, Any]] = {}
    shared = next(iter(commands.values()))[0].parent if commands else None  # ROOT/stages
    with open_client(cluster, performance_report=performance_report, shared_dir=shared) as client:
        # Every stage's request is checked before any runs: a stage no worker can hold fails now, not hours in.
        asks = {name: stage_resources(client, cluster, name, argv) for name, (final, argv) in commands.items()
                if not reusable(name, final)}
        if asks:  # every stage cached: nothing asks for anything
            console.print("training tasks ask for " + "; ".join(
                f"{name}: {r or 'no special resources (CPU fallback)'}" for name, r in asks.items()), soft_wrap=True)
        with progress() as bar:
            for name, (final, argv) in commands.items():
                if stage_done(final):
                    results[name] = {"skipped": True, "finished": True}
                else:
                    results[name] = _run_one(client, bar, name, final, argv, timeout_s, retries, asks[name],
                                             cluster.tasks.stage_threads)
                if not results[name]["finished"]:
                    raise StageIncomplete(
                        f"stage {name} ended without finishing: {results[name]['why']}; it is not marked done and "
                        "its checkpoint is kept", fix="re-run (without train.stop_at) to resume it from there")
                if on_done is not None:
                    on_done(name, results[name])
    return results


def stage_launch(argv: list[str]) -> tuple[int, str]:
    """A stage command's ``train.devices`` and ``train.backend`` (1, ``auto`` for commands that do not train).

    A training stage's argv names its resolved config (``pretrain|finetune CONFIG.yaml ...``); ``key=value``
    overrides after it win, as the command itself applies them.
    """
    import yaml

    if not argv or argv[0] not in ("pretrain", "finetune") or len(argv) < 2:
        return 1, "auto"
    try:
        raw = yaml.safe_load(Path(argv[1]).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        raw = {}  # the command itself reports an unreadable config, once, as its user error
    train = raw.get("train") if isinstance(raw, dict) else None
    train = train if isinstance(train, dict) else {}
    devices, backend = train.get("devices", 1), str(train.get("backend", "auto"))
    for a in argv[2:]:
        if a.startswith("train.devices="):
            devices = a.split("=", 1)[1]
        elif a.startswith("train.backend="):
            backend = a.split("=", 1)[1]
    try:
        return max(1, int(devices)), backend
    except (TypeError, ValueError):
        return 1, backend  # the command refuses it with its own one-line error


def stage_resources(client: Any, cluster: ClusterConfig, name: str, argv: list[str]) -> dict[str, float] | None:
    """What stage ``name``'s task asks for (:func:`pipelines.cluster.training_resources` with its ``train.devices``),
    with a note when a multi-device stage finds no GPU worker (its command then falls back on the CPU)."""
    devices, backend = stage_launch(argv)
    resources = training_resources(client, cluster, devices, setting=f"{name}.train.devices")
    if devices > 1 and resources is None:
        how = (f"{devices} gloo CPU processes under torchrun" if backend == "gloo" else
               f"one CPU process (train.backend=gloo runs {devices} CPU processes)")
        console.print(f"note: stage {name} has train.devices={devices} but no Dask worker offers a {GPU_RESOURCE} "
                      f"resource: its task asks for none; on a worker without CUDA it trains as {how}",
                      soft_wrap=True)
    return resources


def _run_one(client: Any, bar: Any, name: str, final: Path, argv: list[str], timeout_s: float, retries: int,
             resources: dict[str, float] | None, threads: int) -> dict[str, Any]:
    from pipelines.tasks import run_tasks

    def parse(msg: dict[str, Any]) -> tuple[str, float, float | None, str | None] | None:
        if msg.get("stage") != final.name:
            return None
        return name, msg["completed"], msg["total"], msg["description"]

    errors: dict[str, BaseException] = {}
    results, _ = run_tasks(client, training_task, {name: argv}, description=name, sizes={},
                           keys={name: f"{name}-{final.name}"}, retries=retries, resources=resources,
                           topic=STAGE_PROGRESS_TOPIC, parse_event=parse, on_failure=errors.__setitem__, bar=bar,
                           final=str(final), timeout_s=timeout_s, threads=threads)
    log = final.parent / f"{final.name}.log"
    if errors:  # a crash, an OOM kill, a timeout or a lost worker: not the user's config (exit 3, listed)
        raise PartialFailure(f"stage {name} failed after {retries} retr{'y' if retries == 1 else 'ies'}; finished "
                             "stages are kept and a re-run resumes at this one",
                             {name: f"{type(errors[name]).__name__}: {errors[name]} (log: {log})"})
    if "user_error" in results[name]:  # the stage's command refused its config or input (exit 2)
        raise UserError(f"stage {name}: {results[name]['user_error']}",
                        fix=results[name]["fix"] or f"see {log}; re-running resumes here")
    return results[name]
