"""Tracking: tiny pretrain and finetune runs log to TensorBoard event files and a local MLflow file store; other
ranks and unconfigured runs log nothing; setup problems are one line; a failure mid-run never stops training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import PretrainConfig
from segfactory.cli import main
from segfactory.config import hash_config, load_config
from segfactory.resume import read_jsonl
from segfactory.tracking import INSTALL_FIX, TrackingConfig, _Mlflow, open_tracker, process_rank, with_tracking

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("mlflow", reason="the tracking extra: pip install 'segfactory[tracking]'")
pytest.importorskip("tensorboard", reason="the tracking extra: pip install 'segfactory[tracking]'")


def tracking_args(tmp_path: Path) -> list[str]:
    return [f"tracking.tensorboard={tmp_path / 'tb'}", f"tracking.mlflow.tracking_uri={(tmp_path / 'mlruns').as_uri()}",
            "tracking.mlflow.experiment=tests"]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a TensorBoard run directory, read back from its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_run(tmp_path: Path, name: str):
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # as segfactory.tracking sets it for file: stores
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tests")
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]
    assert len(runs) == 1, [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    return client, runs[0]


def artifact_files(client, run_id: str, path: str | None = None) -> set[str]:
    files: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        files |= artifact_files(client, run_id, f.path) if f.is_dir else {f.path}
    return files


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_pretrain import REAL, ingest_inline

    return ingest_inline([REAL[i] for i in (0, 1, 2, 6, 7)], tmp_path_factory.mktemp("images"))  # the small ones


def pretrain_cfg(*extra: str) -> PretrainConfig:
    from test_pretrain import TINY

    return load_config(PretrainConfig, None, ["backbone.name=test_resnet", "method.name=simclr", *TINY, *extra])


def test_pretrain_logs_metrics_config_and_encoder(images: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pretrain.train import run_pretrain

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = pretrain_cfg(*tracking_args(tmp_path))
    out = tmp_path / "pre"
    summary = run_pretrain(cfg, images, out)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert "tracking_errors" not in summary

    # TensorBoard: the JSONL numbers, step for step, in OUT's name under the log dir
    tb = scalars(tmp_path / "tb" / "pre")
    for key in ("loss", "lr", "images_per_s", "data_wait_pct", "elapsed_s"):
        assert [s for s, _ in tb[key]] == [1, 2, 3, 4], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in rows], rel=1e-6), key

    # MLflow: params (the flattened config), metrics, the encoder directory and the summary as artifacts
    client, run = mlflow_run(tmp_path, "pre")
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "simclr"
    assert run.data.params["train.steps"] == "4"
    assert not any(k.startswith("tracking") for k in run.data.params)
    hist = client.get_metric_history(run.info.run_id, "loss")
    hist = sorted((m.step, m.value) for m in hist)
    assert [s for s, _ in hist] == [1, 2, 3, 4]
    assert [v for _, v in hist] == pytest.approx([r["loss"] for r in rows])
    files = artifact_files(client, run.info.run_id)
    encoder_files = {f"encoder/{p.relative_to(out / 'encoder').as_posix()}" for p in (out / "encoder").rglob("*")
                     if p.is_file()}
    assert encoder_files and encoder_files <= files
    assert "summary.json" in files
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert logged["final_loss"] == summary["final_loss"]
    assert json.loads((out / "tracking.json").read_text())["mlflow_run_id"] == run.info.run_id

    # tracking is not part of what the run produces: config hash and stage key as without it
    plain = pretrain_cfg()
    assert hash_config(cfg) == hash_config(plain)
    from pipelines.stages import training_key

    assert training_key(cfg) == training_key(plain)


def test_a_resumed_run_continues_the_same_mlflow_run_and_event_series(images: Path, tmp_path: Path) -> None:
    from pretrain.train import run_pretrain

    cfg = pretrain_cfg(*tracking_args(tmp_path))
    out = tmp_path / "pre"
    first = run_pretrain(cfg, images, out, stop_after=3)
    assert not first["finished"]
    client, run = mlflow_run(tmp_path, "pre")
    assert run.info.status == "KILLED"
    # resumed from the checkpoint at step 2: step 3 is trained again and replaces the first run's step 3
    last = sorted((out / "checkpoints").glob("step_*.pt"))[-1]
    assert last.name == "step_0000003.pt"
    last.unlink()
    assert run_pretrain(cfg, images, out, resume="last")["finished"]
    client, run = mlflow_run(tmp_path, "pre")  # still one run
    assert run.info.status == "FINISHED"
    rows = read_jsonl(out / "metrics.jsonl")
    tb = scalars(tmp_path / "tb" / "pre")
    assert [s for s, _ in tb["loss"]] == [1, 2, 3, 4]
    assert [v for _, v in tb["loss"]] == pytest.approx([r["loss"] for r in rows])
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")}) == [1, 2, 3, 4]


def test_finetune_logs_metrics_validation_and_model(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    rc = main(["finetune", str(REPO / "configs" / "finetune_tiny.yaml"), "--out", str(out), "--synthetic",
               str(tiny_dataset), "--steps", "4", "train.log_every=2", "train.val_every=4", *tracking_args(tmp_path)])
    assert rc == 0
    rows = read_jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val" in r]
    assert [r["step"] for r in train_rows] == [2, 4] and [r["step"] for r in val_rows] == [4]

    tb = scalars(tmp_path / "tb" / "ft")
    for key in ("loss", "ce", "dice", "lr"):
        assert [s for s, _ in tb[key]] == [2, 4], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in train_rows]), key
    assert [s for s, _ in tb["val.overall.miou"]] == [4]
    assert tb["val.overall.miou"][0][1] == pytest.approx(val_rows[0]["val"]["overall"]["miou"])

    client, run = mlflow_run(tmp_path, "ft")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.arch"] == "unet"
    assert run.data.metrics["val.overall.miou"] == pytest.approx(val_rows[0]["val"]["overall"]["miou"])
    files = artifact_files(client, run.info.run_id)
    model_files = {f"model/{p.relative_to(out / 'model').as_posix()}" for p in (out / "model").rglob("*")
                   if p.is_file()}
    assert model_files and model_files <= files and "summary.json" in files


def test_job_tracking_reaches_stages_without_changing_their_keys(tmp_path: Path) -> None:
    from finetune.config import FinetuneConfig
    from pipelines.stages import training_key

    job = TrackingConfig(tensorboard=str(tmp_path / "tb"))
    plain = FinetuneConfig()
    staged = with_tracking(plain, job, "finetune-abc")
    assert staged.tracking == job.model_copy(update={"run_name": "finetune-abc"})
    assert plain.tracking == TrackingConfig()
    assert training_key(staged) == training_key(plain) and hash_config(staged) == hash_config(plain)
    own = FinetuneConfig(tracking=TrackingConfig(tensorboard=str(tmp_path / "own"), run_name="mine"))
    assert with_tracking(own, job, "finetune-abc").tracking == own.tracking  # the stage's own wins
    assert with_tracking(plain, TrackingConfig(), "finetune-abc") is plain  # off stays off


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"LOCAL_RANK": "3"}, {"RANK": "2", "LOCAL_RANK": "0"}])
def test_other_ranks_and_tracking_off_log_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  env: dict[str, str]) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = TrackingConfig.model_validate({"tensorboard": str(tmp_path / "tb"),
                                         "mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri()}})
    out = tmp_path / "run"
    out.mkdir()
    assert not open_tracker(TrackingConfig(), out).active  # off: nothing configured
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert process_rank() != 0
    tracker = open_tracker(cfg, out)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"step": 1, "loss": 0.5})
    tracker.close()
    assert not tracker.active
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not any(out.iterdir())


def test_missing_package_and_bad_uri_are_one_line(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["pretrain", str(REPO / "configs" / "pretrain_tiny.yaml"), "--images", str(images), "--steps", "1",
            "--backbone", "test_resnet"]
    cases = [
        ({"mlflow.tracking": None}, [f"tracking.mlflow.tracking_uri={(tmp_path / 'm').as_uri()}"],
         "mlflow package is not installed", INSTALL_FIX),
        ({"torch.utils.tensorboard": None}, [f"tracking.tensorboard={tmp_path / 'tb'}"],
         "tensorboard package is not installed", INSTALL_FIX),
        ({}, ["tracking.mlflow.tracking_uri=ftp://host/x"], "unsupported scheme 'ftp'", "http(s)://"),
        ({}, ["tracking.mlflow.tracking_uri=http://127.0.0.1:9"], "cannot start a run at 'http://127.0.0.1:9'",
         "is the server up?"),
    ]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    for i, (modules, overrides, message, fix) in enumerate(cases):
        with monkeypatch.context() as m:
            for name, value in modules.items():
                m.setitem(sys.modules, name, value)  # None: `import name` raises ImportError
            rc = main([*args, "--out", str(tmp_path / f"o{i}"), *overrides])
        err = capsys.readouterr().err
        assert rc == 2, err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 2 and lines[0].startswith("error: ") and message in lines[0], err
        assert lines[1].strip().startswith("fix: ") and fix in lines[1], err
        assert not list((tmp_path / f"o{i}").glob("checkpoints/*"))  # stopped before training


def test_a_tracking_failure_mid_run_warns_once_and_training_finishes(images: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from pretrain.train import run_pretrain

    calls = []

    def unreachable(self: _Mlflow, values: dict[str, float], step: int) -> None:
        calls.append(step)
        raise ConnectionError("server went away")

    monkeypatch.setattr(_Mlflow, "log_metrics", unreachable)
    out = tmp_path / "pre"
    summary = run_pretrain(pretrain_cfg(*tracking_args(tmp_path)), images, out)
    assert summary["finished"] and summary["steps"] == 4
    assert calls == [1]  # switched off after the first failure
    assert summary["tracking_errors"] == ["mlflow: log_metrics failed (ConnectionError: server went away)"]
    assert json.loads((out / "summary.json").read_text())["tracking_errors"] == summary["tracking_errors"]
    assert capsys.readouterr().err.count("warning: tracking mlflow") == 1
    assert [s for s, _ in scalars(tmp_path / "tb" / "pre")["loss"]] == [1, 2, 3, 4]  # TensorBoard kept logging


def test_config_modules_import_no_tracking_package() -> None:
    code = ("import sys, segfactory.tracking, pretrain.config, finetune.config, segfactory.cli; "
            "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # a local Dask cluster and a training subprocess: ~35 s on 2 cores
def test_a_dask_training_task_logs_from_its_worker(images: Path, tmp_path: Path) -> None:
    """As `segfactory run` does: the job's tracking section travels in the stage's config file; the training
    process the Dask task starts on the worker opens its own tracker, named after the stage directory."""
    from pipelines.cluster import ClusterConfig
    from pipelines.stages import run_stage_tasks
    from segfactory.config import save_resolved

    job = TrackingConfig.model_validate({"tensorboard": str(tmp_path / "tb"),
                                         "mlflow": {"tracking_uri": (tmp_path / "mlruns").as_uri(),
                                                    "experiment": "tests"}})
    stage = tmp_path / "stages" / "pretrain-0123abcd"
    stage.parent.mkdir()
    config = tmp_path / "stage.yaml"
    save_resolved(with_tracking(pretrain_cfg(), job, stage.name), config)
    run_stage_tasks(ClusterConfig(workers=1, dashboard=False), 300, 0,
                    {"pretrain": (stage, ["pretrain", str(config), "--images", str(images), "--out", "{OUT}"])},
                    tmp_path / "report.html")
    assert [s for s, _ in scalars(tmp_path / "tb" / stage.name)["loss"]] == [1, 2, 3, 4]
    client, run = mlflow_run(tmp_path, stage.name)
    assert run.info.status == "FINISHED" and run.data.params["train.steps"] == "4"
    assert any(f.startswith("encoder/") for f in artifact_files(client, run.info.run_id))
    assert json.loads((stage / "tracking.json").read_text())["mlflow_run_id"] == run.info.run_id


def test_a_server_that_is_down_fails_at_start_in_seconds(tmp_path: Path) -> None:
    """Without MLFLOW_HTTP_REQUEST_* in the environment (MLflow's defaults wait ~4 minutes): a fresh process."""
    code = ("import time; from segfactory.errors import UserError; "
            "from segfactory.tracking import TrackingConfig, open_tracker; "
            "cfg = TrackingConfig.model_validate({'mlflow': {'tracking_uri': 'http://127.0.0.1:9'}}); t = time.time()\n"
            f"try: open_tracker(cfg, {str(tmp_path / 'run')!r})\n"
            "except UserError as e: print(round(time.time() - t, 1), e.message)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO)})
    seconds, message = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    assert "cannot start a run at 'http://127.0.0.1:9'" in message, proc.stdout + proc.stderr
    assert float(seconds) < 30


@pytest.mark.slow  # 2 gloo processes under torchrun: ~25 s on 2 cores
def test_two_torchrun_ranks_make_one_run(tmp_path: Path) -> None:
    """Data-parallel pretraining: rank 0 alone logs (one MLflow run, one event file) the rows it writes to
    metrics.jsonl, and ends the run FINISHED with the encoder."""
    from test_pretrain import REAL, ingest_inline
    from test_pretrain_ddp import cli

    images = ingest_inline(REAL[:8], tmp_path / "images")
    out = tmp_path / "ddp"
    r = cli(images, out, "train.devices=2", "train.backend=gloo", *tracking_args(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 processes (gloo)" in r.stdout + r.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert len(list((tmp_path / "tb").rglob("*tfevents*"))) == 1
    tb = scalars(tmp_path / "tb" / "ddp")
    assert [v for _, v in tb["loss"]] == pytest.approx([row["loss"] for row in rows], rel=1e-6)
    client, run = mlflow_run(tmp_path, "ddp")  # exactly one run of that name
    assert run.info.status == "FINISHED" and run.data.params["train.devices"] == "2"
    assert "encoder/encoder.safetensors" in artifact_files(client, run.info.run_id)
