"""Fault tolerance on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on loopback,
real Blender renders. A worker SIGKILLed mid-render, a driver killed and re-run, a hung render killed at its
timeout: each leaves a complete dataset with every frame exactly once and every checksum right."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import CONFIGS, REPO, assert_hang_children_gone
from loopback import LoopbackCluster, kill_tree

from segfactory.formats.dataset import open_dataset
from segfactory.io import sha256_file

pytestmark = pytest.mark.render

SMALL = ["--views", "1", "--resolution", "48", "render.samples=2", "render.denoise=false"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(tmp_path / "dask")
    try:
        yield c
    finally:
        c.close()


def start_driver(out: Path, address: str, scenes: int, per_shard: int, *extra: str) -> subprocess.Popen:
    """``segfactory render`` as its own process (so the test can kill it), pointed at the cluster."""
    log = open(out.parent / f"{out.name}-driver.log", "ab")  # noqa: SIM115 - closed with the process
    cmd = [sys.executable, "-m", "segfactory.cli", "render", str(CONFIGS / "cells.yaml"), "--out", str(out),
           "--scenes", str(scenes), "--cluster-address", address, *SMALL, f"dataset.scenes_per_shard={per_shard}",
           *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                            env={**os.environ, "COLUMNS": "200"})


def driver_log(out: Path) -> str:
    return (out.parent / f"{out.name}-driver.log").read_text(errors="replace")


def verify_complete(out: Path, scenes: int) -> None:
    """Every scene is in the dataset exactly once, every file matches its manifest checksum, no temp dirs."""
    ds = open_dataset(out)
    names = []
    for sid in ds.shard_ids:
        m = ds.manifest(sid)
        assert m["num_frames"] == len(m["frames"]) > 0
        assert sha256_file(ds.shard_dir(sid) / "coco.json") == m["coco_sha256"]
        for fr in m["frames"]:
            names.append(fr["name"])
            for entry in fr["files"].values():
                assert sha256_file(ds.shard_dir(sid) / entry["path"]) == entry["sha256"], (sid, entry["path"])
    assert sorted(names) == [f"s{i:06d}_v00" for i in range(scenes)]  # none missing, none twice
    assert ds.meta["num_frames"] == scenes
    assert not list((out / "shards").glob(".tmp-*"))


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited (rc={proc.returncode}) before {what}: {log() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log() if log else ''}")
        time.sleep(0.05)


def shard_of(render: psutil.Process) -> str:
    job = next(a for a in render.cmdline() if a.endswith(".job.json"))
    return Path(job).name.removesuffix(".job.json")


def test_sigkill_worker_mid_render_leaves_complete_dataset(cluster: LoopbackCluster, tmp_path: Path):
    out = tmp_path / "ds"
    driver = start_driver(out, cluster.address, 12, 4, "execution.retries=2")
    state: dict = {}

    def worker_mid_shard() -> bool:
        for w in cluster.workers:
            for r in cluster.renders_of(w):
                sid = shard_of(r)
                if list((out / "shards").glob(f".tmp-{sid}-*/rgb/*.png")):  # a frame of it is written
                    state.update(sid=sid, render=r, worker=w)
                    return True
        return False

    try:
        wait_until(worker_mid_shard, 120, "a render with a written frame on a worker", driver,
                   lambda: driver_log(out))
        os.kill(state["worker"].pid, signal.SIGKILL)
        state["worker"].wait(timeout=10)
        assert not (out / "shards" / state["sid"] / "manifest.json").exists()  # it really died mid-shard
        assert driver.wait(timeout=240) == 0, driver_log(out)
    finally:
        if driver.poll() is None:
            kill_tree(driver)
    # The killed worker's Blender died with it (no orphan still writing), and its shard was redone elsewhere.
    with contextlib.suppress(psutil.NoSuchProcess):
        state["render"].wait(timeout=10)
    assert not state["render"].is_running()
    assert state["sid"] in open_dataset(out).shard_ids
    verify_complete(out, 12)


def test_killed_driver_rerun_renders_only_missing_shards(cluster: LoopbackCluster, tmp_path: Path):
    out = tmp_path / "ds"
    driver = start_driver(out, cluster.address, 12, 2)

    def committed() -> list[str]:
        return sorted(p.parent.name for p in (out / "shards").glob("*/manifest.json")) if out.exists() else []

    wait_until(lambda: len(committed()) >= 2, 180, "two committed shards", driver, lambda: driver_log(out))
    kill_tree(driver)
    # Tasks already running on the workers may still finish; wait until the workers are idle.
    wait_until(lambda: not any(cluster.renders_of(w) for w in cluster.workers), 60, "workers to go idle")
    done = committed()
    assert 2 <= len(done) < 6
    before = {sid: sha256_file(out / "shards" / sid / "manifest.json") for sid in done}

    rerun = start_driver(out, cluster.address, 12, 2)
    assert rerun.wait(timeout=240) == 0, driver_log(out)
    log = driver_log(out)
    assert f"6 shard(s) planned, {len(done)} already done, {6 - len(done)} to render" in log
    assert {sid: sha256_file(out / "shards" / sid / "manifest.json") for sid in done} == before
    # Each shard was rendered by exactly one finished render process over both runs.
    for sid in open_dataset(out).shard_ids:
        assert (out / ".logs" / f"{sid}.log").read_text().count("SEGFACTORY-DONE") == 1, sid
    verify_complete(out, 12)


def test_hung_render_is_killed_at_timeout_and_retried_on_cluster(tmp_path: Path):
    # Fault injection reaches render subprocesses through the workers' environment, set when they start.
    c = LoopbackCluster(tmp_path / "dask", env={"SEGFACTORY_FAULT": "hang-once@0"})
    out = tmp_path / "ds"
    try:
        t0 = time.monotonic()
        driver = start_driver(out, c.address, 2, 1, "execution.timeout_s=15", "execution.retries=1")
        try:
            assert driver.wait(timeout=180) == 0, driver_log(out)
        finally:
            if driver.poll() is None:
                kill_tree(driver)
        assert time.monotonic() - t0 >= 15  # the first attempt of shard 0 really hung until its timeout
        ds = open_dataset(out)
        hung = next(s for s in ds.shard_ids if s.split("-")[1] == "000000")
        assert (out / ".logs" / f"{hung}.hang-once").is_file()
        # Two attempts: the hung one (one frame, then killed) and the retry that finished.
        text = (out / ".logs" / f"{hung}.log").read_text()
        assert len(re.findall(rf"SEGFACTORY-PROGRESS {hung} 1\b", text)) == 2 and text.count("SEGFACTORY-DONE") == 1
        assert not any(c.renders_of(w) for w in c.workers)  # the hung Blender is gone
        assert_hang_children_gone(out)  # and so is everything in its process group
        verify_complete(out, 2)
    finally:
        c.close()
