"""Getting a Dask client for any cluster: LocalCluster, an existing scheduler, SLURM or Kubernetes.

Stage pipelines call :func:`open_client` with the ``cluster`` config section and never construct clusters
themselves, so the same pipeline code runs on a laptop and on any scheduler. Per-task knobs (resources,
timeouts, retries) live in :class:`TaskSettings` and are read by the pipelines through :func:`task_resources`.

Workers write their results straight into the driver's output directory, so every worker must see it at the same
path (a shared filesystem): :func:`open_client` checks that on every worker there at start
(:func:`check_shared_dir`) and stops with one line naming the worker that cannot. Kubernetes worker pods mount the
``cluster.kubernetes.volumes`` the driver's pod mounts (``configs/schedules/refresh-cronjob.yaml``); the image
they run is built from ``configs/docker/Dockerfile``.

On SLURM, Dask submits each worker job once and waits for its worker: a job ``sbatch`` refuses (a partition or
account that does not exist, more memory than a node has, a bad ``job_extra_directives`` line) or one that ends
before its worker connects (a failing ``job_script_prologue``, no segfactory in ``cluster.slurm.python``) would
keep the run waiting for ever. :func:`check_slurm_workers`, called wherever the driver waits for workers, stops the
run then with one line naming the setting and ``sbatch``'s words, or the job's log (exit 2). Jobs pending in the
queue are waited for, with a note after ``cluster.slurm.pending_note_s`` naming squeue's reason, and hold
``cluster.no_workers_timeout_s`` until they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from segfactory.config import StrictModel
from segfactory.console import console
from segfactory.errors import UserError

GPU_RESOURCE = "GPU"


def _byte_size(value: str, example: str) -> str:
    """A memory size Dask can read (``'16GiB'``, ``'8Gi'``, ``'4 GB'``, bytes): checked when the config loads, so
    that a typo is one line naming the field (exit 2), not Dask's traceback when the cluster starts (exit 1)."""
    from dask.utils import parse_bytes
    from pydantic_core import PydanticCustomError

    try:
        parse_bytes(value)
    except (ValueError, TypeError):
        raise PydanticCustomError("memory_size", "not a memory size",
                                  {"fix": f"give a size with its unit, e.g. {example}"}) from None
    return value


class SlurmSettings(StrictModel):
    """``cluster.slurm``: dask-jobqueue ``SLURMCluster`` that scales adaptively between min and max jobs."""

    queue: str | None = Field(None, description="partition (sbatch -p); default: the cluster's default")
    account: str | None = Field(None, description="sbatch --account")
    cores: int = Field(1, ge=1, description="CPU cores per job")
    processes: int = Field(1, ge=1, description="Dask worker processes per job")
    memory: str = Field("2GiB", description="memory per job (sbatch --mem), e.g. '16GiB'")
    walltime: str = Field("01:00:00", description="job time limit (sbatch -t)")
    gpus_per_job: int = Field(0, ge=0, description="GPUs per job (--gres=gpu:N); workers then offer a GPU resource "
                              "(gpus_per_job / processes each): at least the train.devices of every training stage")
    minimum_jobs: int = Field(0, ge=0, description="adaptive scaling: fewest jobs kept running")
    maximum_jobs: int = Field(4, ge=1, description="adaptive scaling: most jobs at once")
    job_extra_directives: list[str] = Field(default_factory=list, description="extra #SBATCH lines, e.g. ['--qos=low']")
    job_script_prologue: list[str] = Field(default_factory=list, description="shell lines before the worker starts")
    interface: str | None = Field(None, description="network interface of workers and scheduler, e.g. 'ib0'")
    scheduler_host: str | None = Field(None, description="address the scheduler binds (default: this host)")
    log_directory: str | None = Field(None, description="where job stdout/stderr go (default: cwd)")
    local_directory: str | None = Field(None, description="worker scratch space on the compute node")
    python: str = Field(sys.executable, description="python on the compute nodes (segfactory installed)")
    job_name: str = Field("segfactory-worker", description="SLURM job name of the workers (shown by squeue)")
    pending_note_s: float = Field(
        60.0, ge=0, description="with no worker connected and the worker jobs pending in squeue (a busy queue, a "
        "QOS limit) for this long, a note says so with squeue's reason, again every 5 minutes while they pend; "
        "0 = never")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        return _byte_size(v, "'16GiB'")

    @model_validator(mode="after")
    def _min_le_max(self) -> SlurmSettings:
        if self.minimum_jobs > self.maximum_jobs:
            raise ValueError(f"minimum_jobs={self.minimum_jobs} is above maximum_jobs={self.maximum_jobs}")
        return self


class KubernetesVolume(StrictModel):
    """A PersistentVolumeClaim every worker pod mounts: the one holding the driver's output directory."""

    claim: str = Field(description="PersistentVolumeClaim name (ReadWriteMany: the driver and every worker mount it)")
    mount_path: str = Field(description="where the pods mount it: the same path as in the driver's pod")
    sub_path: str | None = Field(None, description="a sub-path of the volume, as in the driver's pod")

    @model_validator(mode="after")
    def _absolute(self) -> KubernetesVolume:
        if not self.mount_path.startswith("/"):
            raise ValueError(f"mount_path={self.mount_path!r} must be an absolute path, e.g. /data/segfactory")
        return self


# The image configs/docker/Dockerfile builds; configs/schedules/refresh-cronjob.yaml runs the driver in it too.
DEFAULT_IMAGE = "ghcr.io/segfactory/segfactory:latest"
IMAGE_UID = 1000  # the user the image runs as


class KubernetesSettings(StrictModel):
    """``cluster.kubernetes``: a dask-kubernetes operator ``DaskCluster`` (needs the Dask operator installed)."""

    name: str = Field("segfactory", description="DaskCluster resource name")
    namespace: str | None = Field(None, description="namespace (default: the current context's)")
    image: str = Field(DEFAULT_IMAGE, description="image with segfactory installed (configs/docker/Dockerfile)")
    volumes: list[KubernetesVolume] = Field(
        default_factory=list, description="volumes every worker pod mounts, e.g. [{claim: segfactory-data, "
        "mount_path: /data/segfactory}]: the output directory must be on one of them")
    n_workers: int = Field(2, ge=0, description="initial worker pods")
    minimum: int = Field(0, ge=0, description="adaptive scaling: fewest worker pods")
    maximum: int = Field(8, ge=1, description="adaptive scaling: most worker pods")
    cpu: str = Field("2", description="CPU request and limit per worker pod")
    memory: str = Field("8Gi", description="memory request and limit per worker pod")
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per worker pod; workers then offer a GPU resource: at "
                      "least the train.devices of every training stage")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of scheduler and workers")
    idle_timeout: int = Field(600, ge=0, description="seconds an idle cluster lives on (0 = forever)")

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        return _byte_size(v, "'8Gi'")


