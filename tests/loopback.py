"""Real Dask clusters for tests: a ``dask scheduler`` and ``dask worker`` processes on 127.0.0.1.

Each process runs in its own session so teardown can kill it, and everything it started (render
subprocesses), by process group. Workers run without a nanny: SIGKILL of a worker is the death of that worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]
REPO = Path(__file__).resolve().parent.parent


class LoopbackCluster:
    """A scheduler and ``n_workers`` single-thread workers; ``env`` is added to the workers' environment."""

    def __init__(self, root: Path, n_workers: int = 2, env: dict[str, str] | None = None):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = root / "scheduler.json"
        self.env = {**os.environ, **(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.workers: list[subprocess.Popen] = []
        self.address = ""
        self._start(n_workers)

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / log, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _start(self, n_workers: int) -> None:
        self._spawn([*DASK, "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(self.scheduler_file)], "scheduler.log")
        deadline = time.monotonic() + 60
        while not self.scheduler_file.is_file() or not self.scheduler_file.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(self.root / 'scheduler.log').read_text()}")
            time.sleep(0.1)
        time.sleep(0.1)
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        for i in range(n_workers):
            self.add_worker(f"w{i}")
        self.wait_for_workers(n_workers)

    def add_worker(self, name: str) -> subprocess.Popen:
        proc = self._spawn([*WORKER, self.address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1",
                            "--no-dashboard", "--name", name, "--death-timeout", "60"], f"worker-{name}.log")
        self.workers.append(proc)
        return proc

    def n_workers(self) -> int:
        from distributed import Client

        with Client(self.address, timeout="20s") as c:
            return len(c.scheduler_info()["workers"])

    def wait_for_workers(self, n: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(self.address, timeout="20s") as c:
            c.wait_for_workers(n, timeout=timeout)

    def renders_of(self, worker: subprocess.Popen) -> list[psutil.Process]:
        """The ``synth.worker`` render subprocesses a worker is running now."""
        try:
            kids = psutil.Process(worker.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            with contextlib.suppress(psutil.Error):
                if "synth.worker" in k.cmdline():
                    out.append(k)
        return out

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session=True`` and its whole group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
