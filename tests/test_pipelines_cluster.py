"""Cluster backends: the generated SLURM job script and Kubernetes DaskCluster spec, config errors, the
GPU-resource fallback and the dashboard link of an existing scheduler, on real Dask objects (real ``dask scheduler``
processes; Kubernetes itself cannot run here: its spec is inspected)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from loopback import DASK, REPO

from pipelines.cluster import (
    ClusterConfig,
    SlurmSettings,
    dashboard_link,
    kubernetes_cluster_spec,
    open_client,
    slurm_cluster_kwargs,
    slurm_refusal,
    task_resources,
    training_resources,
)
from segfactory.config import StrictModel, load_config
from segfactory.errors import UserError


class _Wrapper(StrictModel):
    cluster: ClusterConfig = ClusterConfig()


def test_slurm_job_script_carries_the_knobs():
    from dask_jobqueue import SLURMCluster

    cfg = ClusterConfig.model_validate({"backend": "slurm", "dashboard": False, "slurm": {
        "cores": 4, "memory": "16GiB", "walltime": "02:00:00", "queue": "gpu", "account": "vision",
        "gpus_per_job": 1, "job_extra_directives": ["--qos=low"], "scheduler_host": "127.0.0.1"}})
    cluster = SLURMCluster(**slurm_cluster_kwargs(cfg))
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p gpu", "#SBATCH -A vision", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G",
                 "#SBATCH -t 02:00:00", "#SBATCH --qos=low", "#SBATCH --gres=gpu:1", "#SBATCH -J segfactory-worker"):
        assert line in script, (line, script)
    assert "--resources GPU=1" in script and "--nthreads 4" in script and "tcp://127.0.0.1:" in script


@pytest.mark.parametrize("dashboard", [False, True])
def test_slurm_scheduler_serves_a_dashboard_only_when_asked(dashboard: bool):
    """``cluster.dashboard: false`` used to leave the SLURM cluster's scheduler serving HTTP on port 8787 and the
    run printing a dashboard link that answered 404; now no dashboard, no link, and no fixed port either way."""
    import urllib.error
    import urllib.request

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    cfg = ClusterConfig.model_validate({"backend": "slurm", "dashboard": dashboard,
                                        "slurm": {"scheduler_host": "127.0.0.1"}})
    cluster = SLURMCluster(**slurm_cluster_kwargs(cfg))  # the scheduler only: no job is submitted
    try:
        with Client(cluster) as client:
            link = dashboard_link(client, cfg)
            port = cluster.scheduler.http_server.port
            try:
                code = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/status", timeout=10).status
            except urllib.error.HTTPError as e:
                code = e.code
    finally:
        cluster.close()
    assert port != 8787
    if dashboard:
        assert code == 200 and link is not None and f":{port}/status" in link
    else:
        assert code == 404 and link is None


@pytest.mark.parametrize(("said", "named", "fix"), [
    # sbatch's words on SLURM 23-24 (the SLURM lane submits the first, memory and feature ones for real)
    ("sbatch: error: invalid partition specified: gpux; sbatch: error: Batch job submission failed: Invalid "
     "partition name specified", "cluster.slurm.queue='gpux'", "sinfo -s"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "cluster.slurm.account='nobody', cluster.slurm.queue='gpux'", "sacctmgr"),
    ("sbatch: error: Batch job submission failed: Invalid qos specification",
     "cluster.slurm.job_extra_directives=['--qos=nope']", "QOS"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "cluster.slurm.walltime='99:00:00'", "walltime"),
    ("sbatch: error: Memory specification can not be satisfied; sbatch: error: Batch job submission failed: "
     "Requested node configuration is not available", "cluster.slurm.memory='2GiB', cluster.slurm.cores=1",
     "sinfo -o"),
    ("sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)",
     "(cluster.slurm)", "sbatch --test-only"),
])
def test_sbatch_refusal_names_the_setting_and_the_fix(said: str, named: str, fix: str):
    s = SlurmSettings(queue="gpux", account="nobody", walltime="99:00:00", job_extra_directives=["--qos=nope"])
    e = slurm_refusal(s, said)
    assert e.exit_code == 2 and named in e.message and said in e.message
    assert fix in (e.fix or "")


def test_kubernetes_spec_is_a_daskcluster_with_resources():
    cfg = ClusterConfig.model_validate({"backend": "kubernetes", "kubernetes": {
        "name": "seg", "namespace": "ml", "image": "registry.example/seg:1", "n_workers": 3, "cpu": "4",
        "memory": "16Gi", "gpus": 1, "env": {"SEGFACTORY_FAULT": ""}}})
    spec = kubernetes_cluster_spec(cfg)
    assert spec["apiVersion"].startswith("kubernetes.dask.org/") and spec["kind"] == "DaskCluster"
    assert spec["metadata"] == {"name": "seg", "namespace": "ml"}
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 3
    c = worker["spec"]["containers"][0]
    assert c["image"] == "registry.example/seg:1"
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    args = " ".join(c["args"])
    assert "--resources GPU=1" in args and "--memory-limit 16GiB" in args
    assert {"name": "SEGFACTORY_FAULT", "value": ""} in c["env"]
    sched = spec["spec"]["scheduler"]["spec"]["containers"][0]
    assert sched["image"] == "registry.example/seg:1"
    # No GPU asked: no GPU limit and no GPU resource.
    plain = kubernetes_cluster_spec(ClusterConfig(backend="kubernetes"))
    c = plain["spec"]["worker"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "GPU" not in " ".join(c["args"])


def test_cluster_config_errors_name_field_and_fix(tmp_path):
    with pytest.raises(UserError, match=r"cluster.backend='slurmm'"):
        load_config(_Wrapper, None, ["cluster.backend=slurmm"])
    with pytest.raises(UserError, match=r"minimum_jobs=5 is above maximum_jobs=2"):
        load_config(_Wrapper, None, ["cluster.slurm.minimum_jobs=5", "cluster.slurm.maximum_jobs=2"])
    with pytest.raises(UserError, match=r"did you mean 'cluster.slurm.memory'"):
        load_config(_Wrapper, None, ["cluster.slurm.mem=4GiB"])
    with pytest.raises(UserError, match="cannot reach the Dask scheduler") as e, \
            open_client(ClusterConfig(backend="address", address="tcp://127.0.0.1:9", connect_timeout_s=2)):
        pass
    assert "--cluster-address" in e.value.fix


def test_gpu_tasks_ask_for_gpu_only_when_a_worker_offers_one():
    from distributed import Client, LocalCluster

    cfg = ClusterConfig(tasks={"cpu_resources": {"CPU": 1}})
    assert task_resources(cfg) == {"CPU": 1.0} and task_resources(ClusterConfig()) is None
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as lc, Client(lc) as client:
        assert training_resources(client, ClusterConfig()) is None  # falls back to CPU
        with pytest.raises(UserError, match="no worker offered a GPU") as e:
            training_resources(client, ClusterConfig(tasks={"gpu": "require"}, connect_timeout_s=1))
        assert "--resources GPU=1" in e.value.fix
        # An adaptive SLURM/Kubernetes cluster may have no worker yet: its config says whether they get GPUs.
        assert training_resources(client, ClusterConfig(backend="slurm", slurm={"gpus_per_job": 1})) == {"GPU": 1}
        assert training_resources(client, ClusterConfig(backend="kubernetes", kubernetes={"gpus": 2})) == {"GPU": 1}
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None, resources={"GPU": 1}) as lc, \
            Client(lc) as client:
        assert training_resources(client, ClusterConfig()) == {"GPU": 1}
        assert training_resources(client, ClusterConfig(tasks={"gpu": "never"})) is None
        assert client.submit(lambda: 1, resources={"GPU": 1}).result(timeout=30) == 1


def _sleep_task(s: float) -> float:
    import time

    time.sleep(s)
    return s


def test_scheduling_overhead_measured_from_a_real_task_stream():
    from distributed import Client, LocalCluster, get_task_stream

    from pipelines.bench import overhead_from_stream

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as lc, \
            Client(lc) as client, get_task_stream(client) as ts:
        futs = [client.submit(_sleep_task, 0.2, key=f"render-{i}", pure=False) for i in range(8)]
        client.gather(futs)
    o = overhead_from_stream(list(ts.data))
    assert o["tasks"] == 8 and 1.5 <= o["task_compute_s"] <= 4
    assert 0 <= o["overhead_share"] < 0.2  # loose bound for a shared 2-core CI box; the bench reports the number


def _scheduler(root: Path, host: str, *dashboard: str) -> tuple[subprocess.Popen, str]:
    """A real ``dask scheduler`` process on ``host`` (its own session, killed by the caller) and its address."""
    root.mkdir(parents=True)
    log = open(root / "scheduler.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([*DASK, "--host", host, "--port", "0", *dashboard, "--scheduler-file",
                             str(root / "s.json")], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not (root / "s.json").is_file() or not (root / "s.json").read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"dask scheduler did not start: {(root / 'scheduler.log').read_text()}")
        time.sleep(0.1)
    time.sleep(0.1)
    return proc, json.loads((root / "s.json").read_text())["address"]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize(("host", "dashboard", "link"), [
    ("127.0.0.2", ["--dashboard-address", "127.0.0.2:0"], r"http://127\.0\.0\.2:\d+/status"),
    ("127.0.0.2", ["--no-dashboard"], None),  # it still serves HTTP (health, metrics), on a port it calls dashboard
    # Dask binds the dashboard of an IPv6 scheduler to IPv4 only (it cannot parse an IPv6 dashboard address): the
    # link is well-formed and says that it does not open from here
    pytest.param("[::1]", ["--dashboard-address", ":0"], r"http://\[::1\]:\d+/status \(not reachable from this "
                 r"machine\)", marks=pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")),
])
def test_an_existing_scheduler_is_linked_at_its_own_host(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          host: str, dashboard: list[str], link: str | None) -> None:
    proc, address = _scheduler(tmp_path / "scheduler", host, *dashboard)
    try:
        cfg = ClusterConfig(backend="address", address=address)
        with open_client(cfg) as client:
            found = dashboard_link(client, cfg)
        line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("dask:"))
    finally:
        proc.kill()
        proc.wait(30)
    if link is None:
        assert found is None and "dashboard" not in line, line
        return
    assert found is not None and re.fullmatch(link, found), found
    assert line.endswith(f", dashboard {found}"), line


def test_the_printed_dashboard_link_opens(tmp_path: Path) -> None:
    import urllib.request

    proc, address = _scheduler(tmp_path / "scheduler", "127.0.0.2", "--dashboard-address", "127.0.0.2:0")
    try:
        cfg = ClusterConfig(backend="address", address=address)
        with open_client(cfg) as client:
            link = dashboard_link(client, cfg)
            assert link is not None and link.startswith("http://127.0.0.2:")
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(link, timeout=10) as page:
                assert page.status == 200
    finally:
        proc.kill()
        proc.wait(30)


def test_pending_slurm_jobs_are_noted_after_pending_note_s_and_every_5_minutes(capsys: pytest.CaptureFixture[str]):
    """The note's words and timing, on squeue's states and reasons as ``check_slurm_workers`` gets them (the real
    SLURM lane makes worker jobs pend for real: tests/test_slurm.py)."""
    from pipelines.cluster import _note_pending, _SlurmWatch, pending_note

    assert pending_note(["12", "13"], ["Resources", "Resources"], 62.4) == (
        "2 SLURM worker job(s) pending for 62 s (squeue reason: Resources; jobs 12, 13); the run starts when SLURM "
        "starts them (squeue -j 12,13)")
    # "None": SLURM has not looked at the job yet; several reasons are all named
    assert pending_note(["7"], ["None"], 5) == ("1 SLURM worker job(s) pending for 5 s (jobs 7); the run starts "
                                                "when SLURM starts them (squeue -j 7)")
    assert "(squeue reason: Priority, Resources; jobs 9, 10)" in pending_note(["9", "10"], ["Resources", "Priority"], 1)

    def notes(watch: _SlurmWatch, states: dict[str, tuple[str, str]], times: list[float]) -> list[float]:
        seen = []
        for t in times:
            _note_pending(watch, states, t)
            if "pending for" in capsys.readouterr().err:
                seen.append(t)
        return seen

    pending = {"10": ("PENDING", "Priority"), "9": ("PENDING", "Resources"), "8": ("RUNNING", "None")}
    watch = _SlurmWatch(SlurmSettings(pending_note_s=60), lambda: None)
    assert notes(watch, pending, [100, 105, 159, 160, 165, 300, 459, 460, 465]) == [160, 460]
    _note_pending(watch, pending, 760)
    line = capsys.readouterr().err.strip()
    assert line == ("note: 2 SLURM worker job(s) pending for 660 s (squeue reason: Priority, Resources; jobs 9, 10); "
                    "the run starts when SLURM starts them (squeue -j 9,10)"), line
    # Once none pends (they started, or ended), the wait counts afresh.
    assert notes(watch, {"9": ("RUNNING", "None")}, [800]) == []
    assert notes(watch, pending, [900, 959, 960]) == [960]
    assert notes(_SlurmWatch(SlurmSettings(pending_note_s=0), lambda: None), pending, [0, 1000, 10_000]) == []
    with pytest.raises(UserError, match="pending_note_s"):
        load_config(_Wrapper, None, ["cluster.slurm.pending_note_s=-1"])


def test_only_worker_jobs_all_pending_before_any_worker_connected_hold_the_no_workers_timer(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Which squeue answers hold ``cluster.no_workers_timeout_s`` (``slurm_jobs_queued``): every job Dask waits for
    PENDING and no worker seen connected yet; a job running or ended, squeue that cannot tell, or a worker that had
    connected: the timer counts as before (the real held job: tests/test_slurm.py)."""
    import pipelines.cluster as c
    from pipelines.tasks import _WorkerWatch

    class Job:
        def __init__(self, job_id: str):
            self.job_id = job_id

    class Cluster:
        def __init__(self) -> None:
            self.workers = {"0": Job("12"), "1": Job("13")}

    class Client:
        def __init__(self) -> None:
            self.names: list[str] = []

        def scheduler_info(self) -> dict:
            return {"workers": {n: {"name": n} for n in self.names}}

        def nthreads(self) -> dict:
            return dict.fromkeys(self.names, 1)

    squeue: list[dict[str, tuple[str, str]] | None] = []
    monkeypatch.setattr(c, "_squeue_jobs", lambda jobs: squeue.pop(0))
    monkeypatch.setattr(c, "_JOBS_POLL_S", 0.0)
    client, cluster = Client(), Cluster()
    c._SLURM_WATCH[client] = c._SlurmWatch(SlurmSettings(pending_note_s=0), lambda: cluster)

    def queued(answer: dict[str, tuple[str, str]] | None, names: tuple[str, ...] = ()) -> bool:
        client.names = list(names)
        if not names:
            squeue.append(answer)
        c.check_slurm_workers(client)
        return c.slurm_jobs_queued(client)

    pend, run = ("PENDING", "JobHeldUser"), ("RUNNING", "None")
    assert queued({"12": pend, "13": pend})
    assert not queued({"12": run, "13": pend})
    assert not queued({"13": pend})  # 12 ended (squeue no longer lists it)
    assert not queued(None)  # squeue could not tell
    assert queued({"12": pend, "13": pend})
    assert not queued(None, names=("0",))  # job 12's worker connected ...
    client.names = []
    c.check_slurm_workers(client)  # ... and was lost (no squeue while its job is one Dask waits for) ...
    assert not c.slurm_jobs_queued(client)
    cluster.workers = {"2": Job("14")}
    assert not queued({"14": pend})  # ... and its replacement pends: lost workers, as before
    assert not c.slurm_jobs_queued(Client())  # not a SLURM cluster of ours
    assert not squeue and not capsys.readouterr().err

    # The timer does not count while queued() holds, and starts afresh once it no longer does.
    hold = [True]
    watch = _WorkerWatch(client, 0.2, lambda: hold[0])
    client.names = []
    for _ in range(3):
        time.sleep(0.15)
        assert not watch.gone_for_good()
    hold[0] = False
    time.sleep(0.15)
    assert not watch.gone_for_good()  # the time starts now
    time.sleep(0.25)
    assert watch.gone_for_good()