class TaskSettings(StrictModel):
    """``cluster.tasks``: what each kind of task asks the scheduler for."""

    cpu_resources: dict[str, float] = Field(default_factory=dict,
                                            description="abstract resources a render/ingest task needs, e.g. {CPU: 1}")
    gpu: Literal["auto", "require", "never"] = Field(
        "auto", description="training tasks: ask for a GPU resource when a worker offers one (auto), always, never")
    stage_threads: int = Field(
        0, ge=0, description="CPU threads of a training, evaluation or prediction stage's process (split among "
        "its torchrun ranks); 0 = every CPU its worker's machine allows (affinity and cgroup quota): stages run one "
        "at a time. Dask workers themselves run tasks with 1 thread (OMP_NUM_THREADS=1)")


class ClusterConfig(StrictModel):
    """The ``cluster`` config section."""

    backend: Literal["local", "address", "slurm", "kubernetes"] = Field(
        "local", description="local LocalCluster, an existing scheduler, SLURM jobs or Kubernetes pods")
    address: str | None = Field(None, description="scheduler address for backend=address, e.g. tcp://127.0.0.1:8786")
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes (default: CPU count)")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="per-worker memory limit (LocalCluster; SLURM uses slurm.memory)")
    dashboard: bool = Field(True, description="start the dashboard on a free port")
    connect_timeout_s: float = Field(30.0, gt=0, description="how long to wait for a scheduler / the first worker")
    no_workers_timeout_s: float = Field(
        300.0, ge=0, description="with work left but no worker on the scheduler for this long (all lost: killed, "
        "out of memory, their jobs or pods gone), the units still to run fail and are listed (exit 3) instead of "
        "waiting for ever; 0 waits for ever. Adaptive SLURM/Kubernetes clusters that may scale to no worker "
        "always wait; on SLURM it counts only once the worker jobs have left the queue (pending jobs, before any "
        "worker connected, are waited for)")
    tasks: TaskSettings = Field(default_factory=TaskSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str) -> str:
        return v if v == "auto" else _byte_size(v, "'auto' or '4GiB'")


def slurm_cluster_kwargs(cfg: ClusterConfig) -> dict[str, Any]:
    """Keyword arguments for ``dask_jobqueue.SLURMCluster`` from the config (pure; tested without SLURM)."""
    s = cfg.slurm
    worker_args: list[str] = []
    directives = list(s.job_extra_directives)
    if s.gpus_per_job:
        directives.append(f"--gres=gpu:{s.gpus_per_job}")
        worker_args += ["--resources", f"{GPU_RESOURCE}={s.gpus_per_job / s.processes:g}"]
    kwargs: dict[str, Any] = {
        "cores": s.cores, "processes": s.processes, "memory": s.memory, "walltime": s.walltime,
        "queue": s.queue, "account": s.account, "job_extra_directives": directives,
        "job_script_prologue": list(s.job_script_prologue), "worker_extra_args": worker_args,
        "python": s.python, "log_directory": s.log_directory, "local_directory": s.local_directory,
        "interface": s.interface, "silence_logs": "error",
        # dashboard_address None would not switch the dashboard off: Dask's scheduler then serves HTTP (health,
        # metrics) on port 8787 and reports it as its dashboard, whose link led to a 404.
        "scheduler_options": {"dashboard": cfg.dashboard, "dashboard_address": ":0"},
        # Job names show up in squeue; tests and operators find a run's jobs by it.
        "job_name": s.job_name,
    }
    if s.scheduler_host:
        kwargs["scheduler_options"]["host"] = s.scheduler_host
    return {k: v for k, v in kwargs.items() if v is not None}


def kubernetes_cluster_spec(cfg: ClusterConfig) -> dict[str, Any]:
    """The ``DaskCluster`` custom resource dask-kubernetes would create (pure; tested without Kubernetes)."""
    from dask_kubernetes.operator import make_cluster_spec

    k = cfg.kubernetes
    resources: dict[str, dict[str, str]] = {"requests": {"cpu": k.cpu, "memory": k.memory},
                                            "limits": {"cpu": k.cpu, "memory": k.memory}}
    env = {"SEGFACTORY_CLUSTER": "kubernetes", **k.env}
    spec = make_cluster_spec(name=k.name, image=k.image, n_workers=k.n_workers, resources=resources, env=env,
                             idle_timeout=k.idle_timeout)
    worker = spec["spec"]["worker"]
    container = worker["spec"]["containers"][0]
    if k.volumes:  # the driver's output volume, at the driver's path: workers write their results there
        worker["spec"]["volumes"] = [{"name": f"data-{i}", "persistentVolumeClaim": {"claimName": v.claim}}
                                     for i, v in enumerate(k.volumes)]
        container["volumeMounts"] = [{"name": f"data-{i}", "mountPath": v.mount_path,
                                      **({"subPath": v.sub_path} if v.sub_path else {})}
                                     for i, v in enumerate(k.volumes)]
        worker["spec"]["securityContext"] = {"fsGroup": IMAGE_UID}  # the image's user may write to them
    args = list(container.get("args", []))
    # Threads = CPUs of the pod; a GPU pod offers the GPU resource the training tasks ask for.
    args += ["--nthreads", str(cfg.threads_per_worker), "--memory-limit", _k8s_to_dask_memory(k.memory)]
    if k.gpus:
        for part in ("requests", "limits"):
            container["resources"][part]["nvidia.com/gpu"] = str(k.gpus)
        args += ["--resources", f"{GPU_RESOURCE}={k.gpus}"]
    container["args"] = args
    if k.namespace:
        spec["metadata"]["namespace"] = k.namespace
    return spec


