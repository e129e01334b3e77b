"""Dask infrastructure faults through the real CLI, each in its own process: a scheduler address that is malformed
or where nothing listens exits 2 with one line; a cluster whose only worker is SIGKILLed mid-run exits 3 and
lists the units still to run (it used to wait for ever)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import faulty_decoders
import psutil
import pytest
import skimage
from conftest import REPO
from loopback import LoopbackCluster, kill_tree
from torchrun_nodes import free_port

from segfactory.errors import EXIT_PARTIAL, EXIT_USER

SK = Path(skimage.__file__).parent / "data"
TESTS = Path(__file__).resolve().parent


def ingest_args(src: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "segfactory.cli", "ingest", str(src), "--out", str(out), "--cluster-address",
            address, "cluster.connect_timeout_s=3", *extra]


def run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(SK / "camera.png", d / "camera.png")
    return d


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:notaport", "foo://127.0.0.1:8786"])
def test_malformed_scheduler_address_is_one_line_exit_2(src: Path, tmp_path: Path, address: str) -> None:
    r = run(ingest_args(src, tmp_path / "out", address))
    assert r.returncode == EXIT_USER, r.stderr
    assert "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    assert f"cluster.address='{address}' is not a Dask scheduler address" in line
    assert "fix: pass --cluster-address tcp://HOST:PORT" in r.stderr


def test_unreachable_scheduler_is_one_line_exit_2(src: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    r = run(ingest_args(src, tmp_path / "out", address))
    assert r.returncode == EXIT_USER, r.stderr
    assert "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    assert f"cannot reach the Dask scheduler at {address}" in line


@pytest.mark.parametrize(("override", "field"), [
    ("cluster.memory_limit=lots", "cluster.memory_limit='lots'"),  # was Dask's ValueError traceback, exit 1
    ("cluster.slurm.memory=16 gigs", "cluster.slurm.memory='16 gigs'"),
    ("cluster.kubernetes.memory=eight", "cluster.kubernetes.memory='eight'"),
])
def test_a_memory_size_dask_cannot_read_is_one_line_exit_2(src: Path, tmp_path: Path, override: str,
                                                          field: str) -> None:
    r = run([sys.executable, "-m", "segfactory.cli", "ingest", str(src), "--out", str(tmp_path / "out"), "--workers",
             "1", "cluster.dashboard=false", override])
    assert r.returncode == EXIT_USER, r.stderr
    assert "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    assert f"{field} is invalid: not a memory size" in line and "fix: give a size with its unit" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing started


GREETER = """
import socket, sys
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
held = []
while True:
    c, _ = s.accept()
    c.sendall(b"SSH-2.0-OpenSSH_9.6\\r\\n")  # greets first, as an SSH server does, then waits for the client
    held.append(c)
