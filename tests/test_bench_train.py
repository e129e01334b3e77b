"""``segfactory bench train`` variants (fp32 / fp16 / bf16 / no-channels-last / compile), data wait, fail-soft
rows, and ``train.compile`` in the real fine-tuning loop. CPU tests are tiny (64 px, 2 steps, timm's
``test_resnet``); the ``gpu`` test runs on CUDA only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import bench
from finetune.bench import run_bench
from segfactory.cli import main
from segfactory.errors import EXIT_USER, UserError

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "finetune_tiny.yaml")
SMALL = {"size": 64, "batch_sizes": [2], "steps": 2, "warmup": 1, "encoder": "test_resnet", "workers": 0}


def test_cpu_runs_the_default_variant_with_data_wait(capsys) -> None:
    report = run_bench(device="cpu", **SMALL)
    assert report["variants"] == ["default"] and report["workers"] == 0
    rows = report["results"]
    assert [(r["pipeline"], r["variant"]) for r in rows] == [("smp+cpu-aug", None), ("segfactory", "default")]
    for r in rows:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["seconds"] > 0 and r["batch_size"] == 2
        assert 0 <= r["data_wait_pct"] <= 100
        assert r["gpu_busy_pct"] is None and r["peak_gpu_mib"] is None  # CPU: no GPU share, no GPU memory
        assert r["amp"] == "off" and r["compile"] is False
    assert rows[1]["speedup"] == report["speedup"]["2"] == report["speedup_by_variant"]["2"]["default"] > 0
    err = capsys.readouterr().err
    assert "segfactory default batch 2" in err and "bench train: 64x64" in err


def test_cuda_only_variant_on_cpu_is_one_line_error(capsys) -> None:
    rc = main(["bench", "train", "--size", "64", "--batch-sizes", "2", "--steps", "2", "--warmup", "1",
               "--encoder", "test_resnet", "--workers", "0", "--device", "cpu", "--variants", "default", "bf16"])
    cap = capsys.readouterr()
    assert rc == EXIT_USER and cap.out == ""
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --variants bf16 needs a CUDA device (this runs on cpu)"], cap.err
    assert "Traceback" not in cap.err
    # the fix names bench train's own variants (it used to suggest train.amp's 'auto' and 'off', both unknown here)
    [fix] = [line.strip() for line in cap.err.splitlines() if line.strip().startswith("fix:")]
    assert fix == "fix: on this device pass --variants with default, fp32, no-channels-last, compile, or run on a " \
                  "GPU (--device cuda)", fix
    assert bench.check_variants(["default", "fp32", "no-channels-last", "compile"], torch.device("cpu"))
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        bench.check_variants(["fp16"], torch.device("cpu"))
    with pytest.raises(UserError, match="unknown variant"):
        bench.check_variants(["fp8"], torch.device("cpu"))
    assert bench.check_variants(None, torch.device("cuda")) == list(bench.VARIANTS)


def test_a_variant_that_raises_becomes_an_error_row_and_the_rest_still_run(monkeypatch) -> None:
    real = bench.bench_segfactory

    def flaky(*args, **kwargs):
        if args[-1] == "fp32":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail on a second line")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "bench_segfactory", flaky)
    report = run_bench(device="cpu", variants=["fp32", "default"], **SMALL)
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {None, "fp32", "default"}
    assert rows["fp32"]["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows["fp32"]["speedup"] is None and report["speedup_by_variant"]["2"]["fp32"] is None
    assert "error" not in rows["default"] and rows["default"]["images_per_s"] > 0
    assert report["speedup"]["2"] == rows["default"]["speedup"] > 0
    json.dumps(report)  # the report stays one JSON object


def test_compile_keeps_the_plain_module_for_saving(tiny_dataset: Path, tmp_path: Path) -> None:
    """Fast: with train.compile=true only the training forward is compiled (lazily, nothing runs here); the
    checkpointed module is the plain one, so its state_dict keys carry no ``_orig_mod.`` prefix."""
    from finetune.config import FinetuneConfig
    from finetune.train import Trainer

    assert FinetuneConfig().train.compile is False
    assert "torch.compile" in (type(FinetuneConfig().train).model_fields["compile"].description or "")
    trainers = {}
    for flag in (False, True):
        cfg = FinetuneConfig.model_validate({
            "model": {"arch": "unet", "encoder": "test_resnet", "decoder_channels": 8},
            "data": {"synthetic": [{"path": str(tiny_dataset)}], "num_workers": 0}, "augment": {"crop_size": 64},
            "train": {"compile": flag, "device": "cpu", "steps": 2, "batch_size": 2}})
        trainers[flag] = Trainer(cfg, tmp_path / str(flag), show_progress=False)
        trainers[flag].prepare(resume=False)
    plain, compiled = trainers[False], trainers[True]
    assert plain.train_model is plain.model
    assert compiled.train_model is not compiled.model
    assert any(k.startswith("_orig_mod.") for k in compiled.train_model.state_dict())
    assert list(compiled.model.state_dict()) == list(plain.model.state_dict())
    # the compiled wrapper trains the very parameters that are saved
    assert {id(p) for p in compiled.train_model.parameters()} == {id(p) for p in compiled.model.parameters()}


@pytest.mark.slow
def test_finetune_with_compile_saves_the_same_keys_as_without(tiny_dataset: Path, tmp_path: Path) -> None:
    """A tiny fine-tune with train.compile=true runs (torch.compile on CPU needs a C compiler: ~1 min on 2
    cores) and its checkpoint and model keys equal those of train.compile=false."""
    outs = {}
    for flag in ("false", "true"):
        out = tmp_path / f"compile-{flag}"
        assert main(["finetune", TINY, "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "3",
                     "train.val_every=3", "train.log_every=1", f"train.compile={flag}"]) == 0
        outs[flag] = out
    summaries = {f: json.loads((o / "summary.json").read_text()) for f, o in outs.items()}
    assert summaries["true"]["compile"] is True and summaries["false"]["compile"] is False
    ckpt = {f: torch.load(o / "checkpoint.pt", map_location="cpu", weights_only=True) for f, o in outs.items()}
    assert list(ckpt["true"]["model"]) == list(ckpt["false"]["model"])
    assert not any("_orig_mod" in k for k in ckpt["true"]["model"])
    models = {f: load_file(str(o / "model" / "model.safetensors")) for f, o in outs.items()}
    assert sorted(models["true"]) == sorted(models["false"])
    losses = [json.loads(line)["loss"] for line in (outs["true"] / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(v == v for v in losses)  # three finite logged steps


@pytest.mark.gpu
def test_bench_train_variants_on_cuda() -> None:
    report = run_bench(size=128, batch_sizes=[4], steps=2, warmup=1, encoder="test_resnet", device="cuda",
                       variants=["default", "bf16", "compile"])
    rows = report["results"]
    assert [r["variant"] for r in rows] == [None, "default", "bf16", "compile"]
    for r in rows:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["peak_gpu_mib"] > 0
        assert 0 <= r["data_wait_pct"] <= 100 and r["gpu_busy_pct"] == pytest.approx(100 - r["data_wait_pct"])
    by = {r["variant"]: r for r in rows}
    assert by["bf16"]["amp"] == "bfloat16" and by["default"]["channels_last"] is True
    assert by["compile"]["compile"] is True and by["compile"]["compile_s"] > 0


def test_help_says_data_is_a_labeled_folder(capsys) -> None:
    """A rendered dataset is refused (``must be a labeled folder``): the help no longer offers one."""
    with pytest.raises(SystemExit):
        main(["bench", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "labeled folder of real images (images/ + masks/; not a rendered dataset)" in text
    assert "dataset or labeled folder" not in text