def _k8s_to_dask_memory(mem: str) -> str:
    for suffix, dask_suffix in (("Ki", "KiB"), ("Mi", "MiB"), ("Gi", "GiB"), ("Ti", "TiB")):
        if mem.endswith(suffix):
            return mem[: -len(suffix)] + dask_suffix
    return mem


class _QuietConnectionLoss(logging.Filter):
    """Drops the tracebacks Dask's client logs when it loses its scheduler (a closed connection, the reconnect
    cancelled at close): the units that loss cancels are listed by the pipeline instead (exit 3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (asyncio.CancelledError, OSError))  # CommClosedError is an OSError


_DASK_CLIENT_LOGGERS = ("distributed.client", "distributed.utils")


class SlurmJobRefused(RuntimeError):
    """sbatch refused a worker job (its exit status was not 0); the message is sbatch's own error."""


class _QuietRefusal(logging.Filter):
    """Drops the traceback Tornado logs for a worker job sbatch refused: :func:`check_slurm_workers` says it in one
    line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(record.exc_info[1] if record.exc_info else None, SlurmJobRefused)


def _sbatch_said(error: str) -> str:
    """sbatch's own error lines out of dask-jobqueue's ``RuntimeError`` (exit code, command, stdout, stderr)."""
    stderr = error.split("stderr:", 1)[1] if "stderr:" in error else error
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return "; ".join(lines) or error.strip()


def _slurm_job_cls(refusals: list[str]) -> type:
    """dask-jobqueue's ``SLURMJob`` that records what sbatch said when it refused a job in ``refusals``.

    A refused job would otherwise leave a traceback in the log and the cluster waiting for a worker that never
    comes: for ever when it scales adaptively from 0 jobs, ``cluster.no_workers_timeout_s`` otherwise, reported
    as lost workers (exit 3). The driver looks at ``refusals`` while it waits (:func:`check_slurm_workers`).
    """
    from dask_jobqueue.slurm import SLURMJob
    from distributed.core import Status

    class RecordingSLURMJob(SLURMJob):
        async def _submit_job(self, script_filename: str) -> str:
            try:
                out: str = await super()._submit_job(script_filename)
            except RuntimeError as e:
                refusals.append(_sbatch_said(str(e)))
                # failed, not created: closing the cluster asserts that every job it made has started or ended
                self.status = Status.failed
                raise SlurmJobRefused(refusals[-1]) from None
            return out

    return RecordingSLURMJob


@dataclasses.dataclass
class _SlurmWatch:
    """What the driver knows of one client's SLURM worker jobs beyond what Dask tracks: what sbatch said when it
    refused jobs, and since when every job Dask waits for has ended in SLURM without its worker connecting."""

    settings: SlurmSettings
    cluster: Any  # weakref.ref to the SLURMCluster
    said: list[str] = dataclasses.field(default_factory=list)
    noted: bool = False  # the note that the run goes on with fewer workers was printed
    checked: float = 0.0  # time.monotonic() of the last look at the scheduler's workers after a refusal
    jobs_checked: float = 0.0  # ... and of the last look at the jobs in squeue
    ended_since: float | None = None  # when every job was first seen ended with no worker connected
    connected: set[str] = dataclasses.field(default_factory=set)  # ids of jobs whose worker was seen connected
    pending_since: float | None = None  # when the jobs were first seen pending with no worker connected
    pending_noted: float | None = None  # when the note that they pend was last printed
    # at squeue's last look every job Dask waits for was pending, and no worker of this cluster had connected yet
    queued: bool = False
    states: dict[str, str] = dataclasses.field(default_factory=dict)  # squeue's last state of each job it listed


_SLURM_WATCH: weakref.WeakKeyDictionary[Any, _SlurmWatch] = weakref.WeakKeyDictionary()
_REFUSAL_POLL_S = 1.0  # how often check_slurm_workers asks the scheduler for its workers once sbatch refused a job
_JOBS_POLL_S = 5.0  # how often it asks squeue about the jobs while no worker is connected
_PENDING_NOTE_REPEAT_S = 300.0  # how often the note that the jobs pend comes again while they still do
# squeue's states of a job that has ended (the others may still start a worker)
_ENDED_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                 "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT"}
# sbatch's words -> the settings they are about and what to do: the first match names them in the error.
_SBATCH_CAUSES: tuple[tuple[tuple[str, ...], tuple[str, ...], str], ...] = (
    (("invalid account", "account/partition"), ("account", "queue"),
     "set cluster.slurm.account to an account of yours (`sacctmgr show associations user=$USER`), or leave it unset"),
    (("partition",), ("queue",), "set cluster.slurm.queue to a partition `sinfo -s` lists, or leave it unset for "
                                 "the cluster's default partition"),
    (("qos",), ("job_extra_directives",), "use a QOS and limits of yours in cluster.slurm.job_extra_directives "
                                          "(`sacctmgr show associations user=$USER format=qos,maxsubmit`)"),
    (("gres", "generic resource"), ("gpus_per_job", "job_extra_directives"),
     "ask for GPUs the partition's nodes have (`sinfo -o '%P %G'`), or set cluster.slurm.gpus_per_job=0"),
    (("time limit",), ("walltime",), "set cluster.slurm.walltime within the partition's limit (`sinfo -o '%P %l'`)"),
    (("memory", "node configuration", "processors", "cpu"), ("memory", "cores", "gpus_per_job"),
     "ask for at most what one node has (`sinfo -o '%P %c %m %G'`: CPUs, memory in MB, GPUs) in "
     "cluster.slurm.cores, memory and gpus_per_job"),
    (("option", "directive", "invalid"), ("job_extra_directives",),
     "fix or remove the line of cluster.slurm.job_extra_directives sbatch names (`sbatch --help`)"),
)


def slurm_refusal(s: SlurmSettings, said: str) -> UserError:
    """The one-line error for a worker job sbatch refused: the settings it is about, sbatch's words, the fix."""
    low = said.lower()
    settings: tuple[str, ...] = ()
    fix = ("check the cluster.slurm settings against what `sinfo` and `sacctmgr show associations user=$USER` list; "
           "`sbatch --test-only` with the same options tells whether SLURM accepts them")
    for words, names, cause_fix in _SBATCH_CAUSES:
        if any(w in low for w in words):
            settings, fix = names, cause_fix
            break
    shown = ", ".join(f"cluster.slurm.{n}={getattr(s, n)!r}" for n in settings
                      if getattr(s, n) or n in ("memory", "cores", "queue"))
    return UserError(f"sbatch refused the SLURM worker job ({shown or 'cluster.slurm'}): {said}; no Dask worker "
                     "can start", fix=fix)