def test_jobs_ended_from_outside_say_how_and_the_rest_point_to_the_log(tmp_path: Path) -> None:
    """``_jobs_ended``'s words on squeue's last states: jobs SLURM ended from outside (deadline, preemption) are
    named with their fix; a job that ran and failed, or whose state was never seen ended, points to its log."""
    from pipelines.cluster import SlurmSettings, _jobs_ended

    s = SlurmSettings(log_directory=str(tmp_path), job_name="w")
    (tmp_path / "w-8.err").write_text("starting\nprologue failed\n")
    e = _jobs_ended(s, ["7", "8"], {"7": "DEADLINE", "8": "PREEMPTED"})
    assert e.message == ("the SLURM worker job(s) 7, 8 ended before their Dask worker connected to the scheduler "
                         "(squeue: DEADLINE, PREEMPTED): SLURM did not run them to the end")
    assert e.fix.startswith("deadline: removed at its --deadline") and "preempted: preempted" in e.fix
    e = _jobs_ended(s, ["7", "8"], {"7": "CANCELLED", "8": "FAILED"})  # one ran and failed: its log says why
    assert "(squeue: CANCELLED, FAILED); " in e.message and "prologue failed" in e.message
    assert e.fix.startswith("read the job's log")
    e = _jobs_ended(s, ["8"], {"8": "PENDING"})  # last seen queued, then gone: nothing known of how it ended
    assert e.message.endswith("connected to the scheduler; " + f"{tmp_path / 'w-8.err'} ends with: prologue failed")
