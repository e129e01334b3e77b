"""A training stage's process never outlives its Dask worker for long, and never trains beside a retry.

Reproduced for real: a stage started by a ``dask worker`` process on a loopback cluster, the worker SIGKILLed
mid-training; and a parent that holds the stage lock SIGKILLed under a child whose step hangs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch
from conftest import CONFIGS, REPO
from loopback import LoopbackCluster, kill_tree

from segfactory.errors import ORPHAN_GRACE_ENV

TINY = CONFIGS / "finetune_tiny.yaml"


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited (rc={proc.returncode}) before {what}: "
                                 f"{log.read_text(errors='replace') if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text(errors='replace') if log else ''}")
        time.sleep(0.05)


# A parent (standing in for the Dask worker's task) that takes the stage lock and starts, through
# pipelines.subproc.run_logged with the lock handed down, a child whose "training step" hangs: it ignores SIGTERM,
# forks a grandchild that leads a session of its own (as torchrun's ranks do, out of reach of a group kill) and
# sleeps. The child ties itself to its parent the way a stage
# process does (SIGTERM on the parent's death, the orphan watchdog).
PARENT = '''
import fcntl, os, sys
from pipelines.subproc import run_logged

lock = sys.argv[1]
fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
child = ("import os, pathlib, signal, sys, time\\n"
         "from segfactory.cli import terminate_with_parent\\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
         "terminate_with_parent()\\n"
         "if os.fork() == 0:\\n"
         "    os.setsid()\\n"
         "    time.sleep(600)\\n"
         "    os._exit(0)\\n"
         "pathlib.Path(sys.argv[1]).write_text('ready')\\n"
         "time.sleep(600)\\n")
run_logged([sys.executable, "-c", child, sys.argv[3]], 600, sys.argv[2], pass_fds=(fd,))
'''


def test_hung_orphan_is_killed_with_its_group_and_holds_the_stage_lock_until_then(tmp_path: Path) -> None:
    lock, log, ready = tmp_path / ".stage.lock", tmp_path / "stage.log", tmp_path / "ready"
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(lock), str(log), str(ready)], cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO), ORPHAN_GRACE_ENV: "2",
                                   "SEGFACTORY_STAGE_LOG": str(log)}, start_new_session=True)
    group: list[psutil.Process] = []
    try:
        wait_until(ready.is_file, 60, "the child to start", parent)
        [child] = psutil.Process(parent.pid).children()
        group = [child, *child.children(recursive=True)]
        assert len(group) == 2  # the child and its forked grandchild
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        killed_at = time.monotonic()

        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the orphan still holds the stage lock: no retry can start
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            while True:  # free once the whole group is gone
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() - killed_at < 20, "the orphan lives on past its grace period"
                    time.sleep(0.05)
            waited = time.monotonic() - killed_at
        finally:
            os.close(fd)
        _, alive = psutil.wait_procs(group, timeout=5)  # the lock went with their files: they are exiting
        assert not alive
        assert 1.5 <= waited < 20, waited  # the grace period (2 s), not for ever
        assert "outlived its worker" in log.read_text()
    finally:
        if parent.poll() is None:
            kill_tree(parent)
        for p in group:  # orphans are no children of ours any more
            with contextlib.suppress(psutil.Error):
                p.kill()


DRIVER = '''
import sys
from pathlib import Path

from pipelines.cluster import ClusterConfig
from pipelines.stages import run_stage_tasks


root, dataset, config, address = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
argv = ["finetune", config, "--synthetic", dataset, "--steps", "40", "train.log_every=1",
        "train.val_every=100000", "train.checkpoint_every=100000", "--out", "{OUT}"]
result = run_stage_tasks(ClusterConfig(backend="address", address=address, dashboard=False), 600, 1,
                         {"finetune": (root / "stages" / "finetune-x", argv)}, root / "report.html")
print("driver result", result, flush=True)
'''


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LoopbackCluster]:
    c = LoopbackCluster(tmp_path / "dask", n_workers=2)
    try:
        yield c
    finally:
        c.close()


def _stage_processes(cluster: LoopbackCluster) -> list[tuple[subprocess.Popen, psutil.Process]]:
    out = []
    for w in cluster.workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            for k in psutil.Process(w.pid).children():
                with contextlib.suppress(psutil.Error):
                    if "segfactory.cli" in k.cmdline() and "finetune" in k.cmdline():
                        out.append((w, k))
    return out


@pytest.mark.slow
def test_sigkilled_worker_leaves_no_training_process_and_the_retry_resumes(cluster: LoopbackCluster,
                                                                           tiny_dataset: Path,
                                                                           tmp_path: Path) -> None:
    """SIGKILL the worker running a fine-tune stage: its training process stops within seconds (a checkpoint at
    the step it was in), the task's retry on the other worker waits for it, resumes from that checkpoint and
    commits the stage; the two never train at the same time."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = tmp_path / "driver.log"
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    driver = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(tiny_dataset), str(TINY),
                               cluster.address], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    final = tmp_path / "stages" / "finetune-x"
    stage_log = final.parent / "finetune-x.log"

    def logged_steps() -> int:
        return max((len(m.read_text().splitlines()) for m in final.parent.glob(".*finetune-x-*/metrics.jsonl")),
                   default=0)

    try:
        wait_until(lambda: logged_steps() >= 3, 240, "3 logged steps", driver, log)
        [(worker, child)] = _stage_processes(cluster)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        killed_at = time.monotonic()
        child.wait(timeout=30)  # gone, not training on beside the retry
        gone_after = time.monotonic() - killed_at
        assert driver.wait(timeout=300) == 0, log.read_text(errors="replace")
    finally:
        if driver.poll() is None:
            kill_tree(driver)
    text = stage_log.read_text(errors="replace")
    # The orphan stopped on its SIGTERM at a step boundary with a checkpoint, then the retry resumed from it.
    first_stop = text.index("interrupted by SIGTERM")
    resumed = text.index("resuming finetune-x from an earlier attempt's checkpoint.pt")
    assert first_stop < resumed, text[-3000:]
    assert "outlived its worker" not in text  # it stopped by itself, well within the grace period
    assert gone_after < 30
    assert (final / "stage.json").is_file()
    assert torch.load(final / "checkpoint.pt", weights_only=False, map_location="cpu")["step"] == 40
    assert not list(final.parent.glob(".tmp-finetune-x-*"))
    assert not any(c.is_running() for _, c in _stage_processes(cluster))


def test_only_the_stage_process_itself_watches_its_parent(tmp_path: Path) -> None:
    """The parent pid is handed to the stage process only: what it starts (torchrun's ranks, whose parent is
    torchrun) must not take that pid for theirs and kill their group as orphans."""
    code = ("import os, subprocess, sys\n"
            "from segfactory.errors import PARENT_PID_ENV, kill_group_when_orphaned\n"
            "assert kill_group_when_orphaned(60) is not None\n"
            "sub = 'from segfactory.errors import kill_group_when_orphaned as k; print(k(60) is None)'\n"
            "print(subprocess.run([sys.executable, '-c', sub], capture_output=True, text=True).stdout.strip())\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO), "SEGFACTORY_PARENT_PID": str(os.getpid())})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
