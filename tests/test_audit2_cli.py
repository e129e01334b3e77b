"""QA audit 2, CLI findings: run locks of pretrain/finetune, backbone.init from segfactory's own files, resume and
interrupt messages, override parsing, samples list NAME, probe --encoder RUN_DIR, bench help and tables."""

from __future__ import annotations

import json
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


# -- #12, #13: pretrain's interrupt says how to resume; --resume below the checkpoint's step is one line -----------


def test_pretrain_interrupt_says_resume_with_resume(hela_images: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "pt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    base = ["pretrain", "configs/pretrain_tiny.yaml", "--images", str(hela_images), "--out", str(out), *TINY]
    first = subprocess.Popen([sys.executable, "-m", "segfactory.cli", *base, "train.steps=100000",
                              "train.checkpoint_every=1", "train.keep_checkpoints=2"],
                             cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: any((out / "checkpoints").glob("step_*.pt")), first, 240, "the first checkpoint")
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 130, err
    assert err.strip().splitlines()[-1].endswith("finished work is kept and a re-run with --resume resumes"), err
    step = int(sorted((out / "checkpoints").glob("step_*.pt"))[-1].stem.removeprefix("step_"))
    # what the message says works: --resume continues (to a finished, exported run)
    r = cli(*base, f"train.steps={step + 2}", "train.checkpoint_every=1", "train.keep_checkpoints=2", "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == step + 2


def test_resume_below_the_checkpoints_step_is_one_line_and_rewrites_nothing(hela_images: Path,
                                                                          tmp_path: Path) -> None:
    from test_pretrain import tiny_cfg

    from pretrain.train import run_pretrain
    from segfactory.errors import UserError

    out = tmp_path / "pt"
    run_pretrain(tiny_cfg("train.steps=4"), hela_images, out)
    config = (out / "config.yaml").read_text()
    enc = (out / "encoder" / "encoder.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError) as e:
        run_pretrain(tiny_cfg("train.steps=2"), hela_images, out, resume="last")
    assert e.value.message.startswith("train.steps=2 is below the step of checkpoint ")
    assert "already past it; nothing was done" in e.value.message and "set train.steps above 4" in e.value.fix
    assert (out / "config.yaml").read_text() == config
    assert (out / "encoder" / "encoder.safetensors").stat().st_mtime_ns == enc


# -- #7: backbone.init at segfactory's own checkpoint or fine-tuned weights says what to pass ---------------------


def test_backbone_init_at_a_pretrain_checkpoint_or_a_finetuned_model_names_what_to_pass(
        hela_images: Path, tiny_model: Path, tmp_path: Path) -> None:
    from test_pretrain import tiny_cfg

    from pretrain.train import run_pretrain
    from segfactory.errors import UserError

    run_pretrain(tiny_cfg("train.steps=2"), hela_images, tmp_path / "pt1")
    ckpt = sorted((tmp_path / "pt1" / "checkpoints").glob("step_*.pt"))[-1]
    with pytest.raises(UserError) as e:
        run_pretrain(tiny_cfg("train.steps=2", f"backbone.init={ckpt}"), hela_images, tmp_path / "pt2")
    assert "is a segfactory pretrain checkpoint" in e.value.message
    assert f"'{tmp_path / 'pt1' / 'encoder'}'" in e.value.fix and f"--resume-from '{ckpt}'" in e.value.fix
    assert "backbone.name" not in e.value.fix
    with pytest.raises(UserError) as e:
        run_pretrain(tiny_cfg("train.steps=2", f"backbone.init={tiny_model / 'model.safetensors'}"), hela_images,
                     tmp_path / "pt3")
    assert "is the weights of a fine-tuned segmentation model" in e.value.message
    assert "OUT/encoder" in e.value.fix and "backbone.name" not in e.value.fix


def test_config_validation_fixes_do_not_repeat_the_reason() -> None:
    from pretrain.config import IngestConfig, PretrainConfig
    from segfactory.config import load_config
    from segfactory.errors import UserError

    for model, override, fix in (
            (IngestConfig, "normalize.max_short_side=5", "set normalize.max_short_side to 8 or more"),
            (PretrainConfig, "backbone.init=/nonexistent/x.pt", "set backbone.init to another value, or remove it "
                                                                 "to use the default"),
            (PretrainConfig, "train.steps=abc", "set train.steps to a whole number")):
        with pytest.raises(UserError) as e:
            load_config(model, None, [override])
        assert e.value.fix == fix, (override, e.value)


def test_ingest_max_short_side_error_says_0_keeps_full_size(tmp_path: Path) -> None:
    r = cli("ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--max-short-side", "5", timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0] == "error: --max-short-side 5 is too small: a downscaled short side is at least 8 px"
    assert lines[1].strip() == "fix: pass --max-short-side 8 or more, or 0 to keep full size"


# -- #15, #16: overrides ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["pretrain", "configs/pretrain_tiny.yaml", "--images", "x", "--out", "{tmp}/o"],
    ["ingest", "x", "--out", "{tmp}/o"],
    ["refresh", "configs/refresh.yaml", "--root", "{tmp}/o"],
    ["run", "configs/quickstart.yaml", "--out", "{tmp}/o"],
    ["finetune", "configs/finetune_tiny.yaml", "--out", "{tmp}/o"],
    ["probe", "--encoder", "x", "--data", "y"],
])
def test_a_bare_token_among_overrides_is_the_same_one_line_error_everywhere(command: list[str],
                                                                           tmp_path: Path) -> None:
    r = cli(*[c.format(tmp=tmp_path) for c in command], "a.b=1", "train.steps", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: override 'train.steps' is not of the form key=value",
                                             "  fix: write e.g. render.samples=32"]
    assert not (tmp_path / "o").exists()


def test_bench_transfer_takes_a_first_key_value_as_an_override(tmp_path: Path) -> None:
    r = cli("bench", "transfer", "nosuchkey=1", "--out", str(tmp_path / "bt"), timeout=120)
    assert r.returncode == 2
    assert "config file 'nosuchkey=1'" not in r.stderr
    assert "unknown config key 'nosuchkey'" in r.stderr.splitlines()[0]


# -- #17: samples list NAME ---------------------------------------------------------------------------------------


def test_samples_list_name_lists_that_set_or_suggests_one() -> None:
    r = cli("samples", "list", "ctc-hela", "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    assert [s["name"] for s in json.loads(r.stdout)["sample_sets"]] == ["ctc-hela"]
    r = cli("samples", "list", "ctc-hla", "--json", timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: unknown sample set 'ctc-hla'; did you mean 'ctc-hela'?")


# -- #18: probe --encoder RUN_DIR ---------------------------------------------------------------------------------


def test_probe_accepts_a_pretrain_run_directory(tmp_path: Path) -> None:
    from pretrain.backbones import create_features_model
    from segfactory.formats.encoder import save_encoder

    body = create_features_model("test_resnet", 1)
    save_encoder(tmp_path / "pt" / "encoder", body, timm_name="test_resnet", in_chans=1,
                 normalization={"mean": [0.2], "std": [0.2]}, method="simclr", steps=0, data_manifest_hash=None)
    r = cli("probe", "--encoder", str(tmp_path / "pt"), "--data", "sample:ctc-hela/eval", "--steps", "2",
            "--seeds", "1", "image_size=32", timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"using encoder dir '{tmp_path / 'pt' / 'encoder'}' of the run '{tmp_path / 'pt'}'" in r.stderr
    assert "miou_encoder" in json.loads(r.stdout)


# -- #20: bench help shows defaults and describes every option --------------------------------------------------


def test_every_bench_option_has_a_description_and_its_help_shows_defaults() -> None:
    import argparse

    from segfactory.cli import build_parser

    def subs(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    benches = subs(subs(build_parser())["bench"])
    assert {"loader", "ingest", "augment", "render", "train", "pipeline", "transfer"} <= set(benches)
    for name, p in benches.items():
        undescribed = [a.option_strings or a.dest for a in p._actions if not a.help]
        assert not undescribed, (name, undescribed)
    r = cli("bench", "loader", "--help", timeout=60)
    text = " ".join(r.stdout.split())
    assert "timed batches per row (default: 50)" in text and "data.order (default: random)" in text
    assert "(default: None)" not in text
