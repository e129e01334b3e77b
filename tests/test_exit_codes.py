"""Every exit code the README documents, each from the real CLI in its own process: 0 ok, 1 a bug (with its
traceback), 2 a user error (one line + fix, nothing done), 3 some units failed after retries (listed), 4 another
run holds the lock, 130 interrupted by Ctrl-C or SIGTERM (a clean checkpoint, a re-run resumes). Then the
training faults: a NaN/inf loss stops the run before anything of it is written, running out of memory says what
to lower, and a failed pipeline stage exits 2 only for the stage's own user error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import CONFIGS, REPO

from segfactory.errors import EXIT_BUSY, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_PARTIAL, EXIT_USER

TINY = CONFIGS / "finetune_tiny.yaml"


def segfactory(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m segfactory.cli ARGS`` in its own process, as a scheduler would run it."""
    return subprocess.run([sys.executable, "-m", "segfactory.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def start(*args: object, log: Path) -> subprocess.Popen[bytes]:
    """``python -m segfactory.cli ARGS`` started in its own session (so the test can signal it), output to ``log``."""
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "segfactory.cli", *map(str, args)], cwd=REPO, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "COLUMNS": "200"})


def wait_for(cond, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"exited (rc={proc.returncode}) before {what}: {log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}: {log.read_text(errors='replace')}")
        time.sleep(0.1)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------------------------------ one per code


