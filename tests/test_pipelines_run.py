"""``segfactory run``: the whole chain for real on a LocalCluster (tiny sizes), stage caching, and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CONFIGS, RUN_TINY

from segfactory.cli import main

TINY = RUN_TINY


# The street demo fine-tunes a resnet18 from random init (init: random, no pretrain stage); the chain test runs it
# with the SSL stage and tiny encoders, so that pretraining, its lineage and its report section are covered too.
# Real images go through the model at input scale 0.2 instead of the demo's 0.33 (2.7x fewer pixels): the real-image
# evaluations (16 frames and photos, 12 passes each with eval.tta ms_flip) and predictions were most of the test's
# time, and no assertion depends on the scale.
STREET_SSL = ["init=ssl", "pretrain.backbone.name=test_resnet", "pretrain.augment.crop_size=64",
              "pretrain.augment.local_crop_size=32", "finetune.model.encoder=test_resnet",
              "finetune.model.decoder_channels=8", "finetune.augment.crop_size=64", "finetune.input.scale=0.2"]


def run(out: Path, capsys, *extra: str, config: str = "quickstart_street.yaml") -> dict:
    capsys.readouterr()
    street = STREET_SSL if config == "quickstart_street.yaml" else []
    assert main(["run", str(CONFIGS / config), "--out", str(out), *TINY, *street, *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]) | {"_err": captured.err}


@pytest.mark.render
@pytest.mark.slow  # the whole chain, then three re-runs
def test_run_end_to_end_caches_stages_and_writes_report(tmp_path: Path, capsys, monkeypatch):
    # The sample sets (the street demo's real images, then ctc-hela) are materialized here, for every run of the
    # test: a changed cache folder would be new real images to ingest (and re-train on).
    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    first = run(out, capsys)
    assert all(v != "cached" for v in first["stages"].values()), first["stages"]
    assert 0 <= first["miou"] <= 1
    assert re.search(r"dashboard http://127\.0\.0\.1:\d+/status", first["_err"])
    report = (out / "report.html").read_text()
    for title in ("contact sheet", "class pixel shares", "pretraining loss", "fine-tuning loss", "validation mIoU",
                  "per-class IoU", "confusion matrix", "Predictions on real images"):
        assert f"{title}</figcaption>" in report or f"<h2>{title}</h2>" in report, title
    # JPEG overlays: predictions on 2 street photos; eval.real: 4 held-out frames of the real street video, 4 of
    # labelme's vehicle photos and both of its people photos.
    assert report.count("data:image/png;base64,") >= 6 and report.count("data:image/jpeg;base64,") == 2 + 4 + 4 + 2
    assert "<h2>Model vs baselines on real images</h2>" in report and "street vtest_f" in report
    assert "labelme-vehicles voc_2011_000025" in report
    assert set(first["real"]["street"]) == {"model", "hog_people"}  # eval.baselines: hog_people (opt-in)
    # The people detector scores the person folders, not the vehicle one (a note in the report says so).
    assert set(first["real"]["labelme-people"]) == {"model", "hog_people"}
    assert set(first["real"]["labelme-vehicles"]) == {"model"} and "baseline hog_people not scored" in report
    assert 0.3 < first["real"]["street"]["hog_people"]["fg_iou"] <= 1  # 0.777 measured on the 8 eval frames
    assert list((out / "reports").glob("*-dask-*.*"))  # a Dask performance report (or task stream) per run
    ft = next(p for p in (out / "stages").glob("finetune-*") if p.is_dir())
    # Paths recorded inside stage outputs (model lineage, summaries) are the stage dirs they live in.
    assert json.loads((ft / "model" / "model.json").read_text())["lineage"]["training"]["run"] == str(ft)
    pre = next(p for p in (out / "stages").glob("pretrain-*") if p.is_dir())
    assert json.loads((ft / "summary.json").read_text())["encoder"]["dir"] == str(pre / "encoder")
    assert json.loads((pre / "summary.json").read_text())["encoder"] == str(pre / "encoder")
    # Evaluation scored held-out scenes: a test set rendered with another seed, never fine-tuned on.
    assert first["miou_on"].startswith("2 held-out rendered frames")
    test_set = next(p for p in (out / "stages").glob("testset-*") if p.is_dir())
    ev = next(p for p in (out / "stages").glob("evaluate-*") if p.is_dir())
    assert str(test_set) in json.loads((ev / "stage.json").read_text())["argv"]
    assert "held-out rendered frames" in report
    # The training processes reported progress to the driver (the lines the stage task forwards).
    assert "SEGFACTORY-STAGE-PROGRESS" in (ft.parent / f"{ft.name}.log").read_text()

    # eval.tta (the street demo's ms_flip): the real-image section, the synthetic section and the predictions each
    # say so
    assert first["tta"] == "ms_flip" and report.lower().count("test-time augmentation ms_flip (mean of the whole "
                                                              "image and its mirror image at 0.5-1.75x its input "
                                                              "scale)") == 3

    again = run(out, capsys)
    assert {k: v for k, v in again["stages"].items() if k != "ingest"} == dict.fromkeys(
        ["render", "pretrain", "finetune", "evaluate", "evaluate_real", "predict"], "cached")
    assert again["stages"]["ingest"].startswith("0 new image(s)") and again["miou"] == first["miou"]

    # Another eval.tta mode runs the evaluation and prediction stages again (nothing upstream); the report and
    # run.json say which. The rest of the test keeps eval.tta=none: ms_flip's 12 passes per image were most of its
    # time, and every comparison below is between two runs with the same mode.
    plain = run(out, capsys, "eval.tta=none")
    assert [k for k, v in plain["stages"].items() if v != "cached"] == ["ingest", "evaluate", "predict",
                                                                        "evaluate_real"]
    assert plain["tta"] == "none" and "test-time augmentation" not in (out / "report.html").read_text()
    for name in ("evaluate", "evaluate_real", "predict"):
        stages = [p for p in (out / "stages").glob(f"{name}-*") if p.is_dir() and not p.name.endswith("-input")]
        newest = max(stages, key=lambda p: p.stat().st_mtime)
        assert "--tta" not in json.loads((newest / "stage.json").read_text())["argv"], name

    # A changed fine-tuning section re-runs fine-tuning and what depends on it, nothing upstream (the street
    # recipe trains at lr 0.002).
    changed = run(out, capsys, "eval.tta=none", "finetune.train.lr=0.001")
    assert [k for k, v in changed["stages"].items() if v == "cached"] == ["render", "pretrain"]

    # eval.real: real labeled frames scored next to the classic baselines, in their own stage. The street model
    # has no 'nucleus' class: said before any training, with the fix.
    real = ["eval.tta=none", "finetune.train.lr=0.001", "eval.real=[sample:ctc-hela/eval]", "eval.overlays=1",
            "eval.baselines=all"]
    capsys.readouterr()
    assert main(["run", str(CONFIGS / "quickstart_street.yaml"), "--out", str(out), *TINY, *STREET_SSL, *real,
                 "eval.remap={}"]) == 2
    err = capsys.readouterr().err
    assert "its class 'background' (id 0) is not a class of the model" in err and "eval.remap.background=" in err
    scored = run(out, capsys, *real, "eval.remap={background: road, nucleus: vehicle}")
    assert [k for k, v in scored["stages"].items() if v != "cached"] == ["ingest", "evaluate_real"]
    assert set(scored["real"]["ctc-hela"]) == {"model", "otsu", "blur_otsu"}
    assert 0.3 < scored["real"]["ctc-hela"]["blur_otsu"]["fg_iou"] < 1 and scored["miou"] == changed["miou"]
    report = (out / "report.html").read_text()
    assert "<h2>Model vs baselines on real images</h2>" in report
    assert "<h2>Evaluation on synthetic frames</h2>" in report
    assert "model vs baselines on real images</figcaption>" in report and "ctc-hela hela_t" in report
    assert "agreement" in report and "blur_otsu" in report


def test_shipped_quickstart_configs_load_as_is():
    """The README's main command runs configs/quickstart.yaml unmodified: it must validate, render cells, ingest
    the real sample frames (never the ones it is scored on) and adapt to them; so does the street demo, with the real
    street video and photos of `sample:street`."""
    from pipelines.ingest import SKIMAGE_DATA, resolve_source
    from pipelines.run import RunConfig
    from segfactory.config import load_config
    from segfactory.sampledata import parse_ref
    from segfactory.streetdata import missing

    cfg = load_config(RunConfig, CONFIGS / "quickstart.yaml")
    assert cfg.render.scene.family == "cells" and cfg.finetune.adapt.enabled and cfg.test.scenes > 0
    unlabeled = {parse_ref(s) for s in cfg.real.sources()}
    scored = {parse_ref(s) for s in cfg.eval.real}
    assert {split for _, split in unlabeled} == {"unlabeled"} and {split for _, split in scored} == {"eval"}
    assert {name for name, _ in unlabeled} == {name for name, _ in scored}
    assert cfg.finetune.augment.crop_size <= cfg.render.render.resolution
    # The street demo: real street frames and photos (fetched at setup) to pretrain and adapt on, and held-out frames
    # of the same video with motion masks to score on.
    street = load_config(RunConfig, CONFIGS / "quickstart_street.yaml")
    assert [parse_ref(s) for s in street.real.sources()] == [("street", "unlabeled")]
    assert [parse_ref(s) for s in street.eval.real] == [("street", "eval"), ("labelme-vehicles", "eval"),
                                                        ("labelme-people", "eval")]
    assert street.eval.remap == {"background": "road"}
    assert not missing(), "the street files are fetched by `make install`"
    assert street.test.scenes > 0 and street.finetune.adapt.enabled
    assert street.finetune.adapt.warmup_steps < street.finetune.train.steps
    assert SKIMAGE_DATA not in street.real.sources() and Path(resolve_source(SKIMAGE_DATA)).is_dir()


def test_eval_tta_is_checked_and_stays_out_of_stage_keys_at_its_default(tmp_path: Path, capsys) -> None:
    """``eval.tta`` is one of evaluate's modes (a typo is one line naming the field); at its default it stays out
    of the dumped config, so the evaluate_real keys of configs written before it existed are unchanged."""
    from pipelines.run import RealEvalSettings

    assert "tta" not in RealEvalSettings().model_dump(mode="json")
    assert RealEvalSettings(tta="ms_flip").model_dump(mode="json")["tta"] == "ms_flip"
    assert main(["run", str(CONFIGS / "quickstart_street.yaml"), "--out", str(tmp_path / "run"),
                 "eval.tta=msflip"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "eval.tta" in err and "msflip" in err and "ms_flip" in err
    assert not list((tmp_path / "run").glob("stages/*-*"))


def test_run_stops_before_any_work_when_finetune_names_another_encoder(tmp_path: Path, capsys):
    """With init=ssl fine-tuning starts from the pretrained encoder: a fine-tune section naming another architecture
    (the street demo's resnet18 against a tiny pretrain backbone) is one error line before rendering, not a failed
    fine-tune stage after rendering and pretraining."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart_street.yaml"), "--out", str(out), "init=ssl",
                 "pretrain.backbone.name=test_resnet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune.model.encoder=resnet18 but pretrain.backbone.name=test_resnet trains a test_resnet" in err
    assert "pretrain.backbone.name=resnet18" in err and "init=random" in err
    assert not list(out.glob("stages/*-*"))


