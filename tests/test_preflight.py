"""``segfactory run`` and ``refresh`` stop before any work on inputs that cannot work: nothing rendered, nothing
trained, one line naming the field and the fix (exit code 2)."""

from __future__ import annotations

from pathlib import Path

from conftest import CONFIGS

from segfactory.cli import main


def test_run_with_a_missing_real_source_stops_before_rendering(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), f"real.src={tmp_path / 'nope'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"source '{tmp_path / 'nope'}' does not exist" in err and "fix:" in err
    assert not list(out.glob("stages/*-*"))  # no render, test set or ingest stage


def test_refresh_with_a_missing_real_source_stops_before_rendering(tmp_path: Path, capsys) -> None:
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root),
                 f"real.src={tmp_path / 'nope'}"]) == 2
    assert f"source '{tmp_path / 'nope'}' does not exist" in " ".join(capsys.readouterr().err.split())
    assert not (root / "datasets").exists()


def test_run_with_a_vit_pretrain_backbone_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """Fine-tuning cannot start from a plain ViT (smp needs several strides): said before rendering and
    pretraining, not as a fine-tune stage that fails twice afterwards."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "init=ssl",
                 "pretrain.backbone.name=test_vit", "finetune.model.encoder=test_vit"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pretrain.backbone.name=test_vit is a plain ViT" in err and "init=random" in err
    assert not list(out.glob("stages/*-*"))


def test_run_with_a_fine_tune_its_stage_would_refuse_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """The fine-tune stage's own start checks (``check_adapt_config``) run before rendering, on the config as the
    stage gets it, with the fields named as the run's config names them: input.scale=auto with its estimate at
    step 200 of 100 used to fail the fine-tune stage after rendering, ingesting and pretraining."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "finetune.train.steps=100"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert ("finetune.input.scale=auto needs a source-only phase to estimate from (finetune.adapt.warmup_steps=200 "
            "of finetune.train.steps=100)") in err and "fix: set finetune.adapt.warmup_steps" in err
    assert not list(out.glob("stages/*-*"))
    # the run's real images are the stage's unlabeled data: input.scale=auto passes that check, and a MIC setting
    # without self-training is the next one refused
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "finetune.adapt.enabled=false",
                 "finetune.adapt.mic_ratio=0.5"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune.adapt.mic_ratio=0.5" in err and "fix: set finetune.adapt.enabled=true" in err
    assert not list(out.glob("stages/*-*"))


def test_run_and_refresh_with_a_missing_or_wrong_labeled_training_folder_stop_before_rendering(
        tmp_path: Path, capsys, tiny_dataset: Path) -> None:
    """``finetune.data.real`` / ``data.val`` are opened by the fine-tune stage, after rendering and pretraining:
    a missing folder, a rendered dataset given as real labels, or the unlabeled split of a sample set is said
    before any work, naming the field as the config names it."""
    out = tmp_path / "run"
    cases = [(f"finetune.data.real=[{tmp_path / 'nope'}]",
              f"data folder '{tmp_path / 'nope'}' (finetune.data.real[0]) does not exist"),
             (f"finetune.data.real=[{tiny_dataset}]", "is a synthetic source but was given as real"),
             ("finetune.data.val=[sample:ctc-hela/unlabeled]",
              "finetune.data.val[0] 'sample:ctc-hela/unlabeled' is images without masks")]
    for override, needle in cases:
        assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), override,
                     "finetune.input.scale=0.5"]) == 2, override  # (input.scale=auto refuses real labels)
        assert needle in " ".join(capsys.readouterr().err.split()), override
        assert not list(out.glob("stages/*-*"))
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true",
                 f"train.finetune.data.real=[{tmp_path / 'nope'}]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "(train.finetune.data.real[0]) does not exist" in err and "train.finetune.data.real=[]" in err
    assert not (root / "datasets").exists()


