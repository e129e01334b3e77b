"""Cluster deployability: workers must see the driver's output directory (checked at start on a real loopback
scheduler, with a worker in its own mount namespace that sees another filesystem at that path), the Kubernetes
specs the CronJob and the backend generate (image, volume, resources), the Dockerfile they name, and locks on
network filesystems."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CONFIGS, REPO
from loopback import WORKER, LoopbackCluster

from pipelines.cluster import (
    DEFAULT_IMAGE,
    ClusterConfig,
    check_shared_dir,
    check_volume_covers,
    kubernetes_cluster_spec,
    open_client,
)
from pipelines.lock import local_only_locking
from segfactory.config import load_config
from segfactory.errors import UserError

CRONJOB = CONFIGS / "schedules" / "refresh-cronjob.yaml"
DOCKERFILE = CONFIGS / "docker" / "Dockerfile"


def _can_unshare_mounts() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_unshare_mounts(), reason="needs unshare --mount (root or user namespaces)")
def test_a_worker_that_cannot_see_the_output_directory_fails_fast_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cluster = LoopbackCluster(tmp_path / "dask", n_workers=1)
    try:
        cfg = ClusterConfig(backend="address", address=cluster.address, connect_timeout_s=20)
        with open_client(cfg, shared_dir=out) as client:  # a worker on the driver's filesystem passes
            assert len(client.scheduler_info()["workers"]) == 1
        assert not list(out.iterdir())  # the probe file is gone
        # A second worker that mounts another filesystem at the same path (a node whose /data is local disk).
        worker = " ".join(shlex.quote(a) for a in [*WORKER, cluster.address, "--nthreads", "1", "--no-nanny",
                                                    "--host", "127.0.0.1", "--no-dashboard", "--name", "elsewhere"])
        proc = cluster._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               f"mount -t tmpfs none {shlex.quote(str(out))} && exec {worker}"], "worker-elsewhere.log")
        cluster.workers.append(proc)
        cluster.wait_for_workers(2)
        with pytest.raises(UserError) as e, open_client(cfg, shared_dir=out):
            pass
        msg = str(e.value.message)
        assert msg.startswith(f"1 of 2 Dask worker(s) cannot use the output directory '{out}' (worker tcp://")
        assert "a different filesystem is mounted there" in msg and "\n" not in msg
        assert "workers must share the output filesystem with the driver" in msg
        assert "cluster.kubernetes.volumes" in e.value.fix and "not /tmp" in e.value.fix
        with pytest.raises(UserError, match="does not exist"), open_client(cfg) as client:
            check_shared_dir(client, out / "sub", 5)  # the driver creates it; the tmpfs over `out` has none
    finally:
        cluster.close()


def test_cronjob_driver_and_worker_pods_run_the_dockerfile_image_and_mount_the_same_volume() -> None:
    from pipelines.refresh import RefreshConfig

    job = yaml.safe_load(CRONJOB.read_text())
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [driver] = pod["containers"]
    assert driver["image"] == DEFAULT_IMAGE and DEFAULT_IMAGE in DOCKERFILE.read_text()
    args = driver["args"]
    assert args[:2] == ["refresh", "configs/refresh.yaml"] and (REPO / args[1]).is_file()
    root = args[args.index("--root") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    cfg = load_config(RefreshConfig, REPO / args[1], overrides).cluster
    assert cfg.backend == "kubernetes"
    # the driver's claim and path
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    driver_mounts = {m["mountPath"]: claims[m["name"]] for m in driver["volumeMounts"]}
    spec = kubernetes_cluster_spec(cfg)
    worker = spec["spec"]["worker"]["spec"]
    [c] = worker["containers"]
    assert c["image"] == driver["image"]
    wclaims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in worker["volumes"]}
    worker_mounts = {m["mountPath"]: wclaims[m["name"]] for m in c["volumeMounts"]}
    assert worker_mounts == driver_mounts  # same claims at the same paths
    assert any(root == p or root.startswith(p.rstrip("/") + "/") for p in worker_mounts)
    check_volume_covers(cfg.kubernetes, Path(root))
    assert worker["securityContext"] == pod["securityContext"] == {"fsGroup": 1000}
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert c["args"][0] == "dask-worker" and c["args"][c["args"].index("--memory-limit") + 1] == "8GiB"
    # tini forwards the pod's SIGTERM so the driver stops like Ctrl-C (exit 130); the image has it
    assert driver["command"][:2] == ["/usr/bin/tini", "--"] and " tini" in DOCKERFILE.read_text()


def test_kubernetes_spec_volumes_gpus_and_a_driver_output_outside_them() -> None:
    cfg = load_config(ClusterConfig, None, ["backend=kubernetes", "kubernetes.image=registry.example/sf:1",
                                            "kubernetes.gpus=1", "kubernetes.cpu='4'", "kubernetes.memory=16Gi",
                                            "kubernetes.volumes=[{claim: a, mount_path: /data}, "
                                            "{claim: b, mount_path: /scratch, sub_path: run1}]"])
    spec = kubernetes_cluster_spec(cfg)
    w = spec["spec"]["worker"]["spec"]
    [c] = w["containers"]
    assert c["image"] == spec["spec"]["scheduler"]["spec"]["containers"][0]["image"] == "registry.example/sf:1"
    assert c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert c["volumeMounts"] == [{"name": "data-0", "mountPath": "/data"},
                                 {"name": "data-1", "mountPath": "/scratch", "subPath": "run1"}]
    assert [v["persistentVolumeClaim"]["claimName"] for v in w["volumes"]] == ["a", "b"]
    check_volume_covers(cfg.kubernetes, Path("/scratch/x/y"))
    with pytest.raises(UserError, match=r"'/home/me/out' is on no volume the worker pods mount \(cluster.kubernetes."
                                        r"volumes: /data, /scratch\)") as e:
        check_volume_covers(cfg.kubernetes, Path("/home/me/out"))
    assert "mount_path" in e.value.fix
    # no volume at all: refused before any pod is created
    with pytest.raises(UserError, match=r"volumes: none"), \
            open_client(ClusterConfig(backend="kubernetes"), shared_dir="/data/out"):
        pass
    with pytest.raises(UserError, match="mount_path='data' must be an absolute path"):
        load_config(ClusterConfig, None, ["kubernetes.volumes=[{claim: a, mount_path: data}]"])
    plain = kubernetes_cluster_spec(ClusterConfig(backend="kubernetes"))["spec"]["worker"]["spec"]
    assert "volumes" not in plain and "volumeMounts" not in plain["containers"][0]


def test_dockerfile_installs_the_pins_and_everything_the_pods_run() -> None:
    text = DOCKERFILE.read_text()
    lines = [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    instr = [ln.split()[0] for ln in lines]
    assert instr[0] == "FROM" and re.match(r"FROM python:3\.11[-.\w]*$", lines[0])
    assert {"WORKDIR", "ENTRYPOINT", "CMD", "USER"} <= set(instr)
    copied = {ln.split()[1] for ln in lines if ln.startswith("COPY") and len(ln.split()) == 3}
    packages = {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= copied and "configs" in copied  # every package of the project, and the configs
    assert "-c constraints.txt" in text and "trackastra" in text
    # the requirement list the image installs is the project's, one per line
    req = re.search(r'RUN (python -c "import tomllib.*?") \\?\s*> /tmp/requirements.txt', text, re.S)
    assert req is not None
    r = subprocess.run([sys.executable, "-c", shlex.split(req[1])[2]], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "bpy==4.2.0" in r.stdout.splitlines() and "distributed>=2026.8,<2027" in r.stdout
    # every library bpy links from the system is installed
    for lib in ("libx11-6", "libxrender1", "libxxf86vm1", "libxfixes3", "libxi6", "libxkbcommon0", "libsm6", "libgl1"):
        assert lib in text


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /data rw,relatime shared:20 - nfs4 fs:/export rw,vers=4.2,local_lock=none,addr=10.0.0.2
41 22 0:36 / /nolock rw,relatime shared:21 - nfs fs:/v3 rw,vers=3,nolock,local_lock=all,addr=10.0.0.2
42 22 0:37 / /lustre rw shared:22 - lustre mgs@tcp:/fs rw,localflock
43 22 0:38 / /lustre2 rw shared:23 - lustre mgs@tcp:/fs rw,flock
44 40 0:39 / /data/My\\040Runs rw shared:24 - nfs4 fs:/other rw,vers=4.2,local_lock=flock
"""


def test_locks_on_network_filesystems_are_flagged_when_they_only_lock_this_host() -> None:
    assert local_only_locking(Path("/data/runs"), MOUNTINFO) is None  # NFSv4 with server-side locks
    assert local_only_locking(Path("/nolock/x"), MOUNTINFO) == "nfs mounted with nolock"
    assert local_only_locking(Path("/lustre/a/b"), MOUNTINFO) == "lustre mounted with localflock"
    assert local_only_locking(Path("/lustre2/a"), MOUNTINFO) is None
    assert local_only_locking(Path("/data/My Runs/r"), MOUNTINFO) == "nfs4 mounted with local_lock=flock"
    assert local_only_locking(Path("/home"), MOUNTINFO) is None
    assert local_only_locking(Path("/tmp"), "") is None  # no mount table: no claim either way
