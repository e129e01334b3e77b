"""Process start method for PyTorch DataLoader workers.

A forked worker inherits the parent's locks in whatever state its threads left them: with OpenCV's thread pool,
a Dask client's event loop or torch's intra-op pool already running (any real run, and the test suite), a
forked worker can deadlock on its first OpenCV or torch call. ``forkserver`` forks from a clean single-threaded
server process instead, at a small start-up cost that persistent workers pay once.
"""

from __future__ import annotations


def loader_context(num_workers: int) -> str | None:
    """The ``multiprocessing_context`` for a DataLoader with ``num_workers`` workers."""
    return "forkserver" if num_workers > 0 else None
