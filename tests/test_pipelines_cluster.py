"""Cluster backends: the generated SLURM job script and Kubernetes DaskCluster spec, config errors, and the
GPU-resource fallback, on real Dask objects (Kubernetes itself cannot run here: its spec is inspected)."""

from __future__ import annotations

import pytest

from pipelines.cluster import (
    ClusterConfig,
    kubernetes_cluster_spec,
    open_client,
    slurm_cluster_kwargs,
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