def check_slurm_workers(client: Any) -> None:
    """Stop the run when the SLURM worker jobs of this client's cluster cannot give it a worker; a no-op for
    clusters of other backends.

    Dask submits a job once and then waits for its worker: a job sbatch refused, or one that ended before its
    worker connected (a ``job_script_prologue`` that fails, no segfactory in ``cluster.slurm.python`` on the node,
    a node that cannot reach the scheduler), would keep the run waiting for ever on an adaptive cluster, or for
    ``cluster.no_workers_timeout_s`` and then fail its units as if workers had been lost (exit 3). With some worker
    connected the run goes on with it (a note says why there are fewer). Jobs pending in the queue are not an
    error: with no worker connected, a note names them and squeue's reason once they have pended for
    ``cluster.slurm.pending_note_s``, and again every ``_PENDING_NOTE_REPEAT_S`` (:func:`pending_note`); while
    all of them pend before any worker connected, ``cluster.no_workers_timeout_s`` waits too
    (:func:`slurm_jobs_queued`). Asks the
    scheduler only once sbatch refused a job (at most every ``_REFUSAL_POLL_S``) or every ``_JOBS_POLL_S``, squeue
    (states and reasons in one call) only while no worker is connected.

    Raises:
        UserError: sbatch refused a worker job and no worker is connected (:func:`slurm_refusal`), or every worker
            job Dask waits for has ended (seen twice, ``_JOBS_POLL_S`` apart) and no worker is connected.
    """
    watch = _SLURM_WATCH.get(client)
    if watch is None:
        return
    now = time.monotonic()
    refused = bool(watch.said) and (not watch.noted or now - watch.checked >= _REFUSAL_POLL_S)
    jobs_due = now - watch.jobs_checked >= _JOBS_POLL_S
    if not refused and not jobs_due:
        return
    try:
        names = [str(w.get("name")) for w in client.scheduler_info()["workers"].values()]
    except Exception:  # the scheduler is gone: Dask cancels the futures, which ends the wait
        return
    workers = len(names)
    if refused:
        watch.checked = now
        if not workers:
            raise slurm_refusal(watch.settings, watch.said[0])
        if not watch.noted:
            watch.noted = True
            console.print(f"[yellow]note:[/] sbatch refused a worker job ({watch.said[0]}); the run goes on with "
                          f"{workers} worker(s)", soft_wrap=True)
    if not jobs_due:
        return
    watch.jobs_checked = now
    cluster = watch.cluster()
    try:
        specs = {str(n): j.job_id for n, j in list(cluster.workers.items()) if getattr(j, "job_id", None)} \
            if cluster else {}
    except RuntimeError:  # the cluster's loop changed its workers meanwhile: look again next time
        return
    # A job's worker is named after its spec (processes > 1: "<spec>-<i>"). A job whose worker has connected
    # ended for another reason (its walltime, a kill): lost workers, which no_workers_timeout_s handles (exit 3).
    watch.connected.update(j for n, j in specs.items() if any(w == n or w.startswith(f"{n}-") for w in names))
    if watch.connected & set(specs.values()):
        watch.ended_since = watch.pending_since = watch.pending_noted = None
        watch.queued = False
        return
    jobs = list(specs.values())
    states = _squeue_jobs(jobs) if jobs and not workers else {}
    if states is not None:  # squeue could not tell: as it was
        _note_pending(watch, states, now)
        watch.states.update({j: state for j, (state, _) in states.items()})
    # Only jobs still queued before any worker came hold the no-workers timer (slurm_jobs_queued); squeue that
    # cannot tell, a job started or ended, or a worker seen connected once: it counts as before.
    watch.queued = bool(jobs) and not workers and not watch.connected and states is not None and all(
        states.get(j, ("", ""))[0] == "PENDING" for j in jobs)
    ended = None if states is None else {j for j in jobs if states.get(j, ("", ""))[0] in ("", *_ENDED_STATES)}
    if not jobs or workers or ended != set(jobs):
        watch.ended_since = None
        return
    if watch.ended_since is None:  # once more, later: a worker may have connected and left meanwhile
        watch.ended_since = now
        return
    raise _jobs_ended(watch.settings, sorted(ended, key=int), watch.states)


def slurm_jobs_queued(client: Any) -> bool:
    """Whether, at :func:`check_slurm_workers`' last look (squeue, at most every ``_JOBS_POLL_S``), every SLURM
    worker job Dask waits for was pending in the queue, and no worker of this client's cluster had connected yet.

    While they pend, nothing was lost: the run waits for them and ``cluster.no_workers_timeout_s`` does not count
    (:func:`pipelines.tasks.run_tasks`); the pending note says why the run waits, and the operator bounds it
    (``timeout`` around the run, SLURM's ``--deadline``). False for clusters of other backends.
    """
    watch = _SLURM_WATCH.get(client)
    return watch is not None and watch.queued


