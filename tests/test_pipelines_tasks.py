"""``pipelines.tasks.run_tasks``, the one submit / progress / collect-failures loop of every Dask stage, on a real
in-process LocalCluster."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

from pipelines.tasks import run_tasks

TOPIC = "test-tasks-progress"


def _unit(unit: dict[str, Any], root: str) -> str:
    """Reports progress, then fails on the attempts ``unit["fail"]`` says and returns its name otherwise."""
    from distributed import get_worker

    marker = Path(root) / unit["name"]
    attempt = len(marker.read_text()) if marker.exists() else 0
    marker.write_text("x" * (attempt + 1))
    worker = get_worker()
    for done in range(1, unit["steps"] + 1):
        worker.log_event(TOPIC, {"unit": unit["name"], "done": done, "of": unit["steps"]})
    time.sleep(unit.get("sleep", 0))
    if attempt < unit["fail"]:
        raise RuntimeError(f"{unit['name']} broke on attempt {attempt + 1}")
    return unit["name"]


class _Recording(Progress):
    """A real progress display that remembers every state its tasks were set to."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.states: list[tuple[float, float | None, str]] = []

    def add_task(self, description: str, **kwargs: Any) -> Any:
        task_id = super().add_task(description, **kwargs)
        self.states.append((0, kwargs.get("total"), description))
        return task_id

    def update(self, task_id: Any, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        t = self._tasks[task_id]
        self.states.append((t.completed, t.total, t.description))


def test_results_failures_retries_and_progress(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    units = {"a": {"name": "a", "steps": 4, "fail": 0, "sleep": 1.0},  # progress shows before it finishes
             "b": {"name": "b", "steps": 2, "fail": 1},  # fails once: the retry succeeds
             "c": {"name": "c", "steps": 3, "fail": 9}}  # fails on every attempt
    failed: list[str] = []
    bar = _Recording()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client:
        results, failures = run_tasks(
            client, _unit, units, description="units", sizes={"a": 4, "b": 2, "c": 3},
            keys={n: f"unit-{n}" for n in units}, retries=1, topic=TOPIC,
            parse_event=lambda m: (m["unit"], m["done"], None, None),
            on_failure=lambda name, e: failed.append(name), bar=bar, root=str(tmp_path))
    assert results == {"a": "a", "b": "b"}
    assert failures == {"c": "RuntimeError: c broke on attempt 2"} and failed == ["c"]
    assert (tmp_path / "b").read_text() == "xx" and (tmp_path / "c").read_text() == "xx"  # retries=1
    assert all(total == 9 for _, total, _ in bar.states)
    assert any(0 < completed < 4 for completed, _, _ in bar.states)  # a's events moved the bar mid-task
    assert bar.states[-1][0] == 6  # a and b done; the failed unit's share stays empty
    assert not bar.tasks  # a display passed in gets its task back


def test_a_unit_without_a_size_follows_its_own_events(tmp_path: Path) -> None:
    from distributed import Client, LocalCluster

    bar = _Recording()
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc, Client(lc) as client:
        results, failures = run_tasks(
            client, _unit, {"train": {"name": "train", "steps": 5, "fail": 0, "sleep": 1.0}}, description="train",
            sizes={}, topic=TOPIC, parse_event=lambda m: (m["unit"], m["done"], m["of"], f"train {m['done']}"),
            bar=bar, root=str(tmp_path))
    assert results == {"train": "train"} and failures == {}
    assert bar.states[0] == (0, None, "train")  # no size until the task reports one
    assert (5, 5, "train 5") in bar.states
    assert run_tasks(None, _unit, {}, description="nothing") == ({}, {})
