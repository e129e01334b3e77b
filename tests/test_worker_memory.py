"""Render workers hand the memory a scene freed back to the OS between scenes (no Blender needed)."""

from __future__ import annotations

import psutil
import pytest

from synth.worker import release_freed_memory


def test_release_freed_memory_returns_freed_heap_pages_to_the_os():
    proc = psutil.Process()

    def rss_mb() -> float:
        return proc.memory_info().rss / 2**20

    # ~120 MB in malloc'd blocks (above CPython's 512-byte small-object limit), as a scene's many small data blocks,
    # then a few more that keep the heap's top in use: free() alone cannot give the pages back.
    chunks = [bytes(2000) for _ in range(60_000)]
    pin = [bytes(2000) for _ in range(10)]
    held = rss_mb()
    del chunks
    freed = rss_mb()
    if held - freed > 30:
        pytest.skip("free() alone returned the memory here: nothing for the trim to show")
    if not release_freed_memory():
        pytest.skip("this C library has no malloc_trim")
    trimmed = rss_mb()
    assert freed - trimmed > 60, (held, freed, trimmed)
    assert len(pin) == 10