def _squeue_jobs(job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
    """squeue's state and reason (``%T``, ``%r``) of those of ``job_ids`` it still lists, in one call (a job it no
    longer lists has ended); None when squeue cannot tell."""
    import subprocess

    try:
        # -t all: also jobs that have ended, while slurmctld still holds them (MinJobAge), with how they ended
        out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T %r", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # every id unknown ("Invalid job id specified"): all ended long enough ago
        return {} if "invalid job id" in out.stderr.lower() else None
    # A reason may hold spaces ("ReqNodeNotAvail, UnavailableNodes:n[1-2]"): the rest of the line.
    return {parts[0]: (parts[1], parts[2] if len(parts) > 2 else "")
            for parts in (line.split(maxsplit=2) for line in out.stdout.splitlines()) if len(parts) >= 2}


def pending_note(job_ids: list[str], reasons: list[str], seconds: float) -> str:
    """The note that worker jobs are pending in SLURM's queue: how many, for how long, squeue's reasons, their ids."""
    said = sorted({r for r in reasons if r and r != "None"})  # "None": SLURM has not looked at the job yet
    why = f"squeue reason: {', '.join(said)}; " if said else ""
    return (f"{len(job_ids)} SLURM worker job(s) pending for {seconds:.0f} s ({why}jobs {', '.join(job_ids)}); "
            f"the run starts when SLURM starts them (squeue -j {','.join(job_ids)})")


def _note_pending(watch: _SlurmWatch, states: dict[str, tuple[str, str]], now: float) -> None:
    """Print :func:`pending_note` once the jobs have pended with no worker connected for ``pending_note_s``, and
    again every ``_PENDING_NOTE_REPEAT_S`` while they still do; forget it once none pends."""
    pending = sorted((j for j, (state, _) in states.items() if state == "PENDING"), key=lambda j: (len(j), j))
    if not pending:
        watch.pending_since = watch.pending_noted = None
        return
    if watch.pending_since is None:
        watch.pending_since = now
    after = watch.settings.pending_note_s
    if not after or now - watch.pending_since < after:
        return
    if watch.pending_noted is not None and now - watch.pending_noted < _PENDING_NOTE_REPEAT_S:
        return
    watch.pending_noted = now
    from rich.markup import escape

    note = pending_note(pending, [states[j][1] for j in pending], now - watch.pending_since)
    console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


def _job_log_tail(s: SlurmSettings, job_id: str) -> str | None:
    """The last line of a worker job's stderr (else stdout) log, with its path; None when there is none."""
    base = Path(s.log_directory) if s.log_directory else Path.cwd()
    names = ([f"{s.job_name}-{job_id}.err", f"{s.job_name}-{job_id}.out"] if s.log_directory
             else [f"slurm-{job_id}.out"])  # SLURM's own default, in the directory sbatch ran in
    for name in names:
        with contextlib.suppress(OSError):
            lines = [line.strip() for line in (base / name).read_text(errors="replace").splitlines() if line.strip()]
            if lines:
                return f"{base / name} ends with: {lines[-1][:300]}"
    return None


# squeue states of jobs SLURM (or someone) ended from outside, whatever the job did: their fix is not in its log.
_ENDED_FROM_OUTSIDE = {
    "CANCELLED": "cancelled (scancel, by you or an administrator): re-run when the jobs may run",
    "DEADLINE": "removed at its --deadline (cluster.slurm.job_extra_directives) before it could end: set a later "
                "deadline or none",
    "PREEMPTED": "preempted by higher-priority work: re-run, or use a partition or QOS without preemption "
                 "(cluster.slurm.queue, job_extra_directives)",
    "REVOKED": "revoked (a federated sibling cluster ran it): re-run",
}


def _jobs_ended(s: SlurmSettings, job_ids: list[str], states: dict[str, str] | None = None) -> UserError:
    """The error for worker jobs that ended before their worker connected, with squeue's last state of each
    (``states``, when it was seen): a job ended from outside (cancelled, its deadline, preempted) says so; else the
    last line of the job's log."""
    seen = {j: (states or {}).get(j, "") for j in job_ids}
    said = sorted({st for st in seen.values() if st and st not in ("PENDING", "RUNNING", "CONFIGURING")})
    state = f" (squeue: {', '.join(said)})" if said else ""
    outside = [st for st in said if st in _ENDED_FROM_OUTSIDE]
    if outside and len(said) == len(outside):
        return UserError(f"the SLURM worker job(s) {', '.join(job_ids)} ended before their Dask worker connected to "
                         f"the scheduler{state}: SLURM did not run them to the end",
                         fix="; ".join(f"{st.lower()}: {_ENDED_FROM_OUTSIDE[st]}" for st in outside))
    tail = _job_log_tail(s, job_ids[-1])
    where = f"; {tail}" if tail else (f" (no log of job {job_ids[-1]} found"
                                      f"{' in ' + s.log_directory if s.log_directory else ''})")
    return UserError(f"the SLURM worker job(s) {', '.join(job_ids)} ended before their Dask worker connected to the "
                     f"scheduler{state}{where}",
                     fix="read the job's log (cluster.slurm.log_directory): check cluster.slurm.job_script_prologue, "
                         f"that cluster.slurm.python ({s.python}) runs with segfactory installed on the compute "
                         "nodes, and that they reach this host (cluster.slurm.interface, scheduler_host)")


# How long run_tasks waits with no worker, per client open_client made (None: wait for ever).
_NO_WORKERS_TIMEOUT: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def no_workers_timeout(client: Any) -> float | None:
    """``cluster.no_workers_timeout_s`` of a client :func:`open_client` made, where it applies; else None."""
    return _NO_WORKERS_TIMEOUT.get(client)


def probe_scheduler(address: str, timeout_s: float) -> None:
    """Check that something at ``address`` speaks Dask's protocol, within about ``timeout_s`` seconds.

    ``distributed.Client`` bounds the TCP connect by its timeout but not the handshake after it: at an address
    where another service listens (the scheduler's dashboard port, 8787, instead of 8786; any HTTP server) it
    waits for ever, holding the run's lock; a service that greets first (an SSH banner) fails it with a
    ``MemoryError`` or ``struct.error`` traceback. Dask's own connect runs here under a deadline instead, in a
    thread with its own event loop.

    Raises:
        ValueError: the address is malformed (unknown scheme, no port).
        OSError: nothing listens there (Dask's connect timed out or was refused).
        UserError: something listens but did not answer like Dask within the deadline, or answered with another
            protocol.
    """
    import threading

    from distributed.comm import connect
    from distributed.comm.addressing import get_address_host_port

    get_address_host_port(address)  # scheme and host:port, before any connection (ValueError)
    _refused_fast(address)  # nothing listens: fail now, not after Dask's timeout of retries
    # Dask's connect gives up on the TCP connect after timeout_s (OSError); this deadline only ends a handshake
    # that never comes from a peer that accepted the connection.
    deadline = timeout_s + min(timeout_s, 10.0)

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=timeout_s), deadline)
        comm.abort()

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(handshake())
        except BaseException as e:  # judged in the calling thread
            outcome.append(e)

    thread = threading.Thread(target=run, name=f"probe {address}", daemon=True)
    thread.start()
    thread.join()
    if not outcome:
        return
    e = outcome[0]
    fix = ("pass the scheduler's own address (`dask scheduler` prints it: tcp://HOST:PORT, port 8786 by default; "
           "8787 is its dashboard)")
    if isinstance(e, TimeoutError):  # asyncio.wait_for's (Dask's own connect timeout is a plain OSError)
        raise UserError(f"cluster.address={address!r} accepted the connection but did not answer like a Dask "
                        f"scheduler within {deadline:g} s (another service on that port?)", fix=fix) from None
    if isinstance(e, OSError):
        raise e
    if isinstance(e, Exception):
        kind = type(e)
        what = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise UserError(f"cluster.address={address!r} answered, but not in Dask's protocol (another service on "
                        f"that port?): {what}", fix=fix) from None
    raise e