"""


@pytest.mark.parametrize("service", ["http", "greeter"])
def test_another_service_at_the_scheduler_address_is_one_line_exit_2(src: Path, tmp_path: Path,
                                                                     service: str) -> None:
    """Another service where the scheduler should be: an HTTP server (the dashboard's port, 8787, given for the
    scheduler's) accepts the connection and never answers Dask's handshake (Dask waited for ever, holding the
    lock); an SSH-like server greets first (Dask failed with a MemoryError traceback, exit 1). Both real
    processes on loopback."""
    if service == "http":
        port = free_port()
        cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    else:
        cmd = [sys.executable, "-c", GREETER]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if service == "greeter":
            port = int(server.stdout.readline())
        deadline = time.monotonic() + 30
        while True:  # listening?
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.1)
        address = f"tcp://127.0.0.1:{port}"
        t0 = time.monotonic()
        r = run(ingest_args(src, tmp_path / "out", address), timeout=60)
        took = time.monotonic() - t0
    finally:
        server.kill()
        server.wait()
    assert r.returncode == EXIT_USER, r.stderr
    assert "Traceback" not in r.stderr
    [line] = error_lines(r.stderr)
    says = ("accepted the connection but did not answer like a Dask scheduler within 6 s" if service == "http"
            else "answered, but not in Dask's protocol")
    assert f"cluster.address='{address}' {says}" in line, r.stderr
    assert "8787 is its dashboard" in r.stderr
    assert took < 40, took  # connect_timeout_s=3: a deadline of 6 s, not for ever


def start_hanging_ingest(tmp_path: Path, *extra: str
                         ) -> tuple[LoopbackCluster, subprocess.Popen[bytes], Path, list[psutil.Process]]:
    """An address cluster of one worker and an ingest driver on it, returned once the worker decodes a file that
    never finishes (a real hanging Pillow plugin, ``faulty_decoders``): cluster, driver, its log and the worker's
    decoder processes. The caller closes the cluster and kills the driver (``kill_tree``) if it still runs."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "camera.png", src / "camera.png")
    (src / "hang.seg").write_bytes(faulty_decoders.make("hang"))
    path = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")])
    cluster = LoopbackCluster(tmp_path / "dask", n_workers=1, env={"PYTHONPATH": path})
    log = tmp_path / "driver.log"
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    driver = subprocess.Popen(ingest_args(src, tmp_path / "out", cluster.address, "decode.plugins=[faulty_decoders]",
                                          "checks.decode_timeout_s=600", *extra),
                              cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "COLUMNS": "200", "PYTHONPATH": path})
    try:
        [worker] = cluster.workers
        deadline = time.monotonic() + 120
        while not (decoders := psutil.Process(worker.pid).children()):  # a decoder process: the shard is running
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    except BaseException:
        kill_tree(driver)
        cluster.close()
        raise
    return cluster, driver, log, decoders


@pytest.mark.slow
def test_only_worker_sigkilled_mid_run_exits_3_listing_what_is_left(tmp_path: Path) -> None:
    """The only worker of an address cluster is SIGKILLed while it decodes a file that never finishes (a real
    hanging Pillow plugin, ``faulty_decoders``): no worker is left, so after ``cluster.no_workers_timeout_s``
    the run ends with exit 3, one error line and the units still to run listed, its decoder gone too."""
    cluster, driver, log, decoders = start_hanging_ingest(tmp_path, "cluster.no_workers_timeout_s=4")
    try:
        [worker] = cluster.workers
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        killed_at = time.monotonic()
        rc = driver.wait(timeout=120)
        took = time.monotonic() - killed_at
    finally:
        if driver.poll() is None:
            kill_tree(driver)
        cluster.close()
    text = log.read_text(errors="replace")
    assert rc == EXIT_PARTIAL, text
    assert "Traceback" not in text
    assert len(error_lines(text)) == 1, text
    assert "NoWorkersLeft: no Dask worker left on the scheduler for 4s" in text
    assert took < 60, took
    _, alive = psutil.wait_procs(decoders, timeout=10)
    assert not alive  # the killed worker's decoder did not live on


@pytest.mark.slow
def test_scheduler_sigkilled_mid_run_exits_3_listing_what_is_left(tmp_path: Path) -> None:
    """The scheduler of an address cluster is SIGKILLed while its worker decodes a file that never finishes:
    the driver lists the units still to run and exits 3 with one error line, no traceback."""
    cluster, driver, log, _ = start_hanging_ingest(tmp_path)
    try:
        scheduler = cluster.procs[0]
        os.killpg(scheduler.pid, signal.SIGKILL)
        scheduler.wait(timeout=10)
        rc = driver.wait(timeout=180)
    finally:
        if driver.poll() is None:
            kill_tree(driver)
        cluster.close()
    text = log.read_text(errors="replace")
    assert rc == EXIT_PARTIAL, text
    assert "Traceback" not in text, text
    assert len(error_lines(text)) == 1, text
    assert "scheduler-connection-lost" in text
