"""The ``slurm`` cluster backend against a real single-node SLURM (started by ``.ci/services.sh``).

dask-jobqueue submits worker jobs with sbatch; one test cancels one of them with ``scancel`` mid-render and
checks that the dataset still ends up complete, every frame once, every checksum right. The others give the
driver worker jobs that can never give it a worker: jobs sbatch refuses (a partition that does not exist, more
memory than the node has, an unknown feature), and jobs SLURM accepts that end before their worker connects (a
failing ``job_script_prologue``); on fixed-size and adaptive clusters the driver stops within seconds with one
line and exit 2, instead of waiting for ever or for ``cluster.no_workers_timeout_s``. A worker job held in the
queue (pending) is waited for with a note naming squeue's reason, on a fixed-size cluster past
``cluster.no_workers_timeout_s`` too, and the run finishes once it is released.
Without a running SLURM these tests fail (they never skip): run ``bash .ci/services.sh`` as root first (``make
test`` does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
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


def our_jobs(name: str = JOB_NAME) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True,
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


def slurm_render_config(tmp_path: Path, *, scenes: int, scenes_per_shard: int, retries: int = 0,
                        slurm: dict, **cluster: object) -> Path:
    """Write ``tmp_path/slurm.yaml``: a render of tiny ``cells`` scenes (48 px, one view) on one-core SLURM worker
    jobs (``cluster.slurm`` = 1 GiB, 5 min walltime, logs in ``tmp_path/slurm-logs``, updated by ``slurm``;
    ``cluster`` = other ``cluster`` settings)."""
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(yaml.safe_dump({
        "scene": {"family": "cells"},
        "render": {"resolution": 48, "views": 1, "samples": 2, "denoise": False, "threads": 1},
        "dataset": {"scenes": scenes, "scenes_per_shard": scenes_per_shard},
        "execution": {"timeout_s": 120, "retries": retries},
        "cluster": {"backend": "slurm", "dashboard": False, **cluster, "slurm": {
            "cores": 1, "memory": "1GiB", "walltime": "00:05:00", "scheduler_host": "127.0.0.1",
            "log_directory": str(tmp_path / "slurm-logs"), **slurm,
        }},
    }))
    return cfg


def start_render(tmp_path: Path, out: Path, scenes: int, retries: int, jobs: int,
                 **cluster: object) -> tuple[subprocess.Popen, Path]:
    """Start ``segfactory render`` of tiny ``cells`` shards (4 scenes each) on ``jobs`` SLURM worker jobs, in its
    own session, its output in the returned log."""
    cfg = slurm_render_config(tmp_path, scenes=scenes, scenes_per_shard=4, retries=retries, slurm={
        "memory": "2GiB", "walltime": "00:15:00", "minimum_jobs": jobs, "maximum_jobs": jobs, "job_name": JOB_NAME,
    }, **cluster)
    log = tmp_path / "driver.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "render", str(cfg), "--out", str(out)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    return driver, log


def test_slurm_backend_survives_scancel_mid_render(slurm: None, tmp_path: Path):
    out = tmp_path / "slurm-ds"
    driver, log = start_render(tmp_path, out, scenes=12, retries=2, jobs=2)
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


PENDING_JOB = "segfactory-test-pending"


@contextlib.contextmanager
def held_render(tmp_path: Path, scaling: dict, **cluster: object) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """Run ``segfactory render`` of 2 ``cells`` scenes whose SLURM worker job is held in the queue (``sbatch
    --hold``, squeue's reason ``JobHeldUser``) until the test releases it; the pending note after 1 s. Yields the
    driver, its output directory and its log; on the way out kills a driver still running and cancels the job."""
    cfg = slurm_render_config(tmp_path, scenes=2, scenes_per_shard=2, slurm={
        **scaling, "job_name": PENDING_JOB, "job_extra_directives": ["--hold"], "pending_note_s": 1,
    }, **cluster)
    out, log = tmp_path / "ds", tmp_path / "driver.log"
    with open(log, "wb") as f:
        driver = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "render", str(cfg), "--out", str(out)],
                                  stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                                  env={**os.environ, "COLUMNS": "400"})
    try:
        yield driver, out, log
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                driver.kill()
            driver.wait(timeout=30)
        for job in our_jobs(PENDING_JOB):
            subprocess.run(["scancel", job], timeout=30)


def test_worker_jobs_pending_in_the_queue_are_noted_and_the_run_starts_when_slurm_starts_them(slurm: None,
                                                                                             tmp_path: Path):
    """An adaptive cluster whose worker job pends (held: ``sbatch --hold``, squeue's reason ``JobHeldUser``; a busy
    queue says ``Resources`` or ``Priority`` the same way) waits without error, and says so after
    ``pending_note_s`` with squeue's reason and the job's id; once SLURM starts the job the run finishes."""
    with held_render(tmp_path, {"minimum_jobs": 0, "maximum_jobs": 1}) as (driver, out, log):
        wait_until(lambda: "pending for" in log.read_text(), 90, "the note that the worker job pends", driver,
                   log.read_text)
        jobs = our_jobs(PENDING_JOB)
        assert len(jobs) == 1, jobs
        note = next(line for line in log.read_text().splitlines() if "pending for" in line)
        assert note.startswith("note: 1 SLURM worker job(s) pending for "), note
        assert note.endswith(f" s (squeue reason: JobHeldUser; jobs {jobs[0]}); the run starts when SLURM starts "
                             f"them (squeue -j {jobs[0]})"), note
        t0 = time.monotonic()
        subprocess.run(["scontrol", "release", jobs[0]], check=True, timeout=30)
        assert driver.wait(timeout=180) == 0, log.read_text()
        released_s = time.monotonic() - t0
    text = log.read_text()
    assert text.count("pending for") == 1, text  # once: again only after 5 minutes
    assert "error" not in text.lower() and "Traceback" not in text, text
    verify_complete(out, 2)
    print(f"released -> finished in {released_s:.1f} s")


def test_a_worker_job_cancelled_in_the_queue_stops_the_run_saying_so(slurm: None, tmp_path: Path):
    """A worker job cancelled before it ran (``scancel`` while held in the queue) ends the run with one line that
    names squeue's state, not a pointer to a job log that does not exist."""
    with held_render(tmp_path, {"minimum_jobs": 0, "maximum_jobs": 1}) as (driver, _, log):
        wait_until(lambda: "pending for" in log.read_text(), 90, "the note that the worker job pends", driver,
                   log.read_text)
        jobs = our_jobs(PENDING_JOB)
        assert len(jobs) == 1, jobs
        subprocess.run(["scancel", jobs[0]], check=True, timeout=30)
        assert driver.wait(timeout=60) == 2, log.read_text()
    text = log.read_text()
    error = next(line for line in text.splitlines() if line.startswith("error:"))
    assert error == (f"error: the SLURM worker job(s) {jobs[0]} ended before their Dask worker connected to the "
                     "scheduler (squeue: CANCELLED): SLURM did not run them to the end"), text
    assert "fix: cancelled: cancelled (scancel, by you or an administrator)" in text and "job's log" not in text
    assert "Traceback" not in text


QUEUED_TIMEOUT_S = 10  # cluster.no_workers_timeout_s of the next test: the worker's start after its release fits


def test_a_fixed_size_cluster_waits_for_its_queued_job_past_no_workers_timeout_s(slurm: None, tmp_path: Path):
    """A fixed-size cluster (min = max = 1 job) whose only worker job pends longer than ``connect_timeout_s`` and
    ``no_workers_timeout_s`` waits for it (nothing was lost; the pending note says why) instead of failing its units
    as lost workers (before: exit 3, ``NoWorkersLeft``, ~12 s in); released, the run finishes."""
    with held_render(tmp_path, FIXED, connect_timeout_s=2, no_workers_timeout_s=QUEUED_TIMEOUT_S) as (driver, out,
                                                                                                    log):
        wait_until(lambda: "pending for" in log.read_text(), 90, "the note that the worker job pends", driver,
                   log.read_text)
        time.sleep(QUEUED_TIMEOUT_S + 5)  # past the timeout, counted from the note: it no longer counts
        assert driver.poll() is None, log.read_text()
        jobs = our_jobs(PENDING_JOB)
        assert len(jobs) == 1, jobs
        subprocess.run(["scontrol", "release", jobs[0]], check=True, timeout=30)
        assert driver.wait(timeout=180) == 0, log.read_text()
    text = log.read_text()
    assert "NoWorkersLeft" not in text and "error" not in text.lower() and "Traceback" not in text, text
    verify_complete(out, 2)


# Worker jobs that can never give the driver a worker; fixed: the config keeps a job (min = max = 1), adaptive: it
# scales from 0 jobs when the tasks come (only there did the driver wait for ever; fixed-size ones waited for
# connect_timeout_s + no_workers_timeout_s, 330 s by default, then failed every unit as lost workers with exit 3).
FIXED = {"minimum_jobs": 1, "maximum_jobs": 1}
ADAPTIVE = {"minimum_jobs": 0, "maximum_jobs": 2}
DOOMED_JOB = "segfactory-test-doomed"
FAIL_FAST_S = 60  # the fix stops in ~2-12 s on 2 cores; the driver it fixes ran far past this


def render_doomed(tmp_path: Path, slurm_settings: dict) -> tuple[subprocess.CompletedProcess, float]:
    """``segfactory render`` on SLURM with these ``cluster.slurm`` settings: its exit, output and seconds."""
    cfg = slurm_render_config(tmp_path, scenes=2, scenes_per_shard=1,
                              slurm={"job_name": DOOMED_JOB, **slurm_settings})
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "segfactory.cli", "render", str(cfg), "--out",
                               str(tmp_path / "ds")], cwd=REPO, capture_output=True, text=True,
                              timeout=FAIL_FAST_S + 60, env={**os.environ, "COLUMNS": "400"})
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        pytest.fail(f"the driver was still waiting after {FAIL_FAST_S + 60} s:\n{out[-3000:]}")
    finally:
        for job in our_jobs(DOOMED_JOB):
            subprocess.run(["scancel", job], timeout=30)
    return proc, time.monotonic() - t0