@contextlib.contextmanager
def _address_errors(cfg: ClusterConfig) -> Iterator[None]:
    """``cluster.address`` missing, malformed or unreachable as one-line UserErrors."""
    if not cfg.address:
        raise UserError("cluster.backend=address needs cluster.address", fix="pass --cluster-address tcp://HOST:PORT")
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot reach the Dask scheduler at {cfg.address}: {e}",
                        fix="start it (`dask scheduler`) or fix --cluster-address") from None
    except (ValueError, TypeError) as e:  # Dask's parse of a malformed address (scheme, port)
        raise UserError(f"cluster.address={cfg.address!r} is not a Dask scheduler address: {e}",
                        fix="pass --cluster-address tcp://HOST:PORT (what `dask scheduler` prints)") from None


def check_cluster(cfg: ClusterConfig) -> None:
    """Check the cluster a pipeline would use before its work, also when it turns out to have none to do (an
    incremental run with nothing new): ``cluster.address`` (backend=address) must be a Dask scheduler that answers
    (:func:`probe_scheduler`). Other backends start their cluster only when there is work.

    Raises:
        UserError: the address is missing, malformed, refused or not a Dask scheduler.
    """
    if cfg.backend == "address":
        with _address_errors(cfg):
            probe_scheduler(cfg.address or "", cfg.connect_timeout_s)


def _refused_fast(address: str, grace_s: float = 2.0) -> None:
    """Raise ``ConnectionRefusedError`` when nothing listens at a ``tcp://`` address (refused for ``grace_s``, a
    scheduler just starting gets that long): Dask's connect retries a refused connection until its whole timeout
    (30 s by default) before it gives up."""
    import socket

    from distributed.comm.addressing import get_address_host_port, parse_address

    scheme, _ = parse_address(address)
    if scheme != "tcp":
        return
    host, port = get_address_host_port(address)
    deadline = time.monotonic() + grace_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=grace_s):
                return
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise ConnectionRefusedError(f"connection to {host}:{port} refused (nothing listens there)") from None
            time.sleep(0.2)
        except OSError:
            return  # unreachable, timed out, a name that does not resolve: Dask's connect says so


