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

# `make test` runs two pytest-xdist workers on the 2 cores, and each may start training stages with a thread per
# core. libgomp's threads spin while they wait for each other, and against another busy process that made a resnet18
# step 1.6-2x slower (0.78-1.19 s against 0.51-0.56 s with passive waiting, 2 threads each, 2026-12-07). Set before
# torch loads; every process the tests start (Dask workers, stage processes, SLURM jobs) inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
# The rendered tiny cells dataset (rendered_cells_dataset and the renders compared with it): 8-bit without the
# camera offset of configs/cells.yaml (the fine-tune configs scale inputs by their dtype) and a coarse pixel size,
# so a 64 px frame holds many small nuclei (8 to 20 per 100 x 100 um), not a part of one.
CELLS_TINY = ("output.bit_depth=8", "scene.randomization.post.camera_bits=0",
              "scene.randomization.post.camera_offset=[0, 0]", "scene.params.pixel_size=[1.2, 1.6]",
              "scene.params.density=[8, 20]")


# `segfactory run` at tiny sizes (tests/test_pipelines_run.py): a few 48 px frames rendered with 2 samples, a few
# training steps, 2 held-out frames.
RUN_TINY = ["render.render.resolution=48", "render.render.views=1", "render.render.samples=2",
            "render.dataset.scenes=4", "render.dataset.scenes_per_shard=2", "pretrain.train.steps=10",
            "pretrain.train.batch_size=8", "finetune.train.steps=20", "finetune.train.val_every=10",
            "finetune.train.checkpoint_every=10", "finetune.data.val_max_items=2", "execution.predict_images=2",
            "test.scenes=2"]
# The microscopy quickstart (configs/quickstart.yaml) on top of RUN_TINY: 128 px frames hold whole nuclei (input.scale
# auto), self-training from step 10, the real HeLa frames scored.
MICROSCOPY_TINY = ["render.render.resolution=128", "finetune.adapt.warmup_steps=10", "eval.real=[sample:ctc-hela/eval]",
                   "eval.overlays=1"]


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
def tiny_model(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model dir fine-tuned for 2 steps on ``tiny_dataset`` (``configs/finetune_tiny.yaml``); read-only."""
    from segfactory.cli import main

    out = tmp_path_factory.mktemp("model") / "run"
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--out", str(out), "--synthetic",
                 str(tiny_dataset), "--steps", "2", "train.val_every=1000"]) == 0
    return out / "model"


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


@pytest.fixture(scope="session")
def microscopy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """``segfactory run configs/quickstart.yaml`` (RUN_TINY + MICROSCOPY_TINY) for real, once per session: the run
    directory and its summary (``run.json``, what the command prints). The sample sets are materialized into a data
    folder of its own (``SEGFACTORY_DATA``: the run's parent's ``data``), which a test that runs on from the run's
    stages sets too (another folder would be new real images to ingest).

    Its tests share tests/test_microscopy_run.py (one worker under --dist loadfile): one checks the run; the
    bench transfer test, whose config renders, ingests and pretrains exactly what this run does (the same stage
    keys), starts from a copy of those stages instead of rendering and pretraining them again. Tests must not write
    into the run: copy it."""
    import json

    from segfactory.cli import main

    root = tmp_path_factory.mktemp("microscopy")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGFACTORY_DATA", str(root / "data"))
        mp.delenv("SEGFACTORY_FAULT", raising=False)
        assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), *RUN_TINY, *MICROSCOPY_TINY]) == 0
    return out, json.loads((out / "run.json").read_text())


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


RENDERED_FIXTURES = {"rendered_cells_dataset", "rendered_street_dataset", "microscopy_run"}


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
