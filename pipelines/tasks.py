"""Run units of work as Dask tasks: submit them all, show one progress bar, collect results and per-unit failures.

Every Dask stage of segfactory (render shards, ingest hash chunks and shards, training stages) goes through
:func:`run_tasks`: one failed unit is reported under its name after its retries and the others go on. A cluster
that lost all its workers (``cluster.no_workers_timeout_s``) fails the units still to run instead of waiting for
ever; SLURM worker jobs still pending in the queue before any worker connected are waited for instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.progress import Progress

from segfactory.console import progress

# A worker event -> (unit name, progress within the unit, the unit's size or None, a bar description or None);
# None for an event of another run.
EventParser = Callable[[dict[str, Any]], "tuple[str, float, float | None, str | None] | None"]
_POLL_S = 0.2  # how often the wait loop looks for finished units
_WORKERS_POLL_S = 2.0  # how often it asks the scheduler for its workers while nothing finishes


class NoWorkersLeft(RuntimeError):
    """The scheduler had no worker for ``cluster.no_workers_timeout_s`` while this unit was still to run."""


def run_tasks(client: Any, fn: Callable[..., Any], units: Mapping[str, Any], *, description: str,
              sizes: Mapping[str, float] | None = None, keys: Mapping[str, str] | None = None, retries: int = 0,
              resources: dict[str, float] | None = None, topic: str | None = None,
              parse_event: EventParser | None = None, on_failure: Callable[[str, BaseException], None] | None = None,
              bar: Progress | None = None, **kwargs: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``fn(unit, **kwargs)`` for every unit on the cluster and wait for all of them.

    Args:
        client: A ``distributed.Client``.
        fn: The task function; its first argument is the unit.
        units: ``{name: unit}``; the names label progress and failures.
        description: The progress bar's label.
        sizes: Each unit's share of the bar (default 1 each); a unit ``sizes`` leaves out takes the size its
            latest event gives (a task that reports its own bar, such as a training process).
        keys: Dask keys by unit name (default: random keys; tasks are never pure).
        retries: Dask re-runs of a failed task before it counts as failed.
        resources: Dask resources every task asks for.
        topic: A worker-event topic the tasks report progress on (:func:`pipelines.subproc.forward_to_driver`);
            ``parse_event`` turns each event into the progress of one unit, which moves the bar before the unit
            finishes.
        on_failure: Called with ``(name, exception)`` when a unit has failed for good.
        bar: A progress display to add this run's bar to (it is removed at the end); default a new one.
        **kwargs: Passed to every task.

    Returns:
        ``(results, failures)``: results by unit name in completion order, and ``"Type: message"`` by name of
        every unit that failed after its retries, or that was still to run when the cluster had had no worker
        for ``cluster.no_workers_timeout_s`` (:class:`NoWorkersLeft`; the client came from
        :func:`pipelines.cluster.open_client`; not while its SLURM worker jobs all pend in the queue before any
        worker connected, :func:`pipelines.cluster.slurm_jobs_queued`). The bar counts finished units' sizes and
        the reported progress of running ones; a failed unit's share is emptied.

    Raises:
        UserError: the cluster's SLURM worker jobs can give it no worker (refused by sbatch, or ended before their
            worker connected; :func:`pipelines.cluster.check_slurm_workers`); the units still to run are cancelled.
    """
    from distributed import as_completed

    from pipelines.cluster import check_slurm_workers, no_workers_timeout, slurm_jobs_queued

    names = list(units)
    if not names:
        return {}, {}
    fixed = {n for n in names if sizes is None or n in sizes}
    size: dict[str, float | None] = {n: (1 if sizes is None else sizes[n]) if n in fixed else None for n in names}
    done: dict[str, float] = dict.fromkeys(names, 0.0)
    results: dict[str, Any] = {}
    failures: dict[str, str] = {}
    display = progress() if bar is None else bar
    with display if bar is None else contextlib.nullcontext():
        task = display.add_task(description, total=_total(size))

        def show(desc: str | None = None) -> None:
            fields: dict[str, Any] = {"completed": sum(done.values()), "total": _total(size)}
            if desc is not None:
                fields["description"] = desc
            display.update(task, **fields)

        def on_event(event: Any) -> None:
            parsed = parse_event(event[1] if isinstance(event, tuple) else event) if parse_event else None
            if parsed is None or parsed[0] not in done or parsed[0] in results or parsed[0] in failures:
                return
            name, completed, total, desc = parsed
            if name not in fixed:
                size[name] = total
            cap = size[name]
            done[name] = completed if cap is None else min(completed, cap)
            show(desc)

        if topic is not None:
            client.subscribe_topic(topic, on_event)
        try:
            futures = client.map(fn, [units[n] for n in names], key=[keys[n] for n in names] if keys else None,
                                 pure=False, retries=retries, resources=resources, **kwargs)
            by_future = dict(zip(futures, names, strict=True))

            def fail(name: str, e: BaseException) -> None:
                failures[name] = f"{type(e).__name__}: {e}"
                if on_failure is not None:
                    on_failure(name, e)
                done[name] = 0.0  # what it reported doing did not last

            pending = set(futures)
            watch = _WorkerWatch(client, no_workers_timeout(client), lambda: slurm_jobs_queued(client))
            finished = as_completed(futures)
            while pending:
                if not finished.has_ready():
                    try:
                        check_slurm_workers(client)  # SLURM jobs refused, or ended without a worker: none will come
                    except Exception:
                        client.cancel(list(pending))
                        raise
                    if watch.gone_for_good():
                        lost = NoWorkersLeft(f"no Dask worker left on the scheduler for {watch.timeout:g}s "
                                             "(cluster.no_workers_timeout_s); a re-run retries it")
                        client.cancel(list(pending))
                        for fut in sorted(pending, key=lambda f: names.index(by_future[f])):
                            fail(by_future[fut], lost)
                        show()
                        break
                    time.sleep(_POLL_S)
                    continue
                for fut in finished.next_batch(block=False):
                    pending.discard(fut)
                    name = by_future[fut]
                    try:
                        results[name] = fut.result()
                    except Exception as e:  # reported per unit; the others go on
                        fail(name, e)
                    else:
                        if size[name] is not None:
                            done[name] = size[name]
                    show()
        finally:
            if topic is not None:
                client.unsubscribe_topic(topic)
            if bar is not None:
                display.remove_task(task)
    return results, failures


def _total(size: Mapping[str, float | None]) -> float | None:
    return None if any(v is None for v in size.values()) else sum(v for v in size.values() if v is not None)


class _WorkerWatch:
    """Tells when the scheduler has had no worker for ``timeout`` seconds (never when ``timeout`` is None), not
    counting while ``queued()`` says the workers are still to come (SLURM jobs pending in the queue): the time
    starts afresh once it no longer does."""

    def __init__(self, client: Any, timeout: float | None, queued: Callable[[], bool] = lambda: False):
        self.client, self.timeout, self.queued = client, timeout, queued
        self._checked = time.monotonic()
        self._alone_since: float | None = None

    def gone_for_good(self) -> bool:
        now = time.monotonic()
        if self.timeout is None or now - self._checked < min(_WORKERS_POLL_S, self.timeout / 2):
            return False
        self._checked = now
        try:
            workers = len(self.client.nthreads())
        except Exception:  # the scheduler is gone too: Dask cancels the futures, which ends the wait
            return False
        if workers or self.queued():
            self._alone_since = None
            return False
        if self._alone_since is None:
            self._alone_since = now
        return now - self._alone_since >= self.timeout
