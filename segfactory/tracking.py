"""Experiment tracking: training metrics, config and outputs to TensorBoard and/or MLflow (optional extras).

The ``tracking:`` section of the pretrain and finetune configs (also inside ``segfactory run`` / ``refresh`` job
configs) turns it on; with nothing configured :func:`open_tracker` returns a no-op tracker and nothing is imported.
The JSONL metrics files stay the record of a run; a tracker logs the same numbers.

- Only rank 0 logs (``RANK``, else ``LOCAL_RANK``, unset or 0), so a run under ``torchrun`` logs once.
- The tracker is built from the config inside the process that trains (a Dask task on a remote worker builds its
  own): the config travels, never the object.
- A misconfiguration found at start (package missing, unsupported URI, server not answering, directory not
  writable) is a :class:`~segfactory.errors.UserError`. A failure after training started never stops the run: the
  backend is warned about once, switched off, and the problem is listed in the run's summary (``tracking_errors``).
- ``tracking`` is not part of any stage key or config hash: turning it on does not re-run cached stages.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pydantic import BaseModel, Field, field_validator
from rich.markup import escape

from segfactory.config import StrictModel
from segfactory.console import console
from segfactory.errors import UserError
from segfactory.io import atomic_write_json, read_json
from segfactory.resume import flatten

INSTALL_FIX = "pip install 'segfactory[tracking]'"
STATE_FILE = "tracking.json"  # OUT/tracking.json: where this run logs (a resumed run continues the MLflow run)
MLFLOW_SCHEMES = ("", "file", "http", "https", "databricks")
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
# MLflow's HTTP retry settings unless the environment sets them: MLflow's own (7 retries, backoff factor 2, 120 s
# timeout) wait about 4 minutes for a server that is down, at start and again at each later call
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
MLFLOW_BATCH = 100  # params/metrics per log_batch request (MLflow's limit for params)
M = TypeVar("M", bound=BaseModel)


class MlflowSettings(StrictModel):
    """``tracking.mlflow``: the MLflow tracking server (or local file store) runs are logged to."""

    tracking_uri: str = Field(description="http(s)://HOST:PORT of an MLflow server, databricks, or a local file "
                              "store (file:///abs/path/mlruns; MLflow keeps that store in maintenance mode)")
    experiment: str = Field("segfactory", min_length=1, description="experiment name (created when missing)")
    run_name: str | None = Field(None, description="MLflow run name; default: tracking.run_name, else the name of "
                                 "the run's output directory")


class TrackingConfig(StrictModel):
    """``tracking``: where training metrics, the resolved config and the exported model go (off by default).

    Never part of a stage key: turning tracking on or changing it re-runs nothing.
    """

    tensorboard: str | None = Field(None, description="TensorBoard log directory; a run writes its event files to "
                                    "DIR/<run name>/ (null = no TensorBoard)")
    mlflow: MlflowSettings | None = Field(None, description="MLflow tracking (null = no MLflow)")
    run_name: str | None = Field(None, description="names the run in both backends; default: the name of the run's "
                                 "output directory (a stage directory under segfactory run)")
    log_config: bool = Field(True, description="log the resolved config as parameters (flattened dotted keys)")
    log_model: bool = Field(True, description="log the exported encoder/model directory as an MLflow artifact")

    @field_validator("tensorboard")
    @classmethod
    def _nonempty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("is empty; give a directory or null")
        return v

    @property
    def enabled(self) -> bool:
        return self.tensorboard is not None or self.mlflow is not None


def process_rank() -> int:
    """This process's global rank under torchrun (``RANK``, else ``LOCAL_RANK``); 0 when neither is set."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def strip_tracking(data: dict[str, Any]) -> dict[str, Any]:
    """A dumped config without its ``tracking`` section (stage keys, hashes and resume checks ignore it)."""
    return {k: v for k, v in data.items() if k != "tracking"}


