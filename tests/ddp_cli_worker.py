"""Several ``segfactory`` commands, one after the other, in one torchrun job of 2 processes (or one plain
process): what ``tests/test_pretrain_ddp.py`` and ``tests/test_finetune_ddp.py`` run their 2-process runs (and their
1-process references) with (:func:`one_job`: the interpreter, torch and the job start once per job instead of once
per run).

``python -m torch.distributed.run --standalone --nproc-per-node=2 -m tests.ddp_cli_worker PLAN.json OUT`` runs
each ``{"name", "argv"}`` of PLAN.json as ``segfactory <argv>`` on every rank (:func:`segfactory.cli.main`): inside
torchrun a training command joins the job's ranks instead of re-launching itself, as the ranks of a
``train.devices=2 train.backend=gloo`` command that re-launched itself under torchrun do. Each rank writes
``OUT/<name>.rank<r>.out`` / ``.err`` (its stdout and stderr during the command: the summary line, the console's
notes) and ``OUT/<name>.rank<r>.rc`` (the command's exit code); the first command that fails ends the job with its
code (torchrun then stops the other rank, as it stops a failed job's ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_job(commands: dict[str, list[str]], logs: Path, nproc: int = 2) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every command of ``commands`` (name -> ``segfactory`` arguments), in order, in one torchrun job of 2
    processes (the worker below), or with ``nproc=1`` in one plain process (no torchrun: as ``python -m
    segfactory.cli`` runs a command). Returns, per command, its exit status (0 when it succeeded on every rank) and
    its stdout and stderr as a launch of the command alone would show them (every rank's, rank 0's first); the
    job's own output is added to those of a command that failed or never ran."""
    logs.mkdir(parents=True)
    plan = logs / "plan.json"
    plan.write_text(json.dumps([{"name": name, "argv": argv} for name, argv in commands.items()]))
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if nproc == 2 else []
    cmd = [sys.executable, *launch, "-m", "tests.ddp_cli_worker", str(plan), str(logs)]
    # wide console lines: a long path in a note is not folded in two (as the command line's 80 columns may)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    job = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120 + 60 * len(commands))

    def read(path: Path) -> str:
        return path.read_text() if path.is_file() else ""

    done: dict[str, subprocess.CompletedProcess[str]] = {}
    for name in commands:
        codes = [int(rc) if (rc := read(logs / f"{name}.rank{r}.rc")) else None for r in range(nproc)]
        status = 0 if codes == [0] * nproc else next((c for c in codes if c), job.returncode or -1)
        out, err = ("".join(read(logs / f"{name}.rank{r}.{s}") for r in range(nproc)) for s in ("out", "err"))
        if status:
            out, err = out + job.stdout, err + job.stderr
        done[name] = subprocess.CompletedProcess(cmd, status, out, err)
    return done


def main(plan: str, out: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from segfactory.cli import main as cli
    from tests.torchrun_nodes import free_port

    torchrun = "RANK" in os.environ  # else one plain process
    rank = int(os.environ.get("RANK", 0))
    # Each command's process group meets at a store of its own, as in a job of its own: a group set up again on the
    # job's store would find the keys of the group before it (gloo then connects to the closed ports of its last
    # pairs). Rank 0 picks a free port per command and tells the other rank through the job's store.
    job_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=120)) if torchrun else None
    for i, case in enumerate(json.loads(Path(plan).read_text())):
        if job_store is not None:
            if rank == 0:
                job_store.set(f"ddp_cli_worker/{i}", str(free_port()))
            port = job_store.get(f"ddp_cli_worker/{i}").decode()
            os.environ.update(MASTER_PORT=port, TORCHELASTIC_USE_AGENT_STORE="False")
        name = Path(out) / f"{case['name']}.rank{rank}"
        with open(f"{name}.out", "w") as o, open(f"{name}.err", "w") as e, \
                contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = cli(case["argv"])
        Path(f"{name}.rc").write_text(str(rc))
        if rc != 0:
            sys.exit(rc)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
