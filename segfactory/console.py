"""One place for user-facing output: messages go to stderr so stdout stays machine-readable (JSON)."""

from __future__ import annotations

import os
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, highlight=False)

# A pipeline runs a stage command as a child process and sets this variable: the child's progress bars then also
# print `PROGRESS_PREFIX completed total description` lines on stdout, which the parent turns into its own bar.
PROGRESS_LINES_ENV = "SEGFACTORY_PROGRESS_LINES"
PROGRESS_PREFIX = "SEGFACTORY-STAGE-PROGRESS"
_LINE_INTERVAL_S = 1.0


class _LineProgress(Progress):
    """A rich progress bar that also reports each task's state as a line (at most once a second, and at 100 %)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._last_line: dict[TaskID, float] = {}

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._emit(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._emit(task_id)

    def _emit(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        now = time.monotonic()
        if now - self._last_line.get(task_id, -1e9) < _LINE_INTERVAL_S and not task.finished:
            return
        self._last_line[task_id] = now
        total = "?" if task.total is None else f"{task.total:g}"
        print(f"{PROGRESS_PREFIX} {task.completed:g} {total} {task.description}", flush=True)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """``{"completed", "total", "description"}`` from a child's progress line, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX + " "):
        return None
    parts = line.rstrip("\n").split(" ", 3)
    if len(parts) < 3:
        return None
    try:
        completed = float(parts[1])
        total = None if parts[2] == "?" else float(parts[2])
    except ValueError:
        return None
    return {"completed": completed, "total": total, "description": parts[3] if len(parts) > 3 else ""}


def progress(transient: bool = False) -> Progress:
    """A rich progress bar with count, elapsed and remaining time."""
    # a quiet console (ranks other than 0 of a data-parallel run) prints no progress lines either
    cls = _LineProgress if os.environ.get(PROGRESS_LINES_ENV) and not console.quiet else Progress
    return cls(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )
