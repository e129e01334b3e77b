"""The ``slurm`` cluster backend against a real single-node SLURM (started by ``.ci/services.sh``).

dask-jobqueue submits worker jobs with sbatch; the test cancels one of them with ``scancel`` mid-render and
checks that the dataset still ends up complete, every frame once, every checksum right. Without a running
SLURM these tests fail (they never skip): run ``bash .ci/services.sh`` as root first (``make test`` does).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO
from test_pipelines_faults import verify_complete, wait_until

pytestmark = [pytest.mark.render, pytest.mark.slurm]

JOB_NAME = "segfactory-test-worker"


@pytest.fixture(scope="module")
def slurm() -> None:
    """Fail (not skip) with the fix when no SLURM controller answers."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.fail("SLURM is not installed: run `bash .ci/services.sh` as root before pytest (make test does)")
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0 or not any(s in out.stdout for s in ("idle", "mixed", "allocated")):
        pytest.fail(f"SLURM is not running or its node is down ({out.stdout.strip()} {out.stderr.strip()}): "
                    "run `bash .ci/services.sh` as root before pytest")


def our_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", JOB_NAME, "-o", "%i %T"], capture_output=True, text=True,
                         timeout=30, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.split()[1] in ("RUNNING", "PENDING")]


def render_in_job() -> tuple[str, psutil.Process] | None:
    """A ``synth.worker`` render process started by one of our SLURM worker jobs, and that job's id."""
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if "synth.worker" in (p.info["cmdline"] or []) and "slurm-ds" in " ".join(p.info["cmdline"]):
                job = p.environ().get("SLURM_JOB_ID")
                if job:
                    return job, p
    return None


def test_slurm_backend_survives_scancel_mid_render(slurm: None, tmp_path: Path):
    out = tmp_path / "slurm-ds"
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(yaml.safe_dump({
        "scene": {"family": "cells"},
        "render": {"resolution": 48, "views": 1, "samples": 2, "denoise": False, "threads": 1},
        "dataset": {"scenes": 12, "scenes_per_shard": 4},
        "execution": {"timeout_s": 120, "retries": 2},
        "cluster": {"backend": "slurm", "dashboard": False, "slurm": {
            "cores": 1, "memory": "2GiB", "walltime": "00:15:00", "minimum_jobs": 2, "maximum_jobs": 2,
            "scheduler_host": "127.0.0.1", "log_directory": str(tmp_path / "slurm-logs"), "job_name": JOB_NAME,
        }},
    }))
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "render", str(cfg), "--out", str(out)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    state: dict = {}

    def job_mid_shard() -> bool:
        found = render_in_job()
        if found is None:
            return False
        job, proc = found
        sid = Path(next(a for a in proc.cmdline() if a.endswith(".job.json"))).name.removesuffix(".job.json")
        if list((out / "shards").glob(f".tmp-{sid}-*/rgb/*.png")):
            state.update(job=job, sid=sid, render=proc)
            return True
        return False

    try:
        wait_until(job_mid_shard, 180, "a render inside a SLURM job with a frame written", driver, log.read_text)
        subprocess.run(["scancel", state["job"]], check=True, timeout=30)
        assert not (out / "shards" / state["sid"] / "manifest.json").exists()
        assert driver.wait(timeout=300) == 0, log.read_text()
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                driver.kill()
            driver.wait(timeout=30)
        for job in our_jobs():
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert "via SLURM jobs (adaptive)" in text
    with contextlib.suppress(psutil.NoSuchProcess):
        state["render"].wait(timeout=30)
    assert not state["render"].is_running()  # scancel took the job's Blender down too
    verify_complete(out, 12)
    # The driver cancels its worker jobs when it is done.
    deadline = time.monotonic() + 30
    while our_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not our_jobs()
