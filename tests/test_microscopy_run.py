"""The tests that share conftest's ``microscopy_run`` (``segfactory run configs/quickstart.yaml`` at tiny sizes, one
~3 min run per session): one file, so that pytest-xdist's ``--dist loadfile`` would run them on one worker and make
the run once (its ``loadgroup`` does not group under pytest 9.2: pytest-xdist issue #1386). The slow lane they are
in runs in one process (CONTRIBUTING.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import CONFIGS

from pipelines.bench_transfer import TransferBenchConfig
from segfactory.config import load_config


@pytest.mark.render
@pytest.mark.slow  # renders cells, ingests the real sample frames, trains with adaptation, scores real frames
def test_microscopy_quickstart_adapts_to_the_real_frames_and_scores_them(microscopy_run: tuple[Path, dict]):
    """The main job at tiny sizes: the run's real images reach fine-tuning as its unlabeled data (self-training
    runs), and the report scores real HeLa frames next to the baselines. The run: conftest's microscopy_run
    (configs/quickstart.yaml with RUN_TINY and MICROSCOPY_TINY: 128 px frames hold whole nuclei, input.scale auto)."""
    out, first = microscopy_run
    ft = next(p for p in (out / "stages").glob("finetune-*") if p.is_dir())
    images = next(p for p in (out / "stages").glob("ingest-*") if p.is_dir())
    assert ["--unlabeled", str(images)] == [a for a in json.loads((ft / "stage.json").read_text())["argv"]
                                            if a in ("--unlabeled", str(images))]
    records = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert any("selftrain_loss" in r for r in records)  # self-training ran on the real frames
    lineage = json.loads((ft / "model" / "model.json").read_text())["lineage"]["training"]
    assert lineage["adapt"]["unlabeled"]
    # HeLa and CHO frames come from two folders: each got its own input scale estimate
    assert len(lineage["adapt"]["scale_estimate"]["sources"]) == 2
    # The quickstart trains the instance head: the watershed settings were chosen on the rendered validation
    # frames, and the real frames are scored as separate nuclei too (the model_watershed row).
    calibration = json.loads((ft / "model" / "model.json").read_text())["instances"]["calibration"]
    assert calibration["frames"] > 0 and calibration["chosen"] is not None
    assert set(first["real"]["ctc-hela"]) == {"model", "model_watershed", "otsu", "blur_otsu"}
    assert 0 <= first["real"]["ctc-hela"]["model"]["fg_iou"] <= 1
    report = (out / "report.html").read_text()
    assert "<h2>Model vs baselines on real images</h2>" in report and "input scale" in report
    assert "model_watershed" in report and "touching objects split by the instance head" in report
    # Predictions on the real (gray, 16-bit) frames: cut, never resized; one instance PNG each, and the COCO file.
    pred_in = next(p for p in (out / "stages").glob("predict-*-input") if p.is_dir())
    assert len(list(pred_in.glob("*.png"))) == 2
    pred = next(p for p in (out / "stages").glob("predict-*") if p.is_dir() and not p.name.endswith("-input"))
    assert len(list((pred / "instances").glob("*.png"))) == 2
    assert len(json.loads((pred / "instances.json").read_text())["images"]) == 2


TINY = ["render.render.resolution=128", "render.render.views=1", "render.render.samples=2",
        "render.dataset.scenes=4", "render.dataset.scenes_per_shard=2", "test.scenes=2", "pretrain.train.steps=10",
        "pretrain.train.batch_size=8", "finetune.train.steps=10", "finetune.train.val_every=5",
        "finetune.train.checkpoint_every=5", "finetune.data.val_max_items=2", "execution.predict_images=0",
        "eval.real=[sample:ctc-hela/eval]", "eval.overlays=1", "rows=[synthetic]", "label_efficiency.k=[2]",
        "cluster.workers=1"]


@pytest.mark.render
@pytest.mark.slow  # fine-tunes 4 tiny models through `segfactory run` (and renders and pretrains, in microscopy_run)
def test_tiny_bench_transfer_runs_the_label_efficiency_rows(tmp_path, monkeypatch, microscopy_run):
    from pipelines.bench_transfer import run_transfer_bench

    cfg = load_config(TransferBenchConfig, CONFIGS / "bench_transfer.yaml", TINY)
    out = tmp_path / "bench"
    # The bench renders, ingests and pretrains what the tiny microscopy quickstart run does (its config extends
    # quickstart.yaml; the same sizes, seeds and steps: the same stage keys), and reuses a finished stage as every
    # run does: it starts from a copy of those stages of conftest's microscopy_run (and its sample data folder: the
    # same real image files, so nothing new to ingest) instead of rendering and pretraining them once more.
    run, _ = microscopy_run
    monkeypatch.setenv("SEGFACTORY_DATA", str(run.parent / "data"))
    for stage in ("render", "testset", "ingest", "pretrain"):
        for d in (run / "stages").glob(f"{stage}-*"):
            if d.is_dir():
                shutil.copytree(d, out / "stages" / d.name, symlinks=True)
    result = run_transfer_bench(cfg, out)
    names = [f"real2-{i}" for i in ("random", "ssl", "supsyn")]  # one k: each init is its own path
    assert list(result["rows"]) == ["synthetic", *names]
    # The classic baselines only; the instance head's watershed F1 is each row's own score.
    assert {b for s in result["baselines"].values() for b in s} == {"otsu", "blur_otsu"}
    assert cfg.finetune.instances.enabled
    assert all(0 <= r["sets"]["ctc-hela"]["f1_watershed"] <= 1 for r in result["rows"].values())
    for name in names:
        scores = result["rows"][name]["sets"]["ctc-hela"]
        assert 0 <= scores["fg_iou"] <= 1
    le = result["label_efficiency"]
    hela = le["sets"]["ctc-hela"]
    assert le["labels"] == "real" and hela["eval_t"] == list(range(14, 20))
    assert len(hela["frames"]["2"]) == 2 and all(f["t"] <= 7 for f in hela["frames"]["2"])
    assert json.loads((out / "bench_transfer.json").read_text())["label_efficiency"] == le
    # execution.predict_images=0: no row ran a predict stage (an empty input folder used to fail the first row after
    # its training), and the report says why there are no predictions
    assert not [p for p in (out / "stages").glob("predict-*") if p.is_dir() and not p.name.endswith("-input")]
    assert "<h2>Predictions on real images</h2><p>none: execution.predict_images=0</p>" in (
        out / "report.html").read_text()
    # Each row trained on its k real frames only, and the supsyn rows started from the synthetic row's encoder.
    for name in names:
        ft = Path(result["rows"][name]["finetune_dir"])
        data = json.loads((ft / "data.json").read_text())
        train = {s["kind"]: s["train_items"] for s in data["train"]}
        assert train == {"real": int(name[4])}, name
        encoder = json.loads((ft / "model" / "model.json").read_text())["lineage"]["encoder"]
        expected = {"random": "random", "ssl": "ssl", "supsyn": "supervised"}[name.split("-")[1]]
        assert encoder["init"] == expected, name
        if name.endswith("supsyn"):
            assert encoder["method"] == "supervised" and encoder["dir"] == le["supsyn_encoder"]