def test_a_pretrain_load_size_under_the_crop_is_refused_with_the_config(tmp_path: Path, capsys) -> None:
    """``augment.load_size`` below ``augment.crop_size`` is refused when the config is read (it was the pretrain
    stage's first check: after rendering, in a run)."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "pretrain.augment.load_size=40"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pretrain.augment.load_size=40 is invalid: is smaller than crop_size=64 of the same section" in err
    assert not list(out.glob("stages/*-*"))


def test_a_decoder_width_the_architecture_cannot_take_is_refused_with_the_config(tmp_path: Path, capsys) -> None:
    """``model.decoder_channels`` is checked against ``model.arch`` when the config is read: it was checked when
    the fine-tune stage built its model, after rendering and pretraining in a run."""
    out = tmp_path / "run"
    for overrides, said in [(["finetune.model.decoder_channels=[8,8]"],
                             "finetune.model.decoder_channels=[8, 8] is invalid: model.arch=unet needs 5 values (one "
                             "per decoder stage), not 2 fix: give 5 widths"),
                            (["finetune.model.arch=linknet", "finetune.model.decoder_channels=8"],
                             "finetune.model.decoder_channels=8 is invalid: model.arch=linknet has no configurable "
                             "decoder width fix: leave it unset (null)"),
                            (["finetune.model.arch=fpn", "finetune.model.decoder_channels=[32,16]"],
                             "finetune.model.decoder_channels=[32, 16] is invalid: model.arch=fpn takes one width, "
                             "not a list of 2 fix: give one int (e.g. 32)"),
                            (["finetune.model.decoder_channels=0"],
                             "finetune.model.decoder_channels=0 is invalid: decoder widths are channel counts")]:
        assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), *overrides]) == 2
        assert said in " ".join(capsys.readouterr().err.split()), overrides
        assert not list(out.glob("stages/*-*"))
    # the stand-alone command reads the same section (its fields without the run's prefix)
    assert main(["finetune", str(CONFIGS / "finetune.yaml"), "--out", str(tmp_path / "ft"),
                 "model.decoder_channels=[4,4,4]"]) == 2
    assert "override: model.decoder_channels=[4, 4, 4] is invalid: model.arch=unet needs 5 values" in " ".join(
        capsys.readouterr().err.split())
    assert not (tmp_path / "ft").exists()


def test_run_from_random_init_without_a_usable_encoder_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """With init=random no pretrained encoder gives the architecture: ``finetune.model.encoder`` must name a timm
    model, said before rendering (the fine-tune stage refused it after rendering)."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "init=random",
                 "finetune.model.encoder=resnet-18"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune.model.encoder='resnet-18' is not a timm model" in err and "did you mean 'resnet18'" in err
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "init=random",
                 "finetune.model.encoder=null"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune.model.encoder is not set: with init=random" in err and "finetune.model.encoder=resnet18" in err
    assert not list(out.glob("stages/*-*"))


def test_run_with_real_eval_classes_the_model_lacks_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """``eval.real`` folders whose classes do not map onto the model's (the scene family's, known before the
    render) are refused before rendering: the check read the rendered dataset's classes, after rendering."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart_street.yaml"), "--out", str(out),
                 "eval.real=[sample:ctc-hela/eval]", "eval.remap={}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its class 'background' (id 0) is not a class of the model" in err and "eval.remap.background=" in err
    assert not list(out.glob("stages/*-*"))


def test_refresh_with_a_promotion_real_eval_it_cannot_score_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """``train.promotion.real_eval`` is scored after training: a sample set's images without masks, or a labeled
    folder with a class the model lacks (that ``train.promotion.remap`` does not map), are refused before any work
    (only a missing folder was)."""
    root, dump = tmp_path / "r", tmp_path / "dump"
    dump.mkdir()
    base = ["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true", f"real.src={dump}"]
    assert main([*base, "train.promotion.real_eval=sample:ctc-hela/unlabeled"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.promotion.real_eval='sample:ctc-hela/unlabeled' is not labeled images" in err
    assert "fix: use sample:ctc-hela/eval or sample:ctc-hela/labeled" in err
    # the street model has no class 'background' (the run's eval.remap maps it; refresh has no mapping)
    assert main([*base, "train.promotion.real_eval=sample:ctc-hela/eval"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "its class 'background' (id 0) is not a class of the model (sky, road," in err
    assert "fix: map it: train.promotion.remap.background=" in err
    assert not (root / "datasets").exists()
    # mapped onto the street model's classes, the folder passes (labelme's people photos: background, person)
    from pipelines.refresh import RefreshConfig, check_promotion_real_eval
    from pipelines.render import rendered_classes, resolve_render_config
    from pipelines.stages import model_targets
    from segfactory.config import load_config

    cfg = load_config(RefreshConfig, CONFIGS / "refresh.yaml", [
        "train.promotion.real_eval=sample:labelme-people/eval", "train.promotion.remap={background: road}"])
    check_promotion_real_eval(cfg.train.promotion, model_targets(
        cfg.train.finetune, rendered_classes(resolve_render_config(cfg.render)[0])))


def test_class_weights_of_another_length_than_the_classes_stop_run_and_refresh_before_rendering(
        tmp_path: Path, capsys) -> None:
    """``train.loss.class_weights`` is one weight per class of the model, the scene family's: a list of another
    length failed the fine-tune stage when it built its loss, after rendering and pretraining."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out),
                 "finetune.train.loss.class_weights=[1,2]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "finetune.train.loss.class_weights has 2 values for 3 classes" in err
    assert "fix: give 3 weights (background, nucleus, debris) or use auto" in err
    assert not list(out.glob("stages/*-*"))
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true",
                 f"real.src={tmp_path}", "train.finetune.train.loss.class_weights=[1]"]) == 2
    assert "train.finetune.train.loss.class_weights has 1 values for 9 classes" in " ".join(
        capsys.readouterr().err.split())
    assert not (root / "datasets").exists()


