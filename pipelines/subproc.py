"""Run heavy external work (a Blender render, a training run) as a subprocess inside a Dask task.

The child gets its own process group, so a timeout kills Blender and anything it started; and it is tied to
its parent with ``PR_SET_PDEATHSIG``, so a worker killed with SIGKILL does not leave an orphan rendering on. The
parent's pid goes to the child in ``PARENT_PID_ENV``: a ``segfactory`` stage process watches it
(:func:`segfactory.cli.orphan_watchdog`) and ends its whole process group a grace period after its parent is gone.
A lock the caller holds can be handed down (``pass_fds``), so it stays held until the child has exited too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segfactory.errors import PARENT_PID_ENV


def forward_to_driver(topic: str, parse: Callable[[str], dict[str, Any] | None]) -> Callable[[str], None] | None:
    """An ``on_line`` callback for :func:`run_logged` that sends each output line ``parse`` turns into a message to
    the driver, as a Dask worker event on ``topic`` (the driver subscribes to it); None outside a Dask worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None

    def forward(line: str) -> None:
        msg = parse(line)
        if msg is not None:
            worker.log_event(topic, msg)

    return forward


class SubprocessFailed(RuntimeError):
    """The child crashed or exited non-zero; the message carries the exit status and its last output lines.

    Attributes:
        returncode: The child's exit status (negative: the signal that killed it; None: timed out).
        error: The child's last ``error: ...`` line (a segfactory command's user error), without the prefix.
        fix: The ``fix: ...`` line after it, if any.
    """

    def __init__(self, message: str, returncode: int | None = None, error: str | None = None,
                 fix: str | None = None):
        super().__init__(message)
        self.returncode, self.error, self.fix = returncode, error, fix


class SubprocessTimeout(SubprocessFailed):
    """The child ran past its timeout and its process group was killed."""


def _die_with(parent: int) -> Callable[[], None]:
    """The child's ``preexec_fn`` (between fork and exec): SIGKILL when ``parent`` dies (``PR_SET_PDEATHSIG``),
    and at once if it already died before the prctl took effect (the kernel would never send it then)."""

    def preexec() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def run_logged(cmd: list[str], timeout_s: float, log_path: str | os.PathLike,
               on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
               pass_fds: tuple[int, ...] = ()) -> None:
    """Run ``cmd``, appending its output to ``log_path``; raise on timeout or non-zero exit.

    Args:
        cmd: Command line.
        timeout_s: Wall-clock limit; on expiry the whole process group gets SIGKILL.
        log_path: File the child's stdout and stderr are appended to.
        on_line: Called with each output line (e.g. to forward progress).
        env: Environment for the child (default: inherited); ``PARENT_PID_ENV`` is added.
        pass_fds: File descriptors the child inherits, e.g. an ``flock``-ed lock file: the lock is then held
            until this process and the child (and everything it forked) have all exited.

    Raises:
        SubprocessTimeout: it ran too long.
        SubprocessFailed: it exited non-zero or died from a signal.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=8)
    error: list[str | None] = [None, None]  # the child's last "error:" line and the "fix:" line after it
    timed_out = threading.Event()
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        child_env = {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True, preexec_fn=_die_with(os.getpid()), env=child_env,
                                pass_fds=pass_fds)

        def kill() -> None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if line.strip():
                    tail.append(line.rstrip())
                if line.startswith("error: "):
                    error[:] = [line.removeprefix("error: ").strip(), None]
                elif line.lstrip().startswith("fix: ") and error[0] is not None and error[1] is None:
                    error[1] = line.strip().removeprefix("fix: ")
                if on_line is not None:
                    on_line(line)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                kill()
                proc.wait()
    if timed_out.is_set():
        raise SubprocessTimeout(f"timed out after {timeout_s:g}s and was killed (log: {log_path})")
    if rc != 0:
        status = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        last = " | ".join(list(tail)[-3:])
        raise SubprocessFailed(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} {status}: {last} (log: {log_path})",
                               returncode=rc, error=error[0], fix=error[1])
