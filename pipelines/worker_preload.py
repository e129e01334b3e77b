"""Dask worker preload of segfactory's LocalCluster (``LocalCluster(preload=[__name__])``): Ctrl-C is the driver's.

A LocalCluster's worker processes share the terminal's process group, so Ctrl-C (SIGINT to the whole group) also
reaches them, and each died printing 30-50 lines of ``CancelledError`` / ``KeyboardInterrupt`` traceback
("Process Dask Worker process (from Nanny)") over the driver's one-line "interrupted" message. The driver is what
handles Ctrl-C (it stops, keeps the finished work and closes the cluster, which ends the workers), so a worker
catches SIGINT and does nothing with it.

The handler is a Python function, not ``SIG_IGN``: an ignored signal stays ignored across ``exec``, a caught one
is reset to the default, so the processes a task starts (Blender renders, training stages under ``torchrun``,
decoder children) still get Ctrl-C as before (training stops at a step boundary with a checkpoint).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


def _driver_handles_it(signum: int, frame: FrameType | None) -> None:
    """SIGINT in a worker: the driver stops the run and closes the cluster."""


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in the worker process as it starts."""
    if threading.current_thread() is threading.main_thread():  # the only thread that may set a handler
        signal.signal(signal.SIGINT, _driver_handles_it)