@contextlib.contextmanager
def open_client(cfg: ClusterConfig, performance_report: str | os.PathLike | None = None,
                shared_dir: str | os.PathLike | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` for the configured cluster, closing what we started on exit.

    Args:
        cfg: The ``cluster`` section.
        performance_report: If set, a Dask performance report (HTML) of everything run inside is saved there.
        shared_dir: The output directory the tasks write into: on a cluster other than ``local`` every worker
            must see it (:func:`check_shared_dir`).

    Raises:
        UserError: the scheduler cannot be reached or its address is malformed, or a worker cannot see
            ``shared_dir``.
    """
    from distributed import Client

    if shared_dir is not None and cfg.backend == "kubernetes":
        check_volume_covers(cfg.kubernetes, Path(shared_dir))
    cluster: Any = None
    if cfg.backend == "address":
        with _address_errors(cfg):
            probe_scheduler(cfg.address or "", cfg.connect_timeout_s)
            client = Client(cfg.address, timeout=f"{cfg.connect_timeout_s:g}s")
    elif cfg.backend == "slurm":
        refusals: list[str] = []
        cluster = _slurm_cluster(cfg, refusals)
        client = Client(cluster)
        _SLURM_WATCH[client] = _SlurmWatch(cfg.slurm, weakref.ref(cluster), refusals)
    elif cfg.backend == "kubernetes":
        cluster = _kubernetes_cluster(cfg)
        client = Client(cluster)
    else:
        from distributed import LocalCluster

        workers = cfg.workers or max(1, os.cpu_count() or 1)
        cluster = LocalCluster(n_workers=workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                               memory_limit=cfg.memory_limit, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0" if cfg.dashboard else None,
                               # Failed tasks are reported by the pipelines, once, with the unit's id.
                               silence_logs=logging.CRITICAL,
                               # Ctrl-C reaches the workers too (the terminal's process group): theirs is ignored.
                               preload=["pipelines.worker_preload"])
        client = Client(cluster)
    if cfg.no_workers_timeout_s > 0 and (cfg.backend == "local" or _keeps_workers(cfg)):
        _NO_WORKERS_TIMEOUT[client] = cfg.no_workers_timeout_s
    quiet = _QuietConnectionLoss()
    for name in _DASK_CLIENT_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    quiet_refusal = _QuietRefusal()
    logging.getLogger("tornado.application").addFilter(quiet_refusal)
    try:
        _announce(client, cfg)
        if shared_dir is not None and cfg.backend != "local":  # LocalCluster workers share this machine's files
            # Adaptive clusters start workers only for tasks: wait for one only where the config keeps some.
            check_shared_dir(client, Path(shared_dir), min(cfg.connect_timeout_s, 60.0) if _keeps_workers(cfg) else 0)
        if performance_report is None:
            yield client
        else:
            with _performance_report(client, Path(performance_report)):
                yield client
    finally:
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        finally:
            for name in _DASK_CLIENT_LOGGERS:
                logging.getLogger(name).removeFilter(quiet)
            logging.getLogger("tornado.application").removeFilter(quiet_refusal)


@contextlib.contextmanager
def _performance_report(client: Any, path: Path) -> Iterator[None]:
    """Dask's HTML performance report (needs bokeh); without bokeh, the task stream as JSON next to it."""
    import importlib.util

    path.parent.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("bokeh") is not None:
        from distributed import performance_report

        with performance_report(filename=str(path)):
            yield
        console.print(f"dask performance report: {path}", soft_wrap=True)
        return
    from distributed import get_task_stream

    from segfactory.io import atomic_write_json

    with get_task_stream(client) as ts:
        yield
    tasks = [{"key": str(t.get("key")), "worker": t.get("worker"), "status": t.get("status"),
              "startstops": [dict(s) for s in t.get("startstops", ())]} for t in ts.data]
    out = path.with_suffix(".json")
    atomic_write_json(out, {"format": "segfactory-task-stream", "note": "install bokeh for Dask's HTML report",
                            "tasks": tasks})
    console.print(f"dask task stream (no bokeh for the HTML report): {out}", soft_wrap=True)


def _slurm_cluster(cfg: ClusterConfig, refusals: list[str]) -> Any:
    """A ``SLURMCluster`` scaling adaptively between the configured jobs; what sbatch says when it refuses one of
    them goes to ``refusals``."""
    import shutil

    if shutil.which("sbatch") is None:
        raise UserError("cluster.backend=slurm but 'sbatch' is not on PATH",
                        fix="run on a SLURM login node, or choose cluster.backend=local/address")
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(job_cls=_slurm_job_cls(refusals), **slurm_cluster_kwargs(cfg))
    cluster.adapt(minimum_jobs=cfg.slurm.minimum_jobs, maximum_jobs=cfg.slurm.maximum_jobs)
    return cluster


def _kubernetes_cluster(cfg: ClusterConfig) -> Any:
    from dask_kubernetes.operator import KubeCluster

    k = cfg.kubernetes
    try:
        cluster = KubeCluster(custom_cluster_spec=kubernetes_cluster_spec(cfg), namespace=k.namespace,
                              shutdown_on_close=True, quiet=True)
    except Exception as e:  # no kubeconfig, no operator CRD, no permission: all fixable by the user
        raise UserError(f"cannot create the Kubernetes Dask cluster '{k.name}': {type(e).__name__}: {e}",
                        fix="check kubectl access and that the Dask operator is installed "
                            "(helm install dask-kubernetes-operator)") from None
    cluster.adapt(minimum=k.minimum, maximum=k.maximum)
    return cluster


def has_gpu_workers(client: Any) -> bool:
    """Whether any worker offers the ``GPU`` resource."""
    return worker_gpus(client) > 0


def worker_gpus(client: Any) -> float:
    """The most ``GPU`` resource one connected worker offers (0: none does)."""
    workers = client.scheduler_info().get("workers", {})
    return max((float(w.get("resources", {}).get(GPU_RESOURCE, 0)) for w in workers.values()), default=0.0)


def configured_gpus(cfg: ClusterConfig) -> bool:
    """Whether the workers this config starts offer GPUs (adaptive clusters may have no worker yet to ask)."""
    return configured_worker_gpus(cfg) > 0


def configured_worker_gpus(cfg: ClusterConfig) -> float:
    """The ``GPU`` resource each worker this config starts offers: ``slurm.gpus_per_job / slurm.processes`` on
    SLURM, ``kubernetes.gpus`` on Kubernetes, else 0 (local and address clusters: ask the workers)."""
    if cfg.backend == "slurm" and cfg.slurm.gpus_per_job > 0:
        return cfg.slurm.gpus_per_job / cfg.slurm.processes
    if cfg.backend == "kubernetes" and cfg.kubernetes.gpus > 0:
        return float(cfg.kubernetes.gpus)
    return 0.0


def training_resources(client: Any, cfg: ClusterConfig, devices: int = 1,
                       setting: str = "train.devices") -> dict[str, float] | None:
    """Resources a training stage's task asks for: ``{GPU: devices}`` when the cluster has or will start GPU workers.

    A stage with ``train.devices = N > 1`` runs its N torchrun processes inside this one task, so on one worker:
    that worker must offer N GPUs. Without any GPU worker the task asks for nothing and the stage's command
    falls back by itself (:func:`segfactory.distributed.launch_processes`: one CPU process, or N gloo processes
    with ``train.backend=gloo``).

    Args:
        client: The pipeline's Dask client.
        cfg: The ``cluster`` section.
        devices: The stage's ``train.devices`` (1 for evaluation and prediction).
        setting: The stage's setting, as the error names it (e.g. ``finetune.train.devices``).

    Raises:
        UserError: GPU workers offer fewer than ``devices`` GPUs each (the task would wait forever); or
            ``tasks.gpu=require`` but no GPU worker appeared within ``connect_timeout_s``.
    """
    import time

    if cfg.tasks.gpu == "never":
        return None
    offered = max(configured_worker_gpus(cfg), worker_gpus(client))
    if offered <= 0 and cfg.tasks.gpu == "require":
        deadline = time.monotonic() + cfg.connect_timeout_s
        while offered <= 0 and time.monotonic() < deadline:
            check_slurm_workers(client)
            time.sleep(0.5)
            offered = worker_gpus(client)
        if offered <= 0:
            raise UserError(f"cluster.tasks.gpu=require, but no worker offered a {GPU_RESOURCE} resource within "
                            f"{cfg.connect_timeout_s:g}s",
                            fix=f"start workers with `dask worker --resources {GPU_RESOURCE}={devices}`, set "
                                "cluster.slurm.gpus_per_job or cluster.kubernetes.gpus, or use cluster.tasks.gpu=auto")
    if offered <= 0:
        return None
    if offered < devices:
        raise UserError(f"{setting}={devices} but the cluster's workers offer at most {offered:g} {GPU_RESOURCE}(s) "
                        "each (a training stage runs all its torchrun processes in one task on one worker)",
                        fix=f"set {setting}={int(offered)} or less, or give each worker {devices} GPUs: "
                            f"cluster.slurm.gpus_per_job={devices} with cluster.slurm.processes=1, "
                            f"cluster.kubernetes.gpus={devices}, or `dask worker --resources {GPU_RESOURCE}={devices}`")
    return {GPU_RESOURCE: devices}


def task_resources(cfg: ClusterConfig) -> dict[str, float] | None:
    """Resources a CPU task (render shard, ingest shard) asks for, or None."""
    return dict(cfg.tasks.cpu_resources) or None


def dashboard_link(client: Any, cfg: ClusterConfig, probe_timeout_s: float = 2.0) -> str | None:
    """The link to the scheduler's dashboard that works from this machine, or None when it has none.

    A cluster this process started reports its own link. An existing scheduler (``backend=address``) is asked
    for its dashboard port, and the link names the host this driver reached the scheduler at (the scheduler's own
    address when that is a wildcard such as ``0.0.0.0``; IPv6 in brackets). A scheduler started with
    ``--no-dashboard`` still serves HTTP (health, metrics) on a port it reports as its dashboard: a ``/status``
    answered 404 means no dashboard, and no link; a dashboard that does not answer within ``probe_timeout_s``
    (a firewall, a tunnel needed) is linked with a note saying so.

    Args:
        client: A connected ``distributed.Client``.
        cfg: The ``cluster`` section it was opened with.
        probe_timeout_s: How long the address backend's HTTP check of the dashboard may take.
    """
    if cfg.backend != "address":
        if not cfg.dashboard:
            return None
        try:
            return client.dashboard_link or None
        except (AttributeError, KeyError):  # a cluster without an HTTP server at all
            return None
    import urllib.error
    import urllib.request

    from distributed.comm import get_address_host
    from distributed.utils import format_dashboard_link

    info = client.scheduler_info()
    port = (info.get("services") or {}).get("dashboard")
    if not port:
        return None
    host = get_address_host(client.scheduler.address)
    if host in ("", "0.0.0.0", "::") and info.get("address"):
        host = get_address_host(info["address"])
    url_host = f"[{host}]" if ":" in host else host
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the driver's own view, no proxy
    try:
        direct.open(f"http://{url_host}:{port}/status", timeout=probe_timeout_s).close()
    except urllib.error.HTTPError as e:
        if e.code == 404:  # HTTP without the dashboard (`dask scheduler --no-dashboard`, or no bokeh there)
            return None
    except (OSError, ValueError):
        return f"{format_dashboard_link(url_host, port)} (not reachable from this machine)"
    return format_dashboard_link(url_host, port)


def _announce(client: Any, cfg: ClusterConfig) -> None:
    link = dashboard_link(client, cfg)
    nworkers = len(client.scheduler_info().get("workers", {}))
    where = {"slurm": "SLURM jobs (adaptive)", "kubernetes": "Kubernetes pods"}.get(cfg.backend, "")
    console.print(f"dask: {nworkers} worker(s) at {client.scheduler.address}" + (f" via {where}" if where else "")
                  + (f", dashboard {link}" if link else ""), soft_wrap=True)


def _keeps_workers(cfg: ClusterConfig) -> bool:
    return (cfg.backend == "address" or (cfg.backend == "slurm" and cfg.slurm.minimum_jobs > 0)
            or (cfg.backend == "kubernetes" and cfg.kubernetes.n_workers > 0))


def check_volume_covers(k: KubernetesSettings, path: Path) -> None:
    """The output directory is on a volume the worker pods mount (Kubernetes).

    Raises:
        UserError: ``cluster.kubernetes.volumes`` is empty or none of them holds ``path``.
    """
    target = Path(os.path.abspath(path))
    if any(target == Path(v.mount_path) or Path(v.mount_path) in target.parents for v in k.volumes):
        return
    mounted = ", ".join(v.mount_path for v in k.volumes) or "none"
    raise UserError(f"the output directory '{target}' is on no volume the worker pods mount "
                    f"(cluster.kubernetes.volumes: {mounted}); workers would write where the driver cannot see",
                    fix="add the driver's output volume, e.g. cluster.kubernetes.volumes=[{claim: segfactory-data, "
                        "mount_path: /data/segfactory}], and write under its mount_path")


SHARED_PROBE = ".segfactory-shared-"


def check_shared_dir(client: Any, path: Path, wait_s: float) -> None:
    """Every worker sees the driver's directory ``path``: the file the driver writes there, with its content, and
    can write there too.

    A worker on another filesystem (node-local ``/tmp``, a pod without the volume, a host that mounts something
    else at that path) would write results the driver never sees. An adaptive cluster with no worker yet is
    waited for up to ``wait_s``; workers that join later are not checked.

    Raises:
        UserError: one line naming the first worker that cannot see or write ``path`` and why.
    """
    path.mkdir(parents=True, exist_ok=True)
    token = path / f"{SHARED_PROBE}{uuid.uuid4().hex}"
    content = f"{os.uname().nodename}:{os.getpid()}:{token.name}"
    token.write_text(content, encoding="utf-8")
    try:
        deadline = time.monotonic() + wait_s
        while not client.scheduler_info().get("workers") and time.monotonic() < deadline:
            check_slurm_workers(client)
            time.sleep(0.5)
        if not client.scheduler_info().get("workers"):
            check_slurm_workers(client)
            console.print(f"note: no Dask worker yet to check that workers see '{path}' (they must: a shared "
                          "filesystem at the same path)", soft_wrap=True)
            return
        seen: dict[str, str | None] = client.run(_probe_shared_dir, str(token), content)
    finally:
        token.unlink(missing_ok=True)
    bad = {worker: why for worker, why in seen.items() if why}
    if bad:
        worker, why = next(iter(bad.items()))
        raise UserError(f"{len(bad)} of {len(seen)} Dask worker(s) cannot use the output directory '{path}' "
                        f"(worker {worker}: {why}); workers must share the output filesystem with the driver",
                        fix="mount the same filesystem at the same path on every worker: on SLURM a shared "
                            "filesystem (not /tmp or node-local disk), on Kubernetes cluster.kubernetes.volumes, "
                            "for `dask worker`s the driver's mount")


def _probe_shared_dir(token: str, content: str) -> str | None:
    """Runs on each worker: why it cannot use the token's directory, or None."""
    import socket

    host = socket.gethostname()
    try:
        seen = Path(token).read_text(encoding="utf-8")
    except FileNotFoundError:
        if Path(token).parent.is_dir():
            return f"on {host} it lacks the driver's file: a different filesystem is mounted there"
        return f"on {host} it does not exist"
    except OSError as e:
        return f"on {host} it is not readable ({e.strerror or e})"
    if seen != content:
        return f"on {host} it holds another file: a different filesystem is mounted there"
    probe = Path(f"{token}-{host}-{os.getpid()}")
    try:
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as e:
        return f"on {host} it is not writable ({e.strerror or e})"
    return None
