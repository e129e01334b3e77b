"""Run units of work as Dask tasks: submit them all, show one progress bar, collect results and per-unit failures.

Every Dask stage of segfactory (render shards, ingest hash chunks and shards, training stages) goes through
:func:`run_tasks`: one failed unit is reported under its name after its retries and the others go on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from rich.progress import Progress

from segfactory.console import progress

# A worker event -> (unit name, progress within the unit, the unit's size or None, a bar description or None);
# None for an event of another run.
EventParser = Callable[[dict[str, Any]], "tuple[str, float, float | None, str | None] | None"]


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
        every unit that failed after its retries. The bar counts finished units' sizes and the reported progress
        of running ones; a failed unit's share is emptied.
    """
    from distributed import as_completed

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
            for fut in as_completed(futures):
                name = by_future[fut]
                try:
                    results[name] = fut.result()
                except Exception as e:  # reported per unit; the others go on
                    failures[name] = f"{type(e).__name__}: {e}"
                    if on_failure is not None:
                        on_failure(name, e)
                    done[name] = 0.0  # what it reported doing did not last
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
