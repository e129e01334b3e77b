"""QA audit 2, CLI findings: run locks of pretrain/finetune, backbone.init from segfactory's own files, resume and
interrupt messages, override parsing, samples list NAME, probe --encoder RUN_DIR, bench help and tables."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain import TINY, ingest_inline

from segfactory.sampledata import materialize

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    """``segfactory ARGS`` in a fresh process (one torch thread)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "segfactory.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def hela_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ingest store of the ctc-hela sample's unlabeled frames."""
    frames = materialize("ctc-hela", split="unlabeled", out=tmp_path_factory.mktemp("hela"))["unlabeled"]
    files = sorted(p for p in frames.rglob("*") if p.suffix.lower() in (".png", ".tif", ".tiff"))[:8]
    return ingest_inline(files, tmp_path_factory.mktemp("hela_store"))


def _wait_for(pred, proc: subprocess.Popen[str], timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"the first run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


# -- #5: a second pretrain into the same --out is refused with exit 4 while the first runs ------------------------


def test_second_pretrain_into_the_same_out_is_refused_with_exit_4(hela_images: Path, tmp_path: Path) -> None:
    out = tmp_path / "pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    slow = [o for o in TINY if not o.startswith(("train.steps=", "train.checkpoint_every="))]
    first = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "pretrain", "configs/pretrain_tiny.yaml",
                              "--images", str(hela_images), "--out", str(out), *slow, "train.steps=100000",
                              "train.checkpoint_every=1", "train.keep_checkpoints=2"],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: any((out / "checkpoints").glob("step_*.pt")), first, 240, "the first checkpoint")
        # a resumed second run (what a SLURM requeue starts) and a fresh one: both stop at once, nothing written
        for extra in (["--resume"], []):
            second = cli("pretrain", "configs/pretrain_tiny.yaml", "--images", str(hela_images), "--out", str(out),
                         *slow, "train.steps=100000", "--stop-after", "1", *extra, timeout=240)
            assert second.returncode == 4, second.stderr
            err = second.stderr.strip().splitlines()
            assert err[0].startswith(f"error: another pretrain into '{out}' is running (pid {first.pid} on "), err
            assert "nothing was done" in err[0] and "fix: wait for it to finish" in err[1]
        assert first.poll() is None  # the first one is untouched
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    assert first.returncode == 130


def test_second_finetune_into_the_same_out_is_refused_with_exit_4(tiny_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = ["finetune", "configs/finetune_tiny.yaml", "--synthetic", str(tiny_dataset), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "segfactory.cli", *args, "--steps", "100000",
                              "train.checkpoint_every=1", "train.val_every=100000"],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (out / "checkpoint.pt").exists(), first, 240, "the first checkpoint")
        for extra in (["--resume"], []):
            second = cli(*args, "--steps", "1", "train.checkpoint_every=1", "train.val_every=100000", *extra,
                         timeout=240)
            assert second.returncode == 4, second.stderr
            err = second.stderr.strip().splitlines()
            assert err[0].startswith(f"error: another finetune into '{out}' is running (pid {first.pid} on "), err
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    assert first.returncode == 130


def test_torchrun_ranks_run_inside_the_launchers_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher holds the lock and re-runs itself as ranks: they (rank 0 included) must not take it again,
    and a rank other than 0 of a hand-started torchrun never takes it."""
    from segfactory.lock import HELD_LOCKS_ENV, run_dir_lock

    monkeypatch.delenv(HELD_LOCKS_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with run_dir_lock(tmp_path, "pretrain", fix="x"):
        held = os.environ[HELD_LOCKS_ENV]
        code = ("from pathlib import Path\nfrom segfactory.lock import run_dir_lock\n"
                f"with run_dir_lock(Path({str(tmp_path)!r}), 'pretrain', fix='x'):\n    print('in')\n")
        for env in ({"RANK": "0", HELD_LOCKS_ENV: held}, {"RANK": "1"}, {}):
            r = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, capture_output=True, timeout=60,
                               env={**{k: v for k, v in os.environ.items() if k not in ("RANK", HELD_LOCKS_ENV)},
                                    "PYTHONPATH": str(REPO), **env})
            if env:
                assert r.returncode == 0 and r.stdout.strip() == "in", (env, r.stderr)
            else:  # an unrelated process: refused
                assert r.returncode != 0 and "another pretrain into" in r.stderr
    assert HELD_LOCKS_ENV not in os.environ
    with run_dir_lock(tmp_path, "pretrain", fix="x"):  # released
        pass
