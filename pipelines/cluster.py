"""Getting a Dask client: a LocalCluster by default, or an existing scheduler by address.

Stage pipelines call :func:`open_client` with the ``cluster`` config section and never construct clusters
themselves, so the same pipeline code runs on a laptop and on any scheduler.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from segfactory.config import StrictModel
from segfactory.console import console
from segfactory.errors import UserError


class ClusterConfig(StrictModel):
    """The ``cluster`` config section."""

    backend: Literal["local", "address"] = Field("local", description="local LocalCluster or an existing scheduler")
    address: str | None = Field(None, description="scheduler address for backend=address, e.g. tcp://127.0.0.1:8786")
    workers: int | None = Field(None, ge=1, description="LocalCluster worker processes (default: CPU count)")
    threads_per_worker: int = Field(1, ge=1)
    memory_limit: str = Field("auto", description="per-worker memory limit for LocalCluster, e.g. '4GiB'")
    dashboard: bool = Field(True, description="start the dashboard on a free loopback port")


@contextlib.contextmanager
def open_client(cfg: ClusterConfig) -> Iterator[object]:
    """Yield a ``distributed.Client`` for the configured cluster, closing what we started on exit."""
    from distributed import Client, LocalCluster

    if cfg.backend == "address":
        if not cfg.address:
            raise UserError("cluster.backend=address needs cluster.address", fix="pass --cluster-address tcp://HOST:PORT")
        try:
            client = Client(cfg.address, timeout="15s")
        except OSError as e:
            raise UserError(f"cannot reach the Dask scheduler at {cfg.address}: {e}",
                            fix="start it (`dask scheduler`) or fix --cluster-address") from None
        _announce(client)
        try:
            yield client
        finally:
            client.close()
        return
    workers = cfg.workers or max(1, os.cpu_count() or 1)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                           memory_limit=cfg.memory_limit, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0" if cfg.dashboard else None,
                           # Failed tasks are reported by the pipelines, once, with the unit's id.
                           silence_logs=logging.CRITICAL)
    client = Client(cluster)
    _announce(client)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _announce(client: object) -> None:
    link = getattr(client, "dashboard_link", None)
    nworkers = len(client.scheduler_info().get("workers", {}))  # type: ignore[attr-defined]
    console.print(f"dask: {nworkers} worker(s) at {client.scheduler.address}"  # type: ignore[attr-defined]
                  + (f", dashboard {link}" if link else ""), soft_wrap=True)