def test_exit_0_ok(tiny_dataset: Path) -> None:
    r = segfactory("stats", tiny_dataset, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["frames"] == 16


def test_exit_1_is_a_bug_with_its_traceback(tiny_dataset: Path) -> None:
    # A bug inside a command (here: the dataset reader raising ZeroDivisionError) is not a user error.
    code = ("import sys, segfactory.formats.dataset as d\n"
            "def bug(*a, **k):\n    return 1 / 0\n"
            "d.open_dataset = bug\n"
            "from segfactory.cli import main\n"
            f"sys.exit(main(['stats', {str(tiny_dataset)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == EXIT_INTERNAL
    assert "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr
    assert not error_lines(r.stderr)


def test_exit_2_user_error_in_one_line_nothing_done(tmp_path: Path) -> None:
    # --root pointing at a file used to be a FileExistsError traceback with exit 1.
    afile = tmp_path / "root.txt"
    afile.write_text("not a directory\n")
    r = segfactory("refresh", CONFIGS / "refresh.yaml", "--root", afile)
    assert r.returncode == EXIT_USER, r.stderr
    assert error_lines(r.stderr) == [f"error: --root '{afile}' is a file, not a directory"]
    assert "fix: point --root at a directory" in r.stderr and "Traceback" not in r.stderr
    assert afile.read_text() == "not a directory\n" and sorted(p.name for p in tmp_path.iterdir()) == ["root.txt"]
    # ... and under a file, for another command
    r = segfactory("run", CONFIGS / "quickstart.yaml", "--out", afile / "run")
    assert r.returncode == EXIT_USER and f"run' is not writable: '{afile}' is a file, not a directory" in r.stderr
    # a config mistake names the field
    r = segfactory("refresh", CONFIGS / "refresh.yaml", "--root", tmp_path / "r", "render.dataset.scenez=3")
    assert r.returncode == EXIT_USER and "scenez" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r" / "datasets").exists()


def test_exit_2_for_a_full_disk_is_one_line(tmp_path: Path) -> None:
    """A disk that fills up (a real 64 KiB tmpfs in a private mount namespace) while the driver writes: one line
    naming the cause and the fix, exit 2, not a traceback with exit 1."""
    import shutil

    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    small = tmp_path / "small"
    small.mkdir()
    cmd = (f"mount -t tmpfs -o size=64k tmpfs {small} && exec {sys.executable} -m segfactory.cli samples "
           f"materialize ctc-hela --out {small}/hela")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    if "mount:" in r.stderr and r.returncode != EXIT_USER:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {r.stderr.strip()[-200:]}")
    assert r.returncode == EXIT_USER, r.stderr[-3000:]
    [line] = error_lines(r.stderr)
    assert line.startswith("error: No space left on device"), r.stderr
    assert "fix: free space on that disk" in r.stderr and "Traceback" not in r.stderr


def test_exit_3_some_units_failed_and_are_listed(tiny_model: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(inputs / "good.png")
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(inputs / "bad.png")
    data = (inputs / "bad.png").read_bytes()
    (inputs / "bad.png").write_bytes(data[: len(data) // 2])  # truncated mid-stream
    r = segfactory("predict", "--model", tiny_model, "--input", inputs, "--out", tmp_path / "out", "--no-overlays")
    assert r.returncode == EXIT_PARTIAL, r.stderr
    assert "1 of 2 image(s) could not be predicted" in r.stderr
    assert any(line.strip().startswith("bad.png:") for line in r.stderr.splitlines())
    assert (tmp_path / "out" / "good.png").is_file() and not (tmp_path / "out" / "bad.png").exists()
    # the rest are written: so are the settings (predict.yaml) and the summary line, as on success
    import yaml

    assert yaml.safe_load((tmp_path / "out" / "predict.yaml").read_text())["input"]["scaling"]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["images"] == 1 and summary["failed"] == 1 and list(summary["failures"]) == ["bad.png"]


def test_exit_4_another_run_holds_the_lock(tmp_path: Path) -> None:
    from pipelines.lock import exclusive_lock

    root = tmp_path / "root"
    with exclusive_lock(root / ".refresh.lock", "test", fix="-"):
        r = segfactory("refresh", CONFIGS / "refresh.yaml", "--root", root)
    assert r.returncode == EXIT_BUSY, r.stderr
    assert f"another refresh of '{root}' is running (pid {os.getpid()} on" in r.stderr
    assert sorted(p.name for p in root.iterdir()) == [".refresh.lock"]  # nothing done


@pytest.mark.slow
def test_exit_130_sigterm_mid_fine_tune_saves_a_clean_checkpoint_and_resumes(tiny_dataset: Path,
                                                                              tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "finetune.log"
    args = ["finetune", TINY, "--out", out, "--synthetic", tiny_dataset, "--steps", "2000", "train.log_every=2",
            "train.val_every=1000", "train.checkpoint_every=1000"]
    proc = start(*args, log=log)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, proc, log, "4 steps")
    proc.send_signal(signal.SIGTERM)  # what SLURM, Kubernetes and cron send
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, log.read_text()
    text = log.read_text()
    assert "SIGTERM: stopping after this step with a checkpoint" in text
    assert "interrupted by SIGTERM; finished work is kept and a re-run with --resume resumes" in text
    step = int(text.split("checkpoint at step ")[1].split()[0])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert ckpt["step"] == step >= 4
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert all(json.loads(line)["step"] <= step for line in metrics.read_text().splitlines())
    # the re-run resumes at that very step
    r = segfactory(*args, "--resume", f"train.stop_at={step + 2}")
    assert r.returncode == 0, r.stderr
    assert f"resuming {out} at step {step}/2000" in r.stderr
    assert f"stopped at step {step + 2}/2000" in r.stderr


@pytest.mark.render
@pytest.mark.slow
def test_exit_130_sigterm_mid_render_keeps_finished_shards_and_resumes(tmp_path: Path) -> None:
    from segfactory.formats.dataset import open_dataset

    out, log = tmp_path / "ds", tmp_path / "render.log"
    args = ["render", CONFIGS / "cells.yaml", "--out", out, "--scenes", "4", "--views", "1", "--resolution", "48",
            "--workers", "1", "render.samples=2", "render.denoise=false", "dataset.scenes_per_shard=1"]
    proc = start(*args, log=log)
    wait_for(lambda: any((out / "shards").glob("*/manifest.json")), proc, log, "a committed shard", timeout=300)
    session = [p for p in psutil.process_iter(["pid"]) if _sid(p.pid) == proc.pid and p.pid != proc.pid]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, log.read_text()
    assert "interrupted by SIGTERM; finished work is kept and a re-run resumes" in log.read_text()
    deadline = time.monotonic() + 30  # workers and Blender went with the driver
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in session if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    kept = {p.parent.name for p in (out / "shards").glob("*/manifest.json")}
    assert kept
    r = segfactory(*args)
    assert r.returncode == 0, r.stderr
    ds = open_dataset(out)
    assert ds.meta["num_frames"] == 4 and kept <= set(ds.shard_ids)
    assert sorted(f["name"] for sid in ds.shard_ids for f in ds.manifest(sid)["frames"]) == \
        [f"s{i:06d}_v00" for i in range(4)]
    assert not list((out / "shards").glob(".tmp-*"))


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ training faults


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


@pytest.mark.parametrize("every", [1, 1000])
def test_nan_loss_stops_fine_tuning_before_anything_of_it_is_written(tiny_dataset: Path, tmp_path: Path, capsys,
                                                                     every: int) -> None:
    from safetensors.torch import load_file

    from segfactory.cli import main

    out = tmp_path / "run"
    # A learning rate that blows the weights up within a few steps; with every=1 each step would write a
    # checkpoint, so infinite weights are caught there before the loss itself is NaN.
    rc = main(["finetune", str(TINY), "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "50",
               "train.lr=1e12", "train.grad_clip=null", f"train.checkpoint_every={every}", "train.val_every=1000"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER, err
    [line] = error_lines(err)
    if every == 1:
        assert "the model's weights hold NaN or infinite values" in line and "was not written" in line
    else:
        assert "the training loss became nan at step" in line or "the training loss became inf at step" in line
        assert "train.max_bad_steps=N" in err
    assert "fix: lower train.lr" in err
    assert not (out / "summary.json").exists()
    if (out / "checkpoint.pt").exists():  # only steps before the bad one, and finite
        ckpt = torch.load(out / "checkpoint.pt", weights_only=False, map_location="cpu")
        assert _all_finite(ckpt["model"])
        if "loss became" in line:
            assert ckpt["step"] < int(line.split(" at step ")[1].split(";")[0].split()[0])
    if (out / "model" / "model.safetensors").exists():
        assert _all_finite(load_file(out / "model" / "model.safetensors"))


def test_max_bad_steps_skips_that_many_then_stops(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from segfactory.cli import main

    rc = main(["finetune", str(TINY), "--out", str(tmp_path / "run"), "--synthetic", str(tiny_dataset), "--steps",
               "50", "train.lr=1e12", "train.grad_clip=null", "train.max_bad_steps=2", "train.val_every=1000"])
    err = capsys.readouterr().err
    assert rc == EXIT_USER, err
    assert err.count("step skipped (") == 2 and "(2/2 of train.max_bad_steps)" in err
    assert "after skipping 2 bad step(s) (train.max_bad_steps=2)" in err


def test_loss_guard_skips_only_non_finite_steps_up_to_the_limit() -> None:
    from segfactory.errors import UserError
    from segfactory.torchutil import LossGuard

    guard = LossGuard(1, "train.max_bad_steps", "lower train.lr")
    assert guard.check(torch.tensor(0.5), 0)
    assert not guard.check(torch.tensor(float("inf")), 1)
    assert guard.check(torch.tensor(0.4), 2) and guard.skipped == [2]
    with pytest.raises(UserError, match=r"loss became nan at step 4 after skipping 1 bad step\(s\)"):
        guard.check(torch.tensor(float("nan")), 3)


def test_nan_weights_are_never_checkpointed_or_exported(tmp_path: Path) -> None:
    from segfactory.errors import UserError
    from segfactory.torchutil import check_finite_weights

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    check_finite_weights(model, "x", "y")
    model[1].running_var[1] = float("nan")  # a buffer, not only parameters
    with pytest.raises(UserError, match=r"'1.running_var'\); the checkpoint at step 7 was not written"):
        check_finite_weights(model, "the checkpoint at step 7", "lower train.lr")


def test_nan_loss_stops_pretraining_with_finite_checkpoints_only(tmp_path: Path) -> None:
    from test_pretrain import REAL, ingest_inline, tiny_cfg

    from pretrain.train import checkpoint_paths, run_pretrain
    from segfactory.errors import UserError

    images = ingest_inline(REAL[:4], tmp_path / "images")
    with pytest.raises(UserError, match=r"the training loss became (nan|inf) at step \d+; the run stopped") as e:
        run_pretrain(tiny_cfg("train.steps=40", "train.checkpoint_every=1", "optim.lr=1e14", "optim.grad_clip=null"),
                     images, tmp_path / "run")
    assert "lower optim.lr" in str(e.value)
    bad = int(str(e.value).split(" at step ")[1].split(";")[0])
    for p in checkpoint_paths(tmp_path / "run"):
        ckpt = torch.load(p, weights_only=False, map_location="cpu")
        assert ckpt["step"] < bad and _all_finite(ckpt["model"])
    assert not (tmp_path / "run" / "encoder").exists()


@pytest.mark.slow
def test_out_of_memory_in_fine_tuning_says_what_to_lower(tiny_dataset: Path, tmp_path: Path) -> None:
    # A real allocation failure: the process's address space is capped 1.5 GB above what it uses after imports,
    # and a batch of 512 crops needs more.
    code = ("import resource, sys\n"
            "import torch, segmentation_models_pytorch, finetune.train\n"
            "from segfactory.cli import main\n"
            "vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 1500 * 2**20, resource.RLIM_INFINITY))\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "finetune", str(TINY), "--out", str(tmp_path / "run"),
                        "--synthetic", str(tiny_dataset), "--steps", "4", "train.batch_size=512"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == EXIT_USER, r.stderr[-3000:]
    [line] = error_lines(r.stderr)
    assert line.startswith("error: fine-tuning ran out of host memory allocating ")
    assert "fix: lower train.batch_size (512), augment.crop_size (64)" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_out_of_memory_in_prediction_says_what_to_lower(tiny_model: Path, tmp_path: Path) -> None:
    # A real allocation failure: the address space is capped 600 MB above what the process uses after imports,
    # and a batch of 64 tiles of 512 px of a 2048 px image needs more.
    import numpy as np
    from PIL import Image

    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (2048, 2048), dtype=np.uint8)).save(inputs / "big.png")
    code = ("import resource, sys\n"
            "import torch, segmentation_models_pytorch, finetune.predict\n"
            "from segfactory.cli import main\n"
            "vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm + 600 * 2**20, resource.RLIM_INFINITY))\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(tiny_model), "--input", str(inputs),
                        "--out", str(tmp_path / "out"), "--no-overlays", "--tile", "512", "--batch-size", "64"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == EXIT_USER, r.stderr[-3000:]
    [line] = error_lines(r.stderr)
    assert line.startswith("error: prediction ran out of host memory allocating "), r.stderr[-3000:]
    assert "fix: lower --batch-size (64) or --tile (512" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "big.png").exists()


@pytest.mark.gpu
def test_real_gpu_out_of_memory_in_fine_tuning_says_what_to_lower(tiny_dataset: Path, tmp_path: Path) -> None:
    # A real CUDA allocation failure, raised by torch's caching allocator: the process may use 1 GiB of the GPU
    # (set_per_process_memory_fraction), and a batch of 256 crops of 256 px needs more (one 16-channel feature
    # map of that batch alone is 1 GiB).
    code = ("import sys, torch\n"
            "from segfactory.cli import main\n"
            "torch.cuda.set_per_process_memory_fraction(2**30 / torch.cuda.get_device_properties(0).total_memory)\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "finetune", str(TINY), "--out", str(tmp_path / "run"),
                        "--synthetic", str(tiny_dataset), "--steps", "4", "train.device=cuda",
                        "train.batch_size=256", "augment.crop_size=256"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == EXIT_USER, r.stderr[-3000:]
    [line] = error_lines(r.stderr)
    assert line.startswith("error: fine-tuning ran out of GPU memory allocating ")
    assert "fix: lower train.batch_size (256), augment.crop_size (256)" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_gpu_out_of_memory_is_one_line(tmp_path: Path) -> None:
    from segfactory.errors import UserError
    from segfactory.torchutil import memory_hint

    with pytest.raises(UserError) as e, memory_hint("prediction", "--batch-size (4) or --tile (512)"):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.2 GiB total)")
    assert e.value.message == "prediction ran out of GPU memory allocating 20.00 GiB"
    assert e.value.fix == "lower --batch-size (4) or --tile (512)"
    # cuDNN and cuBLAS workspaces that do not fit raise RuntimeError with their status name
    for status in ("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_MEMORY", "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when "
                   "calling `cublasCreate(handle)`"):
        with pytest.raises(UserError) as e, memory_hint("fine-tuning", "train.batch_size (8)"):
            raise RuntimeError(status)
        assert e.value.message == "fine-tuning ran out of GPU memory" and e.value.fix == "lower train.batch_size (8)"
    with pytest.raises(RuntimeError, match="not memory"), memory_hint("x", "y"):
        raise RuntimeError("not memory")  # other errors pass through untouched


# ------------------------------------------------------------------------------------------------ pipeline stages


@pytest.mark.slow
def test_failed_stage_is_exit_2_only_for_its_own_user_error(tiny_dataset: Path, tmp_path: Path) -> None:
    """A stage whose command refuses its input exits 2 with that command's line, not retried; one that crashes,
    is killed (an OOM kill, a timeout) or loses its worker is listed with exit 3, after its retries."""
    from pipelines.cluster import ClusterConfig
    from pipelines.stages import STAGE_FILE, run_stage_tasks
    from segfactory.errors import PartialFailure, UserError

    cluster = ClusterConfig(workers=1, dashboard=False)
    stages = tmp_path / "stages"
    bad = {"evaluate": (stages / "evaluate-x", ["evaluate", "--model", str(tmp_path / "no-model"), "--data",
                                                str(tiny_dataset), "--out", "{OUT}"])}
    with pytest.raises(UserError) as e:
        run_stage_tasks(cluster, 120, 1, bad, tmp_path / "report.html")
    assert e.value.exit_code == EXIT_USER and e.value.message.startswith("stage evaluate: ")
    assert str(tmp_path / "no-model") in e.value.message
    log = (stages / "evaluate-x.log").read_text()
    assert log.count("error:") == 1  # not retried: the same input fails the same way
    assert not (stages / "evaluate-x" / STAGE_FILE).exists()

    slow = {"finetune": (stages / "finetune-x", ["finetune", str(TINY), "--synthetic", str(tiny_dataset),
                                                 "--steps", "100000", "--out", "{OUT}"])}
    with pytest.raises(PartialFailure) as f:
        run_stage_tasks(cluster, 8, 1, slow, tmp_path / "report.html")
    assert "stage finetune failed after 1 retry" in f.value.message
    assert list(f.value.failures) == ["finetune"] and "SubprocessTimeout" in f.value.failures["finetune"]
    assert not (stages / "finetune-x" / STAGE_FILE).exists()


DRIVER = '''
import sys
from pathlib import Path

from pipelines.cluster import ClusterConfig
from pipelines.stages import run_stage_tasks
from segfactory.errors import sigterm_interrupts


def main() -> int:
    root, dataset = Path(sys.argv[1]), sys.argv[2]
    argv = ["finetune", sys.argv[3], "--synthetic", dataset, "--steps", "5000", "train.log_every=2",
            "train.val_every=100000", "train.checkpoint_every=100000", "--out", "{OUT}"]
    try:
        with sigterm_interrupts():
            run_stage_tasks(ClusterConfig(workers=1, dashboard=False), 600, 0,
                            {"finetune": (root / "stages" / "finetune-x", argv)}, root / "report.html")
    except KeyboardInterrupt as e:
        print("driver interrupted by", e, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''


@pytest.mark.slow
def test_sigterm_to_a_pipeline_driver_leaves_its_training_stage_a_clean_checkpoint(tiny_dataset: Path,
                                                                                   tmp_path: Path) -> None:
    """The stage process outlives its Dask worker by a step: it gets SIGTERM (not SIGKILL) when the worker dies,
    finishes the step, writes its checkpoint and its last lines into the stage log, and exits 130."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = tmp_path / "driver.log"
    out = open(log, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(tiny_dataset), str(TINY)], cwd=REPO,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    final = tmp_path / "stages" / "finetune-x"

    def logged_steps() -> int:  # the stage runs in an attempt directory next to its final place
        return max((len(m.read_text().splitlines()) for m in final.parent.glob(".*finetune-x-*/metrics.jsonl")),
                   default=0)

    wait_for(lambda: logged_steps() >= 2, proc, log, "4 steps")
    [stage] = [p for p in final.parent.glob(".*finetune-x-*") if p.is_dir()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_INTERRUPTED, log.read_text()
    assert "driver interrupted by SIGTERM" in log.read_text()
    stage_log = tmp_path / "stages" / "finetune-x.log"
    deadline = time.monotonic() + 120
    while "interrupted by SIGTERM" not in stage_log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.5)
    text = stage_log.read_text(errors="replace")
    assert "interrupted by SIGTERM; finished work is kept" in text, text[-2000:]
    step = int(text.split("checkpoint at step ")[1].split()[0])
    assert torch.load(stage / "checkpoint.pt", weights_only=False, map_location="cpu")["step"] == step >= 4
    assert not final.exists()  # never counted as done