def test_ingest_stage_key_follows_what_changes_the_stored_images(tmp_path: Path) -> None:
    from pipelines.refresh import RealImages
    from pipelines.run import ingest_stage_dir
    from pipelines.stages import stage_dir

    def key(**config: object) -> str:
        return ingest_stage_dir(tmp_path, RealImages(src="dump", config=config)).name

    plain = key()
    # the key of a config that sets nothing new is what it was before decode was part of it
    assert plain == stage_dir(tmp_path, "ingest", {"src": ["dump"], "config": RealImages().config.model_dump(
        mode="json", include={"extensions", "follow_symlinks", "normalize", "checks"})}, ()).name
    # a plugin reads more formats, no isolation drops the timeout and memory cap: other images, another stage
    changed = {key(decode={"plugins": ["faulty_decoders"]}), key(decode={"isolate": False}),
               key(checks={"max_pages": 2}), key(follow_symlinks="never")}
    assert plain not in changed and len(changed) == 4
    # how the work is cut is not
    assert key(files_per_shard=7, hash_chunk=3) == plain


def test_pretrain_stage_key_ignores_the_loader_cache_budget() -> None:
    """``data.cache_mb`` changes no batch (tests/test_pretrain_loader.py): another budget reuses the stage."""
    from pipelines.stages import training_key
    from pretrain.config import PretrainConfig

    plain = PretrainConfig()
    assert training_key(PretrainConfig(data={"cache_mb": 64})) == training_key(plain)
    assert training_key(PretrainConfig(data={"cache_mb": 0})) == training_key(plain)
    # what does change the batches still changes the key
    assert training_key(PretrainConfig(augment={"load_size": 256})) != training_key(plain)