def _numeric(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record as flat dotted keys (``step`` and non-numbers left out)."""
    return {k: float(v) for k, v in flatten(record).items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, log_dir: Path, purge_step: int | None):
        try:
            tb = importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise UserError("tracking.tensorboard is set but the tensorboard package is not installed",
                            fix=INSTALL_FIX) from None
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = tb.SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        except OSError as e:
            raise UserError(f"tracking.tensorboard: cannot write to '{log_dir}' ({e.strerror or e})",
                            fix="set tracking.tensorboard to a writable directory") from None
        self.log_dir = log_dir

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table, 0)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_artifact(self, path: Path, name: str) -> None:
        self.writer.add_text(name, str(path), 0)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```", 0)

    def close(self, status: str) -> None:
        self.writer.close()


class _Mlflow:
    name = "mlflow"

    def __init__(self, cfg: MlflowSettings, run_name: str, run_id: str | None):
        uri = cfg.tracking_uri
        scheme = urlparse(uri).scheme
        if len(scheme) == 1:  # a Windows drive letter
            scheme = ""
        if scheme not in MLFLOW_SCHEMES:
            raise UserError(f"tracking.mlflow.tracking_uri='{uri}' has an unsupported scheme '{scheme}'",
                            fix="use http(s)://HOST:PORT of an MLflow server or file:///abs/path/mlruns")
        try:
            client_mod = importlib.import_module("mlflow.tracking")
            self.entities = importlib.import_module("mlflow.entities")
        except ImportError:
            raise UserError("tracking.mlflow is set but the mlflow package is not installed", fix=INSTALL_FIX) from None
        if scheme in ("http", "https"):
            for var, value in HTTP_DEFAULTS.items():  # a server that is down: an error in seconds, not minutes
                os.environ.setdefault(var, value)
        if scheme in ("", "file"):
            # MLflow 3 refuses its file store unless asked; sqlite needs the full mlflow (SQLAlchemy).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = client_mod.MlflowClient(tracking_uri=uri)
            run = self.client.get_run(run_id) if run_id else None
            if run is not None and run.info.lifecycle_stage == "active":
                self.client.update_run(run_id, status="RUNNING")
                self.run_id: str = run_id or ""
            else:
                exp = self.client.get_experiment_by_name(cfg.experiment)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(cfg.experiment)
                self.run_id = self.client.create_run(exp_id, run_name=cfg.run_name or run_name).info.run_id
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"tracking.mlflow: cannot start a run at '{uri}' ({first})",
                            fix="check tracking.mlflow.tracking_uri (is the server up?) or set tracking.mlflow=null"
                            ) from None

    def log_params(self, params: dict[str, str]) -> None:
        items = [self.entities.Param(k, v[:MLFLOW_PARAM_CHARS]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params  # a resumed run: MLflow params are write-once
        items = [p for p in items if p.key not in existing]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MLFLOW_BATCH])

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        items = [self.entities.Metric(k, v, ts, step) for k, v in values.items()]
        for i in range(0, len(items), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + MLFLOW_BATCH])

    def log_artifact(self, path: Path, name: str) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=name)

    def log_summary(self, summary: dict[str, Any]) -> None:
        self.client.log_dict(self.run_id, json.loads(json.dumps(summary, default=str)), "summary.json")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class Tracker:
    """Logs to the configured backends; does nothing without any (other ranks, tracking off).

    A backend that fails is warned about once and switched off; :attr:`errors` lists what failed (for the summary).
    """

    def __init__(self, backends: list[Any] | None = None, cfg: TrackingConfig | None = None):
        self.backends: list[Any] = list(backends or [])
        self.cfg = cfg or TrackingConfig()
        self.errors: list[str] = []
        self._closed = False
        if self.backends:
            atexit.register(self._at_exit)

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def _call(self, method: str, *args: Any) -> None:
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*args)
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                msg = f"{backend.name}: {method} failed ({type(e).__name__}: {first})"
                self.errors.append(msg)
                self.backends.remove(backend)
                console.print(f"[yellow]warning: tracking {escape(msg)}; training continues without "
                              f"{backend.name}[/]")

    def log_params(self, config: dict[str, Any]) -> None:
        """Log a (nested) config as flat dotted parameters; the ``tracking`` section itself is left out."""
        if self.backends and self.cfg.log_config:
            self._call("log_params", {k: json.dumps(v) if not isinstance(v, str) else v
                                      for k, v in flatten(strip_tracking(config)).items()})

    def log_metrics(self, record: dict[str, Any], step: int | None = None) -> None:
        """Log the numbers of a metrics record (nested dicts flattened to dotted keys) at ``step`` (default
        ``record["step"]``); non-finite values are left out."""
        if not self.backends:
            return
        values = {k: v for k, v in _numeric(record).items() if math.isfinite(v)}
        at = int(record.get("step", 0) if step is None else step)
        if values:
            self._call("log_metrics", values, at)

    def log_artifact(self, path: str | os.PathLike[str], name: str) -> None:
        """Log a file or directory (the exported encoder/model) under ``name``."""
        if self.backends and self.cfg.log_model:
            self._call("log_artifact", Path(path), name)

    def log_summary(self, summary: dict[str, Any]) -> None:
        """Log the final summary (``summary.json`` in MLflow, a text entry in TensorBoard)."""
        if self.backends:
            self._call("log_summary", summary)

    def close(self, status: str = "FINISHED") -> None:
        """End the run (MLflow status FINISHED, FAILED or KILLED) and flush the event files."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._at_exit)
        self._call("close", status)

    def _at_exit(self) -> None:  # the process ends without close(): the run failed or was stopped
        self.close("FAILED")


def open_tracker(cfg: TrackingConfig | None, out: str | os.PathLike[str], resume_step: int | None = None) -> Tracker:
    """The tracker of a training run writing to ``out`` (a no-op one when tracking is off or rank != 0).

    Args:
        cfg: The config's ``tracking`` section.
        out: The run directory; its name is the default run name and ``OUT/tracking.json`` records where the run
            logs, so a resumed run continues the same MLflow run.
        resume_step: The step a resumed run continues from: TensorBoard drops the events of later steps (they are
            logged again, as the JSONL file is cut back to this step).

    Raises:
        UserError: a package is missing, the MLflow URI is unsupported or does not answer, or the TensorBoard
            directory cannot be written.
    """
    if cfg is None or not cfg.enabled or process_rank() != 0:
        return Tracker()
    out = Path(out)
    name = cfg.run_name or out.resolve().name
    state_path = out / STATE_FILE
    state: dict[str, Any] = {}
    if resume_step is not None and state_path.is_file():
        try:
            state = dict(read_json(state_path))
        except (OSError, ValueError):
            state = {}
    backends: list[Any] = []
    if cfg.tensorboard is not None:
        # records carry the step they close: those after the checkpoint's step are dropped (logged again)
        backends.append(_TensorBoard(Path(cfg.tensorboard).expanduser() / name,
                                     None if resume_step is None else resume_step + 1))
    if cfg.mlflow is not None:
        same = state.get("mlflow_uri") == cfg.mlflow.tracking_uri
        backends.append(_Mlflow(cfg.mlflow, name, state.get("mlflow_run_id") if same else None))
    record: dict[str, Any] = {"run_name": name}
    for b in backends:
        if isinstance(b, _TensorBoard):
            record["tensorboard_dir"] = str(b.log_dir.resolve())
        else:
            record.update(mlflow_uri=cfg.mlflow.tracking_uri if cfg.mlflow else None, mlflow_run_id=b.run_id)
    atomic_write_json(state_path, record)
    where = [f"TensorBoard {record['tensorboard_dir']}"] if "tensorboard_dir" in record else []
    where += [f"MLflow run {record['mlflow_run_id']} at {record['mlflow_uri']}"] if "mlflow_run_id" in record else []
    console.print(f"tracking '{name}': " + "; ".join(where))
    return Tracker(backends, cfg)


def with_tracking(stage: M, job: TrackingConfig, run_name: str) -> M:
    """A stage config of a ``segfactory run``/``refresh`` job as its training process gets it: the job's
    ``tracking`` section unless the stage sets its own, named ``run_name`` (the stage directory's name; the process
    writes into a temporary attempt directory) unless a name is set. The stage's key does not change
    (:func:`strip_tracking`)."""
    own = getattr(stage, "tracking", None)
    if not isinstance(own, TrackingConfig):
        return stage
    cfg = own if own.enabled else job
    if not cfg.enabled:
        return stage
    return stage.model_copy(update={"tracking": cfg if cfg.run_name else cfg.model_copy(update={"run_name": run_name})})
