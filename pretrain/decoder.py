"""Isolated decoding: every file of an ingest shard is decoded in a child process with a timeout and a memory cap.

A decoder that hangs, crashes or runs out of memory on one file must cost that file only, never the Dask worker,
its 512-file shard or the refresh lock. :class:`DecoderProcess` keeps one long-lived child (``python -m
pretrain.decoder``) per shard task and hands it one file at a time; a child that does not answer within
``checks.decode_timeout_s`` is SIGKILLed, one that dies is reaped, and either way the file is rejected
(``timeout`` / ``crashed``) and a fresh child is started for the next file. The child caps its own address space
(``RLIMIT_AS``, ``checks.decode_memory_mb`` above what it holds after start-up), so an allocation past the cap
fails inside the decoder (``memory``) instead of waking the kernel's OOM killer or the Dask nanny.

Protocol: the parent writes requests to the child's stdin and reads answers from a dedicated pipe (a library
that prints to stdout cannot corrupt it); each message is an 8-byte big-endian length and a pickle.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Any, BinaryIO

_HEADER = struct.Struct(">Q")
_KILL_WAIT_S = 10.0


class DecoderDied(Exception):
    """The child process died or was killed while working on a file."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # the child imports what its parent can (a Dask worker's sys.path may come from its spawner, not PYTHONPATH)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    # one decode at a time: thread pools would only reserve address space under the memory cap
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


class DecoderProcess:
    """One decoder child, started on first use and again after it died or was killed.

    The child runs named functions (``"module:function"``), so that this module depends on no decoder: the
    ingest core passes its own.

    Args:
        cfg: ``IngestConfig.model_dump()``: its ``checks`` give the timeout and the memory cap, and it is passed
            to ``setup`` and ``handler``.
        handler: ``handler(request, cfg)`` answers one request in the child.
        setup: ``setup(cfg)`` runs once in the child before the memory cap is set (imports, plugins).
    """

    def __init__(self, cfg: dict[str, Any], handler: str = "pretrain.ingest:handle_file",
                 setup: str = "pretrain.ingest:setup_decoder"):
        self.cfg = cfg
        self.handler = handler
        self.setup = setup
        self.timeout_s = float(cfg["checks"]["decode_timeout_s"])
        self.proc: subprocess.Popen[bytes] | None = None
        self._answers: BinaryIO | None = None
        self.started = 0

    def __enter__(self) -> DecoderProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        r, w = os.pipe()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "pretrain.decoder", str(w)], stdin=subprocess.PIPE,
                                         stdout=sys.stderr.fileno() if _has_fileno(sys.stderr) else None,
                                         pass_fds=(w,), env=_child_env(), close_fds=True,
                                         # Its own session: a terminal's Ctrl-C is the driver's to handle, not a
                                         # traceback from a decoder importing; it dies with its worker anyway.
                                         start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._answers = os.fdopen(r, "rb", buffering=0)
        self.started += 1
        self._send({"cfg": self.cfg, "handler": self.handler, "setup": self.setup})
        status = self._receive(self.timeout_s + 60.0)  # start-up: imports and plugins
        if status != "ready":
            raise RuntimeError(f"decoder process failed to start: {status}")

    def call(self, request: Any, what: str = "decoding") -> Any:
        """Send one request and return the child's answer.

        Args:
            request: What the handler gets.
            what: What the child does with it, for the ``timeout`` reason ("decoding", "reading").

        Raises:
            DecoderDied: ``timeout`` (killed after ``checks.decode_timeout_s``) or ``crashed`` (the child died);
                the next call starts a fresh child.
        """
        if self.proc is not None and self.proc.poll() is not None:
            self._reset()  # died between files (killed from outside): not this file's doing
        if self.proc is None:
            self._start()
        try:
            self._send(request)
        except OSError:
            raise self._died("before it was handed the file") from None
        return self._receive(self.timeout_s, what)

    def _send(self, obj: Any) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        self.proc.stdin.write(_HEADER.pack(len(data)) + data)
        self.proc.stdin.flush()

    def _receive(self, timeout_s: float, what: str = "starting up") -> Any:
        deadline = time.monotonic() + timeout_s
        header = self._read_exact(_HEADER.size, deadline, what)
        (n,) = _HEADER.unpack(header)
        return pickle.loads(self._read_exact(n, deadline, what))

    def _read_exact(self, n: int, deadline: float, what: str) -> bytes:
        assert self._answers is not None
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            ready = select.select([self._answers], [], [], max(0.0, left))[0] if left > 0 else []
            if not ready:
                self._kill()
                raise DecoderDied("timeout", f"{what} took longer than checks.decode_timeout_s="
                                  f"{self.timeout_s:g} s; the decoder was killed")
            chunk = self._answers.read(min(n - len(buf), 1 << 20))
            if not chunk:
                raise self._died(f"while {what}")
            buf += chunk
        return bytes(buf)

    def _died(self, when: str) -> DecoderDied:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = self.proc.returncode if self.proc is not None else None
        self._reset()
        how = (f"was killed by {_signal_name(rc)}" if rc is not None and rc < 0
               else f"exited with code {rc}")
        hint = " (out of memory?)" if rc == -signal.SIGKILL else ""
        return DecoderDied("crashed", f"the decoder process {how}{hint} {when}")

    def _kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            # stuck in the kernel (a dead NFS server): left behind
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=_KILL_WAIT_S)
        self._reset()

    def _reset(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if self._answers is not None:
            self._answers.close()
        self.proc, self._answers = None, None

    def close(self) -> None:
        """Stop the child (it exits when its stdin closes; killed if it does not)."""
        if self.proc is None:
            return
        proc = self.proc
        self._reset()
        try:
            proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=_KILL_WAIT_S)


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------------------------------------ the child


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when its parent (the Dask worker) dies, so that no orphaned
    decoder hangs on forever."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _address_space() -> int | None:
    """Bytes of virtual address space this process holds now (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _cap_memory(mb: int | None) -> None:
    """Cap the address space at what the child holds after start-up plus ``mb`` MiB."""
    if mb is None:
        return
    import resource

    held = _address_space()
    if held is None:
        return
    limit = held + mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _read_message(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (n,) = _HEADER.unpack(header)
    return pickle.loads(stream.read(n))


def _write_message(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _named(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def main(fd: int) -> None:
    """The child: read its start message, run the setup, cap memory, then answer one request per file until EOF."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's to handle
    stdin = sys.stdin.buffer
    start = _read_message(stdin)
    if start is None:
        return
    cfg = start["cfg"]
    try:
        handler = _named(start["handler"])
        _named(start["setup"])(cfg)
    except Exception as e:  # reported by the parent as a failed start (a config error)
        _write_message(fd, f"set-up failed: {type(e).__name__}: {e}")
        return
    _cap_memory(cfg["checks"]["decode_memory_mb"])
    _write_message(fd, "ready")
    while (request := _read_message(stdin)) is not None:
        _write_message(fd, handler(request, cfg))


if __name__ == "__main__":
    main(int(sys.argv[1]))