@pytest.mark.slow  # ~1-2 min: a render whose only SLURM job is cancelled after its worker connected
def test_the_only_job_cancelled_after_its_worker_connected_is_lost_workers_not_a_config_error(slurm: None,
                                                                                           tmp_path: Path):
    # A job whose worker connected and then ended (its walltime ran out, an operator's scancel) is a lost worker:
    # exit 3 after cluster.no_workers_timeout_s ("a re-run retries it"), never the exit-2 "ended before their Dask
    # worker connected" of a job that could not start a worker at all.
    driver, log = start_render(tmp_path, tmp_path / "slurm-ds", scenes=8, retries=0, jobs=1,
                               no_workers_timeout_s=20)
    try:
        found: dict = {}
        wait_until(lambda: bool(found.update(r=render_in_job()) or found["r"]), 180,
                   "a render inside the SLURM job", driver, log.read_text)
        time.sleep(6)  # past the driver's next look at its jobs (every 5 s): it has seen the worker connected
        subprocess.run(["scancel", found["r"][0]], check=True, timeout=30)
        code = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                driver.kill()
            driver.wait(timeout=30)
        for job in our_jobs():
            subprocess.run(["scancel", job], timeout=30)
    text = log.read_text()
    assert "ended before their Dask worker connected" not in text, text
    assert code in (0, 3), text  # finished on a new job, or the shards left are listed as lost (a re-run retries)


