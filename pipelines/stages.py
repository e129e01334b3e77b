"""Cached pipeline stages shared by ``segfactory run`` and ``segfactory refresh``.

A stage's output lives in ``ROOT/stages/<stage>-<key>/``, where the key hashes the stage's config section, the
keys of its inputs and the version of the code that produces it; a directory holding ``stage.json`` is finished
and reused. Training, evaluation and prediction run as single Dask tasks (asking for a ``GPU`` resource when the
cluster offers one), each in its own ``segfactory`` process with a timeout; ``stage.json``, written last, marks
the stage finished.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import Field

import segfactory
from pipelines.cluster import ClusterConfig, open_client, training_resources
from pipelines.render import RenderStep
from segfactory.config import StrictModel
from segfactory.console import PROGRESS_LINES_ENV, console, parse_progress_line, progress
from segfactory.errors import EXIT_USER, STAGE_LOG_ENV, PartialFailure, UserError
from segfactory.io import atomic_write_json, canonical_hash
from synth.shard import RENDER_PACKAGES

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


def render_test_set(render_cfg: RenderStep, config_hash: str, test: HeldOutSet, root: Path, cluster: ClusterConfig,
                    performance_report: Path) -> Path | None:
    """Render (or reuse) the held-out test set: the training render config with other scenes (another seed).

    Returns:
        The test dataset directory, or None when ``test.scenes`` is 0.
    """
    from pipelines.render import run_render

    if test.scenes == 0:
        return None
    train = render_cfg.dataset
    seed = train.seed + 1 if test.seed is None else test.seed
    if seed == train.seed:
        raise UserError(f"test.seed={seed} is the training seed: the test scenes would be training scenes",
                        fix=f"set test.seed to another value than render.dataset.seed={train.seed}")
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


def training_task(argv: list[str], final: str, timeout_s: float) -> dict[str, Any]:
    """Dask task: run one ``segfactory`` stage command in its own process with ``--out`` = ``final`` (``{OUT}`` in
    ``argv``), then write ``stage.json`` there, last, as the stage's commit mark.

    The command writes straight into ``final`` (not a temp dir renamed later) because its outputs record their
    own paths (model lineage, summaries). A directory without ``stage.json`` is an attempt that was killed or
    failed; the next attempt removes it and starts over. The child's progress lines are forwarded to the driver
    as ``STAGE_PROGRESS_TOPIC`` events."""
    from pipelines.subproc import SubprocessFailed, forward_to_driver, run_logged

    final_p = Path(final)
    if (final_p / STAGE_FILE).is_file():
        return {"skipped": True}

    def parse(line: str) -> dict[str, Any] | None:
        msg = parse_progress_line(line)
        return None if msg is None else {"stage": final_p.name, **msg}

    if final_p.exists():
        shutil.rmtree(final_p)
    log = final_p.parent / f"{final_p.name}.log"
    cmd = [sys.executable, "-m", "segfactory.cli", *[a.replace("{OUT}", str(final_p)) for a in argv]]
    t0 = time.perf_counter()
    try:
        run_logged(cmd, timeout_s, log, on_line=forward_to_driver(STAGE_PROGRESS_TOPIC, parse),
                   env={**os.environ, PROGRESS_LINES_ENV: "1", STAGE_LOG_ENV: str(log)})
    except SubprocessFailed as e:
        if e.returncode == EXIT_USER and e.error:  # the same config fails the same way: no retry, exit 2
            return {"skipped": False, "user_error": e.error, "fix": e.fix}
        raise
    seconds = round(time.perf_counter() - t0, 2)
    atomic_write_json(final_p / STAGE_FILE, {"argv": argv, "seconds": seconds, "host": os.uname().nodename,
                                             "code_version": segfactory.code_version()})
    return {"skipped": False, "seconds": seconds}


def run_stage_tasks(cluster: ClusterConfig, timeout_s: float, retries: int, commands: dict[str, tuple[Path, list[str]]],
                    performance_report: Path, on_done: Any = None) -> dict[str, dict[str, Any]]:
    """Run stage commands in order, each as a Dask task (a GPU task when the cluster has GPUs).

    Args:
        commands: ``{stage: (final dir, segfactory argv)}``; a final dir holding ``stage.json`` is reused.
        on_done: Called with ``(stage, result)`` after each stage.

    Returns:
        ``{stage: {"skipped": bool, "seconds": float}}``.

    Raises:
        UserError: a stage's command refused its config or input (its own one-line error, not retried).
        PartialFailure: a stage crashed, ran out of memory, timed out or lost its worker after its retries
            (listed with its log); a re-run resumes at that stage.
    """
    results: dict[str, dict[str, Any]] = {}
    shared = next(iter(commands.values()))[0].parent if commands else None  # ROOT/stages
    with open_client(cluster, performance_report=performance_report, shared_dir=shared) as client:
        resources = training_resources(client, cluster)
        console.print(f"training tasks ask for {resources or 'no special resources (CPU fallback)'}")
        with progress() as bar:
            for name, (final, argv) in commands.items():
                if (final / STAGE_FILE).is_file():
                    results[name] = {"skipped": True}
                else:
                    results[name] = _run_one(client, bar, name, final, argv, timeout_s, retries, resources)
                if on_done is not None:
                    on_done(name, results[name])
    return results


def _run_one(client: Any, bar: Any, name: str, final: Path, argv: list[str], timeout_s: float, retries: int,
             resources: dict[str, float] | None) -> dict[str, Any]:
    from pipelines.tasks import run_tasks

    def parse(msg: dict[str, Any]) -> tuple[str, float, float | None, str | None] | None:
        if msg.get("stage") != final.name:
            return None
        return name, msg["completed"], msg["total"], msg["description"]

    errors: dict[str, BaseException] = {}
    results, _ = run_tasks(client, training_task, {name: argv}, description=name, sizes={},
                           keys={name: f"{name}-{final.name}"}, retries=retries, resources=resources,
                           topic=STAGE_PROGRESS_TOPIC, parse_event=parse, on_failure=errors.__setitem__, bar=bar,
                           final=str(final), timeout_s=timeout_s)
    log = final.parent / f"{final.name}.log"
    if errors:  # a crash, an OOM kill, a timeout or a lost worker: not the user's config (exit 3, listed)
        raise PartialFailure(f"stage {name} failed after {retries} retr{'y' if retries == 1 else 'ies'}; finished "
                             "stages are kept and a re-run resumes at this one",
                             {name: f"{type(errors[name]).__name__}: {errors[name]} (log: {log})"})
    if "user_error" in results[name]:  # the stage's command refused its config or input (exit 2)
        raise UserError(f"stage {name}: {results[name]['user_error']}",
                        fix=results[name]["fix"] or f"see {log}; re-running resumes here")
    return results[name]