def test_bench_transfer_checks_every_row_before_the_first_runs(tmp_path: Path, capsys) -> None:
    """Each row of ``segfactory bench transfer`` is a run with its own fine-tune settings: a row the fine-tune
    stage would refuse (``scale``: input.scale=auto with its estimate at step 200 of 100) and label-efficiency
    settings with no frame to label stopped the bench only when their turn came, after the earlier rows trained."""
    out = tmp_path / "bench"
    assert main(["bench", "transfer", str(CONFIGS / "bench_transfer.yaml"), "--out", str(out),
                 "finetune.train.steps=100"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bench transfer row scale: finetune.input.scale=auto needs a source-only phase" in err
    assert not list(out.glob("stages/*-*"))
    assert main(["bench", "transfer", str(CONFIGS / "bench_transfer.yaml"), "--out", str(out),
                 "label_efficiency.gap=50"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "label_efficiency.gap=50 leaves no training frame of 'sample:ctc-hela/eval'" in err
    assert not list(out.glob("stages/*-*"))


def test_a_test_seed_equal_to_the_training_seed_stops_run_and_refresh_before_rendering(tmp_path: Path, capsys) -> None:
    """The held-out test set must be other scenes than the training ones: the check ran when the test set was
    rendered, after the training dataset (in a refresh, after the release's render and ingest too)."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "test.seed=0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "test.seed=0 is the training seed" in err and "render.dataset.seed=0" in err
    assert not list(out.glob("stages/*-*"))
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true",
                 f"real.src={tmp_path}", "train.test.seed=0"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.test.seed=0 is the training seed" in err and "fix: set train.test.seed to another value" in err
    assert not (root / "datasets").exists()


def test_a_labeled_training_folder_with_a_class_the_model_lacks_stops_run_before_rendering(tmp_path: Path,
                                                                                           capsys) -> None:
    """``finetune.data.real`` folders are mapped onto the model's classes (the scene family's) when the fine-tune
    stage opens them: a class with no target stopped the run after rendering and pretraining; its ``remap`` fixes
    it."""
    out = tmp_path / "run"
    real = "sample:labelme-people/eval"  # background and person; the cells model has background, nucleus, debris
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "finetune.input.scale=1",
                 f"finetune.data.real=[{real}]"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "class 'person' (id 1) of real source '" in err and "has no target class" in err
    assert ("fix: add `finetune.data.real[0].remap: {person: <one of background, nucleus, debris> or ignore}` or "
            "list it in `finetune.classes`") in err  # the run's own field names, not the stage's
    assert not list(out.glob("stages/*-*"))
    from pipelines.run import RunConfig, check_run_config
    from segfactory.config import load_config

    cfg = load_config(RunConfig, CONFIGS / "quickstart.yaml", [
        "finetune.input.scale=1", f"finetune.data.real=[{{path: '{real}', remap: {{person: nucleus}}}}]"])
    check_run_config(cfg)  # mapped: no error


def test_refresh_with_a_fine_tune_its_stage_would_refuse_stops_before_rendering(tmp_path: Path, capsys) -> None:
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true",
                 "train.finetune.adapt.instance_pseudo=true"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.finetune.adapt.instance_pseudo=true" in err and "train.finetune.instances.enabled=false" in err
    assert not (root / "datasets").exists()


def test_real_images_all_smaller_than_the_pretrain_crop_stop_run_and_refresh_before_rendering(tmp_path: Path,
                                                                                               capsys) -> None:
    """The pretrain stage skips images whose short side is below ``augment.crop_size`` and refuses a store with none
    left; in a run that was after rendering. ``run`` now ingests first (seconds) and checks the store there; so
    does ``refresh`` (which ingested first already). The real frames: the quickstart's HeLa and CHO sample sets."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "pretrain.augment.crop_size=1024"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "all 72 ingested images are smaller than pretrain.augment.crop_size=1024 (largest short side 700 px)" \
        in err
    assert "fix: set pretrain.augment.crop_size=700 or lower, or pretrain.augment.small_images=upscale" in err
    assert [p.name.split("-")[0] for p in out.glob("stages/*-*")] == ["ingest"]  # nothing rendered
    from segfactory.sampledata import resolve_path

    hela = resolve_path("sample:ctc-hela/unlabeled")
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root), "train.enabled=true",
                 f"real.src={hela}", "train.pretrain.augment.crop_size=1024"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "all 12 ingested images are smaller than train.pretrain.augment.crop_size=1024" in err
    assert "or train.pretrain.augment.small_images=upscale" in err
    assert not (root / "datasets").exists()


def test_a_run_config_typo_in_eval_baselines_names_the_config_field(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "eval.baselines=otsuu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "eval.baselines: unknown baseline 'otsuu'; did you mean 'otsu'?" in err and "--baselines" not in err
    assert not list(out.glob("stages/*-*"))


def test_finetune_resume_without_a_checkpoint_says_it_starts_at_step_0(tiny_dataset: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """A pipeline's retry resumes a stage that may have died before its first checkpoint, so this is not an
    error; a user who typed the wrong --out is told."""
    from finetune.train import Trainer
    from tests.test_finetune_train import tiny_cfg

    Trainer(tiny_cfg(tiny_dataset), tmp_path / "fresh", show_progress=False).prepare(resume=True)
    assert "holds no checkpoint.pt yet; starting at step 0" in " ".join(capsys.readouterr().err.split())
