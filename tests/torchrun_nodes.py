"""Several torchrun "nodes" on localhost: the documented multi-node launch (docs/pretrain.md, docs/finetune.md)
as separate ``torchrun --nnodes=N --node-rank=i --nproc-per-node=1 --rdzv-backend=c10d`` processes that meet at a
c10d rendezvous on 127.0.0.1, each running ``python -m segfactory.cli ...`` (what ``tests/test_pretrain_ddp.py``
and ``tests/test_finetune_ddp.py`` start for their two-node tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_nodes(cli_args: list[str], nodes: int = 2, timeout: float = 240) -> list[tuple[int, str, str]]:
    """Start ``nodes`` torchrun launches of ``segfactory <cli_args>`` (one rank each, same arguments: the same
    ``--out`` stands for a shared file system), wait for all; return each launch's (status, stdout, stderr).

    The environment is this one without a torchrun job's variables (the ranks get theirs from their torchrun);
    a launch still running after ``timeout`` seconds is killed, with every other one and their ranks (each launch
    runs in a session of its own, killed as a process group).
    """
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    procs = []
    try:
        for node in range(nodes):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node-rank={node}",
                   "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   "-m", "segfactory.cli", *cli_args]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, start_new_session=True))
        res = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, res, strict=True)]
