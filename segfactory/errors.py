"""Errors the CLI turns into one clear line (plus the fix) instead of a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

# Exit codes are part of the CLI contract: scripts and schedulers branch on them.
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: traceback printed
EXIT_USER = 2  # bad config, missing file, corrupt input: nothing was done
EXIT_PARTIAL = 3  # the run finished but some units (shards, files) failed; they are listed
EXIT_BUSY = 4  # another run holds the lock
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: finished work is kept, a re-run resumes

# Set by a pipeline for its stage processes: their log file, where their output goes once they are signalled.
STAGE_LOG_ENV = "SEGFACTORY_STAGE_LOG"
# Set by ``pipelines.subproc.run_logged`` for its children: the pid of the process (a Dask worker) that started it.
PARENT_PID_ENV = "SEGFACTORY_PARENT_PID"
# Seconds a stage process may outlive its parent (to finish its step and write a checkpoint) before its whole
# process group is SIGKILLed; default ORPHAN_GRACE_S.
ORPHAN_GRACE_ENV = "SEGFACTORY_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 60.0


class UserError(Exception):
    """A mistake the user can fix; rendered as ``error: <message>`` and ``fix: <fix>``.

    Args:
        message: What is wrong, naming the field/file and the bad value.
        fix: What to do about it.
        exit_code: Process exit code the CLI returns.
    """

    def __init__(self, message: str, fix: str | None = None, exit_code: int = EXIT_USER):
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"


class PartialFailure(Exception):
    """Some independent units of work failed after retries; the rest were committed.

    Args:
        message: One line: how many failed.
        failures: Why each unit failed, by unit.
        summary: What the command returns when nothing fails, for the rest (its caller still writes its record
            of the settings and prints its summary before the exit code says some units failed).
    """

    def __init__(self, message: str, failures: dict[str, str], summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.failures = failures
        self.summary = summary


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and cron send): the CLI exits with ``EXIT_INTERRUPTED``.

    Args:
        signame: The signal that stopped the run, for the message.
    """

    def __init__(self, signame: str = "SIGINT"):
        super().__init__(signame)
        self.signame = signame


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(_signame(signum))


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Interrupted` like Ctrl-C does, so every ``finally`` and context
    manager on the way out runs (clusters closed, checkpoints kept) and the CLI exits with 130 and a message,
    instead of dying silently with 143. SIGINT raises :class:`Interrupted` too (naming the signal). A no-op
    outside the main thread, where Python cannot handle signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _detach_output() -> None:
    """Point stdout and stderr at the stage's log file (``STAGE_LOG_ENV``), else at /dev/null.

    A pipeline's stage process writes into a pipe its Dask worker reads; a signal to the stage usually means the
    worker is going down too (its driver stopped, its SLURM job was cancelled, its pod deleted), and the next
    write to the broken pipe would fail the checkpoint about to be saved. Its last lines go to its log instead.
    """
    with contextlib.suppress(OSError):
        log = os.environ.get(STAGE_LOG_ENV)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log else os.open(os.devnull, os.O_WRONLY)
        for std in (1, 2):
            os.dup2(fd, std)
        os.close(fd)


class _LogOnBrokenPipe:
    """A text stream (``sys.stdout`` or ``sys.stderr``) whose writes survive the pipe they go to breaking.

    The first write or flush that fails with ``BrokenPipeError`` points stdout and stderr at the stage's log
    (:func:`_detach_output`) and is done again there; everything after goes to the log too. Every other attribute is
    the wrapped stream's.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            _detach_output()
            return int(self._stream.write(text))

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            _detach_output()
            self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def log_on_broken_pipe() -> None:
    """Keep a pipeline's stage process (and the torchrun ranks it starts) writing when its output pipe breaks.

    Its stdout and stderr are a pipe its Dask worker reads, and its ranks inherit it. When the worker dies the pipe
    breaks at once, while the SIGTERM that stops training at a step boundary (:class:`DeferredInterrupt`, which
    also moves the output to the log) reaches the ranks only through the stage process and torchrun. A progress line
    printed in between would raise ``BrokenPipeError`` and kill the rank before its checkpoint; with this, such a
    write moves the output to the stage's log (``STAGE_LOG_ENV``) and training goes on until the signal arrives.
    """
    import sys

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _LogOnBrokenPipe):
            setattr(sys, name, _LogOnBrokenPipe(stream))


class DeferredInterrupt:
    """Turns the first SIGINT or SIGTERM into a request to stop at the next step boundary.

    Training loops check :attr:`requested` between steps, save a checkpoint of the state after the last whole
    step and raise :class:`Interrupted`. An interrupt raised mid-step would leave half-updated state (a partial
    optimizer step, momentum encoders, BatchNorm statistics, memory banks) that no checkpoint may hold. A second
    Ctrl-C raises :class:`Interrupted` at once (nothing more is saved); further SIGTERMs are ignored (a stage
    process gets one from its dying worker and one more from ``PR_SET_PDEATHSIG``; a scheduler ends its grace
    period with SIGKILL). Outside the main thread signals cannot be handled; there the process keeps its handlers.

    Args:
        announce: Called with the signal's name when the first one arrives (prints what happens next).
    """

    def __init__(self, announce: Callable[[str], None] | None = None) -> None:
        self.requested: str | None = None
        self._announce = announce
        self._previous: dict[int, Any] = {}
        self._ppid = os.getppid()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            if signum == signal.SIGINT:  # a second Ctrl-C: the user wants out now
                raise Interrupted(_signame(signum))
            return  # SIGTERM again (the worker's cleanup, then PR_SET_PDEATHSIG): the scheduler's SIGKILL is final
        self.requested = _signame(signum)
        if os.getppid() != self._ppid or os.environ.get(STAGE_LOG_ENV):
            _detach_output()
        if self._announce is not None:
            with contextlib.suppress(OSError):  # stdout may be a pipe whose reader is gone (a killed driver)
                self._announce(self.requested)

    def stop(self) -> Interrupted:
        """The exception to raise once the checkpoint is saved."""
        return Interrupted(self.requested or "SIGINT")

    def __enter__(self) -> DeferredInterrupt:
        self._ppid = os.getppid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def orphan_grace_s() -> float:
    """``ORPHAN_GRACE_ENV`` as seconds (default ``ORPHAN_GRACE_S``)."""
    raw = os.environ.get(ORPHAN_GRACE_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else ORPHAN_GRACE_S
    except ValueError:
        return ORPHAN_GRACE_S


def _descendants(root: int) -> list[int]:
    """Pids of every living descendant of ``root`` (read from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                    stat = f.read()
                ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_group_when_orphaned(grace_s: float, poll_s: float = 0.25) -> threading.Thread | None:
    """Bound how long a stage process outlives the Dask worker that started it (``PARENT_PID_ENV``).

    When the worker dies, ``PR_SET_PDEATHSIG`` sends this process SIGTERM and training stops at the next step
    boundary with a checkpoint (:class:`DeferredInterrupt`). A step or a save that never ends (a hung GPU, a
    stalled filesystem) would keep it, its data-loader workers and the stage lock they inherited alive for ever,
    while the task's retry waits for that lock. A daemon thread watches the parent: ``grace_s`` seconds after it
    is gone, it SIGKILLs every descendant (torchrun's ranks lead sessions of their own) and this process's whole
    process group (the process is a session leader, started so by ``pipelines.subproc.run_logged``), or only this
    process where it leads no group.

    The variable is taken out of the environment: processes this one starts (``torchrun`` and its ranks) have
    another parent and are not watched themselves; they go with the process group.

    Returns:
        The watching thread, or None when no parent pid was handed down (not a pipeline's stage process).
    """
    try:
        parent = int(os.environ.pop(PARENT_PID_ENV, ""))
    except ValueError:
        return None

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)
        log = os.environ.get(STAGE_LOG_ENV)
        with contextlib.suppress(OSError):
            if log:
                with open(log, "a", encoding="utf-8") as f:
                    f.write(f"segfactory: stage process {os.getpid()} outlived its worker (pid {parent}) by "
                            f"{grace_s:g}s ({ORPHAN_GRACE_ENV}); killing its process group\n")
        # torchrun's ranks lead sessions of their own: the group kill below would miss them, so every
        # descendant goes first
        for pid in _descendants(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="segfactory-orphan-watchdog", daemon=True)
    thread.start()
    return thread
