"""Shared fixtures: a small dataset written from NumPy in the real format (no Blender) for the tests that read
datasets, and small datasets rendered once per test session through the real pipeline for the tests of rendering.

Markers (pyproject.toml): ``render`` (real Blender renders), ``slurm`` (needs the SLURM that .ci/services.sh
starts), ``slow`` (more than ~30 s on 2 cores), ``gpu`` (CUDA, skipped without). ``make test-fast`` runs the
tests that carry none of the first three; a test that uses a rendered fixture must carry ``render``
(checked at collection).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# The rendered tiny cells dataset (rendered_cells_dataset and the renders compared with it): 8-bit without the
# camera offset of configs/cells.yaml (the fine-tune configs scale inputs by their dtype) and a coarse pixel size,
# so a 64 px frame holds many small nuclei (8 to 20 per 100 x 100 um), not a part of one.
CELLS_TINY = ("output.bit_depth=8", "scene.randomization.post.camera_bits=0",
              "scene.randomization.post.camera_offset=[0, 0]", "scene.params.pixel_size=[1.2, 1.6]",
              "scene.params.density=[8, 20]")


def render_cli(*args: str) -> int:
    """Run ``segfactory render ...`` in-process (a real LocalCluster and Blender subprocesses)."""
    from segfactory.cli import main

    return main(["render", *args])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cells-like dataset written from NumPy in the real format (``procedural.write_cells_dataset``, no
    Blender): 8 scenes x 2 views at 64 px in 2 shards (16 gray frames; background, nucleus, debris)."""
    from procedural import write_cells_dataset

    return write_cells_dataset(tmp_path_factory.mktemp("datasets") / "cells", scenes=8, views=2, size=64,
                               scenes_per_shard=4)


@pytest.fixture(scope="session")
def rendered_cells_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real rendered ``cells`` dataset: 8 scenes x 2 views at 64 px in 2 shards (16 frames, 3 classes), 8-bit."""
    out = tmp_path_factory.mktemp("rendered") / "cells"
    rc = render_cli(str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", "8", "--views", "2",
                    "--resolution", "64", "--workers", "2", "dataset.scenes_per_shard=4", *CELLS_TINY)
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def rendered_street_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real rendered ``street`` dataset: 4 scenes x 2 views at 64 px in 2 shards (8 frames, 9 classes)."""
    out = tmp_path_factory.mktemp("rendered") / "street"
    rc = render_cli(str(CONFIGS / "street.yaml"), "--out", str(out), "--scenes", "4", "--views", "2",
                    "--resolution", "64", "--workers", "2", "dataset.scenes_per_shard=2", "render.samples=8")
    assert rc == 0
    return out


def assert_hang_children_gone(root: Path, timeout: float = 10.0) -> None:
    """Every child a hung render started (``SEGFACTORY_FAULT=hang``) died with the render's process group."""
    import time

    pids = [int(p.name.rsplit("-", 1)[1]) for p in (root / ".logs").glob("*.hang-child-*")]
    assert pids, "no hung render recorded a child"

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state not in ("Z", "X")  # a zombie is dead, only not yet reaped

    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids), f"processes of a timed-out render survived: {pids}"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The test machine has 2 cores shared with render processes; with more torch threads than free cores,
    OpenMP spin-waiting made CPU training steps up to ~50x slower, while 1 thread stays steady."""
    import sys

    torch = sys.modules.get("torch")  # only modules that use torch have imported it by now
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGFACTORY_FAULT", raising=False)


RENDERED_FIXTURES = {"rendered_cells_dataset", "rendered_street_dataset"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import importlib.util

    unmarked = [item.nodeid for item in items
                if RENDERED_FIXTURES & set(getattr(item, "fixturenames", ())) and "render" not in item.keywords]
    if unmarked:
        raise pytest.UsageError("tests that use a rendered dataset must be marked render (or use tiny_dataset): "
                                + ", ".join(unmarked))

    has_cuda = False
    if importlib.util.find_spec("torch") is not None:
        import torch

        has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


os.environ.setdefault("MPLBACKEND", "Agg")