@pytest.mark.parametrize(("scaling", "settings", "named", "sbatch_said"), [
    (FIXED, {"queue": "nosuchpartition"}, "cluster.slurm.queue='nosuchpartition'",
     "invalid partition specified: nosuchpartition"),
    (ADAPTIVE, {"queue": "nosuchpartition"}, "cluster.slurm.queue='nosuchpartition'",
     "invalid partition specified: nosuchpartition"),
    (FIXED, {"memory": "4TiB"}, "cluster.slurm.memory='4TiB', cluster.slurm.cores=1",
     "Requested node configuration is not available"),
    (ADAPTIVE, {"job_extra_directives": ["--constraint=nosuchfeature"]},
     "cluster.slurm.job_extra_directives=['--constraint=nosuchfeature']", "Invalid feature specification"),
], ids=["queue-fixed", "queue-adaptive", "memory-fixed", "directive-adaptive"])
def test_a_worker_job_sbatch_refuses_is_one_line_naming_the_setting(slurm: None, tmp_path: Path, scaling: dict,
                                                                    settings: dict, named: str, sbatch_said: str):
    proc, seconds = render_doomed(tmp_path, {**scaling, **settings})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert seconds < FAIL_FAST_S, out[-3000:]
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert f"sbatch refused the SLURM worker job ({named})" in error and sbatch_said in error
    assert "fix:" in out and "Traceback" not in out and "RuntimeError" not in out
    assert not our_jobs(DOOMED_JOB)


@pytest.mark.parametrize("scaling", [FIXED, ADAPTIVE], ids=["fixed", "adaptive"])
def test_a_worker_job_that_ends_before_its_worker_connects_stops_the_run(slurm: None, tmp_path: Path,
                                                                         scaling: dict):
    """SLURM accepts the job, but its prologue fails before the Dask worker starts."""
    prologue = ["echo segfactory-test prologue failed >&2", "exit 1"]
    proc, seconds = render_doomed(tmp_path, {**scaling, "job_script_prologue": prologue})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert seconds < FAIL_FAST_S, out[-3000:]
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert "ended before their Dask worker connected" in error
    assert str(tmp_path / "slurm-logs" / DOOMED_JOB) in error and "prologue failed" in error  # the job's own log
    assert "cluster.slurm.job_script_prologue" in out and "Traceback" not in out
